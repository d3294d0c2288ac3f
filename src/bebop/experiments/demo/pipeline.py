"""The demo's stages, run in order into ``cfg.out`` with a cache: a stage is reused when its output exists and
the key it was computed with (its parameters, the policy's weights files and the keys of the stages it depends
on) is unchanged; keys live in ``.stages/``. A re-run continues after a crash; ``fresh`` redoes everything."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from bebop.errors import BebopError
from bebop.experiments.demo.claims import VERDICT_RULE, evaluate_claims
from bebop.experiments.demo.config import DemoConfig, derive, head_configs, head_dirs, rl_config, sft_config
from bebop.experiments.demo.report import Results, print_claims, render_report, write_plots
from bebop.io import atomic_write_json, atomic_write_text

__all__ = ["run_demo"]

OUTPUTS = (".stages", "policy", "policy.sft.jsonl", "heads", "losses.json", "sweep.json", "entropy.json", "rl",
           "rl_heldout.json", "ablations", "plots", "report.md", "summary.json")
MEASURE_BATCH = 32        # prompts per engine call when measuring heads (losses, sweep); the units are prompts
LOSS_SEED_OFFSET = 99_991  # the per-loss measurement draws prompts unseen in head training
RULES = {"rejection": "rs", "target_only": "to"}
HEAD_OF = {"mtp": "e2e_tv", "mtp_ce": "ce"}  # an RL method's head (``bench_rl.METHODS``) → the demo head it starts as


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _dir_fingerprint(path: Path) -> list:
    """Names, sizes and mtimes of a directory's files: changes when the checkpoint is re-written."""
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


class _Stages:
    """Runs stages, reusing an output when its key file in ``.stages/`` matches the current key. A stage that is
    computed also leaves a run mark (``.stages/<name>.run``) that enters the key its dependants see, so redoing a
    stage (its output was deleted) redoes every stage built on it, even when its settings did not change."""

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
            (self.dir / f"{name}.run").write_text(str(time.time_ns()))
            key_file.write_text(json.dumps(key, indent=1))
            self.console.print(f"[green]done[/] {title} in {self.seconds[name]:.0f} s")
        mark = self.dir / f"{name}.run"
        self.keys[name] = {"key": key, "run": mark.read_text()} if mark.is_file() else key

    def skip(self, name: str, key: object) -> None:
        """Record a stage that did not run (its input was given), under ``key``."""
        self.keys[name] = key
        self.seconds[name], self.cached[name] = 0.0, True


@dataclass
class _Demo:
    """One demo run: its settings, output directory, stage cache and console; filled in as stages finish."""

    cfg: DemoConfig
    out: Path
    stages: _Stages
    console: Console
    policy: Path = Path()
    head_dirs: dict[str, Path] = field(default_factory=dict)
    head_cfgs: dict = field(default_factory=dict)


def run_demo(cfg: DemoConfig, console: Console | None = None) -> dict:
    """Run (or continue) the demo into ``cfg.out``; returns the summary written to ``summary.json``."""
    console = console or Console()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    if cfg.fresh:
        for name in OUTPUTS:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    demo = _Demo(cfg, out, _Stages(out, cfg.fresh, console), console)
    _policy_stage(demo)
    _heads_stage(demo)
    _measure_stages(demo)
    _rl_stage(demo)
    _rl_heldout_stage(demo)
    ablations = _ablation_stages(demo) if cfg.ablation_list() else None
    return _report_stage(demo, t_start, ablations)


def _policy_stage(demo: _Demo) -> None:
    """1. The SFT policy, or the existing one given as ``model``."""
    cfg, stages = demo.cfg, demo.stages
    if cfg.model:
        demo.policy = Path(cfg.model)
        if not demo.policy.is_dir():
            raise BebopError(f"model directory not found: {demo.policy}")
        demo.console.rule("[bold]1/7 policy")
        demo.console.print(f"using the existing policy [bold]{demo.policy}[/] (SFT skipped)")
        stages.skip("sft", str(demo.policy))
    else:
        from bebop.training.sft import train_sft

        demo.policy = demo.out / "policy"
        sft_cfg = sft_config(cfg, demo.policy)
        cap = f", ≤ {cfg.sft_minutes:g} min" if cfg.sft_minutes is not None else ""
        stages.run("sft", f"1/7 SFT policy ({cfg.sft_steps} steps{cap})",
                   demo.policy / "sft_summary.json", asdict(sft_cfg), [], lambda: train_sft(sft_cfg))
    stages.keys["sft"] = {"key": stages.keys["sft"], "weights": _dir_fingerprint(demo.policy)}


