"""Gradient noise scale and critical batch size (McCandlish et al. 2018).

The *simple noise scale* ``B_simple = tr(Σ) / |G|²`` compares the noise of a one-sample gradient (``Σ``, the
per-example gradient covariance) with the signal (``G``, the full-batch gradient). McCandlish et al. predict that
the batch size beyond which more data per step buys little (the critical batch) is of the order of ``B_simple``.

Three tools:

- :func:`noise_scale` measures ``B_simple`` at fixed weights with the unbiased two-batch-size estimator of
  Appendix A, a bootstrap confidence interval, and nothing mutated;
- :class:`NoiseScaleTracker` is a :func:`~lrbs.train.fit` callback that follows it during training from
  micro-batches of the current batch (separate EMAs of ``|G|²`` and ``tr Σ``, then their ratio);
- :func:`critical_batch` fits the steps / examples trade-off ``(S/S_min - 1)(E/E_min - 1) = 1`` to a batch-size
  sweep, giving ``B_crit = E_min / S_min`` to compare with ``B_simple``; :func:`steps_to_target` reads ``S`` off a
  run.

Both measurements read batches through the batch protocol (:mod:`lrbs.batches`): any data kind (tensors, a
map-style or iterable ``Dataset``, a ``DataLoader`` with any collate function, a list of batches), tuple batches
``(x1, ..., xk, y)``, mappings for ``model(**batch)`` (HF models), ``loss_fn=``, ``compute_loss=`` and
``batch_weight=``; sub-batches are drawn one big batch at a time, never by concatenating the dataset.

**Finite population** (:func:`noise_scale`). Both estimates are unbiased for samples drawn with replacement.
Sampling without replacement from ``N`` samples gives ``E|G_B|² = |G|² + c(B) tr Σ`` with
``c(B) = (N - B) / (B (N - 1))`` instead of ``1/B`` (``Σ`` the covariance of the ``N`` per-example gradients);
``finite_population=True`` solves with this ``c(B)`` (:func:`two_batch_estimate`), which is exactly unbiased for
the dataset and equals McCandlish et al.'s formula as ``N → ∞``.

**Data** (:func:`noise_scale`). Anything :func:`lrbs.batches.as_source` takes. Tensors and map-style datasets
are sampled by index (``numpy.random.default_rng(seed).choice``; only the drawn samples are read, the dataset is
never concatenated). A ``DataLoader``, an ``IterableDataset`` (batched by ``B_b``) or a list of batches is read in
its own order — shuffle it, the estimator assumes random batches — under an RNG seeded by ``seed`` (the
loader's generator is restored afterwards); each loader batch is cut into sub-batches of ``B_s`` (remainder
dropped), so ``B_s`` must not exceed the loader's batch size. ``N`` for the correction is the sampler's length;
for an unsized loader it is unknown and ``c(B) = 1/B`` is used (``finite_population`` is then False in the
result). With ``batch_weight``, ``G_b = Σ_i w_i g_i / Σ_i w_i`` over the sub-batches (the gradient of the big
batch's weighted mean loss, e.g. per label token); ``B_s`` and ``B_b`` stay sample counts.

**Precision.** ``"bf16-mixed"`` / ``"16-mixed"`` run the forward pass under autocast; the gradients are
taken with respect to the float32 parameters and their norms accumulated in float64. ``"16-mixed"`` (CUDA
only) scales the loss by ``2^16`` and the gradients back, lowering the scale while they overflow (as a
GradScaler does), so that small float16 gradients do not underflow.

Gradients are computed functionally on a private copy (an :class:`~lrbs.objective.Objective`, through its
public :meth:`~lrbs.objective.Objective.loss_on`); the model is never modified. BatchNorm follows the
Objective's ``bn`` mode (default ``"eval"``: frozen running statistics, so every sample's gradient is
independent of the others in its batch).

Example (:func:`noise_scale`):
    >>> from lrbs.data import load_dataset
    >>> from lrbs.models import build_model
    >>> from lrbs.noise_scale import noise_scale
    >>> ds = load_dataset("blobs", n_train=256, n_test=16, num_features=4, num_classes=3, seed=0)
    >>> res = noise_scale(build_model("mlp", dataset=ds, depth=2, width=8), ds, small_batch=8, big_batch=64)
    >>> res.ci_low <= res.b_simple <= res.ci_high
    True

References:
    McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162).
    Merrill et al., "Critical Batch Size Revisited", 2025 (arXiv 2505.23971).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ._util import jsonable
from .batches import (
    BatchLoss,
    BatchStream,
    LoaderSource,
    Source,
    TensorSource,
    as_source,
    batch_size_of,
    cast_floating,
    index_batch,
    model_device,
    slice_batch,
    to_device,
)
from .errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number
from .objective import Objective
from .step import autocast, check_precision
from .train import Callback, TrainState

__all__ = [
    "NoiseScale",
    "noise_scale",
    "two_batch_estimate",
    "sampling_coefficient",
    "b_simple_ratio",
    "bootstrap_ratio",
    "NoiseScaleTracker",
    "TrackerPoint",
    "CriticalBatch",
    "critical_batch",
    "steps_to_target",
]

_METHODS = ("vmap", "loop")
_VMAP_FLOATS = 2**24  # gradient entries held at once by the vmap path (bounds its memory)
_FP16_SCALE = (
    2.0**16
)  # initial loss scale of "16-mixed" gradients (GradScaler's default), backed off on overflow

LossAt = Callable[[dict[str, torch.Tensor], Any], torch.Tensor]


# --------------------------------------------------------------------------------------------- micro-batch gradients
class _Unstackable(Exception):
    """Sub-batches whose structures or shapes differ, so they cannot be stacked for vmap."""


def _stack(batches: list[Any], op: Callable[[list[torch.Tensor]], torch.Tensor] = torch.stack) -> Any:
    """Batches of one structure combined leaf by leaf: stacked along a new leading dimension (the vmap axis), or
    concatenated along the existing one (``op=torch.cat``)."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(b, torch.Tensor) or b.shape != first.shape for b in batches):
            raise _Unstackable
        return op(batches)
    if isinstance(first, Mapping):
        if any(not isinstance(b, Mapping) or list(b.keys()) != list(first.keys()) for b in batches):
            raise _Unstackable
        return {key: _stack([b[key] for b in batches], op) for key in first}
    if isinstance(first, (tuple, list)):
        if any(not isinstance(b, (tuple, list)) or len(b) != len(first) for b in batches):
            raise _Unstackable
        return tuple(_stack([b[i] for b in batches], op) for i in range(len(first)))
    raise _Unstackable


class _Whole:
    """One draw read in one gather: a big batch of tensors (a tuple or dict of equally long tensors) that is cut into
    ``k`` consecutive sub-batches — views for the loop, one reshape to ``(k, B_s, ...)`` per tensor for vmap."""

    def __init__(self, batch: tuple | dict, k: int):
        self.batch, self.k = batch, k

    def subs(self) -> list[Any]:
        b = batch_size_of(self.batch) // self.k
        return [slice_batch(self.batch, i * b, (i + 1) * b) for i in range(self.k)]

    def stacked(self) -> Any:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(self.k, -1, *t.shape[1:])

        if isinstance(self.batch, Mapping):
            return {key: split(t) for key, t in self.batch.items()}
        return tuple(split(t) for t in self.batch)


