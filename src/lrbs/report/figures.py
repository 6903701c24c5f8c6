"""Figures used across lrbs: training curves, curves, bars, heatmaps, contours, schedules.

Every function builds a ``matplotlib.figure.Figure`` directly (never through ``pyplot``), so there is no
global figure registry, no GUI backend and no shared state: it is safe in threads and in headless runs. Style
is set per call (explicit font sizes and colours), never through ``rcParams``. Colours are the Okabe-Ito
palette, which stays distinguishable with the common forms of colour blindness (Okabe & Ito, 2008); maps
use viridis.

Each function takes ``ax=None`` (draw into a new figure) or an existing ``Axes``, and returns the figure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .._util import fmt
from ..errors import ConfigError, LrbsTypeError, ShapeError, check_choice, check_int, check_number

__all__ = [
    "PALETTE",
    "plot_fit",
    "plot_curves",
    "plot_bars",
    "plot_heatmap",
    "plot_contour",
    "plot_schedule",
    "plot_range_test",
    "plot_throughput",
    "plot_tradeoff",
    "ema",
    "log_levels",
]

# Okabe & Ito (2008), "Color Universal Design"; yellow last because it is faint on white.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
_LINESTYLES = ("-", "--", ":", "-.")
_FONT = {"title": 10, "label": 9, "tick": 8, "legend": 8, "annot": 7}
_SIZE = (6.4, 3.6)


# --------------------------------------------------------------------------- helpers
def new_axes(ax: Any, figsize: tuple[float, float] = _SIZE, ncols: int = 1) -> tuple[Any, list[Any]]:
    """``(figure, [axes...])``: a fresh constrained-layout figure, or the figure of the given ``ax``."""
    if ax is None:
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        axes = list(np.atleast_1d(fig.subplots(1, ncols, squeeze=False)).ravel())
        return fig, axes
    axes = list(ax) if isinstance(ax, (list, tuple, np.ndarray)) else [ax]
    for a in axes:
        if not hasattr(a, "plot") or not hasattr(a, "figure"):
            raise LrbsTypeError(
                f"ax={a!r} is not allowed: must be a matplotlib Axes (or None for a new figure)"
            )
    return axes[0].figure, axes


def style_axes(ax: Any, title: str = "", xlabel: str = "", ylabel: str = "", grid: bool = True) -> None:
    if title:
        ax.set_title(title, fontsize=_FONT["title"])
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=_FONT["label"])
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=_FONT["label"])
    ax.tick_params(labelsize=_FONT["tick"])
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if grid:
        ax.grid(True, which="major", color="#d0d7de", linewidth=0.6, alpha=0.8)
        ax.set_axisbelow(True)


def _legend(ax: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if any(lbl and not lbl.startswith("_") for lbl in labels):
        ax.legend(fontsize=_FONT["legend"], frameon=False)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _linestyle(i: int) -> str:
    return _LINESTYLES[(i // len(PALETTE)) % len(_LINESTYLES)]


def _array1d(name: str, x: Any) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise LrbsTypeError(f"{name} is not allowed: must be an array of numbers ({e})") from None
    if a.ndim != 1:
        raise ShapeError(f"{name} has shape {a.shape}: must be 1-D")
    return a


def _tick_text(v: Any) -> str:
    return fmt(v, digits=3)


def ema(values: np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (as in TensorBoard / Adam): ``m_t / (1 - beta^(t+1))``."""
    out = np.empty(len(values))
    m = 0.0
    for t, v in enumerate(values):
        m = beta * m + (1.0 - beta) * v
        out[t] = m / (1.0 - beta ** (t + 1))
    return out


# --------------------------------------------------------------------------- training curves
def _fit_parts(r: Any, i: int) -> tuple[dict, list]:
    if isinstance(r, Mapping) and "history" in r and "evals" in r:
        return r["history"], r["evals"]
    if hasattr(r, "history") and hasattr(r, "evals"):
        return r.history, r.evals
    raise LrbsTypeError(
        f"results[{i}]={type(r).__name__} is not allowed: "
        "must be a FitResult (or a dict with 'history' and 'evals')"
    )


def _default_label(r: Any, i: int) -> str:
    cfg = getattr(r, "config", None) or (r.get("config") if isinstance(r, Mapping) else None) or {}
    parts = [f"{k}={_tick_text(cfg[k])}" for k in ("lr", "batch_size") if _is_num(cfg.get(k))]
    return ", ".join(parts).replace("batch_size", "B") or f"run {i + 1}"


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.number)) and not isinstance(v, bool)


