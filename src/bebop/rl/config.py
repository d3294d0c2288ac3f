"""RL configuration (DESIGN §5): the ``bebop rl`` options as one dataclass, the rollout strategies and rules,
and the reward loader (a reward is a plain function of (problem, completion text))."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.errors import BebopError
from bebop.tasks import Problem, get_task

STRATEGIES = ("none", "frozen", "online-ce", "online-tv")
RULES_RL = ("rejection", "target_only")


def load_reward(task_name: str, reward: str | None) -> Callable[[Problem, str], float]:
    """The reward function: ``reward`` = ``"package.module:function"`` taking (problem, completion text) and
    returning a float, or the task's own reward when None."""
    task = get_task(task_name)
    if reward is None:
        fn = getattr(task, "reward", None)
        if not callable(fn):
            raise BebopError(f"task {task_name!r} has no reward function; pass --reward module:function")
        return fn
    module, _, name = reward.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name) if name else None
    except (ImportError, AttributeError) as e:
        raise BebopError(f"cannot load reward {reward!r}: {e}") from None
    if not callable(fn):
        raise BebopError(f"reward {reward!r} is not a callable 'module:function'")
    return fn


ONLINE_LOSS = {"online-ce": "ce", "online-tv": "e2e_tv"}


def _concrete_device(device: str, dtype: str) -> str:
    """``device`` with ``auto`` resolved to ``cpu`` / ``cuda`` (the trainer and the rollout workers place tensors
    with it), after checking that it exists and that ``dtype`` can run on it (float16 cannot on the CPU)."""
    from bebop.models.device import resolve_device, resolve_dtype

    check_device(device)
    check_dtype(dtype)
    resolved = resolve_device(device)
    resolve_dtype(dtype, resolved)
    return device if device != "auto" else resolved.type


@dataclass
class RLConfig:
    """Every ``bebop rl`` setting; invalid combinations fail at construction, before any model is loaded."""

    task: str = "arith"
    model: str = "runs/arith/base"
    mtp: str | None = None              # head dir or "native"; needed for `frozen`, optional start for online ones
    out: str = "runs/arith/rl"
    mtp_strategy: str = "frozen"        # none | frozen | online-ce | online-tv
    rule: str = "rejection"             # rejection | target_only
    gamma: int = 3
    steps: int = 30
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    max_new_tokens: int = 96
    rollout_batch: int = 0              # rows per engine call (0 = all prompts × G at once)
    lr: float = 2e-4
    warmup: int = 3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0                # KL to the initial (reference) policy; 0 = off
    micro_batch: int = 64               # rows per forward/backward (gradient accumulation)
    async_rollouts: bool = False
    max_staleness: int = 1              # async: rollouts may come from up to this many versions ago
    online_every: int = 5               # online strategies: re-train the head every N steps
    online_steps: int = 20              # head optimizer steps per re-training
    online_lr: float = 1e-3
    online_grad_clip: float = 1.0
    online_gamma_train: int = 3
    backend: str = "local"              # local | ray
    ray_address: str | None = None
    ray_workers: int = 1
    rollout_threads: int = 0            # torch threads in each rollout worker (0 = default)
    rollout_retries: int = 1            # Ray: times a step's shard is re-run on a fresh worker after one died
    checkpoint_every: int = 5
    eval_samples: int = 256             # held-out accuracy before and after RL (0 = skip)
    reward: str | None = None           # "module:function" replacing the task's reward
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:i; "auto" is resolved here (CUDA when available)
    dtype: str = "auto"                 # compute dtype: auto | float32 | bfloat16 | float16 (models.device)

    def __post_init__(self) -> None:
        load_reward(self.task, self.reward)
        self.device = _concrete_device(self.device, self.dtype)
        if self.mtp_strategy not in STRATEGIES:
            raise BebopError(f"unknown mtp_strategy {self.mtp_strategy!r}; choose one of: {', '.join(STRATEGIES)}")
        if self.rule not in RULES_RL:
            raise BebopError(f"unknown rule {self.rule!r} for RL rollouts; choose one of: {', '.join(RULES_RL)}")
        if self.mtp_strategy == "frozen" and not self.mtp:
            raise BebopError("mtp_strategy 'frozen' needs a trained head: pass --mtp DIR (or --mtp-strategy none)")
        if self.group_size < 2:
            raise BebopError(f"group_size must be >= 2 (GRPO normalises rewards within a group), got {self.group_size}")
        if self.max_staleness < 0:
            raise BebopError(f"max_staleness must be >= 0, got {self.max_staleness}")
        if self.rollout_retries < 0:
            raise BebopError(f"rollout_retries must be >= 0, got {self.rollout_retries}")
        check_gamma(self.gamma)
        if not self.temperature > 0:
            raise BebopError(f"temperature must be > 0 for RL rollouts, got {self.temperature}")
        if self.backend not in ("local", "ray"):
            raise BebopError(f"unknown backend {self.backend!r}; choose local or ray")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "lr", "micro_batch", "online_every",
                     "online_steps", "online_lr", "online_gamma_train", "checkpoint_every", "ray_workers"):
            positive(name, getattr(self, name))

    @property
    def staleness_bound(self) -> int:
        """How many policy versions old a step's rollouts may be (0 unless rollouts are asynchronous)."""
        return self.max_staleness if self.async_rollouts else 0

    @property
    def use_mtp(self) -> bool:
        """Whether rollouts draft with an MTP head (every strategy but ``none``)."""
        return self.mtp_strategy != "none"
