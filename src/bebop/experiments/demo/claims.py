"""The verdict rules of the demo: for each claim of DESIGN §6, the figures it reads from the stage outputs (each
point figure with its bootstrap CI), the rule stated in words, and a verdict of held / not held / inconclusive
decided by the intervals (:mod:`bebop.experiments.stats`). Pure functions over JSON-able results (no model, no
torch), so every rule is tested on hand-made numbers.

Units of the intervals: acceptance figures resample the held-out prompts (one unit of counters per prompt,
``units`` in ``losses.json``, ``sweep.json`` and ``rl_heldout.json``: the same prompts for every head, τ and rule,
and before and after RL, so differences, slopes and drifts are resampled jointly); per-step RL figures resample RL
steps (the records hold one value per step). A figure
that could not be measured (a method that did not run, a fit with too few points, outputs without units) has no
CI, and its part is ``inconclusive``."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np

from bebop.core.speed import rl_step_speedup, speedup_limit
from bebop.experiments import stats
from bebop.experiments.names import RULE_NAMES
from bebop.experiments.series import step_series

__all__ = ["CLAIMS", "VERDICT_RULE", "accept_length_stat", "claim_headline", "dig", "evaluate_claims", "fmt", "fmt_ci",
           "gpu_projection", "heldout_drift", "mean_alpha_stat", "median_times", "n_units", "rl_runs", "sweep_slope",
           "unit_ci"]

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
FLAT_RATIO = 0.25         # claim 1: e2e-TV RS "flat" = |slope| ≤ 0.25 × |CE-RS slope|
DRIFT = 0.02              # claims 2, 4: "degrades" = accept length after RL vs before ≤ −2 %; "flat" = |drift| < 2 %
DRIFT_STEPS = 5           # per-step drift (shown; judged only without a held-out measurement): first and last steps
LOSS_POINTS = 0.03        # claim 3: e2e TV − CE ≥ +3 points of mean RS α over the γ draft steps
STEP_SPEEDUP = 1.5        # claim 5: median RL step time of none / rs-e2e_tv ≥ 1.5
# interval settings (candidates for DemoConfig fields)
CONFIDENCE = stats.CONFIDENCE
RESAMPLES = stats.RESAMPLES

VERDICT_RULE = (
    f"Every compared number carries a {CONFIDENCE:.0%} percentile-bootstrap CI ({RESAMPLES} resamples, fixed seed) "
    "over its units: the held-out prompts for acceptance (the same prompts for every head, τ and "
    "rule, and before and after RL, resampled jointly, so differences, slopes and drifts keep the pairing), RL steps "
    "for step times (and for per-step drift when no held-out measurement exists). "
    "A part \"X op threshold\" is held when the whole CI satisfies it, not held when the whole CI violates it, "
    f"inconclusive otherwise (or when X has no CI: fewer than {stats.MIN_UNITS} units, or not measured). A claim is "
    "held iff all its parts are held, not held iff any "
    "part is not held, inconclusive otherwise.")

Stat = stats.Stat


def dig(d: Mapping | None, *keys):
    """``d[k1][k2]…``, or None where a key is missing or a value is None."""
    for k in keys:
        if not isinstance(d, Mapping) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _ci_kw() -> dict:
    return {"resamples": RESAMPLES, "confidence": CONFIDENCE}


def _part(name: str, value, ci, op: str, threshold: float) -> dict:
    """One tested part of a claim: its point figure, CI and verdict on "figure op threshold"."""
    return {"figure": name, "value": value, "ci": ci, "op": op, "threshold": threshold,
            "verdict": stats.verdict(ci, op, threshold)}


# ------------------------------------------------------------------------------------------------ unit statistics


def n_units(*units: Mapping | None) -> int | None:
    """The common number of units (per-prompt counters), None when any is missing or they differ."""
    ns = {len(u["steps"]) if u and u.get("steps") is not None else None for u in units}
    return ns.pop() if len(ns) == 1 and None not in ns else None


def accept_length_stat(u: Mapping) -> Stat:
    """Accept length over resampled prompts: 1 + Σ accepted / Σ verify row-steps (as ``DecodeMetrics``)."""
    return stats.ratio_of(u["accepted"], u["steps"], offset=1.0)


def _entropy_stat(u: Mapping) -> Stat:
    return stats.ratio_of(u["entropy_sum"], u["tokens"])


def mean_alpha_stat(u: Mapping) -> Stat:
    """Mean over draft steps k of α_k = Σ accepted_k / Σ reached_k over resampled prompts."""
    acc, reached = np.asarray(u["accepted_k"], dtype=np.float64), np.asarray(u["reached"], dtype=np.float64)

    def stat(idx: np.ndarray) -> np.ndarray:
        r = reached[idx].sum(axis=-2)                                   # [R, γ]
        return np.where(r > 0, acc[idx].sum(axis=-2) / np.maximum(r, 1), 0.0).mean(axis=-1)

    return stat


def unit_ci(stat: Stat | None, n: int | None) -> list[float] | None:
    """The demo's bootstrap CI of ``stat`` over ``n`` units; None without units."""
    return None if stat is None or n is None else stats.bootstrap_ci(stat, n, **_ci_kw())


