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

References:
    McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162).
    Merrill et al., "Critical Batch Size Revisited", 2025 (arXiv 2505.23971).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number
from .objective import Objective
from .train import Callback, TrainState

__all__ = [
    "NoiseScale",
    "noise_scale",
    "NoiseScaleTracker",
    "TrackerPoint",
    "CriticalBatch",
    "critical_batch",
    "steps_to_target",
]

_METHODS = ("vmap", "loop")
_VMAP_FLOATS = 2**24  # gradient entries held at once by the vmap path (bounds its memory)


# --------------------------------------------------------------------------------------------- micro-batch gradients
def _micro_sq_norms(
    loss_at: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor],
    params: dict[str, torch.Tensor],
    xs: torch.Tensor,
    ys: torch.Tensor,
    method: str | None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Squared norms of sub-batch gradients and of their means per draw, all at the same ``params``.

    ``xs`` is ``(E, k, B_s, ...)`` (``E`` draws of ``k`` sub-batches), ``ys`` likewise; ``loss_at(params, x, y)``
    is the mean loss of one sub-batch. Returns ``(|g_ei|² of shape (E, k), |mean_i g_ei|² of shape (E,), method)``;
    norms are accumulated in float64. The vmap path handles several draws per call (bounded memory).
    """
    e_count, k = xs.shape[:2]
    params = {n: p.detach() for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    small, big = np.empty((e_count, k)), np.empty(e_count)
    if method in (None, "vmap"):
        try:
            grad_fn = torch.func.vmap(torch.func.grad(loss_at), in_dims=(None, 0, 0))
            per_call = max(1, _VMAP_FLOATS // max(1, k * numel))  # draws per vectorised call
            for s in range(0, e_count, per_call):
                e = min(per_call, e_count - s)
                g = grad_fn(params, xs[s : s + e].flatten(0, 1), ys[s : s + e].flatten(0, 1))
                flat = torch.cat([v.reshape(e, k, -1) for v in g.values()], dim=2).double()
                small[s : s + e] = (flat**2).sum(2).cpu().numpy()
                big[s : s + e] = (flat.mean(1) ** 2).sum(1).cpu().numpy()
            return small, big, "vmap"
        except (RuntimeError, NotImplementedError):  # an op without a vmap rule, in-place buffer updates, ...
            if method == "vmap":
                raise
    names = list(params)
    for e in range(e_count):
        total = torch.zeros(numel, dtype=torch.float64, device=xs.device)
        for i in range(k):
            leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                loss = loss_at(leaves, xs[e, i], ys[e, i])
                grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
            flat = torch.cat(
                [(torch.zeros_like(leaves[n]) if g is None else g).reshape(-1) for n, g in zip(names, grads)]
            ).double()
            small[e, i] = float((flat**2).sum())
            total += flat
        big[e] = float(((total / k) ** 2).sum())
    return small, big, "loop"


def _two_batch(small_sq: float, big_sq: float, c_small: float, c_big: float) -> tuple[float, float]:
    """Solve ``E|G_B|² = |G|² + c(B) tr Σ`` at the two batch sizes for ``(|G|², tr Σ)``."""
    trace = (small_sq - big_sq) / (c_small - c_big)
    return big_sq - c_big * trace, trace


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else math.inf


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------------------------- noise_scale
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
            "b_simple": _finite_or_none(self.b_simple),
            "grad_sq": self.grad_sq,
            "trace_sigma": self.trace_sigma,
            "ci_low": _finite_or_none(self.ci_low),
            "ci_high": _finite_or_none(self.ci_high),
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
        for name in ("grad_sq_estimates", "trace_sigma_estimates", "small_sq_estimates", "big_sq_estimates"):
            out[name] = [float(v) for v in getattr(self, name)]
        return out

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


def _bootstrap_ratio(
    num: np.ndarray, den: np.ndarray, num_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    rng = np.random.default_rng([seed, 0x6E73])
    k = len(num)
    idx = rng.integers(0, k, size=(num_bootstrap, k))
    n, d = num[idx].mean(1), den[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(d > 0, n / np.where(d > 0, d, 1.0), np.inf)
    alpha = (1.0 - confidence) / 2.0
    # "lower"/"higher" keep the interval well defined when some resamples are infinite
    return float(np.quantile(ratios, alpha, method="lower")), float(
        np.quantile(ratios, 1 - alpha, method="higher")
    )


def noise_scale(
    obj_or_model: Objective | nn.Module,
    data: Any = None,
    *,
    small_batch: int,
    big_batch: int,
    num_estimates: int = 20,
    seed: int = 0,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    params: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    confidence: float = 0.95,
    num_bootstrap: int = 1000,
    bn: str = "eval",
    dtype: torch.dtype | None = None,
    finite_population: bool = True,
    method: str | None = None,
) -> NoiseScale:
    r"""The simple gradient noise scale ``B_simple = tr(Σ)/|G|²`` with the two-batch-size estimator.

    For each of ``num_estimates`` draws, a big batch of ``B_b`` samples is drawn without replacement (seeded) and
    split into ``B_b / B_s`` disjoint sub-batches of ``B_s``. All gradients are taken at the *same* weights. With
    ``|G_b|²`` the squared norm of the big-batch mean gradient and ``|G_s|²`` the mean squared norm of the
    sub-batch gradients (McCandlish et al. 2018, App. A):

    .. math::

        |G|^2 \approx \frac{B_b|G_b|^2 - B_s|G_s|^2}{B_b - B_s}, \qquad
        \operatorname{tr}\Sigma \approx \frac{|G_s|^2 - |G_b|^2}{1/B_s - 1/B_b}, \qquad
        B_\text{simple} = \frac{\overline{\operatorname{tr}\Sigma}}{\overline{|G|^2}}.

    Both estimates are unbiased for samples drawn with replacement. Sampling without replacement from ``N``
    samples gives ``E|G_B|² = |G|² + c(B) tr Σ`` with ``c(B) = (N - B) / (B (N - 1))`` instead of ``1/B``
    (``Σ`` the covariance of the ``N`` per-example gradients); ``finite_population=True`` solves with this
    ``c(B)``, which is exactly unbiased for the dataset and equals the formula above as ``N → ∞``.
    ``B_simple`` is the ratio of the averaged estimates, never the mean of per-draw ratios (each draw is noisy
    and can be negative). The interval is a percentile bootstrap over the draws.

    Gradients are computed functionally on a private copy (an :class:`~lrbs.objective.Objective`); the model
    is never modified. BatchNorm follows the Objective's ``bn`` mode (default ``"eval"``: frozen running
    statistics, so every sample's gradient is independent of the others in its batch).

    Args:
        obj_or_model: an :class:`~lrbs.objective.Objective` (its data are sampled) or a model (then ``data`` is
            needed and an Objective is built with ``loss_fn``, ``bn`` and ``dtype``).
        data: the data to sample from, when a model is given.
        small_batch: ``B_s`` >= 1.
        big_batch: ``B_b``, a multiple of ``B_s`` larger than it and at most the number of samples.
        num_estimates: number of big batches (>= 2).
        seed: seeds the batches and the bootstrap.
        loss_fn: ``loss_fn(output, y)`` with mean reduction (with a model; default cross-entropy).
        params: the weights (dict or flat vector; default the Objective's centre point).
        confidence: level of the bootstrap interval, in (0, 1).
        num_bootstrap: bootstrap resamples.
        bn, dtype: passed to the Objective built from a model.
        finite_population: apply the finite-data correction described above.
        method: ``"vmap"`` (all sub-batch gradients in one vectorised call), ``"loop"``, or ``None``: vmap,
            falling back to the loop for models vmap cannot handle.

    Returns:
        A :class:`NoiseScale`.

    Raises:
        ConfigError: ``small_batch >= big_batch``, ``big_batch`` not a multiple of ``small_batch`` or larger than
            the data, ``num_estimates < 2``, a confidence outside (0, 1), non-finite ``params``, data given twice.
        LrbsTypeError: a non-integer batch size or an unsupported ``obj_or_model``.

    Example:
        >>> from lrbs.data import load_dataset
        >>> from lrbs.models import build_model
        >>> ds = load_dataset("blobs", n_train=256, n_test=16, num_features=4, num_classes=3, seed=0)
        >>> res = noise_scale(build_model("mlp", dataset=ds, depth=2, width=8), ds, small_batch=8, big_batch=64)
        >>> res.ci_low <= res.b_simple <= res.ci_high
        True

    References:
        McCandlish et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162), App. A.
    """
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
    num_estimates = check_int("num_estimates", num_estimates, low=2)
    seed = check_int("seed", seed)
    confidence = check_number("confidence", confidence, low=0.0, high=1.0, high_inclusive=False)
    num_bootstrap = check_int("num_bootstrap", num_bootstrap, low=1)
    if method is not None:
        check_choice("method", method, _METHODS)
    if not isinstance(finite_population, bool):
        raise LrbsTypeError(f"finite_population={finite_population!r} is not allowed: must be True or False")

    if isinstance(obj_or_model, Objective):
        if data is not None:
            raise ConfigError("data is given twice: an Objective carries its own data, so leave data=None")
        obj = obj_or_model
    elif isinstance(obj_or_model, nn.Module):
        if data is None:
            raise ConfigError("data=None is not allowed with a model: give the data to sample batches from")
        obj = Objective(obj_or_model, loss_fn, data, bn=bn, dtype=dtype)
    else:
        raise LrbsTypeError(
            f"obj_or_model={type(obj_or_model).__name__} is not allowed: must be an lrbs Objective or an nn.Module"
        )
    n = obj.num_samples
    if big_batch > n:
        raise ConfigError(f"big_batch={big_batch} is not allowed: larger than the data ({n} samples)")
    theta = obj.theta() if params is None else obj.check_finite(params).detach().clone()
    buffers = obj._buffers_at(theta)

    def loss_at(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return obj._loss_value(obj._forward(p["theta"], x, buffers), y)

    if finite_population and n > 1:
        c_small = (n - small_batch) / (small_batch * (n - 1))
        c_big = (n - big_batch) / (big_batch * (n - 1))
    else:
        c_small, c_big = 1.0 / small_batch, 1.0 / big_batch
    x_all, y_all = obj.data
    k = big_batch // small_batch
    rng = np.random.default_rng(seed)
    idx = np.stack([rng.choice(n, size=big_batch, replace=False) for _ in range(num_estimates)])
    idx_t = torch.from_numpy(idx).to(x_all.device)
    xs = x_all[idx_t].reshape(num_estimates, k, small_batch, *x_all.shape[1:])
    ys = y_all[idx_t].reshape(num_estimates, k, small_batch, *y_all.shape[1:])
    small, big_sq, used = _micro_sq_norms(loss_at, {"theta": theta}, xs, ys, method)
    small_sq = small.mean(1)
    grad_sq, trace = _two_batch(small_sq, big_sq, c_small, c_big)
    g_mean, t_mean = float(grad_sq.mean()), float(trace.mean())
    lo, hi = _bootstrap_ratio(trace, grad_sq, num_bootstrap, confidence, seed)
    return NoiseScale(
        b_simple=_ratio(t_mean, g_mean),
        grad_sq=g_mean,
        trace_sigma=t_mean,
        ci_low=lo,
        ci_high=hi,
        confidence=confidence,
        num_estimates=num_estimates,
        small_batch=small_batch,
        big_batch=big_batch,
        grad_sq_estimates=grad_sq,
        trace_sigma_estimates=trace,
        small_sq_estimates=small_sq,
        big_sq_estimates=big_sq,
        finite_population=finite_population,
        num_bootstrap=num_bootstrap,
        seed=seed,
        method=str(used),
        settings=obj.settings(),
    )


# --------------------------------------------------------------------------------------------- tracker
class TrackerPoint(NamedTuple):
    """One measurement of :class:`NoiseScaleTracker`: the debiased EMAs after ``step``, and their ratio."""

    step: int
    b_simple: float
    grad_sq: float
    trace_sigma: float


class NoiseScaleTracker(Callback):
    r"""Follow ``B_simple`` during :func:`~lrbs.train.fit` from micro-batches of the current batch.

    Every ``every`` steps, the step's batch (``state.x, state.y``, ``B`` samples) is split into ``k = B // B_s``
    disjoint micro-batches of ``B_s``, their gradients are taken at the current weights (after that step's
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

    The gradients are computed with ``torch.func.functional_call`` on detached copies of the parameters and
    buffers, in the model's current mode (train mode inside fit: the gradients the optimizer sees, with batch
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
        if state.step % self.every or state.x is None or state.y is None:
            return
        b = len(state.y)
        bs = self._small_batch_for(state, b)
        k = b // bs
        if k < 2:
            raise ConfigError(
                f"small_batch={bs} is not allowed with a batch of {b} at step {state.step}: the tracker needs at "
                f"least 2 micro-batches (small_batch <= {b // 2})"
            )
        model = state.model
        lossf = state.loss_fn or nn.functional.cross_entropy
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        buffers = {n: b_.detach().clone() for n, b_ in model.named_buffers()}

        def loss_at(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(model, {**frozen, **buffers, **p}, (x,))
            return lossf(out, y)

        x, y = state.x[: k * bs], state.y[: k * bs]
        xs = x.reshape(1, k, bs, *x.shape[1:])
        ys = y.reshape(1, k, bs, *y.shape[1:])
        device = x.device
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            small, big, self._method = _micro_sq_norms(loss_at, params, xs, ys, self._method)
        grad_sq, trace = _two_batch(float(small.mean()), float(big[0]), 1.0 / bs, 1.0 / (k * bs))
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
    evals, steps_hist = None, None
    if hasattr(history, "evals") and hasattr(history, "history"):
        evals, steps_hist = history.evals, history.history
    elif isinstance(history, Mapping):
        steps_hist = history
    elif isinstance(history, Sequence) and not isinstance(history, (str, bytes)):
        evals = list(history)
    else:
        raise LrbsTypeError(
            f"history={type(history).__name__} is not allowed: must be a FitResult, its history dict or its evals"
        )
    has_evals = bool(evals) and all(isinstance(r, Mapping) for r in evals) and any(metric in r for r in evals)
    if source == "auto":
        source = "evals" if has_evals else "steps"
    if source == "evals":
        if not has_evals:
            raise ConfigError(f"source='evals' is not allowed: the history has no eval rows with {metric!r}")
        higher = metric.endswith("acc") or metric.endswith("accuracy")
        for row in evals:
            v = row.get(metric)
            if v is None or not math.isfinite(float(v)):
                continue
            if (float(v) >= target) if higher else (float(v) <= target):
                return int(row["step"])
        return None
    if steps_hist is None or "loss" not in steps_hist or "step" not in steps_hist:
        raise ConfigError(
            "source='steps' is not allowed: the history has no per-step 'step' and 'loss' arrays"
        )
    m = 0.0
    for i, (t, lo) in enumerate(zip(steps_hist["step"], steps_hist["loss"])):
        lo = float(lo)
        if not math.isfinite(lo):
            return None
        m = beta * m + (1.0 - beta) * lo
        if m / (1.0 - beta ** (i + 1)) <= target:
            return int(t)
    return None
