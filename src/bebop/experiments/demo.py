"""`bebop demo`: the paper's five findings (DESIGN §6) reproduced end to end on a laptop, with plots.

Pipeline (each stage cached in ``cfg.out``; a re-run continues after a crash, ``fresh`` redoes everything):
  1. sft      SFT policy (``policy/``), or an existing one with ``model=DIR``
  2. heads    MTP heads: a forward-KL warm start, then CE and e2e-TV (and ``extra_losses``) fine-tuned from it
              with identical data, steps and LR, so the comparison isolates the loss
  3. losses   RS and TO acceptance α_k of every head through the engine at τ = ``temperature``
  4. sweep    RS vs TO accept length of the CE and e2e-TV heads over τ, fitted against the policy's entropy
  5. entropy  per-token entropy buckets and fits, and the RS-vs-TO decision-boundary check
  6. rl       short GRPO runs side by side (``bench_rl``): none, to-ce, rs-ce, rs-e2e_tv, rs-online-ce
  7. report   PNG plots, ``report.md`` and ``summary.json`` with a held / not-held verdict per claim

A stage is reused when its output exists and the key it was computed with (its parameters, the policy's
weights files and the keys of the stages it depends on) is unchanged; keys live in ``.stages/``.
The verdict rules are in :func:`evaluate_claims` and are printed in the report next to each number.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bebop.config import positive
from bebop.errors import BebopError
from bebop.experiments.analysis import DEFAULT_TEMPERATURES, RULE_NAMES, entropy_series, step_series, sweep_series
from bebop.experiments.bench_rl import METHODS
from bebop.models.policy import ModelConfig
from bebop.tasks import get_task
from bebop.training.sft import sft_recipe

__all__ = ["CLAIMS", "QUICK", "DemoConfig", "evaluate_claims", "quick_config", "run_demo"]

RL_METHODS = "none,to-ce,rs-ce,rs-e2e_tv,rs-online-ce"
PLOTS = {
    "entropy_accept": "entropy_accept.png",        # accept length vs mean entropy over τ (engine), fitted slopes
    "entropy_tokens": "entropy_tokens.png",        # per-token entropy buckets (teacher-forced), fitted slopes
    "entropy_rl": "entropy_rl.png",                # per RL step, per method
    "temperature_sweep": "temperature_sweep.png",  # RS vs TO over τ
    "alpha_per_step": "alpha_per_step.png",        # α_k per loss, RS and TO
    "rl_accept_length": "rl_accept_length.png",    # accept length over RL steps
    "step_times": "step_times.png",                # step / rollout / train seconds per method
}
CLAIMS = {
    1: "Acceptance falls linearly with policy entropy under TO and under RS with CE heads (slope ≈ −1.68 accept "
       "length per nat); with e2e-TV heads under RS the slope is ≈ −0.06.",
    2: "RS beats TO at high entropy / temperature; TO and RS-with-CE degrade during RL, RS-with-TV stays flat.",
    3: "e2e TV beats TV > reverse KL > forward KL ≈ CE in RS acceptance (+3 to +8 points at γ = 3).",
    4: "Frozen pre-RL e2e-TV heads need no online updates; online CE updates drag acceptance down.",
    5: "MTP rollouts cut RL step time 1.5–1.8× (rollout phase up to 2.4×) with identical output distribution.",
}
# thresholds of the verdict rules (stated in the report)
SLOPE_FALLS = -0.5        # claim 1: "falls with entropy" = slope ≤ −0.5 accept length / nat
FLAT_RATIO = 0.25         # claim 1: e2e-TV RS "flat" = |slope| ≤ 0.25 × |CE-RS slope| (paper: 0.04×)
DRIFT = 0.02              # claims 2, 4: "degrades" = last-5 vs first-5 accept length ≤ −2 %; "flat" = |drift| < 2 %
LOSS_POINTS = 0.03        # claim 3: e2e TV − CE ≥ +3 points of mean RS α over the γ draft steps
STEP_SPEEDUP = 1.5        # claim 5: median RL step time of none / rs-e2e_tv ≥ 1.5


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    task: str = "arith"
    model: str | None = None           # existing SFT policy directory: skip the SFT stage
    fresh: bool = False                # redo every stage instead of reusing cached outputs
    seed: int = 0
    gamma: int = 3                     # deployed draft length (measurements and RL)
    temperature: float = 1.0           # rollout temperature (head training, losses, entropy, RL)
    max_new_tokens: int = 96
    # 1. SFT
    sft_steps: int | None = None       # None: the task's SFT recipe (training.sft.SFT_RECIPES)
    sft_minutes: float | None = None   # optional wall-clock cap; off, so the run is the same on any machine
    sft_eval_samples: int = 128
    policy: ModelConfig = field(default_factory=ModelConfig)
    # 2. heads: init_loss warm start, then ce / e2e_tv (+ extra_losses) from it
    gamma_train: int = 3
    init_loss: str = "fkl"
    init_steps: int = 600              # init_* and head_* as train-mtp's warm stage and main stage
    init_lr: float = 5e-3
    head_steps: int = 200
    head_lr: float = 1e-3
    data_samples: int = 2048
    heldout_samples: int = 128
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
    rl_lr: float = 2e-4                # 5e-4 made reward fall within 12 steps
    rl_rollout_batch: int = 0          # rows per engine call in RL rollouts (0 = all prompts × group at once)
    online_every: int = 4
    online_steps: int = 20
    rl_eval_samples: int = 0

    def __post_init__(self) -> None:
        get_task(self.task)
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

    def method_list(self) -> list[str]:
        return [m.strip() for m in self.rl_methods.split(",") if m.strip()]

    def loss_list(self) -> list[str]:
        """Heads fine-tuned from the warm start: ce, e2e_tv, then the extra losses."""
        extra = [x.strip() for x in self.extra_losses.split(",") if x.strip()]
        return list(dict.fromkeys(["ce", "e2e_tv", *extra]))


# a CI smoke test: every stage runs and every file is written; the numbers mean nothing
QUICK: dict = dict(
    policy=ModelConfig(num_layers=2, hidden_size=64, num_heads=2, num_kv_heads=1, intermediate_size=128),
    sft_steps=150, sft_eval_samples=16, max_new_tokens=32, init_steps=20, head_steps=10,
    data_samples=64, heldout_samples=16, loss_prompts=8, temperatures=(0.5, 1.0, 1.5), sweep_prompts=8,
    entropy_samples=32, rl_steps=3, rl_prompts=4, rl_group=4, online_every=1, online_steps=2,
)


def quick_config(**overrides) -> DemoConfig:
    """The ``--quick`` preset, with ``overrides`` on top."""
    return DemoConfig(**{**QUICK, **overrides})


# --------------------------------------------------------------------------------------------------
# Stage cache
# --------------------------------------------------------------------------------------------------


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _dir_fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of a directory's files: changes when the checkpoint is re-written."""
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