Draw = list[Any] | _Whole


def _flat_tensors(batch: Any) -> bool:
    """Whether a batch is a flat tuple/list or dict of tensors with a leading (sample) dimension."""
    if not isinstance(batch, (tuple, list, Mapping)):
        return False
    parts = list(batch.values()) if isinstance(batch, Mapping) else list(batch)
    return bool(parts) and all(isinstance(t, torch.Tensor) and t.dim() > 0 for t in parts)


def _subs(draw: Draw) -> list[Any]:
    return draw.subs() if isinstance(draw, _Whole) else draw


class _Scale:
    """The loss scale of ``16-mixed`` gradients: ``2^16`` at first, divided by ``2^8`` while they overflow.

    Float16 backward passes underflow on small gradients; scaling the loss by ``s`` and the gradients by ``1/s``
    (as a GradScaler does for training) keeps them. ``"32"`` and ``"bf16-mixed"`` use ``s = 1`` (no scaling).
    """

    def __init__(self, precision: str):
        self.value = _FP16_SCALE if precision == "16-mixed" else 1.0

    def run(self, grads: Callable[[float], torch.Tensor]) -> torch.Tensor:
        """``grads(s)`` (gradients of ``s * loss``, float64) divided by ``s``, backing off while non-finite."""
        while True:
            flat = grads(self.value)
            if self.value == 1.0:
                return flat
            if torch.isfinite(flat).all():
                return flat / self.value
            self.value = max(1.0, self.value / 2.0**8)


def _scaled(loss_at: LossAt, scale: float) -> LossAt:
    if scale == 1.0:
        return loss_at
    return lambda p, batch: loss_at(p, batch).float() * scale


def _vmap_flat(loss_at: LossAt, params: dict, rows: list[Draw], k: int, scale: _Scale) -> torch.Tensor:
    """Gradients of every sub-batch of ``rows`` (``e`` draws of ``k``) in one vectorised call: ``(e, k, P)``."""
    e = len(rows)
    parts = [r.stacked() if isinstance(r, _Whole) else _stack(r) for r in rows]
    stacked = parts[0] if e == 1 else _stack(parts, torch.cat)

    def grads(s: float) -> torch.Tensor:
        g = torch.func.vmap(torch.func.grad(_scaled(loss_at, s)), in_dims=(None, 0))(params, stacked)
        return torch.cat([v.reshape(e, k, -1) for v in g.values()], dim=2).double()

    return scale.run(grads)


def _loop_row(
    loss_at: LossAt, params: dict, row: list[Any], weights: np.ndarray | None, scale: _Scale
) -> tuple[np.ndarray, float]:
    """``|g_i|²`` of each sub-batch of one draw and ``|Σ w_i g_i / Σ w_i|²`` (plain mean without weights)."""
    names = list(params)
    numel = sum(p.numel() for p in params.values())
    small = np.empty(len(row))
    total = torch.zeros(numel, dtype=torch.float64, device=next(iter(params.values())).device)
    for i, batch in enumerate(row):

        def grads(s: float, batch=batch) -> torch.Tensor:
            leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                loss = _scaled(loss_at, s)(leaves, batch)
                gs = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            return torch.cat(
                [(torch.zeros_like(leaves[n]) if g is None else g).reshape(-1) for n, g in zip(names, gs)]
            ).double()

        flat = scale.run(grads)
        small[i] = float((flat**2).sum())
        total += flat if weights is None else float(weights[i]) * flat
    big = total / len(row) if weights is None else total / float(weights.sum())
    return small, float((big**2).sum())


