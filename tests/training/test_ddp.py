"""Head training under ``torchrun`` with 2 CPU processes (gloo): both ranks end with the same head, the loss curve
is that of one process with the doubled batch, and a run whose rank is killed resumes from its last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import build_tiny_policy

from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training.train_mtp import TrainMTPConfig, train_mtp
from bebop.training.train_state import CHECKPOINT_DIR

pytestmark = pytest.mark.slow

COMMON = {"gamma_train": 2, "data_samples": 32, "heldout_samples": 8, "max_new_tokens": 12, "warm_steps": 3}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("ddp") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


def flags(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def torchrun(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "bebop.cli", "train-mtp", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_mtp.jsonl").read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_doubled_batch(policy_dir, tmp_path):
    opts = {**COMMON, "steps": 6, "eval_every": 1, "checkpoint_every": 0, "cache_dir": tmp_path / "cache"}
    proc = torchrun("--model", str(policy_dir), "--out", str(tmp_path / "two"), "--batch-size", "4", "--device",
                    "cpu", *flags(opts))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    one = train_mtp(TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "one"), batch_size=8, device="cpu",
                                   **{**opts, "cache_dir": str(opts["cache_dir"])}))
    two = json.loads((tmp_path / "two" / "train_mtp_summary.json").read_text())
    assert two["world_size"] == 2
    assert len(set(two["rank_head_digests"])) == 1  # both ranks hold the same head
    assert len(losses(tmp_path / "two")) == 9  # every step of both stages
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    assert two["heldout_alpha"] == pytest.approx(one["heldout_alpha"], abs=1e-5)
    model = load_policy(policy_dir)[0]
    a, b = load_head(tmp_path / "one", model).state_dict(), load_head(tmp_path / "two", model).state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=0) for k in a)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_killed_rank_resumes_from_the_last_checkpoint(policy_dir, tmp_path):
    run = tmp_path / "run"
    args = ["--model", str(policy_dir), "--out", str(run), "--batch-size", "4", "--device", "cpu",
            *flags({**COMMON, "steps": 400, "checkpoint_every": 10, "cache_dir": tmp_path / "cache"})]
    proc = torchrun(*args)
    deadline = time.time() + 240
    while not (run / CHECKPOINT_DIR / "state.json").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline
        time.sleep(0.05)
    ranks = children(proc.pid)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run finished before a rank was killed"
    assert not (run / "train_mtp_summary.json").exists()
    again = torchrun(*args)
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0, out
    summary = json.loads((run / "train_mtp_summary.json").read_text())
    assert summary["resumed_from"] is not None
    assert len(set(summary["rank_head_digests"])) == 1
    steps = [(r["stage"], r["step"]) for r in map(json.loads, (run / "train_mtp.jsonl").read_text().splitlines())]
    assert len(steps) == len(set(steps)) and steps[-1] == ("main", 399)  # nothing repeated, finished
