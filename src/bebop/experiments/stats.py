"""Percentile-bootstrap confidence intervals and the three-way verdicts the demo's claims are judged by. Pure numpy,
no model: every rule is tested on synthetic data with known answers.

A *statistic* maps an array of unit indices (one resample: units drawn with replacement) to a number, so one
resampling scheme serves means, ratios of sums, paired differences and slopes refitted per resample. Units are what
was sampled independently: prompts (or the engine calls that hold them) for acceptance, RL steps for drift and step
time. Figures measured on the same units (two heads on the same prompts, every τ of a sweep) are resampled jointly,
so their difference keeps the pairing.

Verdicts: a claim part "X op threshold" is **held** when the whole CI satisfies it, **not held** when the whole CI
violates it, and **inconclusive** otherwise (or when X has no CI: too few units, or not measured). A claim of
several parts is held iff every part is held, not held iff some part is not held, else inconclusive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bebop.core.fits import linear_fit
from bebop.errors import BebopError

__all__ = ["CONFIDENCE", "HELD", "INCONCLUSIVE", "MIN_UNITS", "NOT_HELD", "RESAMPLES", "SEED", "VERDICTS",
           "bootstrap_ci", "combine", "diff_of", "drift", "drift_ci", "mean_ci", "mean_of", "paired_diff_ci",
           "ratio_ci", "ratio_of", "slope_ci", "slope_of", "two_sample_ci", "verdict"]

CONFIDENCE = 0.95   # two-sided coverage of every interval
RESAMPLES = 2000    # bootstrap resamples per interval
SEED = 0            # fixed, so a report is reproducible from its stage outputs
MIN_UNITS = 2       # fewer units than this: no interval (a single unit says nothing about its spread)

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)

Stat = Callable[[np.ndarray], float | None]
"""A statistic of one resample: unit indices → value (None where undefined, e.g. a slope over constant x)."""


# ------------------------------------------------------------------------------------------------ statistics


def mean_of(x: Sequence[float]) -> Stat:
    """The mean of the per-unit values ``x`` over a resample."""
    a = np.asarray(x, dtype=np.float64)
    return lambda idx: float(a[idx].mean())


def ratio_of(num: Sequence[float], den: Sequence[float], offset: float = 0.0) -> Stat:
    """``offset + Σ num / Σ den`` over a resample (a ratio of means: e.g. accepted drafts per verify step, summed
    over the units' counters, as the engine aggregates them); None where Σ den is 0."""
    n, d = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)

    def stat(idx: np.ndarray) -> float | None:
        s = float(d[idx].sum())
        return None if s == 0 else offset + float(n[idx].sum()) / s

    return stat


def diff_of(a: Stat, b: Stat) -> Stat:
    """``a − b`` on the same resample (paired: both measured on the same units)."""

    def stat(idx: np.ndarray) -> float | None:
        va, vb = a(idx), b(idx)
        return None if va is None or vb is None else va - vb

    return stat


def slope_of(xs: Sequence[Stat], ys: Sequence[Stat]) -> Stat:
    """The OLS slope of the points ``(xs[i], ys[i])`` (one point per group, e.g. per τ), every point recomputed on
    the same resample of units (``core.fits.linear_fit``)."""

    def stat(idx: np.ndarray) -> float | None:
        pts = [(x(idx), y(idx)) for x, y in zip(xs, ys, strict=True)]
        pts = [(x, y) for x, y in pts if x is not None and y is not None]
        return linear_fit([p[0] for p in pts], [p[1] for p in pts])["slope"]

    return stat


# ------------------------------------------------------------------------------------------------ intervals


def _percentiles(values: Iterable[float | None], confidence: float) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return [float(lo), float(hi)]


def _check(confidence: float, resamples: int) -> None:
    if not 0 < confidence < 1:
        raise BebopError(f"confidence must be in (0, 1), got {confidence}")
    if resamples < 1:
        raise BebopError(f"resamples must be >= 1, got {resamples}")


def bootstrap_ci(stat: Stat, n: int, resamples: int = RESAMPLES, confidence: float = CONFIDENCE,
                 seed: int = SEED) -> list[float] | None:
    """Percentile bootstrap CI ``[lo, hi]`` of ``stat`` over ``n`` units resampled with replacement (every
    resample draws all ``n``); None with fewer than :data:`MIN_UNITS` units or no defined resample."""
    _check(confidence, resamples)
    if n < MIN_UNITS:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    return _percentiles((stat(i) for i in idx), confidence)


