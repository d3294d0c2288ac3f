"""Fits used to relate acceptance to entropy and step costs to draft length: pure numpy, no model."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from bebop.errors import BebopError


def finite(v: float) -> float | None:
    """``None`` for NaN/inf so results stay strict JSON."""
    return float(v) if math.isfinite(v) else None


def linear_fit(x: Iterable[float], y: Iterable[float]) -> dict:
    """Ordinary least squares ``y ≈ slope · x + intercept`` and Pearson ``r``.

    Returns ``{"slope", "intercept", "r", "n"}``; a value that is undefined (fewer than 2 points, constant x,
    or constant y for ``r``) is ``None``. NaN pairs are dropped."""
    xa = np.asarray(list(x) if not isinstance(x, np.ndarray) else x, dtype=np.float64).ravel()
    ya = np.asarray(list(y) if not isinstance(y, np.ndarray) else y, dtype=np.float64).ravel()
    if xa.shape != ya.shape:
        raise BebopError(f"linear_fit needs x and y of the same length, got {xa.size} and {ya.size}")
    keep = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[keep], ya[keep]
    n = int(xa.size)
    out: dict = {"slope": None, "intercept": None, "r": None, "n": n}
    if n < 2:
        return out
    dx, dy = xa - xa.mean(), ya - ya.mean()
    sxx, syy, sxy = float(dx @ dx), float(dy @ dy), float(dx @ dy)
    if sxx <= 0:
        return out
    slope = sxy / sxx
    out["slope"] = finite(slope)
    out["intercept"] = finite(float(ya.mean()) - slope * float(xa.mean()))
    out["r"] = finite(sxy / math.sqrt(sxx * syy)) if syy > 0 else None
    return out
