"""`bebop generate` and `bebop bench decode` on a tiny policy + head: run, print, write every promised field."""

from __future__ import annotations

import json

import pytest
from conftest import cli


@pytest.mark.slow
def test_bench_decode_writes_json_with_every_field(dirs):
    out = dirs / "bench.json"
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--batch-sizes", "1,2",
            "--max-new-tokens", "8", "--repeats", "1", "--prompts", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "speedup" in r.stdout
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"1", "2"}
    for row in res.values():
        for key in ("plain_tokens_per_s", "mtp_tokens_per_s", "speedup", "alpha", "accept_length", "hf_tokens_per_s",
                    "c_1", "c_verify", "c_draft", "c_catchup", "speedup_limit", "fraction_of_limit",
                    "speedup_limit_catchup", "fraction_of_limit_catchup", "limit_formula", "mtp_host_seconds_per_step",
                    "plain_host_seconds_per_step", "plain_row_utilization", "mtp_row_utilization"):
            assert key in row
        assert len(row["alpha"]) == 3 and row["plain_tokens_per_s"] > 0 and row["mtp_tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["mtp_tokens_per_s"] / row["plain_tokens_per_s"])
        # the limit is a decode-phase quantity: the fraction compares it with the decode-phase speedup
        assert row["decode_speedup"] == pytest.approx(row["mtp_decode_tokens_per_s"] / row["plain_decode_tokens_per_s"])
        assert row["fraction_of_limit"] == pytest.approx(row["decode_speedup"] / row["speedup_limit"])
        assert row["c_verify_over_c_1"] == pytest.approx(row["c_verify"] / row["c_1"])
        assert row["c_draft_over_c_1"] == pytest.approx(row["c_draft"] / row["c_1"])
        assert row["speedup_limit"] == pytest.approx(row["accept_length"] / (row["c_verify_over_c_1"]
                                                                              + 3 * row["c_draft_over_c_1"]))
        assert 0 < row["mtp_row_utilization"] <= 1 and 0 < row["plain_row_utilization"] <= 1
    assert "hf_mtp_tokens_per_s" in res["1"]
    assert res["1"]["hf_mtp_tokens_per_s"] is not None or res["1"]["hf_mtp_error"]


@pytest.mark.slow
def test_generate_prints_completions_and_metrics(dirs):
    r = cli("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--n", "2",
            "--max-new-tokens", "6", "--temperature", "0.7", "--top-p", "0.9")
    assert r.returncode == 0, r.stderr
    assert "Q:" in r.stdout and "accept_length" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize(("args", "needle"), [
    (["--gamma", "0"], "gamma must be >= 1, got 0"),
    (["--temperature", "-0.5"], "-0.5"),
    (["--top-p", "1.5"], "1.5"),
    (["--top-k", "0"], "top_k"),
    (["--rule", "foo"], "'foo'"),
])
def test_generate_bad_sampling_input(dirs, args, needle):
    r = cli("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_missing_head_and_corrupt_head(dirs, tmp_path):
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(tmp_path / "nohead"))
    assert r.returncode == 2 and "nohead" in r.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x07" * 64)
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(bad))
    assert r.returncode == 2 and "bad.safetensors" in r.stderr


