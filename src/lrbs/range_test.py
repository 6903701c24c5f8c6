r"""The LR range test: a short sweep of growing learning rates, its suggestions, and an exact restore.

The model is trained for ``num_iter`` steps while the learning rate grows from ``start_lr`` to ``end_lr``
(Smith 2017). The smoothed loss against ``log(lr)`` shows where training starts to work, where it is fastest
and where it breaks down; four published rules read a learning rate off that curve. Afterwards the model, the
optimizer and every global random state are put back bit for bit, so a range test leaves no trace on the
training that follows.

What this adds to torch-lr-finder, fastai and Lightning (``reference/schedules_and_range_test.md`` §3-4):

- suggestions are checked against each other (:meth:`RangeTestResult.suggestions` says whether they agree
  within a factor of 3) and one of them is recommended with the reason (:meth:`RangeTestResult.recommended`);
- ``repeats=k`` runs k sweeps from the same start over different data orders and reports the median suggestion
  with its spread;
- the restore covers parameters, buffers (BatchNorm statistics), gradients, the optimizer's state and
  param-group settings, the training flags, the torch / numpy / python random states and seeded DataLoader
  generators;
- ``[base_lr, max_lr]`` bounds for cyclical and one-cycle schedules (:meth:`RangeTestResult.lr_bounds`).

**The sweep** (:func:`lr_range_test`). At iteration :math:`i = 0 \dots N-1` the learning rate is

.. math::

    \text{exp:}\ \ \eta_i = \eta_0 (\eta_{\text{end}} / \eta_0)^{i/(N-1)}, \qquad
    \text{linear:}\ \ \eta_i = \eta_0 + \tfrac{i}{N-1} (\eta_{\text{end}} - \eta_0),

from ``start_lr`` to ``end_lr`` inclusive. Every param group is swept and keeps its ratio to group 0
(group g gets :math:`\eta_i \cdot \text{lr}_g / \text{lr}_0`, with the optimizer's lrs before the test;
all groups get :math:`\eta_i` if group 0's lr is 0). The loss is smoothed with the bias-corrected EMA

.. math::

    v_i = \beta v_{i-1} + (1-\beta) L_i,\quad v_{-1} = 0,\qquad s_i = v_i / (1 - \beta^{i+1}),

and the sweep stops (never raises) at the first :math:`s_i` that is not finite or exceeds
``diverge_factor`` x its running minimum (:math:`s_i - m > (f-1)|m|`, i.e. :math:`s_i > f m` for a
positive minimum :math:`m`); that point is recorded as ``diverged_at``.

With ``restore=True`` (the default) the model's parameters, buffers, gradients and training flags, the
optimizer's state and param-group settings, and the torch (CPU, and the model's CUDA device), numpy and
python random states are bit-identical afterwards, also when the sweep raises. The snapshot lives in CPU
memory. Seeded generators of a DataLoader (its ``generator``, its sampler's) are reseeded for each sweep
and restored. With ``restore=False`` the model and optimizer are left where the last sweep left them (on
an accelerator, up to 15 steps past the stop point, since divergence is checked every 16 steps there); the
random states are restored either way.

**Data.** ``data`` is anything :func:`lrbs.batches.as_source` takes. Indexable data (an lrbs ``Dataset`` (its
train split), a ``Split``, ``(x, y)`` / ``(x1, ..., xk, y)`` tensors or a dict of tensors (moved to the model's
device once), a ``TensorDataset``, a map-style ``Dataset``) is sampled in seeded batches of ``batch_size``
without replacement; a DataLoader, a list of batches or an ``IterableDataset`` (batched by ``batch_size``) gives
its own batches, cycled if it has fewer than ``num_iter x accumulation_steps``. ``val_data`` costs a pass over
it per iteration (torch-lr-finder's validation mode).

**Precision.** ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA): autocast, and for ``16-mixed`` a
GradScaler; a step it skips (non-finite gradients) is not an lr step: the same lr is tried again, and after 10
skips in a row the sweep stops as ``"non-finite"``. The training step is :class:`lrbs.step.TrainStep`, the one
``fit`` uses.

**Example.**

    >>> from lrbs.data import load_dataset
    >>> from lrbs.models import build_model
    >>> ds = load_dataset("blobs", n_train=256, n_test=64, num_features=4, num_classes=3)
    >>> model = build_model("mlp", dataset=ds, depth=2, width=16)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> res = lr_range_test(model, opt, data=ds, start_lr=1e-4, end_lr=10, num_iter=50)
    >>> lr, why = res.recommended()
    >>> 1e-4 < lr < 10
    True

References:
    Smith. Cyclical Learning Rates for Training Neural Networks. WACV 2017 (arXiv 1506.01186).
    Smith. A disciplined approach to neural network hyper-parameters: Part 1. 2018 (arXiv 1803.09820).
    fastai ``fastai/callback/schedule.py`` (valley, slide, minimum); davidtvs/pytorch-lr-finder.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .batches import BatchLoss, BatchStream, LoaderSource, TensorSource, as_source, model_device
from .errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number, check_positive
from .step import TrainStep, check_precision
from .train import EvalSet, evaluate_batches

__all__ = [
    "lr_range_test",
    "RangeTestResult",
    "RangeTestSweep",
    "Suggestions",
    "SUGGESTION_METHODS",
    "smooth_losses",
    "suggest_lr",
]

SUGGESTION_METHODS = ("valley", "steepest", "minimum", "slide")
_MIN_POINTS = 10  # fewer finite points than this after trimming and no suggestion is trusted
_SKIP_END = 5  # points dropped at the end of the curve before suggesting (fastai, torch-lr-finder)
_AGREE_FACTOR = 3.0  # suggestions "agree" when max / min <= this


# --------------------------------------------------------------------------- curve helpers (pure)
def smooth_losses(losses: Iterable[float], beta: float = 0.98) -> np.ndarray:
    r"""Bias-corrected exponential moving average of the losses (fastai's ``AvgSmoothLoss``).

    .. math::

        v_i = \beta v_{i-1} + (1-\beta) L_i,\quad v_{-1} = 0,\qquad s_i = \frac{v_i}{1 - \beta^{i+1}}

    so :math:`s_0 = L_0` (no start-up bias) and ``beta=0`` returns the raw losses.

    Args:
        losses: the raw losses :math:`L_0, L_1, \dots`.
        beta: smoothing in ``[0, 1)``.

    Returns:
        The smoothed losses (float64); a non-finite loss makes every later value non-finite.

    Raises:
        ConfigError: ``beta`` is outside ``[0, 1)``.
    """
    beta = check_number("smoothing", beta, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
    out = []
    v = 0.0
    for i, loss in enumerate(losses):
        v = beta * v + (1.0 - beta) * float(loss)
        out.append(v / (1.0 - beta ** (i + 1)))
    return np.asarray(out, dtype=np.float64)


def _window(
    lrs: np.ndarray, smoothed: np.ndarray, skip_start: int, skip_end: int
) -> tuple[np.ndarray, np.ndarray]:
    """Trim ``[skip_start : n - skip_end]`` (fastai), then cut at the first non-finite point."""
    hi = max(skip_start, len(smoothed) - skip_end)
    lw, sw = lrs[skip_start:hi], smoothed[skip_start:hi]
    bad = ~np.isfinite(sw)
    if bad.any():
        cut = int(np.argmax(bad))
        lw, sw = lw[:cut], sw[:cut]
    return lw, sw


def _too_few(n: int, lrs: np.ndarray, smoothed: np.ndarray, skip_start: int, skip_end: int) -> ConfigError:
    where = f"; it stopped at lr={lrs[-1]:.3g} after {len(smoothed)} iterations" if len(lrs) else ""
    return ConfigError(
        f"the range test recorded only {n} finite points after trimming {skip_start} at the start and "
        f"{skip_end} at the end (need >= {_MIN_POINTS}): the sweep diverged too early{where}. Lower start_lr "
        "or end_lr, or raise num_iter"
    )


def _valley(lw: np.ndarray, sw: np.ndarray) -> int:
    """fastai's valley: the middle of the longest decreasing subsequence of the smoothed loss (O(n^2))."""
    n = len(sw)
    lds = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        higher = sw[:i] > sw[i]
        if higher.any():
            lds[i] = lds[:i][higher].max() + 1
    end = int(np.argmax(lds))  # first index of the longest valley's end
    start = end - int(lds[end])
    sections = (end - start) / 3
    return min(max(start + int(sections) + int(sections / 2), 0), n - 1)


def _slide(sw: np.ndarray, lr_diff: int = 15, thresh: float = 0.005) -> int:
    """fastai's slide: move a window of ``lr_diff`` points left from the end while the gradients differ."""
    n = len(sw)
    lr_diff = min(lr_diff, n - 1)  # fastai indexes out of range on curves shorter than lr_diff + 1
    g = np.gradient(sw)
    r, left = n - 1, n - 1 - lr_diff
    pick = left
    while left >= 0 and abs(g[r] - g[left]) > thresh:
        pick = left
        r, left = r - 1, left - 1
    return pick


def suggest_lr(
    lrs: Iterable[float],
    smoothed: Iterable[float],
    method: str = "valley",
    *,
    skip_start: int = 10,
    skip_end: int = _SKIP_END,
) -> tuple[float, int]:
    r"""Read a learning rate off a range-test curve.

    The curve is trimmed to ``[skip_start : n - skip_end]`` and cut at its first non-finite point (fastai's
    ``[num_it // 10 : -5]``), then:

    - ``valley`` (fastai's default): the longest decreasing subsequence of the smoothed loss,
      ``end = argmax lds``, ``start = end - lds[end]``, ``sec = (end - start) / 3``; the pick is
      ``start + floor(sec) + floor(sec / 2)``, about the middle of the valley.
    - ``steepest``: ``argmin ds/d(log lr)`` with central differences in log lr,
      ``np.gradient(s, np.log(lrs))``. torch-lr-finder differentiates over the index and Lightning over
      linear lr; on an exp sweep the index and log lr differ only by a constant factor, on a linear sweep
      they do not.
    - ``minimum``: the lr at the minimum of the smoothed loss, divided by 10.
    - ``slide`` (``lr_diff=15``, ``thresh=0.005``): with ``g = np.gradient(s)``, slide the pair
      ``(r, r - 15)`` left from the end while ``|g_r - g_{r-15}| > 0.005``; the pick is the left end.

    Args:
        lrs: the learning rates of the sweep, increasing.
        smoothed: the smoothed losses (same length).
        method: one of ``valley``, ``steepest``, ``minimum``, ``slide``.
        skip_start: points dropped at the start (``num_iter // 10`` in :func:`lr_range_test`).
        skip_end: points dropped at the end.

    Returns:
        ``(lr, index)``: the suggested learning rate and the index of the sweep point nearest to it in log lr.

    Raises:
        ConfigError: unknown method (the closest is suggested), arrays of different lengths, or fewer than 10
            finite points after trimming (the sweep diverged too early).

    Example:
        >>> lrs = np.geomspace(1e-4, 1, 50)
        >>> loss = 1 / (1 + np.exp(np.log10(lrs) + 2.0))  # a sigmoid that falls fastest at lr = 1e-2
        >>> lr, i = suggest_lr(lrs, loss, "steepest", skip_start=5)
        >>> round(float(np.log10(lr)), 1)
        -2.0
    """
    method = check_choice("method", method, SUGGESTION_METHODS)
    lrs = np.asarray(lrs, dtype=np.float64)
    s = np.asarray(smoothed, dtype=np.float64)
    if lrs.shape != s.shape or lrs.ndim != 1:
        raise ConfigError(
            f"lrs (shape {lrs.shape}) and smoothed (shape {s.shape}) must be 1-D of the same length"
        )
    skip_start = check_int("skip_start", skip_start, low=0)
    skip_end = check_int("skip_end", skip_end, low=0)
    lw, sw = _window(lrs, s, skip_start, skip_end)
    if len(sw) < _MIN_POINTS:
        raise _too_few(len(sw), lrs, s, skip_start, skip_end)
    if method == "valley":
        lr = float(lw[_valley(lw, sw)])
    elif method == "steepest":
        lr = float(lw[int(np.argmin(np.gradient(sw, np.log(lw))))])
    elif method == "minimum":
        lr = float(lw[int(np.argmin(sw))]) / 10.0
    else:
        lr = float(lw[_slide(sw)])
    return lr, _nearest(lrs, lr)


def _nearest(lrs: np.ndarray, lr: float) -> int:
    return int(np.argmin(np.abs(np.log(lrs) - math.log(lr))))


def _median(values: list[float]) -> float:
    """Median of positive values; for an even count the geometric mean of the middle two (median in log)."""
    v = sorted(values)
    k = len(v)
    return v[k // 2] if k % 2 else math.sqrt(v[k // 2 - 1] * v[k // 2])


def _finite_or_none(a: Iterable[float]) -> list[float | None]:
    return [float(x) if math.isfinite(float(x)) else None for x in a]


# --------------------------------------------------------------------------- results
@dataclass(frozen=True, eq=False)
class RangeTestSweep:
    """One sweep of a range test.

    Attributes:
        lrs: the learning rate (of param group 0) at each recorded iteration.
        losses: the raw loss at each iteration (the training batch's loss, or the validation loss).
        smoothed: the bias-corrected EMA of ``losses`` (:func:`smooth_losses`).
        stopped_early: the divergence rule fired; the sweep ended at ``diverged_at``.
        diverged_at: index of the first point whose smoothed loss exceeded ``diverge_factor`` x its minimum
            or was not finite (it is recorded), else None.
        stop_reason: ``"diverged"``, ``"non-finite"`` or None.
        seed: the seed of this sweep's data order.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped_early: bool
    diverged_at: int | None
    stop_reason: str | None
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (non-finite losses become None)."""
        return {**_curve_dict(self), "seed": self.seed}


def _curve_dict(sw: RangeTestSweep | RangeTestResult) -> dict[str, Any]:
    """The curve fields a sweep and a result share, JSON-able (non-finite losses become None)."""
    return {
        "lrs": [float(x) for x in sw.lrs],
        "losses": _finite_or_none(sw.losses),
        "smoothed": _finite_or_none(sw.smoothed),
        "stopped_early": sw.stopped_early,
        "diverged_at": sw.diverged_at,
        "stop_reason": sw.stop_reason,
    }


@dataclass(frozen=True)
class Suggestions:
    """All suggestions of a range test, whether they agree, and the recommendation.

    Attributes:
        lrs: method -> suggested lr (the median over repeats).
        indices: method -> index of the nearest point of the first sweep.
        agree: ``max(lrs) / min(lrs) <= 3``.
        ratio: ``max(lrs) / min(lrs)``.
        spread: method -> ``{"median", "min", "max", "geo_sd", "values", "n"}`` over the repeats; ``geo_sd``
            is ``exp(sd(log lr))`` (sample sd), None with a single sweep.
        recommended: the recommended lr.
        reason: why it is recommended.
    """

    lrs: dict[str, float]
    indices: dict[str, int]
    agree: bool
    ratio: float
    spread: dict[str, dict[str, Any]]
    recommended: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-able."""
        return {
            "lrs": dict(self.lrs),
            "indices": dict(self.indices),
            "agree": self.agree,
            "ratio": self.ratio,
            "spread": copy.deepcopy(self.spread),
            "recommended": self.recommended,
            "reason": self.reason,
        }


@dataclass(frozen=True, eq=False)
class RangeTestResult:
    """The outcome of :func:`lr_range_test`.

    The arrays are those of the first sweep; ``sweeps`` holds all of them (``repeats`` > 1). Suggestions,
    bounds and the recommendation are medians over the sweeps that recorded enough points.

    Attributes:
        lrs: learning rate (param group 0) per recorded iteration.
        losses: raw loss per iteration.
        smoothed: bias-corrected EMA of the losses.
        stopped_early: the divergence rule fired in the first sweep.
        diverged_at: index where the first sweep stopped, else None.
        stop_reason: ``"diverged"``, ``"non-finite"`` or None.
        settings: every argument that shaped the sweep (JSON-able).
        sweeps: all sweeps.
        wall_time: seconds, restore included.
    """

    # The first sweep's fields again (RangeTestSweep's first six, minus ``seed``): the result reads as that sweep
    # plus the others, and its constructor, pickles and to_dict stay as they were.
    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    stopped_early: bool
    diverged_at: int | None
    stop_reason: str | None
    settings: dict[str, Any]
    sweeps: tuple[RangeTestSweep, ...] = field(default_factory=tuple)
    wall_time: float = 0.0

    @property
    def skip_start(self) -> int:
        """Points trimmed at the start before suggesting: ``num_iter // 10`` (fastai)."""
        return int(self.settings.get("num_iter", len(self.lrs))) // 10

    def _per_sweep(self, method: str) -> list[float]:
        vals, err = [], None
        for sw in self.sweeps or (self,):
            try:
                vals.append(suggest_lr(sw.lrs, sw.smoothed, method, skip_start=self.skip_start)[0])
            except ConfigError as e:
                err = e
        if not vals:
            raise err  # type: ignore[misc]
        return vals

    def suggest(self, method: str = "valley") -> tuple[float, int]:
        """The learning rate suggested by ``method`` (see :func:`suggest_lr`) and its index in :attr:`lrs`.

        With several sweeps, the median over the sweeps that recorded enough points.

        Raises:
            ConfigError: unknown method, or too few finite points (the sweep diverged too early).
        """
        method = check_choice("method", method, SUGGESTION_METHODS)
        lr = _median(self._per_sweep(method))
        return lr, _nearest(self.lrs, lr)

    def suggestions(self) -> Suggestions:
        """All four suggestions, their spread over repeats, whether they agree, and the recommendation.

        The recommendation is ``valley`` when the four agree within a factor of 3; otherwise the median of the
        four (the geometric mean of the middle two), which no single rule's failure mode can drag far. Every
        rule reads only points at least 5 iterations before the stop, so the recommendation is below the point
        where the sweep diverged; as a guard it is also capped below the lowest divergence lr over the sweeps.

        Raises:
            ConfigError: too few finite points (the sweep diverged too early).
        """
        per = {m: self._per_sweep(m) for m in SUGGESTION_METHODS}
        lrs = {m: _median(v) for m, v in per.items()}
        spread = {}
        for m, v in per.items():
            logs = np.log(v)
            spread[m] = {
                "median": lrs[m],
                "min": float(min(v)),
                "max": float(max(v)),
                "geo_sd": float(np.exp(np.std(logs, ddof=1))) if len(v) > 1 else None,
                "values": [float(x) for x in v],
                "n": len(v),
            }
        ratio = max(lrs.values()) / min(lrs.values())
        agree = ratio <= _AGREE_FACTOR
        listing = ", ".join(f"{m} {lrs[m]:.3g}" for m in SUGGESTION_METHODS)
        if agree:
            rec = lrs["valley"]
            reason = (
                f"valley: the four suggestions agree within a factor of {ratio:.2f} (<= {_AGREE_FACTOR:g}) "
                f"({listing}); valley, fastai's default, sits in the middle of the longest descent"
            )
        else:
            rec = _median(list(lrs.values()))
            reason = (
                f"the median of the four suggestions: they disagree by a factor of {ratio:.3g} "
                f"(> {_AGREE_FACTOR:g}) ({listing}), so no single rule is trusted"
            )
        div = [sw.lrs[sw.diverged_at] for sw in self.sweeps or (self,) if sw.diverged_at is not None]
        if div and rec >= min(div):
            below = self.lrs[self.lrs < min(div)]
            rec = float(below[max(0, len(below) - 1 - _SKIP_END)]) if len(below) else float(self.lrs[0])
            reason += f"; capped below the lowest divergence lr {min(div):.3g}"
        return Suggestions(
            lrs=lrs,
            indices={m: _nearest(self.lrs, v) for m, v in lrs.items()},
            agree=agree,
            ratio=float(ratio),
            spread=spread,
            recommended=float(rec),
            reason=reason,
        )

    def recommended(self) -> tuple[float, str]:
        """The learning rate this tool recommends, and why (see :meth:`suggestions`).

        Raises:
            ConfigError: too few finite points (the sweep diverged too early).
        """
        s = self.suggestions()
        return s.recommended, s.reason

    def lr_bounds(self) -> tuple[float, float]:
        r"""``(base_lr, max_lr)`` for cyclical and one-cycle schedules (Smith 2017, §3.3).

        Smith takes the lr where the loss starts to fall as the lower bound and the lr where it stops falling
        as the upper one. On the trimmed smoothed curve :math:`s` with total descent
        :math:`D = s_{\text{first}} - \min s`: ``base_lr`` is the first lr where 10% of the descent is done
        (:math:`s \le s_{\text{first}} - 0.1 D`; a smaller fraction would be read off the plateau's noise)
        and ``max_lr`` the first lr where 90% is done (:math:`s \le \min s + 0.1 D`), at or before the
        minimum. Medians over repeats.

        Raises:
            ConfigError: too few finite points, or the smoothed loss never fell (nothing to bound).
        """
        bases, maxes, err = [], [], None
        for sw in self.sweeps or (self,):
            lw, s = _window(sw.lrs, sw.smoothed, self.skip_start, _SKIP_END)
            if len(s) < _MIN_POINTS:
                err = _too_few(len(s), sw.lrs, sw.smoothed, self.skip_start, _SKIP_END)
                continue
            drop = s[0] - s.min()
            if not drop > 0:
                err = ConfigError(
                    f"the smoothed loss never fell below its value {s[0]:.4g} at lr={lw[0]:.3g}: there is no "
                    "descent to bound; lower start_lr or raise end_lr"
                )
                continue
            i_max = int(np.argmax(s <= s.min() + 0.1 * drop))
            i_base = int(np.argmax(s <= s[0] - 0.1 * drop))
            i_base = min(i_base, max(0, i_max - 1))
            bases.append(float(lw[i_base]))
            maxes.append(float(lw[i_max]))
        if not bases:
            raise err  # type: ignore[misc]
        return _median(bases), _median(maxes)

    def plot(self, ax: Any = None) -> Any:
        """Raw (faint) and smoothed loss against the lr on a log axis, with the suggestions marked.

        Args:
            ax: a matplotlib Axes; a new figure (``matplotlib.figure.Figure``, no pyplot) when None.

        Returns:
            The Axes.
        """
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(6.4, 4.2)).add_subplot()
        for r, sw in enumerate(self.sweeps or (self,)):
            first = r == 0
            ax.plot(
                sw.lrs,
                sw.losses,
                color="C0",
                alpha=0.25 if first else 0.12,
                lw=0.8,
                label="raw loss" if first else None,
            )
            ax.plot(
                sw.lrs,
                sw.smoothed,
                color="C0",
                alpha=1.0 if first else 0.45,
                lw=1.6 if first else 0.9,
                label="smoothed" if first else None,
            )
        ax.set_xscale("log")
        ok = np.isfinite(self.smoothed)
        try:
            sug = self.suggestions()
        except ConfigError:
            sug = None
        if sug is not None and ok.sum() >= 2:
            xs, ys = np.log(self.lrs[ok]), self.smoothed[ok]
            for k, m in enumerate(SUGGESTION_METHODS):
                lr = sug.lrs[m]
                ax.scatter(
                    [lr],
                    [np.interp(math.log(lr), xs, ys)],
                    color=f"C{k + 1}",
                    zorder=3,
                    s=30,
                    label=f"{m} {lr:.2g}",
                )
            ax.axvline(sug.recommended, color="k", ls="--", lw=1, label=f"recommended {sug.recommended:.2g}")
        if self.diverged_at is not None:
            ax.axvline(self.lrs[self.diverged_at], color="C3", ls=":", lw=1, label="stopped")
        if ok.any():
            lo, hi = float(self.smoothed[ok].min()), float(self.smoothed[ok][0])
            hi = max(hi, lo) + 0.05 * abs(max(hi, lo))
            span = max(hi - lo, 1e-12)
            ax.set_ylim(lo - 0.1 * span, hi + 0.3 * span)
        ax.set_xlabel("learning rate (log scale)")
        ax.set_ylabel("validation loss" if self.settings.get("validation") else "training loss")
        ax.legend(fontsize=8)
        return ax

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the curves, the settings, and the suggestions (or why there are none)."""
        out: dict[str, Any] = {
            **_curve_dict(self),
            "settings": copy.deepcopy(self.settings),
            "sweeps": [sw.to_dict() for sw in self.sweeps[1:]],
            "wall_time": self.wall_time,
            "suggestions": None,
            "lr_bounds": None,
            "error": None,
        }
        try:
            out["suggestions"] = self.suggestions().to_dict()
            out["lr_bounds"] = list(self.lr_bounds())
        except ConfigError as e:
            out["error"] = str(e)
        return out


# --------------------------------------------------------------------------- data
def _source(data: Any, batch_size: int | None, device: torch.device) -> tuple[Any, int | None]:
    """The batch source of ``data`` and the batch size drawn from it (None: a loader's own batches).

    Tensors are moved to the model's device once (as the range test always did); other sources stream.
    """
    _check_data(data, batch_size)
    try:
        src = as_source(data, name="data", batch_size=batch_size)
    except LrbsTypeError:
        raise LrbsTypeError(
            f"data={type(data).__name__} is not allowed: give a DataLoader, a list of batches, an lrbs Dataset or "
            "Split, (x, y) / (x1, ..., xk, y) tensors, a TensorDataset, a map-style or iterable torch Dataset"
        ) from None
    if isinstance(src, LoaderSource):
        return src, None
    if isinstance(src, TensorSource) and any(t.device != device for t in src.tensors):
        moved = [t.to(device) for t in src.tensors]
        src = TensorSource(dict(zip(src.keys, moved)) if src.keys is not None else moved)
    b = 64 if batch_size is None else batch_size
    if b > src.num_samples:
        raise ConfigError(
            f"batch_size={b} is not allowed: must be <= {src.num_samples} (the number of samples)"
        )
    return src, b


def _check_data(data: Any, batch_size: int | None) -> None:
    """Reject missing or empty data and a batch size that differs from a DataLoader's own."""
    if data is None:
        raise ConfigError(
            "data=None is not allowed: give a DataLoader, an lrbs Dataset or Split, (x, y) tensors, a torch "
            "Dataset or a list of batches"
        )
    if isinstance(data, torch.utils.data.DataLoader):
        if batch_size is not None and data.batch_size is not None and batch_size != data.batch_size:
            raise ConfigError(
                f"batch_size={batch_size!r} is not allowed with a DataLoader of batch_size="
                f"{data.batch_size}: leave it None (the loader's batches are used) or pass the dataset itself"
            )
        if _safe_len(data) == 0:
            raise ConfigError("data is empty: the DataLoader has no batches")
    elif isinstance(data, (list, tuple)) and len(data) == 0:
        raise ConfigError("data is empty: the list of batches has no batches")
    if _num_tensor_samples(data) == 0:
        raise ConfigError("data is empty: it has 0 samples")


def _num_tensor_samples(data: Any) -> int | None:
    """The sample count of tensor data (a Split or a tuple of tensors), else None."""
    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, torch.utils.data.Dataset):
        data = data.train
    if hasattr(data, "x") and isinstance(getattr(data, "x", None), torch.Tensor):
        return len(data.x)
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data):
        return len(data[0])
    return None


