"""The verdict rules of the demo: for each claim of DESIGN §6, the figures it reads from the stage outputs, the
rule stated in words, and whether it held. Pure functions over JSON-able results (no model, no torch), so
every rule is tested on hand-made numbers.

A figure that could not be measured (a method that did not run, a fit with too few points) is ``None``; a rule
with a ``None`` input is ``not held`` rather than guessed."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

from bebop.experiments.names import RULE_NAMES
from bebop.experiments.series import step_series

__all__ = ["CLAIMS", "claim_headline", "dig", "evaluate_claims", "fmt", "median_times", "rl_runs"]

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
DRIFT = 0.02              # claims 2, 4: "degrades" = last-5 vs first-5 accept length ≤ −2 %; "flat" = |drift| < 2 %
LOSS_POINTS = 0.03        # claim 3: e2e TV − CE ≥ +3 points of mean RS α over the γ draft steps
STEP_SPEEDUP = 1.5        # claim 5: median RL step time of none / rs-e2e_tv ≥ 1.5


def _all(*conds) -> bool:
    """True iff every condition is True (a condition is None when its figure could not be measured)."""
    return all(c is True for c in conds)


def _cmp(a, op: str, b) -> bool | None:
    if a is None or b is None:
        return None
    return {"<=": a <= b, "<": a < b, ">=": a >= b, ">": a > b}[op]


def dig(d: Mapping | None, *keys):
    """``d[k1][k2]…``, or None where a key is missing or a value is None."""
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


def rl_runs(rl: Mapping) -> dict[str, list]:
    """``{method: per-step records}`` from the RL benchmark's results."""
    return {m: r["per_step"] for m, r in rl.items()}


def evaluate_claims(losses: Mapping, sweep: Mapping, ent: Mapping, rl: Mapping) -> list[dict]:
    """One record per claim of DESIGN §6: ``{"id", "claim", "figures", "rule", "held", "verdict"}``, from the
    losses, sweep, entropy and RL stage outputs."""
    rules = (_claim_1(sweep, ent, rl), _claim_2(sweep, rl), _claim_3(losses), _claim_4(rl), _claim_5(rl))
    return [{"id": cid, "claim": CLAIMS[cid], "figures": figures, "rule": rule, "held": bool(held),
             "verdict": "held" if held else "not held"}
            for cid, (figures, rule, held) in enumerate(rules, start=1)]


def _claim_1(sweep: Mapping, ent: Mapping, rl: Mapping) -> tuple[dict, str, bool]:
    """Slopes of accept length against the policy's mean entropy over the temperature sweep (engine-measured)."""
    sh = sweep["heads"]
    slope = {f"{h} {tag}": dig(sh, h, rule, "fit", "slope") for h in sh for rule, tag in RULE_NAMES.items()}
    r = {f"{h} {tag}": dig(sh, h, rule, "fit", "r") for h in sh for rule, tag in RULE_NAMES.items()}
    token_slope = {f"{h} {tag}": dig(ent, "heads", h, rule, "fit", "slope")
                   for h in ent.get("heads", {}) for rule, tag in RULE_NAMES.items()}
    rl_fits = {m: s["fit"]["slope"] for m, s in step_series(rl_runs(rl)).items()}
    ce_rs, ce_to, tv_rs = slope.get("ce RS"), slope.get("ce TO"), slope.get("e2e_tv RS")
    flat = None if ce_rs is None or tv_rs is None else abs(tv_rs) <= FLAT_RATIO * abs(ce_rs)
    figures = {"slope_per_nat_sweep": slope, "r_sweep": r, "slope_per_nat_tokens": token_slope,
               "slope_per_nat_rl_steps": rl_fits, "paper": {"ce RS": -1.68, "TO": -1.68, "e2e_tv RS": -0.06}}
    rule = (f"over the temperature sweep: slope(ce TO) ≤ {SLOPE_FALLS} and slope(ce RS) ≤ {SLOPE_FALLS} accept "
            f"length per nat, and |slope(e2e_tv RS)| ≤ {FLAT_RATIO} × |slope(ce RS)|")
    return figures, rule, _all(_cmp(ce_to, "<=", SLOPE_FALLS), _cmp(ce_rs, "<=", SLOPE_FALLS), flat)


