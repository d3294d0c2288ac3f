"""Early stopping of head training on held-out expected α: the decision on known score sequences, the stop step and
the kept head in ``train_mtp`` with a scripted metric, and a resumed run that stops and keeps the same head as the
uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_policy

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training import train_mtp as tm
from bebop.training.early_stop import EarlyStop, heldout_score
from bebop.training.train_state import load_state

SMALL = {"gamma_train": 2, "batch_size": 4, "data_samples": 24, "heldout_samples": 8, "max_new_tokens": 12}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("early_stop") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


def first_stop(scores: list[float], patience: int, min_delta: float = 0.0,
               min_steps: int = 0) -> tuple[int | None, int | None]:
    """(index of the evaluation that stops, index of the best) when ``scores`` are shown in order."""
    tracker = EarlyStop(patience, min_delta, min_steps)
    for i, s in enumerate(scores):
        tracker.update(i, s)
        if tracker.stop:
            return i, tracker.best_step
    return None, tracker.best_step


def test_heldout_score_is_the_mean_over_draft_steps():
    assert heldout_score([0.9, 0.6, 0.3]) == pytest.approx(0.6)


@pytest.mark.parametrize(("scores", "patience", "min_delta", "min_steps", "stop", "best"), [
    ([0.5, 0.7, 0.6, 0.65, 0.6], 2, 0.0, 0, 3, 1),        # two evaluations below the best at 1
    ([0.5, 0.7, 0.6, 0.75, 0.6, 0.7], 2, 0.0, 0, 5, 3),   # a new best resets the count
    ([0.5, 0.7, 0.6, 0.65, 0.6], 3, 0.0, 0, 4, 1),
    ([0.5, 0.52, 0.54, 0.56], 2, 0.05, 0, 2, 0),          # gains of 0.02 < min_delta do not count
    ([0.5, 0.6, 0.7, 0.8], 1, 0.0, 0, None, 3),           # always improving: never stops
    ([0.5, 0.4, 0.3, 0.2], 0, 0.0, 0, None, 0),           # patience 0: off
    ([0.5, 0.5], 1, 0.0, 0, 1, 0),                        # a tie is no improvement
    ([0.9, 0.6, 0.62, 0.61, 0.6], 2, 0.0, 0, 2, 0),       # a start better than the loss's plateau is kept ...
    ([0.9, 0.6, 0.62, 0.61, 0.6], 2, 0.0, 1, 4, 2),       # ... unless min_steps leaves it out
    ([0.9, 0.8], 1, 0.0, 5, None, None),                  # nothing watched yet
])
def test_early_stop_decides_on_known_sequences(scores, patience, min_delta, min_steps, stop, best):
    assert first_stop(scores, patience, min_delta, min_steps) == (stop, best)


def test_replay_rebuilds_the_tracker():
    scores = [(0, 0.5), (10, 0.7), (20, 0.6)]
    t = EarlyStop.replay(2, 0.0, 0, scores)
    assert (t.best, t.best_step, t.stale, t.stop) == (0.7, 10, 1, False)
    t.update(30, 0.69)
    assert t.stop


def scripted_alpha(scores: list[float], seen: list[dict]):
    """An ``expected_alpha`` that returns the next of ``scores`` for every step (α_k all equal) and records the head
    it was shown, so a test knows which head each evaluation scored."""
    calls = iter(scores)

    def fake(model, head, data, gamma, *args, **kwargs):
        seen.append({k: v.clone() for k, v in head.state_dict().items()})
        return [next(calls)] * gamma

    return fake


def test_train_mtp_stops_at_the_right_step_and_keeps_the_best_head(policy_dir, tmp_path, monkeypatch):
    """Scores 0.5 0.7 0.6 0.65 0.6 at steps 0 2 4 6 8 with patience 2: the run stops at step 6 (two evaluations
    without improving on step 2), logs every evaluation with its mean, and saves the head of step 2."""
    seen: list[dict] = []
    monkeypatch.setattr(tm, "expected_alpha", scripted_alpha([0.5, 0.7, 0.6, 0.65, 0.6], seen))
    out = tmp_path / "head"
    summary = tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), steps=20, warm_steps=0,
                                             eval_every=2, patience=2, **SMALL))
    log = [json.loads(line) for line in (out / "train_mtp.jsonl").read_text().splitlines()]
    assert [(r["step"], r["heldout_alpha_mean"]) for r in log] == [(0, 0.5), (2, 0.7), (4, 0.6), (6, 0.65)]
    assert summary["early_stop"] == [{"stage": "main", "budget": 20, "last_step": 6, "stopped_early": True,
                                      "best_step": 2, "best_score": 0.7}]
    assert summary["heldout_alpha"] == [0.7, 0.7]
    assert [r["step"] for r in summary["curve"]] == [0, 2, 4, 6]
    kept = load_head(out, load_policy(policy_dir)[0]).state_dict()
    assert all(torch.equal(kept[k], seen[1][k]) for k in kept)
    assert not all(torch.equal(kept[k], seen[3][k]) for k in kept)   # not the last head


def test_min_steps_keeps_a_head_its_loss_trained(policy_dir, tmp_path, monkeypatch):
    """A start better than anything after it (as a CE stage after a forward-KL warm start): with min_steps 3 the
    evaluations at steps 0 and 2 are ignored, the best from step 4 on is kept, and the stop comes 2 later."""
    seen: list[dict] = []
    monkeypatch.setattr(tm, "expected_alpha", scripted_alpha([0.9, 0.6, 0.62, 0.64, 0.63, 0.63], seen))
    out = tmp_path / "head"
    summary = tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), steps=20, warm_steps=0,
                                             eval_every=2, patience=2, min_steps=3, **SMALL))
    assert summary["early_stop"][0] | {"best_score": None} == {
        "stage": "main", "budget": 20, "last_step": 10, "stopped_early": True, "best_step": 6, "best_score": None}
    assert summary["heldout_alpha"] == [0.64, 0.64]
    kept = load_head(out, load_policy(policy_dir)[0]).state_dict()
    assert all(torch.equal(kept[k], seen[3][k]) for k in kept)


def test_without_patience_every_step_runs_and_the_last_head_is_kept(policy_dir, tmp_path, monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(tm, "expected_alpha", scripted_alpha([0.5, 0.7, 0.6, 0.4], seen))
    out = tmp_path / "head"
    summary = tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), steps=6, warm_steps=0,
                                             eval_every=2, **SMALL))
    assert [r["step"] for r in summary["curve"]] == [0, 2, 4, 5]
    assert summary["heldout_alpha"] == [0.4, 0.4]
    assert summary["early_stop"][0]["stopped_early"] is False
    kept = load_head(out, load_policy(policy_dir)[0]).state_dict()
    assert all(torch.equal(kept[k], seen[-1][k]) for k in kept)


def nan_on_call(n: int, real):
    """``real`` whose ``n``-th call (1-based) returns a NaN loss: the run stops there (its last checkpoint stays)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls[0] == n else loss

    return wrapped


