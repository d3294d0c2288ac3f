"""A user's data in head training: prompts from JSONL or a ``datasets`` file, sampled through the on-disk cache,
or existing rollouts; the held-out split; one data source per run; more ranks than prompts."""

from __future__ import annotations

import json

import pytest
from conftest import build_tiny_policy, cli

from bebop.errors import BebopError
from bebop.models.policy import load_policy, save_policy
from bebop.tasks import get_task, sample_problems
from bebop.training import samples
from bebop.training.distributed import Dist
from bebop.training.options import DataSource
from bebop.training.train_mtp import TrainMTPConfig, train_mtp

SMALL = {"gamma_train": 2, "steps": 2, "warm_steps": 0, "batch_size": 4, "data_samples": 24, "heldout_samples": 8,
         "max_new_tokens": 12, "eval_every": 1, "checkpoint_every": 0}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("user_data") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def prompt_texts() -> list[str]:
    return [p.prompt for p in sample_problems(get_task("arith"), 30, 5)]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


class Calls:
    """Counts generation batches (calls of the engine's ``decode``) while passing them through."""

    def __init__(self, monkeypatch):
        self.n = 0
        real = samples.decode

        def counted(*args, **kwargs):
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(samples, "decode", counted)


def test_split_prompts_is_seeded_disjoint_and_holds_out_a_tenth_at_most():
    train, held = samples.split_prompts(50, 256, seed=3)
    assert sorted(train + held) == list(range(50))
    assert len(held) == 5 and not set(train) & set(held)
    assert samples.split_prompts(50, 256, seed=3) == (train, held)
    assert len(samples.split_prompts(50, 2, seed=3)[1]) == 2
    assert len(samples.split_prompts(3, 256, seed=0)[1]) == 1
    with pytest.raises(BebopError, match="at least 2 prompts"):
        samples.split_prompts(1, 8, seed=0)


def test_train_mtp_on_jsonl_prompts_samples_once_then_reuses_the_cache(policy_dir, prompt_texts, tmp_path,
                                                                       monkeypatch):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": t} for t in prompt_texts])
    calls = Calls(monkeypatch)
    cache = tmp_path / "cache"
    first = train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "a"), prompts=prompts,
                                     cache_dir=str(cache), **SMALL))
    assert calls.n == 2  # one chunk of training samples, one of held-out samples
    assert any(cache.rglob("*.safetensors"))
    again = train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "b"), prompts=prompts,
                                     cache_dir=str(cache), **SMALL))
    assert calls.n == 2  # nothing sampled the second time
    assert again["heldout_alpha"] == first["heldout_alpha"]
    train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "c"), prompts=prompts,
                             cache_dir=str(cache), **{**SMALL, "temperature": 0.7}))
    assert calls.n == 4  # another rollout temperature is another cache entry


def test_training_rows_from_prompts_keep_train_and_heldout_prompts_apart(policy_dir, prompt_texts, tmp_path):
    model, tok = load_policy(policy_dir)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in prompt_texts])
    cfg = TrainMTPConfig(model=str(policy_dir), prompts=prompts, cache_dir="", **SMALL)
    data, held = samples.training_rows(cfg, model, tok)
    assert data and held
    train_p = {tuple(ids[:n]) for ids, n in data}
    held_p = {tuple(ids[:n]) for ids, n in held}
    assert not train_p & held_p
    assert len(held_p) <= 3  # a tenth of 30 prompts


def test_completions_train_without_sampling(policy_dir, tmp_path, monkeypatch, tiny_tokenizer):
    rows = []
    for i in range(20):
        p = tiny_tokenizer(f"{i}+{i}=")["input_ids"]
        c = tiny_tokenizer(f"{2 * i} so {i}+{i}={2 * i}", add_special_tokens=False)["input_ids"]
        rows.append({"prompt_ids": p, "completion_ids": c})
    path = write_jsonl(tmp_path / "rollouts.jsonl", rows)

    def no_sampling(*args, **kwargs):
        raise AssertionError("--completions must not sample")

    monkeypatch.setattr(samples, "decode", no_sampling)
    summary = train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "h"), completions=path, **SMALL))
    assert len(summary["heldout_alpha"]) == 2


def test_one_data_source_per_run():
    with pytest.raises(BebopError, match="give one data source, got --task and --prompts"):
        TrainMTPConfig(task="arith", prompts="p.jsonl")
    assert TrainMTPConfig().source == DataSource(task="arith")


def test_more_ranks_than_prompts_is_an_error(policy_dir, prompt_texts, tmp_path):
    model, tok = load_policy(policy_dir)
    path = write_jsonl(tmp_path / "few.jsonl", [{"prompt": t} for t in prompt_texts[:5]])
    with pytest.raises(BebopError, match="8 ranks but only 4 training prompts"):
        samples.source_rows(model, tok, DataSource(prompts=path), 16, 1.0, 8, 0, cache_dir="", dist=Dist(0, 8, 0))


def test_prompts_longer_than_the_context_are_skipped_or_refused(policy_dir, prompt_texts, tmp_path, capsys):
    model, tok = load_policy(policy_dir)
    ctx = samples.context_length(model)
    long_text = " ".join(["1"] * ctx)
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"prompt": t} for t in prompt_texts[:10]] + [{"prompt": long_text}])
    rows = samples.source_rows(model, tok, DataSource(prompts=path), 8, 1.0, 8, 0, cache_dir="")
    assert len(rows) == 8
    assert "skipped 1 of 11 prompts" in capsys.readouterr().err
    only_long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": long_text}] * 3)
    with pytest.raises(BebopError, match="3"):
        samples.source_rows(model, tok, DataSource(prompts=only_long), 8, 1.0, 8, 0, cache_dir="")


@pytest.mark.slow
def test_cli_train_mtp_on_a_local_dataset_file(policy_dir, prompt_texts, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"question": t} for t in prompt_texts])
    r = cli("train-mtp", "--model", str(policy_dir), "--out", str(tmp_path / "h"), "--dataset", data,
            "--field", "question", "--steps", "2", "--warm-steps", "0", "--batch-size", "4", "--data-samples", "16",
            "--heldout-samples", "8", "--max-new-tokens", "12", "--gamma-train", "2", "--cache-dir", "",
            "--checkpoint-every", "0")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h" / "mtp.safetensors").exists()


def test_train_mtp_on_messages_renders_them_with_the_saved_chat_template(tmp_path, tiny_tokenizer, prompt_texts):
    """A policy saved with a chat template: messages are rendered by it (the training rows start with the
    template's rendering, generation prompt included), and the head trains on them."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ bos_token if loop.first else '' }}{{ m['content'] }}"
                         "{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    d = tmp_path / "chat"
    save_policy(build_tiny_policy(tok, logit_scale=4.0), tok, d)
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": t}]} for t in prompt_texts])
    model, loaded = load_policy(d)
    assert loaded.chat_template == tok.chat_template
    cfg = TrainMTPConfig(model=str(d), out=str(tmp_path / "h"), prompts=path, cache_dir="", **SMALL)
    data, _ = samples.training_rows(cfg, model, loaded)
    expected = {tuple(tok(f"{t}A:")["input_ids"]) for t in prompt_texts}
    assert {tuple(ids[:n]) for ids, n in data} <= expected
    assert len(train_mtp(cfg)["heldout_alpha"]) == 2