def _micro_sq_norms(
    loss_at: LossAt,
    params: dict[str, torch.Tensor],
    draw: Callable[[int], Draw],
    e_count: int,
    k: int,
    method: str | None,
    *,
    weigh: Callable[[Any], float] | None = None,
    precision: str = "32",
) -> tuple[np.ndarray, np.ndarray, str]:
    """Squared norms of sub-batch gradients and of their (weighted) means per draw, all at the same ``params``.

    ``draw(e)`` gives the ``k`` sub-batches of draw ``e`` (a list, or a :class:`_Whole` big batch; called once per
    draw, in order); ``loss_at(params,
    batch)`` is the mean loss of one sub-batch. Returns ``(|g_ei|² of shape (E, k), |ḡ_e|² of shape (E,),
    method)`` with ``ḡ_e = Σ_i w_i g_ei / Σ_i w_i`` (``w_i = weigh(sub-batch)``; the plain mean without
    ``weigh``); norms are accumulated in float64. The vmap path handles several draws per call (bounded memory)
    and falls back to the loop (``method=None``) on a model or batch it cannot vectorise.
    """
    params = {n: p.detach() for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    small, big = np.empty((e_count, k)), np.empty(e_count)
    used = "loop" if method == "loop" else "vmap"
    scale = _Scale(precision)
    s = 0
    while s < e_count:
        per_call = max(1, _VMAP_FLOATS // max(1, k * numel)) if used == "vmap" else 1
        rows = [draw(s + j) for j in range(min(per_call, e_count - s))]
        w = (
            None
            if weigh is None
            else np.array([[weigh(b) for b in _subs(r)] for r in rows], dtype=np.float64)
        )
        if used == "vmap":
            try:
                flat = _vmap_flat(loss_at, params, rows, k, scale)
            except (RuntimeError, NotImplementedError, _Unstackable) as e:
                if method == "vmap":
                    if isinstance(e, _Unstackable):
                        raise ConfigError(
                            "method='vmap' is not allowed with these batches: their sub-batches differ in "
                            "structure or shape (e.g. padded to different lengths); use method='loop' or None"
                        ) from None
                    raise
                used = "loop"
        if used == "vmap":
            small[s : s + len(rows)] = (flat**2).sum(2).cpu().numpy()
            mean = flat.mean(1) if w is None else _weighted_mean(flat, w)
            big[s : s + len(rows)] = (mean**2).sum(1).cpu().numpy()
        else:
            for j, row in enumerate(rows):
                small[s + j], big[s + j] = _loop_row(
                    loss_at, params, _subs(row), None if w is None else w[j], scale
                )
        s += len(rows)
    return small, big, used


def _weighted_mean(flat: torch.Tensor, w: np.ndarray) -> torch.Tensor:
    wt = torch.as_tensor(w, dtype=torch.float64, device=flat.device)
    return (flat * wt[..., None]).sum(1) / wt.sum(1)[:, None]


def two_batch_estimate(small_sq: Any, big_sq: Any, c_small: Any, c_big: Any) -> tuple[Any, Any]:
    r"""The two-batch-size estimator: solve ``E|G_B|² = |G|² + c(B) tr Σ`` at two batch sizes for ``(|G|², tr Σ)``.

    .. math::

        \operatorname{tr}\Sigma \approx \frac{|G_s|^2 - |G_b|^2}{c(B_s) - c(B_b)}, \qquad
        |G|^2 \approx |G_b|^2 - c(B_b) \operatorname{tr}\Sigma

    with ``c(B) = 1/B`` for samples drawn with replacement (McCandlish et al. 2018, App. A: then
    ``|G|² = (B_b|G_b|² - B_s|G_s|²) / (B_b - B_s)``) or ``c(B) = (N - B) / (B (N - 1))`` without replacement
    from ``N`` samples (:func:`sampling_coefficient`). ``|G_s|²`` is the mean over the small batches; both
    gradients must be taken at the same weights. Works elementwise on floats or NumPy arrays; no checks
    (``c_small != c_big`` is the caller's).

    Returns:
        ``(grad_sq, trace_sigma)``.
    """
    trace = (small_sq - big_sq) / (c_small - c_big)
    return big_sq - c_big * trace, trace


def sampling_coefficient(batch: int, n: int | None = None) -> float:
    """``c(B)`` of :func:`two_batch_estimate`: ``(n - B) / (B (n - 1))`` for a batch drawn without replacement from
    ``n > 1`` samples, ``1 / B`` when ``n`` is None (with replacement, or an unknown population)."""
    return 1.0 / batch if n is None else (n - batch) / (batch * (n - 1))


def b_simple_ratio(trace_sigma: float, grad_sq: float) -> float:
    """``B_simple = tr Σ / |G|²``, ``inf`` when ``|G|² <= 0`` (the signal is below the noise floor)."""
    return trace_sigma / grad_sq if grad_sq > 0 else math.inf


# --------------------------------------------------------------------------------------------- noise_scale
_INF_FIELDS = ("b_simple", "ci_low", "ci_high")  # to_dict writes None for their infinities
_ESTIMATE_FIELDS = ("grad_sq_estimates", "trace_sigma_estimates", "small_sq_estimates", "big_sq_estimates")


@dataclass(frozen=True, eq=False)
class NoiseScale:
    """The simple gradient noise scale at fixed weights.

    Attributes:
        b_simple: ``mean(tr Σ estimates) / mean(|G|² estimates)`` (``inf`` if the mean ``|G|²`` is <= 0: the
            signal is below the noise floor).
        grad_sq: mean of the unbiased estimates of ``|G|²``.
        trace_sigma: mean of the unbiased estimates of ``tr Σ``.
        ci_low, ci_high: percentile-bootstrap interval of ``b_simple`` at level ``confidence``.
        confidence: the level of that interval.
        num_estimates: number of big batches drawn.
        small_batch, big_batch: ``B_s`` and ``B_b``.
        grad_sq_estimates, trace_sigma_estimates: one estimate per big batch.
        small_sq_estimates: per big batch, the mean of ``|G_s|²`` over its ``B_b / B_s`` disjoint sub-batches.
        big_sq_estimates: per big batch, ``|G_b|²``.
        finite_population: whether the finite-data correction was applied (see :func:`noise_scale`).
        num_bootstrap, seed: as given.
        method: how the sub-batch gradients were computed (``"vmap"`` or ``"loop"``).
        settings: the Objective's settings (bn, dtype, num_samples, data fingerprint, ...).
    """

    # the first seven fields are lrbs.integrations.measure.NoiseSummary's too, on purpose: the same quantities
    # under one name each (duplicates pairs the two field lists; they are data, not logic to share)
    b_simple: float
    grad_sq: float
    trace_sigma: float
    ci_low: float
    ci_high: float
    confidence: float
    num_estimates: int
    small_batch: int
    big_batch: int
    grad_sq_estimates: np.ndarray
    trace_sigma_estimates: np.ndarray
    small_sq_estimates: np.ndarray
    big_sq_estimates: np.ndarray
    finite_population: bool
    num_bootstrap: int
    seed: int
    method: str
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (non-finite numbers become ``None``)."""
        out: dict[str, Any] = {
            "b_simple": jsonable(float(self.b_simple)),
            "grad_sq": self.grad_sq,
            "trace_sigma": self.trace_sigma,
            "ci_low": jsonable(float(self.ci_low)),
            "ci_high": jsonable(float(self.ci_high)),
            "confidence": self.confidence,
            "num_estimates": self.num_estimates,
            "small_batch": self.small_batch,
            "big_batch": self.big_batch,
            "finite_population": self.finite_population,
            "num_bootstrap": self.num_bootstrap,
            "seed": self.seed,
            "method": self.method,
            "settings": dict(self.settings),
        }
        for name in _ESTIMATE_FIELDS:
            out[name] = [float(v) for v in getattr(self, name)]
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NoiseScale:
        """The result that :meth:`to_dict` wrote: ``None`` is read back as ``inf`` for ``b_simple`` and the interval
        (the only non-finite values they take) and as NaN inside the estimate arrays."""

        def array(values: Any) -> np.ndarray:
            return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)

        kw: dict[str, Any] = {k: math.inf if d.get(k) is None else float(d[k]) for k in _INF_FIELDS}
        kw.update({k: float(d[k]) for k in ("grad_sq", "trace_sigma", "confidence")})
        kw.update(
            {k: int(d[k]) for k in ("num_estimates", "small_batch", "big_batch", "num_bootstrap", "seed")}
        )
        kw.update({k: array(d[k]) for k in _ESTIMATE_FIELDS})
        kw.update(finite_population=bool(d["finite_population"]), method=str(d["method"]))
        return cls(**kw, settings=dict(d.get("settings", {})))

    def __str__(self) -> str:
        return (
            f"B_simple = {self.b_simple:.4g} ({self.confidence:.0%} CI {self.ci_low:.4g} .. {self.ci_high:.4g}); "
            f"|G|^2 = {self.grad_sq:.4g}, tr(Sigma) = {self.trace_sigma:.4g} "
            f"[B_s={self.small_batch}, B_b={self.big_batch}, {self.num_estimates} estimates]"
        )

    def plot(self, ax: Any = None) -> Any:
        """Per-estimate ``tr Σ`` against ``|G|²``, with the line of slope ``b_simple`` through the means."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(5, 4), layout="constrained").add_subplot()
        ax.scatter(self.grad_sq_estimates, self.trace_sigma_estimates, s=12, alpha=0.7, label="estimates")
        ax.scatter([self.grad_sq], [self.trace_sigma], color="k", marker="x", label="means")
        if math.isfinite(self.b_simple):
            lo, hi = ax.get_xlim()
            xs = np.linspace(min(lo, 0.0), hi, 2)
            ax.plot(xs, self.b_simple * xs, "k--", lw=1, label=f"B_simple = {self.b_simple:.3g}")
        ax.set_xlabel("|G|² estimate")
        ax.set_ylabel("tr Σ estimate")
        ax.legend(fontsize=8)
        return ax


def bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, num_bootstrap: int, confidence: float, entropy: Any
) -> tuple[float, float]:
    """Percentile-bootstrap interval of ``mean(num) / mean(den)`` over the draws (a ratio of resampled means):
    ``num_bootstrap`` resamples with replacement from ``numpy.random.default_rng(entropy)``; a resample whose mean
    ``den`` is <= 0 has ratio ``inf``.

    Not ``scipy.stats.bootstrap``: its resampling stream and its interpolated percentiles give other numbers
    (recorded results and the study would change), and interpolation is undefined when some resampled ratios are
    infinite (a mean ``|G|²`` <= 0 below the noise floor); ``"lower"`` / ``"higher"`` quantiles keep them defined.
    """
    k = len(num)
    idx = None
    if k * num_bootstrap <= _KEPT_INDICES:  # kept (a callback's window asks for the same ones at every log)
        with contextlib.suppress(TypeError):  # an unhashable entropy (a list): drawn afresh below
            idx = _resample_indices(entropy, k, num_bootstrap)
    if idx is None:
        idx = np.random.default_rng(entropy).integers(0, k, size=(num_bootstrap, k))
    n, d = num[idx].mean(1), den[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.inf)
    alpha = (1.0 - confidence) / 2.0
    # "lower"/"higher" keep the interval well defined when some resamples are infinite
    return float(np.quantile(ratios, alpha, method="lower")), float(
        np.quantile(ratios, 1 - alpha, method="higher")
    )


_KEPT_INDICES = 2**17  # resampling indices up to this many (1 MiB) are kept, 16 sets at most


@functools.lru_cache(maxsize=16)
def _resample_indices(entropy: Any, k: int, num_bootstrap: int) -> np.ndarray:
    """The bootstrap's resampling indices, read-only: ``default_rng(entropy).integers(0, k, (num_bootstrap, k))``."""
    idx = np.random.default_rng(entropy).integers(0, k, size=(num_bootstrap, k))
    idx.flags.writeable = False
    return idx


# --------------------------------------------------------------------------------------------- drawing big batches
def _indexed_draws(
    take: Callable[[torch.Tensor], Any],
    n: int,
    small_batch: int,
    k: int,
    num_estimates: int,
    seed: int,
    prepare: Callable[[Any], Any],
    whole: bool = False,
) -> Callable[[int], Draw]:
    """Draw ``e``: the ``k`` consecutive sub-batches of a big batch of ``k B_s`` samples drawn without replacement.

    The big batches are ``numpy.random.default_rng(seed).choice(n, k B_s, replace=False)``, one after the other;
    ``take(indices)`` reads samples from the source (only those samples are ever materialised): the whole big batch
    in one gather for tensor data (``whole``), else each sub-batch on its own (a map-style dataset's collate
    function sees exactly the samples of one sub-batch).
    """
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, size=k * small_batch, replace=False) for _ in range(num_estimates)])

    def draw(e: int) -> Draw:
        row = torch.from_numpy(idx[e])
        if whole:
            return _Whole(prepare(take(row)), k)
        return [prepare(take(row[i * small_batch : (i + 1) * small_batch])) for i in range(k)]

    return draw


