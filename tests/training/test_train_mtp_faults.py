"""NaN / inf during head training (``train-mtp``): the run stops at that step with one error naming the step
and the tensor, before the optimizer step and before any checkpoint is written; rerunning resumes from the last
good checkpoint to the uninterrupted run's head. Under two DDP ranks a NaN on one rank stops both, alike."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import time
import traceback
import weakref
from dataclasses import asdict

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from conftest import build_tiny_policy
from torch.nn.parallel import DistributedDataParallel

from bebop.errors import BebopError
from bebop.models.checkpoint import load_head
from bebop.models.policy import load_policy, save_policy
from bebop.training import train_mtp as tm
from bebop.training.distributed import process_group
from bebop.training.train_state import CHECKPOINT_DIR, load_state

SMALL = {"gamma_train": 2, "batch_size": 4, "data_samples": 24, "heldout_samples": 8, "max_new_tokens": 12,
         "eval_every": 2, "steps": 6, "warm_steps": 5, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("mtp_faults") / "base"
    save_policy(build_tiny_policy(tiny_tokenizer, logit_scale=4.0), tiny_tokenizer, d)
    return d


@pytest.fixture(scope="module")
def reference(policy_dir, tmp_path_factory):
    """The uninterrupted run: 5 warm steps, then 6 of e2e_tv."""
    out = tmp_path_factory.mktemp("mtp_ref") / "run"
    tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL))
    return out


def on_call(n: int, real, fault):
    """``real`` with ``fault(real, *args)`` instead on its ``n``-th call (1-based)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return fault(real, *args, **kwargs) if calls[0] == n else real(*args, **kwargs)

    return wrapped


def nan_loss(real, *args, **kwargs):
    return real(*args, **kwargs) * float("nan")


def inf_hidden(real, name, hq, *args, **kwargs):
    """The head's hidden state for the first position is +inf, as from a head that diverged."""
    hq = hq.clone()
    hq[0] = float("inf")
    return real(name, hq, *args, **kwargs)


def inf_grad_norm(real, *args, **kwargs):
    real(*args, **kwargs)
    return torch.tensor(float("inf"))


def head(out, policy_dir) -> dict[str, torch.Tensor]:
    return load_head(out, load_policy(policy_dir)[0]).state_dict()