def _claim_2(sweep: Mapping, rl: Mapping) -> tuple[dict, str, bool]:
    """RS vs TO at the highest τ, and accept-length drift over RL."""
    sh = sweep["heads"]
    hi = max(range(len(sweep["temperatures"])), key=lambda i: sweep["temperatures"][i])
    at_hi = {h: {"RS": dig(sh, h, "rejection", "accept_length")[hi],
                 "TO": dig(sh, h, "target_only", "accept_length")[hi]} for h in sh}
    rs_wins = _all(*(_cmp(v["RS"], ">", v["TO"]) for v in at_hi.values()))
    drift = {m: rl.get(m, {}).get("drift_last5_vs_first5") for m in ("to-ce", "rs-ce", "rs-e2e_tv")}
    degrade = _all(_cmp(drift["to-ce"], "<=", -DRIFT), _cmp(drift["rs-ce"], "<=", -DRIFT))
    tv_flat = drift["rs-e2e_tv"] is not None and abs(drift["rs-e2e_tv"]) < DRIFT
    figures = {"tau_max": sweep["temperatures"][hi], "accept_length_at_tau_max": at_hi,
               "rs_beats_to_at_tau_max": rs_wins, "rl_drift_last5_vs_first5": drift, "ce_degrades": degrade,
               "e2e_tv_flat": tv_flat,
               "entropy_first5_last5": {m: [rl[m].get("entropy_first5"), rl[m].get("entropy_last5")]
                                        for m in drift if m in rl}}
    rule = (f"RS accept length > TO at the highest τ for both heads, and over RL (mean of the last 5 steps vs the "
            f"first 5) to-ce and rs-ce drift ≤ −{DRIFT:.0%} while |drift of rs-e2e_tv| < {DRIFT:.0%}")
    return figures, rule, _all(rs_wins, degrade, tv_flat)


def _claim_3(losses: Mapping) -> tuple[dict, str, bool]:
    """RS acceptance per training loss at the deployed γ, through the engine."""
    mean_alpha = {k: (sum(v["alpha_rs"]) / len(v["alpha_rs"]) if v.get("alpha_rs") else None)
                  for k, v in losses.items()}
    gain = None if mean_alpha.get("e2e_tv") is None or mean_alpha.get("ce") is None \
        else mean_alpha["e2e_tv"] - mean_alpha["ce"]
    same_budget = [k for k in losses if "warm start" not in k and k != "e2e_tv"]
    best = _all(*(_cmp(mean_alpha["e2e_tv"], ">=", mean_alpha[k]) for k in same_budget)) if "e2e_tv" in losses \
        else False
    figures = {"mean_alpha_rs": mean_alpha, "alpha_rs": {k: v.get("alpha_rs") for k, v in losses.items()},
               "accept_length_rs": {k: v.get("accept_length_rs") for k, v in losses.items()},
               "e2e_tv_minus_ce_points": None if gain is None else 100 * gain, "paper_points": [3, 8]}
    rule = (f"mean RS α over the γ draft steps at the rollout τ: e2e_tv − ce ≥ +{LOSS_POINTS * 100:.0f} points and "
            f"e2e_tv ≥ every other loss trained with the same budget ({', '.join(same_budget) or 'none'}; the "
            f"warm-start head is shown, not ranked)")
    return figures, rule, _all(_cmp(gain, ">=", LOSS_POINTS), best)


