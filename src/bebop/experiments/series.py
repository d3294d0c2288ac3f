"""Plot series from analysis results: points of (entropy, accept length) with their fitted lines, in the one
shape ``plots.plot_entropy_accept`` draws. Pure dict/list shaping over numpy fits: no torch, no model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from bebop.core.fits import linear_fit
from bebop.experiments.names import RULE_NAMES

__all__ = ["entropy_series", "step_series", "sweep_series"]


def entropy_series(result: Mapping) -> dict[str, dict]:
    """Plot series from ``analysis.entropy_analysis``: ``{"<head> RS"|"<head> TO": {"entropy", "accept_length",
    "count", "fit"}}`` (the shape ``plots.plot_entropy_accept`` takes; per-RL-step data fits it too)."""
    series = {}
    for name, row in result["heads"].items():
        for rule, tag in RULE_NAMES.items():
            series[f"{name} {tag}"] = {"entropy": row["entropy"], "accept_length": row[rule]["accept_length"],
                                       "count": row["count"], "fit": row[rule]["fit"]}
    return series


def step_series(runs: Mapping[str, Sequence[Mapping]]) -> dict[str, dict]:
    """Per-RL-step fits: for each method's per-step records ``[{"entropy", "accept_length", "alpha": [α_k]},
    ...]`` (as ``rl.jsonl`` / ``bench_rl`` ``per_step``), the points (entropy, accept length) and
    ``linear_fit`` of accept length and of each α_k against the step's mean policy entropy. Records without an
    accept length (no MTP) are skipped, and so are methods left with none. The shape
    ``plots.plot_entropy_accept`` takes, plus ``"alpha_fits"``."""
    series = {}
    for method, rows in runs.items():
        rows = [r for r in rows if r.get("accept_length") is not None and r.get("entropy") is not None]
        if not rows:
            continue
        ent = [r["entropy"] for r in rows]
        alphas = [r["alpha"] for r in rows if r.get("alpha")]
        gamma = min((len(a) for a in alphas), default=0)
        series[method] = {
            "entropy": ent,
            "accept_length": [r["accept_length"] for r in rows],
            "fit": linear_fit(ent, [r["accept_length"] for r in rows]),
            "alpha_fits": [linear_fit([r["entropy"] for r in rows if r.get("alpha")], [a[k] for a in alphas])
                           for k in range(gamma)],
        }
    return series


def sweep_series(sweep: Mapping) -> dict[str, dict]:
    """Plot series from ``analysis.temperature_sweep``: one point per τ at (mean policy entropy, accept length),
    ``{"<head> RS"|"<head> TO": {"entropy", "accept_length", "fit"}}`` (the shape ``plots.plot_entropy_accept``
    takes)."""
    return {f"{name} {tag}": {"entropy": row[rule]["entropy"], "accept_length": row[rule]["accept_length"],
                              "fit": row[rule].get("fit")}
            for name, row in sweep["heads"].items() for rule, tag in RULE_NAMES.items()}