@pytest.mark.parametrize("target, fault, what", [
    pytest.param("mtp_loss_from_hidden", nan_loss, r"e2e_tv loss \(nan\)", id="nan-loss"),
    pytest.param("mtp_loss_from_hidden", inf_hidden, r"e2e_tv loss \(nan\)", id="inf-hidden"),
    pytest.param("clip_grad_norm_", inf_grad_norm, r"gradient norm \(inf\)", id="inf-grad-norm"),
])
def test_non_finite_step_stops_before_the_checkpoint_and_resumes(policy_dir, reference, tmp_path, monkeypatch,
                                                                 target, fault, what):
    """The 9th optimizer step (step 3 of the main stage) meets NaN/inf: one error naming that step and the
    tensor; the checkpoint is still the one of main step 2, byte for byte; the rerun resumes there and ends with
    the uninterrupted run's head."""
    out = tmp_path / "run"
    cfg = tm.TrainMTPConfig(model=str(policy_dir), out=str(out), **SMALL)
    owner = tm if target == "mtp_loss_from_hidden" else torch.nn.utils
    snapshot = {}
    real_save = tm.save_state

    def save(*args):
        where = real_save(*args)
        snapshot.clear()
        snapshot.update({p.name: p.read_bytes() for p in where.iterdir()})
        return where

    with monkeypatch.context() as m:
        m.setattr(owner, target, on_call(9, getattr(owner, target), fault))
        m.setattr(tm, "save_state", save)
        with pytest.raises(BebopError, match=rf"^train-mtp stopped at step 3 of the main stage: non-finite {what}; "
                                             rf"the optimizer step was not taken, the last checkpoint \(main stage, "
                                             rf"step 2\) in {out / CHECKPOINT_DIR} is intact: rerun the same command "
                                             rf"to resume from it$"):
            tm.train_mtp(cfg)
    assert {p.name: p.read_bytes() for p in (out / CHECKPOINT_DIR).iterdir()} == snapshot
    state = load_state(out)
    assert (state.stage, state.step) == (1, 2)
    resumed = tm.train_mtp(cfg)
    assert resumed["resumed_from"] == {"stage": 1, "step": 2}
    a, b = head(reference, policy_dir), head(out, policy_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_before_any_checkpoint_says_so(policy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(tm, "mtp_loss_from_hidden", on_call(1, tm.mtp_loss_from_hidden, nan_loss))
    with pytest.raises(BebopError, match=r"^train-mtp stopped at step 0 of the warm stage: non-finite fkl loss "
                                         r"\(nan\); the optimizer step was not taken, no checkpoint was written yet$"):
        tm.train_mtp(tm.TrainMTPConfig(model=str(policy_dir), out=str(tmp_path / "run"), **SMALL))


def test_a_failed_blocks_frames_are_released_before_the_group_is_left(monkeypatch):
    """What a failed call's frames held (under DDP: the wrapper, whose Reducer holds the process group) is freed
    when the exception leaves ``process_group``, before ``close_dist``; the traceback keeps its lines."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    held = []

    def fail():
        wrapper = torch.nn.Linear(1, 1)
        held.append(weakref.ref(wrapper))
        raise BebopError("stopped")

    with pytest.raises(BebopError, match="^stopped$") as err:
        with process_group("cpu"):
            fail()
    assert held[0]() is None
    assert [f.name for f in traceback.extract_tb(err.value.__traceback__)][-1] == "fail"


# ---------------------------------------------------------------- two DDP ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, cfg: tm.TrainMTPConfig, nan_call: int | None, report) -> None:
    """One gloo rank of a 2-process job running ``train_mtp`` on fixed rows; rank 1's loss is NaN on its
    ``nan_call``-th step. Writes how the rank ended to ``report/RANK``, how many DDP wrappers were still alive
    when the process group was destroyed to ``report/ddpRANK`` (a wrapper that outlives the group frees it later
    with the GIL held, which can deadlock: ``distributed.close_dist``), and its threads' Python stacks to
    ``report/stackRANK`` on SIGUSR1 (the watchdog asks before it kills a rank)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    faulthandler.register(signal.SIGUSR1, file=(report / f"stack{rank}").open("w"), all_threads=True)
    wrappers = []
    ddp_init = DistributedDataParallel.__init__

    def tracked_init(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)
        wrappers.append(weakref.ref(self))

    destroy = tdist.destroy_process_group

    def tracked_destroy(*args, **kwargs):
        (report / f"ddp{rank}").write_text(str(sum(w() is not None for w in wrappers)))
        return destroy(*args, **kwargs)

    DistributedDataParallel.__init__ = tracked_init
    tdist.destroy_process_group = tracked_destroy
    rows = [([1 + (i + j) % 20 for j in range(8)], 2) for i in range(16)]
    tm.training_rows = lambda *a, **k: (rows, rows[:4])
    if rank == 1 and nan_call is not None:
        tm.mtp_loss_from_hidden = on_call(nan_call, tm.mtp_loss_from_hidden, nan_loss)
    try:
        summary = tm.train_mtp(cfg)
        msg = f"finished, resumed from {summary['resumed_from']}"
    except Exception as e:  # noqa: BLE001 - reported to the test
        msg = f"{type(e).__name__}: {e}"
    (report / str(rank)).write_text(msg)


def two_ranks(cfg: tm.TrainMTPConfig, report, nan_call: int | None, timeout: float = 240.0) -> list[str]:
    """How each of two spawned gloo ranks ended; each destroyed its process group with no DDP wrapper left alive.
    A rank that has not finished after ``timeout`` seconds (about ten times the usual) fails the test with its
    threads' Python stacks, and is killed so the suite goes on. Such a hang was a DDP wrapper kept alive by a
    failed run's traceback past ``destroy_process_group``, whose Reducer then freed the gloo group with the GIL
    held while a gloo worker waited for the GIL (``distributed.close_dist``)."""
    report.mkdir()
    ctx = mp.start_processes(_rank_main, args=(_free_port(), cfg, nan_call, report), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            missing = [r for r in range(2) if not (report / str(r)).exists()]
            for p in ctx.processes:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGUSR1)
            time.sleep(2.0)
            for p in ctx.processes:
                p.kill()
            stacks = "\n".join(f"rank {r}:\n{(report / f'stack{r}').read_text()}" for r in missing)
            pytest.fail(f"rank(s) {missing} still running after {timeout:.0f} s; their stacks:\n{stacks}")
    assert [(report / f"ddp{r}").read_text() for r in range(2)] == ["0", "0"], "a DDP wrapper outlived the group"
    return [(report / str(r)).read_text() for r in range(2)]


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank_alike_and_resumes(policy_dir, tmp_path):
    """Rank 1 alone sees a NaN loss at main step 3: both ranks stop at that step with the same error (the loss
    checked is the all-reduced one), the main-step-2 checkpoint stays, and a rerun on two ranks resumes there."""
    out = tmp_path / "run"
    cfg = tm.TrainMTPConfig(model=str(policy_dir), out=str(out), device="cpu", **SMALL)
    ends = two_ranks(cfg, tmp_path / "r1", nan_call=9)
    assert ends[0] == ends[1], ends
    assert ends[0].startswith("BebopError: train-mtp stopped at step 3 of the main stage: non-finite e2e_tv loss "
                              "(nan); the optimizer step was not taken, the last checkpoint (main stage, step 2)")
    state = load_state(out)
    assert (state.stage, state.step) == (1, 2) and state.config == asdict(cfg)
    assert two_ranks(cfg, tmp_path / "r2", nan_call=None) == ["finished, resumed from {'stage': 1, 'step': 2}"] * 2