def test_a_resumed_run_stops_where_and_keeps_what_the_uninterrupted_one_does(policy_dir, tmp_path, monkeypatch):
    """With a min_delta no gain reaches, each stage keeps its step-0 head and stops after 2 more evaluations
    (step 4). A run interrupted at main step 3 resumes from its step-2 checkpoint (which carries the best head),
    stops at the same step and ends with the uninterrupted run's head."""
    cfg = {"model": str(policy_dir), "steps": 12, "warm_steps": 8, "eval_every": 2, "checkpoint_every": 2,
           "patience": 2, "min_delta": 1.0, **SMALL}
    ref = tm.train_mtp(tm.TrainMTPConfig(out=str(tmp_path / "ref"), **cfg))
    assert [(o["stage"], o["last_step"], o["best_step"]) for o in ref["early_stop"]] == [("warm", 4, 0),
                                                                                          ("main", 4, 0)]
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(tm, "mtp_loss_from_hidden", nan_on_call(5 + 4, tm.mtp_loss_from_hidden))  # 5 warm steps, main 3
        with pytest.raises(BebopError, match="step 3 of the main stage"):
            tm.train_mtp(tm.TrainMTPConfig(out=str(out), **cfg))
    state = load_state(out)
    assert (state.stage, state.step) == (1, 2)
    assert any(k.startswith(tm.BEST) for k in state.head)
    resumed = tm.train_mtp(tm.TrainMTPConfig(out=str(out), **cfg))
    assert resumed["resumed_from"] == {"stage": 1, "step": 2}
    assert resumed["early_stop"] == ref["early_stop"]
    assert [(r["stage"], r["step"]) for r in resumed["curve"]] == [(r["stage"], r["step"]) for r in ref["curve"]]
    model = load_policy(policy_dir)[0]
    a, b = load_head(tmp_path / "ref", model).state_dict(), load_head(out, model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_early_stopping_refuses_another_eval_every(policy_dir, tmp_path, monkeypatch):
    cfg = {"model": str(policy_dir), "out": str(tmp_path / "run"), "steps": 8, "warm_steps": 0,
           "checkpoint_every": 2, "patience": 3, **SMALL}
    with monkeypatch.context() as m:
        m.setattr(tm, "mtp_loss_from_hidden", nan_on_call(4, tm.mtp_loss_from_hidden))
        with pytest.raises(BebopError, match="non-finite"):
            tm.train_mtp(tm.TrainMTPConfig(eval_every=2, **cfg))
    with pytest.raises(BebopError, match="eval_every 2.*same eval_every"):
        tm.train_mtp(tm.TrainMTPConfig(eval_every=3, **cfg))


@pytest.mark.parametrize(("kw", "needle"), [({"patience": -1}, "patience must be >= 0, got -1"),
                                            ({"min_delta": -0.1}, "min_delta must be >= 0, got -0.1"),
                                            ({"min_steps": -3}, "min_steps must be >= 0, got -3")])
def test_bad_early_stopping_config(kw, needle):
    with pytest.raises(BebopError, match=needle):
        tm.TrainMTPConfig(**kw)