def _sweep_units(sweep: Mapping, head: str, rule: str) -> list | None:
    return dig(sweep, "heads", head, rule, "units")


def sweep_slope(sweep: Mapping, head: str, rule: str) -> tuple[Stat, int] | None:
    """The statistic of the accept-length slope against mean entropy over τ (points refitted per resample)."""
    units = _sweep_units(sweep, head, rule)
    n = n_units(*units) if units else None
    if n is None:
        return None
    return stats.slope_of([_entropy_stat(u) for u in units], [accept_length_stat(u) for u in units]), n


def _token_slope_ci(per_sample: Mapping | None, rule: str) -> list[float] | None:
    """CI of the per-token accept-length slope against H(p_1) (``entropy.json``), resampling policy samples."""
    if not per_sample or not per_sample.get(rule):
        return None
    p, r = per_sample, per_sample[rule]
    return unit_ci(stats.pooled_slope_of(p["n"], p["sum_h"], p["sum_h2"], r["sum_len"], r["sum_h_len"]), len(p["n"]))


def _step_values(rows: Sequence[Mapping], key: str, skip_first: bool = False) -> list[float]:
    rows = rows[1:] if skip_first and len(rows) > 1 else rows  # step 0 warms up
    return [r[key] for r in rows if r.get(key) is not None]


def _mean_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.mean(axis=-1) - b.mean(axis=-1)


def _median_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    mb = np.median(b, axis=-1)
    return np.median(a, axis=-1) / np.where(mb == 0, np.nan, mb)


# ------------------------------------------------------------------------------------------------ RL helpers


def _median_step(rows: Sequence[Mapping], key: str) -> float | None:
    vals = _step_values(rows, key, skip_first=True)
    return statistics.median(vals) if vals else None


def _ratio(a, b):
    return None if a is None or not b else a / b


def median_times(rl: Mapping) -> dict[str, dict]:
    """Per method, the median seconds per RL step of step, rollout and train time (steps ≥ 1): robust to the
    spikes a shared CPU adds, unlike ``bench_rl``'s means."""
    return {m: {f"median_{k}": _median_step(v["per_step"], k) for k in ("step_s", "rollout_s", "train_s")}
            for m, v in rl.items()}


def rl_runs(rl: Mapping) -> dict[str, list]:
    """``{method: per-step records}`` from the RL benchmark's results."""
    return {m: r["per_step"] for m, r in rl.items()}


def _accept_steps(rl: Mapping, m: str) -> list[float]:
    return _step_values(dig(rl, m, "per_step") or [], "accept_length")


def _drift(rl: Mapping, m: str) -> tuple[float | None, list[float] | None]:
    """A method's accept-length drift over RL (last vs first :data:`DRIFT_STEPS` steps) and its CI over steps. The
    rollout prompts change from step to step, so this drift mixes the policy's change with the prompts' luck."""
    return dig(rl, m, "drift_last5_vs_first5"), stats.drift_ci(_accept_steps(rl, m), DRIFT_STEPS, **_ci_kw())


def _heldout_units(losses: Mapping, heldout: Mapping, m: str) -> tuple[Mapping | None, Mapping | None]:
    """A method's per-prompt counters on the held-out prompts before RL (its head on the SFT policy, from
    ``losses.json``) and after (its final head on its final policy, from ``rl_heldout.json``)."""
    h = heldout.get(m) or {}
    return dig(losses, h.get("head"), f"units_{h.get('tag')}"), h.get("units")