def _safe_len(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


# --------------------------------------------------------------------------- snapshot / restore
def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor cloned to CPU memory."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(v) for v in obj)
    return copy.deepcopy(obj)


class _Snapshot:
    """Parameters, buffers, gradients, optimizer state and training flags, held in CPU memory."""

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer):
        self.model, self.opt = model, opt
        self.params = {k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters()}
        self.grads = {
            k: None if p.grad is None else p.grad.detach().to("cpu", copy=True)
            for k, p in model.named_parameters()
        }
        self.buffers = {k: b.detach().to("cpu", copy=True) for k, b in model.named_buffers()}
        self.opt_state = _to_cpu(opt.state_dict())

    def restore(self) -> None:
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        with torch.no_grad():
            for k, v in self.params.items():
                params[k].copy_(v)
            for k, v in self.buffers.items():
                buffers[k].copy_(v)
        for k, g in self.grads.items():
            p = params[k]
            p.grad = None if g is None else g.to(p.device, copy=True)
        # load_state_dict may keep the tensors it is given: hand it a fresh copy so later sweeps cannot write
        # into the snapshot.
        self.opt.load_state_dict(_clone(self.opt_state))


# --------------------------------------------------------------------------- the test
def _sweep_lrs(start: float, end: float, n: int, mode: str) -> np.ndarray:
    i = np.arange(n, dtype=np.float64)
    if mode == "exp":
        return start * (end / start) ** (i / (n - 1))
    return start + i / (n - 1) * (end - start)