def two_sample_ci(a: Sequence[float], b: Sequence[float], stat: Callable[[np.ndarray, np.ndarray], float | None],
                  resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> list[float] | None:
    """Percentile CI of ``stat(a*, b*)`` where ``a*`` and ``b*`` resample ``a`` and ``b`` independently (two samples
    without a pairing, e.g. the step times of two RL runs); None when either has fewer than :data:`MIN_UNITS`."""
    _check(confidence, resamples)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size < MIN_UNITS or xb.size < MIN_UNITS:
        return None
    rng = np.random.default_rng(seed)
    ia, ib = rng.integers(0, xa.size, (resamples, xa.size)), rng.integers(0, xb.size, (resamples, xb.size))
    return _percentiles((stat(xa[i], xb[j]) for i, j in zip(ia, ib, strict=True)), confidence)


def mean_ci(x: Sequence[float], **kw) -> list[float] | None:
    """CI of the mean of per-unit values."""
    return bootstrap_ci(mean_of(x), len(x), **kw)


def ratio_ci(num: Sequence[float], den: Sequence[float], offset: float = 0.0, **kw) -> list[float] | None:
    """CI of ``offset + Σ num / Σ den`` over units (see :func:`ratio_of`)."""
    return bootstrap_ci(ratio_of(num, den, offset), len(num), **kw)


def paired_diff_ci(a: Sequence[float], b: Sequence[float], **kw) -> list[float] | None:
    """CI of ``mean(a) − mean(b)`` where ``a[i]`` and ``b[i]`` were measured on the same unit (resampled jointly)."""
    if len(a) != len(b):
        raise BebopError(f"paired values need the same units, got {len(a)} and {len(b)}")
    return bootstrap_ci(diff_of(mean_of(a), mean_of(b)), len(a), **kw)


def slope_ci(x_units: Sequence[Sequence[float]], y_units: Sequence[Sequence[float]], **kw) -> list[float] | None:
    """CI of the OLS slope of per-group means: group g is the point (mean of ``x_units[g]``, mean of
    ``y_units[g]``), every group measured on the same units, each resample redraws the units and refits."""
    n = {len(u) for u in (*x_units, *y_units)}
    if len(n) != 1:
        raise BebopError(f"every group needs the same units, got sizes {sorted(n)}")
    return bootstrap_ci(slope_of([mean_of(u) for u in x_units], [mean_of(u) for u in y_units]), n.pop(), **kw)


def drift(first: np.ndarray, last: np.ndarray) -> float | None:
    """Relative change of the mean: ``mean(last) / mean(first) − 1`` (None where mean(first) is 0)."""
    m = float(np.mean(first))
    return None if m == 0 else float(np.mean(last)) / m - 1.0


def drift_ci(values: Sequence[float], k: int = 5, **kw) -> list[float] | None:
    """CI of the drift of a per-step series: the mean of its last ``k`` values against the mean of its first ``k``
    (:func:`drift`), resampling the steps of each block independently (RL records hold one value per step, so the
    units are steps; consecutive steps are treated as independent)."""
    v = list(values)
    if len(v) < 2 * MIN_UNITS:
        return None
    return two_sample_ci(v[:k], v[-k:], drift, **kw)


# ------------------------------------------------------------------------------------------------ verdicts


def verdict(ci: Sequence[float] | None, op: str, threshold: float) -> str:
    """The verdict on "X ``op`` ``threshold``" from X's CI ``[lo, hi]``: ``op`` one of ``>=``, ``>``, ``<=``, ``<``
    or ``abs<=`` / ``abs<`` (|X| within a band). Held iff the whole CI satisfies it, not held iff the whole CI
    violates it, else inconclusive (also when there is no CI)."""
    if ci is None:
        return INCONCLUSIVE
    lo, hi = ci
    t = threshold
    rules = {  # op → (every value in [lo, hi] satisfies it, no value does)
        ">=": (lo >= t, hi < t), ">": (lo > t, hi <= t),
        "<=": (hi <= t, lo > t), "<": (hi < t, lo >= t),
        "abs<=": (-t <= lo and hi <= t, lo > t or hi < -t), "abs<": (-t < lo and hi < t, lo >= t or hi <= -t),
    }
    if op not in rules:
        raise BebopError(f"unknown comparison {op!r}; choose from: {', '.join(rules)}")
    held, violated = rules[op]
    return HELD if held else NOT_HELD if violated else INCONCLUSIVE


def combine(verdicts: Iterable[str]) -> str:
    """A claim of several parts: held iff every part is held, not held iff some part is not held, else
    inconclusive (a claim with no parts is inconclusive)."""
    v = list(verdicts)
    if not v:
        return INCONCLUSIVE
    if NOT_HELD in v:
        return NOT_HELD
    return HELD if all(x == HELD for x in v) else INCONCLUSIVE
