"""Statistics the paper modules share (on :mod:`scipy.stats`).

- :func:`spearman`: Spearman's rank correlation of a trend, with the rule for non-finite values made explicit.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import check_choice

__all__ = ["NONFINITE", "spearman"]

#: what :func:`spearman` does with non-finite ``y`` values
NONFINITE = ("propagate", "omit")


def spearman(x: Sequence[float], y: Sequence[float], *, nonfinite: str = "propagate") -> float:
    r"""Spearman's rank correlation :math:`\rho` of ``y`` against ``x``: ``scipy.stats.spearmanr(x, y).statistic``.

    :math:`\rho` is Pearson's correlation of the ranks,
    :math:`\rho = \operatorname{cov}(R(x), R(y)) / (\sigma_{R(x)}\,\sigma_{R(y)})` (ties get their mean rank).

    Args:
        x: the abscissa (e.g. batch sizes, training steps).
        y: the values whose trend is measured, one per ``x``.
        nonfinite: the rule for non-finite values of ``y``:

            - ``"propagate"``: every point is used as given; a NaN anywhere makes the result NaN (scipy's
              ``nan_policy="propagate"``): a diverged run's measurement leaves the trend unmeasured, not
              silently dropped; infinities are ranked as the largest / smallest values.
            - ``"omit"``: only the points where ``y`` is finite are used (NaN *and* infinite ``y`` left out,
              e.g. an infinite noise scale where the signal is below the noise floor, as in the means).

    Returns:
        :math:`\rho`, or NaN with fewer than 3 points (after omitting, under ``"omit"``).

    Raises:
        ConfigError: ``nonfinite`` is not one of :data:`NONFINITE`.
    """
    from scipy.stats import spearmanr

    nonfinite = check_choice("nonfinite", nonfinite, NONFINITE)
    if nonfinite == "omit":
        y = np.asarray(y, float)
        ok = np.isfinite(y)
        x, y = np.asarray(x, float)[ok], y[ok]
    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)