class _StreamDraws:
    """Draws from a loader source: its batches, in its own (seeded) order, cut into sub-batches of ``B_s``.

    A loader batch of ``b`` samples gives ``b // B_s`` sub-batches (the remainder is dropped); a draw takes the
    next ``k``. Batches smaller than ``B_s`` (e.g. the last of an epoch) are skipped.
    """

    def __init__(
        self, source: LoaderSource, small_batch: int, k: int, device: torch.device, seed: int, prepare
    ):
        self.stream = BatchStream(source, None, device, seed)
        self.small_batch, self.k, self.prepare = small_batch, k, prepare
        self.limit = (source.num_batches or 0) + 2  # a whole epoch without a usable batch is an error
        self.pending: deque[Any] = deque()
        self.largest = 0

    def __call__(self, e: int) -> list[Any]:
        skipped = 0
        while len(self.pending) < self.k:
            batch = self.stream.next()
            b = batch_size_of(batch)
            self.largest = max(self.largest, b)
            if b < self.small_batch:
                skipped += 1
                if skipped >= self.limit:
                    raise ConfigError(
                        f"small_batch={self.small_batch} is not allowed with this loader: its batches have at most "
                        f"{self.largest} samples, and sub-batches are cut from them (small_batch <= {self.largest})"
                    )
                continue
            for j in range(b // self.small_batch):
                self.pending.append(
                    self.prepare(slice_batch(batch, j * self.small_batch, (j + 1) * self.small_batch))
                )
        return [self.pending.popleft() for _ in range(self.k)]

    def close(self) -> None:
        self.stream.close()


def _population(source: Source) -> int | None:
    """The number of samples a source draws from: known for indexable sources, sized loaders and lists."""
    if not isinstance(source, LoaderSource):
        return source.num_samples
    it = source.iterable
    if isinstance(it, torch.utils.data.DataLoader):
        if isinstance(it.dataset, torch.utils.data.IterableDataset) or it.batch_size is None:
            return None
        try:
            return len(it.sampler)  # type: ignore[arg-type]
        except TypeError:
            return None
    if isinstance(it, (list, tuple)):
        return sum(batch_size_of(b) for b in it)
    return None


def _objective_take(obj: Objective) -> tuple[Callable[[torch.Tensor], Any], bool]:
    """Sampling by index from an Objective's fixed batches (concatenated when there are several), and whether they
    are a flat tuple or dict of tensors (then a big batch is read in one gather)."""
    batches = obj.batches
    if len(batches) == 1:
        whole = batches[0]
    else:
        try:
            whole = obj.data
        except LrbsTypeError:
            raise ConfigError(
                f"the Objective's {len(batches)} fixed batches cannot be concatenated (ragged, e.g. padded to "
                "different lengths), so sub-batches cannot be drawn from them: call noise_scale(model, data, ...) "
                "instead"
            ) from None
    return (lambda idx: index_batch(whole, idx.to(obj.device))), _flat_tensors(whole)


def _objective_for(
    model: nn.Module, source: Source, batch_loss: BatchLoss, bn: str, dtype: torch.dtype | None, probe: int
) -> Objective:
    """The Objective that evaluates sub-batches functionally (its fixed data: all of a tensor source, where it
    costs no copy, or the data that BatchNorm recomputation needs; otherwise a small seeded probe)."""
    full = isinstance(source, TensorSource) or bn == "recompute"
    return Objective(model, batch_loss, source, bn=bn, dtype=dtype, max_samples=None if full else probe)


def _check_batches(small_batch: int, big_batch: int) -> tuple[int, int]:
    small_batch = check_int("small_batch", small_batch, low=1)
    big_batch = check_int("big_batch", big_batch, low=2)
    if small_batch >= big_batch:
        raise ConfigError(
            f"small_batch={small_batch} is not allowed with big_batch={big_batch}: must be < big_batch"
        )
    if big_batch % small_batch:
        raise ConfigError(
            f"big_batch={big_batch} is not allowed with small_batch={small_batch}: must be a multiple of it "
            f"(e.g. {big_batch // small_batch * small_batch} or {(big_batch // small_batch + 1) * small_batch})"
        )
    return small_batch, big_batch


def _setup(
    obj_or_model: Any,
    data: Any,
    loss: tuple[Any, Any, Any],
    bn: str,
    dtype: torch.dtype | None,
    precision: Any,
    small_batch: int,
    big_batch: int,
) -> tuple[str, Objective, Source | None]:
    """``(precision, objective, source)``: the source is None when the draws come from the Objective's batches."""
    if isinstance(obj_or_model, Objective):
        if data is not None:
            raise ConfigError("data is given twice: an Objective carries its own data, so leave data=None")
        for name, value in zip(("loss_fn", "compute_loss", "batch_weight"), loss):
            if value is not None:
                raise ConfigError(
                    f"{name} is given twice: an Objective carries its own loss, so leave {name}=None (or give it "
                    "to the Objective)"
                )
        return check_precision(precision, obj_or_model.device), obj_or_model, None
    if not isinstance(obj_or_model, nn.Module):
        raise LrbsTypeError(
            f"obj_or_model={type(obj_or_model).__name__} is not allowed: must be an lrbs Objective or an nn.Module"
        )
    if data is None:
        raise ConfigError("data=None is not allowed with a model: give the data to sample batches from")
    precision = check_precision(precision, model_device(obj_or_model))
    batch_loss = BatchLoss(*loss)
    source = as_source(data, name="data", batch_size=big_batch)
    obj = _objective_for(obj_or_model, source, batch_loss, bn, dtype, probe=small_batch)
    return precision, obj, None if isinstance(source, TensorSource) else source


def _draws(
    obj: Objective,
    source: Source | None,
    n: int | None,
    small_batch: int,
    k: int,
    num_estimates: int,
    seed: int,
) -> tuple[Callable[[int], Draw], Callable[[], None]]:
    """``(draw, close)`` for the Objective's own batches, an indexable source or a loader."""
    if source is None:
        take, flat = _objective_take(obj)
        return _indexed_draws(
            take, n, small_batch, k, num_estimates, seed, lambda b: b, whole=flat
        ), lambda: None

    def prepare(batch: Any) -> Any:
        return cast_floating(to_device(batch, obj.device), obj.dtype)

    if isinstance(source, LoaderSource):
        stream = _StreamDraws(source, small_batch, k, obj.device, seed, prepare)
        return stream, stream.close
    return _indexed_draws(source.take, n, small_batch, k, num_estimates, seed, prepare), lambda: None


def _random_state(device: torch.device, seed: int) -> contextlib.AbstractContextManager:
    """A forked RNG with the CPU generator seeded (a loader that shuffles with the global RNG is then seeded and the
    caller's random state is untouched)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.default_generator.manual_seed(seed)
    return stack


def noise_scale(
    obj_or_model: Objective | nn.Module,
    data: Any = None,
    *,
    small_batch: int,
    big_batch: int,
    num_estimates: int = 20,
    seed: int = 0,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    compute_loss: Callable[[Any, Any], torch.Tensor] | None = None,
    batch_weight: Callable[[Any], float] | None = None,
    precision: str = "32",
    params: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    confidence: float = 0.95,
    num_bootstrap: int = 1000,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
    finite_population: bool = True,
    method: str | None = None,
) -> NoiseScale:
    r"""The simple gradient noise scale ``B_simple = tr(Σ)/|G|²`` with the two-batch-size estimator.

    Each of ``num_estimates`` big batches of ``B_b`` samples (seeded, without replacement) is split into ``B_b / B_s``
    disjoint sub-batches, all gradients at the *same* weights; with ``|G_b|²`` the big-batch mean gradient's squared
    norm and ``|G_s|²`` the sub-batches' mean squared norm (McCandlish et al. 2018, App. A):

    .. math::

        |G|^2 \approx \frac{B_b|G_b|^2 - B_s|G_s|^2}{B_b - B_s}, \qquad
        \operatorname{tr}\Sigma \approx \frac{|G_s|^2 - |G_b|^2}{1/B_s - 1/B_b}, \qquad
        B_\text{simple} = \frac{\overline{\operatorname{tr}\Sigma}}{\overline{|G|^2}}.

    ``B_simple`` is the ratio of the averaged estimates, never the mean of per-draw ratios (a draw can be negative);
    the interval is a percentile bootstrap over the draws. Finite data, BatchNorm, an example: module docstring.

    Args:
        obj_or_model: an :class:`~lrbs.objective.Objective` (its fixed data are sampled) or a model (then ``data``
            is needed and the loss is read with ``loss_fn`` / ``compute_loss`` / ``batch_weight``).
        data: the data to sample from, when a model is given.
        small_batch, big_batch: ``B_s >= 1`` and ``B_b``, a multiple of ``B_s`` larger than it, at most the data.
        num_estimates: number of big batches (>= 2).
        seed: seeds the batches and the bootstrap.
        loss_fn, compute_loss, batch_weight: how a batch's loss (and a sub-batch's weight in the big-batch
            gradient) is read, as :class:`~lrbs.batches.BatchLoss` reads it (default cross-entropy for tuple
            batches, the model's own ``output.loss`` for mappings).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (Lightning's names).
        params: the weights (dict or flat vector; default the Objective's centre point).
        confidence, num_bootstrap: the level of the bootstrap interval, in (0, 1), and its resamples.
        bn, dtype: passed to the Objective built from a model (``bn="recompute"`` reads all the data into it, for
            the BatchNorm statistics).
        finite_population: apply the finite-data correction (the module docstring).
        method: ``"vmap"`` (all sub-batch gradients in one vectorised call), ``"loop"``, or ``None``: vmap,
            falling back to the loop for models or batches vmap cannot handle (e.g. ragged sub-batches).

    Returns:
        A :class:`NoiseScale`.

    Raises:
        ConfigError: ``small_batch >= big_batch``, ``big_batch`` not a multiple of ``small_batch`` or larger than
            the data, ``num_estimates < 2``, a confidence outside (0, 1), non-finite ``params``, data or a loss
            given twice, empty data, a ``precision`` outside the three names or ``"16-mixed"`` without a GPU.
        LrbsTypeError: a non-integer batch size, an unsupported ``obj_or_model`` or an unreadable batch.
    """
    small_batch, big_batch = _check_batches(small_batch, big_batch)
    num_estimates, seed, confidence, num_bootstrap = _check_options(
        num_estimates, seed, confidence, num_bootstrap, method, finite_population
    )
    loss = (loss_fn, compute_loss, batch_weight)
    precision, obj, source = _setup(obj_or_model, data, loss, bn, dtype, precision, small_batch, big_batch)
    n = _sample_count(obj, source, big_batch)
    theta = obj.theta() if params is None else obj.check_finite(params).detach().clone()
    small, big_sq, used = _sub_batch_norms(
        obj, source, n, theta, precision, (small_batch, big_batch // small_batch), num_estimates, seed, method
    )
    applied = finite_population and n is not None and n > 1
    given = {"confidence": confidence, "num_estimates": num_estimates, "seed": seed}
    given.update(num_bootstrap=num_bootstrap, small_batch=small_batch, big_batch=big_batch, method=str(used))
    given["finite_population"] = applied if source is not None else finite_population
    given["settings"] = _settings(obj, source, n, precision)
    return _result(small, big_sq, n if applied else None, given)


def _result(
    small: np.ndarray, big_sq: np.ndarray, population: int | None, given: dict[str, Any]
) -> NoiseScale:
    """The :class:`NoiseScale` of the squared norms (``population``: ``N`` of the finite-data correction, or None
    for ``c(B) = 1/B``); ``given`` holds the fields that are the run's settings."""
    c_small = sampling_coefficient(given["small_batch"], population)
    c_big = sampling_coefficient(given["big_batch"], population)
    small_sq = small.mean(1)
    grad_sq, trace = two_batch_estimate(small_sq, big_sq, c_small, c_big)
    g_mean, t_mean = float(grad_sq.mean()), float(trace.mean())
    entropy = [given["seed"], 0x6E73]
    lo, hi = bootstrap_ratio(trace, grad_sq, given["num_bootstrap"], given["confidence"], entropy)
    return NoiseScale(
        b_simple=b_simple_ratio(t_mean, g_mean),
        grad_sq=g_mean,
        trace_sigma=t_mean,
        ci_low=lo,
        ci_high=hi,
        grad_sq_estimates=grad_sq,
        trace_sigma_estimates=trace,
        small_sq_estimates=small_sq,
        big_sq_estimates=big_sq,
        **given,
    )


def _sample_count(obj: Objective, source: Source | None, big_batch: int) -> int | None:
    """``N``, the samples drawn from (None for an unsized loader); raises ConfigError if ``big_batch`` exceeds it."""
    n = obj.num_samples if source is None else _population(source)
    if n is not None and big_batch > n:
        raise ConfigError(f"big_batch={big_batch} is not allowed: larger than the data ({n} samples)")
    return n


def _check_options(
    num_estimates: int,
    seed: int,
    confidence: float,
    num_bootstrap: int,
    method: str | None,
    finite_population: Any,
) -> tuple[int, int, float, int]:
    """The checked ``(num_estimates, seed, confidence, num_bootstrap)`` of :func:`noise_scale` (and ``method``,
    ``finite_population``)."""
    num_estimates = check_int("num_estimates", num_estimates, low=2)
    seed = check_int("seed", seed)
    confidence = check_number("confidence", confidence, low=0.0, high=1.0, high_inclusive=False)
    num_bootstrap = check_int("num_bootstrap", num_bootstrap, low=1)
    if method is not None:
        check_choice("method", method, _METHODS)
    if not isinstance(finite_population, bool):
        raise LrbsTypeError(f"finite_population={finite_population!r} is not allowed: must be True or False")
    return num_estimates, seed, confidence, num_bootstrap


def _sub_batch_norms(
    obj: Objective,
    source: Source | None,
    n: int | None,
    theta: torch.Tensor,
    precision: str,
    sizes: tuple[int, int],
    num_estimates: int,
    seed: int,
    method: str | None,
) -> tuple[Any, Any, str]:
    """``(small, big_sq, method used)`` of :func:`_micro_sq_norms` over ``num_estimates`` draws of ``k`` sub-batches
    of ``small_batch`` (``sizes = (small_batch, k)``) at ``theta``, under the seeded forked RNG."""
    small_batch, k = sizes
    buffers = obj.buffers_at(theta)

    def loss_at(p: dict[str, torch.Tensor], batch: Any) -> torch.Tensor:
        with autocast(precision, obj.device):
            return obj.loss_on(p["theta"], batch, buffers)

    weigh = obj.batch_loss.weight if obj.batch_loss.batch_weight is not None else None
    with _random_state(obj.device, seed):
        draw, close = _draws(obj, source, n, small_batch, k, num_estimates, seed)
        try:
            return _micro_sq_norms(
                loss_at, {"theta": theta}, draw, num_estimates, k, method, weigh=weigh, precision=precision
            )
        finally:
            close()


def _settings(obj: Objective, source: Source | None, n: int | None, precision: str) -> dict[str, Any]:
    """The Objective's settings; with a streamed source, the source's size and description replace those of the
    Objective's probe batches."""
    out = obj.settings()
    if source is not None:
        out = {k: v for k, v in out.items() if k not in ("data_fingerprint", "batch_size")}
        out.update(num_samples=n, source=source.kind, data=source.describe())
    out["precision"] = precision
    return out


# --------------------------------------------------------------------------------------------- tracker
def _state_batch(state: TrainState) -> Any:
    """The step's batch: ``state.batch`` (any batch the protocol reads), else ``(state.x, state.y)``."""
    batch = getattr(state, "batch", None)
    if batch is not None:
        return batch
    if getattr(state, "x", None) is None or getattr(state, "y", None) is None:
        return None
    return (state.x, state.y)


def _state_batch_loss(state: TrainState) -> BatchLoss:
    """How fit reads the loss: its ``BatchLoss`` when the state carries one, else one from ``state.loss_fn``."""
    batch_loss = getattr(state, "batch_loss", None)
    if isinstance(batch_loss, BatchLoss):
        return batch_loss
    return BatchLoss(
        loss_fn=state.loss_fn,
        compute_loss=getattr(state, "compute_loss", None),
        batch_weight=getattr(state, "batch_weight", None),
    )


class TrackerPoint(NamedTuple):
    """One measurement of :class:`NoiseScaleTracker`: the debiased EMAs after ``step``, and their ratio."""

    step: int
    b_simple: float
    grad_sq: float
    trace_sigma: float


class NoiseScaleTracker(Callback):
    r"""Follow ``B_simple`` during :func:`~lrbs.train.fit` from micro-batches of the current batch.

    Every ``every`` steps, the step's batch (``state.batch``, any batch the protocol reads, or ``state.x, state.y``;
    ``B`` samples) is split into ``k = B // B_s`` disjoint micro-batches of ``B_s``, their gradients are taken at the current weights (after that step's
    update; both batch sizes see the same weights, which is what the estimator needs) and the two-batch-size
    estimates of ``|G|²`` and ``tr Σ`` (McCandlish et al. 2018, App. A; big batch ``k B_s``) enter separate
    debiased EMAs:

    .. math::

        m_t = \beta m_{t-1} + (1 - \beta) x_t, \qquad \hat m_t = m_t / (1 - \beta^t), \qquad
        B_\text{simple} = \frac{\max(\hat m^{\operatorname{tr}\Sigma}_t, 10^{-8})}{\max(\hat m^{|G|^2}_t, 10^{-8})}

    (a ratio of EMAs, never an EMA of ratios; gpt-neox and k-diffusion also clamp at 1e-8). At each evaluation
    ``b_simple``, ``gns_grad_sq`` and ``gns_trace_sigma`` are written to ``state.logs`` (``fit`` adds them to the
    eval row); :attr:`history` holds a :class:`TrackerPoint` per measurement and :attr:`raw` the single-step
    estimates ``(step, |G|², tr Σ)``.

    The loss is fit's (``state.batch_loss``, or one built from ``state.loss_fn``), the forward pass runs under fit's
    ``state.precision`` (autocast; float32 parameters, float64 norms). The gradients are computed with
    ``torch.func.functional_call`` on detached copies of the parameters and buffers, in the model's current mode (train mode inside fit: the gradients the optimizer sees, with batch
    statistics for BatchNorm), inside a forked RNG: the model, its buffers and the training run are unchanged
    (a run with the tracker is identical to one without).

    Args:
        small_batch: ``B_s``; ``None``: fit's micro-batch size when the state carries one (``max_micro_batch``)
            and it gives >= 2 micro-batches, else a quarter of the batch (4 micro-batches).
        every: measure every this many steps (step 0 included).
        beta: EMA factor in [0, 1).

    Raises:
        ConfigError: bad arguments; at a measurement, a batch too small for 2 micro-batches of ``B_s``.
    """

    def __init__(self, small_batch: int | None = None, every: int = 10, beta: float = 0.99):
        self.small_batch = None if small_batch is None else check_int("small_batch", small_batch, low=1)
        self.every = check_int("every", every, low=1)
        self.beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
        self.history: list[TrackerPoint] = []
        self.raw: list[tuple[int, float, float]] = []
        self._reset()

    def _reset(self) -> None:
        self.history, self.raw = [], []
        self._ema_g = self._ema_t = 0.0
        self._count = 0
        self._method: str | None = None

    # ---- current values
    def _debiased(self) -> tuple[float, float]:
        corr = 1.0 - self.beta**self._count
        return self._ema_g / corr, self._ema_t / corr

    @property
    def b_simple(self) -> float:
        """The current ratio of the debiased EMAs (NaN before the first measurement)."""
        if not self._count:
            return math.nan
        g, t = self._debiased()
        return max(t, 1e-8) / max(g, 1e-8)

    # ---- callback hooks
    def on_start(self, state: TrainState) -> None:
        self._reset()

    def on_step(self, state: TrainState) -> None:
        if state.step % self.every:
            return
        batch = _state_batch(state)
        if batch is None:
            return
        b = batch_size_of(batch)
        bs = self._small_batch_for(state, b)
        k = b // bs
        if k < 2:
            raise ConfigError(
                f"small_batch={bs} is not allowed with a batch of {b} at step {state.step}: the tracker needs at "
                f"least 2 micro-batches (small_batch <= {b // 2})"
            )
        model = state.model
        batch_loss = _state_batch_loss(state)
        precision = getattr(state, "precision", None) or "32"
        device = model_device(model)
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b_.detach().clone() for n, b_ in model.named_buffers()}

        def loss_at(p: dict[str, torch.Tensor], sub: Any) -> torch.Tensor:
            values = {**frozen, **buffers, **p}
            with autocast(precision, device):
                return batch_loss.loss(lambda *a, **kw: torch.func.functional_call(model, values, a, kw), sub)

        if _flat_tensors(batch):
            row: Draw = _Whole(slice_batch(batch, 0, k * bs), k)
        else:
            row = [slice_batch(batch, i * bs, (i + 1) * bs) for i in range(k)]
        weigh = batch_loss.weight if batch_loss.batch_weight is not None else None
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            small, big, self._method = _micro_sq_norms(
                loss_at, params, lambda e: row, 1, k, self._method, weigh=weigh, precision=precision
            )
        grad_sq, trace = two_batch_estimate(float(small.mean()), float(big[0]), 1.0 / bs, 1.0 / (k * bs))
        self._count += 1
        self._ema_g = self.beta * self._ema_g + (1.0 - self.beta) * grad_sq
        self._ema_t = self.beta * self._ema_t + (1.0 - self.beta) * trace
        g, t = self._debiased()
        self.raw.append((int(state.step), float(grad_sq), float(trace)))
        self.history.append(TrackerPoint(int(state.step), self.b_simple, g, t))

    def _small_batch_for(self, state: TrainState, b: int) -> int:
        if self.small_batch is not None:
            return self.small_batch
        micro = getattr(state, "max_micro_batch", None)
        if micro and b // micro >= 2:
            return int(micro)
        return max(1, b // 4)

    def on_eval(self, state: TrainState) -> None:
        if not self._count:
            return
        g, t = self._debiased()
        state.logs["b_simple"] = self.b_simple
        state.logs["gns_grad_sq"] = g
        state.logs["gns_trace_sigma"] = t

    # ---- results
    def to_dict(self) -> dict[str, Any]:
        """The settings and the history as JSON-able lists."""
        return {
            "small_batch": self.small_batch,
            "every": self.every,
            "beta": self.beta,
            "history": [list(p) for p in self.history],
            "raw": [list(r) for r in self.raw],
        }

    def plot(self, ax: Any = None) -> Any:
        """``B_simple`` (ratio of the EMAs) against the step, log scale."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(6, 3.5), layout="constrained").add_subplot()
        if self.history:
            steps = [p.step for p in self.history]
            ax.plot(steps, [p.b_simple for p in self.history])
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("B_simple (EMA ratio)")
        return ax


# --------------------------------------------------------------------------------------------- critical batch
@dataclass(frozen=True, eq=False)
class CriticalBatch:
    """The fitted steps / examples trade-off of a batch-size sweep (McCandlish et al. 2018, eq. 2.11).

    Attributes:
        b_crit: ``E_min / S_min``, the critical batch size.
        s_min: fewest optimizer steps to reach the target (infinite batch).
        e_min: fewest examples to reach the target (batch -> 0).
        batch_sizes, steps: the points that were fitted.
        residuals: ``log S_i - log(S_min + E_min / B_i)`` per point.
        rms_log_residual: their root mean square (0.1 means the fit is off by about 10 % per point).
        skipped: batch sizes left out because the run never reached the target.
    """

    b_crit: float
    s_min: float
    e_min: float
    batch_sizes: tuple[float, ...]
    steps: tuple[float, ...]
    residuals: np.ndarray
    rms_log_residual: float
    skipped: tuple[float, ...] = ()

    def predict_steps(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """``S(B) = S_min (1 + B_crit / B) = S_min + E_min / B``."""
        return self.s_min + self.e_min / np.asarray(batch_size, dtype=float)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record."""
        return {
            "b_crit": self.b_crit,
            "s_min": self.s_min,
            "e_min": self.e_min,
            "batch_sizes": list(self.batch_sizes),
            "steps": list(self.steps),
            "residuals": [float(r) for r in self.residuals],
            "rms_log_residual": self.rms_log_residual,
            "skipped": list(self.skipped),
        }

    def plot(self, ax: Any = None) -> Any:
        """Steps against examples (``E = B S``) for the sweep and the fitted hyperbola, log-log."""
        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(5, 4), layout="constrained").add_subplot()
        b = np.asarray(self.batch_sizes)
        s = np.asarray(self.steps)
        ax.loglog(b * s, s, "o", label="sweep")
        grid = np.geomspace(b.min() / 4, b.max() * 4, 200)
        fit = self.predict_steps(grid)
        ax.loglog(grid * fit, fit, "-", label=f"fit, B_crit = {self.b_crit:.3g}")
        ax.set_xlabel("examples E")
        ax.set_ylabel("steps S")
        ax.legend(fontsize=8)
        return ax


