"""Bootstrap intervals and three-way verdicts on synthetic data with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from bebop.errors import BebopError
from bebop.experiments import stats
from bebop.experiments.stats import HELD, INCONCLUSIVE, NOT_HELD


def test_mean_ci_covers_the_true_mean_about_95_percent_of_the_time():
    """Over 200 independent samples of 40 normal units, the 95 % CI of the mean covers the true mean ~95 % of the
    time (percentile bootstrap undercovers a little at n = 40: accept 88–99 %)."""
    rng = np.random.default_rng(1)
    hits = 0
    for s in range(200):
        x = rng.normal(2.0, 1.0, 40)
        lo, hi = stats.mean_ci(x, resamples=400, seed=s)
        hits += lo <= 2.0 <= hi
    assert 0.88 <= hits / 200 <= 0.99, hits


def test_ci_is_reproducible_ordered_and_brackets_the_point():
    x = np.random.default_rng(0).exponential(1.0, 30)
    a, b = stats.mean_ci(x), stats.mean_ci(x)
    assert a == b and a[0] < x.mean() < a[1]
    assert stats.mean_ci(x, seed=1) != a
    wide, narrow = stats.mean_ci(x, confidence=0.99), stats.mean_ci(x, confidence=0.5)
    assert wide[0] < a[0] < narrow[0] < narrow[1] < a[1] < wide[1]


def test_no_interval_from_fewer_than_two_units_and_bad_settings_raise():
    assert stats.mean_ci([1.0, 2.0, 3.0, 4.0]) is None and stats.mean_ci([]) is None
    assert stats.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is not None
    assert stats.drift_ci([1.0] * 9) is None  # first and last 5 of 9 steps overlap
    with pytest.raises(BebopError, match="confidence"):
        stats.mean_ci([1.0, 2.0], confidence=1.0)
    with pytest.raises(BebopError, match="same units"):
        stats.paired_diff_ci([1.0, 2.0], [1.0])


def test_ratio_ci_is_a_ratio_of_sums_and_undefined_resamples_are_dropped():
    num, den = [1.0, 2.0, 3.0, 4.0] * 10, [2.0, 4.0, 6.0, 8.0] * 10  # every unit has ratio 0.5
    lo, hi = stats.ratio_ci(num, den, offset=1.0)
    assert stats.ratio_ci([1.0] * 5, [0.0] * 5) is None
    assert lo == pytest.approx(1.5) and hi == pytest.approx(1.5)
    assert np.isnan(stats.ratio_of([1.0, 1.0], [0.0, 0.0])(np.array([[0, 1]])))[0]


def test_vectorised_slope_is_linear_fits_slope():
    from bebop.core.fits import linear_fit

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
    want = [linear_fit(a, b)["slope"] for a, b in zip(x, y, strict=True)]
    assert stats.ols_slope(x, y) == pytest.approx(want)
    assert np.isnan(stats.ols_slope(np.ones((1, 3)), np.arange(3.0)[None]))[0]


def test_paired_resampling_is_narrower_than_unpaired_for_correlated_arms():
    """Two arms on the same prompts share a large prompt effect: resampling prompts jointly cancels it."""
    rng = np.random.default_rng(2)
    prompt = rng.normal(0, 1.0, 60)
    a, b = prompt + 0.3 + rng.normal(0, 0.1, 60), prompt + rng.normal(0, 0.1, 60)
    paired = stats.paired_diff_ci(a, b)
    unpaired = stats.two_sample_ci(a, b, lambda x, y: x.mean(-1) - y.mean(-1))
    assert paired[0] <= 0.3 <= paired[1]
    assert (paired[1] - paired[0]) < 0.25 * (unpaired[1] - unpaired[0])


def test_slope_ci_on_linear_data_contains_the_true_slope():
    """Per-τ groups of 50 prompts, y = 3 − 1.7 x + noise per prompt: the refitted slope's CI holds −1.7 and
    excludes 0; a flat line's CI holds 0."""
    rng = np.random.default_rng(3)
    xs = [rng.normal(m, 0.05, 50) for m in (0.2, 0.4, 0.6, 0.8, 1.0)]
    ys = [3 - 1.7 * x + rng.normal(0, 0.2, 50) for x in xs]
    lo, hi = stats.slope_ci(xs, ys)
    assert lo < -1.7 < hi < 0
    flat = stats.slope_ci(xs, [3 + rng.normal(0, 0.2, 50) for _ in xs])
    assert flat[0] < 0 < flat[1]
    with pytest.raises(BebopError, match="same units"):
        stats.slope_ci(xs, [y[:10] for y in ys])