def plot_fit(
    results: Any,
    labels: Sequence[str] | None = None,
    ax: Any = None,
    *,
    x: str = "step",
    smooth: float = 0.9,
    logy: bool = False,
    title: str = "",
) -> Any:
    """Training loss per step (smoothed) and test accuracy per evaluation, for one or several runs.

    The smoothed loss is the bias-corrected exponential moving average
    ``m_t = smooth * m_{t-1} + (1 - smooth) * loss_t``, shown as ``m_t / (1 - smooth^(t+1))``; the raw loss is
    drawn faintly behind it. A diverged run's curve stops at its last finite loss.

    Args:
        results: a ``FitResult`` (``.history`` with ``step, samples, lr, batch_size, loss``; ``.evals`` a
            list of dicts with ``step, test_acc, ...``), a dict with the same keys, or a list of them.
        labels: one legend label per run (default: ``lr=..., B=...`` from the run's config).
        ax: None (a new figure with two panels), a pair of Axes, or one Axes (accuracy on a twin y axis).
        x: ``"step"`` or ``"samples"`` (training examples seen: the fair axis to compare batch sizes).
        smooth: the EMA factor in ``[0, 1)``; 0 draws the raw loss only.
        logy: log scale for the loss.
        title: a title over the figure.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        LrbsTypeError: If a result has no history/evals.
        ConfigError: If ``labels`` does not have one label per run, or ``x``/``smooth`` is not allowed.
    """
    runs = list(results) if isinstance(results, (list, tuple)) else [results]
    if not runs:
        raise ConfigError("results=[] is not allowed: give at least one FitResult")
    parts = [_fit_parts(r, i) for i, r in enumerate(runs)]
    if labels is None:
        labels = [_default_label(r, i) for i, r in enumerate(runs)]
    elif isinstance(labels, str) or len(labels) != len(runs):
        raise ConfigError(f"labels={labels!r} is not allowed: must be a list of {len(runs)} str, one per run")
    check_choice("x", x, ("step", "samples"))
    smooth = check_number("smooth", smooth, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)

    fig, axes = new_axes(ax, figsize=(9.0, 3.4), ncols=2)
    ax_loss = axes[0]
    ax_acc = axes[1] if len(axes) > 1 else ax_loss.twinx()
    for i, ((hist, evals), label) in enumerate(zip(parts, labels)):
        _draw_run(ax_loss, ax_acc, hist, evals, label, i, x=x, smooth=smooth)
    if logy:
        ax_loss.set_yscale("log")
    xlabel = "step" if x == "step" else "training examples seen"
    style_axes(ax_loss, "training loss" + (" (smoothed)" if smooth > 0 else ""), xlabel, "loss")
    style_axes(
        ax_acc, "test accuracy" if ax_acc is not ax_loss else "", xlabel, "test accuracy", grid=ax_acc in axes
    )
    _legend(ax_loss)
    if title:
        fig.suptitle(title, fontsize=_FONT["title"] + 1)
    return fig


def _draw_run(
    ax_loss: Any, ax_acc: Any, hist: Any, evals: Any, label: str, i: int, *, x: str, smooth: float
) -> None:
    """One run of :func:`plot_fit`: its loss (raw faintly, EMA on top) up to the first non-finite value, and
    its test accuracy at the evaluations (placed on the sample axis by interpolation when they lack it)."""
    xs = np.asarray(hist[x], dtype=np.float64)
    loss = np.asarray(hist["loss"], dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(loss))
    n = int(bad[0]) if bad.size else len(loss)
    c, ls = _color(i), _linestyle(i)
    if smooth > 0 and n > 1:
        ax_loss.plot(xs[:n], loss[:n], color=c, alpha=0.2, linewidth=0.8)
        ax_loss.plot(xs[:n], ema(loss[:n], smooth), color=c, linestyle=ls, linewidth=1.5, label=label)
    else:
        ax_loss.plot(xs[:n], loss[:n], color=c, linestyle=ls, linewidth=1.5, label=label)
    ev = [e for e in evals if _is_num(e.get("test_acc"))]
    if not ev:
        return
    if x == "samples" and not all("samples" in e for e in ev):
        ex = np.interp([e["step"] for e in ev], np.asarray(hist["step"], float), xs)
    else:
        ex = np.array([e[x] for e in ev], dtype=np.float64)
    ax_acc.plot(ex, [e["test_acc"] for e in ev], color=c, linestyle=ls, marker="o", markersize=3, label=label)