def _heads_stage(demo: _Demo) -> None:
    """2. The warm-start head, then every loss fine-tuned from it with identical data, steps and LR."""
    from bebop.training.train_mtp import train_mtp

    cfg = demo.cfg
    demo.head_dirs = head_dirs(cfg, demo.out / "heads")
    demo.head_cfgs = head_configs(cfg, demo.policy, demo.head_dirs)
    for name, hc in demo.head_cfgs.items():
        demo.stages.run(name, f"2/7 MTP head: {_head_title(hc, cfg)}", Path(hc.out) / "train_mtp_summary.json",
                        asdict(hc), ["sft"] if name == "head_init" else ["sft", "head_init"],
                        lambda hc=hc: train_mtp(hc))


def _head_title(hc, cfg: DemoConfig) -> str:
    stop = (f", early stop from step {hc.min_steps}: patience {hc.patience} × {hc.eval_every} steps" if hc.patience
            else "")
    start = f"from the {cfg.init_loss} head" if hc.init else "warm start"
    return f"{hc.loss} (budget {hc.steps} steps, lr {hc.lr:g}, {start}{stop})"


def _losses_key(cfg: DemoConfig) -> dict:
    """The settings a per-loss acceptance measurement (main run or ablation) is cached under."""
    return dict(gamma=cfg.gamma, temperature=cfg.temperature, prompts=cfg.loss_prompts,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch=MEASURE_BATCH, unit="prompt")


def _sweep_key(cfg: DemoConfig) -> dict:
    """The settings a temperature sweep (main run or ablation) is cached under."""
    return dict(temperatures=cfg.temperatures, gamma=cfg.gamma, prompts=cfg.sweep_prompts,
                max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, batch=MEASURE_BATCH, unit="prompt")


def _sweep_config(cfg: DemoConfig):
    """The temperature sweep's options, the same for the main run and every ablation."""
    from bebop.experiments.options import SweepConfig

    return derive(SweepConfig, cfg, "sweep_", batch_size=MEASURE_BATCH)


def _measure_stages(demo: _Demo) -> None:
    """3.–5. Per-loss acceptance at the rollout τ, the temperature sweep and the per-token entropy analysis."""
    import torch

    from bebop.experiments.analysis import entropy_analysis, temperature_sweep
    from bebop.experiments.options import EntropyConfig
    from bebop.models.checkpoint import load_head
    from bebop.models.policy import load_policy

    cfg, out, stages = demo.cfg, demo.out, demo.stages
    model, tokenizer = load_policy(demo.policy, cfg.device, cfg.dtype)
    heads = {k: load_head(d, model).eval() for k, d in demo.head_dirs.items()}
    ce_e2e = {"ce": heads["ce"], "e2e_tv": heads["e2e_tv"]}
    torch.manual_seed(cfg.seed)
    stages.run("losses", f"3/7 α per step per loss (τ = {cfg.temperature:g}, {cfg.loss_prompts} prompts)",
               out / "losses.json", _losses_key(cfg),
               ["sft", *demo.head_cfgs], lambda: _measure_losses(demo, model, tokenizer, heads))
    sweep_cfg = _sweep_config(cfg)
    stages.run("sweep", f"4/7 temperature sweep τ ∈ {{{', '.join(f'{t:g}' for t in cfg.temperatures)}}}",
               out / "sweep.json", _sweep_key(cfg),
               ["sft", "head_init", "head_ce", "head_e2e_tv"],
               lambda: atomic_write_json(out / "sweep.json", temperature_sweep(model, tokenizer, ce_e2e, sweep_cfg)))
    ent_cfg = derive(EntropyConfig, cfg, "entropy_")
    stages.run("entropy", f"5/7 per-token entropy analysis ({cfg.entropy_samples} samples)", out / "entropy.json",
               dict(samples=cfg.entropy_samples, temperature=cfg.temperature, gamma=cfg.gamma,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed),
               ["sft", "head_init", "head_ce", "head_e2e_tv"],
               lambda: atomic_write_json(out / "entropy.json", entropy_analysis(model, tokenizer, ce_e2e, ent_cfg)))


