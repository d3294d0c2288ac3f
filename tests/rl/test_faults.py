"""Faults injected into RL runs, each survived: a crash inside a checkpoint write, a full disk, NaN / inf in the
policy's logits or loss (and in the online head's loss), and a Ray rollout worker killed mid-step. Every run
that stops says why in one error and in ``events.jsonl``, leaves its last checkpoint intact, and resumes to the
uninterrupted run's exact weights."""

from __future__ import annotations

import errno
import json
import os
from dataclasses import replace

import pytest
from conftest import cli
from rl_runs import (
    REWARD,
    TESTS,
    assert_same_run,
    local_ray,
    make_policy_dirs,
    read_events,
    read_log,
    small_config,
)

from bebop.errors import BebopError
from bebop.io import atomic_write, atomic_write_json
from bebop.rl import trainer
from bebop.rl.rollout import RolloutBatch
from bebop.rl.trainer import CHECKPOINT, STATE_JSON, NonFiniteError, check_rollouts, read_checkpoint, train_rl


@pytest.fixture(autouse=True)
def _rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def policy_dirs(tiny_tokenizer, tmp_path_factory):
    return make_policy_dirs(tiny_tokenizer, tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def reference(policy_dirs, tmp_path_factory):
    """An uninterrupted 4-step run, checkpointing every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_rl(small_config(policy_dirs, out))
    return out


class Crash(RuntimeError):
    """Stands for the process dying at the injection point."""


def on_call(n: int, real, fault):
    """``real`` with ``fault(*args, **kwargs)`` run instead on its ``n``-th call (1-based)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return fault(*args, **kwargs) if calls[0] == n else real(*args, **kwargs)

    return wrapped


def checkpoint_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / CHECKPOINT).iterdir())}


# ---------------------------------------------------------------- a crash inside the checkpoint write

def half_written_tensors(tensors, path):
    with open(path, "wb") as f:
        f.write(b"\0" * 100)              # part of the file is on disk when the process dies
    raise Crash("killed while writing the checkpoint's tensors")


def half_written_commit(path, data, indent=None):
    (path.parent / ".state.json.crashed.tmp").write_text(json.dumps(data)[:40])
    raise Crash("killed before state.json was renamed into place")


@pytest.mark.parametrize("where", ["tensors", "commit"])
def test_crash_inside_the_checkpoint_write_keeps_the_previous_one(policy_dirs, reference, tmp_path, monkeypatch,
                                                                  where):
    """The process dies while the step-3 checkpoint is written (its tensor file half on disk, or everything
    written but the commit rename): the step-2 checkpoint still reads back, and resuming redoes step 2 once."""
    cfg = small_config(policy_dirs, tmp_path / "run")
    with monkeypatch.context() as m:
        if where == "tensors":
            m.setattr(trainer, "save_file", on_call(3, trainer.save_file, half_written_tensors))
        else:
            m.setattr(trainer, "atomic_write_json", on_call(3, trainer.atomic_write_json, half_written_commit))
        with pytest.raises(Crash):
            train_rl(cfg)
    out = tmp_path / "run"
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2
    assert [r["step"] for r in read_log(out)] == [0, 1, 2]          # step 2 was logged, its checkpoint was not
    train_rl(cfg, resume=True)
    assert_same_run(out, reference)                                  # no step lost, none repeated, same weights
    assert sorted(checkpoint_bytes(out)) == ["state-00000004.safetensors", STATE_JSON]   # debris cleared


# ---------------------------------------------------------------- a full disk