# --------------------------------------------------------------------------- generic plots
def plot_curves(
    x: Any,
    ys: Mapping[str, Any] | Any,
    xlabel: str = "",
    ylabel: str = "",
    logx: bool = False,
    logy: bool = False,
    title: str = "",
    *,
    sds: Mapping[str, Any] | None = None,
    ax: Any = None,
) -> Any:
    """Several curves ``y(x)`` on one axes, with optional ``±sd`` bands.

    On a log axis, non-positive values are not drawn (matplotlib's "mask" rule). NaN values leave gaps.

    Args:
        x: the shared x values, shape ``(n,)``.
        ys: ``{label: y}`` with each ``y`` of shape ``(n,)`` (a single array is drawn without a legend).
        xlabel, ylabel, title: text.
        logx, logy: log scales.
        sds: ``{label: sd}`` (a subset of ``ys``' labels): a band ``y - sd .. y + sd`` is shaded.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ShapeError: If a curve's length differs from ``x``'s, or ``x`` is not 1-D.
        ConfigError: If ``logx`` is set and ``x`` has no positive value, or ``sds`` names an unknown curve.
    """
    xv = _array1d("x", x)
    curves = dict(ys) if isinstance(ys, Mapping) else {"": ys}
    sds = dict(sds or {})
    for k in sds:
        if k not in curves:
            raise ConfigError(f"sds has the key {k!r}, which is not a curve; curves: {list(curves)}")
    if logx and not np.any(xv > 0):
        raise ConfigError(f"logx=True is not allowed with x={xv.tolist()[:5]}...: it has no positive value")
    fig, (axis,) = new_axes(ax)
    for i, (label, y) in enumerate(curves.items()):
        yv = _array1d(f"ys[{label!r}]", y)
        if yv.shape != xv.shape:
            raise ShapeError(f"ys[{label!r}] has {yv.size} values but x has {xv.size}: they must match")
        axis.plot(xv, yv, color=_color(i), linestyle=_linestyle(i), linewidth=1.5, label=label or None)
        if label in sds:
            sd = _array1d(f"sds[{label!r}]", sds[label])
            if sd.shape != xv.shape:
                raise ShapeError(f"sds[{label!r}] has {sd.size} values but x has {xv.size}: they must match")
            axis.fill_between(xv, yv - sd, yv + sd, color=_color(i), alpha=0.2, linewidth=0)
    if logx:
        axis.set_xscale("log")
    if logy:
        axis.set_yscale("log")
    style_axes(axis, title, xlabel, ylabel)
    _legend(axis)
    return fig


def plot_bars(
    labels: Sequence[str],
    means: Any,
    sds: Any = None,
    ylabel: str = "",
    title: str = "",
    *,
    ax: Any = None,
) -> Any:
    """Bars with ``±sd`` error bars; a NaN mean is marked ``n/a`` instead of a bar.

    Args:
        labels: one label per bar.
        means: the bar heights.
        sds: the error-bar half-lengths (standard deviations or errors), or None.
        ylabel, title: text.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ShapeError: If ``labels``, ``means`` and ``sds`` differ in length.
    """
    labels = [str(v) for v in labels]
    m = _array1d("means", means)
    if m.size != len(labels):
        raise ShapeError(f"means has {m.size} values but labels has {len(labels)}: they must match")
    s = None if sds is None else _array1d("sds", sds)
    if s is not None and s.size != m.size:
        raise ShapeError(f"sds has {s.size} values but means has {m.size}: they must match")
    fig, (axis,) = new_axes(ax, figsize=(max(3.2, 0.7 * len(labels) + 1.5), 3.4))
    pos = np.arange(len(labels))
    colors = [_color(i) for i in range(len(labels))]
    axis.bar(pos, np.nan_to_num(m, nan=0.0), color=colors, width=0.65, alpha=0.9)
    if s is not None:
        axis.errorbar(pos, m, yerr=s, fmt="none", ecolor="#24292f", elinewidth=1.0, capsize=4)
    for p in pos[np.isnan(m)]:
        axis.text(p, 0, "n/a", ha="center", va="bottom", fontsize=_FONT["annot"], color="#59636e")
    axis.set_xticks(pos, labels, rotation=30 if max(map(len, labels), default=0) > 8 else 0, ha="right")
    style_axes(axis, title, "", ylabel)
    axis.grid(False, axis="x")
    return fig