def _measure_losses(demo: _Demo, model, tokenizer, heads: Mapping) -> None:
    """RS and TO α_k and accept length of every head at the rollout τ, into ``losses.json``."""
    atomic_write_json(demo.out / "losses.json", _measure_heads(demo, model, tokenizer, heads, RULES))


def _measure_heads(demo: _Demo, model, tokenizer, heads: Mapping, rules: Mapping[str, str]) -> dict:
    """``{head: {alpha_<tag>, accept_length_<tag>, units_<tag>, entropy}}`` per verification rule (``rules``: rule
    → tag) at the rollout τ, every head on the same held-out prompts (those of ``losses.json``)."""
    from bebop.experiments.measure import Probe, measure_acceptance

    cfg = demo.cfg
    res = {}
    for name, head in heads.items():
        row: dict = {}
        for rule, tag in rules.items():
            r = measure_acceptance(model, tokenizer, head, Probe(cfg.task, rule, cfg.temperature, cfg.gamma,
                                                                 cfg.loss_prompts, MEASURE_BATCH, cfg.max_new_tokens,
                                                                 cfg.seed + LOSS_SEED_OFFSET))
            row[f"alpha_{tag}"], row[f"accept_length_{tag}"] = r["alpha"], r["accept_length"]
            row[f"units_{tag}"] = r["units"]
            row["entropy"] = r["entropy"]
        res[name] = row
        demo.console.print(f"{name}: accept length " + ", ".join(f"{tag.upper()} {row[f'accept_length_{tag}']:.3f}"
                                                                 for tag in rules.values()))
    return res


def _rl_stage(demo: _Demo, cfg: DemoConfig | None = None, rl_dir: Path | None = None, name: str = "rl",
              title: str = "6/7 RL") -> None:
    """6. Short GRPO runs side by side, one per method (``cfg``, ``rl_dir``, ``name``: an RL ablation's)."""
    from bebop.experiments.bench_rl import bench_rl

    cfg, rl_dir = cfg or demo.cfg, rl_dir or demo.out / "rl"
    rl_cfg = rl_config(cfg, demo.policy, demo.head_dirs, rl_dir)
    rl_cfg.method_list()
    demo.stages.run(name, f"{title}: {cfg.rl_steps} GRPO steps × {len(cfg.method_list())} methods "
                    f"({cfg.rl_prompts} prompts × {cfg.rl_group} samples per step, lr {cfg.rl_lr:g})",
                    rl_dir / "bench_rl.json", asdict(rl_cfg), ["sft", "head_ce", "head_e2e_tv"],
                    lambda: bench_rl(rl_cfg, console=demo.console))


def _rl_heldout_stage(demo: _Demo, rl_dir: Path | None = None, path: Path | None = None, rl_stage: str = "rl",
                      title: str = "6/7 RL") -> None:
    """6b. Every drafting RL method's final head on its final policy, measured under its rule on the held-out
    prompts of ``losses.json``, into ``rl_heldout.json``: acceptance before and after RL on the same prompts, which
    the RL steps' own rollouts (new prompts each step) cannot give. ``rl_dir``, ``path``, ``rl_stage``: an RL
    ablation's."""
    from bebop.experiments.bench_rl import METHODS

    cfg, rl_dir, path = demo.cfg, rl_dir or demo.out / "rl", path or demo.out / "rl_heldout.json"
    methods = [m for m in cfg.method_list() if METHODS[m][2] is not None]
    demo.stages.run(f"{rl_stage}_heldout", f"{title}: acceptance on the held-out prompts after RL "
                    f"({cfg.loss_prompts} prompts)", path, {**_losses_key(cfg), "methods": methods},
                    [rl_stage, "losses"], lambda: atomic_write_json(path, _measure_after_rl(demo, methods, rl_dir)))


