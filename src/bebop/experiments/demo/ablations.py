"""The demo's ablations (``ablations = "all"``, ``bebop demo --ablations``): head-training variants that can explain
a claim the main run does not hold. Each variant changes one setting of head training, trains the CE and e2e-TV
heads as the main run does (same data seed unless the seed is what changes, same budgets and early stopping; a
variant that changes what the warm start sees trains its own warm start, the budget variants fine-tune from the
main run's) and measures RS acceptance at the rollout τ on the main run's held-out prompts, so every difference
against the main run is paired by prompt.

* ``layers``       a head of 2 MTP layers instead of 1 (draft step k uses layer (k−1) mod 2), or 1 when the main
                   run uses 2;
* ``gamma_train``  γ_train 5 instead of 3 (or 3 when the main run uses 5);
* ``budget``       half and double the fine-tuning budget ``head_steps``;
* ``temperature``  the training data sampled (and the target p taken) at τ 0.7 / 1.0 / 1.3 other than the main one;
* ``seeds``        the same heads trained under other seeds (:data:`HEAD_SEEDS` past the main one): new training
                   data, initialisation and batch order, so the spread of a figure over seeds shows how much of it
                   is the luck of one training run;
* ``rl``           the main run's heads through :data:`RL_LONGER` × as many RL steps, with acceptance on the held-out
                   prompts before and after: whether the heads drift once RL has moved the policy further (claims 2
                   and 4). It trains no head.

:func:`variants` builds the variants, :func:`ablation_summary` the figures with bootstrap CIs (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from bebop.experiments.demo.claims import (
    accept_length_stat,
    heldout_drift,
    mean_alpha_stat,
    n_units,
    sweep_slope,
    unit_ci,
)
from bebop.experiments.demo.config import DemoConfig
from bebop.experiments.stats import Stat, diff_of

__all__ = ["DATA_TEMPERATURES", "HEADS", "HEAD_SEEDS", "RL_LONGER", "Variant", "ablation_summary", "variant_config",
           "variants"]

DATA_TEMPERATURES = (0.7, 1.0, 1.3)   # the ``temperature`` ablation's training-data temperatures
HEAD_SEEDS = 2                        # the ``seeds`` ablation: heads trained under seed + 1 … seed + HEAD_SEEDS
RL_LONGER = 4                         # the ``rl`` ablation: this many times the main run's RL steps
HEADS = ("e2e_tv", "ce")              # the heads every variant trains


@dataclass(frozen=True)
class Variant:
    """One ablation variant: ``key`` (its directory and stage names), ``label`` (the report's), the ablation it
    belongs to, the demo fields it changes for head training, and whether it trains its own warm start (else it
    fine-tunes from the main run's)."""

    key: str
    label: str
    ablation: str
    overrides: dict = field(default_factory=dict)
    own_init: bool = True


def variants(cfg: DemoConfig) -> list[Variant]:
    """The variants of ``cfg.ablation_list()``, in order."""
    out: list[Variant] = []
    for a in cfg.ablation_list():
        if a == "layers":
            n = 1 if cfg.head_layers == 2 else 2
            out.append(Variant(f"head_layers{n}", f"{n} MTP layer{'s' if n > 1 else ''}", a, {"head_layers": n}))
        elif a == "gamma_train":
            g = 3 if cfg.gamma_train == 5 else 5
            out.append(Variant(f"gamma_train{g}", f"γ_train = {g}", a, {"gamma_train": g}))
        elif a == "budget":
            for steps in dict.fromkeys((max(1, cfg.head_steps // 2), 2 * cfg.head_steps)):
                out.append(Variant(f"head_steps{steps}", f"head budget {steps} steps", a, {"head_steps": steps},
                                   own_init=False))
        elif a == "temperature":
            for t in DATA_TEMPERATURES:
                if t != cfg.temperature:
                    out.append(Variant(f"data_tau{t:g}", f"training data at τ = {t:g}", a, {"temperature": t}))
        elif a == "seeds":
            for s in range(cfg.seed + 1, cfg.seed + 1 + HEAD_SEEDS):
                out.append(Variant(f"seed{s}", f"heads trained under seed {s}", a, {"seed": s}))
        elif a == "rl":
            steps = RL_LONGER * cfg.rl_steps
            out.append(Variant(f"rl_steps{steps}", f"RL for {steps} steps", a, {"rl_steps": steps}, own_init=False))
    return out


def variant_config(cfg: DemoConfig, v: Variant) -> DemoConfig:
    """The demo settings the variant's heads are trained with: ``cfg`` with the variant's changes, CE and e2e TV
    only, no ablations of its own."""
    return replace(cfg, extra_losses="", ablations="", **v.overrides)


def _point(stat: Stat, n: int) -> float:
    """The statistic on the units as measured (no resampling)."""
    return float(stat(np.arange(n)[None, :])[0])


def _with_ci(stat: Stat, n: int | None, scale: float = 1.0) -> dict:
    if n is None:
        return {"value": None, "ci": None}
    ci = unit_ci(stat, n)
    return {"value": scale * _point(stat, n), "ci": None if ci is None else [scale * x for x in ci]}


def _gain(units: Mapping) -> Stat:
    """e2e_tv − ce mean RS α on the same prompts."""
    return diff_of(mean_alpha_stat(units["e2e_tv"]), mean_alpha_stat(units["ce"]))


def _row(units: Mapping, main: Mapping | None) -> dict:
    """One table row: per head accept length and mean α with CIs, e2e_tv − ce in points, and (``main`` given) the
    paired differences against the main run: of e2e_tv − ce (points) and of each head's accept length."""
    n = n_units(*units.values(), *(main or {}).values())
    row: dict = {h: {"accept_length": _with_ci(accept_length_stat(units[h]), n),
                     "mean_alpha": _with_ci(mean_alpha_stat(units[h]), n)} for h in HEADS}
    row["e2e_tv_minus_ce_points"] = _with_ci(_gain(units), n, 100.0)
    if main is not None:
        row["vs_main"] = {
            "e2e_tv_minus_ce_points": _with_ci(diff_of(_gain(units), _gain(main)), n, 100.0),
            **{f"{h}_accept_length": _with_ci(diff_of(accept_length_stat(units[h]), accept_length_stat(main[h])), n)
               for h in HEADS}}
    return row


def _slopes(sweep: Mapping | None, main_sweep: Mapping | None) -> dict:
    """Per head, the RS accept-length slope per nat of policy entropy over the temperature sweep (claim 1's figure)
    with its CI, and (``main_sweep`` given) its paired change against the main run's: both sweeps decode the same
    prompts at the same τ's, so each resample redraws those prompts in both."""
    out: dict = {}
    for h in HEADS:
        v = sweep_slope(sweep, h, "rejection") if sweep else None
        m = sweep_slope(main_sweep, h, "rejection") if main_sweep else None
        out[f"{h}_rs_slope"] = _with_ci(v[0], v[1]) if v else {"value": None, "ci": None}
        if main_sweep is not None:
            same = v is not None and m is not None and v[1] == m[1]
            out[f"{h}_rs_slope_vs_main"] = _with_ci(diff_of(v[0], m[0]), v[1]) if same else {"value": None, "ci": None}
    return out


def _rl_row(losses: Mapping, rl: Mapping, heldout: Mapping, main_heldout: Mapping | None) -> dict:
    """An RL variant's figures per drafting method: accept length and policy entropy on the held-out prompts before
    and after RL, the drift (after ÷ before − 1) with its CI, the change of the after-RL accept length against the
    main run's (paired by prompt), and reward over the first and last RL steps."""
    out: dict = {}
    for m, h in heldout.items():
        b = h.get("before") or {}
        d, ci = heldout_drift(losses, heldout, m)
        row = {"accept_length": [b.get("accept_length"), h.get("accept_length")],
               "entropy": [b.get("entropy"), h.get("entropy")], "drift": {"value": d, "ci": ci},
               "reward_first5_last5": [(rl.get(m) or {}).get("reward_first5"), (rl.get(m) or {}).get("reward_last5")]}
        mh = (main_heldout or {}).get(m) or {}
        n = n_units(h.get("units"), mh.get("units")) if h.get("units") and mh.get("units") else None
        row["after_vs_main"] = _with_ci(diff_of(accept_length_stat(h["units"]), accept_length_stat(mh["units"])), n) \
            if n else {"value": None, "ci": None}
        out[m] = row
    return out


def ablation_summary(main_losses: Mapping, runs: Mapping[str, Mapping], main_sweep: Mapping | None = None,
                     main_heldout: Mapping | None = None) -> dict:
    """``summary.json``'s ``ablations``: ``{"main": row, "variants": {key: {label, ablation, settings, heads,
    seconds, **row}}}`` from the main run's ``losses.json`` (and ``sweep.json``) and per variant ``{"variant":
    Variant, "losses": its losses.json, "sweep": its sweep.json, "heads": its head records, "seconds": its stages'
    time}``. Every CI resamples the held-out prompts jointly across the heads and runs compared (the same prompts
    were measured in each); the RS slopes over τ come from the sweeps (:func:`_slopes`)."""
    main = {h: main_losses[h]["units_rs"] for h in HEADS}
    out: dict = {"main": {**_row(main, None), **_slopes(main_sweep, None)}, "variants": {}}
    for key, r in runs.items():
        v: Variant = r["variant"]
        if v.ablation == "rl":
            out["variants"][key] = {"label": v.label, "ablation": v.ablation, "settings": dict(v.overrides),
                                    "seconds": r.get("seconds"),
                                    "rl": _rl_row(main_losses, r.get("rl") or {}, r.get("heldout") or {},
                                                  main_heldout)}
            continue
        units = {h: r["losses"][h]["units_rs"] for h in HEADS}
        out["variants"][key] = {"label": v.label, "ablation": v.ablation,
                                "settings": dict(v.overrides), "own_warm_start": v.own_init,
                                "heads": r.get("heads", {}), "seconds": r.get("seconds"), **_row(units, main),
                                **_slopes(r.get("sweep"), main_sweep)}
    return out