_MAX_SKIPS = 10  # consecutive GradScaler skips at one lr before the sweep stops as non-finite


@dataclass
class _Sweep:
    """What every sweep of one range test shares: the model, the optimizer, the data and the settings."""

    model: nn.Module
    opt: torch.optim.Optimizer
    batch_loss: BatchLoss
    source: Any
    batch_size: int | None
    device: torch.device
    precision: str
    lrs: np.ndarray
    ratios: list[float]
    beta: float
    factor: float | None
    accum: int
    val: Any
    sync_every: int

    def _set_lr(self, lr: float) -> None:
        for g, r in zip(self.opt.param_groups, self.ratios):
            if isinstance(g["lr"], torch.Tensor):
                g["lr"].fill_(lr * r)
            else:
                g["lr"] = lr * r

    def _step(self, step: TrainStep, stream: BatchStream) -> tuple[torch.Tensor, bool]:
        """One optimizer step on ``accum`` batches (each loss divided by ``accum``, or weighted by batch_weight)."""
        if self.accum == 1:
            res = step([stream.next()])
        else:
            mbs = [stream.next() for _ in range(self.accum)]
            if self.batch_loss.batch_weight is None:
                res = step(mbs, divisor=self.accum)
            else:
                w = [self.batch_loss.weight(b) for b in mbs]
                res = step(mbs, [x / sum(w) for x in w])
        return res.loss, res.applied

    def run(self, seed: int) -> RangeTestSweep:
        """One sweep; the hot loop holds no per-step sync on accelerators."""
        model, n_iter = self.model, len(self.lrs)
        step = TrainStep(model, self.opt, self.batch_loss, precision=self.precision, device=self.device)
        raw: list[float] = []
        smooth: list[float] = []
        v, best = 0.0, math.inf
        stop, reason = None, None
        pending: list[Any] = []
        stream = BatchStream(self.source, self.batch_size, self.device, seed)
        model.train()
        i = skips = 0
        try:
            while i < n_iter:
                self._set_lr(float(self.lrs[i]))
                total, applied = self._step(step, stream)
                if not applied:  # a GradScaler skip is not an LR step: the same lr is tried again
                    skips += 1
                    if skips < _MAX_SKIPS:
                        continue
                    stop, reason = len(raw), "non-finite"
                    break
                skips = 0
                if self.val is not None:
                    total = evaluate_batches(model, self.val.batches(), self.batch_loss, self.precision)[
                        "loss"
                    ]
                pending.append(total)
                i += 1
                if len(pending) < self.sync_every and i < n_iter:
                    continue
                vals = [float(pending[0])] if len(pending) == 1 else torch.stack(pending).tolist()
                pending.clear()
                for loss_v in vals:
                    k = len(raw)
                    v = self.beta * v + (1.0 - self.beta) * loss_v
                    s = v / (1.0 - self.beta ** (k + 1))
                    raw.append(loss_v)
                    smooth.append(s)
                    if not math.isfinite(s):
                        stop, reason = k, "non-finite"
                        break
                    best = min(best, s)
                    if self.factor is not None and s - best > (self.factor - 1.0) * abs(best):
                        stop, reason = k, "diverged"
                        break
                if stop is not None:
                    break
        finally:
            stream.close()
        n = len(raw)
        return RangeTestSweep(
            lrs=np.asarray(self.lrs[:n], dtype=np.float64),
            losses=np.asarray(raw, dtype=np.float64),
            smoothed=np.asarray(smooth, dtype=np.float64),
            stopped_early=stop is not None,
            diverged_at=stop if stop is None or stop < n else None,
            stop_reason=reason,
            seed=seed,
        )