def _measure_after_rl(demo: _Demo, methods: Sequence[str], rl_dir: Path) -> dict:
    """``{method: {head, rule, tag, accept_length, alpha, entropy, units, before}}``: the method's final policy and
    head from ``rl/<method>`` measured as :func:`_measure_heads` measures the heads before RL (``before``: those
    figures from ``losses.json``); ``rl_dir`` holds the RL runs."""
    from bebop.experiments.bench_rl import METHODS
    from bebop.experiments.measure import Probe, measure_acceptance
    from bebop.models.checkpoint import load_head
    from bebop.models.policy import load_policy

    cfg, losses = demo.cfg, _read_json(demo.out / "losses.json")
    res = {}
    for m in methods:
        _, rule, head_attr = METHODS[m]
        head, tag, run = HEAD_OF[head_attr], RULES[rule], rl_dir / m
        model, tokenizer = load_policy(run / "policy", cfg.device, cfg.dtype)
        r = measure_acceptance(model, tokenizer, load_head(run / "mtp", model).eval(),
                               Probe(cfg.task, rule, cfg.temperature, cfg.gamma, cfg.loss_prompts, MEASURE_BATCH,
                                     cfg.max_new_tokens, cfg.seed + LOSS_SEED_OFFSET))
        before = losses.get(head, {})
        res[m] = {"head": head, "rule": rule, "tag": tag, "accept_length": r["accept_length"], "alpha": r["alpha"],
                  "entropy": r["entropy"], "units": r["units"],
                  "before": {"accept_length": before.get(f"accept_length_{tag}"), "alpha": before.get(f"alpha_{tag}"),
                             "entropy": before.get("entropy")}}
        demo.console.print(f"{m}: accept length on the held-out prompts {res[m]['before']['accept_length']:.3f} "
                           f"before RL → {r['accept_length']:.3f} after")
    return res


def _ablation_stages(demo: _Demo) -> dict:
    """The ablation variants (:mod:`.ablations`, after the main stages), each as cached stages: its warm start
    (unless it fine-tunes from the main one), its CE and e2e-TV heads, then RS acceptance on the main run's
    held-out prompts and the temperature sweep of the main run. Returns the inputs of
    :func:`.ablations.ablation_summary`."""
    from bebop.experiments.analysis import temperature_sweep
    from bebop.experiments.demo.ablations import variant_config, variants
    from bebop.models.checkpoint import load_head
    from bebop.models.policy import load_policy
    from bebop.training.train_mtp import train_mtp

    cfg, stages = demo.cfg, demo.stages
    model, tokenizer = load_policy(demo.policy, cfg.device, cfg.dtype)
    sweep_cfg = _sweep_config(cfg)
    runs = {}
    for v in variants(cfg):
        vdir, vcfg, tag = demo.out / "ablations" / v.key, variant_config(cfg, v), f"abl_{v.key}"
        if v.ablation == "rl":   # the main run's heads, another RL setting
            _rl_stage(demo, vcfg, vdir / "rl", f"{tag}_rl", f"ablation {v.label}: RL")
            _rl_heldout_stage(demo, vdir / "rl", vdir / "rl_heldout.json", f"{tag}_rl", f"ablation {v.label}: RL")
            runs[v.key] = {"variant": v, "rl": _read_json(vdir / "rl" / "bench_rl.json").get("results", {}),
                           "heldout": _read_json(vdir / "rl_heldout.json"),
                           "seconds": sum(t for k, t in stages.seconds.items() if k.startswith(tag + "_"))}
            continue
        dirs = head_dirs(vcfg, vdir / "heads")
        if not v.own_init:  # fine-tune from the main run's warm start
            warm = next(iter(dirs))
            dirs[warm] = demo.head_dirs[warm]
        hcfgs = head_configs(vcfg, demo.policy, dirs)
        init_stage = f"{tag}_init" if v.own_init else "head_init"
        if v.own_init:
            hc = hcfgs["head_init"]
            stages.run(init_stage, f"ablation {v.label}: MTP head {_head_title(hc, vcfg)}",
                       Path(hc.out) / "train_mtp_summary.json", asdict(hc), ["sft"], lambda hc=hc: train_mtp(hc))
        for loss in ("ce", "e2e_tv"):
            hc = hcfgs[f"head_{loss}"]
            stages.run(f"{tag}_{loss}", f"ablation {v.label}: MTP head {_head_title(hc, vcfg)}",
                       Path(hc.out) / "train_mtp_summary.json", asdict(hc), ["sft", init_stage],
                       lambda hc=hc: train_mtp(hc))
        losses_json = vdir / "losses.json"
        stages.run(f"{tag}_measure", f"ablation {v.label}: RS α at τ = {cfg.temperature:g} ({cfg.loss_prompts} "
                   "prompts)", losses_json, _losses_key(cfg),
                   ["sft", f"{tag}_ce", f"{tag}_e2e_tv"],
                   lambda dirs=dirs, p=losses_json: atomic_write_json(p, _measure_heads(
                       demo, model, tokenizer, {k: load_head(dirs[k], model).eval() for k in ("ce", "e2e_tv")},
                       {"rejection": "rs"})))
        sweep_json = vdir / "sweep.json"
        stages.run(f"{tag}_sweep", f"ablation {v.label}: temperature sweep", sweep_json, _sweep_key(cfg),
                   ["sft", f"{tag}_ce", f"{tag}_e2e_tv"],
                   lambda dirs=dirs, p=sweep_json: atomic_write_json(p, temperature_sweep(
                       model, tokenizer, {k: load_head(dirs[k], model).eval() for k in ("ce", "e2e_tv")}, sweep_cfg)))
        runs[v.key] = {"variant": v, "losses": _read_json(losses_json), "sweep": _read_json(sweep_json),
                       "heads": {k: _head_record(_read_json(d / "train_mtp_summary.json")) for k, d in dirs.items()},
                       "seconds": sum(t for k, t in stages.seconds.items() if k.startswith(tag + "_"))}
    return runs