def _sweep_points(results: Any) -> list[tuple[float, float | None]]:
    if isinstance(results, Mapping):
        results = list(results.items())
    if isinstance(results, (str, bytes)) or not isinstance(results, Sequence):
        raise LrbsTypeError(
            f"results={results!r} is not allowed: must be a list of (batch_size, steps) pairs or a dict "
            "{batch_size: steps}"
        )
    out = []
    for i, item in enumerate(results):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise LrbsTypeError(f"results[{i}]={item!r} is not allowed: must be a (batch_size, steps) pair")
        b = check_number(f"results[{i}] batch_size", item[0], low=0.0)
        s = item[1]
        if s is None or (isinstance(s, float) and math.isinf(s)):
            out.append((b, None))
            continue
        out.append((b, check_number(f"results[{i}] steps", s, low=0.0)))
    return out


def critical_batch(results: Any) -> CriticalBatch:
    r"""Fit the steps / examples trade-off to a batch-size sweep; ``B_crit = E_min / S_min``.

    McCandlish et al. (2018, eq. 2.11) find that the steps ``S`` and examples ``E = B S`` needed to reach a given
    loss follow

    .. math::

        \Big(\frac{S}{S_\text{min}} - 1\Big)\Big(\frac{E}{E_\text{min}} - 1\Big) = 1
        \iff S = S_\text{min} + \frac{E_\text{min}}{B} = S_\text{min}\Big(1 + \frac{B_\text{crit}}{B}\Big),
        \quad E = E_\text{min}\Big(1 + \frac{B}{B_\text{crit}}\Big),

    with ``B_crit = E_min / S_min``. The fit minimises the squared *log* residuals
    ``log S_i - log(S_min + E_min / B_i)`` (steps span orders of magnitude, so relative errors are what matter)
    over ``log S_min`` and ``log E_min`` with :func:`scipy.optimize.least_squares`, started from the linear
    least-squares fit of ``S`` against ``1 / B`` weighted by ``1 / S``.

    Args:
        results: ``[(batch_size, steps), ...]`` or ``{batch_size: steps}``; ``steps=None`` (or ``inf``) marks a
            run that never reached the target (see :func:`steps_to_target`): it is left out and recorded in
            ``skipped``.

    Returns:
        A :class:`CriticalBatch`.

    Raises:
        ConfigError: fewer than 2 distinct batch sizes reached the target, or a batch size / step count <= 0.
        LrbsTypeError: ``results`` is not a list of pairs.

    Example:
        >>> cb = critical_batch([(b, 100 * (1 + 64 / b)) for b in (16, 64, 256, 1024)])
        >>> round(cb.b_crit, 6), round(cb.s_min, 6)
        (64.0, 100.0)

    References:
        McCandlish et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162), Sec. 2.3.
    """
    from scipy.optimize import least_squares

    points = _sweep_points(results)
    skipped = tuple(b for b, s in points if s is None)
    pts = [(b, s) for b, s in points if s is not None]
    if len({b for b, _ in pts}) < 2:
        raise ConfigError(
            f"results has {len(pts)} run(s) that reached the target at {len({b for b, _ in pts})} distinct batch "
            f"size(s) (skipped: {list(skipped)}): the fit needs at least 2 distinct batch sizes"
        )
    b = np.array([p[0] for p in pts], dtype=float)
    s = np.array([p[1] for p in pts], dtype=float)
    # start: S = a + c / B, least squares weighted by 1/S (relative errors)
    design = np.stack([np.ones_like(b), 1.0 / b], axis=1) / s[:, None]
    (a0, c0), *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    a0 = a0 if a0 > 0 else 0.5 * s.min()
    c0 = c0 if c0 > 0 else 0.5 * float(np.median(b * s))

    def resid(z: np.ndarray) -> np.ndarray:
        return np.log(s) - np.log(np.exp(z[0]) + np.exp(z[1]) / b)

    fit = least_squares(
        resid, x0=np.log([a0, c0]), method="lm" if len(b) > 2 else "trf", xtol=1e-14, ftol=1e-14, gtol=1e-14
    )
    s_min, e_min = (float(v) for v in np.exp(fit.x))
    r = resid(fit.x)
    return CriticalBatch(
        b_crit=e_min / s_min,
        s_min=s_min,
        e_min=e_min,
        batch_sizes=tuple(float(v) for v in b),
        steps=tuple(float(v) for v in s),
        residuals=r,
        rms_log_residual=float(np.sqrt(np.mean(r**2))),
        skipped=skipped,
    )