def _grid(Z: Any, xs: Any, ys: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.asarray(Z, dtype=np.float64)
    xv, yv = _array1d("xs", xs), _array1d("ys", ys)
    if z.shape != (yv.size, xv.size):
        raise ShapeError(
            f"Z has shape {z.shape} but must be (len(ys), len(xs)) = ({yv.size}, {xv.size}): rows follow ys"
        )
    return z, xv, yv


def plot_heatmap(
    Z: Any,
    xs: Any,
    ys: Any,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    log: bool = False,
    *,
    annotate: bool | None = None,
    cbar_label: str = "",
    ax: Any = None,
) -> Any:
    """A grid of values over two settings (e.g. test accuracy over LR x batch size), one cell per setting.

    Cells are equal-sized whatever the spacing of ``xs`` and ``ys`` (sweeps are usually log-spaced); tick
    labels give the values. NaN cells (e.g. diverged runs) are drawn light grey.

    Args:
        Z: values, shape ``(len(ys), len(xs))``: ``Z[i, j]`` is at ``(xs[j], ys[i])``.
        xs, ys: the settings along each axis.
        xlabel, ylabel, title: text.
        log: logarithmic colour scale (non-positive values are then drawn as missing).
        annotate: write each value in its cell (default: when the grid has at most 120 cells).
        cbar_label: the colour bar's label.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ShapeError: If ``Z`` is not ``(len(ys), len(xs))``.
    """
    from matplotlib.colors import LogNorm, Normalize

    z, xv, yv = _grid(Z, xs, ys)
    zm = np.ma.masked_invalid(np.where(z > 0, z, np.nan) if log else z)
    fig, (axis,) = new_axes(ax, figsize=(max(4.0, 0.6 * xv.size + 2.2), max(3.0, 0.45 * yv.size + 1.4)))
    norm = None
    if zm.count():
        lo, hi = float(zm.min()), float(zm.max())
        norm = (
            LogNorm(lo, hi if hi > lo else lo * 1.0001)
            if log
            else Normalize(lo, hi if hi > lo else lo + 1e-12)
        )
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#e5e7eb")
    im = axis.imshow(zm, origin="lower", aspect="auto", cmap=cmap, norm=norm, interpolation="nearest")
    axis.set_xticks(np.arange(xv.size), [_tick_text(v) for v in xv])
    axis.set_yticks(np.arange(yv.size), [_tick_text(v) for v in yv])
    if annotate is None:
        annotate = z.size <= 120
    if annotate:
        for (i, j), v in np.ndenumerate(z):
            if np.isfinite(v) and norm is not None and not (log and v <= 0):
                r, g, b, _ = cmap(norm(v))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
            else:
                color = "#59636e"
            axis.text(j, i, _tick_text(v), ha="center", va="center", fontsize=_FONT["annot"], color=color)
    cb = fig.colorbar(im, ax=axis)
    cb.ax.tick_params(labelsize=_FONT["tick"])
    if cbar_label:
        cb.set_label(cbar_label, fontsize=_FONT["label"])
    style_axes(axis, title, xlabel, ylabel, grid=False)
    return fig


def log_levels(Z: Any, n: int = 20) -> np.ndarray:
    """``n`` log-spaced contour levels from the smallest positive finite value of ``Z`` to its largest.

    Raises:
        ConfigError: If ``Z`` has no positive finite value.
    """
    z = np.asarray(Z, dtype=np.float64)
    pos = z[np.isfinite(z) & (z > 0)]
    if pos.size == 0:
        raise ConfigError("Z has no positive finite value: log-spaced levels need one (use log=False)")
    lo, hi = float(pos.min()), float(pos.max())
    if hi <= lo:
        hi = lo * 1.01
    return np.geomspace(lo, hi, n)


def _colorbar_ticks(cb: Any, levels: np.ndarray) -> None:
    """About six of the contour levels as colour-bar ticks, written with :func:`lrbs._util.fmt`."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    idx = np.unique(np.linspace(0, len(levels) - 1, min(6, len(levels))).round().astype(int))
    cb.ax.yaxis.set_major_locator(FixedLocator(levels[idx]))
    cb.ax.yaxis.set_minor_locator(NullLocator())
    cb.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _tick_text(v)))
    cb.ax.tick_params(labelsize=_FONT["tick"])


def _contour_levels(z: np.ndarray, levels: Any, log: bool) -> np.ndarray:
    """The contour levels of :func:`plot_contour`: ``levels`` of them (log- or linearly spaced over the finite
    values), or the given increasing values."""
    if isinstance(levels, (int, np.integer)) and not isinstance(levels, bool):
        n = check_int("levels", levels, low=2)
        finite = z[np.isfinite(z)]
        if log:
            return log_levels(z, n)
        if finite.size:
            lo, hi = float(finite.min()), float(finite.max())
            return np.linspace(lo, hi if hi > lo else lo + 1.0, n)
        return np.linspace(0.0, 1.0, n)
    lv = _array1d("levels", levels)
    if lv.size < 2 or np.any(np.diff(lv) <= 0):
        raise ConfigError(f"levels={lv.tolist()} is not allowed: must be at least 2 increasing values")
    return lv


# plot_contour takes plot_heatmap's positional parameters (Z, xs, ys, labels, title, log) on purpose, and its
# docstring describes them in the same words: the two grid plots are called one way (duplicates lists the pair).
def plot_contour(
    Z: Any,
    xs: Any,
    ys: Any,
    xlabel: str = "",
    ylabel: str = "",
    title: str = "",
    log: bool = True,
    *,
    levels: int | Sequence[float] = 20,
    filled: bool = True,
    points: Mapping[str, tuple[float, float]] | None = None,
    cbar_label: str = "loss",
    ax: Any = None,
) -> Any:
    """Contours of a surface on a grid, e.g. a 2-D loss-landscape slice (Li et al., 2018).

    Levels are log-spaced by default (:func:`log_levels`), so both the basin floor and the walls show.
    NaN values (e.g. points where the loss overflowed) leave gaps.

    Args:
        Z: values, shape ``(len(ys), len(xs))``: ``Z[i, j]`` is at ``(xs[j], ys[i])``.
        xs, ys: the grid coordinates (increasing).
        xlabel, ylabel, title: text.
        log: log-spaced levels and a log colour scale.
        levels: the number of levels, or the levels themselves.
        filled: filled contours (``contourf``) with line contours on top; else lines only.
        points: ``{label: (x, y)}`` markers, e.g. the trained minima of a connectivity plane.
        cbar_label: the colour bar's label.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ShapeError: If ``Z`` is not ``(len(ys), len(xs))``.
        ConfigError: If ``log`` is set and ``Z`` has no positive value, or ``levels`` is not allowed.
    """
    from matplotlib.colors import LogNorm

    z, xv, yv = _grid(Z, xs, ys)
    lv = _contour_levels(z, levels, log)
    zm = np.ma.masked_invalid(np.where(z > 0, z, np.nan) if log else z)
    fig, (axis,) = new_axes(ax, figsize=(4.8, 4.0))
    norm = LogNorm(lv[0], lv[-1]) if log else None
    if zm.count() == 0:
        axis.text(0.5, 0.5, "no finite values", transform=axis.transAxes, ha="center", va="center")
    elif filled:
        cs = axis.contourf(xv, yv, zm, levels=lv, cmap="viridis", norm=norm, extend="both")
        axis.contour(xv, yv, zm, levels=lv, colors="white", linewidths=0.4, alpha=0.6)
        cb = fig.colorbar(cs, ax=axis)
        _colorbar_ticks(cb, lv)
        cb.set_label(cbar_label, fontsize=_FONT["label"])
    else:
        cs = axis.contour(xv, yv, zm, levels=lv, cmap="viridis", norm=norm, linewidths=1.0)
        axis.clabel(cs, fontsize=_FONT["annot"], fmt=_tick_text)
    for i, (label, (px, py)) in enumerate((points or {}).items()):
        axis.plot(
            [px], [py], marker="o", markersize=6, color=_color(i + 1), markeredgecolor="white", label=label
        )
    style_axes(axis, title, xlabel, ylabel, grid=False)
    _legend(axis)
    return fig


def plot_schedule(
    schedules: Mapping[str, Any],
    n: int,
    *,
    ylabel: str = "learning rate",
    logy: bool = False,
    title: str = "",
    ax: Any = None,
) -> Any:
    """The first ``n`` values of one or several schedules (LR, momentum or batch size) against the step.

    Args:
        schedules: ``{label: schedule}``; a schedule is an lrbs ``Schedule`` (``.values(n)``), any callable
            ``step -> value``, or an array of at least ``n`` values.
        n: the number of steps to draw.
        ylabel, title: text.
        logy: log scale for the values.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        LrbsTypeError: If ``schedules`` is not a dict or an entry is not a schedule.
        ShapeError: If an array has fewer than ``n`` values.
    """
    if not isinstance(schedules, Mapping):
        raise LrbsTypeError(f"schedules={schedules!r} is not allowed: must be a dict {{label: schedule}}")
    n = check_int("n", n, low=1)
    fig, (axis,) = new_axes(ax)
    steps = np.arange(n)
    for i, (label, s) in enumerate(schedules.items()):
        values, integer = _schedule_values(label, s, n)
        axis.plot(
            steps,
            values,
            color=_color(i),
            linestyle=_linestyle(i),
            linewidth=1.5,
            label=label,
            drawstyle="steps-post" if integer else "default",
        )
    if logy:
        axis.set_yscale("log")
    style_axes(axis, title, "step", ylabel)
    _legend(axis)
    return fig


def _schedule_values(label: str, s: Any, n: int) -> tuple[np.ndarray, bool]:
    if hasattr(s, "values") and callable(s.values) and not isinstance(s, Mapping):
        return np.asarray(s.values(n), dtype=np.float64), bool(getattr(s, "integer", False))
    if isinstance(s, Callable):
        return np.array([float(s(t)) for t in range(n)]), False
    try:
        a = np.asarray(s, dtype=np.float64)
    except (TypeError, ValueError):
        a = None
    if a is None or a.ndim != 1:
        raise LrbsTypeError(
            f"schedules[{label!r}]={s!r} is not allowed: "
            "must be a Schedule, a callable step -> value, or a 1-D array"
        )
    if a.size < n:
        raise ShapeError(f"schedules[{label!r}] has {a.size} values but n={n} steps are drawn")
    return a[:n], False


# --------------------------------------------------------------------------- tune
def plot_range_test(result: Any, *, title: str = "", ax: Any = None) -> Any:
    """An LR range test as :meth:`~lrbs.range_test.RangeTestResult.plot` draws it, with a title.

    Raw (faint) and smoothed loss against the LR on a log axis, every sweep, the four suggestions and the
    recommendation marked, the y-axis clipped to the informative range (from below the minimum to a little
    above the starting loss, so a divergence spike does not flatten the curve).

    Args:
        result: a ``RangeTestResult``.
        title: text.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        LrbsTypeError: If ``result`` has no ``plot`` method.
    """
    if not callable(getattr(result, "plot", None)) or not hasattr(result, "smoothed"):
        raise LrbsTypeError(f"result={result!r} is not allowed: must be a lrbs RangeTestResult")
    fig, (axis,) = new_axes(ax, figsize=(6.4, 4.0))
    result.plot(ax=axis)
    style_axes(axis, title)
    return fig


def plot_throughput(
    ladder: Sequence[Mapping[str, Any]],
    *,
    chosen: int | None = None,
    knee: int | None = None,
    title: str = "Throughput ladder",
    ax: Any = None,
) -> Any:
    """Samples/s of a training step against the batch size (log2 axis), the knee and the chosen batch marked.

    Args:
        ladder: rows ``{"batch_size", "samples_per_s", "fits"}`` (``samples_per_s`` None: out of memory).
        chosen: the recommended batch, drawn as a vertical line.
        knee: the largest batch still gaining throughput, drawn dotted.
        title: text.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.
    """
    fig, (axis,) = new_axes(ax)
    ok = [r for r in ladder if r.get("samples_per_s") is not None]
    bs = np.array([r["batch_size"] for r in ok], dtype=float)
    rate = np.array([r["samples_per_s"] for r in ok], dtype=float)
    axis.plot(bs, rate, "o-", color=_color(0), linewidth=1.5, label="samples/s")
    oom = [r["batch_size"] for r in ladder if r.get("samples_per_s") is None or not r.get("fits", True)]
    for b in oom:
        axis.axvline(b, color=_color(1), linestyle=":", linewidth=1)
    if oom:
        axis.plot([], [], color=_color(1), linestyle=":", label="does not fit")
    if knee is not None:
        axis.axvline(knee, color=_color(2), linestyle="--", linewidth=1, label=f"knee {knee}")
    if chosen is not None:
        axis.axvline(chosen, color="k", linewidth=1.2, label=f"chosen {chosen}")
    axis.set_xscale("log", base=2)
    ticks = [r["batch_size"] for r in ladder]
    axis.set_xticks(ticks, [str(b) for b in ticks])
    axis.minorticks_off()
    style_axes(axis, title, "batch size", "training samples / s")
    _legend(axis)
    return fig


def plot_tradeoff(
    b_crit: float,
    batch_sizes: Sequence[float],
    chosen: float | None = None,
    *,
    ci: Sequence[float | None] | None = None,
    title: str = "Steps / examples trade-off",
    ax: Any = None,
) -> Any:
    r"""The predicted trade-off :math:`S/S_\text{min} = 1 + B_\text{crit}/B` against
    :math:`E/E_\text{min} = 1 + B/B_\text{crit}` (McCandlish et al. 2018), the ladder and the chosen batch marked.

    Args:
        b_crit: the critical batch (> 0).
        batch_sizes: the ladder's batch sizes, drawn as points on the curve.
        chosen: the recommended batch, drawn as a star.
        ci: ``(low, high)`` of ``b_crit``: the curves at both ends are drawn faintly.
        title: text.
        ax: an Axes to draw into, or None.

    Returns:
        The matplotlib ``Figure``.

    Raises:
        ConfigError: If ``b_crit`` is not a finite number > 0.
    """
    b_crit = check_number("b_crit", b_crit, low=0.0)
    fig, (axis,) = new_axes(ax)
    sizes = _array1d("batch_sizes", batch_sizes)
    lo = min(float(sizes.min()), b_crit) / 8
    hi = max(float(sizes.max()), b_crit) * 8
    grid = np.geomspace(lo, hi, 200)
    axis.loglog(
        1 + grid / b_crit,
        1 + b_crit / grid,
        color=_color(0),
        linewidth=1.5,
        label=f"B_crit = {b_crit:.4g}",
    )
    for end in ci or ():
        if end is not None and np.isfinite(end) and end > 0:
            axis.loglog(1 + grid / end, 1 + end / grid, color=_color(0), linewidth=0.8, alpha=0.35)
    axis.loglog(1 + sizes / b_crit, 1 + b_crit / sizes, "o", color=_color(0), markersize=4)
    for b in sizes:
        axis.annotate(f"{b:g}", (1 + b / b_crit, 1 + b_crit / b), fontsize=_FONT["annot"], xytext=(3, 3),
                      textcoords="offset points")  # fmt: skip
    if chosen is not None:
        axis.loglog([1 + chosen / b_crit], [1 + b_crit / chosen], "*", color=_color(1), markersize=12,
                    label=f"chosen B = {chosen:g}")  # fmt: skip
    style_axes(axis, title, "examples E / E_min", "steps S / S_min")
    _legend(axis)
    return fig


# --------------------------------------------------------------------------- results' .plot()
# The drawings behind the results' ``.plot()`` methods (``Landscape``, ``connectivity.Path``, ``Schedule``) and
# ``SweepResult.heatmap``.
# Unlike the report figures above, each of these returns the **Axes** it drew on (a new constrained-layout figure
# when ``ax`` is None), so every result's ``.plot()`` returns the same type.
def _result_axes(ax: Any, figsize: tuple[float, float], projection: str | None = None) -> Any:
    """``ax``, or the single Axes of a new constrained-layout figure of ``figsize``."""
    if ax is not None:
        return ax
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained").add_subplot(projection=projection)


def _landscape_label(land: Any, axis: int) -> str:
    dirs = land.settings.get("directions") or []
    base = ["alpha", "beta"][axis]
    if axis < len(dirs) and dirs[axis].get("explained_variance_ratio") is not None:
        return f"PC{axis + 1} ({100 * dirs[axis]['explained_variance_ratio']:.1f}% var.)"
    return base


def _landscape_grid(land: Any, metric: str) -> np.ma.MaskedArray:
    if land.ndim != 2:
        raise ConfigError("this plot needs a 2-D landscape")
    return np.ma.masked_invalid(land.metric_values(metric))


def draw_landscape_1d(land: Any, metric: str = "loss", *, ax: Any = None) -> Any:
    """1-D landscape curve(s): train and (if present) test ``metric`` (with a +-1 standard-error band where the
    landscape has one); NaN/inf points are drawn as gaps; log y axis for the loss. Returns the Axes."""
    ax = _result_axes(ax, (5.0, 4.0))
    for name, style in ((metric, "-"), (f"test_{metric}", "--")):
        if name in land.values:
            y = np.where(np.isfinite(land.values[name]), land.values[name], np.nan)
            ax.plot(land.alphas, y, style, marker=".", label="train" if name == metric else "test")
            se = land.values.get(f"{name}_se")
            if se is not None:
                ax.fill_between(land.alphas, y - se, y + se, alpha=0.2)
    ax.set_xlabel("alpha")
    ax.set_ylabel(metric)
    if metric == "loss":
        ax.set_yscale("log")
    ax.legend()
    return ax


def draw_landscape_contour(
    land: Any,
    metric: str = "loss",
    *,
    levels: int = 30,
    log: bool = True,
    trajectory: np.ndarray | None = None,
    ax: Any = None,
) -> Any:
    """Contours of a 2-D landscape with log-spaced levels (so low losses are not dropped), NaN/inf as gaps, and
    an optional trajectory ``(T, 2)`` drawn on the plane (e.g. ``PCADirections.coords``). Returns the Axes."""
    z = _landscape_grid(land, metric)
    ax = _result_axes(ax, (5.0, 4.0))
    zz = z.compressed()
    lv: Any = levels
    if log and zz.size and zz.min() > 0 and zz.max() > zz.min():
        lv = np.geomspace(zz.min(), zz.max(), levels)
    elif zz.size and zz.max() > zz.min():
        lv = np.linspace(zz.min(), zz.max(), levels)
    cs = ax.contour(land.alphas, land.betas, z.T, levels=lv, cmap="viridis")
    ax.figure.colorbar(cs, ax=ax, label=metric)
    if trajectory is not None:
        tr = np.asarray(trajectory)
        ax.plot(tr[:, 0], tr[:, 1], "r.-", ms=3, lw=1)
    ax.set_xlabel(_landscape_label(land, 0))
    ax.set_ylabel(_landscape_label(land, 1))
    return ax


def draw_landscape_heatmap(land: Any, metric: str = "loss", *, log: bool = True, ax: Any = None) -> Any:
    """Heat map of a 2-D landscape (log colour scale for positive values); NaN/inf cells are left blank.
    Returns the Axes."""
    from matplotlib.colors import LogNorm

    z = _landscape_grid(land, metric)
    ax = _result_axes(ax, (5.0, 4.0))
    norm = LogNorm() if log and z.count() and z.min() > 0 else None
    im = ax.pcolormesh(land.alphas, land.betas, z.T, shading="nearest", norm=norm, cmap="viridis")
    ax.figure.colorbar(im, ax=ax, label=metric)
    ax.set_xlabel(_landscape_label(land, 0))
    ax.set_ylabel(_landscape_label(land, 1))
    return ax


def draw_landscape_surface(land: Any, metric: str = "loss", *, ax: Any = None) -> Any:
    """3-D surface of a 2-D landscape (``add_subplot(projection="3d")``); returns the (3-D) Axes."""
    z = _landscape_grid(land, metric)
    ax = _result_axes(ax, (6.0, 5.0), projection="3d")
    aa, bb = np.meshgrid(land.alphas, land.betas, indexing="ij")
    ax.plot_surface(aa, bb, z.filled(np.nan), cmap="viridis", linewidth=0, antialiased=True)
    ax.set_xlabel(_landscape_label(land, 0))
    ax.set_ylabel(_landscape_label(land, 1))
    ax.set_zlabel(metric)
    return ax


def draw_path(path: Any, metric: str = "loss", *, ax: Any = None, label: str | None = None) -> Any:
    """Train (solid) and test (dashed) ``metric`` along a connectivity ``Path`` against ``t``; returns the Axes."""
    check_choice("metric", metric, ("loss", "accuracy"))
    ax = _result_axes(ax, (5.0, 3.5))
    name = label or path.kind
    ax.plot(path.t, getattr(path, metric), "-", label=f"{name} train")
    test = getattr(path, f"test_{metric}")
    if test is not None:
        ax.plot(path.t, test, "--", label=f"{name} test")
    ax.set_xlabel("t")
    ax.set_ylabel(metric)
    ax.legend()
    return ax


def draw_schedule(schedule: Any, n: int, *, ax: Any = None) -> Any:
    """The first ``n`` values of a ``Schedule`` against the step (steps for integer schedules), titled with its
    spec; returns the Axes."""
    ax = _result_axes(ax, (6.4, 3.6))
    ax.plot(np.arange(n), schedule.values(n), drawstyle="steps-post" if schedule.integer else "default")
    ax.set_xlabel("step")
    ax.set_ylabel("batch size" if schedule.integer else "value")
    title = repr(schedule)
    ax.set_title(title if len(title) <= 80 else title[:77] + "...", fontsize=8)
    return ax


def _log_edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges on a log axis: geometric midpoints, the outer edges mirrored."""
    c = np.asarray(centres, dtype=float)
    if len(c) == 1:
        return np.array([c[0] / 1.5, c[0] * 1.5])
    mid = np.sqrt(c[:-1] * c[1:])
    return np.concatenate([[c[0] ** 2 / mid[0]], mid, [c[-1] ** 2 / mid[-1]]])


def draw_sweep_heatmap(
    b_axis: np.ndarray,
    lr_axis: np.ndarray,
    values: np.ndarray,
    metric: str,
    *,
    ax: Any = None,
    temperature_lines: bool = True,
) -> Any:
    """A sweep's ``metric`` (``values[i, j]`` at ``lr_axis[i]``, ``b_axis[j]``, e.g. ``SweepResult.pivot``) over
    batch size (x) and learning rate (y) on log axes, each cell annotated, with dashed lines of constant
    ``lr / B`` through the grid's ratios (at most 9, log-spaced) when ``temperature_lines``; returns the Axes."""
    ax = _result_axes(ax, (5.5, 4.2))
    bx, ly = _log_edges(b_axis), _log_edges(lr_axis)
    mesh = ax.pcolormesh(bx, ly, np.ma.masked_invalid(values), shading="flat", cmap="viridis")
    ax.figure.colorbar(mesh, ax=ax, label=metric)
    for i, lr in enumerate(lr_axis):
        for j, b in enumerate(b_axis):
            if np.isfinite(values[i, j]):
                ax.text(b, lr, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=7, color="w")
    if temperature_lines and len(b_axis) and len(lr_axis):
        ratios = sorted({float(f"{lr / b:.6g}") for lr in lr_axis for b in b_axis})
        if len(ratios) > 9:  # keep the picture readable: 9 log-spaced lines
            ratios = [ratios[int(i)] for i in np.linspace(0, len(ratios) - 1, 9)]
        xs = np.array([bx[0], bx[-1]])
        for c in ratios:
            ax.plot(xs, c * xs, "w--", lw=0.8, alpha=0.7)
        ax.set_xlim(bx[0], bx[-1])
        ax.set_ylim(ly[0], ly[-1])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("learning rate")
    ax.set_title(f"{metric} (dashed: constant lr/B)")
    return ax


def draw_density(density: Any, *, ax: Any = None, log: bool = True) -> Any:
    """A Hessian ``SpectralDensity`` against the eigenvalue (log y axis by default, floored at ``1e-12`` of the
    peak, as in Ghorbani et al. 2019); returns the Axes."""
    if ax is None:
        from matplotlib.figure import Figure

        ax = Figure(figsize=(5, 3.5)).add_subplot(1, 1, 1)
    floor = 1e-12 * max(float(density.density.max()), 1e-300)
    ax.plot(density.grid, np.maximum(density.density, floor) if log else density.density, lw=1.2)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density (SLQ, {density.num_runs} runs x {density.lanczos_steps} steps)")
    return ax