def _head_record(s: Mapping) -> dict:
    """What the report shows of one head's ``train_mtp_summary.json``: its last stage's budget, the step it stopped
    early at (None: it ran the whole budget), the step it kept, the kept held-out α, and its held-out curve
    (``[step, mean α]`` per evaluation)."""
    if not s:
        return {}
    stop = (s.get("early_stop") or [{}])[-1]
    stage = stop.get("stage")
    return {"budget": stop.get("budget"), "stopped_at": stop.get("last_step") if stop.get("stopped_early") else None,
            "kept_step": stop.get("best_step"), "heldout_alpha": s.get("heldout_alpha"),
            "curve": [[r["step"], r["heldout_alpha_mean"]] for r in s.get("curve", []) if r.get("stage") == stage]}


def _report_stage(demo: _Demo, t_start: float, ablations: Mapping | None) -> dict:
    """7. Plots, claims, ``summary.json`` and ``report.md``."""
    from bebop.experiments.demo.ablations import ablation_summary

    out, console = demo.out, demo.console
    console.rule("[bold]7/7 report")
    heads = {k: {"dir": str(d), **_head_record(_read_json(d / "train_mtp_summary.json"))}
             for k, d in demo.head_dirs.items()}
    res = Results(losses=_read_json(out / "losses.json"), sweep=_read_json(out / "sweep.json"),
                  ent=_read_json(out / "entropy.json"), rl=_read_json(out / "rl" / "bench_rl.json")["results"],
                  heads=heads, heldout=_read_json(out / "rl_heldout.json"))
    plots = write_plots(out / "plots", res, demo.cfg)
    costs = demo.cfg.gpu_costs  # a benchmarks/gpu_costs.py JSON: claim 5 shows its projection
    claims = evaluate_claims(res.losses, res.sweep, res.ent, res.rl, _read_json(Path(costs)) if costs else None,
                             res.heldout or None)
    sft_summary = _read_json(demo.policy / "sft_summary.json")
    summary = {
        "claims": claims,
        "verdict_rule": VERDICT_RULE,
        "policy": {"dir": str(demo.policy), "sft_steps": sft_summary.get("steps"),
                   "sft_seconds": sft_summary.get("train_seconds"), "eval": sft_summary.get("eval")},
        "heads": heads,
        **({"ablations": ablation_summary(res.losses, ablations, res.sweep, res.heldout)} if ablations is not None
           else {}),
        "stages": {k: {"seconds": demo.stages.seconds[k], "cached": demo.stages.cached[k]}
                   for k in demo.stages.seconds},
        "total_seconds": time.perf_counter() - t_start,
        "plots": {k: str(p.relative_to(out)) for k, p in plots.items()},
        "config": _jsonable(asdict(demo.cfg)),
    }
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_report(summary, res, demo.cfg))
    print_claims(claims, console)
    console.print(f"wrote [bold]{out / 'report.md'}[/], [bold]{out / 'summary.json'}[/] and "
                  f"{len(plots)} plots in {summary['total_seconds']:.0f} s")
    return summary