def heldout_drift(losses: Mapping, heldout: Mapping, m: str) -> tuple[float | None, list[float] | None]:
    """A method's accept-length drift over RL on the same held-out prompts: after ÷ before − 1, with its CI over
    those prompts (paired: each resample redraws the same prompts before and after)."""
    h = heldout.get(m) or {}
    before = dig(losses, h.get("head"), f"accept_length_{h.get('tag')}")
    value = None if before is None or h.get("accept_length") is None else h["accept_length"] / before - 1.0
    ub, ua = _heldout_units(losses, heldout, m)
    n = n_units(ub, ua) if ub and ua else None
    return value, unit_ci(stats.change_of(accept_length_stat(ua), accept_length_stat(ub)), n) if n else None


def _heldout_diff(heldout: Mapping, a: str, b: str) -> tuple[float | None, list[float] | None]:
    """Accept length after RL of method ``a`` − that of ``b`` on the same held-out prompts, with its paired CI."""
    ha, hb = heldout.get(a) or {}, heldout.get(b) or {}
    if ha.get("accept_length") is None or hb.get("accept_length") is None:
        return None, None
    n = n_units(ha.get("units"), hb.get("units"))
    ci = unit_ci(stats.diff_of(accept_length_stat(ha["units"]), accept_length_stat(hb["units"])), n) if n else None
    return ha["accept_length"] - hb["accept_length"], ci


# ------------------------------------------------------------------------------------------------ the claims


def evaluate_claims(losses: Mapping, sweep: Mapping, ent: Mapping, rl: Mapping,
                    gpu_costs: Mapping | None = None, heldout: Mapping | None = None) -> list[dict]:
    """One record per claim of DESIGN §6: ``{"id", "claim", "figures", "parts", "rule", "verdict", "held"}`` from
    the losses, sweep, entropy and RL stage outputs; ``parts`` are the tested figures with their CIs and verdicts,
    ``verdict`` combines them (:func:`stats.combine`) and ``held`` is ``verdict == "held"``. ``gpu_costs``: a
    ``benchmarks/gpu_costs.py`` JSON, whose projected GPU step speedup claim 5 then shows (not judged).
    ``heldout``: ``rl_heldout.json`` (per RL method, its final head on its final policy measured on the held-out
    prompts of ``losses``); claims 2 and 4 then judge acceptance before vs after RL on those same prompts, and show
    the per-step drift, whose rollout prompts change from step to step, without judging it."""
    rules = (_claim_1(sweep, ent, rl), _claim_2(sweep, rl, losses, heldout), _claim_3(losses),
             _claim_4(rl, losses, heldout), _claim_5(rl, gpu_costs))
    out = []
    for cid, (figures, rule, parts) in enumerate(rules, start=1):
        v = stats.combine(p["verdict"] for p in parts)
        out.append({"id": cid, "claim": CLAIMS[cid], "figures": figures, "parts": parts, "rule": rule,
                    "verdict": v, "held": v == stats.HELD})
    return out


def _claim_1(sweep: Mapping, ent: Mapping, rl: Mapping) -> tuple[dict, str, list]:
    """Slopes of accept length against the policy's mean entropy over the temperature sweep (engine-measured)."""
    sh = sweep["heads"]
    keys = [(h, rule, f"{h} {tag}") for h in sh for rule, tag in RULE_NAMES.items()]
    slope = {k: dig(sh, h, rule, "fit", "slope") for h, rule, k in keys}
    fits = {k: sweep_slope(sweep, h, rule) for h, rule, k in keys}
    slope_ci = {k: unit_ci(*fits[k]) if fits[k] else None for k in slope}
    r = {k: dig(sh, h, rule, "fit", "r") for h, rule, k in keys}
    token_slope = {f"{h} {tag}": dig(ent, "heads", h, rule, "fit", "slope")
                   for h in ent.get("heads", {}) for rule, tag in RULE_NAMES.items()}
    token_slope_ci = {f"{h} {tag}": _token_slope_ci(dig(ent, "heads", h, "per_sample"), rule)
                      for h in ent.get("heads", {}) for rule, tag in RULE_NAMES.items()}
    rl_fits = {m: s["fit"]["slope"] for m, s in step_series(rl_runs(rl)).items()}
    ce_rs, tv_rs = slope.get("ce RS"), slope.get("e2e_tv RS")
    margin = None if ce_rs is None or tv_rs is None else abs(tv_rs) - FLAT_RATIO * abs(ce_rs)
    margin_ci = None
    if fits.get("ce RS") and fits.get("e2e_tv RS") and fits["ce RS"][1] == fits["e2e_tv RS"][1]:
        s_ce, s_tv = fits["ce RS"][0], fits["e2e_tv RS"][0]

        def flat_margin(idx: np.ndarray) -> np.ndarray:
            return np.abs(s_tv(idx)) - FLAT_RATIO * np.abs(s_ce(idx))

        margin_ci = unit_ci(flat_margin, fits["ce RS"][1])
    figures = {"slope_per_nat_sweep": slope, "slope_per_nat_sweep_ci": slope_ci, "r_sweep": r,
               "flat_margin": margin, "flat_margin_ci": margin_ci, "slope_per_nat_tokens": token_slope,
               "slope_per_nat_tokens_ci": token_slope_ci,
               "slope_per_nat_rl_steps": rl_fits, "paper": {"ce RS": -1.68, "TO": -1.68, "e2e_tv RS": -0.06}}
    parts = [_part("slope ce TO", slope.get("ce TO"), slope_ci.get("ce TO"), "<=", SLOPE_FALLS),
             _part("slope ce RS", ce_rs, slope_ci.get("ce RS"), "<=", SLOPE_FALLS),
             _part(f"|slope e2e_tv RS| − {FLAT_RATIO} × |slope ce RS|", margin, margin_ci, "<=", 0.0)]
    rule = (f"over the temperature sweep: slope(ce TO) ≤ {SLOPE_FALLS} and slope(ce RS) ≤ {SLOPE_FALLS} accept "
            f"length per nat, and |slope(e2e_tv RS)| ≤ {FLAT_RATIO} × |slope(ce RS)| (each on its CI)")
    return figures, rule, parts