def steps_to_target(
    history: Any, target: float, *, metric: str = "train_loss", source: str = "auto", beta: float = 0.9
) -> int | None:
    r"""The number of optimizer steps ``S`` a run took to reach ``target`` (``None`` if it never did).

    Two sources:

    - ``"evals"``: the eval rows of a :class:`~lrbs.train.FitResult` (or a list of such dicts); ``S`` is the
      ``step`` of the first row whose ``metric`` is ``<= target`` (for an accuracy metric, ``>= target``).
      Full-data evaluations are exact, but ``S`` is only as fine as ``eval_every``.
    - ``"steps"``: the per-step training loss (``history["loss"]`` / ``history["step"]``), smoothed by a
      debiased EMA ``m_t = beta m_{t-1} + (1 - beta) l_t``, ``\hat m_t = m_t / (1 - beta^{t+1})``; the loss
      logged at step ``t`` was computed at the weights after ``t`` updates, so ``S = t`` for the first ``t``
      with ``\hat m_t <= target``. The EMA lags by about ``1 / (1 - beta)`` steps; noisy but fine-grained.

    ``"auto"`` uses the eval rows when the metric is found in them, else the per-step loss.

    Args:
        history: a ``FitResult``, its ``history`` dict, or its ``evals`` list.
        target: the value to reach.
        metric: the eval-row key (``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``, ...).
        source: ``"auto"``, ``"evals"`` or ``"steps"``.
        beta: EMA factor for ``"steps"``, in [0, 1).

    Returns:
        ``S`` (an int), or ``None``.

    Raises:
        ConfigError: unknown ``source``, a source the given history does not have, or a bad ``beta``/``target``.
        LrbsTypeError: ``history`` is none of the accepted forms.
    """
    target = check_number("target", target)
    check_choice("source", source, ("auto", "evals", "steps"))
    beta = check_number("beta", beta, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
    evals, steps_hist = _history_parts(history)
    has_evals = bool(evals) and all(isinstance(r, Mapping) for r in evals) and any(metric in r for r in evals)
    if source == "auto":
        source = "evals" if has_evals else "steps"
    if source == "evals":
        if not has_evals:
            raise ConfigError(f"source='evals' is not allowed: the history has no eval rows with {metric!r}")
        return _first_eval_reaching(evals, metric, target)
    if steps_hist is None or "loss" not in steps_hist or "step" not in steps_hist:
        raise ConfigError(
            "source='steps' is not allowed: the history has no per-step 'step' and 'loss' arrays"
        )
    return _first_ema_reaching(steps_hist, target, beta)


def _history_parts(history: Any) -> tuple[list | None, Mapping | None]:
    """``(evals, per-step history)`` of a ``FitResult``, its history dict or its evals list (None where absent)."""
    if hasattr(history, "evals") and hasattr(history, "history"):
        return history.evals, history.history
    if isinstance(history, Mapping):
        return None, history
    if isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        return list(history), None
    raise LrbsTypeError(
        f"history={type(history).__name__} is not allowed: must be a FitResult, its history dict or its evals"
    )


def _first_eval_reaching(evals: list, metric: str, target: float) -> int | None:
    """The ``step`` of the first eval row whose ``metric`` reaches ``target`` (``>=`` for accuracies, else ``<=``)."""
    higher = metric.endswith("acc") or metric.endswith("accuracy")
    for row in evals:
        v = row.get(metric)
        if v is None or not math.isfinite(float(v)):
            continue
        if (float(v) >= target) if higher else (float(v) <= target):
            return int(row["step"])
    return None


def _first_ema_reaching(steps_hist: Mapping, target: float, beta: float) -> int | None:
    """The first step whose debiased EMA of the per-step loss is ``<= target`` (None on a non-finite loss)."""
    m = 0.0
    for i, (t, lo) in enumerate(zip(steps_hist["step"], steps_hist["loss"])):
        lo = float(lo)
        if not math.isfinite(lo):
            return None
        m = beta * m + (1.0 - beta) * lo
        if m / (1.0 - beta ** (i + 1)) <= target:
            return int(t)
    return None
