"""Options of the training-layer commands that need no torch to describe, so the CLI reads their defaults
without loading the model stack (``bebop --help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass

from bebop.config import check_device, check_dtype, positive
from bebop.tasks import get_task

EVAL_SEED = 10_000  # seed of the evaluation problem stream (SFT uses its own seed)


@dataclass
class EvalConfig:
    """Options of ``bebop eval`` (and the defaults of :func:`evaluate`)."""

    task: str = "arith"
    samples: int = 256
    temperature: float = 1.0          # of ``accuracy``; ``greedy_accuracy`` is always τ = 0
    max_new_tokens: int = 96
    seed: int = EVAL_SEED
    device: str = "auto"              # where the policy runs (auto: CUDA when available)
    dtype: str = "auto"               # its weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.sampling import SamplingParams

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        positive("samples", self.samples)
        positive("max_new_tokens", self.max_new_tokens)
        SamplingParams(temperature=self.temperature)
