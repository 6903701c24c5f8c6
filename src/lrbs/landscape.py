"""Loss landscapes: directions, 1-D/2-D slices, interpolation, PCA planes, non-convexity, plots.

Every surface is ``L(theta* + alpha * delta + beta * eta)`` on the fixed data of an :class:`~lrbs.objective.Objective`,
evaluated through :meth:`Objective.loss_many` (many grid points per call). Grids are laid out as
``(len(alphas), len(betas))`` with ``[i, j] = (alphas[i], betas[j])``.

References:
    Li, Xu, Taylor, Studer, Goldstein, "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018
    (arXiv 1712.09913) — filter normalization, PCA trajectory planes, the |lambda_min / lambda_max| map.
    Goodfellow, Vinyals, Saxe, "Qualitatively characterizing neural network optimization problems" (arXiv 1412.6544).
    Keskar et al., "On Large-Batch Training for Deep Learning" (arXiv 1609.04836) — the parametric plot.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import atomic_write, dumps
from ._util import progress as _progress
from .batches import batch_size_of, slice_batch
from .errors import ConfigError, LrbsTypeError, ShapeError, check_choice, check_int, check_number
from .objective import Objective

__all__ = [
    "Direction",
    "Landscape",
    "PCADirections",
    "NonConvexity",
    "random_direction",
    "eigen_direction",
    "pca_directions",
    "landscape_1d",
    "landscape_2d",
    "interpolate",
    "refine",
    "nonconvexity",
    "params_of",
]

# (duplicates pairs the end of __all__ and these option tuples with objective.py's by shape alone: module
# constants, no logic to share)
NORMS = ("filter", "layer", "none")
IGNORES = ("biasbn", "none")
METRICS = ("loss", "accuracy")
# Memory budget of one stacked chunk of parameter points (bounds the chunk a caller may ask for).
_STACK_BUDGET_BYTES = 256 * 2**20


# --------------------------------------------------------------------------- directions
@dataclass(frozen=True, eq=False)
class Direction:
    """A direction in parameter space (flat, in the objective's layout) and how it was made.

    Attributes:
        vector: ``(n,)`` tensor.
        kind: ``"random"``, ``"eigen"``, ``"pca"``, ``"interpolation"`` or ``"custom"``.
        norm: normalization rule (``"filter"``, ``"layer"``, ``"none"``) or None.
        ignore: rule for 1-D tensors (``"biasbn"``, ``"none"``) or None.
        seed: the seed of a random direction.
        info: extra JSON-able facts (e.g. the eigenvalue of an eigen-direction).
    """

    vector: torch.Tensor
    kind: str = "custom"
    norm: str | None = None
    ignore: str | None = None
    seed: int | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def settings(self) -> dict[str, Any]:
        """How the direction was made (kind, norm, ignore, seed), its L2 norm ``norm2`` and ``info``."""
        how = {name: getattr(self, name) for name in ("kind", "norm", "ignore", "seed")}
        return {**how, "norm2": float(self.vector.double().norm()), **self.info}


def random_direction(
    obj: Objective, *, norm: str = "filter", ignore: str = "biasbn", seed: int = 0
) -> Direction:
    """A Gaussian direction normalized exactly as Li et al.'s ``net_plotter.py``.

    For each parameter tensor ``w`` with its Gaussian draw ``d``:

    - ``w.dim() > 1`` and ``norm="filter"``: every slice along dim 0 (a conv filter, a row of a Linear layer) is
      rescaled, ``d[i] *= ||w[i]|| / (||d[i]|| + 1e-10)``;
      ``norm="layer"``: ``d *= ||w|| / ||d||``; ``norm="none"``: ``d`` is left as drawn.
    - ``w.dim() <= 1`` (biases, BatchNorm weight and bias): ``ignore="biasbn"`` sets ``d = 0``; ``ignore="none"``
      sets ``d = w`` (the weight itself, not random — exactly what the reference code does).

    Args:
        obj: the objective; its centre point supplies ``w``.
        norm: ``"filter"``, ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` or ``"none"``.
        seed: seeds a private ``torch.Generator`` (the global RNG is untouched).

    Returns:
        A :class:`Direction` (flat vector in the objective's layout).

    Raises:
        ConfigError: unknown ``norm`` or ``ignore``.

    References:
        Li et al. 2018, arXiv 1712.09913, Section 4 (filter-wise normalization).
    """
    check_choice("norm", norm, NORMS)
    check_choice("ignore", ignore, IGNORES)
    seed = check_int("seed", seed)
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for w in obj.params().values():
        d = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(dtype=w.dtype, device=w.device)
        if w.dim() <= 1:
            d = torch.zeros_like(w) if ignore == "biasbn" else w.clone()
        elif norm == "filter":
            wn = w.reshape(w.shape[0], -1).norm(dim=1)
            dn = d.reshape(d.shape[0], -1).norm(dim=1)
            d = d * (wn / (dn + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
        elif norm == "layer":
            d = d * (w.norm() / d.norm())
        parts.append(d.reshape(-1))
    return Direction(torch.cat(parts), "random", norm, ignore, seed)


def eigen_direction(obj: Objective, k: int = 2) -> tuple[Direction, ...]:
    """The top-``k`` Hessian eigenvectors at the centre point (unit norm), largest eigenvalue first, from
    :func:`lrbs.curvature.hessian_eigenvalues` (Lanczos on :meth:`Objective.hvp`).

    Raises:
        ConfigError: ``k`` < 1 or larger than the number of parameters.
    """
    from .curvature import hessian_eigenvalues

    k = check_int("k", k, low=1, high=obj.num_params)
    res = hessian_eigenvalues(obj, k, return_vectors=True)
    vals = np.asarray(res.values, dtype=np.float64).reshape(-1)
    vecs = torch.as_tensor(res.vectors)  # (k, n)
    order = np.argsort(-vals)
    out = []
    for r in order[:k]:
        v = vecs[int(r)].to(obj.dtype)
        out.append(Direction(v / v.norm(), "eigen", None, None, None, {"eigenvalue": float(vals[r])}))
    return tuple(out)


@dataclass(frozen=True, eq=False)
class PCADirections:
    """Two PCA directions of a training trajectory and the trajectory's coordinates on that plane.

    Attributes:
        d1, d2: unit-norm :class:`Direction` objects (first and second principal component).
        coords: ``(T, 2)`` projections ``<theta_k - theta_final, d>`` of each checkpoint.
        explained_variance_ratio: ``(2,)`` fraction of the variance each direction explains.
        center: flat ``theta_final`` (the plane's origin).
    """

    d1: Direction
    d2: Direction
    coords: np.ndarray
    explained_variance_ratio: np.ndarray
    center: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "coords": self.coords.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
            "d1": self.d1.settings(),
            "d2": self.d2.settings(),
        }


def pca_directions(
    trajectory: Sequence[torch.Tensor | Mapping[str, torch.Tensor]],
    obj: Objective | None = None,
    *,
    ignore: str | None = None,
) -> PCADirections:
    """PCA plane of a training trajectory (Li et al. 2018, Section 7; LL ``projection.py``).

    Rows are ``theta_k - theta_final`` over the checkpoints (the last entry is the final point); they are
    mean-centred and decomposed by SVD (numpy, float64); the top two right-singular vectors are the directions,
    and each checkpoint is projected as ``x_k = <theta_k - theta_final, d>`` (``||d|| = 1``).

    Args:
        trajectory: flat parameter vectors or state dicts (at least 3), oldest first.
        obj: needed for state dicts (flattened in its layout) and for ``ignore="biasbn"``.
        ignore: ``"biasbn"`` zeroes 1-D tensors' entries in every row, as LL does; default ``"biasbn"`` when
            ``obj`` is given, else ``"none"``.

    Returns:
        :class:`PCADirections`.

    Raises:
        ConfigError: fewer than 3 checkpoints, state dicts or ``ignore="biasbn"`` without ``obj``.
        ShapeError: checkpoints of different sizes.
    """
    traj = list(trajectory)
    if len(traj) < 3:
        raise ConfigError(f"trajectory has {len(traj)} checkpoints: PCA needs at least 3")
    if ignore is None:
        ignore = "biasbn" if obj is not None else "none"
    check_choice("ignore", ignore, IGNORES)
    if obj is None and (ignore == "biasbn" or any(isinstance(t, Mapping) for t in traj)):
        raise ConfigError("pca_directions needs obj= to flatten state dicts or to apply ignore='biasbn'")
    rows = []
    for i, t in enumerate(traj):
        if isinstance(t, Mapping):
            v = obj.flatten({k: t[k] for k in obj.param_names if k in t})
        elif isinstance(t, torch.Tensor):
            v = t.reshape(-1)
        else:
            raise LrbsTypeError(f"trajectory[{i}] is a {type(t).__name__}: give flat tensors or state dicts")
        if obj is not None and v.numel() != obj.num_params:
            raise ShapeError(f"trajectory[{i}] has {v.numel()} entries but the model has {obj.num_params}")
        if rows and v.numel() != rows[0].size:
            raise ShapeError(f"trajectory[{i}] has {v.numel()} entries but trajectory[0] has {rows[0].size}")
        rows.append(v.detach().double().cpu().numpy())
    x = np.stack(rows)
    final = x[-1].copy()
    x = x - final
    if ignore == "biasbn":
        x[:, _one_dim_mask(obj)] = 0.0
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    ratio = var[:2] / var.sum() if var.sum() > 0 else np.zeros(2)
    comps = vt[:2]
    coords = x @ comps.T
    dtype = obj.dtype if obj is not None else torch.float32
    dirs = [
        Direction(
            torch.as_tensor(c, dtype=dtype), "pca", None, ignore, None, {"explained_variance_ratio": float(r)}
        )
        for c, r in zip(comps, ratio)
    ]
    return PCADirections(dirs[0], dirs[1], coords, np.asarray(ratio), torch.as_tensor(final, dtype=dtype))


def _one_dim_mask(obj: Objective) -> np.ndarray:
    """Boolean mask over the flat layout: True for entries of tensors with dim <= 1."""
    return np.concatenate([np.full(int(np.prod(s)), len(s) <= 1) for s in obj.param_shapes.values()])


# --------------------------------------------------------------------------- the Landscape result
@dataclass(frozen=True, eq=False)
class Landscape:
    """A 1-D or 2-D slice of the loss surface, with every setting that produced it.

    Attributes:
        alphas: ``(A,)`` coordinates along the first direction.
        betas: ``(B,)`` coordinates along the second direction, or None for a 1-D slice.
        values: ``{name: array}`` with the grid's shape ``(A,)`` or ``(A, B)``: ``loss``, ``accuracy``,
            ``test_loss``, ``test_accuracy`` and standard errors ``loss_se`` / ``test_loss_se`` when asked for.
            NaN/inf values are stored as they are.
        done: boolean mask of the computed points (NaN is a legitimate value, so it cannot mark "missing").
        settings: seed, normalization, ignore rule, bn mode, data fingerprint and size, dtype, chunk, ...
        directions: the direction vectors (float64 numpy), for resuming and refining.
        center: the centre point (float64 numpy).
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    values: dict[str, np.ndarray]
    done: np.ndarray
    settings: dict[str, Any]
    directions: tuple[np.ndarray, ...] = ()
    center: np.ndarray | None = None

    @property
    def ndim(self) -> int:
        return 1 if self.betas is None else 2

    @property
    def shape(self) -> tuple[int, ...]:
        return self.done.shape

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def loss(self) -> np.ndarray:
        return self.values["loss"]

    def metric_values(self, metric: str) -> np.ndarray:
        """``values[metric]``; ConfigError naming the metrics it holds where it has no such metric."""
        if metric not in self.values:
            raise ConfigError(f"metric={metric!r} is not allowed: the landscape holds {sorted(self.values)}")
        return self.values[metric]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (arrays as lists; NaN/inf as None)."""

        def clean(a):
            return [None if not np.isfinite(v) else float(v) for v in np.ravel(a)]

        return {
            "alphas": self.alphas.tolist(),
            "betas": None if self.betas is None else self.betas.tolist(),
            "shape": list(self.shape),
            "values": {k: clean(v) for k, v in self.values.items()},
            "done": np.ravel(self.done).astype(int).tolist(),
            "settings": self.settings,
        }

    # ---- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<path>.npz`` (arrays) and ``<path>.json`` (settings), each atomically. Returns the npz path."""
        base = _base_path(path)
        base.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"alphas": self.alphas, "done": self.done}
        if self.betas is not None:
            arrays["betas"] = self.betas
        for k, v in self.values.items():
            arrays[f"value_{k}"] = v
        for i, d in enumerate(self.directions):
            arrays[f"direction_{i}"] = d
        if self.center is not None:
            arrays["center"] = self.center
        npz = base.with_name(base.name + ".npz")
        atomic_write(npz, lambda f: np.savez(f, **arrays))
        meta = {"format": "lrbs.landscape/1", "settings": self.settings, "values": sorted(self.values)}
        atomic_write(base.with_name(base.name + ".json"), dumps(meta, indent=2))
        return npz

    @classmethod
    def load(cls, path: str | os.PathLike) -> Landscape:
        """Read a landscape written by :meth:`save` (give the base path, the ``.npz`` or the ``.json``)."""
        base = _base_path(path)
        npz, js = base.with_name(base.name + ".npz"), base.with_name(base.name + ".json")
        if not npz.is_file() or not js.is_file():
            raise ConfigError(f"path={str(path)!r}: {npz.name} and {js.name} must both exist")
        meta = json.loads(js.read_text())
        with np.load(npz) as z:
            arrays = {k: z[k] for k in z.files}
        values = {k[len("value_") :]: v for k, v in arrays.items() if k.startswith("value_")}
        dirs = tuple(arrays[f"direction_{i}"] for i in range(2) if f"direction_{i}" in arrays)
        return cls(
            arrays["alphas"],
            arrays.get("betas"),
            values,
            arrays["done"].astype(bool),
            meta["settings"],
            dirs,
            arrays.get("center"),
        )

    # ---- plots
    def plot(self, kind: str = "contour", metric: str = "loss", **kw: Any) -> Any:
        """Plot: 1-D curves (train and test), or for 2-D ``"contour"`` (log-spaced levels), ``"heatmap"``,
        ``"surface"`` (3-D); keywords go to the drawing in :mod:`lrbs.report.figures` (``ax=`` among them).
        Returns the matplotlib Axes."""
        from .report import figures

        if self.ndim == 1:
            return figures.draw_landscape_1d(self, metric=metric, **kw)
        check_choice("kind", kind, ("contour", "heatmap", "surface"))
        draw = {
            "contour": figures.draw_landscape_contour,
            "heatmap": figures.draw_landscape_heatmap,
            "surface": figures.draw_landscape_surface,
        }[kind]
        return draw(self, metric=metric, **kw)


def _base_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p


# --------------------------------------------------------------------------- evaluation engine
def _as_direction(obj: Objective, d: Any, name: str) -> Direction:
    if isinstance(d, Direction):
        vec = d.vector
    elif isinstance(d, (torch.Tensor, Mapping)):
        vec = d
        d = None
    elif isinstance(d, np.ndarray):
        vec = torch.as_tensor(d)
        d = None
    else:
        raise LrbsTypeError(
            f"{name}={type(d).__name__} is not allowed: give a Direction, a flat tensor or a dict"
        )
    if isinstance(vec, Mapping):
        vec = obj.flatten(vec)
    if vec.dim() != 1 or vec.numel() != obj.num_params:
        raise ShapeError(
            f"{name} has shape {tuple(vec.shape)} but the model has {obj.num_params} trainable parameters: "
            f"it must be ({obj.num_params},)"
        )
    vec = vec.detach().to(dtype=obj.dtype, device=obj.device)
    if not torch.isfinite(vec).all():
        raise ConfigError(f"{name} has non-finite entries (NaN or inf): a direction must be finite")
    return Direction(vec) if d is None else replace(d, vector=vec)


def _as_coords(name: str, values: Any) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise LrbsTypeError(f"{name}={values!r} is not allowed: must be a 1-D sequence of numbers") from None
    if a.ndim != 1:
        raise ShapeError(f"{name} has shape {a.shape}: must be a 1-D sequence of numbers")
    if a.size == 0:
        raise ConfigError(f"{name} is empty: give at least one value")
    if not np.isfinite(a).all():
        raise ConfigError(
            f"{name} has non-finite values ({a[~np.isfinite(a)][:3].tolist()}): all must be finite"
        )
    return a


def _bounded_chunk(obj: Objective, chunk: int | None, total: int) -> int:
    """Points per evaluation call: the request, capped so that one stacked chunk stays within the memory budget."""
    itemsize = torch.empty((), dtype=obj.dtype).element_size()
    cap = max(1, _STACK_BUDGET_BYTES // max(1, obj.num_params * itemsize))
    if chunk is None:
        chunk = 64
    chunk = check_int("chunk", chunk, low=1)
    return max(1, min(chunk, cap, total))


def _per_sample(obj: Objective, theta: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Per-sample losses, correctness (NaN where accuracy is undefined) and weights (None: one per sample) at
    ``theta`` on the objective's fixed data.

    ``(x1, ..., xk, y)`` batches take one forward pass per batch and the per-sample losses from its output
    (cross-entropy with ``reduction="none"``, or ``loss_fn`` on each row); other batches (mappings,
    ``compute_loss``) evaluate each sample as its own batch.
    """
    buffers = obj.buffers_at(theta)
    bl = obj.batch_loss
    losses, correct, weights = [], [], []
    with torch.no_grad():
        for batch in obj.batches:
            if isinstance(batch, (tuple, list)) and bl.compute_loss is None:
                lo, co = _per_sample_tuple(obj, theta, batch, buffers)
            else:
                lo, co = _per_sample_each(obj, theta, batch, buffers)
            losses.append(lo)
            correct.append(co)
            if bl.batch_weight is not None:
                n = batch_size_of(batch)
                weights.append(torch.tensor([bl.weight(slice_batch(batch, i, i + 1)) for i in range(n)]))
    w = torch.cat(weights).double().numpy() if weights else None
    return torch.cat(losses).numpy(), torch.cat(correct).numpy(), w


def _per_sample_tuple(obj: Objective, theta: torch.Tensor, batch: Any, buffers: dict) -> tuple[Any, Any]:
    out = obj.forward(theta, batch, buffers)
    y = batch[-1]
    loss_fn = obj.batch_loss.loss_fn
    if loss_fn is None:
        lo = nn.functional.cross_entropy(out, y, reduction="none")
    else:
        lo = torch.func.vmap(lambda o, t: loss_fn(o[None], t[None]))(out, y)
    if obj.has_accuracy:
        co = (out.argmax(-1) == y).double().reshape(-1).cpu()
    else:
        co = torch.full((len(y),), float("nan"), dtype=torch.float64)
    return lo.double().reshape(-1).cpu(), co


def _per_sample_each(obj: Objective, theta: torch.Tensor, batch: Any, buffers: dict) -> tuple[Any, Any]:
    lo, co = [], []
    for i in range(batch_size_of(batch)):
        one = slice_batch(batch, i, i + 1)
        ev = obj.evaluate_on(theta, one, buffers)
        lo.append(float(ev.loss))
        c = obj.batch_loss.correct(ev.output, one) if obj.has_accuracy else None
        co.append(float("nan") if c is None else float(c))
    return torch.tensor(lo, dtype=torch.float64), torch.tensor(co, dtype=torch.float64)


def _evaluate(
    obj: Objective, stack: torch.Tensor, want_acc: bool, stderr: bool, method: str | None
) -> dict[str, np.ndarray]:
    """Loss (+ accuracy, + standard error) at each row of ``stack``.

    With ``stderr`` the loss is the (weighted) mean of per-sample losses and its standard error is
    ``std(l) / sqrt(N)``; with sample weights ``w_i``, ``sqrt(N / (N - 1) sum w_i^2 (l_i - m)^2) / sum w_i``.
    """
    if not stderr:
        out = obj.loss_many(stack, accuracy=want_acc, method=method)
        return {"loss": out["loss"], "accuracy": out["accuracy"]}
    res: dict[str, list] = {"loss": [], "accuracy": [], "loss_se": []}
    n = obj.num_samples
    for theta in stack:
        lo, co, w = _per_sample(obj, theta)
        res["accuracy"].append(co.mean())
        if w is None:
            res["loss"].append(lo.mean())
            res["loss_se"].append(lo.std(ddof=1) / math.sqrt(n) if n > 1 else float("nan"))
        else:
            mean = float((w * lo).sum() / w.sum())
            res["loss"].append(mean)
            spread = math.sqrt(n / (n - 1) * float((w**2 * (lo - mean) ** 2).sum())) if n > 1 else math.nan
            res["loss_se"].append(spread / float(w.sum()))
    return {k: np.asarray(v, dtype=np.float64) for k, v in res.items()}


def _run_grid(
    obj: Objective,
    center: torch.Tensor,
    dirs: Sequence[torch.Tensor],
    land: Landscape,
    *,
    metrics: Sequence[str],
    chunk: int | None,
    path: str | os.PathLike | None,
    progress: bool,
    test_obj: Objective | None,
    stderr: bool,
    method: str | None,
) -> Landscape:
    """Fill the not-yet-done points of ``land`` (in place on its arrays), saving after every chunk if ``path``."""
    want_acc = "accuracy" in metrics
    grids = np.meshgrid(land.alphas, *(() if land.betas is None else (land.betas,)), indexing="ij")
    coefs = np.stack([g.ravel() for g in grids], axis=1)  # (P, m), row-major over (i, j)
    todo = np.flatnonzero(~land.done.ravel())
    size = _bounded_chunk(obj, chunk, max(1, len(todo)))
    land.settings["chunk"] = size
    dmat = torch.stack(list(dirs)).to(obj.dtype)  # (m, n)
    flat_done = land.done.reshape(-1)
    with _progress("landscape", len(todo), enabled=bool(progress and len(todo))) as bar:
        for s in range(0, len(todo), size):
            idx = todo[s : s + size]
            c = torch.as_tensor(coefs[idx], dtype=obj.dtype, device=obj.device)
            stack = center[None, :] + c @ dmat
            out = _evaluate(obj, stack, want_acc, stderr, method)
            if test_obj is not None:
                te = _evaluate(test_obj, stack, want_acc, stderr, method)
                out.update({f"test_{k}": v for k, v in te.items()})
            for k, v in out.items():
                if k in land.values and (want_acc or "accuracy" not in k):
                    land.values[k].reshape(-1)[idx] = v
            flat_done[idx] = True
            if path is not None:
                land.save(path)
            bar.advance(len(idx))
    if obj.loss_many_method is not None:
        land.settings["loss_many_method"] = obj.loss_many_method
    return land


def _settings(
    obj: Objective,
    dirs: Sequence[Direction],
    kind: str,
    test_obj: Objective | None,
    metrics: Sequence[str],
    stderr: bool,
) -> dict[str, Any]:
    s: dict[str, Any] = {"kind": kind, **obj.settings(), "metrics": list(metrics), "stderr": bool(stderr)}
    s["directions"] = [d.settings() for d in dirs]
    for key in ("norm", "ignore", "seed"):
        s[key] = [d.settings()[key] for d in dirs]
    s["test"] = None if test_obj is None else test_obj.settings()
    return s


def _empty(alphas, betas, names) -> tuple[dict[str, np.ndarray], np.ndarray]:
    shape = (len(alphas),) if betas is None else (len(alphas), len(betas))
    return {k: np.full(shape, np.nan) for k in names}, np.zeros(shape, dtype=bool)


def _value_names(metrics: Sequence[str], test: bool, stderr: bool) -> list[str]:
    names = list(metrics) + (["loss_se"] if stderr else [])
    return names + ([f"test_{k}" for k in names] if test else [])


def _check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    metrics = tuple(metrics) if not isinstance(metrics, str) else (metrics,)
    for m in metrics:
        check_choice("metrics", m, METRICS)
    if "loss" not in metrics:
        raise ConfigError(f"metrics={metrics!r} is not allowed: must include 'loss'")
    return metrics


def _check_test_obj(obj: Objective, test_obj: Objective | None) -> None:
    if test_obj is not None:
        if not isinstance(test_obj, Objective):
            raise LrbsTypeError(f"test_obj={type(test_obj).__name__} is not allowed: must be an Objective")
        if test_obj.param_shapes != obj.param_shapes:
            raise ShapeError(
                "test_obj has a different parameter layout than obj: build both from the same model"
            )


def landscape_1d(
    obj: Objective,
    direction: Direction | torch.Tensor,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    test_obj: Objective | None = None,
    stderr: bool = False,
    chunk: int | None = None,
    method: str | None = None,
    progress: bool = False,
) -> Landscape:
    """1-D slice ``L(theta* + alpha * delta)`` (Goodfellow et al. 2015; Li et al. 2018).

    Args:
        obj: the objective (its centre point is ``theta*``).
        direction: a :class:`Direction` or a flat ``(n,)`` tensor.
        alphas: the coordinates.
        metrics: ``("loss", "accuracy")`` or ``("loss",)``.
        test_obj: a second objective (e.g. the test set) evaluated at the same points.
        stderr: also report the standard error of each loss over the samples (``std / sqrt(N)``).
        chunk: points per evaluation call (capped by a memory budget).
        method: ``Objective.loss_many`` method (None: the objective's, by rule; see
            :meth:`Objective.loss_many`).
        progress: show a rich progress bar.

    Returns:
        A 1-D :class:`Landscape`.

    Raises:
        ShapeError: the direction does not match the model. ConfigError: empty or non-finite ``alphas``.
    """
    d = _as_direction(obj, direction, "direction")
    a = _as_coords("alphas", np.linspace(-1.0, 1.0, 51) if alphas is None else alphas)
    metrics = _check_metrics(metrics)
    _check_test_obj(obj, test_obj)
    values, done = _empty(a, None, _value_names(metrics, test_obj is not None, stderr))
    center = obj.theta()
    land = Landscape(
        a,
        None,
        values,
        done,
        _settings(obj, [d], "1d", test_obj, metrics, stderr),
        (d.vector.double().cpu().numpy(),),
        center.double().cpu().numpy(),
    )
    return _run_grid(
        obj,
        center,
        [d.vector],
        land,
        metrics=metrics,
        chunk=chunk,
        path=None,
        progress=progress,
        test_obj=test_obj,
        stderr=stderr,
        method=method,
    )


def landscape_2d(
    obj: Objective,
    d1: Direction | torch.Tensor,
    d2: Direction | torch.Tensor,
    alphas: Sequence[float] | np.ndarray | None = None,
    betas: Sequence[float] | np.ndarray | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    chunk: int | None = None,
    path: str | os.PathLike | None = None,
    progress: bool = False,
    test_obj: Objective | None = None,
    stderr: bool = False,
    method: str | None = None,
) -> Landscape:
    """2-D slice ``L(theta* + alpha * delta + beta * eta)`` on the grid ``alphas x betas`` (Li et al. 2018).

    The result's arrays have shape ``(len(alphas), len(betas))`` with ``[i, j]`` at ``(alphas[i], betas[j])``.
    Points are evaluated ``chunk`` at a time through :meth:`Objective.loss_many`; with ``path`` the grid is saved
    after every chunk and a partially computed grid found there is resumed (its ``done`` mask says which points
    exist; NaN values are legitimate results, never "missing").

    Args:
        obj: the objective (its centre point is ``theta*``; bn mode, dtype and data subset are its own).
        d1, d2: :class:`Direction` objects or flat ``(n,)`` tensors.
        alphas, betas: grid coordinates (``betas`` defaults to ``alphas``).
        metrics: ``("loss", "accuracy")`` or ``("loss",)`` (skipping accuracy saves work).
        chunk: points per call; capped so that a stacked chunk stays within 256 MiB.
        path: resume/save file (``<path>.npz`` + ``<path>.json``).
        progress: show a rich progress bar.
        test_obj: a second objective evaluated at the same points (``test_`` values).
        stderr: per-sample evaluation with the standard error of each loss (``loss_se``).
        method: ``Objective.loss_many`` method (None: the objective's, by rule; see
            :meth:`Objective.loss_many`).

    Returns:
        A 2-D :class:`Landscape`.

    Raises:
        ShapeError: a direction does not match the model. ConfigError: empty or non-finite coordinates, or a
        resume file from different settings.
    """
    v1 = _as_direction(obj, d1, "d1")
    v2 = _as_direction(obj, d2, "d2")
    a = _as_coords("alphas", np.linspace(-1.0, 1.0, 21) if alphas is None else alphas)
    b = a.copy() if betas is None else _as_coords("betas", betas)
    metrics = _check_metrics(metrics)
    _check_test_obj(obj, test_obj)
    center = obj.theta()
    settings = _settings(obj, [v1, v2], "2d", test_obj, metrics, stderr)
    names = _value_names(metrics, test_obj is not None, stderr)
    land = None
    if path is not None and _base_path(path).with_name(_base_path(path).name + ".npz").is_file():
        land = Landscape.load(path)
        _check_resume(land, a, b, settings, names, [v1.vector, v2.vector], path)
        land.settings.update({k: v for k, v in settings.items() if k not in land.settings})
    if land is None:
        values, done = _empty(a, b, names)
        land = Landscape(
            a,
            b,
            values,
            done,
            settings,
            (v1.vector.double().cpu().numpy(), v2.vector.double().cpu().numpy()),
            center.double().cpu().numpy(),
        )
    return _run_grid(
        obj,
        center,
        [v1.vector, v2.vector],
        land,
        metrics=metrics,
        chunk=chunk,
        path=path,
        progress=progress,
        test_obj=test_obj,
        stderr=stderr,
        method=method,
    )


def _check_resume(land: Landscape, a, b, settings, names, dirs, path) -> None:
    def bad(what: str) -> ConfigError:
        return ConfigError(
            f"path={str(path)!r} holds a landscape with a different {what}: delete it or choose another path"
        )

    if land.betas is None or land.alphas.shape != a.shape or not np.array_equal(land.alphas, a):
        raise bad("alphas grid")
    if land.betas.shape != b.shape or not np.array_equal(land.betas, b):
        raise bad("betas grid")
    for key in ("data_fingerprint", "num_params", "bn", "dtype", "num_samples"):
        if land.settings.get(key) != settings.get(key):
            raise bad(f"{key} ({land.settings.get(key)!r} vs {settings.get(key)!r})")
    if sorted(land.values) != sorted(names):
        raise bad(f"set of values ({sorted(land.values)} vs {sorted(names)})")
    for i, d in enumerate(dirs):
        if len(land.directions) <= i or not np.allclose(
            land.directions[i], d.double().cpu().numpy(), rtol=0, atol=1e-6
        ):
            raise bad(f"direction d{i + 1}")


# --------------------------------------------------------------------------- interpolation
def params_of(model: nn.Module, obj: Objective, name: str = "model") -> torch.Tensor:
    """The flat parameter vector of ``model`` in ``obj``'s layout.

    Raises:
        ShapeError: the model's parameters differ from the objective's (names the first differing parameter and
        both shapes).
    """
    if not isinstance(model, nn.Module):
        raise LrbsTypeError(f"{name}={type(model).__name__} is not allowed: must be a torch.nn.Module")
    own = dict(model.named_parameters())
    for k, shape in obj.param_shapes.items():
        if k not in own:
            raise ShapeError(
                f"{name} has no parameter {k!r} (shape {tuple(shape)}): the architectures differ"
            )
        if own[k].shape != shape:
            raise ShapeError(
                f"{name} parameter {k!r} has shape {tuple(own[k].shape)} but the other model has {tuple(shape)}: "
                "the architectures differ"
            )
    extra = [k for k in own if k not in obj.param_shapes and own[k].requires_grad]
    if extra:
        raise ShapeError(
            f"{name} has a parameter {extra[0]!r} that the other model lacks: the architectures differ"
        )
    return obj.flatten({k: own[k].detach() for k in obj.param_names}).to(obj.dtype).clone()


def check_same_architecture(model_a: nn.Module, model_b: nn.Module) -> None:
    """Raise ShapeError naming the first parameter whose name or shape differs between two models."""
    for m, name in ((model_a, "model_a"), (model_b, "model_b")):
        if not isinstance(m, nn.Module):
            raise LrbsTypeError(f"{name}={type(m).__name__} is not allowed: must be a torch.nn.Module")
    pa, pb = list(model_a.named_parameters()), list(model_b.named_parameters())
    for i in range(max(len(pa), len(pb))):
        if i >= len(pa) or i >= len(pb):
            k = pb[i][0] if i >= len(pa) else pa[i][0]
            raise ShapeError(f"model_a and model_b differ: parameter {k!r} exists in only one of them")
        (ka, a), (kb, b) = pa[i], pb[i]
        if ka != kb or a.shape != b.shape:
            raise ShapeError(
                f"model_a and model_b differ at parameter {i}: model_a has {ka!r} with shape {tuple(a.shape)}, "
                f"model_b has {kb!r} with shape {tuple(b.shape)}"
            )


def _bn_buffers_differ(model_a: nn.Module, model_b: nn.Module) -> bool:
    ba, bb = dict(model_a.named_buffers()), dict(model_b.named_buffers())
    return any(k in bb and ("running" in k) and not torch.equal(v, bb[k]) for k, v in ba.items())


def interpolate(
    model_a: nn.Module,
    model_b: nn.Module,
    obj: Objective,
    alphas: Sequence[float] | np.ndarray | None = None,
    *,
    test_obj: Objective | None = None,
    metrics: Sequence[str] = METRICS,
) -> Landscape:
    """Keskar et al.'s parametric plot: ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b``.

    Train (``obj``) and test (``test_obj``) loss and accuracy along the line, including the extrapolated parts
    (default ``alpha`` in ``[-1, 2]``, 25 points, as in Keskar et al.'s script). The bn mode is ``obj``'s and is
    recorded: with ``bn="recompute"`` BatchNorm statistics are recomputed at each point (Garipov et al.'s
    ``update_bn``); Keskar's own script evaluates in train mode (``bn="train"``); ``bn="eval"`` keeps ``obj``'s
    frozen statistics (a warning is issued when the two models' statistics differ).

    Returns:
        A 1-D :class:`Landscape` with ``settings["kind"] == "interpolation"``.

    Raises:
        ShapeError: the models have different architectures (names the first differing parameter and both shapes).
        ConfigError: empty or non-finite ``alphas``.
    """
    check_same_architecture(model_a, model_b)
    ta = params_of(model_a, obj, "model_a")
    tb = params_of(model_b, obj, "model_b")
    if obj.bn == "eval" and obj.has_bn and _bn_buffers_differ(model_a, model_b):
        import warnings

        warnings.warn(
            "model_a and model_b have different BatchNorm statistics but bn='eval' keeps the objective's frozen "
            "ones: use an Objective with bn='recompute' for paths between models",
            stacklevel=2,
        )
    d = Direction(tb - ta, "interpolation")
    alphas = np.linspace(-1.0, 2.0, 25) if alphas is None else alphas
    land = landscape_1d(
        obj.at(ta), d, alphas, test_obj=None if test_obj is None else test_obj.at(ta), metrics=metrics
    )
    land.settings["kind"] = "interpolation"
    return land


# --------------------------------------------------------------------------- refinement
def refine(
    landscape: Landscape,
    obj: Objective,
    *,
    k: int = 4,
    metric: str = "loss",
    test_obj: Objective | None = None,
) -> Landscape:
    """Adaptive refinement: add grid lines where neighbouring values differ most.

    For each axis, the ``k`` intervals ``[c_i, c_{i+1}]`` with the largest ``max |f(c_{i+1}) - f(c_i)|`` (taken over
    the other axis) get their midpoint added; only the new points are evaluated (the grid stays rectangular and
    the old values are reused).

    Args:
        landscape: a complete 1-D or 2-D landscape made by this module (it carries its directions).
        obj: the objective it was computed on (same data fingerprint and centre).
        k: intervals refined per axis.
        metric: the value that drives the refinement.
        test_obj: needed when the landscape has test values.

    Returns:
        A new, larger :class:`Landscape`.

    Raises:
        ConfigError: incomplete landscape, other data, missing directions, or a metric it does not hold.
    """
    k = check_int("k", k, low=1)
    f = _check_refinable(landscape, obj, metric, test_obj)
    axes = [landscape.alphas] + ([] if landscape.betas is None else [landscape.betas])
    new_axes = [_refined_axis(f, i, coords, k) for i, coords in enumerate(axes)]
    land = _regrid(landscape, axes, new_axes)
    center = torch.as_tensor(landscape.center, dtype=obj.dtype, device=obj.device)
    dirs = [torch.as_tensor(d, dtype=obj.dtype, device=obj.device) for d in landscape.directions]
    names = list(landscape.values)
    metrics = tuple(m for m in METRICS if m in names)
    return _run_grid(
        obj.at(center),
        center,
        dirs,
        land,
        metrics=metrics,
        chunk=None,
        path=None,
        progress=False,
        test_obj=None if test_obj is None else test_obj.at(center),
        stderr="loss_se" in names,
        method=None,
    )


def _check_refinable(
    landscape: Landscape, obj: Objective, metric: str, test_obj: Objective | None
) -> np.ndarray:
    """The values of ``metric`` once ``landscape`` is known to be refinable on ``obj`` (ConfigError if not)."""
    f = landscape.metric_values(metric)
    if not landscape.complete:
        raise ConfigError("landscape is not complete: finish it (resume from its path) before refining")
    if landscape.settings.get("data_fingerprint") != obj.fingerprint:
        raise ConfigError("obj has other data than the landscape (data fingerprints differ)")
    if len(landscape.directions) != landscape.ndim or landscape.center is None:
        raise ConfigError("landscape carries no directions: it cannot be refined")
    if any(k.startswith("test_") for k in landscape.values) and test_obj is None:
        raise ConfigError("the landscape has test values: give test_obj=")
    return f


def _refined_axis(f: np.ndarray, ax_i: int, coords: np.ndarray, k: int) -> np.ndarray:
    """Axis ``ax_i`` with the midpoints of its ``k`` intervals of largest ``max |f(c_{i+1}) - f(c_i)|`` added."""
    if len(coords) < 2:
        return coords
    diff = np.abs(np.diff(f, axis=ax_i))
    diff = np.where(np.isfinite(diff), diff, np.inf)
    score = diff if diff.ndim == 1 else diff.max(axis=1 - ax_i)
    pick = np.argsort(-score, kind="stable")[: min(k, len(score))]
    mids = 0.5 * (coords[pick] + coords[pick + 1])
    return np.unique(np.concatenate([coords, mids]))


def _regrid(landscape: Landscape, axes: list[np.ndarray], new_axes: list[np.ndarray]) -> Landscape:
    """The landscape on the finer grid ``new_axes``: its old points copied in (done), the new ones to do."""
    names = list(landscape.values)
    betas = new_axes[1] if len(new_axes) > 1 else None
    values, done = _empty(new_axes[0], betas, names)
    sel = np.ix_(*[np.searchsorted(n, o) for n, o in zip(new_axes, axes)])
    for nm in names:
        values[nm][sel] = landscape.values[nm]
    done[sel] = True
    settings = dict(landscape.settings)
    settings["refined"] = int(settings.get("refined", 0)) + 1
    return Landscape(new_axes[0], betas, values, done, settings, landscape.directions, landscape.center)


# --------------------------------------------------------------------------- non-convexity
@dataclass(frozen=True)
class NonConvexity:
    """Local non-convexity of a 2-D surface (finite-difference 2x2 Hessians of the plotted surface).

    Attributes:
        fraction_negative: fraction of the region's points whose 2x2 Hessian has a negative eigenvalue.
        mean_ratio: mean of ``|lambda_min / lambda_max|`` over the region (Li et al.'s map; 0 = convex).
        num_points: points in the region.
        max_rise: the region is the connected set of interior points around the centre with
            ``L <= L(centre) + max_rise``.
        ratio_map: ``(A, B)`` map of ``|lambda_min / lambda_max|`` (NaN outside the region).
    """

    fraction_negative: float
    mean_ratio: float
    num_points: int
    max_rise: float
    ratio_map: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        """The four numbers (the map is left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "ratio_map"}


def _hessian_2x2_eigenvalues(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(lambda_min, lambda_max)`` of the central finite-difference 2x2 Hessian at each interior point of ``f`` on
    the (possibly non-uniform) grid ``a x b`` (formulas in :func:`nonconvexity`)."""
    ha, hb = np.diff(a), np.diff(b)
    f0 = f[1:-1, 1:-1]
    hap, ham = ha[1:][:, None], ha[:-1][:, None]
    hbp, hbm = hb[1:][None, :], hb[:-1][None, :]
    faa = 2 * ((f[2:, 1:-1] - f0) / hap - (f0 - f[:-2, 1:-1]) / ham) / (hap + ham)
    fbb = 2 * ((f[1:-1, 2:] - f0) / hbp - (f0 - f[1:-1, :-2]) / hbm) / (hbp + hbm)
    fab = (f[2:, 2:] - f[2:, :-2] - f[:-2, 2:] + f[:-2, :-2]) / ((hap + ham) * (hbp + hbm))
    mean, dev = 0.5 * (faa + fbb), np.sqrt((0.5 * (faa - fbb)) ** 2 + fab**2)
    return mean - dev, mean + dev


def _component(allowed: np.ndarray, ci: int, cj: int) -> np.ndarray:
    """The 4-connected component of ``allowed`` containing ``(ci, cj)`` (empty where that point is not allowed)."""
    region = np.zeros_like(allowed)
    if not allowed[ci, cj]:
        return region
    stack = [(ci, cj)]
    region[ci, cj] = True
    while stack:
        i, j = stack.pop()
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            u, v = i + di, j + dj
            if 0 <= u < allowed.shape[0] and 0 <= v < allowed.shape[1] and allowed[u, v] and not region[u, v]:
                region[u, v] = True
                stack.append((u, v))
    return region


def nonconvexity(landscape: Landscape, *, metric: str = "loss", max_rise: float | None = 1.0) -> NonConvexity:
    """How non-convex a 2-D surface is, as numbers (Li et al. 2018, Section 6's eigenvalue map).

    At each interior grid point the 2x2 Hessian of the surface ``f(alpha, beta)`` is estimated by central finite
    differences (non-uniform spacing allowed):
    ``f_aa = 2[(f_+ - f_0)/h_+ - (f_0 - f_-)/h_-] / (h_+ + h_-)``, likewise ``f_bb``, and
    ``f_ab = (f_{++} - f_{+-} - f_{-+} + f_{--}) / ((h^a_+ + h^a_-)(h^b_+ + h^b_-))``.
    Its eigenvalues ``lambda_min <= lambda_max`` give the two measures, taken over a *low-loss region around the
    centre*: the 4-connected set of interior points containing the grid point nearest ``(0, 0)`` whose value is at
    most ``f(centre) + max_rise`` (``max_rise=None``: all interior points with finite values). Far from the
    minimum every surface is dominated by its walls, so restricting the region compares like with like.

    Returns:
        :class:`NonConvexity` (``fraction_negative``, ``mean_ratio`` of ``|lambda_min / lambda_max|``).

    Raises:
        ConfigError: a 1-D landscape, a grid smaller than 3x3, an unknown metric or an incomplete grid.
    """
    if landscape.ndim != 2:
        raise ConfigError("nonconvexity needs a 2-D landscape (landscape_2d); got a 1-D one")
    f = np.asarray(landscape.metric_values(metric), dtype=np.float64)
    if not landscape.complete:
        raise ConfigError("landscape is not complete: finish it before measuring non-convexity")
    if max_rise is not None:
        max_rise = check_number("max_rise", max_rise, low=0.0)
    a, b = landscape.alphas, landscape.betas
    A, B = f.shape
    if A < 3 or B < 3:
        raise ConfigError(f"the grid is {A}x{B}: nonconvexity needs at least 3x3")
    lmin, lmax = _hessian_2x2_eigenvalues(f, a, b)
    # Li's map: |lambda_min / lambda_max|, counted where lambda_min < 0 (0 where the surface is locally convex)
    ratio = np.where(lmin < 0, np.abs(lmin) / np.maximum(np.abs(lmax), 1e-300), 0.0)
    ratio = np.minimum(ratio, 1.0)
    ok = np.isfinite(lmin) & np.isfinite(lmax)
    # region: connected component around the centre
    ci = int(np.argmin(np.abs(a))) - 1
    cj = int(np.argmin(np.abs(b))) - 1
    ci, cj = min(max(ci, 0), A - 3), min(max(cj, 0), B - 3)
    allowed = ok if max_rise is None else ok & (f[1:-1, 1:-1] <= f[ci + 1, cj + 1] + max_rise)
    region = _component(allowed, ci, cj)
    npts = int(region.sum())
    full = np.full(f.shape, np.nan)
    full[1:-1, 1:-1] = np.where(region, ratio, np.nan)
    frac = float((lmin[region] < 0).mean()) if npts else float("nan")
    mr = float(ratio[region].mean()) if npts else float("nan")
    return NonConvexity(frac, mr, npts, float("nan") if max_rise is None else max_rise, full)
