"""Tokenizer, model save/load, config handling, evaluation and the CLI (tiny configs, seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli, cli_process
from hypothesis import given, settings
from hypothesis import strategies as st

from bebop.config import make_config
from bebop.errors import BebopError
from bebop.models.policy import ModelConfig, load_policy, save_policy
from bebop.tasks import get_task, sample_problems
from bebop.training.sft import SFT_RECIPES, SFTConfig, encode_example, sft_batch, train_sft, warmup_cosine


@pytest.mark.parametrize("task", ["arith", "countdown"])
def test_tokenizer_round_trips_task_text(tiny_tokenizer, task):
    import random

    t = get_task(task)
    rng = random.Random(3)
    for prob in sample_problems(t, 50, seed=1):
        text = prob.prompt + t.reference_solution(prob, rng)
        ids = tiny_tokenizer(text)["input_ids"]
        assert ids[0] == tiny_tokenizer.bos_token_id
        assert tiny_tokenizer.unk_token_id not in ids
        assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from([*"0123456789+-*/()=: \n", " so ", "then ", "A: ", "Q: "]), max_size=40))
def test_tokenizer_round_trips_any_text_over_task_alphabet(tiny_tokenizer, pieces):
    text = "".join(pieces)
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text


def test_prompt_tokens_are_a_prefix_of_the_training_sequence(tiny_tokenizer):
    t = get_task("arith")
    prob = sample_problems(t, 1, seed=0)[0]
    import random

    sol = t.reference_solution(prob, random.Random(0))
    ids, n_prompt = encode_example(tiny_tokenizer, prob, sol)
    assert ids[:n_prompt] == tiny_tokenizer(prob.prompt)["input_ids"]
    assert tiny_tokenizer(prob.prompt + sol)["input_ids"] + [tiny_tokenizer.eos_token_id] == ids


def test_sft_batch_masks_prompt_and_padding(tiny_tokenizer):
    import random

    b = sft_batch(get_task("arith"), tiny_tokenizer, random.Random(0), 8)
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape
    assert (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert (b["labels"][:, :3] == -100).all()  # BOS, "Q", ":" are prompt
    assert ((b["labels"] == tiny_tokenizer.eos_token_id).sum(1) == 1).all()


def test_model_and_tokenizer_save_load_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    model, tok = load_policy(tmp_path / "m")
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    x = torch.tensor([tiny_tokenizer("Q: 1+2*3\n")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(x).logits, tiny_model(x).logits)
    assert not list(tmp_path.glob(".m.*")), "no temp dirs left behind"


def test_save_policy_replaces_an_existing_checkpoint(tiny_model, tiny_tokenizer, tmp_path):
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_load_policy_errors_name_the_bad_path(tiny_model, tiny_tokenizer, tmp_path):
    with pytest.raises(BebopError, match="nope"):
        load_policy(tmp_path / "nope")
    save_policy(tiny_model, tiny_tokenizer, tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(BebopError, match=str(tmp_path / "m")):
        load_policy(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(BebopError, match="config.json"):
        load_policy(tmp_path / "m")


def test_configs_validate_and_merge_toml(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('task = "countdown"\nsteps = 7\n[model]\nhidden_size = 64\nnum_heads = 2\n')
    cfg = make_config(SFTConfig, f, steps=9, **{"model.num_layers": 3})
    assert (cfg.task, cfg.steps, cfg.model.hidden_size, cfg.model.num_layers) == ("countdown", 9, 64, 3)
    with pytest.raises(BebopError, match="steps must be positive, got -1"):
        make_config(SFTConfig, None, steps=-1)
    with pytest.raises(BebopError, match="hidden_size must be positive, got 0"):
        ModelConfig(hidden_size=0)
    with pytest.raises(BebopError, match="'nope'"):
        make_config(SFTConfig, None, task="nope")
    f.write_text("bogus = 1\n")
    with pytest.raises(BebopError, match="bogus"):
        make_config(SFTConfig, f)
    f.write_text("this is = = not toml")
    with pytest.raises(BebopError, match=str(f)):
        make_config(SFTConfig, f)
    with pytest.raises(BebopError, match="missing.toml"):
        make_config(SFTConfig, tmp_path / "missing.toml")


def test_sft_defaults_are_step_counts_per_task_without_a_wall_clock_budget():
    """The same default command trains the same policy on any machine: no time budget, the task's recipe."""
    from bebop.tasks import TASKS

    assert SFTConfig().max_minutes is None
    assert set(SFT_RECIPES) >= set(TASKS)
    for task, recipe in SFT_RECIPES.items():
        cfg = SFTConfig(task=task)
        assert (cfg.steps, cfg.batch_size, cfg.lr) == (recipe.steps, recipe.batch_size, recipe.lr)
    assert SFTConfig(task="agent", steps=5).steps == 5
    with pytest.raises(BebopError, match="max_minutes must be positive"):
        SFTConfig(max_minutes=0)