def _claim_4(rl: Mapping) -> tuple[dict, str, bool]:
    """A frozen e2e-TV head against online CE updates over RL."""
    last5 = {m: rl.get(m, {}).get("accept_length_last5") for m in ("rs-e2e_tv", "rs-ce", "rs-online-ce")}
    drift = {m: rl.get(m, {}).get("drift_last5_vs_first5") for m in last5}
    rule = (f"over RL: accept length (mean of last 5 steps) of frozen rs-e2e_tv ≥ rs-online-ce, rs-online-ce < "
            f"frozen rs-ce (online CE updates drag it down), and rs-e2e_tv drift > −{DRIFT:.0%}")
    held = _all(_cmp(last5["rs-e2e_tv"], ">=", last5["rs-online-ce"]), _cmp(last5["rs-online-ce"], "<", last5["rs-ce"]),
                _cmp(drift["rs-e2e_tv"], ">", -DRIFT))
    return {"accept_length_last5": last5, "drift_last5_vs_first5": drift}, rule, held


def _claim_5(rl: Mapping) -> tuple[dict, str, bool]:
    """RL step time with and without MTP rollouts (medians, robust to a shared CPU's spikes)."""
    med = median_times(rl)
    speed = {m: {"step": _ratio(dig(med, "none", "median_step_s"), v["median_step_s"]),
                 "rollout": _ratio(dig(med, "none", "median_rollout_s"), v["median_rollout_s"])}
             for m, v in med.items()}
    figures = {"median_speedup": speed,
               "mean_speedup": {m: {"step": v.get("step_speedup"), "rollout": v.get("rollout_speedup")}
                                for m, v in rl.items()},
               "median_seconds": med,
               "reward_first5": {m: rl[m].get("reward_first5") for m in ("none", "rs-e2e_tv") if m in rl},
               "none_ran": bool(rl.get("none", {})), "paper": {"step": [1.5, 1.8], "rollout_max": 2.4}}
    rule = (f"median RL step time (steps ≥ 1) of none ÷ rs-e2e_tv ≥ {STEP_SPEEDUP} (identical output distribution "
            "is checked by the statistical tests, not here)")
    return figures, rule, _all(_cmp(dig(speed, "rs-e2e_tv", "step"), ">=", STEP_SPEEDUP))


def fmt(v, spec: str = ".3f") -> str:
    """A figure for a reader, ``–`` when it was not measured."""
    return "–" if v is None else format(v, spec)


def claim_headline(c: Mapping) -> str:
    """The measured number(s) of a claim, one line."""
    f = c["figures"]
    if c["id"] == 1:
        s = f["slope_per_nat_sweep"]
        return (f"slope/nat (τ sweep): ce TO {fmt(s.get('ce TO'), '+.2f')}, ce RS {fmt(s.get('ce RS'), '+.2f')}, "
                f"e2e_tv RS {fmt(s.get('e2e_tv RS'), '+.2f')}; per token: ce TO "
                f"{fmt(f['slope_per_nat_tokens'].get('ce TO'), '+.2f')}, ce RS "
                f"{fmt(f['slope_per_nat_tokens'].get('ce RS'), '+.2f')}, e2e_tv RS "
                f"{fmt(f['slope_per_nat_tokens'].get('e2e_tv RS'), '+.2f')}")
    if c["id"] == 2:
        a = f["accept_length_at_tau_max"]
        d = f["rl_drift_last5_vs_first5"]
        return (f"τ={f['tau_max']:g}: " + ", ".join(f"{h} RS {fmt(v['RS'], '.2f')} vs TO {fmt(v['TO'], '.2f')}"
                                                   for h, v in a.items())
                + "; RL drift " + ", ".join(f"{m} {fmt(v, '+.1%')}" for m, v in d.items()))
    if c["id"] == 3:
        m = f["mean_alpha_rs"]
        return ", ".join(f"{k} {fmt(v)}" for k, v in m.items()) + \
            f" (e2e_tv − ce = {fmt(f['e2e_tv_minus_ce_points'], '+.1f')} points)"
    if c["id"] == 4:
        a = f["accept_length_last5"]
        return "accept length last 5 steps: " + ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in a.items())
    s = f["median_speedup"].get("rs-e2e_tv", {})
    return (f"rs-e2e_tv vs none: step {fmt(s.get('step'), '.2f')}×, rollout {fmt(s.get('rollout'), '.2f')}× "
            f"(medians); means: step {fmt(f['mean_speedup'].get('rs-e2e_tv', {}).get('step'), '.2f')}×")
