"""RL checkpoints without pickle: ``RUN/checkpoint/`` is safetensors + JSON and round-trips every piece of the
trainer's state; a resumed run equals the uninterrupted one bit for bit; a legacy pickle ``checkpoint.pt`` is
refused without being opened (a payload that would write a marker file writes nothing) and converts only on
request, through the safe unpickler."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from conftest import cli
from rl_runs import TESTS, assert_same_run, make_policy_dirs, read_events, read_log, small_config
from safetensors.torch import load_file

from bebop.errors import BebopError
from bebop.rl.rollout import RolloutWorker
from bebop.rl.trainer import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    STATE_JSON,
    Learner,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    train_rl,
    train_step,
)

LEGACY_KEYS = ("step", "policy", "opt", "head", "head_opt", "head_gen", "torch_rng", "py_rng", "summary")


@pytest.fixture(autouse=True)
def _rewards_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


@pytest.fixture(scope="module")
def policy_dirs(tiny_tokenizer, tmp_path_factory):
    return make_policy_dirs(tiny_tokenizer, tmp_path_factory.mktemp("rl_state"))


@pytest.fixture(scope="module")
def reference(policy_dirs, tmp_path_factory):
    """An uninterrupted 4-step run, checkpointing every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train_rl(small_config(policy_dirs, out))
    return out


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears iff the pickle was executed."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def same(a, b) -> bool:
    """Deep equality of checkpoint pieces (tensors by value and dtype)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_checkpoint_round_trips_every_piece_of_state(policy_dirs, tmp_path):
    """Policy, head, both AdamW states, the head's batch generator, torch / numpy / Python RNGs, step and summary
    come back equal from ``checkpoint/`` (one safetensors file + one JSON file), and restore into a fresh learner."""
    cfg = small_config(policy_dirs, tmp_path / "run", mtp_strategy="online-ce", online_every=1, online_steps=1)
    learner = Learner.build(cfg)
    train_step(cfg, learner, 0, RolloutWorker(cfg).rollout(0, 0))       # both optimizers now hold state
    random.random(), np.random.rand(3), torch.rand(2)                       # RNGs away from their seeds
    ck = learner.checkpoint(1, {"config": asdict(cfg), "eval_before": {"accuracy": 0.25}})
    save_checkpoint(tmp_path / CHECKPOINT, ck)
    assert sorted(p.name for p in (tmp_path / CHECKPOINT).iterdir()) == ["state-00000001.safetensors", STATE_JSON]
    meta = json.loads((tmp_path / CHECKPOINT / STATE_JSON).read_text())   # plain JSON, no pickle anywhere
    assert meta["step"] == 1 and meta["tensors"]["file"] == "state-00000001.safetensors"
    names = load_file(str(tmp_path / CHECKPOINT / "state-00000001.safetensors")).keys()
    assert {"rng.torch", "rng.numpy", "rng.head_gen"} <= names and any(k.startswith("head_opt.") for k in names)
    back = read_checkpoint(tmp_path / CHECKPOINT)
    assert back.keys() >= set(LEGACY_KEYS) | {"np_rng", "cuda_rng"}
    for key in (*LEGACY_KEYS, "np_rng"):
        assert same(ck[key], back[key]), key
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99)

    fresh = Learner.build(cfg)
    fresh.restore(back)
    again = fresh.checkpoint(1, ck["summary"])
    for key in (*LEGACY_KEYS, "np_rng"):
        assert same(ck[key], again[key]), key
    assert random.random() == (random.setstate(ck["py_rng"]) or random.random())
    assert np.random.rand() == (np.random.set_state(ck["np_rng"]) or np.random.rand())


def test_resumed_run_equals_the_uninterrupted_one_bit_for_bit(policy_dirs, reference, tmp_path):
    part = small_config(policy_dirs, tmp_path / "run", steps=2)
    train_rl(part)
    train_rl(replace(part, steps=4), resume=True)
    assert_same_run(tmp_path / "run", reference)
    assert [e["event"] for e in read_events(tmp_path / "run")] == ["resumed"]


def test_altered_checkpoint_files_are_refused(policy_dirs, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    tensors = run / CHECKPOINT / "state-00000004.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 1
    tensors.write_bytes(bytes(data))
    with pytest.raises(BebopError, match=r"state-00000004.safetensors are missing or do not match the sha256"):
        load_checkpoint(run)
    (run / CHECKPOINT / STATE_JSON).write_text("{not json")
    with pytest.raises(BebopError, match="cannot resume: unreadable checkpoint"):
        load_checkpoint(run)


def legacy_run(policy_dirs, tmp_path, payload=None):
    """A 2-step run whose checkpoint is then rewritten in the old pickle format (``torch.save`` of the state
    dict); ``payload`` adds an object whose unpickling runs code."""
    cfg = small_config(policy_dirs, tmp_path / "run", steps=2)
    train_rl(cfg)
    out = tmp_path / "run"
    ck = read_checkpoint(out / CHECKPOINT)
    state = {k: ck[k] for k in LEGACY_KEYS}
    if payload is not None:
        state["summary"] = {**state["summary"], "note": payload}
    torch.save(state, out / LEGACY_CHECKPOINT)
    shutil.rmtree(out / CHECKPOINT)
    return replace(cfg, steps=4)


def test_pickle_payload_is_refused_and_never_executed(policy_dirs, tmp_path):
    """``bebop rl --resume`` on a run whose ``checkpoint.pt`` carries a code-running pickle: one error line, exit
    2, the payload's marker file never appears, nothing in the run directory changes; asking to convert it goes
    through the safe unpickler, which refuses the payload too."""
    canary = tmp_path / "canary"                  # the payload really runs code when unpickled the unsafe way
    torch.save({"x": Payload(canary)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert canary.exists()

    marker = tmp_path / "pwned"
    legacy_run(policy_dirs, tmp_path, payload=Payload(marker))
    out = tmp_path / "run"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    res = cli("rl", "--resume", str(out))
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: cannot resume:") and f"{out / LEGACY_CHECKPOINT} is in the old pickle format" in line
    assert f"bebop rl --resume {out} --convert-checkpoint" in line and "weights_only=True" in line
    assert not marker.exists()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(BebopError, match="old pickle format"):
        load_checkpoint(out)

    res = cli("rl", "--resume", str(out), "--convert-checkpoint")
    assert res.returncode == 2, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot convert {out / LEGACY_CHECKPOINT}: it holds more than tensors and "
                           f"plain containers (") and line.endswith("); refused without running it")
    assert "open" in line                                                  # names what the safe unpickler refused
    assert not marker.exists() and not (out / CHECKPOINT).exists()


def test_legacy_checkpoint_converts_on_request_and_resumes(policy_dirs, reference, tmp_path):
    cfg = legacy_run(policy_dirs, tmp_path)
    with pytest.raises(BebopError, match="old pickle format"):
        train_rl(cfg, resume=True)
    train_rl(cfg, resume=True, convert=True)
    assert_same_run(tmp_path / "run", reference)
    with pytest.raises(BebopError, match="already holds a checkpoint in the current format"):
        train_rl(cfg, resume=True, convert=True)


def test_a_new_run_in_an_old_directory_starts_clean(policy_dirs, reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    (run / "events.jsonl").write_text('{"event": "stopped", "step": 9}\n')
    train_rl(small_config(policy_dirs, run, steps=1))
    assert [r["step"] for r in read_log(run)] == [0] and read_events(run) == []
    assert read_checkpoint(run / CHECKPOINT)["step"] == 1


def test_saving_the_same_step_again_never_touches_the_committed_file(tmp_path, monkeypatch):
    """A second save of the same step writes beside the committed tensor file; if it dies before its commit,
    the first save still reads back."""
    from bebop.rl import trainer

    state = {"step": 3, "policy": {"w": torch.arange(4.0)}, "opt": None, "head": None, "head_opt": None,
             "head_gen": torch.Generator().get_state(), "torch_rng": torch.get_rng_state(),
             "py_rng": random.getstate(), "summary": {}}
    save_checkpoint(tmp_path / CHECKPOINT, state)

    def dies(*args, **kwargs):
        raise RuntimeError("killed before the commit")

    with monkeypatch.context() as m:
        m.setattr(trainer, "atomic_write_json", dies)
        with pytest.raises(RuntimeError):
            save_checkpoint(tmp_path / CHECKPOINT, {**state, "policy": {"w": torch.zeros(4)}})
    assert torch.equal(read_checkpoint(tmp_path / CHECKPOINT)["policy"]["w"], torch.arange(4.0))
    save_checkpoint(tmp_path / CHECKPOINT, {**state, "policy": {"w": torch.ones(4)}})
    assert torch.equal(read_checkpoint(tmp_path / CHECKPOINT)["policy"]["w"], torch.ones(4))
    assert sorted(p.name for p in (tmp_path / CHECKPOINT).iterdir()) == ["state-00000003.1.safetensors", STATE_JSON]