def test_sft_learning_rate_follows_steps_only(tmp_path, monkeypatch):
    """The schedule is a function of the step: a wall-clock cap may stop the loop but never bends the decay."""
    from types import SimpleNamespace

    import bebop.training.sft as sft_module

    clock = iter(range(0, 100_000, 250))  # each reading 250 s later: a third of the cap gone by step 2
    monkeypatch.setattr(sft_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    cfg = SFTConfig(out=str(tmp_path / "p"), steps=6, batch_size=2, warmup=2, log_every=1, eval_samples=0,
                    max_minutes=60, model=ModelConfig(num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1,
                                                      intermediate_size=64))
    train_sft(cfg)
    log = [json.loads(line) for line in (tmp_path / "p.sft.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    assert [r["lr"] for r in log] == pytest.approx([warmup_cosine(s, 6, 2, cfg.lr) for s in range(6)])


def test_evaluate_reports_accuracy_and_entropy(tiny_model, tiny_tokenizer):
    from bebop.training.evaluate import evaluate

    res = evaluate(tiny_model, tiny_tokenizer, get_task("arith"), samples=8, max_new_tokens=12, batch_size=4)
    assert set(res) >= {"accuracy", "greedy_accuracy", "entropy"}
    assert 0.0 <= res["accuracy"] <= 1.0 and res["entropy"] > 0.0  # an untrained policy is uncertain


@pytest.mark.slow
def test_cli_sft_then_eval_smoke(tmp_path):
    out = tmp_path / "runs" / "base"
    r = cli("sft", "--task", "arith", "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--intermediate", "64",
            "--eval-samples", "4")
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    lines = (tmp_path / "runs" / "base.sft.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 2
    r = cli("eval", str(out), "--task", "arith", "--samples", "4", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(res) >= {"accuracy", "greedy_accuracy", "entropy"}
    assert json.loads((out / "eval_arith.json").read_text()) == res


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sft", "--task", "poetry"], "poetry"),
        (["sft", "--steps", "0"], "steps must be positive, got 0"),
        (["sft", "--hidden", "-4"], "hidden_size must be positive, got -4"),
        (["sft", "--config", "/no/such.toml"], "/no/such.toml"),
        (["eval", "/no/such/model"], "/no/such/model"),
        (["eval", ".", "--task", "poetry"], "poetry"),
        (["eval", ".", "--temperature", "-1"], "-1"),
    ],
)
def test_cli_bad_input_is_one_clear_line(args, needle, tmp_path):
    r = cli(*args, "--out", str(tmp_path / "x")) if args[0] == "sft" else cli(*args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists(), "nothing half-written"


@pytest.mark.slow
def test_python_m_bebop_cli_is_the_entry_point_and_reports_bad_input_in_one_line(tmp_path):
    """The one run through a real ``python -m bebop.cli`` process (the other CLI tests run in-process): the module
    entry point exists, and a BebopError leaves the process as one ``error: …`` line and exit status 2."""
    r = cli_process("sft", "--steps", "0", "--out", str(tmp_path / "x"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: steps must be positive, got 0"]
    assert r.stdout == "" and not (tmp_path / "x").exists()
