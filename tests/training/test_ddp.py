"""Head training under ``torchrun`` with 2 CPU processes (gloo): both ranks end with the same head, the loss curve
is that of one process with the doubled batch, a run whose rank is killed resumes from its last checkpoint, and a
refused checkpoint or too few rows fail on every rank alike."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict

import pytest
import torch
import torch.multiprocessing as mp
from conftest import build_tiny_policy

from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training import train_mtp as tm
from bebop.training.train_state import CHECKPOINT_DIR, TrainState, save_state

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
    one = tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "one"), batch_size=8, device="cpu",
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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg: tm.TrainMTPConfig, rows: int | None, report) -> None:
    """One gloo rank of a 2-process job (torchrun's environment set by hand) running ``train_mtp``; writes the
    error it ended with to ``report/RANK``. ``rows`` replaces the training data by that many rows."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)

    def no_sampling(*args, **kwargs):
        if rows is None:
            raise AssertionError("sampled before checking the checkpoint")
        return [([1, 2, 3, 4, 5, 6], 2)] * rows, [([1, 2, 3, 4, 5, 6], 2)]

    tm.training_rows = no_sampling
    try:
        tm.train_mtp(cfg)
        msg = "finished"
    except Exception as e:  # noqa: BLE001 - reported to the test
        msg = f"{type(e).__name__}: {e}"
    (report / str(rank)).write_text(msg)


def two_ranks(cfg: tm.TrainMTPConfig, tmp_path, rows: int | None = None) -> list[str]:
    """Each rank's ending (``finished`` or its error) for ``cfg`` over 2 spawned gloo processes."""
    report = tmp_path / "report"
    report.mkdir()
    mp.spawn(_rank_main, args=(_free_port(), cfg, rows, report), nprocs=2, join=True)
    return [(report / str(r)).read_text() for r in range(2)]


def test_a_checkpoint_with_other_settings_fails_on_every_rank_before_sampling(policy_dir, tmp_path):
    cfg = tm.TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "run"), batch_size=4, device="cpu",
                            **{**COMMON, "steps": 4})
    save_state(cfg.out, TrainState(1, 2, {**asdict(cfg), "lr": 2e-3}, head={"x": torch.zeros(1)}))
    ends = two_ranks(cfg, tmp_path)
    assert ends[0] == ends[1] and ends[0].startswith("BebopError: the checkpoint in"), ends
    assert "lr: 0.002 → 0.001" in ends[0]


def test_more_ranks_than_usable_rows_fails_on_every_rank(policy_dir, tmp_path):
    cfg = tm.TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "run"), batch_size=4, device="cpu",
                            **{**COMMON, "steps": 4})
    ends = two_ranks(cfg, tmp_path, rows=1)
    assert ends == ["BebopError: 2 ranks but only 1 usable training samples"] * 2
