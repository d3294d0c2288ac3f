"""The options of the experiment commands (``bench decode``, ``bench losses``, ``analyze sweep``, ``analyze
entropy``): one dataclass each, validated on construction. Kept free of torch and the engine at import time, so
the CLI can read every default from here without loading a model stack just to print ``--help``."""

from __future__ import annotations

from dataclasses import dataclass

from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.errors import BebopError
from bebop.experiments.names import DEFAULT_TEMPERATURES
from bebop.tasks import get_task

__all__ = ["BatchingBenchConfig", "DecodeBenchConfig", "EntropyConfig", "LossBenchConfig", "SweepConfig"]


@dataclass
class DecodeBenchConfig:
    """Options of ``bebop bench decode``."""

    task: str = "arith"
    gamma: int | str = 3            # "auto" (adaptive.AUTO): adaptive γ against every fixed γ = 1..gamma_max
    rule: str = "rejection"         # with gamma "auto" also "auto" (RS or TO per row)
    gamma_max: int = 5
    temperature: float = 1.0
    batch_sizes: tuple[int, ...] = (1, 8)
    max_new_tokens: int = 64
    ignore_eos: bool = False        # every row decodes max_new_tokens tokens (no EOS stop), as vLLM's --ignore-eos
    continuous: bool = False        # batch size B = B slots every prompt passes through (fixed γ only)
    repeats: int = 3
    num_prompts: int = 32           # prompts per batch size, decoded in consecutive batches of that size
    seed: int = 0
    threads: int = 1                # torch intra-op threads for the whole benchmark (restored afterwards)
    device: str = "auto"            # where the policy and head run (auto: CUDA when available)
    dtype: str = "auto"             # their weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.sampling import RULES, SamplingParams
        from bebop.experimental.adaptive import AUTO

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        SamplingParams(temperature=self.temperature)
        if self.gamma != AUTO:
            check_gamma(self.gamma)
        rules = (*RULES, AUTO) if self.gamma == AUTO else RULES
        if self.rule not in rules:
            raise BebopError(f"unknown rule {self.rule!r}; choose one of: {', '.join(rules)}")
        check_gamma(self.gamma_max, "gamma-max")
        if self.ignore_eos:
            from bebop.training.multiturn import is_multi_turn

            if is_multi_turn(get_task(self.task)):
                raise BebopError(f"--ignore-eos needs a single-turn task; {self.task!r} runs multi-turn episodes")
        positive("prompts", self.num_prompts)
        positive("repeats", self.repeats)
        positive("threads", self.threads)
        self.batch_sizes = tuple(self.batch_sizes)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise BebopError(f"batch sizes must be >= 1, got {list(self.batch_sizes)}")


@dataclass
class LossBenchConfig:
    """Options of ``bebop bench losses``."""

    task: str = "arith"
    losses: tuple[str, ...] = ("ce", "fkl", "rkl", "tv", "e2e_tv")
    gamma: int = 3                       # deployed γ (measurement); training uses gamma_train
    gamma_train: int = 3
    steps: int = 300                     # fine-tuning steps of each loss from the shared starting head
    lr: float = 1e-3
    data_samples: int = 2048
    init: str | None = None              # shared starting head (None: a forward-KL warm start, trained once)
    temperatures: tuple[float, ...] = (1.0, 0.7)
    eval_prompts: int = 128
    batch_size: int = 32
    max_new_tokens: int = 64
    seed: int = 0
    out: str = "runs/bench_losses"       # one head directory per loss
    device: str = "auto"                 # where the policy and heads train and run (auto: CUDA when available)
    dtype: str = "auto"                  # compute dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.losses import LOSSES

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        self.losses = tuple(self.losses)
        bad = [x for x in self.losses if x not in LOSSES]
        if bad or not self.losses:
            raise BebopError(f"unknown loss {bad[0] if bad else self.losses!r}; choose from: {', '.join(LOSSES)}")
        check_gamma(self.gamma)
        check_gamma(self.gamma_train, "gamma_train")


@dataclass
class SweepConfig:
    """Options of ``bebop analyze sweep`` / :func:`temperature_sweep`: RS and TO acceptance at every τ."""

    task: str = "arith"
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    gamma: int = 3
    prompts: int = 64                 # held-out prompts per (head, τ, rule)
    batch_size: int = 32
    max_new_tokens: int = 64
    seed: int = 0
    device: str = "auto"              # where the policy and heads run (auto: CUDA when available)
    dtype: str = "auto"               # their weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.sampling import SamplingParams

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        self.temperatures = tuple(float(t) for t in self.temperatures)
        if not self.temperatures:
            raise BebopError("the temperature sweep needs at least one temperature")
        for t in self.temperatures:
            SamplingParams(temperature=t)
        check_gamma(self.gamma)
        for name in ("prompts", "batch_size", "max_new_tokens"):
            positive(name, getattr(self, name))


@dataclass
class EntropyConfig:
    """Options of ``bebop analyze entropy`` / :func:`entropy_analysis`: per-token entropy buckets at one τ."""

    task: str = "arith"
    samples: int = 256                # policy samples, teacher-forced through each head
    temperature: float = 1.0
    gamma: int = 3
    buckets: int = 10
    max_new_tokens: int = 96
    seed: int = 0
    batch_size: int = 64
    device: str = "auto"              # where the policy and heads run (auto: CUDA when available)
    dtype: str = "auto"               # their weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)

    def __post_init__(self) -> None:
        from bebop.core.sampling import SamplingParams

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        SamplingParams(temperature=self.temperature)
        if not self.temperature > 0:
            raise BebopError(f"temperature must be > 0 for the entropy analysis, got {self.temperature}")
        check_gamma(self.gamma)
        for name in ("samples", "buckets", "max_new_tokens", "batch_size"):
            positive(name, getattr(self, name))


@dataclass
class BatchingBenchConfig:
    """Options of ``bebop bench batching``: an RL step's rows (``prompts`` × ``group_size``) decoded in static batches
    of ``batch`` rows and through continuous batching with ``batch`` slots, plain and MTP."""

    task: str = "arith"
    batch: int = 8
    prompts: int = 16
    group_size: int = 4
    gamma: int = 3
    rule: str = "rejection"
    temperature: float = 1.0
    max_new_tokens: int = 96
    repeats: int = 3
    seed: int = 0
    threads: int = 1
    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        from bebop.core.sampling import RULES, SamplingParams

        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        SamplingParams(temperature=self.temperature)
        check_gamma(self.gamma)
        if self.rule not in RULES:
            raise BebopError(f"unknown rule {self.rule!r}; choose one of: {', '.join(RULES)}")
        for name in ("batch", "prompts", "group_size", "max_new_tokens", "repeats", "threads"):
            positive(name.replace("_", "-"), getattr(self, name))
