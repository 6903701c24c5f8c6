"""Mode connectivity: linear paths, Bezier / PolyChain curves and AutoNEB between two minima, with barriers.

Every path is evaluated through :meth:`Objective.loss_many` on its stacked points and returned as a :class:`Path`
with the dense loss/accuracy profile, the arc length and the three barrier definitions in use:

- ``max_loss``: ``max_t L(phi(t))`` (AutoNEB's ``saddle_train_loss``);
- ``max_minus_mean``: ``max_t L(phi(t)) - (L(0) + L(1)) / 2`` (git-re-basin);
- ``max_above_chord``: ``max_t [L(phi(t)) - ((1 - t) L(0) + t L(1))]`` (Entezari et al. 2021).

Curves and NEB work for any ``nn.Module`` and any batch the protocol of :mod:`lrbs.batches` reads (tuples,
mappings, ``compute_loss``) through the Objective's functional evaluation (no layer rewriting).

References:
    Garipov, Izmailov, Podoprikhin, Vetrov, Wilson, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs",
    NeurIPS 2018 (arXiv 1802.10026).
    Draxler, Veschgini, Salmhofer, Hamprecht, "Essentially No Barriers in Neural Network Energy Landscape",
    ICML 2018 (arXiv 1803.00885).
    Henkelman, Jonsson, "Improved tangent estimate in the nudged elastic band method", J. Chem. Phys. 113 (2000).
    Entezari, Sedghi, Saukh, Neyshabur, "The Role of Permutation Invariance in Linear Mode Connectivity of Neural
    Networks", ICLR 2022 (arXiv 2110.06296).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import progress as progress_bar
from .batches import as_source, index_batch
from .errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number
from .landscape import check_same_architecture, params_of
from .objective import Objective

__all__ = ["Path", "Curve", "barriers", "linear_path", "fit_curve", "auto_neb", "curve_lr_factor"]

CURVES = ("bezier", "polychain")


# --------------------------------------------------------------------------- barriers and the Path result
def barriers(loss: np.ndarray, t: np.ndarray) -> dict[str, float]:
    """The three barrier heights of a loss profile ``loss[k] = L(phi(t[k]))`` with ``t`` from 0 to 1.

    Returns:
        ``{"max_loss", "max_minus_mean", "max_above_chord"}`` (NaN when the profile has non-finite values).
    """
    loss, t = np.asarray(loss, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if not np.isfinite(loss).all():
        return {"max_loss": float("nan"), "max_minus_mean": float("nan"), "max_above_chord": float("nan")}
    l0, l1 = loss[0], loss[-1]
    tt = (t - t[0]) / (t[-1] - t[0]) if t[-1] != t[0] else np.zeros_like(t)
    return {
        "max_loss": float(loss.max()),
        "max_minus_mean": float(loss.max() - 0.5 * (l0 + l1)),
        "max_above_chord": float((loss - ((1 - tt) * l0 + tt * l1)).max()),
    }


@dataclass(frozen=True, eq=False)
class Path:
    """A path between two minima with its dense loss profile.

    Attributes:
        kind: ``"linear"``, ``"bezier"``, ``"polychain"`` or ``"neb"``.
        t: ``(K,)`` path parameter in ``[0, 1]`` (the curve parameter; for NEB the normalized arc length).
        loss, accuracy: ``(K,)`` train profile.
        test_loss, test_accuracy: ``(K,)`` test profile, or None.
        arc_length: ``(K,)`` cumulative Euclidean length in parameter space (``arc_length[-1]`` is the total).
        barriers: train barriers (see :func:`barriers`); ``test_barriers`` likewise or None.
        settings: bn mode, data size and fingerprint, path type and the method's settings.
        points: optional ``(m, n)`` control points / pivots (endpoints included).
    """

    kind: str
    t: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    arc_length: np.ndarray
    barriers: dict[str, float]
    settings: dict[str, Any]
    test_loss: np.ndarray | None = None
    test_accuracy: np.ndarray | None = None
    test_barriers: dict[str, float] | None = None
    points: torch.Tensor | None = field(default=None, repr=False)

    @property
    def length(self) -> float:
        return float(self.arc_length[-1])

    def to_dict(self) -> dict[str, Any]:
        def clean(a):
            return None if a is None else [float(v) if np.isfinite(v) else None for v in np.ravel(a)]

        return {
            "kind": self.kind,
            "t": clean(self.t),
            "loss": clean(self.loss),
            "accuracy": clean(self.accuracy),
            "test_loss": clean(self.test_loss),
            "test_accuracy": clean(self.test_accuracy),
            "arc_length": clean(self.arc_length),
            "length": self.length,
            "barriers": self.barriers,
            "test_barriers": self.test_barriers,
            "settings": self.settings,
        }

    def plot(self, metric: str = "loss", *, ax: Any = None, label: str | None = None) -> Any:
        """Train (solid) and test (dashed) ``metric`` along the path (:func:`lrbs.report.figures.draw_path`);
        returns the matplotlib Axes."""
        from .report.figures import draw_path

        return draw_path(self, metric, ax=ax, label=label)


def _evaluate_path(
    kind: str,
    t: np.ndarray,
    stack: torch.Tensor,
    obj: Objective,
    test_obj: Objective | None,
    settings: dict[str, Any],
    points: torch.Tensor | None = None,
) -> Path:
    tr = obj.loss_many(stack)
    te = test_obj.loss_many(stack) if test_obj is not None else None
    steps = (stack[1:] - stack[:-1]).double().norm(dim=1).cpu().numpy()
    arc = np.concatenate([[0.0], np.cumsum(steps)])
    s = {"path": kind, **obj.settings(), **settings, "num_points": int(len(t))}
    if test_obj is not None:
        s["test"] = test_obj.settings()
    return Path(
        kind,
        np.asarray(t, dtype=np.float64),
        tr["loss"],
        tr["accuracy"],
        arc,
        barriers(tr["loss"], t),
        s,
        None if te is None else te["loss"],
        None if te is None else te["accuracy"],
        None if te is None else barriers(te["loss"], t),
        None if points is None else points.detach().clone(),
    )


def _endpoints(model_a: nn.Module, model_b: nn.Module, obj: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    check_same_architecture(model_a, model_b)
    return params_of(model_a, obj, "model_a"), params_of(model_b, obj, "model_b")


# --------------------------------------------------------------------------- linear path
def linear_path(
    model_a: nn.Module, model_b: nn.Module, obj: Objective, n: int = 61, *, test_obj: Objective | None = None
) -> Path:
    """The straight line ``theta(t) = (1 - t) theta_a + t theta_b`` at ``n`` equally spaced ``t`` in ``[0, 1]``.

    Raises:
        ShapeError: different architectures (names the first differing parameter and both shapes).
        ConfigError: ``n < 2``.
    """
    n = check_int("n", n, low=2)
    ta, tb = _endpoints(model_a, model_b, obj)
    t = np.linspace(0.0, 1.0, n)
    tt = torch.as_tensor(t, dtype=obj.dtype, device=obj.device)[:, None]
    stack = (1 - tt) * ta + tt * tb
    return _evaluate_path("linear", t, stack, obj, test_obj, {}, torch.stack([ta, tb]))


# --------------------------------------------------------------------------- curves
def _coefficients(kind: str, m: int, t: torch.Tensor) -> torch.Tensor:
    """Coefficients ``(K, m)`` of the ``m`` control points at parameters ``t`` ``(K,)``."""
    i = torch.arange(m, dtype=t.dtype, device=t.device)
    t = t[:, None]
    if kind == "bezier":
        binom = torch.tensor([math.comb(m - 1, k) for k in range(m)], dtype=t.dtype, device=t.device)
        return binom * t**i * (1 - t) ** (m - 1 - i)
    return torch.clamp(1 - torch.abs(t * (m - 1) - i), min=0.0)


@dataclass(frozen=True, eq=False)
class Curve:
    """A parametric curve ``phi(t) = sum_i c_i(t) theta_i`` between two models (``t`` in ``[0, 1]``).

    Bezier: ``c_i(t) = C(m-1, i) t^i (1-t)^(m-1-i)``; PolyChain: ``c_i(t) = max(0, 1 - |t (m-1) - i|)``, with the
    ``m = bends + 2`` control points ``theta_0 = theta_a, ..., theta_{m-1} = theta_b`` (Garipov et al.'s
    ``num_bends`` is ``m``).

    Attributes:
        kind: ``"bezier"`` or ``"polychain"``.
        points: ``(m, n)`` control points, endpoints included.
        path: the evaluated :class:`Path` (dense profile, barriers).
        history: per-step training loss.
        settings: the training settings.
    """

    kind: str
    points: torch.Tensor = field(repr=False)
    path: Path | None
    history: np.ndarray
    settings: dict[str, Any]

    def coefficients(self, t: float | np.ndarray | torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(np.atleast_1d(np.asarray(t, dtype=np.float64)), dtype=self.points.dtype)
        return _coefficients(self.kind, self.points.shape[0], tt)

    def __call__(self, t: float) -> torch.Tensor:
        """The flat parameters ``phi(t)``."""
        return (self.coefficients(t) @ self.points)[0]

    def stack(self, ts: np.ndarray) -> torch.Tensor:
        """``(K, n)`` parameters at each ``t`` in ``ts``."""
        return self.coefficients(ts) @ self.points

    def evaluate(self, obj: Objective, n: int = 61, *, test_obj: Objective | None = None) -> Path:
        """The dense profile at ``n`` equally spaced ``t`` (Garipov et al. evaluate 61 points)."""
        n = check_int("n", n, low=2)
        t = np.linspace(0.0, 1.0, n)
        return _evaluate_path(
            self.kind, t, self.stack(t).to(obj.dtype), obj, test_obj, self.settings, self.points
        )


def curve_lr_factor(fraction: float) -> float:
    """Garipov et al.'s curve-training LR factor at a fraction of training: 1 for the first 50%, then linear
    down to 0.01 at 90%, then 0.01."""
    if fraction <= 0.5:
        return 1.0
    if fraction <= 0.9:
        return 1.0 - 0.99 * (fraction - 0.5) / 0.4
    return 0.01


def _split_data(data: Any) -> tuple[Any, Any]:
    """(train source, test source or None): an lrbs ``Dataset`` gives both splits; anything else
    :func:`lrbs.batches.as_source` reads is the train data."""
    if data is None:
        raise ConfigError(
            "data=None is not allowed: give an lrbs Dataset or Split, (x, y) tensors, a torch Dataset, "
            "a DataLoader or a list of batches"
        )
    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, torch.utils.data.Dataset):
        return as_source(data.train, name="data.train"), as_source(data.test, name="data.test")
    return as_source(data, name="data"), None


def _objectives(
    model: nn.Module, data: Any, loss_fn, bn: str, compute_loss=None, batch_weight=None
) -> tuple[Objective, Objective, Objective | None]:
    """(training objective with batch-statistics BN, evaluation objective, test objective or None)."""
    train, test = _split_data(data)
    check_choice("bn", bn, ("eval", "train", "recompute"))
    kw = {"compute_loss": compute_loss, "batch_weight": batch_weight}
    tobj = Objective(model, loss_fn, train, bn="train", **kw)
    eobj = Objective(model, loss_fn, train, bn=bn, batch_size=1000, **kw)
    test_obj = Objective(model, loss_fn, test, bn=bn, batch_size=1000, **kw) if test is not None else None
    if bn == "recompute" and test_obj is not None:
        # BN statistics at each point come from the *train* data, as in Garipov et al.'s update_bn
        test_obj = test_obj.with_bn_statistics_from(eobj)
    return tobj, eobj, test_obj


class _MiniBatches:
    """Seeded mini-batches of a training objective's data, drawn with the caller's generator.

    Data that concatenate into one batch (tensors, equally shaped samples) are sampled by index: a permutation
    ``torch.randperm(n, gen)`` consumed ``batch_size`` at a time, a fresh one when fewer than ``batch_size`` are
    left. Ragged batches (e.g. padded to different lengths) are drawn whole, in a seeded permuted order.
    """

    def __init__(self, tobj: Objective, batch_size: int, gen: torch.Generator):
        self.gen, self.n = gen, tobj.num_samples
        try:
            self.whole: Any = tobj.data
        except LrbsTypeError:
            self.whole, self.batches = None, tobj.batches
            self.batch_size = check_int("batch_size", batch_size, low=1)
            self.perm, self.pos = torch.randperm(len(self.batches), generator=gen), 0
            return
        self.batch_size = check_int("batch_size", batch_size, low=1, high=self.n)
        self.perm, self.pos = torch.randperm(self.n, generator=gen), 0

    @property
    def per_epoch(self) -> int:
        return math.ceil(self.n / self.batch_size) if self.whole is not None else len(self.batches)

    def next(self) -> Any:
        if self.whole is None:
            if self.pos == len(self.batches):
                self.perm, self.pos = torch.randperm(len(self.batches), generator=self.gen), 0
            self.pos += 1
            return self.batches[int(self.perm[self.pos - 1])]
        if self.pos + self.batch_size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return index_batch(self.whole, idx)


def _check_sgd(lr: float, momentum: float, weight_decay: float, seed: int) -> tuple[float, float, float, int]:
    """The SGD settings shared by :func:`fit_curve` and :func:`auto_neb`, checked: ``lr > 0``, ``momentum`` in
    ``[0, 1)``, ``weight_decay >= 0``, an integer seed."""
    lr = check_number("lr", lr, low=0.0)
    momentum = check_number("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
    weight_decay = check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    return lr, momentum, weight_decay, check_int("seed", seed)


def _train_curve(
    kind: str,
    ends: tuple[torch.Tensor, torch.Tensor],
    inner: torch.Tensor,
    tobj: Objective,
    batches: _MiniBatches,
    gen: torch.Generator,
    sgd: dict[str, float],
    total: int,
    progress: bool,
) -> np.ndarray:
    """``total`` SGD steps on the inner control points (one ``t ~ U(0, 1)`` and one mini-batch each, LR by
    :func:`curve_lr_factor`); returns the per-step training loss."""
    ta, tb = ends
    m = inner.shape[0] + 2
    lr, weight_decay = sgd["lr"], sgd["weight_decay"]
    opt = torch.optim.SGD([inner], lr=lr, momentum=sgd["momentum"])
    history = np.empty(total)
    with progress_bar(f"{kind} curve", total, enabled=progress) as bar:
        for step in range(total):
            batch = batches.next()
            t = torch.rand((1,), generator=gen, dtype=tobj.dtype)
            for g in opt.param_groups:
                g["lr"] = lr * curve_lr_factor(step / total)
            c = _coefficients(kind, m, t)[0]
            with torch.enable_grad():
                theta = c[0] * ta + c[-1] * tb + c[1:-1] @ inner
                loss = tobj.loss_on(theta, batch)
                if weight_decay:
                    loss = loss + 0.5 * weight_decay * theta.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            history[step] = float(loss.detach())
            bar.advance()
    return history


# fit_curve and auto_neb take the same training keywords under the same names (lr, momentum, batch_size,
# weight_decay, seed, bn, loss_fn, compute_loss, batch_weight): one name per concept in the public API.
# duplicates pairs the two signatures, and this one with other analyses' keyword lists, by shape alone.
def fit_curve(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    kind: str = "bezier",
    bends: int = 3,
    epochs: float = 20,
    lr: float = 0.05,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    seed: int = 0,
    bn: str = "recompute",
    loss_fn: Callable | None = None,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
    num_eval: int = 61,
    progress: bool = False,
) -> Curve:
    """Train a Bezier or PolyChain curve of low loss between two fixed minima (Garipov et al. 2018).

    ``bends`` counts the *trainable inner* control points (the curve has ``m = bends + 2`` points; Garipov et al.'s
    ``num_bends=3`` is ``bends=1``). They start equally spaced on the straight line. Each step draws one
    ``t ~ U(0, 1)`` and one mini-batch and minimises ``L(phi(t)) + wd/2 ||phi(t)||^2`` with SGD (momentum 0.9); the
    LR is constant for the first 50% of the steps, then falls linearly to 1% at 90% (:func:`curve_lr_factor`).
    BatchNorm uses batch statistics while training; at the evaluated points (``bn="recompute"``) the statistics are
    recomputed from the train data. The model is any ``nn.Module`` (``functional_call``; no layer rewriting).

    Args:
        model_a, model_b: the endpoints (same architecture); never modified.
        data: an lrbs ``Dataset`` (train split trains, test split is evaluated), or anything
            :func:`lrbs.batches.as_source` reads (a ``Split``, tensors, a torch Dataset, a DataLoader, a list of
            batches) as the train data.
        kind: ``"bezier"`` (needs ``bends >= 1``) or ``"polychain"`` (needs ``bends >= 2``).
        bends: number of trainable inner control points.
        epochs, lr, batch_size, weight_decay, momentum: training settings.
        seed: seeds a private generator (data order and ``t``); the global RNG is untouched.
        bn: evaluation BN mode of the returned path.
        loss_fn, compute_loss, batch_weight: the batch protocol (:class:`lrbs.batches.BatchLoss`); default
            cross-entropy for ``(x, y)`` batches, the model's own loss for mappings.
        num_eval: points of the evaluated path.
        progress: rich progress bar.

    Returns:
        A :class:`Curve` with its evaluated :class:`Path` (train and, for a Dataset, test).

    Raises:
        ConfigError: bad ``kind``, ``bends``, ``epochs``, ``lr``, ``batch_size``.
        ShapeError: the two models differ (names the first differing parameter and both shapes).
    """
    check_choice("kind", kind, CURVES)
    bends = check_int("bends", bends, low=1 if kind == "bezier" else 2)
    epochs = check_number("epochs", epochs, low=0.0, low_inclusive=True)
    lr, momentum, weight_decay, seed = _check_sgd(lr, momentum, weight_decay, seed)
    check_same_architecture(model_a, model_b)
    tobj, eobj, test_obj = _objectives(model_a, data, loss_fn, bn, compute_loss, batch_weight)
    batch_size = check_int("batch_size", batch_size, low=1)
    ta, tb = params_of(model_a, tobj, "model_a"), params_of(model_b, tobj, "model_b")
    m = bends + 2
    frac = torch.linspace(0, 1, m, dtype=tobj.dtype)[1:-1, None]
    inner = ((1 - frac) * ta + frac * tb).clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    batches = _MiniBatches(tobj, batch_size, gen)
    total = int(round(epochs * batches.per_epoch))
    sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    history = _train_curve(kind, (ta, tb), inner, tobj, batches, gen, sgd, total, progress)
    points = torch.cat([ta[None], inner.detach(), tb[None]]).to(eobj.dtype)
    settings = {"curve": kind, "bends": bends, "num_control_points": m, "epochs": epochs, "steps": total, "lr": lr,
                "batch_size": batch_size, "weight_decay": weight_decay, "momentum": momentum, "seed": seed}  # fmt: skip
    curve = Curve(kind, points, None, history, settings)
    path = curve.evaluate(eobj, num_eval, test_obj=test_obj)
    return Curve(kind, points, path, history, settings)


# --------------------------------------------------------------------------- AutoNEB
def _improved_tangent(
    prev: torch.Tensor, cur: torch.Tensor, nxt: torch.Tensor, vp: float, vc: float, vn: float
) -> torch.Tensor:
    """Henkelman & Jonsson (2000) tangent at ``cur``: towards the higher neighbour, energy-weighted at extrema."""
    tp, tm = nxt - cur, cur - prev
    if vn > vc > vp:
        tau = tp
    elif vn < vc < vp:
        tau = tm
    else:
        dmax, dmin = max(abs(vn - vc), abs(vp - vc)), min(abs(vn - vc), abs(vp - vc))
        tau = tp * dmax + tm * dmin if vn > vp else tp * dmin + tm * dmax
    nrm = tau.norm()
    return tau / nrm if nrm > 0 else tau


def _redistribute(pivots: torch.Tensor) -> torch.Tensor:
    """Move the inner pivots to equal arc-length spacing along the polyline through all pivots (k = infinity)."""
    seg = (pivots[1:] - pivots[:-1]).norm(dim=1)
    cum = torch.cat([seg.new_zeros(1), torch.cumsum(seg, 0)])
    total = cum[-1]
    if total <= 0:
        return pivots
    m = pivots.shape[0]
    out = pivots.clone()
    for i in range(1, m - 1):
        s = total * i / (m - 1)
        j = int(torch.searchsorted(cum, s, right=True).clamp(1, m - 1)) - 1
        w = ((s - cum[j]) / seg[j]).clamp(0, 1) if seg[j] > 0 else seg.new_zeros(())
        out[i] = (1 - w) * pivots[j] + w * pivots[j + 1]
    return out


def _scan(pivots: torch.Tensor, sub: int) -> tuple[torch.Tensor, np.ndarray]:
    """Dense points: every pivot and ``sub`` equally spaced points inside each gap; returns (points, gap index)."""
    pts, gap = [pivots[0][None]], [-1]
    w = torch.arange(1, sub + 1, dtype=pivots.dtype, device=pivots.device)[:, None] / (sub + 1)
    for g in range(pivots.shape[0] - 1):
        pts.append((1 - w) * pivots[g] + w * pivots[g + 1])
        gap += [g] * sub
        pts.append(pivots[g + 1][None])
        gap.append(-1)
    return torch.cat(pts), np.asarray(gap)


def _insert_pivots(
    pivots: torch.Tensor, eobj: Objective, subpoints: int, threshold: float, insert_per_cycle: int, cycle: int
) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """AutoNEB's insertion step: a dense scan (``subpoints`` per gap, one ``loss_many`` call), and up to
    ``insert_per_cycle`` new pivots at the highest scan point of the gaps whose scan rises above the linear
    interpolation of their pivots by more than ``threshold`` times the loss range.

    Returns ``(new pivots or None when no gap is over the threshold, the cycle's log entry)``.
    """
    pts, gap = _scan(pivots, subpoints)
    scan_loss = eobj.loss_many(pts, accuracy=False)["loss"]
    lrange = np.nanmax(scan_loss) - np.nanmin(scan_loss)
    piv_idx = np.flatnonzero(gap == -1)
    cand = []
    for g in range(pivots.shape[0] - 1):
        sel = np.flatnonzero(gap == g)
        l0, l1 = scan_loss[piv_idx[g]], scan_loss[piv_idx[g + 1]]
        frac = np.arange(1, subpoints + 1) / (subpoints + 1)
        dev = scan_loss[sel] - ((1 - frac) * l0 + frac * l1)
        worst = float(np.max(dev)) if np.isfinite(dev).all() else float("inf")
        if worst > threshold * lrange:
            cand.append((worst, g, int(sel[int(np.nanargmax(scan_loss[sel]))])))
    log = {
        "cycle": cycle,
        "pivots": int(pivots.shape[0]),
        "max_scan_loss": float(np.nanmax(scan_loss)),
        "gaps_over_threshold": len(cand),
    }
    if not cand:
        return None, log
    cand = sorted(cand, reverse=True)[:insert_per_cycle]
    new = list(pivots)
    for _, g, k in sorted(cand, key=lambda c: -c[1]):  # insert from the back so indices stay valid
        new.insert(g + 1, pts[k])
    return torch.stack(new), log


def _neb_steps(
    pivots: torch.Tensor,
    ends: tuple[torch.Tensor, torch.Tensor],
    tobj: Objective,
    batches: _MiniBatches,
    steps: int,
    sgd: dict[str, float],
) -> torch.Tensor:
    """``steps`` nudged-elastic-band steps on the inner pivots (shared mini-batch, gradient without its component
    along the improved tangent, SGD with momentum, then redistribution) between the fixed ``ends``; returns all
    pivots."""
    ta, tb = ends
    lr, momentum, weight_decay = sgd["lr"], sgd["momentum"], sgd["weight_decay"]

    def losses_on(batch: Any, thetas: torch.Tensor) -> torch.Tensor:
        return torch.stack([tobj.loss_on(th, batch) for th in thetas])

    inner = pivots[1:-1].clone()
    buf = torch.zeros_like(inner)
    for _ in range(steps):
        batch = batches.next()
        leaf = inner.clone().requires_grad_(True)
        with torch.enable_grad():
            li = losses_on(batch, leaf)
            (grad,) = torch.autograd.grad(li.sum(), leaf)
        with torch.no_grad():
            le = losses_on(batch, torch.stack([ta, tb]))
        energies = torch.cat([le[:1], li.detach(), le[1:]]).tolist()
        full = torch.cat([ta[None], inner, tb[None]])
        g = grad + weight_decay * inner
        for i in range(inner.shape[0]):
            tau = _improved_tangent(
                full[i], full[i + 1], full[i + 2], energies[i], energies[i + 1], energies[i + 2]
            )
            g[i] -= (g[i] @ tau) * tau
        buf = momentum * buf + g
        inner = inner - lr * buf
        inner = _redistribute(torch.cat([ta[None], inner, tb[None]]))[1:-1]
    return torch.cat([ta[None], inner, tb[None]])


def _arc_parameter(pts: torch.Tensor) -> np.ndarray:
    """The normalized cumulative arc length along ``pts`` (equally spaced where the path has zero length)."""
    seg = (pts[1:] - pts[:-1]).double().norm(dim=1).cpu().numpy()
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    return arc / arc[-1] if arc[-1] > 0 else np.linspace(0, 1, len(arc))


# auto_neb's keywords repeat fit_curve's on purpose (duplicates tool): the same training and batch-protocol options
# under the same names, checked by the same _check_sgd / _objectives.
def auto_neb(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    *,
    cycles: int = 4,
    steps: int = 100,
    lr: float = 0.05,
    momentum: float = 0.9,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    initial_pivots: int = 3,
    insert_per_cycle: int = 2,
    threshold: float = 0.1,
    subpoints: int = 9,
    seed: int = 0,
    bn: str = "recompute",
    loss_fn: Callable | None = None,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
) -> Path:
    """AutoNEB (Draxler et al. 2018): a nudged elastic band between two minima, with automatic pivot insertion.

    Each step draws one mini-batch shared by all pivots; every inner pivot's gradient ``g = dL_i + wd theta_i``
    loses its component along the Henkelman–Jonsson improved tangent ``tau`` (``g -= (g . tau) tau``), takes an SGD
    (momentum) step, and then the pivots are redistributed to equal spacing along the path — the ``k = infinity``
    spring used by 33 of AutoNEB's 34 configs. All pivots' losses and gradients come from one forward/backward over
    the stacked pivots. The first cycle inserts ``initial_pivots`` equally spaced pivots; after each later cycle a
    dense scan (``subpoints`` per gap, on the full train data, one ``loss_many`` call) inserts up to
    ``insert_per_cycle`` pivots at the highest scan point of the gaps whose scan deviates from the linear
    interpolation of their pivots by more than ``threshold`` times the loss range; no such gap ends the search.

    ``data`` and ``loss_fn`` / ``compute_loss`` / ``batch_weight`` are read as in :func:`fit_curve`.

    Returns:
        A :class:`Path` (``kind="neb"``) through pivots and scan points, ``t`` = normalized arc length, with the
        final pivots in ``points`` and the cycle log in ``settings["cycles_log"]``.

    Raises:
        ConfigError: bad counts, rates or thresholds. ShapeError: the two models differ.
    """
    cycles = check_int("cycles", cycles, low=1)
    steps = check_int("steps", steps, low=0)
    lr, momentum, weight_decay, seed = _check_sgd(lr, momentum, weight_decay, seed)
    initial_pivots = check_int("initial_pivots", initial_pivots, low=1)
    insert_per_cycle = check_int("insert_per_cycle", insert_per_cycle, low=1)
    threshold = check_number("threshold", threshold, low=0.0, low_inclusive=True)
    subpoints = check_int("subpoints", subpoints, low=1)
    check_same_architecture(model_a, model_b)
    tobj, eobj, test_obj = _objectives(model_a, data, loss_fn, bn, compute_loss, batch_weight)
    batch_size = check_int("batch_size", batch_size, low=1)
    ta, tb = params_of(model_a, tobj, "model_a"), params_of(model_b, tobj, "model_b")
    w = torch.linspace(0, 1, initial_pivots + 2, dtype=tobj.dtype)[:, None]
    pivots = (1 - w) * ta + w * tb
    batches = _MiniBatches(tobj, batch_size, torch.Generator().manual_seed(seed))
    sgd = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    log = []
    for cycle in range(cycles):
        if cycle > 0:
            inserted, entry = _insert_pivots(pivots, eobj, subpoints, threshold, insert_per_cycle, cycle)
            log.append(entry)
            if inserted is None:
                break
            pivots = inserted
        pivots = _neb_steps(pivots, (ta, tb), tobj, batches, steps, sgd)
    pts, _ = _scan(pivots, subpoints)
    settings = {"cycles": cycles, "steps": steps, "lr": lr, "momentum": momentum, "batch_size": batch_size,
                "weight_decay": weight_decay, "initial_pivots": initial_pivots, "insert_per_cycle": insert_per_cycle,
                "threshold": threshold, "subpoints": subpoints, "seed": seed, "spring": "k=inf (redistribution)",
                "tangent": "henkelman-jonsson", "num_pivots": int(pivots.shape[0]), "cycles_log": log}  # fmt: skip
    return _evaluate_path("neb", _arc_parameter(pts), pts.to(eobj.dtype), eobj, test_obj, settings, pivots)
