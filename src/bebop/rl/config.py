"""RL configuration (DESIGN §5): the ``bebop rl`` options as one dataclass, the rollout strategies and rules, and
the prompt source (a built-in task, or a user's ``--prompts`` / ``--dataset``) with its reward functions
(:mod:`bebop.rl.rewards`: TRL's signature)."""

from __future__ import annotations

from dataclasses import dataclass

from bebop.config import check_device, check_dtype, check_gamma, positive
from bebop.errors import BebopError
from bebop.rl.rewards import Rewards, parse_weights
from bebop.tasks import completion_budget, get_task
from bebop.tasks.base import DEFAULT_COMPLETION_TOKENS
from bebop.training.options import DataSource

STRATEGIES = ("none", "frozen", "online-ce", "online-tv")
RULES_RL = ("rejection", "target_only")


def reward_specs(reward: list[str] | str | None) -> list[str] | None:
    """``reward`` as a list of ``module:function`` specs (one string is one spec), or None for the task's own."""
    if reward is None:
        return None
    specs = [reward] if isinstance(reward, str) else list(reward)
    if not specs:
        return None
    for spec in specs:
        if not isinstance(spec, str):
            raise BebopError(f"reward {spec!r} is not 'module:function' or 'path/to/file.py:function'")
    return specs


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

    task: str | None = None             # built-in task (arith when neither prompts nor dataset is given)
    prompts: str | None = None          # JSONL of {"prompt"} / {"messages"} (+ columns for the rewards)
    dataset: str | None = None          # a ``datasets`` dataset: local file or directory, cached or hub name
    split: str = "train"
    field: str | None = None            # the dataset's prompt column (default prompt, else messages)
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
    max_new_tokens: int | None = None   # None: the task's completion budget (tasks.completion_budget), 96 for prompts
    rollout_batch: int = 0              # rows in flight per worker, continuous batching (0 = one static batch)
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
    eval_samples: int = 256             # held-out accuracy (task) or mean reward (user prompts) before/after (0 = skip)
    reward: list[str] | None = None     # "module:function" or "file.py:function" (TRL's signature); None = task's
    reward_weights: list[float] | None = None   # one per reward (default all 1)
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda | cuda:i; "auto" is resolved here (CUDA when available)
    dtype: str = "auto"                 # compute dtype: auto | float32 | bfloat16 | float16 (models.device)

    def __post_init__(self) -> None:
        source = DataSource(self.task, self.prompts, self.dataset, self.split, self.field).check()
        if source.kind == "task" and self.task is None:
            self.task = "arith"
        self.reward = reward_specs(self.reward)
        if self.reward is None:
            if self.reward_weights is not None:
                raise BebopError("--reward-weights needs --reward (one weight per reward function)")
            if self.user_prompts:
                raise BebopError(f"--{source.kind} needs a reward function: pass --reward module:function "
                                 "(TRL's signature f(prompts, completions, **columns) -> list[float])")
            if not callable(getattr(get_task(self.task), "reward", None)):
                raise BebopError(f"task {self.task!r} has no reward function; pass --reward module:function")
        else:
            if self.reward_weights is not None:    # None stays None (all 1), so replace(cfg, reward=…) works
                self.reward_weights = parse_weights(self.reward_weights, len(self.reward))
            Rewards(self.reward, self.reward_weights)      # importable, callable, TRL's arguments
        if self.max_new_tokens is None:
            self.max_new_tokens = DEFAULT_COMPLETION_TOKENS if self.user_prompts else completion_budget(
                get_task(self.task))
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
    def user_prompts(self) -> bool:
        """Whether prompts come from the user (``--prompts`` or ``--dataset``) rather than a built-in task."""
        return self.prompts is not None or self.dataset is not None

    @property
    def source(self) -> DataSource:
        """The run's prompt source."""
        return DataSource(self.task, self.prompts, self.dataset, self.split, self.field)

    @property
    def label(self) -> str:
        """The task name, or the prompts file or dataset (titles and messages)."""
        return self.source.label

    @property
    def staleness_bound(self) -> int:
        """How many policy versions old a step's rollouts may be (0 unless rollouts are asynchronous)."""
        return self.max_staleness if self.async_rollouts else 0

    @property
    def use_mtp(self) -> bool:
        """Whether rollouts draft with an MTP head (every strategy but ``none``)."""
        return self.mtp_strategy != "none"