def test_pooled_slope_refits_every_observation_of_the_resampled_units():
    """Units of several observations each, summarised by their sums: the full sample gives linear_fit's slope over
    every observation, and the CI over units holds the true slope."""
    from bebop.core.fits import linear_fit

    rng = np.random.default_rng(6)
    xs = [rng.uniform(0, 1, rng.integers(3, 9)) for _ in range(40)]
    ys = [2 - 0.8 * x + rng.normal(0, 0.1, x.size) for x in xs]
    sums = [[float(f(x, y)) for x, y in zip(xs, ys, strict=True)]
            for f in (lambda x, y: x.size, lambda x, y: x.sum(), lambda x, y: (x * x).sum(), lambda x, y: y.sum(),
                      lambda x, y: (x * y).sum())]
    stat = stats.pooled_slope_of(*sums)
    full = stat(np.arange(40)[None])[0]
    assert full == pytest.approx(linear_fit(np.concatenate(xs), np.concatenate(ys))["slope"])
    lo, hi = stats.bootstrap_ci(stat, 40)
    assert lo < -0.8 < hi


def test_drift_ci_over_steps():
    steady = [3.0 + 0.01 * (-1) ** i for i in range(12)]
    falling = [3.0 - 0.1 * i for i in range(12)]
    assert stats.verdict(stats.drift_ci(steady), "abs<", 0.02) == HELD
    lo, hi = stats.drift_ci(falling)
    assert hi < -0.02
    assert float(stats.drift([2.0, 2.0], [1.0, 1.0])) == pytest.approx(-0.5)


@pytest.mark.parametrize(("ci", "op", "t", "want"), [
    ([0.05, 0.08], ">=", 0.03, HELD), ([0.00, 0.02], ">=", 0.03, NOT_HELD), ([0.01, 0.05], ">=", 0.03, INCONCLUSIVE),
    ([-2.0, -1.0], "<=", -0.5, HELD), ([-0.2, 0.1], "<=", -0.5, NOT_HELD), ([-0.7, -0.3], "<=", -0.5, INCONCLUSIVE),
    ([-0.01, 0.01], "abs<", 0.02, HELD), ([0.03, 0.05], "abs<", 0.02, NOT_HELD), ([-0.05, -0.03], "abs<=", 0.02,
                                                                                  NOT_HELD),
    ([-0.01, 0.03], "abs<", 0.02, INCONCLUSIVE), ([0.0, 1.0], ">", 0.0, INCONCLUSIVE), ([0.1, 1.0], ">", 0.0, HELD),
    ([-1.0, 0.0], ">", 0.0, NOT_HELD), ([-1.0, -0.1], "<", 0.0, HELD), (None, ">=", 0.0, INCONCLUSIVE),
])
def test_verdict_from_the_whole_interval(ci, op, t, want):
    assert stats.verdict(ci, op, t) == want


def test_verdict_rejects_an_unknown_comparison_and_claims_combine_their_parts():
    with pytest.raises(BebopError, match="unknown comparison"):
        stats.verdict([0.0, 1.0], "==", 0.0)
    assert stats.combine([HELD, HELD]) == HELD
    assert stats.combine([HELD, INCONCLUSIVE]) == INCONCLUSIVE
    assert stats.combine([HELD, INCONCLUSIVE, NOT_HELD]) == NOT_HELD
    assert stats.combine([]) == INCONCLUSIVE


def test_claims_built_to_hold_to_fail_and_to_straddle():
    """A gain of +8 points measured on 64 prompts is held against "≥ 3 points", a gain of 0 is not held, and a
    noisy +3-point gain on 8 prompts straddles the threshold: inconclusive."""
    rng = np.random.default_rng(4)

    def judged(gain: float, n: int, noise: float) -> str:
        base = rng.uniform(0.6, 0.9, n)
        ci = stats.paired_diff_ci(base + gain + rng.normal(0, noise, n), base)
        return stats.verdict(ci, ">=", 0.03)

    assert judged(0.08, 64, 0.01) == HELD
    assert judged(0.0, 64, 0.01) == NOT_HELD
    assert judged(0.03, 8, 0.05) == INCONCLUSIVE


def test_change_of_is_a_paired_relative_change():
    """The same units measured 10 % higher after: the paired relative change is exactly +10 % on every resample,
    while unpaired noise between the units would blur it."""
    rng = np.random.default_rng(3)
    before = rng.exponential(1.0, 30) + 1.0
    lo, hi = stats.bootstrap_ci(stats.change_of(stats.mean_of(1.1 * before), stats.mean_of(before)), 30)
    assert lo == pytest.approx(0.1) and hi == pytest.approx(0.1)
    zero = stats.change_of(stats.mean_of(before), stats.mean_of(np.zeros(30)))
    assert np.isnan(zero(np.arange(30)[None, :])).all()
