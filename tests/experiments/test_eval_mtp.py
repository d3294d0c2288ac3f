"""``bebop eval-mtp``: teacher-forced acceptance along the policy's samples equals the engine's empirical α_k
(per verify step) within statistical error on the toy policy; the verify-step weights; the command line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from conftest import cli

from bebop.core.acceptance import accept_length
from bebop.core.sampling import SamplingParams
from bebop.engine.dispatch import DecodeConfig, decode
from bebop.errors import BebopError
from bebop.experiments.analysis import token_acceptance
from bebop.experiments.eval_mtp import eval_mtp, ratio_se, sample_length, verify_weights
from bebop.tasks import get_task, sample_problems
from bebop.training.train_mtp import expected_alpha

PARAMS = SamplingParams(temperature=1.0)

# ------------------------------------------------------------------------------------------------ pure parts


def _enumerated_weights(r: np.ndarray) -> np.ndarray:
    """The verify-step weights by brute force: every accept/reject pattern of every step along the sample, with
    its probability (Π r for accepted drafts, 1 − r for the rejected one)."""
    n, gamma = r.shape
    w = np.zeros((n, gamma))

    def walk(j: int, prob: float) -> None:
        if j >= n:
            return
        for a in range(gamma + 1):  # a drafts accepted at the step starting at j
            p = prob * np.prod(r[j, :a]) * (1.0 - r[j, a] if a < gamma else 1.0)
            w[j, : min(a + 1, gamma)] += p
            walk(j + a + 1, p)

    walk(0, 1.0)
    return w


@pytest.mark.parametrize("gamma", [1, 2, 3])
def test_verify_weights_equal_enumerating_every_accept_pattern(gamma):
    rng = np.random.default_rng(gamma)
    r = rng.uniform(0, 1, (9, gamma))
    # each pattern is counted once per step it reaches: w[j, k] = Σ over patterns that start at j and reach k
    np.testing.assert_allclose(verify_weights(r), _enumerated_weights(r), rtol=1e-12, atol=1e-15)


def test_verify_weights_limits():
    # all accepted: steps start every γ + 1 positions and reach every draft; none accepted: every position, step 1
    np.testing.assert_array_equal(verify_weights(np.ones((7, 2)))[:, 0], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(verify_weights(np.ones((7, 2)))[:, 1], [1, 0, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(verify_weights(np.zeros((4, 3))), [[1, 0, 0]] * 4)
    assert verify_weights(np.zeros((0, 2))).shape == (0, 2)


def test_ratio_se_is_the_delta_method_over_units():
    num, den = np.array([[1.0], [3.0], [2.0]]), np.array([[2.0], [4.0], [4.0]])
    (ratio,), (se,) = ratio_se(num, den)
    assert ratio == pytest.approx(0.6)
    dev = num[:, 0] - 0.6 * den[:, 0]
    assert se == pytest.approx(np.sqrt(1.5 * (dev**2).sum()) / 10)
    assert ratio_se(np.ones((1, 2)), np.ones((1, 2)))[1] == [None, None]      # one unit: no error estimate
    assert ratio_se(np.zeros((3, 1)), np.zeros((3, 1))) == ([None], [None])   # never reached


# ------------------------------------------------------------------------------------------------ vs the engine


def _prompts(tokenizer, n: int, seed: int) -> list[list[int]]:
    return [tokenizer(p.prompt)["input_ids"] for p in sample_problems(get_task("arith"), n, seed)]


def _policy_rows(model, tokenizer, n: int, length: int, eos, seed: int) -> list[tuple[list[int], int]]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(0, n, 128):
        prompts = _prompts(tokenizer, min(128, n - i), seed + i)
        r = decode(model, None, prompts, DecodeConfig(PARAMS, length, eos, pad_id=tokenizer.pad_token_id,
                                                      generator=gen))
        rows += [(p + c, len(p)) for p, c in zip(prompts, r.completions(), strict=True)]
    return rows


def _engine_alpha(model, head, tokenizer, n: int, length: int, gamma: int, rule: str, eos, seed: int):
    """The engine's empirical α_k (accepted_k / reached_k summed over batches) and its standard error with the
    batches as independent units."""
    gen = torch.Generator().manual_seed(seed)
    acc, reached = [], []
    for i in range(0, n, 64):
        r = decode(model, head, _prompts(tokenizer, 64, seed + i),
                   DecodeConfig(PARAMS, length, eos, gamma, rule, tokenizer.pad_token_id, gen))
        acc.append(r.metrics.accepted_k)
        reached.append(r.metrics.reached)
    return ratio_se(np.array(acc), np.array(reached))


def _z(a, a_se, b, b_se) -> list[float]:
    return [abs(x - y) / np.hypot(u, v) for x, u, y, v in zip(a, a_se, b, b_se, strict=True)]


def test_gamma_1_alpha_equals_the_engine_and_the_position_mean_does_not(peaky, tiny_tokenizer):
    """γ = 1 with EOS: every verify step's one draft lies inside the sample, so α is exact in expectation; the
    teacher-forced rows and the engine's run use independent prompts and seeds, and the z-score of the difference
    (both standard errors) stays below 4. The plain mean over positions is far off on this policy: the engine
    starts a step right after a rejection but skips the position after an acceptance, so it drafts more often
    where acceptance is high."""
    model, head = peaky
    L, n, eos = 32, 2048, tiny_tokenizer.eos_token_id
    rows = _policy_rows(model, tiny_tokenizer, n, sample_length(L, 1), eos, seed=100)
    res = eval_mtp(model, head, rows, 1, PARAMS, tiny_tokenizer.pad_token_id, max_new_tokens=L)
    eng, eng_se = _engine_alpha(model, head, tiny_tokenizer, n, L, 1, "rejection", eos, seed=50_000)
    rs = res["rejection"]
    assert max(_z(rs["alpha"], rs["alpha_se"], eng, eng_se)) < 4, (rs["alpha"], eng)
    assert min(_z(rs["position_alpha"], rs["position_alpha_se"], eng, eng_se)) > 6, (rs["position_alpha"], eng)
    assert rs["accept_length"] == pytest.approx(1 + rs["alpha"][0])
    assert res["n_positions"] > 40_000 and res["n_rows"] == n and res["n_sequences"] > 0.99 * n  # some EOS at once


@pytest.mark.parametrize("rule", ["rejection", "target_only"])
def test_gamma_3_alpha_equals_the_engine_per_step(peaky, tiny_tokenizer, rule):
    """γ = 3, RS and TO: α_k for k ≥ 2 is the engine's conditional α_k (draft k judged only after drafts
    1..k−1 were accepted), exact in expectation because the weights follow each sample's accept chain. No EOS
    here (the policy never stops early) because after an accepted EOS draft the engine still judges the drafts
    behind it, against contexts a sample that ended at its EOS does not have. z < 4 for every step."""
    model, head = peaky
    L, n = 32, 1536
    rows = _policy_rows(model, tiny_tokenizer, n, sample_length(L, 3), None, seed=200)
    res = eval_mtp(model, head, rows, 3, PARAMS, tiny_tokenizer.pad_token_id, max_new_tokens=L)
    eng, eng_se = _engine_alpha(model, head, tiny_tokenizer, n, L, 3, rule, None, seed=60_000)
    r = res[rule]
    assert max(_z(r["alpha"], r["alpha_se"], eng, eng_se)) < 4, (r["alpha"], eng)
    assert r["accept_length"] == pytest.approx(float(accept_length(r["alpha"])))
    # verify steps in expectation: the engine takes ≈ n · L / accept length of them
    assert r["verify_steps"] == pytest.approx(n * (L - 1) / (r["accept_length"]), rel=0.05)


def test_position_alpha_is_the_teacher_forced_mean(peaky, tiny_tokenizer):
    """Without a budget every drafting position counts, and position α is ``token_acceptance``'s mean, which for
    RS is ``train_mtp.expected_alpha`` (the held-out α of train-mtp); the buckets cover the same positions."""
    model, head = peaky
    rows = _policy_rows(model, tiny_tokenizer, 64, 12, tiny_tokenizer.eos_token_id, seed=7)
    res = eval_mtp(model, head, rows, 2, PARAMS, tiny_tokenizer.pad_token_id, n_buckets=4)
    stats = token_acceptance(model, head, [r for r in rows if len(r[0]) - r[1] > 2], 2, PARAMS,
                             tiny_tokenizer.pad_token_id)
    np.testing.assert_allclose(res["rejection"]["position_alpha"], stats["alpha_rs"].mean(0), rtol=1e-9)
    np.testing.assert_allclose(res["target_only"]["position_alpha"], stats["alpha_to"].mean(0), rtol=1e-9)
    np.testing.assert_allclose(res["rejection"]["position_alpha"],
                               expected_alpha(model, head, rows, 2, PARAMS, tiny_tokenizer.pad_token_id), rtol=1e-5)
    assert res["n_positions"] == stats["entropy"].size == sum(res["buckets"]["count"])
    assert res["mean_entropy"] == pytest.approx(stats["entropy"].mean())
    json.dumps(res, allow_nan=False)


def test_budget_keeps_the_first_positions_of_each_row(peaky, tiny_tokenizer):
    model, head = peaky
    rows = _policy_rows(model, tiny_tokenizer, 16, sample_length(6, 2), None, seed=3)  # 7 tokens: 5 positions
    res = eval_mtp(model, head, rows, 2, PARAMS, tiny_tokenizer.pad_token_id, max_new_tokens=6)
    assert res["n_positions"] == 16 * 5  # steps start after 1..5 tokens
    assert eval_mtp(model, head, rows, 2, PARAMS, tiny_tokenizer.pad_token_id, max_new_tokens=3)["n_positions"] \
        == 16 * 2
    with pytest.raises(BebopError, match="max_new_tokens 1 leaves no verify step"):
        eval_mtp(model, head, rows, 2, PARAMS, tiny_tokenizer.pad_token_id, max_new_tokens=1)


def test_no_sample_long_enough_is_an_error(peaky, tiny_tokenizer):
    model, head = peaky
    with pytest.raises(BebopError, match="no sample has more than gamma = 3 completion tokens"):
        eval_mtp(model, head, [([5, 6, 7, 8], 2), ([5, 6], 1)], 3, PARAMS, tiny_tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_eval_mtp_on_a_task_writes_json(dirs, tmp_path):
    out = tmp_path / "eval.json"
    r = cli("eval-mtp", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--task", "arith",
            "--samples", "12", "--max-new-tokens", "10", "--gamma", "2", "--temperature", "0.8", "--json", str(out),
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "eval-mtp" in r.stdout and "position α RS" in r.stdout
    res = json.loads(out.read_text())
    assert res["gamma"] == 2 and res["temperature"] == 0.8 and res["max_new_tokens"] == 10
    assert res["n_rows"] == 12 and res["n_positions"] > 0 and res["config"]["source"] == "task"
    for rule in ("rejection", "target_only"):
        assert len(res[rule]["alpha"]) == len(res[rule]["alpha_se"]) == 2
        assert 0 <= res[rule]["alpha"][0] <= 1
        assert res[rule]["accept_length"] == pytest.approx(float(accept_length(res[rule]["alpha"])))


def test_cli_eval_mtp_on_user_prompts_dataset_and_rollouts(dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"{a}+{b}="}) for a, b in itertools.product(range(3), "12")))
    out = tmp_path / "p.json"
    args = ("--model", str(dirs / "base"), "--mtp", str(dirs / "head"), "--samples", "8", "--max-new-tokens", "8",
            "--gamma", "2", "--device", "cpu")
    r = cli("eval-mtp", *args, "--prompts", str(prompts), "--cache-dir", str(tmp_path / "cache"), "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["config"]["source"] == "prompts" and res["n_rows"] == 8 and res["max_new_tokens"] == 8
    assert any((tmp_path / "cache").iterdir())  # the samples were cached
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": f"{a}+2="}) for a in range(5)))
    r = cli("eval-mtp", *args, "--dataset", str(data), "--field", "question", "--cache-dir", "", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())["config"]["source"] == "dataset"
    rollouts = tmp_path / "rollouts.jsonl"
    rollouts.write_text("\n".join(json.dumps({"prompt": f"{a}+1=", "completion": f" {a + 1} {a} {a} {a}"})
                                  for a in range(4)))
    r = cli("eval-mtp", *args, "--completions", str(rollouts), "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["config"]["source"] == "completions" and res["max_new_tokens"] is None and res["n_positions"] > 0


@pytest.mark.parametrize(("extra", "message"), [
    (("--task", "arith", "--prompts", "x.jsonl"), "give one data source, got --task and --prompts"),
    (("--temperature", "0"), "temperature must be > 0 for eval-mtp, got 0.0"),
    (("--gamma", "0"), "gamma"),
])
def test_cli_eval_mtp_bad_input(dirs, extra, message):
    r = cli("eval-mtp", "--model", str(dirs / "base"), "--mtp", str(dirs / "head"), *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr
