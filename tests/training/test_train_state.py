"""Head-training checkpoints: an interrupted run resumes to the same head, log and summary as an uninterrupted
one; other settings are refused; the checkpoint holds no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_policy
from safetensors.torch import load_file

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training import train_mtp as tm
from bebop.training.train_state import CHECKPOINT_DIR, load_state

SMALL = {"gamma_train": 2, "batch_size": 4, "data_samples": 24, "heldout_samples": 8, "max_new_tokens": 12,
         "eval_every": 2, "steps": 6, "warm_steps": 5, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("state") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


class Crash(RuntimeError):
    pass


def crash_at(monkeypatch, n_steps: int) -> None:
    """Make the ``n_steps``-th optimizer step of the run (counted over stages) raise before it runs."""
    real, calls = tm.warmup_cosine, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n_steps:
            raise Crash(f"injected at step call {n_steps}")
        return real(*args, **kwargs)

    monkeypatch.setattr(tm, "warmup_cosine", counted)


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_mtp.jsonl").read_text().splitlines()]


def head_params(out, policy_dir) -> dict[str, torch.Tensor]:
    return load_head(out, load_policy(policy_dir)[0]).state_dict()


@pytest.mark.parametrize("crash", [4, 9])  # inside the warm stage; inside the main stage
def test_interrupted_run_resumes_to_the_same_head_and_log(policy_dir, tmp_path, monkeypatch, crash):
    ref = tmp_path / "ref"
    full = tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(ref), **SMALL))
    out = tmp_path / "run"
    cfg = tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL)
    with monkeypatch.context() as m:
        crash_at(m, crash)
        with pytest.raises(Crash):
            tm.train_mtp(cfg)
    state = load_state(out)
    assert state is not None
    resumed = tm.train_mtp(cfg)
    assert resumed["resumed_from"] == {"stage": state.stage, "step": state.step}
    assert (state.stage, state.step) == ((0, 2) if crash == 4 else (1, 2))
    a, b = head_params(ref, policy_dir), head_params(out, policy_dir)
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    mine, theirs = records(out), records(ref)
    assert [(r["stage"], r["step"]) for r in mine] == [(r["stage"], r["step"]) for r in theirs]  # none lost or doubled
    assert [r["loss"] for r in mine] == pytest.approx([r["loss"] for r in theirs], abs=1e-6)
    assert resumed["heldout_alpha"] == pytest.approx(full["heldout_alpha"], abs=1e-6)
    assert not (out / CHECKPOINT_DIR).exists()  # the finished head replaces the checkpoint


def test_checkpoint_is_safetensors_and_json(policy_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_at(monkeypatch, 9)
    with pytest.raises(Crash):
        tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL))
    files = sorted(p.name for p in (out / CHECKPOINT_DIR).iterdir())
    assert files == ["state.json", "state.safetensors"]
    tensors = load_file(str(out / CHECKPOINT_DIR / "state.safetensors"))
    assert any(k.startswith("optimizer.") and k.endswith(".exp_avg_sq") for k in tensors)
    assert "generator" in tensors and any(k.startswith("head.") for k in tensors)
    meta = json.loads((out / CHECKPOINT_DIR / "state.json").read_text())
    assert meta["stage"] == 1 and meta["step"] == 2 and meta["config"]["steps"] == 6


def test_resume_with_other_settings_is_refused(policy_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    crash_at(monkeypatch, 4)
    with pytest.raises(Crash):
        tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL))
    monkeypatch.undo()
    with pytest.raises(BebopError, match=r"other settings \(lr: 0.001 → 0.002\)"):
        tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **{**SMALL, "lr": 2e-3}))
    # where it runs and how often it reports may change
    tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **{**SMALL, "eval_every": 3}))


def test_a_crash_while_writing_the_checkpoint_keeps_the_previous_one(policy_dir, tmp_path, monkeypatch):
    """The second checkpoint write dies half-way (a partial tensor file, then ENOSPC): the first stays whole."""
    from bebop.training import train_state

    out = tmp_path / "run"
    real, saves = train_state.save_file, [0]

    def failing(tensors, path):
        saves[0] += 1
        if saves[0] == 2:
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(train_state, "save_file", failing)
    with pytest.raises(BebopError, match=f"^no space left on device writing {out / CHECKPOINT_DIR}$"):
        tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL))
    state = load_state(out)
    assert (state.stage, state.step) == (0, 2)  # the first checkpoint, whole