def _claim_2(sweep: Mapping, rl: Mapping, losses: Mapping, heldout: Mapping | None) -> tuple[dict, str, list]:
    """RS vs TO at the highest τ, and accept-length drift over RL: on the held-out prompts before vs after RL when
    they were measured, else over the RL steps."""
    sh = sweep["heads"]
    hi = max(range(len(sweep["temperatures"])), key=lambda i: sweep["temperatures"][i])
    at_hi = {h: {"RS": dig(sh, h, "rejection", "accept_length")[hi],
                 "TO": dig(sh, h, "target_only", "accept_length")[hi]} for h in sh}
    gap, gap_ci = {}, {}
    for h, v in at_hi.items():
        gap[h] = None if v["RS"] is None or v["TO"] is None else v["RS"] - v["TO"]
        rs, to = (_sweep_units(sweep, h, rule) for rule in ("rejection", "target_only"))
        n = n_units(rs[hi], to[hi]) if rs and to else None
        gap_ci[h] = unit_ci(stats.diff_of(accept_length_stat(rs[hi]), accept_length_stat(to[hi])), n) if n else None
    methods = ("to-ce", "rs-ce", "rs-e2e_tv")
    drift, drift_ci = {}, {}
    for m in methods:
        drift[m], drift_ci[m] = _drift(rl, m)
    figures = {"tau_max": sweep["temperatures"][hi], "accept_length_at_tau_max": at_hi,
               "rs_minus_to_at_tau_max": gap, "rs_minus_to_at_tau_max_ci": gap_ci,
               "rl_drift_last5_vs_first5": drift, "rl_drift_last5_vs_first5_ci": drift_ci,
               "entropy_first5_last5": {m: [rl[m].get("entropy_first5"), rl[m].get("entropy_last5")]
                                        for m in drift if m in rl}}
    judged, judged_ci, where = drift, drift_ci, f"mean of the last {DRIFT_STEPS} RL steps vs the first {DRIFT_STEPS}"
    if heldout:
        judged, judged_ci = {}, {}
        for m in methods:
            judged[m], judged_ci[m] = heldout_drift(losses, heldout, m)
        figures.update(rl_drift_heldout=judged, rl_drift_heldout_ci=judged_ci, heldout=_heldout_figures(heldout))
        where = "accept length on the held-out prompts after RL vs before"
    parts = [*(_part(f"RS − TO accept length at τ={sweep['temperatures'][hi]:g}, {h}", gap[h], gap_ci[h], ">", 0.0)
               for h in at_hi),
             _part("RL drift to-ce", judged["to-ce"], judged_ci["to-ce"], "<=", -DRIFT),
             _part("RL drift rs-ce", judged["rs-ce"], judged_ci["rs-ce"], "<=", -DRIFT),
             _part("RL drift rs-e2e_tv", judged["rs-e2e_tv"], judged_ci["rs-e2e_tv"], "abs<", DRIFT)]
    rule = (f"RS accept length > TO at the highest τ for both heads, and over RL ({where}) to-ce and rs-ce drift "
            f"≤ −{DRIFT:.0%} while |drift of rs-e2e_tv| < {DRIFT:.0%} (each on its CI)")
    return figures, rule, parts