def lr_range_test(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    data: Any = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    mode: str = "exp",
    smoothing: float = 0.98,
    diverge_factor: float | None = 4.0,
    val_data: Any = None,
    accumulation_steps: int = 1,
    batch_size: int | None = None,
    repeats: int = 1,
    restore: bool = True,
    seed: int = 0,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
    precision: str = "32",
) -> RangeTestResult:
    r"""Run the LR range test (Smith 2017): train briefly while the learning rate grows, and record the loss.

    The lr schedule, the smoothing, the stop rule, what ``restore`` puts back, the data kinds, the precisions
    and an example are in the module docstring (**The sweep**, **Data**, **Precision**, **Example**).

    Args:
        model: the model to train (in train mode during the sweep).
        optimizer: a ``torch.optim.Optimizer`` over the model's parameters (SAM from :mod:`lrbs.optim` works
            too); its own lr only sets the ratios between param groups.
        loss_fn: ``loss_fn(output, y)`` for tuple batches / ``loss_fn(output, batch)`` for mappings, mean
            reduction; default cross-entropy (tuples) or the model's own loss (mappings, e.g. HF ``output.loss``).
        data: anything :func:`lrbs.batches.as_source` takes (module docstring, **Data**).
        start_lr, end_lr: the range, ``0 < start_lr < end_lr``.
        num_iter: the number of iterations N, >= 10.
        mode: ``"exp"`` (geometric) or ``"linear"``.
        smoothing: the EMA's :math:`\beta` in ``[0, 1)``; 0 turns smoothing off.
        diverge_factor: stop when the smoothed loss exceeds this multiple of its minimum (> 1); None stops
            only on a non-finite loss.
        val_data: if given, the loss recorded after each step is the full loss on this data, in eval mode.
        accumulation_steps: batches per iteration and one optimizer step, so the lr changes once per optimizer
            step; each loss is divided by this (with ``batch_weight``: weighted by ``w_b / sum w``).
        batch_size: for indexable data and a bare ``IterableDataset`` (default 64); a DataLoader's own.
        repeats: sweeps from the same start over data orders ``seed + r``; suggestions become medians.
        restore: put everything back afterwards (module docstring).
        seed: seeds the data order and any randomness in the model (dropout) of the first sweep.
        compute_loss: ``compute_loss(model, batch) -> scalar tensor`` for any batch (HF Trainer's name).
        batch_weight: ``batch_weight(batch) -> float``, a batch's weight under accumulation and in the
            validation mean (default: its number of samples).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA; module docstring, **Precision**).

    Returns:
        A :class:`RangeTestResult`: ``suggest()``, ``suggestions()``, ``recommended()``, ``lr_bounds()``, ``plot()``.

    Raises:
        LrbsTypeError: ``model`` is not a module, ``optimizer`` not an optimizer, ``data`` of an unknown kind.
        ConfigError: ``start_lr >= end_lr`` or a non-positive / non-finite lr, ``num_iter < 10``, an unknown
            mode, ``smoothing`` outside ``[0, 1)``, ``diverge_factor <= 1``, ``accumulation_steps < 1``,
            ``repeats < 1``, empty data, a precision outside the three names or ``16-mixed`` without CUDA, a
            batch size larger than the data, or an optimizer holding parameters that are not the model's.
    """
    t0 = time.perf_counter()
    _check_model_optimizer(model, optimizer)
    lr_range = (start_lr, end_lr, num_iter, mode)
    opts = _check_options(
        lr_range, smoothing, diverge_factor, accumulation_steps, repeats, seed, batch_size, restore
    )
    device = model_device(model)
    precision = check_precision(precision, device)
    batch_loss = BatchLoss(loss_fn, compute_loss, batch_weight)
    sweep = _build_sweep(model, optimizer, batch_loss, data, val_data, opts, device, precision)
    sweeps = _run_sweeps(sweep, opts.repeats, opts.restore, opts.seed)
    settings = _settings(opts, sweep, data, (_loss_name(loss_fn, compute_loss), batch_weight))
    return _result(sweeps, settings, t0)


