"""Why two statistics stay hand-written instead of scipy's (issue 17: "keep a hand version only where a test
shows why"): each test computes scipy's answer on a case the study meets and shows it differs from the rule the
study fixed before its runs, and that the hand version matches an independent closed form."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from lrbs.noise_scale import bootstrap_ratio
from lrbs.papers._common import mean_sd, paired


def test_paired_is_the_two_standard_error_rule_not_a_t_test():
    diffs = [1.0, 1.5, 0.4]  # three seeds, all positive
    m, s = np.mean(diffs), np.std(diffs, ddof=1)
    assert m > 2 * s / math.sqrt(3)  # the fixed rule: beyond two standard errors
    assert paired(diffs) is True
    assert (
        stats.ttest_1samp(diffs, 0.0, alternative="greater").pvalue > 0.025
    )  # a t-test at 5% would not say so
    assert paired([1.0, -0.5, 0.6]) is None and paired([-1.0, 0.2]) is False


def test_paired_counts_a_diverged_seed_in_n():
    """The rule fixed before the runs counts every seed in n, a diverged one (NaN) included, while its NaN is left
    out of the mean and sd; scipy.stats.sem(nan_policy='omit') would take n from the finite seeds only and change
    this verdict."""
    diffs = [1.0, 0.1, 2.0, float("nan")]
    m, s = mean_sd(diffs)  # over the three finite seeds
    assert m > 2 * s / math.sqrt(4)  # beyond two standard errors with n = 4 ...
    assert m <= 2 * float(stats.sem(diffs, nan_policy="omit"))  # ... within them with scipy's n = 3
    assert paired(diffs) is True


def test_bootstrap_ratio_stays_defined_where_scipy_bootstrap_is_not():
    """Below the noise floor some resampled mean |G|^2 are <= 0: their ratios are infinite; the "lower"/"higher"
    quantiles stay defined, scipy.stats.bootstrap's interpolated percentiles do not."""
    rng = np.random.default_rng(0)
    num = rng.normal(5.0, 1.0, 8)
    den = rng.normal(0.6, 0.8, 8)  # mean |G|^2 estimates near zero: some resampled means are <= 0
    lo, hi = bootstrap_ratio(num, den, 2000, 0.9, 0)
    assert math.isfinite(lo) and hi > lo

    def ratio(n, d, axis=-1):
        d = np.mean(d, axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(d > 0, np.mean(n, axis=axis) / np.where(d > 0, d, 1.0), np.inf)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(
            (num, den), ratio, paired=True, vectorized=True, n_resamples=2000, confidence_level=0.9,
            method="percentile", random_state=0,
        )  # fmt: skip
    low, high = res.confidence_interval
    assert not (math.isfinite(low) and math.isfinite(high) and low < high)


def test_bootstrap_ratio_is_the_same_resampling_every_call():
    """The kept resampling indices give what a fresh draw gives (a naive loop over resamples), call after call,
    for hashable and unhashable entropy, and for a resampling too large to keep."""
    rng = np.random.default_rng(5)
    num, den = rng.normal(1.0, 0.3, 40), rng.normal(2.0, 0.5, 40)

    def naive(entropy, B):
        g = np.random.default_rng(entropy)
        idx = g.integers(0, len(num), size=(B, len(num)))
        ratios = sorted(num[i].mean() / den[i].mean() for i in idx)
        return ratios[int(np.floor(0.05 * (B - 1)))], ratios[int(np.ceil(0.95 * (B - 1)))]

    for entropy, B in ((3, 500), ((7, 1), 500), ([7, 1], 500), (3, 5000)):
        want = naive(entropy, B)
        for _ in range(2):
            assert bootstrap_ratio(num, den, B, 0.9, entropy) == pytest.approx(want, rel=1e-12)