def _heldout_figures(heldout: Mapping) -> dict:
    """Per method, what ``rl_heldout.json`` says besides its units: head, rule, and accept length and policy
    entropy before and after RL."""
    return {m: {k: v for k, v in h.items() if k != "units"} for m, h in heldout.items()}


def _claim_3(losses: Mapping) -> tuple[dict, str, list]:
    """RS acceptance per training loss at the deployed γ, through the engine (every head on the same prompts)."""
    mean_alpha = {k: (sum(v["alpha_rs"]) / len(v["alpha_rs"]) if v.get("alpha_rs") else None)
                  for k, v in losses.items()}
    units = {k: v.get("units_rs") for k, v in losses.items()}
    mean_ci = {k: unit_ci(mean_alpha_stat(u), n_units(u)) if u else None for k, u in units.items()}

    def vs_e2e(k: str) -> tuple[float | None, list[float] | None]:
        a, b = mean_alpha.get("e2e_tv"), mean_alpha.get(k)
        point = None if a is None or b is None else a - b
        n = n_units(units.get("e2e_tv"), units.get(k))
        return point, unit_ci(stats.diff_of(mean_alpha_stat(units["e2e_tv"]), mean_alpha_stat(units[k])), n) \
            if n else None

    gain, gain_ci = vs_e2e("ce") if "ce" in losses else (None, None)
    same_budget = [k for k in losses if "warm start" not in k and k != "e2e_tv"]
    others = {k: vs_e2e(k) for k in same_budget if "e2e_tv" in losses}
    figures = {"mean_alpha_rs": mean_alpha, "mean_alpha_rs_ci": mean_ci,
               "alpha_rs": {k: v.get("alpha_rs") for k, v in losses.items()},
               "accept_length_rs": {k: v.get("accept_length_rs") for k, v in losses.items()},
               "e2e_tv_minus_ce_points": None if gain is None else 100 * gain,
               "e2e_tv_minus_ce_points_ci": None if gain_ci is None else [100 * x for x in gain_ci],
               "e2e_tv_minus": {k: v[0] for k, v in others.items()},
               "e2e_tv_minus_ci": {k: v[1] for k, v in others.items()}, "paper_points": [3, 8]}
    parts = [_part("e2e_tv − ce, mean RS α", gain, gain_ci, ">=", LOSS_POINTS),
             *(_part(f"e2e_tv − {k}, mean RS α", v[0], v[1], ">=", 0.0) for k, v in others.items() if k != "ce")]
    rule = (f"mean RS α over the γ draft steps at the rollout τ: e2e_tv − ce ≥ +{LOSS_POINTS * 100:.0f} points and "
            f"e2e_tv ≥ every other loss trained with the same budget ({', '.join(same_budget) or 'none'}; the "
            f"warm-start head is shown, not ranked), each on its CI")
    return figures, rule, parts


def _last_diff(rl: Mapping, a: str, b: str) -> list[float] | None:
    """CI of mean(last steps of a) − mean(last steps of b), the two runs' steps resampled independently."""
    va, vb = _accept_steps(rl, a)[-DRIFT_STEPS:], _accept_steps(rl, b)[-DRIFT_STEPS:]
    return stats.two_sample_ci(va, vb, _mean_diff, **_ci_kw())