def _result(sweeps: list[RangeTestSweep], settings: dict[str, Any], t0: float) -> RangeTestResult:
    """The result: the first sweep's curves, all sweeps, the settings and the seconds since ``t0``."""
    first = sweeps[0]
    return RangeTestResult(
        lrs=first.lrs,
        losses=first.losses,
        smoothed=first.smoothed,
        stopped_early=first.stopped_early,
        diverged_at=first.diverged_at,
        stop_reason=first.stop_reason,
        settings=settings,
        sweeps=tuple(sweeps),
        wall_time=time.perf_counter() - t0,
    )


@dataclass(frozen=True)
class _Options:
    """lr_range_test's checked numeric options (``beta``: smoothing, ``factor``: diverge_factor)."""

    start_lr: float
    end_lr: float
    num_iter: int
    mode: str
    beta: float
    factor: float | None
    accum: int
    repeats: int
    seed: int
    batch_size: int | None
    restore: bool


def _check_options(
    lr_range: tuple[Any, Any, Any, Any],
    smoothing: Any,
    diverge_factor: Any,
    accumulation_steps: Any,
    repeats: Any,
    seed: Any,
    batch_size: Any,
    restore: Any,
) -> _Options:
    """Check lr_range_test's options (``lr_range``: start_lr, end_lr, num_iter, mode), in the order of its
    signature (the first bad one is named)."""
    start_lr, end_lr, num_iter, mode = lr_range
    start_lr = check_positive("start_lr", start_lr)
    end_lr = check_positive("end_lr", end_lr)
    if start_lr >= end_lr:
        raise ConfigError(
            f"start_lr={start_lr!r} and end_lr={end_lr!r} are not allowed: start_lr must be < end_lr"
        )
    num_iter = check_int("num_iter", num_iter, low=10)
    mode = check_choice("mode", mode, ("exp", "linear"))
    beta = check_number("smoothing", smoothing, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
    factor = None if diverge_factor is None else check_number("diverge_factor", diverge_factor, low=1.0)
    accum = check_int("accumulation_steps", accumulation_steps, low=1)
    repeats = check_int("repeats", repeats, low=1)
    seed = check_int("seed", seed)
    if batch_size is not None:
        batch_size = check_int("batch_size", batch_size, low=1)
    if not isinstance(restore, bool):
        raise LrbsTypeError(f"restore={restore!r} is not allowed: must be True or False")
    return _Options(start_lr, end_lr, num_iter, mode, beta, factor, accum, repeats, seed, batch_size, restore)


def _build_sweep(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_loss: BatchLoss,
    data: Any,
    val_data: Any,
    opts: _Options,
    device: torch.device,
    precision: str,
) -> _Sweep:
    """The data source, the validation set, the group ratios and the lr of each iteration, in one _Sweep."""
    source, b = _source(data, opts.batch_size, device)
    val = None
    if val_data is not None:
        val = EvalSet(val_data, 1024, device, name="val_data", seed=opts.seed)
    base = float(optimizer.param_groups[0]["lr"])
    ratios = [
        float(g["lr"]) / base if base > 0 and math.isfinite(base) else 1.0 for g in optimizer.param_groups
    ]
    lrs = _sweep_lrs(opts.start_lr, opts.end_lr, opts.num_iter, opts.mode)
    sync_every = 1 if device.type == "cpu" or val is not None else 16
    return _Sweep(
        model,
        optimizer,
        batch_loss,
        source,
        b,
        device,
        precision,
        lrs,
        ratios,
        opts.beta,
        opts.factor,
        opts.accum,
        val,
        sync_every,
    )


def _settings(opts: _Options, sweep: _Sweep, data: Any, names: tuple[str, Callable | None]) -> dict[str, Any]:
    """The range test's recorded settings (``names``: the loss's name and the batch_weight callable)."""
    loss_name, batch_weight = names
    b = sweep.batch_size
    settings = {
        "start_lr": opts.start_lr,
        "end_lr": opts.end_lr,
        "num_iter": opts.num_iter,
        "mode": opts.mode,
        "smoothing": opts.beta,
        "diverge_factor": opts.factor,
        "accumulation_steps": opts.accum,
        "batch_size": b if b is not None else getattr(data, "batch_size", None),
        "repeats": opts.repeats,
        "restore": opts.restore,
        "seed": opts.seed,
        "validation": sweep.val is not None,
        "optimizer": type(sweep.opt).__name__,
        "group_ratios": sweep.ratios,
        "loss_fn": loss_name,
        "data": _describe_data(data),
        "model": getattr(sweep.model, "lrbs_spec", {"name": type(sweep.model).__name__}),
        "device": str(sweep.device),
    }
    if sweep.precision != "32":
        settings["precision"] = sweep.precision
    if batch_weight is not None:
        settings["batch_weight"] = getattr(batch_weight, "__name__", type(batch_weight).__name__)
    return settings


def _check_model_optimizer(model: Any, optimizer: Any) -> None:
    """A module with parameters and an optimizer over them only (the restore covers the model only)."""
    if not isinstance(model, nn.Module):
        raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LrbsTypeError(
            f"optimizer={optimizer!r} is not allowed: must be a torch.optim.Optimizer built on the model's "
            "parameters"
        )
    own = {id(p) for p in model.parameters()}
    if not own:
        raise ConfigError("model has no parameters: there is nothing to train")
    for gi, g in enumerate(optimizer.param_groups):
        if any(id(p) not in own for p in g["params"]):
            raise ConfigError(
                f"optimizer param group {gi} holds parameters that are not the model's: build the optimizer "
                "on model.parameters() (the restore covers the model only)"
            )


def _loss_name(loss_fn: Callable | None, compute_loss: Callable | None) -> str:
    fn = compute_loss or loss_fn or nn.functional.cross_entropy
    return getattr(fn, "__name__", type(fn).__name__)


def _run_sweeps(sweep: _Sweep, repeats: int, restore: bool, seed: int) -> list[RangeTestSweep]:
    """``repeats`` sweeps from the same start, seeds ``seed + r``; the model, optimizer, training flags, random
    states and loader generators are put back afterwards (the model and optimizer only with ``restore``)."""
    model, device = sweep.model, sweep.device
    flags = {name: m.training for name, m in model.named_modules()}
    snap = _Snapshot(model, sweep.opt) if (restore or repeats > 1) else None
    py_state, np_state = random.getstate(), np.random.get_state()
    cuda = [device] if device.type == "cuda" else []
    sweeps = []
    try:
        with torch.random.fork_rng(devices=cuda):
            for r in range(repeats):
                if r > 0:
                    snap.restore()  # every sweep starts from the same point
                torch.default_generator.manual_seed(seed + r)
                if cuda:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(seed + r)
                sweeps.append(sweep.run(seed + r))
    finally:
        if snap is not None and restore:
            snap.restore()
        for name, m in model.named_modules():
            if name in flags:
                m.train(flags[name])
        if isinstance(sweep.source, LoaderSource):
            sweep.source.restore()
        random.setstate(py_state)
        np.random.set_state(np_state)
    return sweeps


def _describe_data(data: Any) -> dict[str, Any]:
    if hasattr(data, "describe"):
        return data.describe()
    if isinstance(data, torch.utils.data.DataLoader):
        return {"kind": "DataLoader", "batches": _safe_len(data), "batch_size": data.batch_size}
    if hasattr(data, "y"):
        return {"kind": type(data).__name__, "n": len(data.y)}
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return {"kind": "tensors", "n": len(data[1])}
    return {"kind": type(data).__name__, "batches": _safe_len(data)}
