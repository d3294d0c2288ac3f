"""The demo's settings (:class:`DemoConfig`, the ``--quick`` preset) and the stage configs derived from them.

Each stage runs a library command with its own config dataclass (SFT, MTP-head training, the analyses, the RL
benchmark). Rather than copying demo fields into those by hand, :func:`derive` fills a stage config by name:
the demo field ``<prefix><name>`` if it exists, else ``<name>`` when that is one of the settings every stage
shares (:data:`SHARED`), with a few explicit aliases; anything else keeps the stage's own default."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from bebop.config import check_device, check_dtype, positive
from bebop.errors import BebopError
from bebop.experiments.bench_rl import METHODS
from bebop.experiments.names import DEFAULT_TEMPERATURES
from bebop.models.policy import ModelConfig
from bebop.tasks import get_task
from bebop.training.sft import sft_recipe

__all__ = ["ABLATIONS", "EARLY_STOP", "QUICK", "RL_METHODS", "SHARED", "DemoConfig", "derive", "head_configs",
           "quick_config", "rl_config", "sft_config"]

C = TypeVar("C")

RL_METHODS = "none,to-ce,rs-ce,rs-e2e_tv,rs-online-ce"
ABLATIONS = ("layers", "gamma_train", "budget", "temperature", "seeds", "rl")
"""What ``ablations`` may name: 1 vs 2 MTP layers, γ_train 3 vs 5, half / double the head budget, the
temperature of the training data, other head-training seeds, and a longer RL run
(:mod:`bebop.experiments.demo.ablations` builds the variants)."""
SHARED = ("task", "seed", "gamma", "temperature", "temperatures", "max_new_tokens", "gamma_train", "head_layers",
          "data_samples", "heldout_samples", "online_every", "online_steps", "device", "dtype", "arch")
"""Demo fields that mean the same in every stage config that has a field of that name."""


@dataclass
class DemoConfig:
    """Every setting of ``bebop demo`` (flat, one TOML key each). Stage configs are derived from it by name
    (:func:`derive`): a ``<stage>_`` prefix names a stage's own value, shared names pass through unchanged."""

    out: str = "runs/demo"
    task: str = "anagram"              # policy entropy 0.49–0.85 nats/token over τ 0.3–1.5 (docs/tasks.md)
    model: str | None = None           # existing SFT policy directory: skip the SFT stage
    fresh: bool = False                # redo every stage instead of reusing cached outputs
    seed: int = 0
    gamma: int = 3                     # deployed draft length (measurements and RL)
    temperature: float = 1.0           # rollout temperature (head training, losses, entropy, RL)
    max_new_tokens: int = 32
    device: str = "auto"               # every stage: auto | cpu | cuda | cuda:i (auto: CUDA when available)
    dtype: str = "auto"                # every stage: auto | float32 | bfloat16 | float16 (models.device)
    # 1. SFT
    arch: str = "qwen3"                # policy family (models.families.ARCHS)
    sft_steps: int | None = None       # None: the task's SFT recipe (training.sft.SFT_RECIPES)
    sft_minutes: float | None = None   # optional wall-clock cap; off, so the run is the same on any machine
    sft_eval_samples: int = 128
    policy: ModelConfig = field(default_factory=ModelConfig)
    # 2. heads: init_loss warm start, then ce / e2e_tv (+ extra_losses) from it
    gamma_train: int = 3
    head_layers: int | None = None     # MTP layers of the fresh head (None: 1, or the checkpoint's native layer)
    init_loss: str = "fkl"
    init_steps: int = 800              # init_* and head_* as train-mtp's warm stage and main stage (budgets)
    init_lr: float = 5e-3
    head_steps: int = 800              # the same budget for every fine-tuned loss (e2e TV gains to ~step 700)
    head_lr: float = 1e-3
    head_eval_every: int = 25          # every head stage (warm start too): held-out expected α every this many steps,
    head_patience: int = 8             # stop after this many evaluations without a gain > head_min_delta (0: never)
    head_min_delta: float = 0.0005     # and keep the best evaluation's head,
    head_min_steps: int = 100          # watching from this step on (a fine-tuned loss first drops below its start)
    data_samples: int = 4096
    heldout_samples: int = 256
    extra_losses: str = ""             # e.g. "fkl,rkl,tv": more losses fine-tuned like ce and e2e_tv (claim 3)
    # 3.-5. measurements
    loss_prompts: int = 128
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    sweep_prompts: int = 96
    entropy_samples: int = 512
    # 6. RL
    rl_methods: str = RL_METHODS
    rl_steps: int = 12
    rl_prompts: int = 8
    rl_group: int = 8
    rl_lr: float = 2e-4                # small enough that reward does not collapse within rl_steps
    rl_rollout_batch: int = 0          # rows in flight per rollout worker, continuous batching (0 = one static batch)
    online_every: int = 4
    online_steps: int = 20
    rl_eval_samples: int = 0
    # claim 5: a benchmarks/gpu_costs.py JSON; its projected GPU step speedup is shown (labelled, not judged)
    gpu_costs: str | None = None
    # 7. ablations (off by default): "all" or a comma list of ABLATIONS, run after the main stages
    ablations: str = ""

    def __post_init__(self) -> None:
        get_task(self.task)
        check_device(self.device)
        check_dtype(self.dtype)
        if self.sft_steps is None:
            self.sft_steps = sft_recipe(self.task).steps
        if self.sft_minutes is not None:
            positive("sft_minutes", self.sft_minutes)
        self.temperatures = tuple(float(t) for t in self.temperatures)
        for name in ("gamma", "temperature", "max_new_tokens", "sft_steps", "gamma_train",
                     "init_steps", "init_lr", "head_steps", "head_lr", "data_samples", "heldout_samples",
                     "loss_prompts", "sweep_prompts", "entropy_samples", "rl_steps", "rl_prompts", "rl_lr",
                     "online_every", "online_steps"):
            positive(name, getattr(self, name))
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise BebopError(f"temperatures must be positive, got {list(self.temperatures)}")
        if self.rl_group < 2:
            raise BebopError(f"rl_group must be >= 2 (GRPO normalises within a group), got {self.rl_group}")
        for m in self.method_list():
            if m not in METHODS:
                raise BebopError(f"unknown RL method {m!r}; choose from: {', '.join(METHODS)}")
        for name in ("head_patience", "head_min_delta", "head_min_steps"):
            if not getattr(self, name) >= 0:
                raise BebopError(f"{name} must be >= 0, got {getattr(self, name)}")
        positive("head_eval_every", self.head_eval_every)
        if self.gpu_costs is not None and not Path(self.gpu_costs).is_file():
            raise BebopError(f"GPU costs JSON not found: {self.gpu_costs}")
        self.ablation_list()

    def method_list(self) -> list[str]:
        """The RL methods run side by side, in order."""
        return [m.strip() for m in self.rl_methods.split(",") if m.strip()]

    def ablation_list(self) -> list[str]:
        """The ablations to run, in :data:`ABLATIONS` order ("all": every one); an unknown name is an error."""
        names = [a.strip() for a in self.ablations.split(",") if a.strip()]
        if names == ["all"]:
            return list(ABLATIONS)
        for a in names:
            if a not in ABLATIONS:
                raise BebopError(f"unknown ablation {a!r}; choose from: all, {', '.join(ABLATIONS)}")
        return [a for a in ABLATIONS if a in names]

    def loss_list(self) -> list[str]:
        """Heads fine-tuned from the warm start: ce, e2e_tv, then the extra losses."""
        extra = [x.strip() for x in self.extra_losses.split(",") if x.strip()]
        return list(dict.fromkeys(["ce", "e2e_tv", *extra]))


