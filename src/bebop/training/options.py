"""Options of the training-layer commands that need no torch to describe, so the CLI reads their defaults
without loading the model stack (``bebop --help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bebop.config import check_device, check_dtype, positive
from bebop.errors import BebopError
from bebop.tasks import completion_budget, get_task

EVAL_SEED = 10_000  # seed of the evaluation problem stream (SFT uses its own seed)


@dataclass
class EvalConfig:
    """Options of ``bebop eval`` (and the defaults of :func:`evaluate`)."""

    task: str = "arith"
    samples: int = 256
    temperature: float = 1.0          # of ``accuracy``; ``greedy_accuracy`` is always τ = 0
    max_new_tokens: int | None = None  # None: the task's completion budget (tasks.completion_budget)
    seed: int = EVAL_SEED
    device: str = "auto"              # where the policy runs (auto: CUDA when available)
    dtype: str = "auto"               # its weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.sampling import SamplingParams

        task = get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        positive("samples", self.samples)
        if self.max_new_tokens is None:
            self.max_new_tokens = completion_budget(task)
        positive("max_new_tokens", self.max_new_tokens)
        SamplingParams(temperature=self.temperature)


SOURCE_FLAGS = {"task": "--task", "prompts": "--prompts", "dataset": "--dataset", "completions": "--completions"}


@dataclass(frozen=True)
class DataSource:
    """Where a head's training (or evaluation) prompts come from: exactly one of a built-in ``task``, a JSONL
    ``prompts`` file, a ``datasets`` dataset (local file or directory, cached or hub name) with its ``split`` and
    ``field``, or a JSONL of existing ``completions`` (prompt + completion per line, no generation). None of them
    means the ``arith`` task."""

    task: str | None = None
    prompts: str | None = None
    dataset: str | None = None
    split: str = "train"
    field: str | None = None
    completions: str | None = None

    def check(self) -> DataSource:
        """Raise on more than one source or an unknown task; returns ``self``."""
        given = [flag for name, flag in SOURCE_FLAGS.items() if getattr(self, name) is not None]
        if len(given) > 1:
            raise BebopError(f"give one data source, got {' and '.join(given)}")
        if self.task is not None:
            get_task(self.task)
        if self.field is not None and self.dataset is None:
            raise BebopError(f"--field {self.field!r} applies only to --dataset")
        return self

    @property
    def kind(self) -> str:
        """``task``, ``prompts``, ``dataset`` or ``completions``."""
        return next((name for name in SOURCE_FLAGS if getattr(self, name) is not None), "task")

    def resolved(self) -> DataSource:
        """This source, with the ``arith`` task when none is given."""
        return self if any(getattr(self, n) is not None for n in SOURCE_FLAGS) else replace(self, task="arith")

    @property
    def label(self) -> str:
        """A short human-readable name: the task or the file/dataset."""
        return str(getattr(self.resolved(), self.resolved().kind))