def _claim_4(rl: Mapping, losses: Mapping, heldout: Mapping | None) -> tuple[dict, str, list]:
    """A frozen e2e-TV head against online CE updates over RL: on the held-out prompts after RL when they were
    measured, else over the last RL steps."""
    if heldout:
        return _claim_4_heldout(losses, heldout)
    last5 = {m: rl.get(m, {}).get("accept_length_last5") for m in ("rs-e2e_tv", "rs-ce", "rs-online-ce")}
    drift, drift_ci = _drift(rl, "rs-e2e_tv")

    def diff(a: str, b: str):
        return None if last5[a] is None or last5[b] is None else last5[a] - last5[b]

    figures = {"accept_length_last5": last5,
               "accept_length_last5_ci": {m: stats.mean_ci(_accept_steps(rl, m)[-DRIFT_STEPS:], **_ci_kw())
                                          for m in last5},
               "e2e_tv_minus_online_ce": diff("rs-e2e_tv", "rs-online-ce"),
               "e2e_tv_minus_online_ce_ci": _last_diff(rl, "rs-e2e_tv", "rs-online-ce"),
               "online_ce_minus_frozen_ce": diff("rs-online-ce", "rs-ce"),
               "online_ce_minus_frozen_ce_ci": _last_diff(rl, "rs-online-ce", "rs-ce"),
               "drift_rs_e2e_tv": drift, "drift_rs_e2e_tv_ci": drift_ci}
    parts = [_part("last-5 accept length rs-e2e_tv − rs-online-ce", figures["e2e_tv_minus_online_ce"],
                   figures["e2e_tv_minus_online_ce_ci"], ">=", 0.0),
             _part("last-5 accept length rs-online-ce − rs-ce", figures["online_ce_minus_frozen_ce"],
                   figures["online_ce_minus_frozen_ce_ci"], "<", 0.0),
             _part("RL drift rs-e2e_tv", drift, drift_ci, ">", -DRIFT)]
    rule = (f"over RL: accept length (mean of the last {DRIFT_STEPS} steps) of frozen rs-e2e_tv ≥ rs-online-ce, "
            f"rs-online-ce < frozen rs-ce (online CE updates drag it down), and rs-e2e_tv drift > −{DRIFT:.0%} (each "
            "on its CI; the runs' steps resampled independently)")
    return figures, rule, parts


def _claim_4_heldout(losses: Mapping, heldout: Mapping) -> tuple[dict, str, list]:
    """Claim 4 on the held-out prompts: each method's final head on its final policy, compared prompt by prompt."""
    after = {m: dig(heldout, m, "accept_length") for m in ("rs-e2e_tv", "rs-ce", "rs-online-ce")}
    tv_vs_online, tv_vs_online_ci = _heldout_diff(heldout, "rs-e2e_tv", "rs-online-ce")
    online_vs_frozen, online_vs_frozen_ci = _heldout_diff(heldout, "rs-online-ce", "rs-ce")
    drift, drift_ci = heldout_drift(losses, heldout, "rs-e2e_tv")
    figures = {"accept_length_after_rl": after,
               "accept_length_after_rl_ci": {m: unit_ci(accept_length_stat(u), n_units(u)) if u else None
                                             for m in after for u in [dig(heldout, m, "units")]},
               "e2e_tv_minus_online_ce": tv_vs_online, "e2e_tv_minus_online_ce_ci": tv_vs_online_ci,
               "online_ce_minus_frozen_ce": online_vs_frozen, "online_ce_minus_frozen_ce_ci": online_vs_frozen_ci,
               "drift_rs_e2e_tv": drift, "drift_rs_e2e_tv_ci": drift_ci, "measured_on": "held-out prompts"}
    parts = [_part("accept length after RL rs-e2e_tv − rs-online-ce", tv_vs_online, tv_vs_online_ci, ">=", 0.0),
             _part("accept length after RL rs-online-ce − rs-ce", online_vs_frozen, online_vs_frozen_ci, "<", 0.0),
             _part("RL drift rs-e2e_tv", drift, drift_ci, ">", -DRIFT)]
    rule = ("on the held-out prompts after RL (each method's final head on its final policy): accept length of "
            "frozen rs-e2e_tv ≥ rs-online-ce, rs-online-ce < frozen rs-ce (online CE updates drag it down), and "
            f"rs-e2e_tv after vs before RL > −{DRIFT:.0%} (each on its CI, paired by prompt)")
    return figures, rule, parts


def _step_ratio_ci(rl: Mapping, key: str, m: str) -> list[float] | None:
    """CI of median ``key`` of none ÷ that of ``m`` over steps ≥ 1, the two runs resampled independently."""
    a = _step_values(dig(rl, "none", "per_step") or [], key, skip_first=True)
    b = _step_values(dig(rl, m, "per_step") or [], key, skip_first=True)
    return stats.two_sample_ci(a, b, _median_ratio, **_ci_kw())


def _rollout_share(rl: Mapping, m: str = "none") -> tuple[float | None, list[float] | None]:
    """Median over steps ≥ 1 of rollout seconds ÷ step seconds of a run, and its CI over steps."""
    rows = [r for r in (dig(rl, m, "per_step") or [])[1:] if r.get("rollout_s") is not None and r.get("step_s")]
    share = [r["rollout_s"] / r["step_s"] for r in rows]
    if not share:
        return None, None
    ci = stats.bootstrap_ci(lambda idx: np.median(np.asarray(share)[idx], axis=-1), len(share), **_ci_kw())
    return float(np.median(share)), ci