@pytest.mark.slow
def test_bench_losses_trains_every_loss_and_writes_the_promised_json(dirs, tmp_path, monkeypatch):
    """Every loss is trained and measured and its row written. The policy samples each head run draws (96 tokens
    each, and 256 held-out ones it scores itself on; neither is a command option) shrink to 24 tokens and 4
    held-out samples: nothing asserted here reads them, and they were most of the run."""
    from dataclasses import replace

    import bebop.training.train_mtp as train_mtp_module

    real = train_mtp_module.train_mtp
    monkeypatch.setattr(train_mtp_module, "train_mtp",
                        lambda cfg: real(replace(cfg, heldout_samples=4, max_new_tokens=24)))
    out = tmp_path / "losses.json"
    r = cli("bench", "losses", "--model", str(dirs / "base"), "--out", str(tmp_path / "heads"), "--steps", "2",
            "--data-samples", "8", "--eval-prompts", "4", "--init", str(dirs / "head"), "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(res) == {"ce", "fkl", "rkl", "tv", "e2e_tv"}
    for row in res.values():
        assert len(row["alpha_rs"]) == len(row["alpha_to"]) == 3
        assert 1.0 <= row["accept_length_rs"] <= 4.0 and 1.0 <= row["accept_length_to"] <= 4.0
        assert "accept_length_rs_t0.7" in row
    r = cli("bench", "losses", "--model", str(dirs / "base"), "--losses", "ce,l2")
    assert r.returncode == 2 and "'l2'" in r.stderr


def test_bench_losses_fine_tunes_every_loss_from_one_warm_start(dirs, tmp_path, monkeypatch):
    """Without --init the forward-KL warm start is trained once; every loss then starts from that head with the
    same data, steps, learning rate and seed (training shrunk here to keep the test fast)."""
    from dataclasses import replace

    import bebop.training.train_mtp as train_mtp_module
    from bebop.experiments.bench_losses import LossBenchConfig, bench_losses

    calls, real = [], train_mtp_module.train_mtp

    def small(cfg):
        calls.append(cfg)
        return real(replace(cfg, steps=2, batch_size=4, data_samples=8, heldout_samples=4, max_new_tokens=12,
                            eval_every=1))

    monkeypatch.setattr(train_mtp_module, "train_mtp", small)
    bench_losses(str(dirs / "base"), str(tmp_path / "heads"),
                 LossBenchConfig(losses=("ce", "e2e_tv"), eval_prompts=2, temperatures=(1.0,), max_new_tokens=8))
    warm, *fine = calls
    default = train_mtp_module.TrainMTPConfig()
    assert (warm.loss, warm.steps, warm.lr, warm.init, warm.warm_steps) == ("fkl", default.warm_steps,
                                                                           default.warm_lr, None, 0)
    assert [c.loss for c in fine] == ["ce", "e2e_tv"]
    assert {c.init for c in fine} == {warm.out}
    assert len({(c.steps, c.lr, c.seed, c.data_samples, c.gamma_train) for c in fine}) == 1


@pytest.mark.slow
def test_bench_decode_runs_agent_episodes_with_the_environment(dirs, tmp_path):
    """Multi-turn task: plain and MTP both decode real episodes (turns.generate_turns); no HF baseline."""
    out = tmp_path / "agent.json"
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--task", "agent",
            "--batch-sizes", "2", "--max-new-tokens", "12", "--repeats", "1", "--prompts", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["results"]["2"]
    assert row["plain_tokens_per_s"] > 0 and row["mtp_tokens_per_s"] > 0 and len(row["alpha"]) == 3
    assert row["hf_tokens_per_s"] is None and "multi-turn" in row["hf_error"]
    r = cli("bench", "decode", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--task", "agent",
            "--gamma", "auto")
    assert r.returncode == 2 and "multi-turn" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_generate_with_adaptive_gamma_and_auto_rule(dirs):
    r = cli("generate", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--n", "2",
            "--max-new-tokens", "8", "--gamma", "auto", "--rule", "auto")
    assert r.returncode == 0, r.stderr
    assert "mean_gamma" in r.stdout and "target_only_fraction" in r.stdout


def test_ignore_eos_decodes_every_row_to_the_token_limit(tiny_tokenizer, tiny_model, monkeypatch):
    """With ``ignore_eos`` plain and MTP rows all run ``max_new_tokens`` tokens even when EOS is the only token
    the policy can sample (the benchmark then times the engine, not a static batch waiting for its longest row)."""
    import torch.nn.functional as F

    import bebop.engine.decode as decode
    import bebop.engine.step as step
    from bebop.experiments.bench_decode import _Run
    from bebop.experiments.options import DecodeBenchConfig
    from bebop.models.mtp import MTPHead

    eos = tiny_tokenizer.eos_token_id

    def only_eos(logits, params):                                      # p and q put all their mass on EOS
        return F.one_hot(logits.argmax(-1).fill_(eos), logits.shape[-1]).to(logits.dtype)

    monkeypatch.setattr(decode, "probs_fast", only_eos)
    monkeypatch.setattr(step, "probs_fast", only_eos)
    head = MTPHead.from_base(tiny_model).eval()
    for ignore, want in ((False, 1), (True, 6)):
        run = _Run(tiny_model, tiny_tokenizer, head, DecodeBenchConfig(max_new_tokens=6, ignore_eos=ignore))
        assert run.eos_pad[0] == (None if ignore else eos)
        batch = run.batches(3, 0, 3)[0]
        for h in (None, head):
            assert run.decode(h, batch, 3, "rejection", 0).tokens == 3 * want


def test_ignore_eos_refuses_a_multi_turn_task():
    from bebop.errors import BebopError
    from bebop.experiments.options import DecodeBenchConfig

    with pytest.raises(BebopError, match="'agent'"):
        DecodeBenchConfig(task="agent", ignore_eos=True)