class _Stages:
    """Runs stages, reusing an output when its key file in ``.stages/`` matches the current key."""

    def __init__(self, out: Path, fresh: bool, console: Console):
        self.dir = out / ".stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fresh, self.console = fresh, console
        self.keys: dict[str, object] = {}
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def run(self, name: str, title: str, marker: Path, params: Mapping, deps: Sequence[str],
            compute: Callable[[], None]) -> None:
        key = _jsonable({"params": params, "deps": {d: self.keys[d] for d in deps}})
        key_file = self.dir / f"{name}.json"
        self.console.rule(f"[bold]{title}")
        if not self.fresh and marker.exists() and key_file.is_file() and json.loads(key_file.read_text()) == key:
            self.console.print(f"reusing [bold]{marker}[/] (cached; --fresh to redo)")
            self.cached[name], self.seconds[name] = True, 0.0
        else:
            key_file.unlink(missing_ok=True)
            t0 = time.perf_counter()
            compute()
            self.seconds[name] = time.perf_counter() - t0
            self.cached[name] = False
            key_file.write_text(json.dumps(key, indent=1))
            self.console.print(f"[green]done[/] {title} in {self.seconds[name]:.0f} s")
        self.keys[name] = key


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Run (or continue) the demo into ``cfg.out``; returns the summary written to ``summary.json``."""
    import torch

    from bebop.experiments.analysis import EntropyConfig, SweepConfig, entropy_analysis, temperature_sweep
    from bebop.experiments.bench_rl import RLBenchConfig, bench_rl
    from bebop.experiments.measure import measure_acceptance
    from bebop.models.mtp import load_head
    from bebop.models.policy import load_policy
    from bebop.rl.config import RLConfig
    from bebop.training.sft import SFTConfig, train_sft
    from bebop.training.train_mtp import TrainMTPConfig, train_mtp

    console = console or Console()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    if cfg.fresh:
        for name in (".stages", "policy", "policy.sft.jsonl", "heads", "losses.json", "sweep.json", "entropy.json",
                     "rl", "plots", "report.md", "summary.json"):
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out, cfg.fresh, console)

    # 1. policy
    if cfg.model:
        policy = Path(cfg.model)
        if not policy.is_dir():
            raise BebopError(f"model directory not found: {policy}")
        console.rule("[bold]1/7 policy")
        console.print(f"using the existing policy [bold]{policy}[/] (SFT skipped)")
        stages.keys["sft"] = str(policy)
        stages.seconds["sft"], stages.cached["sft"] = 0.0, True
    else:
        policy = out / "policy"
        sft_cfg = SFTConfig(task=cfg.task, out=str(policy), steps=cfg.sft_steps, max_minutes=cfg.sft_minutes,
                            eval_samples=cfg.sft_eval_samples, seed=cfg.seed, model=cfg.policy)
        cap = f", ≤ {cfg.sft_minutes:g} min" if cfg.sft_minutes is not None else ""
        stages.run("sft", f"1/7 SFT policy ({cfg.sft_steps} steps{cap})",
                   policy / "sft_summary.json", asdict(sft_cfg), [], lambda: train_sft(sft_cfg))
    stages.keys["sft"] = {"key": stages.keys["sft"], "weights": _dir_fingerprint(policy)}

    # 2. heads
    heads_dir = out / "heads"
    init_name = f"{cfg.init_loss} (warm start)"
    head_dirs: dict[str, Path] = {init_name: heads_dir / f"{cfg.init_loss}_init",
                                  **{loss: heads_dir / loss for loss in cfg.loss_list()}}
    common = dict(model=str(policy), task=cfg.task, gamma_train=cfg.gamma_train, temperature=cfg.temperature,
                  data_samples=cfg.data_samples, heldout_samples=cfg.heldout_samples,
                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    head_cfgs = {"head_init": TrainMTPConfig(out=str(head_dirs[init_name]), loss=cfg.init_loss, steps=cfg.init_steps,
                                             lr=cfg.init_lr, warm_steps=0, **common)}
    for loss in cfg.loss_list():
        head_cfgs[f"head_{loss}"] = TrainMTPConfig(out=str(head_dirs[loss]), loss=loss, steps=cfg.head_steps,
                                                   lr=cfg.head_lr, init=str(head_dirs[init_name]), **common)
    for name, hc in head_cfgs.items():
        how = f"{hc.steps} steps, lr {hc.lr:g}" + (f", from the {cfg.init_loss} head" if hc.init else ", warm start")
        stages.run(name, f"2/7 MTP head: {hc.loss} ({how})", Path(hc.out) / "train_mtp_summary.json",
                   asdict(hc), ["sft"] if name == "head_init" else ["sft", "head_init"], lambda hc=hc: train_mtp(hc))

    model, tokenizer = load_policy(policy)
    heads = {k: load_head(d, model).eval() for k, d in head_dirs.items()}
    ce_e2e = {"ce": heads["ce"], "e2e_tv": heads["e2e_tv"]}
    torch.manual_seed(cfg.seed)

    # 3. per-loss acceptance at the rollout temperature
    def losses_stage() -> None:
        res = {}
        for name, head in heads.items():
            row: dict = {}
            for rule, tag in (("rejection", "rs"), ("target_only", "to")):
                r = measure_acceptance(model, tokenizer, head, cfg.task, rule, cfg.temperature, cfg.gamma,
                                       cfg.loss_prompts, 32, cfg.max_new_tokens, cfg.seed + 99_991)
                row[f"alpha_{tag}"], row[f"accept_length_{tag}"] = r["alpha"], r["accept_length"]
                row["entropy"] = r["entropy"]
            res[name] = row
            console.print(f"{name}: accept length RS {row['accept_length_rs']:.3f}, TO {row['accept_length_to']:.3f}")
        _write_json(out / "losses.json", res)

    stages.run("losses", f"3/7 α per step per loss (τ = {cfg.temperature:g}, {cfg.loss_prompts} prompts)",
               out / "losses.json", dict(gamma=cfg.gamma, temperature=cfg.temperature, prompts=cfg.loss_prompts,
                                         max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
               ["sft", *head_cfgs], losses_stage)

    # 4. temperature sweep
    def sweep_stage() -> None:
        sweep_cfg = SweepConfig(task=cfg.task, temperatures=cfg.temperatures, gamma=cfg.gamma,
                                prompts=cfg.sweep_prompts, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        _write_json(out / "sweep.json", temperature_sweep(model, tokenizer, ce_e2e, sweep_cfg))

    stages.run("sweep", f"4/7 temperature sweep τ ∈ {{{', '.join(f'{t:g}' for t in cfg.temperatures)}}}",
               out / "sweep.json", dict(temperatures=cfg.temperatures, gamma=cfg.gamma, prompts=cfg.sweep_prompts,
                                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
               ["sft", "head_init", "head_ce", "head_e2e_tv"], sweep_stage)

    # 5. per-token entropy analysis
    def entropy_stage() -> None:
        ent_cfg = EntropyConfig(task=cfg.task, samples=cfg.entropy_samples, temperature=cfg.temperature,
                                gamma=cfg.gamma, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        _write_json(out / "entropy.json", entropy_analysis(model, tokenizer, ce_e2e, ent_cfg))

    stages.run("entropy", f"5/7 per-token entropy analysis ({cfg.entropy_samples} samples)", out / "entropy.json",
               dict(samples=cfg.entropy_samples, temperature=cfg.temperature, gamma=cfg.gamma,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
               ["sft", "head_init", "head_ce", "head_e2e_tv"], entropy_stage)

    # 6. RL side by side
    rl_cfg = RLBenchConfig(
        model=str(policy), mtp=str(head_dirs["e2e_tv"]), mtp_ce=str(head_dirs["ce"]), task=cfg.task,
        out=str(out / "rl"), methods=cfg.rl_methods, steps=cfg.rl_steps, eval_samples=cfg.rl_eval_samples,
        rl=RLConfig(mtp_strategy="none", task=cfg.task, gamma=cfg.gamma, prompts_per_step=cfg.rl_prompts,
                    group_size=cfg.rl_group, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                    lr=cfg.rl_lr, rollout_batch=cfg.rl_rollout_batch, online_every=cfg.online_every,
                    online_steps=cfg.online_steps,
                    checkpoint_every=cfg.rl_steps, eval_samples=cfg.rl_eval_samples, seed=cfg.seed),
    )
    rl_cfg.method_list()
    stages.run("rl", f"6/7 RL: {cfg.rl_steps} GRPO steps × {len(cfg.method_list())} methods "
               f"({cfg.rl_prompts} prompts × {cfg.rl_group} samples per step)", out / "rl" / "bench_rl.json",
               asdict(rl_cfg), ["sft", "head_ce", "head_e2e_tv"], lambda: bench_rl(rl_cfg, console=console))

    # 7. plots, claims, report
    console.rule("[bold]7/7 report")
    losses = json.loads((out / "losses.json").read_text())
    sweep = json.loads((out / "sweep.json").read_text())
    ent = json.loads((out / "entropy.json").read_text())
    rl = json.loads((out / "rl" / "bench_rl.json").read_text())["results"]
    plots = write_plots(out / "plots", losses, sweep, ent, rl, cfg)
    claims = evaluate_claims(losses, sweep, ent, rl)
    sft_summary = _read_json(policy / "sft_summary.json")
    summary = {
        "claims": claims,
        "policy": {"dir": str(policy), "sft_steps": sft_summary.get("steps"),
                   "sft_seconds": sft_summary.get("train_seconds"), "eval": sft_summary.get("eval")},
        "heads": {k: {"dir": str(d), "heldout_alpha": _read_json(d / "train_mtp_summary.json")
                                  .get("heldout_alpha")} for k, d in head_dirs.items()},
        "stages": {k: {"seconds": stages.seconds[k], "cached": stages.cached[k]} for k in stages.seconds},
        "total_seconds": time.perf_counter() - t_start,
        "plots": {k: str(p.relative_to(out)) for k, p in plots.items()},
        "config": _jsonable(asdict(cfg)),
    }
    _write_json(out / "summary.json", summary)
    (out / "report.md").write_text(render_report(summary, losses, sweep, ent, rl, cfg))
    print_claims(claims, console)
    console.print(f"wrote [bold]{out / 'report.md'}[/], [bold]{out / 'summary.json'}[/] and "
                  f"{len(plots)} plots in {summary['total_seconds']:.0f} s")
    return summary


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _rl_runs(rl: Mapping) -> dict[str, list]:
    return {m: r["per_step"] for m, r in rl.items()}


def write_plots(plot_dir: Path, losses: Mapping, sweep: Mapping, ent: Mapping, rl: Mapping,
                cfg: DemoConfig) -> dict[str, Path]:
    from bebop.experiments.plots import (
        plot_alpha_per_step,
        plot_entropy_accept,
        plot_rl_accept_length,
        plot_step_times,
        plot_temperature_sweep,
    )

    taus = ", ".join(f"{t:g}" for t in sweep["temperatures"])
    paths = {
        "entropy_accept": plot_entropy_accept(
            sweep_series(sweep), plot_dir / PLOTS["entropy_accept"],
            title=f"Accept length vs entropy, one point per τ ∈ {{{taus}}}"),
        "entropy_tokens": plot_entropy_accept(
            entropy_series(ent), plot_dir / PLOTS["entropy_tokens"],
            title=f"Accept length vs entropy (per-token buckets, τ = {cfg.temperature:g})"),
        "temperature_sweep": plot_temperature_sweep(sweep, plot_dir / PLOTS["temperature_sweep"]),
        "alpha_per_step": plot_alpha_per_step(losses, plot_dir / PLOTS["alpha_per_step"],
                                              title=f"Per-step acceptance α_k by loss (τ = {cfg.temperature:g})"),
        "rl_accept_length": plot_rl_accept_length(_rl_runs(rl), plot_dir / PLOTS["rl_accept_length"]),
        "step_times": plot_step_times(median_times(rl), plot_dir / PLOTS["step_times"],
                                      keys=("median_step_s", "median_rollout_s", "median_train_s"),
                                      title="RL step time per method (median over steps ≥ 1)"),
    }
    rl_series = step_series(_rl_runs(rl))
    if rl_series:
        paths["entropy_rl"] = plot_entropy_accept(rl_series, plot_dir / PLOTS["entropy_rl"],
                                                  title="Accept length vs policy entropy (one point per RL step)")
    return dict(sorted(paths.items(), key=lambda kv: list(PLOTS).index(kv[0])))


# --------------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------------


def _all(*conds) -> bool:
    """True iff every condition is True (a condition is None when its figure could not be measured)."""
    return all(c is True for c in conds)


def _cmp(a, op: str, b) -> bool | None:
    if a is None or b is None:
        return None
    return {"<=": a <= b, "<": a < b, ">=": a >= b, ">": a > b}[op]


def _get(d: Mapping | None, *keys):
    for k in keys:
        if not isinstance(d, Mapping) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _median_step(rows: Sequence[Mapping], key: str) -> float | None:
    vals = [r[key] for r in (rows[1:] or rows) if r.get(key) is not None]  # step 0 warms up
    return statistics.median(vals) if vals else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def median_times(rl: Mapping) -> dict[str, dict]:
    """Per method, the median seconds per RL step of step, rollout and train time (steps ≥ 1): robust to the
    spikes a shared CPU adds, unlike ``bench_rl``'s means."""
    return {m: {f"median_{k}": _median_step(v["per_step"], k) for k in ("step_s", "rollout_s", "train_s")}
            for m, v in rl.items()}


