"""PNG figures for the analysis (DESIGN §6), regenerated from JSON-able data.

Each function draws one figure with matplotlib's Agg canvas (``matplotlib.figure.Figure``, no pyplot state, no
display needed), writes one PNG to ``path`` (parent directories created) and returns the path. Accept lengths
count the bonus/correction token (tokens per target forward).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from bebop.core.fits import linear_fit
from bebop.errors import BebopError
from bebop.experiments.names import RULE_NAMES

__all__ = [
    "STEP_TIME_KEYS",
    "plot_alpha_per_step",
    "plot_entropy_accept",
    "plot_heldout_curves",
    "plot_rl_accept_length",
    "plot_step_times",
    "plot_temperature_sweep",
]

STEP_TIME_KEYS: tuple[str, ...] = ("mean_step_s", "mean_rollout_s", "mean_train_s")  # as in bench_rl results
_DPI = 120


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI)
    return path


def _fit_label(fit: Mapping | None) -> str:
    if not fit or fit.get("slope") is None:
        return ""
    r = fit.get("r")
    return f" (slope {fit['slope']:+.2f}/nat" + (f", r={r:.2f})" if r is not None else ")")


def plot_entropy_accept(series: Mapping[str, Mapping], path: str | Path,
                        title: str = "Accept length vs policy entropy") -> Path:
    """Scatter of accept length against entropy with a fitted line per method.

    ``series = {label: {"entropy": [...], "accept_length": [...], "count": [...] (optional: marker size),
    "fit": linear_fit dict (optional: else fitted on the points)}}`` — token buckets
    (``analysis.entropy_series``), temperature-sweep points or per-RL-step points all fit this shape."""
    if not series:
        raise BebopError("plot_entropy_accept needs at least one series")
    fig = Figure(figsize=(7, 4.8))
    ax = fig.subplots()
    groups: dict[str, str] = {}  # "<head> RS" and "<head> TO" share a colour; the rule sets marker and line style
    for label, s in series.items():
        x = np.asarray(s["entropy"], dtype=float)
        y = np.asarray(s["accept_length"], dtype=float)
        counts = s.get("count")
        size = 20.0 if counts is None else 12 + 160 * np.sqrt(np.asarray(counts, float) / max(max(counts), 1))
        group = label[:-3] if label.endswith((" RS", " TO")) else label
        color = groups.setdefault(group, f"C{len(groups) % 10}")
        marker = "o" if label.endswith("RS") else ("s" if label.endswith("TO") else "D")
        fit = s.get("fit") or linear_fit(x, y)
        ax.scatter(x, y, s=size, color=color, marker=marker, alpha=0.7, label=f"{label}{_fit_label(fit)}")
        if fit.get("slope") is not None and x.size:
            grid = np.linspace(float(x.min()), float(x.max()), 2)
            ax.plot(grid, fit["slope"] * grid + fit["intercept"], color=color, lw=1.5,
                    ls="-" if not label.endswith("TO") else "--")
    ax.set_xlabel("policy entropy H(p) [nats]")
    ax.set_ylabel("accept length (tokens / target forward, incl. bonus)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_temperature_sweep(sweep: Mapping, path: str | Path, title: str = "RS vs TO over temperature") -> Path:
    """Accept length of RS (solid) and TO (dashed) against τ, one colour per head, from
    ``analysis.temperature_sweep``; a second panel shows the policy's mean entropy at each τ if recorded."""
    temps = list(sweep["temperatures"])
    heads = sweep["heads"]
    if not heads:
        raise BebopError("plot_temperature_sweep needs at least one head")
    has_entropy = any(r.get("entropy") and None not in r["entropy"] for row in heads.values() for r in row.values())
    fig = Figure(figsize=(7, 6.4 if has_entropy else 4.6))
    axes = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1]) if has_entropy else [fig.subplots()]
    ax = axes[0]
    for i, (name, row) in enumerate(heads.items()):
        for rule, tag in RULE_NAMES.items():
            if rule in row:
                ax.plot(temps, row[rule]["accept_length"], color=f"C{i}", ls="-" if tag == "RS" else "--",
                        marker="o" if tag == "RS" else "s", label=f"{name} {tag}")
    gamma = sweep.get("gamma")
    ax.set_ylabel("accept length (incl. bonus)")
    ax.set_title(title + (f" (γ = {gamma})" if gamma else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_entropy:
        first = next(iter(heads.values()))
        ent = first.get("rejection", next(iter(first.values())))["entropy"]
        axes[1].plot(temps, ent, color="gray", marker=".")
        axes[1].set_ylabel("mean H(p) [nats]")
        axes[1].grid(alpha=0.3)
    axes[-1].set_xlabel("temperature τ")
    return _save(fig, path)


def plot_alpha_per_step(losses: Mapping[str, Mapping], path: str | Path,
                        title: str = "Per-step acceptance α_k by training loss") -> Path:
    """Grouped bars of α_k per loss, one panel per rule, from the ``bebop bench losses`` JSON
    ``{"<loss>": {"alpha_rs": [...], "accept_length_rs": x, "alpha_to": [...], "accept_length_to": y}}``."""
    if not losses:
        raise BebopError("plot_alpha_per_step needs at least one loss")
    tags = [t for t in ("rs", "to") if any(f"alpha_{t}" in r for r in losses.values())]
    fig = Figure(figsize=(9.5, 3.6 * len(tags)))
    axes = np.atleast_1d(fig.subplots(len(tags), 1, sharey=True))
    names = list(losses)
    lowest = min((a for r in losses.values() for t in tags for a in r.get(f"alpha_{t}", [])), default=0.0)
    floor = max(0.0, math.floor((lowest - 0.05) * 10) / 10)  # zoom in: differences between losses are a few points
    for ax, tag in zip(axes, tags, strict=True):
        gamma = max(len(r.get(f"alpha_{tag}", [])) for r in losses.values())
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            alpha = losses[name].get(f"alpha_{tag}", [])
            length = losses[name].get(f"accept_length_{tag}")
            x = np.arange(len(alpha)) + (i - (len(names) - 1) / 2) * width
            label = name + (f" (accept len {length:.3f})" if length is not None else "")
            bars = ax.bar(x, alpha, width=width, color=f"C{i}", label=label)
            ax.bar_label(bars, fmt="%.3f", fontsize=6, rotation=90, padding=2)
        ax.set_xticks(np.arange(gamma), [f"α_{k + 1}" for k in range(gamma)])
        ax.set_ylabel(f"α ({tag.upper()})" + (f", axis from {floor:g}" if floor > 0 else ""))
        ax.set_ylim(floor, 1.04)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[0].set_title(title)
    return _save(fig, path)


def plot_rl_accept_length(runs: Mapping[str, Sequence[Mapping]], path: str | Path,
                          title: str = "Accept length over RL steps") -> Path:
    """Accept length (top) and policy entropy (bottom) against RL step, one line per method;
    ``runs = {method: [{"step", "accept_length", "entropy"}, ...]}`` (records without an accept length, e.g.
    the ``none`` strategy, are skipped in the top panel); from ``bench_rl`` results:
    ``{m: r["per_step"] for m, r in results.items()}``."""
    if not runs:
        raise BebopError("plot_rl_accept_length needs at least one run")
    fig = Figure(figsize=(7, 6))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for i, (method, recs) in enumerate(runs.items()):
        acc = [(r["step"], r["accept_length"]) for r in recs if r.get("accept_length") is not None]
        if acc:
            top.plot(*zip(*acc, strict=True), color=f"C{i}", marker=".", label=method)
        ent = [(r["step"], r["entropy"]) for r in recs if r.get("entropy") is not None]
        if ent:
            bottom.plot(*zip(*ent, strict=True), color=f"C{i}", label=method)
    top.set_ylabel("accept length (incl. bonus)")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(fontsize=8)
    bottom.set_ylabel("entropy [nats]")
    bottom.set_xlabel("RL step")
    bottom.grid(alpha=0.3)
    return _save(fig, path)


def plot_step_times(times: Mapping[str, Mapping[str, float]], path: str | Path,
                    keys: Sequence[str] = STEP_TIME_KEYS, title: str = "RL step time per method") -> Path:
    """Grouped bars of mean seconds per RL step (``keys``: step, rollout, train) per method;
    ``times = {method: {"mean_step_s": s, "mean_rollout_s": r, "mean_train_s": t, ...}}`` — the results of
    ``bench_rl.bench_rl`` as they are (other keys are ignored). If a ``none`` method is present, each step-time
    bar is annotated with its speedup over it."""
    if not times:
        raise BebopError("plot_step_times needs at least one method")
    methods = list(times)
    present = [k for k in keys if any(k in v for v in times.values())]
    if not present:
        raise BebopError(f"plot_step_times: no method has any of the keys {', '.join(keys)}")
    keys = present
    fig = Figure(figsize=(max(6.0, 1.4 * len(methods) + 2), 4.4))
    ax = fig.subplots()
    width = 0.8 / len(keys)
    base = times.get("none", {}).get(keys[0])
    for j, key in enumerate(keys):
        vals = [float(times[m].get(key, 0.0)) for m in methods]
        x = np.arange(len(methods)) + (j - (len(keys) - 1) / 2) * width
        label = key.removeprefix("mean_").removesuffix("_s").replace("_", " ") + " time"
        bars = ax.bar(x, vals, width=width, color=f"C{j}", label=label)
        if j == 0 and base:
            for b, v in zip(bars, vals, strict=True):
                if v > 0:
                    ax.annotate(f"{base / v:.2f}×", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=8)
    ax.set_xticks(np.arange(len(methods)), methods, rotation=15)
    ax.set_ylabel("seconds per RL step")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_heldout_curves(curves: Mapping[str, Mapping], path: str | Path,
                        title: str = "Held-out expected α during head training") -> Path:
    """Held-out expected α (mean over the γ_train steps) against training step, one line per head, the kept
    evaluation starred and an early stop marked with a cross; ``curves = {head: {"curve": [[step, α], ...],
    "kept_step": s | None, "stopped_at": s | None, "offset": steps before this stage (optional)}}`` (a head
    fine-tuned from a warm start is drawn after it)."""
    if not curves:
        raise BebopError("plot_heldout_curves needs at least one head")
    fig = Figure(figsize=(7, 4.6))
    ax = fig.subplots()
    for i, (name, c) in enumerate(curves.items()):
        pts = {int(s): float(a) for s, a in c.get("curve") or []}
        if not pts:
            continue
        off = int(c.get("offset") or 0)
        ax.plot([s + off for s in pts], list(pts.values()), color=f"C{i}", marker=".", ms=3, label=name)
        if c.get("kept_step") in pts:
            ax.plot(c["kept_step"] + off, pts[c["kept_step"]], color=f"C{i}", marker="*", ms=12, ls="none")
        if c.get("stopped_at") in pts:
            ax.plot(c["stopped_at"] + off, pts[c["stopped_at"]], color=f"C{i}", marker="x", ms=9, ls="none")
    ax.set_xlabel("head training step (fine-tuned heads after their warm start)")
    ax.set_ylabel("held-out expected α (mean over k)")
    ax.set_title(title + " (★ kept, × early stop)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
