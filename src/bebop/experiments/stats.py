"""Percentile-bootstrap confidence intervals and the three-way verdicts the demo's claims are judged by. Pure numpy,
no model: every rule is tested on synthetic data with known answers.

A *statistic* maps an array of unit indices (one resample: units drawn with replacement) to a number, so one
resampling scheme serves means, ratios of sums, paired differences and slopes refitted per resample. Units are what
was sampled independently: prompts for acceptance, RL steps for drift and step
time. Figures measured on the same units (two heads on the same prompts, every τ of a sweep) are resampled jointly,
so their difference keeps the pairing.

Verdicts: a claim part "X op threshold" is **held** when the whole CI satisfies it, **not held** when the whole CI
violates it, and **inconclusive** otherwise (or when X has no CI: too few units, or not measured). A claim of
several parts is held iff every part is held, not held iff some part is not held, else inconclusive."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bebop.errors import BebopError

__all__ = ["CONFIDENCE", "HELD", "INCONCLUSIVE", "MIN_UNITS", "NOT_HELD", "RESAMPLES", "SEED", "VERDICTS",
           "bootstrap_ci", "change_of", "combine", "diff_of", "drift", "drift_ci", "mean_ci", "mean_of", "ols_slope",
           "paired_diff_ci", "pooled_slope_of", "ratio_ci", "ratio_of", "slope_ci", "slope_of", "two_sample_ci",
           "verdict"]

CONFIDENCE = 0.95   # two-sided coverage of every interval
RESAMPLES = 2000    # bootstrap resamples per interval
SEED = 0            # fixed, so a report is reproducible from its stage outputs
MIN_UNITS = 5       # fewer units than this: no interval (a percentile bootstrap over a handful of units is far
                    # too narrow: 2 units have 3 distinct resamples)

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
VERDICTS = (HELD, NOT_HELD, INCONCLUSIVE)

Stat = Callable[[np.ndarray], np.ndarray]
"""A statistic over resamples, vectorised: unit indices [R, n] (one row per resample) → values [R] (NaN where a
resample leaves it undefined, e.g. a ratio over a zero denominator)."""


# ------------------------------------------------------------------------------------------------ statistics


def mean_of(x: Sequence[float]) -> Stat:
    """The mean of the per-unit values ``x`` over each resample."""
    a = np.asarray(x, dtype=np.float64)
    return lambda idx: a[idx].mean(axis=-1)


def ratio_of(num: Sequence[float], den: Sequence[float], offset: float = 0.0) -> Stat:
    """``offset + Σ num / Σ den`` over each resample (a ratio of means: e.g. accepted drafts per verify step, summed
    over the units' counters, as the engine aggregates them); NaN where Σ den is 0."""
    n, d = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)

    def stat(idx: np.ndarray) -> np.ndarray:
        s = d[idx].sum(axis=-1)
        return offset + n[idx].sum(axis=-1) / np.where(s == 0, np.nan, s)

    return stat


def diff_of(a: Stat, b: Stat) -> Stat:
    """``a − b`` on the same resamples (paired: both measured on the same units)."""
    return lambda idx: a(idx) - b(idx)


def change_of(after: Stat, before: Stat) -> Stat:
    """``after / before − 1`` on the same resamples (a paired relative change: both measured on the same units);
    NaN where ``before`` is 0."""

    def stat(idx: np.ndarray) -> np.ndarray:
        b = before(idx)
        return after(idx) / np.where(b == 0, np.nan, b) - 1.0

    return stat


def ols_slope(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slopes of ``y`` against ``x`` along the last axis, one per row (NaN where x is constant): the
    slope of ``core.fits.linear_fit``, vectorised over resamples."""
    dx = x - x.mean(axis=-1, keepdims=True)
    sxx = (dx * dx).sum(axis=-1)
    return (dx * (y - y.mean(axis=-1, keepdims=True))).sum(axis=-1) / np.where(sxx > 0, sxx, np.nan)


def slope_of(xs: Sequence[Stat], ys: Sequence[Stat]) -> Stat:
    """The OLS slope of the points ``(xs[g], ys[g])`` (one point per group, e.g. per τ), every point recomputed on
    the same resample of units."""
    if len(xs) != len(ys):
        raise BebopError(f"a slope needs as many x as y groups, got {len(xs)} and {len(ys)}")
    return lambda idx: ols_slope(np.stack([x(idx) for x in xs], -1), np.stack([y(idx) for y in ys], -1))


def pooled_slope_of(n: Sequence[float], sx: Sequence[float], sxx: Sequence[float], sy: Sequence[float],
                    sxy: Sequence[float]) -> Stat:
    """The OLS slope over every observation of the resampled units (e.g. every token of the resampled samples),
    from each unit's count and sums Σx, Σx², Σy, Σxy; NaN where x is constant."""
    a = [np.asarray(v, dtype=np.float64) for v in (n, sx, sxx, sy, sxy)]

    def stat(idx: np.ndarray) -> np.ndarray:
        N, X, XX, Y, XY = (v[idx].sum(axis=-1) for v in a)
        N = np.where(N > 0, N, np.nan)
        cxx = XX - X * X / N
        return (XY - X * Y / N) / np.where(cxx > 0, cxx, np.nan)

    return stat


# ------------------------------------------------------------------------------------------------ intervals


def _percentiles(values: np.ndarray, confidence: float) -> list[float] | None:
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
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
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentiles(stat(np.random.default_rng(seed).integers(0, n, size=(resamples, n))), confidence)


def two_sample_ci(a: Sequence[float], b: Sequence[float], stat: Callable[[np.ndarray, np.ndarray], np.ndarray],
                  resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED) -> list[float] | None:
    """Percentile CI of ``stat(a*, b*)`` where the rows of ``a*`` [R, len(a)] and ``b*`` [R, len(b)] resample ``a``
    and ``b`` independently (two samples without a pairing, e.g. the step times of two RL runs); None when either
    has fewer than :data:`MIN_UNITS` values."""
    _check(confidence, resamples)
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.size < MIN_UNITS or xb.size < MIN_UNITS:
        return None
    rng = np.random.default_rng(seed)
    ia, ib = rng.integers(0, xa.size, (resamples, xa.size)), rng.integers(0, xb.size, (resamples, xb.size))
    with np.errstate(invalid="ignore", divide="ignore"):
        return _percentiles(stat(xa[ia], xb[ib]), confidence)


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


def drift(first: np.ndarray, last: np.ndarray) -> np.ndarray:
    """Relative change of the mean along the last axis: ``mean(last) / mean(first) − 1`` (NaN where mean(first)
    is 0)."""
    m = np.asarray(first, dtype=np.float64).mean(axis=-1)
    return np.asarray(last, dtype=np.float64).mean(axis=-1) / np.where(m == 0, np.nan, m) - 1.0


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