def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["tensors", "commit"])
def test_full_disk_stops_with_one_error_and_the_checkpoint_intact(policy_dirs, reference, tmp_path, monkeypatch,
                                                                  where):
    """ENOSPC while writing the step-3 checkpoint (its tensor file, or its state.json): ``bebop rl`` prints one
    error line naming the file and exits 2; the step-2 checkpoint is untouched and the run resumes from it."""
    out = tmp_path / "run"
    policy, mtp = policy_dirs
    with monkeypatch.context() as m:
        if where == "tensors":
            m.setattr(trainer, "save_file", on_call(3, trainer.save_file, no_space))
            file = out / CHECKPOINT / "state-00000003.safetensors"
        else:
            m.setattr(trainer, "atomic_write_json", on_call(
                3, trainer.atomic_write_json, lambda path, data, indent=None: atomic_write(path, no_space)))
            file = out / CHECKPOINT / STATE_JSON
        res = cli("rl", "--model", str(policy), "--mtp", str(mtp), "--out", str(out), "--steps", "4",
                  "--prompts-per-step", "4", "--group-size", "4", "--eval-samples", "0", "--reward", REWARD,
                  "--checkpoint-every", "1", "--lr", "1e-2", "--config", str(small_toml(tmp_path)))
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line == (f"error: RL step 2: no space left on device writing {file}; the run stopped, the last "
                    f"checkpoint (step 2) in {out / CHECKPOINT} is intact: continue with `bebop rl --resume {out}`")
    assert read_checkpoint(out / CHECKPOINT)["step"] == 2
    assert sorted(checkpoint_bytes(out)) == ["state-00000002.safetensors", STATE_JSON]
    (event,) = read_events(out)
    assert (event["event"], event["step"], event["checkpoint_step"]) == ("stopped", 2, 2)
    assert "no space left" in event["error"]
    res = cli("rl", "--resume", str(out))
    assert res.returncode == 0, res.stderr
    assert_same_run(out, reference)


def small_toml(tmp_path):
    """The settings of ``small_config`` that have no flag."""
    path = tmp_path / "rl.toml"
    path.write_text("max_new_tokens = 8\nwarmup = 1\n")
    return path


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(BebopError, match=f"^no space left on device writing {path}$"):
        atomic_write(path, no_space)
    assert json.loads(path.read_text()) == {"step": 1} and [p.name for p in tmp_path.iterdir()] == ["state.json"]
    with pytest.raises(BebopError, match="no space left on device writing"):   # safetensors' wrapped form
        atomic_write(path, lambda tmp: (_ for _ in ()).throw(RuntimeError("I/O error: No space left on device "
                                                                          "(os error 28)")))


# ---------------------------------------------------------------- NaN / inf

def nan_loss(*args, **kwargs):
    loss, st = trainer_grpo_loss(*args, **kwargs)
    return loss * float("nan"), st


trainer_grpo_loss = trainer.grpo_loss


def inf_logit(model, ids, mask, comp, temperature):
    """The policy's forward with one +inf logit, as a diverged model would give."""
    def hook(module, args, output):
        output.logits[0, -2, 7] = float("inf")

    handle = model.register_forward_hook(hook)
    try:
        return trainer_completion_logprobs(model, ids, mask, comp, temperature)
    finally:
        handle.remove()


trainer_completion_logprobs = trainer.completion_logprobs


@pytest.mark.parametrize("target, what", [
    pytest.param("grpo_loss", "GRPO loss", id="nan-loss"),
    pytest.param("completion_logprobs", r"policy log-probs \(the policy's logits\)", id="inf-logit"),
])
def test_non_finite_update_stops_before_the_checkpoint(policy_dirs, reference, tmp_path, monkeypatch, target,
                                                       what):
    """NaN in the loss or +inf in a logit at step 2: the run stops at step 2 naming the tensor, the optimizer
    step is not taken, the step-2 checkpoint is byte-for-byte what it was, and resuming from it reproduces the
    uninterrupted run."""
    cfg = small_config(policy_dirs, tmp_path / "run")
    out = tmp_path / "run"
    real, bad = (trainer.grpo_loss, nan_loss) if target == "grpo_loss" else (trainer.completion_logprobs, inf_logit)
    saved = {}
    real_save = trainer.save_checkpoint

    def save(path, state):
        real_save(path, state)
        saved.clear()
        saved.update(checkpoint_bytes(out))

    with monkeypatch.context() as m:
        m.setattr(trainer, target, on_call(3, real, bad))
        m.setattr(trainer, "save_checkpoint", save)
        with pytest.raises(NonFiniteError, match=rf"^RL step 2: non-finite {what} in the policy update; the "
                                                 rf"optimizer step was not taken; the run stopped, the last "
                                                 rf"checkpoint \(step 2\)"):
            train_rl(cfg)
    assert checkpoint_bytes(out) == saved and read_checkpoint(out / CHECKPOINT)["step"] == 2
    assert [r["step"] for r in read_log(out)] == [0, 1]
    assert [e["event"] for e in read_events(out)] == ["stopped"]
    train_rl(cfg, resume=True)
    assert_same_run(out, reference)