def evaluate_claims(losses: Mapping, sweep: Mapping, ent: Mapping, rl: Mapping) -> list[dict]:
    """One record per claim of DESIGN §6: ``{"id", "claim", "figures", "rule", "held", "verdict"}``.
    A figure that could not be measured (e.g. a method that did not run) makes its claim ``not held``."""
    claims = []

    def add(cid: int, figures: dict, rule: str, held: bool) -> None:
        claims.append({"id": cid, "claim": CLAIMS[cid], "figures": figures, "rule": rule, "held": bool(held),
                       "verdict": "held" if held else "not held"})

    sh = sweep["heads"]
    # 1 — slopes of accept length against the policy's mean entropy over the temperature sweep (engine-measured)
    slope = {f"{h} {tag}": _get(sh, h, rule, "fit", "slope") for h in sh for rule, tag in RULE_NAMES.items()}
    r = {f"{h} {tag}": _get(sh, h, rule, "fit", "r") for h in sh for rule, tag in RULE_NAMES.items()}
    token_slope = {f"{h} {tag}": _get(ent, "heads", h, rule, "fit", "slope")
                   for h in ent.get("heads", {}) for rule, tag in RULE_NAMES.items()}
    rl_fits = {m: s["fit"]["slope"] for m, s in step_series(_rl_runs(rl)).items()}
    ce_rs, ce_to, tv_rs = slope.get("ce RS"), slope.get("ce TO"), slope.get("e2e_tv RS")
    flat = None if ce_rs is None or tv_rs is None else abs(tv_rs) <= FLAT_RATIO * abs(ce_rs)
    add(1, {"slope_per_nat_sweep": slope, "r_sweep": r, "slope_per_nat_tokens": token_slope,
            "slope_per_nat_rl_steps": rl_fits, "paper": {"ce RS": -1.68, "TO": -1.68, "e2e_tv RS": -0.06}},
        f"over the temperature sweep: slope(ce TO) ≤ {SLOPE_FALLS} and slope(ce RS) ≤ {SLOPE_FALLS} accept length "
        f"per nat, and |slope(e2e_tv RS)| ≤ {FLAT_RATIO} × |slope(ce RS)|",
        _all(_cmp(ce_to, "<=", SLOPE_FALLS), _cmp(ce_rs, "<=", SLOPE_FALLS), flat))

    # 2 — RS vs TO at the highest τ, and accept-length drift over RL
    hi = max(range(len(sweep["temperatures"])), key=lambda i: sweep["temperatures"][i])
    at_hi = {h: {"RS": _get(sh, h, "rejection", "accept_length")[hi], "TO": _get(sh, h, "target_only",
                                                                                  "accept_length")[hi]} for h in sh}
    rs_wins = _all(*(_cmp(v["RS"], ">", v["TO"]) for v in at_hi.values()))
    drift = {m: rl.get(m, {}).get("drift_last5_vs_first5") for m in ("to-ce", "rs-ce", "rs-e2e_tv")}
    degrade = _all(_cmp(drift["to-ce"], "<=", -DRIFT), _cmp(drift["rs-ce"], "<=", -DRIFT))
    tv_flat = drift["rs-e2e_tv"] is not None and abs(drift["rs-e2e_tv"]) < DRIFT
    add(2, {"tau_max": sweep["temperatures"][hi], "accept_length_at_tau_max": at_hi, "rs_beats_to_at_tau_max": rs_wins,
            "rl_drift_last5_vs_first5": drift, "ce_degrades": degrade, "e2e_tv_flat": tv_flat,
            "entropy_first5_last5": {m: [rl[m].get("entropy_first5"), rl[m].get("entropy_last5")]
                                     for m in drift if m in rl}},
        f"RS accept length > TO at the highest τ for both heads, and over RL (mean of the last 5 steps vs the first "
        f"5) to-ce and rs-ce drift ≤ −{DRIFT:.0%} while |drift of rs-e2e_tv| < {DRIFT:.0%}",
        _all(rs_wins, degrade, tv_flat))

    # 3 — RS acceptance per loss at γ = 3 through the engine
    mean_alpha = {k: (sum(v["alpha_rs"]) / len(v["alpha_rs"]) if v.get("alpha_rs") else None)
                  for k, v in losses.items()}
    gain = None if mean_alpha.get("e2e_tv") is None or mean_alpha.get("ce") is None \
        else mean_alpha["e2e_tv"] - mean_alpha["ce"]
    same_budget = [k for k in losses if "warm start" not in k and k != "e2e_tv"]
    best = _all(*(_cmp(mean_alpha["e2e_tv"], ">=", mean_alpha[k]) for k in same_budget)) if "e2e_tv" in losses \
        else False
    add(3, {"mean_alpha_rs": mean_alpha, "alpha_rs": {k: v.get("alpha_rs") for k, v in losses.items()},
            "accept_length_rs": {k: v.get("accept_length_rs") for k, v in losses.items()},
            "e2e_tv_minus_ce_points": None if gain is None else 100 * gain, "paper_points": [3, 8]},
        f"mean RS α over the γ draft steps at the rollout τ: e2e_tv − ce ≥ +{LOSS_POINTS * 100:.0f} points and "
        f"e2e_tv ≥ every other loss trained with the same budget ({', '.join(same_budget) or 'none'}; the warm-start "
        f"head is shown, not ranked)",
        _all(_cmp(gain, ">=", LOSS_POINTS), best))

    # 4 — frozen e2e-TV vs online CE over RL
    last5 = {m: rl.get(m, {}).get("accept_length_last5") for m in ("rs-e2e_tv", "rs-ce", "rs-online-ce")}
    drift4 = {m: rl.get(m, {}).get("drift_last5_vs_first5") for m in last5}
    add(4, {"accept_length_last5": last5, "drift_last5_vs_first5": drift4},
        f"over RL: accept length (mean of last 5 steps) of frozen rs-e2e_tv ≥ rs-online-ce, rs-online-ce < frozen "
        f"rs-ce (online CE updates drag it down), and rs-e2e_tv drift > −{DRIFT:.0%}",
        _all(_cmp(last5["rs-e2e_tv"], ">=", last5["rs-online-ce"]), _cmp(last5["rs-online-ce"], "<", last5["rs-ce"]),
             _cmp(drift4["rs-e2e_tv"], ">", -DRIFT)))

    # 5 — RL step time
    base = rl.get("none", {})
    med = median_times(rl)
    speed = {m: {"step": _ratio(_get(med, "none", "median_step_s"), v["median_step_s"]),
                 "rollout": _ratio(_get(med, "none", "median_rollout_s"), v["median_rollout_s"])}
             for m, v in med.items()}
    main = _get(speed, "rs-e2e_tv", "step")
    add(5, {"median_speedup": speed, "mean_speedup": {m: {"step": v.get("step_speedup"),
                                                           "rollout": v.get("rollout_speedup")} for m, v in rl.items()},
            "median_seconds": med, "reward_first5": {m: rl[m].get("reward_first5") for m in ("none", "rs-e2e_tv")
                                                     if m in rl},
            "none_ran": bool(base), "paper": {"step": [1.5, 1.8], "rollout_max": 2.4}},
        f"median RL step time (steps ≥ 1) of none ÷ rs-e2e_tv ≥ {STEP_SPEEDUP} (identical output distribution is "
        "checked by the statistical tests, not here)",
        _all(_cmp(main, ">=", STEP_SPEEDUP)))
    return claims


