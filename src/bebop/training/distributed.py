"""Multi-process training on ``torch.distributed``: one process per device, started by ``torchrun``.

``init_dist`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the process group
(NCCL on CUDA, gloo on CPU); without that environment it is a single process and every helper here is a no-op, so
the same training code runs under ``bebop train-mtp`` and ``torchrun -m bebop.cli train-mtp``."""

from __future__ import annotations

import contextlib
import gc
import os
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from bebop.errors import BebopError
from bebop.models.device import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: global ``rank`` of ``world`` processes, ``local_rank`` on its node."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and prints progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process, so collectives actually communicate."""
        return self.world > 1


SINGLE = Dist(0, 1, 0)


def init_dist(device: str = "auto") -> tuple[Dist, torch.device]:
    """Join torchrun's process group when its environment is set, and pick this rank's device: ``cuda:LOCAL_RANK``
    when ``device`` resolves to CUDA (NCCL), else CPU (gloo). Without torchrun: :data:`SINGLE` and ``device``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE, resolve_device(device)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if local >= torch.cuda.device_count():
            raise BebopError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} CUDA devices are visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, local), dev


def close_dist(dist: Dist) -> None:
    """Leave the process group (end of a run, finished or failed).

    The group must be freed here, by ``destroy_process_group``, and not later by a ``DistributedDataParallel``
    wrapper that outlived the run: the gloo group's destructor joins its worker threads, and a worker that has
    just finished a collective still has to take the GIL to release that collective's tensors. Python's last
    reference to the group is released with the GIL dropped, so the worker finishes and the join returns; a DDP
    Reducer's reference is released with the GIL held, and then the join waits for the worker, which waits for
    the GIL, for ever (the two-rank NaN test caught this one process in a few runs). So every wrapper must be gone
    before this call: wrappers in reference cycles are collected here, and a failed run's frames are cleared by
    :func:`process_group` (an exception's traceback keeps the frames that hold the wrapper alive)."""
    if dist.active and tdist.is_initialized():
        gc.collect()
        tdist.destroy_process_group()


def release_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames that ``exc``'s traceback (and those of the exceptions
    chained to it) keep alive, so that what they held (a DDP wrapper, its Reducer and through it the process
    group) is freed now. The traceback itself (files, lines) is kept."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


@contextlib.contextmanager
def process_group(device: str = "auto") -> Iterator[tuple[Dist, torch.device]]:
    """:func:`init_dist` for the ``with`` block, then :func:`close_dist` however the block ends; an exception
    leaving the block first has its frames released (:func:`release_frames`), so no DDP wrapper created inside
    the block outlives the group. Every rank leaves alike, whether it finished or raised."""
    dist, dev = init_dist(device)
    try:
        yield dist, dev
    except BaseException as e:
        release_frames(e)
        raise
    finally:
        close_dist(dist)


def gather_objects(obj: T, dist: Dist) -> list[T]:
    """Every rank's ``obj`` (picklable, produced by this job's own ranks), in rank order, on every rank."""
    if not dist.active:
        return [obj]
    out: list[Any] = [None] * dist.world
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, dist: Dist, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not dist.active:
        return obj
    box = [obj if dist.rank == src else None]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def barrier(dist: Dist) -> None:
    """Wait for every rank."""
    if dist.active:
        tdist.barrier()


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The sum of ``t`` over ranks (in place; returns ``t``). NCCL reduces only CUDA tensors, so under NCCL a CPU
    tensor is reduced on this rank's CUDA device and copied back."""
    if not dist.active:
        return t
    if t.device.type != "cuda" and tdist.get_backend() == "nccl":
        on_device = t.to(torch.device("cuda", torch.cuda.current_device()))
        tdist.all_reduce(on_device, op=tdist.ReduceOp.SUM)
        return t.copy_(on_device)
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def shard(seq: Sequence[T], dist: Dist) -> list[T]:
    """This rank's share of ``seq``: every ``world``-th item from ``rank``."""
    return list(seq[dist.rank :: dist.world])