def test_non_finite_online_head_loss_stops_the_run(policy_dirs, tmp_path, monkeypatch):
    cfg = small_config(policy_dirs, tmp_path / "run", mtp_strategy="online-ce", online_every=1, online_steps=2)
    real = trainer.mtp_loss_from_hidden
    monkeypatch.setattr(trainer, "mtp_loss_from_hidden",
                        on_call(3, real, lambda *a, **k: real(*a, **k) * float("inf")))
    with pytest.raises(NonFiniteError, match=r"^RL step 1: non-finite MTP head loss \((inf|nan)\) in the online head "
                                             r"re-training; the head's optimizer step was not taken; the run stopped, "
                                             r"the last checkpoint \(step 1\)"):
        train_rl(cfg)
    assert read_checkpoint(tmp_path / "run" / CHECKPOINT)["step"] == 1


def test_non_finite_rollout_logprobs_are_refused():
    batch = RolloutBatch(step=0, version=0, prompts=[[1]], completions=[[2, 3]], logprobs=[[-0.1, float("nan")]],
                         rewards=[0.0], entropy_sum=1.0)
    with pytest.raises(NonFiniteError, match="non-finite rollout log-probs"):
        check_rollouts(batch)
    check_rollouts(replace(batch, logprobs=[[-0.1, -2.0]]))


# ---------------------------------------------------------------- a Ray worker killed mid-step

def test_negative_rollout_retries_is_refused(policy_dirs, tmp_path):
    with pytest.raises(BebopError, match="rollout_retries must be >= 0, got -1"):
        small_config(policy_dirs, tmp_path, rollout_retries=-1)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local Ray whose workers import the test rewards and know where the dying reward keeps its marker."""
    marks = tmp_path_factory.mktemp("deaths")
    with local_ray(tmp_path_factory, BEBOP_TEST_DEATHS=str(marks)):
        yield marks


@pytest.mark.slow
def test_ray_worker_killed_mid_step_is_retried_on_a_fresh_worker(ray_cluster, policy_dirs, reference, tmp_path):
    """The rollout worker's process dies while grading step 1 (``os._exit`` inside its reward): the step's
    shard is re-run on a fresh worker, the run goes on, its record and events.jsonl say so, and the run equals
    the in-process one."""
    (ray_cluster / "die_at_call").write_text("2")   # grading step 1: one reward call per step
    cfg = small_config(policy_dirs, tmp_path / "run", backend="ray", rollout_threads=1,
                       reward="fault_rewards:dies_once")
    train_rl(cfg)
    rows = read_log(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    (retry,) = rows[1]["rollout_retries"]
    assert retry["worker"] == 0 and retry["attempt"] == 1 and "died" in retry["error"].lower()
    assert all("rollout_retries" not in r for i, r in enumerate(rows) if i != 1)
    assert [e["event"] for e in read_events(tmp_path / "run")] == ["rollout_retry"]
    for r in rows:
        r.pop("rollout_retries", None)
    ref = read_log(reference)
    for a, b in zip(rows, ref, strict=True):
        assert (a["reward"], a["rollout_tokens"], a["alpha"]) == (b["reward"], b["rollout_tokens"], b["alpha"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


@pytest.mark.slow
def test_ray_worker_death_without_retries_stops_cleanly_and_resumes(ray_cluster, policy_dirs, reference, tmp_path):
    """With ``rollout_retries = 0`` the same death stops the run at step 1 with one error; events.jsonl says
    so; ``--resume`` continues from the step-1 checkpoint to the uninterrupted run's figures."""
    (ray_cluster / "die_at_call").write_text("2")   # grading step 1: one reward call per step
    cfg = small_config(policy_dirs, tmp_path / "run", backend="ray", rollout_threads=1, rollout_retries=0,
                       reward="fault_rewards:dies_once")
    with pytest.raises(BebopError, match=r"^RL step 1: Ray rollout worker 0 died during the rollouts of step 1 "
                                         r"\(.*\), 0 retries used \(rollout_retries = 0\); the run stopped, the "
                                         r"last checkpoint \(step 1\)"):
        train_rl(cfg)
    out = tmp_path / "run"
    assert [r["step"] for r in read_log(out)] == [0]
    assert [(e["event"], e["step"]) for e in read_events(out)] == [("stopped", 1)]
    train_rl(cfg, resume=True)
    rows, ref = read_log(out), read_log(reference)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for a, b in zip(rows, ref, strict=True):
        assert (a["reward"], a["rollout_tokens"], a["alpha"]) == (b["reward"], b["rollout_tokens"], b["alpha"])
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert [(e["event"], e["step"]) for e in read_events(out)] == [("stopped", 1), ("resumed", 1)]