# a CI smoke test: every stage runs and every file is written; the numbers mean nothing
QUICK: dict = dict(
    policy=ModelConfig(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128),
    sft_steps=150, sft_eval_samples=16, max_new_tokens=32, init_steps=20, head_steps=10,
    data_samples=64, heldout_samples=16, loss_prompts=8, temperatures=(0.5, 1.0, 1.5), sweep_prompts=8,
    entropy_samples=32, rl_steps=3, rl_prompts=4, rl_group=4, online_every=1, online_steps=2, head_eval_every=5,
    head_patience=2, head_min_steps=4,
)


def quick_config(**overrides) -> DemoConfig:
    """The ``--quick`` preset, with ``overrides`` on top."""
    return DemoConfig(**{**QUICK, **overrides})



def derive(cls: type[C], cfg: DemoConfig, prefix: str = "", aliases: Mapping[str, str] | None = None,
           **fixed: Any) -> C:
    """A ``cls`` whose field ``f`` takes, in order: ``fixed[f]``; the demo field ``aliases[f]``; the demo field
    ``prefix + f``; the demo field ``f`` when ``f`` is in :data:`SHARED`; otherwise ``cls``'s default."""
    demo = {f.name for f in fields(cfg)}
    aliases = aliases or {}
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in fixed:
            values[f.name] = fixed[f.name]
        elif f.name in aliases:
            values[f.name] = getattr(cfg, aliases[f.name])
        elif prefix and prefix + f.name in demo:
            values[f.name] = getattr(cfg, prefix + f.name)
        elif f.name in SHARED and f.name in demo:
            values[f.name] = getattr(cfg, f.name)
    unknown = set(fixed) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise BebopError(f"{cls.__name__} has no field {sorted(unknown)[0]!r}")
    return cls(**values)