def _amdahl(share, rollout_speedup) -> float | None:
    if share is None or not rollout_speedup or not 0.0 <= share <= 1.0:
        return None
    return rl_step_speedup(share, rollout_speedup)


def _claim_5(rl: Mapping, gpu_costs: Mapping | None) -> tuple[dict, str, list]:
    """RL step time with and without MTP rollouts (medians, robust to a shared CPU's spikes), the rollout share of
    the plain run and the step speedup Amdahl's law allows from the measured rollout speedup."""
    med = median_times(rl)
    speed = {m: {"step": _ratio(dig(med, "none", "median_step_s"), v["median_step_s"]),
                 "rollout": _ratio(dig(med, "none", "median_rollout_s"), v["median_rollout_s"])}
             for m, v in med.items()}
    speed_ci = {m: {"step": _step_ratio_ci(rl, "step_s", m), "rollout": _step_ratio_ci(rl, "rollout_s", m)}
                for m in med}
    share, share_ci = _rollout_share(rl)
    s_roll = dig(speed, "rs-e2e_tv", "rollout")
    figures = {"median_speedup": speed, "median_speedup_ci": speed_ci,
               "rollout_share_none": share, "rollout_share_none_ci": share_ci,
               "train_share_none": None if share is None else 1.0 - share,
               "amdahl_step_bound": _amdahl(share, s_roll),
               "amdahl_formula": "1 / ((1 − r) + r / s_rollout), r = rollout share of the plain run",
               "mean_speedup": {m: {"step": v.get("step_speedup"), "rollout": v.get("rollout_speedup")}
                                for m, v in rl.items()},
               "median_seconds": med,
               "reward_first5": {m: rl[m].get("reward_first5") for m in ("none", "rs-e2e_tv") if m in rl},
               "none_ran": bool(rl.get("none", {})), "paper": {"step": [1.5, 1.8], "rollout_max": 2.4}}
    if gpu_costs is not None:
        figures["gpu_projection"] = gpu_projection(gpu_costs, _accept_steps(rl, "rs-e2e_tv"), share)
    parts = [_part("median step time none ÷ rs-e2e_tv", dig(speed, "rs-e2e_tv", "step"),
                   dig(speed_ci, "rs-e2e_tv", "step"), ">=", STEP_SPEEDUP)]
    rule = (f"median RL step time (steps ≥ 1) of none ÷ rs-e2e_tv ≥ {STEP_SPEEDUP} on its CI (identical output "
            "distribution is checked by the statistical tests, not here; the Amdahl bound and any GPU projection "
            "are shown, not judged)")
    return figures, rule, parts


def gpu_projection(costs: Mapping, accept_lengths: Sequence[float], share: float | None) -> dict:
    """The RL step speedup projected for a GPU from a ``benchmarks/gpu_costs.py`` JSON: per measured cell, the
    decode speedup its forward costs allow at this run's rs-e2e_tv accept length (``core.speed.speedup_limit``),
    then Amdahl's step speedup (``core.speed.rl_step_speedup``) at the rollout share ``r`` — the JSON's own
    ``--rollout-share`` if it was given, else this run's measured one. A projection, not a measurement."""
    inputs = costs.get("inputs") or {}
    gamma = inputs.get("gamma")
    length = float(np.mean(accept_lengths)) if accept_lengths else None
    r = inputs.get("rollout_share") if inputs.get("rollout_share") is not None else share
    rows = []
    for c in costs.get("rows", []):
        if "skipped" in c or length is None or gamma is None:
            continue
        dec = speedup_limit(length, c["c_1"], c["c_verify"], c["c_draft"], gamma)
        rows.append({"shape": c.get("shape"), "batch": c.get("batch"), "context": c.get("context"),
                     "projected_decode_speedup": dec, "projected_rl_step_speedup": _amdahl(r, dec)})
    steps = [x["projected_rl_step_speedup"] for x in rows if x["projected_rl_step_speedup"] is not None]
    return {"label": "projection, not a measurement", "device": costs.get("device"), "dtype": costs.get("dtype"),
            "inputs": {"accept_length": length, "accept_length_source": "mean over RL steps of rs-e2e_tv",
                       "gamma": gamma, "rollout_share": r,
                       "rollout_share_source": "gpu_costs --rollout-share" if inputs.get("rollout_share") is not None
                       else "this run's plain RL (measured here)"},
            "rows": rows, "rl_step_speedup_range": [min(steps), max(steps)] if steps else None}


