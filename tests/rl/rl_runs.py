"""Helpers shared by the RL checkpoint and fault tests: a tiny policy + head on disk, a small run config, reading a
run's log, checkpoint and final policy, and a local Ray cluster for the Ray tests."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file

from bebop.rl.config import RLConfig

TESTS = Path(__file__).parent
REWARD = "rl_rewards:digit_fraction"


@contextmanager
def local_ray(tmp_path_factory, **env: str) -> Iterator[object]:
    """A local Ray (2 CPUs) whose workers import these tests' modules (the test rewards) and see ``env``, started
    under a run-wide file lock: under pytest-xdist the Ray test modules wait for each other rather than run two
    clusters of 2 CPUs each on a 2-core machine. The lock file sits in the directory every xdist worker's temporary
    directories share."""
    import fcntl

    import pytest

    ray = pytest.importorskip("ray")
    with open(tmp_path_factory.getbasetemp().parent / "bebop-ray.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(TESTS), *sys.path]), **env}})
            try:
                yield ray
            finally:
                ray.shutdown()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def make_policy_dirs(tokenizer, root: Path) -> tuple[Path, Path]:
    """A tiny random policy and a warm-start head for it, on disk (as in test_rl)."""
    from conftest import build_tiny_policy

    from bebop.models.checkpoint import save_head
    from bebop.models.mtp import MTPHead
    from bebop.models.policy import save_policy

    model = build_tiny_policy(tokenizer, seed=3, logit_scale=3.0)
    save_policy(model, tokenizer, root / "policy")
    save_head(MTPHead.from_base(model), root / "mtp", model.config)
    return root / "policy", root / "mtp"


def small_config(policy_dirs, out: Path, **kw) -> RLConfig:
    policy, mtp = policy_dirs
    base = dict(model=str(policy), mtp=str(mtp), out=str(out), steps=4, prompts_per_step=4, group_size=4,
                max_new_tokens=8, eval_samples=0, reward=REWARD, lr=1e-2, warmup=1, checkpoint_every=1)
    base.update(kw)
    return RLConfig(**base)


def read_log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "rl.jsonl").read_text().splitlines()]


def read_events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def final_policy(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "policy" / "model.safetensors"))


TIMING = ("rollout_s", "rollout_tokens_per_s", "train_s", "step_s", "wait_s", "head_update_s")


def assert_same_run(out: Path, ref: Path) -> None:
    """``out`` logged every step once, with the reference run's figures, and ends with its exact weights."""
    mine, theirs = read_log(out), read_log(ref)
    assert [r["step"] for r in mine] == [r["step"] for r in theirs] == list(range(len(theirs)))
    for a, b in zip(mine, theirs, strict=True):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    a, b = final_policy(out), final_policy(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)   # bit for bit