def sft_config(cfg: DemoConfig, out: Path):
    """Stage 1: the SFT run (``sft_*`` fields; ``sft_minutes`` is its ``max_minutes``, ``policy`` its model)."""
    from bebop.training.sft import SFTConfig

    return derive(SFTConfig, cfg, "sft_", {"max_minutes": "sft_minutes", "model": "policy"}, out=str(out))


def head_dirs(cfg: DemoConfig, heads_dir: Path) -> dict[str, Path]:
    """Where each head lives: the warm start, then one directory per fine-tuned loss."""
    return {f"{cfg.init_loss} (warm start)": heads_dir / f"{cfg.init_loss}_init",
            **{loss: heads_dir / loss for loss in cfg.loss_list()}}


EARLY_STOP = {"eval_every": "head_eval_every", "patience": "head_patience", "min_delta": "head_min_delta",
              "min_steps": "head_min_steps"}
"""The early-stopping settings every head stage takes (the warm start's too)."""


def head_configs(cfg: DemoConfig, policy: Path, dirs: Mapping[str, Path]) -> dict[str, Any]:
    """Stage 2: ``{"head_init": warm start (``init_*`` fields, trained alone from the family's fresh head),
    "head_<loss>": the loss fine-tuned from it (``head_*`` fields)}``, every head on the same data and seed, each a
    budget of steps that stops early on held-out expected α (:data:`EARLY_STOP`)."""
    from bebop.training.train_mtp import TrainMTPConfig

    init_dir = next(iter(dirs.values()))
    cfgs = {"head_init": derive(TrainMTPConfig, cfg, "init_", EARLY_STOP, model=str(policy), out=str(init_dir),
                                warm_steps=0)}
    for loss in cfg.loss_list():
        cfgs[f"head_{loss}"] = derive(TrainMTPConfig, cfg, "head_", EARLY_STOP, model=str(policy),
                                      out=str(dirs[loss]), loss=loss, init=str(init_dir))
    return cfgs


def rl_config(cfg: DemoConfig, policy: Path, dirs: Mapping[str, Path], out: Path):
    """Stage 6: the RL benchmark (``rl_*`` fields) over the e2e-TV and CE heads, with the shared RL settings."""
    from bebop.experiments.bench_rl import RLBenchConfig
    from bebop.rl.config import RLConfig

    rl = derive(RLConfig, cfg, "rl_", {"prompts_per_step": "rl_prompts", "group_size": "rl_group"},
                mtp_strategy="none", checkpoint_every=cfg.rl_steps, prompts=None)   # rl_prompts: prompts per step
    return derive(RLBenchConfig, cfg, "rl_", model=str(policy), mtp=str(dirs["e2e_tv"]), mtp_ce=str(dirs["ce"]),
                  out=str(out), rl=rl)