def fmt(v, spec: str = ".3f") -> str:
    """A figure for a reader, ``–`` when it was not measured."""
    return "–" if v is None else format(v, spec)


def fmt_ci(ci: Sequence[float] | None, spec: str = ".3f") -> str:
    """A CI for a reader, ``[lo, hi]``; ``[–]`` when there is none."""
    return "[–]" if ci is None else f"[{format(ci[0], spec)}, {format(ci[1], spec)}]"


def _with_ci(v, ci, spec: str) -> str:
    return f"{fmt(v, spec)} {fmt_ci(ci, spec)}"


def claim_headline(c: Mapping) -> str:
    """The measured number(s) of a claim with their CIs, one line."""
    f = c["figures"]
    if c["id"] == 1:
        s, ci = f["slope_per_nat_sweep"], f.get("slope_per_nat_sweep_ci") or {}
        tci = f.get("slope_per_nat_tokens_ci") or {}
        return ("slope/nat (τ sweep): " + ", ".join(f"{k} {_with_ci(s.get(k), ci.get(k), '+.2f')}"
                                                   for k in ("ce TO", "ce RS", "e2e_tv RS"))
                + f"; flat margin {_with_ci(f.get('flat_margin'), f.get('flat_margin_ci'), '+.2f')}; per token: "
                + ", ".join(f"{k} {_with_ci(f['slope_per_nat_tokens'].get(k), tci.get(k), '+.2f')}"
                            for k in ("ce TO", "ce RS", "e2e_tv RS")))
    if c["id"] == 2:
        gap, gci = f["rs_minus_to_at_tau_max"], f.get("rs_minus_to_at_tau_max_ci") or {}
        held = "rl_drift_heldout" in f
        d = f["rl_drift_heldout" if held else "rl_drift_last5_vs_first5"]
        dci = f.get("rl_drift_heldout_ci" if held else "rl_drift_last5_vs_first5_ci") or {}
        return (f"RS − TO at τ={f['tau_max']:g}: " + ", ".join(f"{h} {_with_ci(v, gci.get(h), '+.2f')}"
                                                               for h, v in gap.items())
                + f"; RL drift ({'held-out prompts, after vs before' if held else 'last vs first RL steps'}) "
                + ", ".join(f"{m} {_with_ci(v, dci.get(m), '+.1%')}" for m, v in d.items()))
    if c["id"] == 3:
        m, ci = f["mean_alpha_rs"], f.get("mean_alpha_rs_ci") or {}
        return ", ".join(f"{k} {_with_ci(v, ci.get(k), '.3f')}" for k, v in m.items()) + \
            f" (e2e_tv − ce = {_with_ci(f['e2e_tv_minus_ce_points'], f.get('e2e_tv_minus_ce_points_ci'), '+.1f')} " \
            "points)"
    if c["id"] == 4:
        held = "accept_length_after_rl" in f
        a = f["accept_length_after_rl" if held else "accept_length_last5"]
        ci = f.get("accept_length_after_rl_ci" if held else "accept_length_last5_ci") or {}
        return (("accept length on the held-out prompts after RL: " if held else "accept length last 5 steps: ")
                + ", ".join(f"{k} {_with_ci(v, ci.get(k), '.2f')}" for k, v in a.items())
                + f"; rs-e2e_tv drift {_with_ci(f.get('drift_rs_e2e_tv'), f.get('drift_rs_e2e_tv_ci'), '+.1%')}")
    s, ci = f["median_speedup"].get("rs-e2e_tv", {}), f.get("median_speedup_ci", {}).get("rs-e2e_tv", {})
    line = (f"rs-e2e_tv vs none (medians): step {_with_ci(s.get('step'), ci.get('step'), '.2f')}×, rollout "
            f"{_with_ci(s.get('rollout'), ci.get('rollout'), '.2f')}×; plain-run rollout share r "
            f"{_with_ci(f.get('rollout_share_none'), f.get('rollout_share_none_ci'), '.2f')} → Amdahl bound "
            f"{fmt(f.get('amdahl_step_bound'), '.2f')}×")
    proj = f.get("gpu_projection")
    if proj and proj.get("rl_step_speedup_range"):
        lo, hi = proj["rl_step_speedup_range"]
        line += f"; projected GPU step speedup (projection, {proj.get('device')}) {lo:.2f}–{hi:.2f}×"
    return line