def _fmt(v, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def claim_headline(c: Mapping) -> str:
    """The measured number(s) of a claim, one line."""
    f = c["figures"]
    if c["id"] == 1:
        s = f["slope_per_nat_sweep"]
        return (f"slope/nat (τ sweep): ce TO {_fmt(s.get('ce TO'), '+.2f')}, ce RS {_fmt(s.get('ce RS'), '+.2f')}, "
                f"e2e_tv RS {_fmt(s.get('e2e_tv RS'), '+.2f')}; per token: ce TO "
                f"{_fmt(f['slope_per_nat_tokens'].get('ce TO'), '+.2f')}, ce RS "
                f"{_fmt(f['slope_per_nat_tokens'].get('ce RS'), '+.2f')}, e2e_tv RS "
                f"{_fmt(f['slope_per_nat_tokens'].get('e2e_tv RS'), '+.2f')}")
    if c["id"] == 2:
        a = f["accept_length_at_tau_max"]
        d = f["rl_drift_last5_vs_first5"]
        return (f"τ={f['tau_max']:g}: " + ", ".join(f"{h} RS {_fmt(v['RS'], '.2f')} vs TO {_fmt(v['TO'], '.2f')}"
                                                   for h, v in a.items())
                + "; RL drift " + ", ".join(f"{m} {_fmt(v, '+.1%')}" for m, v in d.items()))
    if c["id"] == 3:
        m = f["mean_alpha_rs"]
        return ", ".join(f"{k} {_fmt(v)}" for k, v in m.items()) + \
            f" (e2e_tv − ce = {_fmt(f['e2e_tv_minus_ce_points'], '+.1f')} points)"
    if c["id"] == 4:
        a = f["accept_length_last5"]
        return "accept length last 5 steps: " + ", ".join(f"{k} {_fmt(v, '.2f')}" for k, v in a.items())
    s = f["median_speedup"].get("rs-e2e_tv", {})
    return (f"rs-e2e_tv vs none: step {_fmt(s.get('step'), '.2f')}×, rollout {_fmt(s.get('rollout'), '.2f')}× "
            f"(medians); means: step {_fmt(f['mean_speedup'].get('rs-e2e_tv', {}).get('step'), '.2f')}×")


def print_claims(claims: Sequence[Mapping], console: Console) -> None:
    table = Table(title="DESIGN §6 claims, measured here")
    for c in ("#", "measured", "verdict"):
        table.add_column(c)
    for c in claims:
        color = "green" if c["held"] else "red"
        table.add_row(str(c["id"]), claim_headline(c), f"[{color}]{c['verdict']}[/]")
    console.print(table)


def claims_table(claims: Sequence[Mapping]) -> str:
    """Markdown table of the claims: claim, measured figure, rule, verdict."""
    lines = ["| # | claim (DESIGN §6) | measured here | rule | verdict |", "|---|---|---|---|---|"]
    for c in claims:
        verdict = "**held**" if c["held"] else "**not held**"
        cells = [str(c["id"]), c["claim"], claim_headline(c), c["rule"], verdict]
        lines.append("| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


def _sft_warning(summary: Mapping, cfg: DemoConfig) -> list[str]:
    """A warning paragraph when SFT was cut by its wall-time cap well before its steps (e.g. a busy CPU)."""
    pol = summary["policy"]
    steps = pol.get("sft_steps")
    if cfg.model or cfg.sft_minutes is None or steps is None or steps >= 0.8 * cfg.sft_steps:
        return []
    acc = (pol.get("eval") or {}).get("accuracy")
    return [f"**Warning:** SFT stopped at its {cfg.sft_minutes:g}-minute cap after {steps} of {cfg.sft_steps} steps "
            f"(accuracy {_fmt(acc)}); on a busy CPU try `OMP_NUM_THREADS=1`, a larger `sft_minutes`, or `--model`.",
            ""]


def render_report(summary: Mapping, losses: Mapping, sweep: Mapping, ent: Mapping, rl: Mapping,
                  cfg: DemoConfig) -> str:
    pol = summary["policy"]
    ev = pol.get("eval") or {}
    stage_lines = ", ".join(f"{k} {v['seconds']:.1f} s" + (" (cached)" if v["cached"] else "")
                            for k, v in summary["stages"].items())
    lines = [
        "# Bebop demo report",
        "",
        f"Task `{cfg.task}`, γ = {cfg.gamma}, rollout τ = {cfg.temperature:g}; accept lengths count the bonus token "
        "(tokens per target forward). Everything below was measured in this run on this machine; toy scale, so "
        "claims may fail here that hold at scale.",
        "",
        f"Policy `{pol['dir']}`: {pol.get('sft_steps')} SFT steps, accuracy τ=1 {_fmt(ev.get('accuracy'))}, "
        f"greedy {_fmt(ev.get('greedy_accuracy'))}, mean entropy {_fmt(ev.get('entropy'))} nats/token. "
        f"Heads: `{cfg.init_loss}` warm start ({cfg.init_steps} steps, lr {cfg.init_lr:g}), then "
        f"{', '.join(cfg.loss_list())} fine-tuned from it ({cfg.head_steps} steps each, lr {cfg.head_lr:g}, same "
        "data and seed).",
        "",
        *_sft_warning(summary, cfg),
        f"Wall time {summary['total_seconds']:.0f} s: {stage_lines}.",
        "",
        "## Claims",
        "",
        claims_table(summary["claims"]),
        "",
        "## Accept length vs policy entropy",
        "",
        "One point per temperature (through the engine); lines are least-squares fits, slope in the legend.",
        "",
        f"![entropy vs accept length]({summary['plots']['entropy_accept']})",
        "",
        f"![per-token buckets]({summary['plots']['entropy_tokens']})",
        "",
    ]
    if "entropy_rl" in summary["plots"]:
        lines += [f"![per RL step]({summary['plots']['entropy_rl']})", ""]
    lines += ["| head | rule | slope / nat over τ (r) | slope / nat per token (r) | mean accept length per token |",
              "|---|---|---|---|---|"]
    for h in sweep["heads"]:
        for rule, tag in RULE_NAMES.items():
            fs, ft = sweep["heads"][h][rule]["fit"], _get(ent, "heads", h, rule, "fit") or {}
            lines.append(f"| {h} | {tag} | {_fmt(fs['slope'], '+.2f')} ({_fmt(fs['r'], '+.2f')}) | "
                         f"{_fmt(ft.get('slope'), '+.2f')} ({_fmt(ft.get('r'), '+.2f')}) | "
                         f"{_fmt(_get(ent, 'heads', h, rule, 'mean_accept_length'))} |")
    lines += ["", "## RS vs TO over temperature", "", f"![temperature sweep]({summary['plots']['temperature_sweep']})",
              "", "| head | rule | " + " | ".join(f"τ={t:g}" for t in sweep["temperatures"]) + " |",
              "|---|---|" + "---|" * len(sweep["temperatures"])]
    for h, row in sweep["heads"].items():
        for rule, tag in RULE_NAMES.items():
            lines.append(f"| {h} | {tag} | " + " | ".join(_fmt(v) for v in row[rule]["accept_length"]) + " |")
    ent0 = next(iter(sweep["heads"].values()))["rejection"]["entropy"]
    lines.append("| policy entropy | | " + " | ".join(_fmt(v) for v in ent0) + " |")
    lines += ["", "## α per draft step per loss", "", f"![alpha per step]({summary['plots']['alpha_per_step']})", "",
              "| head | α RS | accept length RS | α TO | accept length TO |", "|---|---|---|---|---|"]
    for k, v in losses.items():
        lines.append(f"| {k} | {' '.join(_fmt(a) for a in v['alpha_rs'])} | {_fmt(v['accept_length_rs'])} | "
                     f"{' '.join(_fmt(a) for a in v['alpha_to'])} | {_fmt(v['accept_length_to'])} |")
    lines += ["", "## RL", "", f"![accept length over RL]({summary['plots']['rl_accept_length']})", "",
              f"![step times]({summary['plots']['step_times']})", "",
              "| method | median step s | median rollout s | step × (median) | rollout × (median) | accept length "
              "first 5 → last 5 | reward first 5 → last 5 | entropy first 5 → last 5 |",
              "|---|---|---|---|---|---|---|---|"]
    c5 = next(c for c in summary["claims"] if c["id"] == 5)["figures"]
    for m, r in rl.items():
        med, sp = c5["median_seconds"][m], c5["median_speedup"][m]
        lines.append(f"| {m} | {_fmt(med['median_step_s'])} | {_fmt(med['median_rollout_s'])} | "
                     f"{_fmt(sp['step'], '.2f')} | "
                     f"{_fmt(sp['rollout'], '.2f')} | {_fmt(r.get('accept_length_first5'))} → "
                     f"{_fmt(r.get('accept_length_last5'))} | {_fmt(r['reward_first5'])} → {_fmt(r['reward_last5'])} | "
                     f"{_fmt(r['entropy_first5'])} → {_fmt(r['entropy_last5'])} |")
    lines += ["", "Files: `summary.json` (per claim: figures, rule, verdict), `losses.json`, `sweep.json`, "
              "`entropy.json`, `rl/bench_rl.json` (+ one run directory per method), `heads/`, `plots/`.", ""]
    return "\n".join(lines)
