"""Sharpness measures of an :class:`~lrbs.objective.Objective`, all on the same fixed data.

- :func:`keskar_sharpness`: Keskar et al.'s epsilon-sharpness (arXiv 1609.04836, Metric 2.1), maximized in a
  box with scipy's L-BFGS-B, in the full space or a random subspace.
- :func:`worst_case_sharpness`: ``max_{||delta / c||_p <= rho} L(w + delta) - L(w)`` (SAM's sharpness, Foret
  et al. arXiv 2010.01412; adaptive ``c = |w|`` as in ASAM, Kwon et al. arXiv 2102.11600), by projected
  gradient ascent with Auto-PGD's step-size rule, optionally as m-sharpness (Andriushchenko et al. 2023, arXiv
  2302.07011).
- :func:`average_sharpness`: ``E_delta[L(w + delta)] - L(w)`` with Gaussian or uniform ``delta`` (ibid.).
- :func:`edge_of_stability`: ``eta lambda_max`` against ``2 (1 + beta)`` (Cohen et al. 2021, arXiv
  2103.00065).
- :func:`sharpness_report`: all of them, plus ``lambda_max`` and the trace, on one seeded data subset.

None of them touches the user's model: they work on the Objective's private copy through flat parameter
vectors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import torch

from . import measures as _measures
from .batches import slice_batch
from .errors import ConfigError, check_choice, check_int, check_number, check_positive, unknown_name

__all__ = [
    "KeskarResult",
    "WorstCaseResult",
    "AverageResult",
    "EdgeOfStability",
    "SharpnessReport",
    "keskar_sharpness",
    "keskar_subspace_sharpness",
    "edge_of_stability_at",
    "DEFAULT_MEASURES",
    "worst_case_sharpness",
    "average_sharpness",
    "edge_of_stability",
    "sharpness_report",
    "MEASURES",
]


# --------------------------------------------------------------------------- results
class _AsDict:
    """``to_dict()`` for the result dataclasses below: their fields, with ``settings`` copied."""

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class KeskarResult(_AsDict):
    """Keskar et al.'s epsilon-sharpness ``phi``.

    Attributes:
        value: ``phi = 100 (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x))``.
        max_loss: the largest loss found in the box; ``loss``: ``f(x)``.
        epsilon, subspace_dim (None: ``A = I``), max_iter, seed: the settings.
        nit, nfev: L-BFGS-B iterations and function evaluations (summed over a restart).
        restarted: the maximizer stalled at ``y = 0`` (a stationary point) and was restarted from a small
            random point in the box.
        message: L-BFGS-B's final message.
        settings: the Objective's settings.
        wall_time: seconds.
    """

    value: float
    max_loss: float
    loss: float
    epsilon: float
    subspace_dim: int | None
    max_iter: int
    nit: int
    nfev: int
    restarted: bool
    message: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0


@dataclass(frozen=True)
class WorstCaseResult(_AsDict):
    """Worst-case sharpness ``E_B[max_{||delta/c||_p <= rho} L_B(w + delta) - L_B(w)]``.

    Attributes:
        value: the mean over batches of the largest loss increase found.
        stderr: its standard error over batches (NaN for one batch).
        first_order: the same after the first ascent step only (for ``l2``, SAM's one-step estimate ``rho g /
            ||g||``).
        rho, norm, adaptive, steps, m, num_batches, seed: the settings (``m=None``: the whole data as one
            batch).
        restarted: batches whose gradient was zero, where the ascent started from a random point instead.
        settings: the Objective's settings.
        wall_time: seconds.
    """

    value: float
    stderr: float
    first_order: float
    rho: float
    norm: str
    adaptive: bool
    steps: int
    m: int | None
    num_batches: int
    restarted: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0


# The field lists of the results repeat on purpose (duplicates tool): the same quantity has the same name in every
# result (value, stderr, rho, norm, adaptive, seed, settings, wall_time).
@dataclass(frozen=True)
class AverageResult(_AsDict):
    """Average-case sharpness ``E_delta[L(w + delta)] - L(w)``.

    Attributes:
        value: the Monte Carlo mean over ``samples`` perturbations; ``stderr``: its standard error.
        loss: ``L(w)``.
        rho, norm, adaptive, samples, seed: the settings.
        settings: the Objective's settings.
        wall_time: seconds.
    """

    value: float
    stderr: float
    loss: float
    rho: float
    norm: str
    adaptive: bool
    samples: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0


@dataclass(frozen=True)
class EdgeOfStability:
    """``eta lambda_max`` against the stability threshold of (heavy-ball) gradient descent.

    Attributes:
        value: ``lr * lambda_max``.
        threshold: ``2 (1 + momentum)``.
        stable: ``value < threshold``.
        lr, lambda_max, momentum: the inputs.
    """

    value: float
    threshold: float
    stable: bool
    lr: float
    lambda_max: float
    momentum: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# --------------------------------------------------------------------------- helpers
def _point(obj: Any, params: Any) -> torch.Tensor:
    return obj.check_finite(obj.theta() if params is None else params).detach()


def _value_and_grad(
    loss: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor
) -> tuple[float, torch.Tensor]:
    z = z.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        val = loss(z)
        (g,) = torch.autograd.grad(val, z)
    return float(val.detach()), g.detach()


def _scale(theta: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """``c`` of the perturbation set: ``|w|`` (adaptive, ASAM) or 1."""
    return theta.abs() if adaptive else torch.ones_like(theta)


# --------------------------------------------------------------------------- Keskar
def _check_subspace_dim(subspace_dim: int | None, n: int) -> int | None:
    if subspace_dim is None:
        return None
    subspace_dim = check_int("subspace_dim", subspace_dim, low=1)
    if subspace_dim > n:
        raise ConfigError(
            f"subspace_dim={subspace_dim} is not allowed: must be <= the number of parameters ({n})"
        )
    return subspace_dim


def _subspace(x: np.ndarray, subspace_dim: int | None, gen: np.random.Generator) -> tuple[Any, np.ndarray]:
    """``(A, A^+ x)``: ``(None, x)`` for the full space, else a Gaussian ``n x p`` ``A`` (pseudo-inverse by QR)."""
    if subspace_dim is None:
        return None, x
    A = gen.standard_normal((x.size, subspace_dim))
    Q, R = np.linalg.qr(A)  # A = QR, A^+ = R^{-1} Q^T (A has full column rank almost surely)
    return A, np.linalg.solve(R, Q.T @ x)


class _NegLoss:
    """``y -> (-f(x + A y), -A^T grad f)`` for L-BFGS-B, counting calls and keeping the largest finite loss."""

    def __init__(self, obj: Any, theta: torch.Tensor, x: np.ndarray, A: Any) -> None:
        self.obj, self.theta, self.x, self.A = obj, theta, x, A
        self.nfev = 0
        self.best_loss, self.best_y = -math.inf, None

    def __call__(self, y: np.ndarray) -> tuple[float, np.ndarray]:
        A = self.A
        self.nfev += 1
        step = y if A is None else A @ y
        z = torch.as_tensor(self.x + step, dtype=self.obj.dtype, device=self.theta.device)
        val, g = _value_and_grad(self.obj.loss_tensor, z)
        g = g.to(torch.float64).cpu().numpy()
        if math.isfinite(val) and val > self.best_loss:
            self.best_loss, self.best_y = val, y.copy()
        return -val, -(g if A is None else A.T @ g)


def _maximize(
    neg_f: _NegLoss, bound: np.ndarray, max_iter: int, gen: np.random.Generator
) -> tuple[float, int, str, bool]:
    """L-BFGS-B on ``neg_f`` in the box ``|y| <= bound`` from 0, restarted once from a random point in a tenth
    of the box where it stalled at 0. Returns ``(f(x), iterations, message, restarted)``."""
    bounds = list(zip(-bound, bound))
    y0 = np.zeros_like(bound)
    loss0 = -neg_f(y0)[0]
    opts = {"maxiter": max_iter, "maxfun": 50 * max_iter + 20}
    res = scipy.optimize.minimize(neg_f, y0, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
    nit, message = int(res.nit), str(res.message)
    restarted = bool(neg_f.best_loss <= loss0 or not np.any(neg_f.best_y))
    if restarted:
        start = gen.uniform(-0.1, 0.1, size=bound.shape) * bound
        res2 = scipy.optimize.minimize(neg_f, start, jac=True, method="L-BFGS-B", bounds=bounds, options=opts)
        nit, message = nit + int(res2.nit), str(res2.message)
    return loss0, nit, message, restarted


def keskar_sharpness(
    obj: Any,
    *,
    epsilon: float = 1e-3,
    subspace_dim: int | None = None,
    max_iter: int = 10,
    seed: int = 0,
    params: Any = None,
) -> KeskarResult:
    """Keskar et al.'s epsilon-sharpness, maximized with L-BFGS-B in a box around the point.

    With ``x`` the parameters, ``A`` an ``n x p`` matrix and ``A^+`` its pseudo-inverse, the box is ``C_eps =
    {y in R^p : |y_i| <= eps (|(A^+ x)_i| + 1)}`` and the metric is

        phi_{x,f}(eps, A) = 100 (max_{y in C_eps} f(x + A y) - f(x)) / (1 + f(x)),

    with ``f`` the full training loss of the Objective. ``A = I_n`` (full space, the default) or a random
    Gaussian ``n x p`` matrix (``subspace_dim=p``; the paper uses ``p = 100``), whose pseudo-inverse is taken
    through a QR factorization (``A = np.random.default_rng(seed).standard_normal((n, p))``). As in the paper
    the maximization is inexact: L-BFGS-B (minimising ``-f``) for ``max_iter`` iterations from ``y = 0``, in
    float64 on the optimizer side; gradients come from autograd on the Objective's loss (build the Objective
    with ``dtype=torch.float64`` for a float64 loss). At an exact stationary point the gradient at ``y = 0``
    vanishes and L-BFGS-B reports no progress; then it is restarted from a random point at a tenth of the box
    (``restarted=True``) and the larger of the two maxima is kept.

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        epsilon: the box size (> 0); the paper uses 1e-3 and 5e-4.
        subspace_dim: ``p`` for a random subspace (``<= n``); None for the full space.
        max_iter: L-BFGS-B iterations (the paper: 10).
        seed: seed of ``A`` and of a restart point.
        params: the point; default the Objective's centre.

    Returns:
        A :class:`KeskarResult`.

    Raises:
        ConfigError: ``epsilon <= 0``, ``subspace_dim`` out of ``[1, n]``, ``max_iter < 1``, non-finite
            parameters.

    References:
        Keskar, Mudigere, Nocedal, Smelyanskiy & Tang, "On Large-Batch Training for Deep Learning:
        Generalization Gap and Sharp Minima", ICLR 2017 (arXiv 1609.04836), Section 2.2.2.
    """
    t0 = time.perf_counter()
    epsilon = check_positive("epsilon", epsilon)
    max_iter = check_int("max_iter", max_iter, low=1)
    subspace_dim = _check_subspace_dim(subspace_dim, obj.num_params)
    theta = _point(obj, params)
    x = theta.to(torch.float64).cpu().numpy()
    gen = np.random.default_rng(seed)
    A, ax = _subspace(x, subspace_dim, gen)
    neg_f = _NegLoss(obj, theta, x, A)
    loss0, nit, message, restarted = _maximize(neg_f, epsilon * (np.abs(ax) + 1.0), max_iter, gen)
    max_loss = float(neg_f.best_loss)
    return KeskarResult(
        value=100.0 * (max_loss - loss0) / (1.0 + loss0),
        max_loss=max_loss,
        loss=float(loss0),
        epsilon=epsilon,
        subspace_dim=subspace_dim,
        max_iter=max_iter,
        nit=nit,
        nfev=neg_f.nfev,
        restarted=restarted,
        message=message,
        seed=seed,
        settings=obj.settings(),
        wall_time=time.perf_counter() - t0,
    )


def keskar_subspace_sharpness(
    obj: Any, *, subspace_dim: int | None = 100, seed: int = 0, **options: Any
) -> KeskarResult:
    """:func:`keskar_sharpness` in a random subspace of ``p = min(subspace_dim, n)`` dimensions (the registry's
    ``keskar_subspace``: the paper's ``p = 100``, clipped for models with fewer parameters)."""
    if subspace_dim is not None:
        subspace_dim = min(subspace_dim, obj.num_params)
    return keskar_sharpness(obj, subspace_dim=subspace_dim, seed=seed, **options)


# --------------------------------------------------------------------------- worst case
def _batch_losses(obj: Any, m: int | None) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The loss of each batch of size ``m`` (in data order, a smaller last batch dropped), or the full
    loss."""
    if m is None or m >= obj.num_samples:
        return [obj.loss_tensor]
    if obj.bn == "recompute":
        raise ConfigError(
            "m-sharpness (m=...) is not allowed with bn='recompute': use bn='eval' or bn='train'"
        )
    whole = obj.data  # every sample as one batch (raises for ragged batches)

    def make(batch: Any) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda theta: obj.loss_on(theta, batch)

    return [make(slice_batch(whole, i, i + m)) for i in range(0, obj.num_samples - m + 1, m)]


def _checkpoints(steps: int) -> set[int]:
    """Auto-PGD's checkpoints: p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return {math.ceil(q * steps) for q in p[1:] if math.ceil(q * steps) < steps}


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    """``u`` projected onto the ``linf`` box or ``l2`` ball of radius ``rho``."""
    if norm == "linf":
        return u.clamp(-rho, rho)
    nu = float(u.norm())
    return u * (rho / nu) if nu > rho else u


def _direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit ``norm``: ``sign(g)`` (linf) or ``g / ||g||`` (l2)."""
    if norm == "linf":
        return g.sign()
    ng = float(g.norm())
    return g / ng if ng > 0 else g


def _ascent_start(
    f: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    theta: torch.Tensor,
    rho: float,
    norm: str,
    gen: torch.Generator,
) -> tuple[float, torch.Tensor, torch.Tensor, bool]:
    """``(L(w), u_0, gradient at u_0, restarted)``: ``u_0 = 0``, or a random point at a tenth of the radius where
    the gradient at 0 vanishes (a stationary point, from which the ascent cannot start)."""
    u = torch.zeros_like(theta)
    loss0, g = f(u)
    if float(g.norm()) > 1e-12 * max(1.0, abs(loss0)):
        return loss0, u, g, False
    r = torch.randn(theta.shape, generator=gen, dtype=theta.dtype).to(theta.device)
    u = _project(0.1 * rho * (r / r.norm() if norm == "l2" else r.clamp(-1, 1)), rho, norm)
    _, g = f(u)
    return loss0, u, g, True


def _ascent(
    loss: Callable[[torch.Tensor], torch.Tensor],
    theta: torch.Tensor,
    c: torch.Tensor,
    rho: float,
    norm: str,
    steps: int,
    gen: torch.Generator,
) -> tuple[float, float, float, bool]:
    """Projected gradient ascent in ``u = delta / c`` over ``||u||_p <= rho`` (Auto-PGD step rule, momentum
    0.75).

    Returns ``(L(w), max loss found, loss after the first step, restarted)``.
    """

    def f(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        val, g = _value_and_grad(loss, theta + c * u)
        return val, c * g  # gradient with respect to u

    loss0, u, g, restarted = _ascent_start(f, theta, rho, norm, gen)
    best_val, best_u, best_g = loss0, u, g
    eta = 2.0 * rho
    checkpoints = _checkpoints(steps)
    u_prev = u
    first = math.nan
    since, successes, eta_at_last, best_at_last = 0, 0, eta, best_val
    cur_val = loss0
    for t in range(steps):
        z = _project(u + eta * _direction(g, norm), rho, norm)
        u_new = z if t == 0 else _project(u + 0.75 * (z - u) + 0.25 * (u - u_prev), rho, norm)
        val, g_new = f(u_new)
        first = val if t == 0 else first
        successes += val > cur_val
        since += 1
        u_prev, u, g, cur_val = u, u_new, g_new, val
        if val > best_val:
            best_val, best_u, best_g = val, u_new, g_new
        if t + 1 in checkpoints:
            if successes < 0.75 * since or (eta == eta_at_last and best_val == best_at_last):  # stuck
                eta /= 2.0
                u, g, u_prev, cur_val = best_u, best_g, best_u, best_val
            since, successes, eta_at_last, best_at_last = 0, 0, eta, best_val
    return loss0, best_val, first, restarted


def worst_case_sharpness(
    obj: Any,
    rho: float,
    *,
    adaptive: bool = False,
    norm: str = "l2",
    steps: int = 20,
    m: int | None = None,
    seed: int = 0,
    params: Any = None,
) -> WorstCaseResult:
    """Worst-case (SAM) sharpness by projected gradient ascent.

    ``S = E_B[max_{||delta / c||_p <= rho} L_B(w + delta) - L_B(w)]`` with ``c = |w|`` (adaptive, ASAM) or ``c
    = 1``, over batches ``B`` of size ``m`` (m-sharpness; ``m=None`` uses all the Objective's data as one
    batch). The maximization runs in ``u = delta / c`` (a plain ``l2`` ball or ``linf`` box): the first step
    is SAM's ``rho g / ||g||`` (``rho sign(g)`` for ``linf``), then Auto-PGD's rule: step ``2 rho`` halved at
    its checkpoints when progress stalls, momentum 0.75. The best loss over all iterates is kept, so the value
    is a lower bound on the true maximum that is tight for smooth losses.

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        rho: the radius (> 0); SAM uses 0.05, adaptive variants ~10x larger.
        adaptive: scale the set by ``|w|`` (ASAM).
        norm: ``"l2"`` or ``"linf"``.
        steps: ascent steps (>= 1; Andriushchenko et al. use 20).
        m: batch size of m-sharpness (None: one batch of all the data).
        seed: seed of the random start at a stationary point.
        params: the point; default the Objective's centre.

    Returns:
        A :class:`WorstCaseResult`.

    Raises:
        ConfigError: ``rho <= 0``, unknown norm, ``steps < 1``, ``m < 1``, non-finite parameters, ``m`` with
            ``bn="recompute"``.

    References:
        Foret et al., arXiv 2010.01412; Kwon et al., arXiv 2102.11600; Andriushchenko et al., "A Modern Look
        at the Relationship between Sharpness and Generalization", ICML 2023 (arXiv 2302.07011); Croce & Hein
        (Auto-PGD), arXiv 2003.01690.
    """
    t0 = time.perf_counter()
    rho = check_positive("rho", rho)
    check_choice("norm", norm, ("l2", "linf"))
    steps = check_int("steps", steps, low=1)
    if m is not None:
        m = check_int("m", m, low=1)
    theta = _point(obj, params)
    c = _scale(theta, adaptive)
    gen = torch.Generator().manual_seed(seed)
    diffs, firsts, restarts = [], [], 0
    for loss in _batch_losses(obj, m):
        l0, best, first, restarted = _ascent(loss, theta, c, rho, norm, steps, gen)
        diffs.append(best - l0)
        firsts.append(first - l0)
        restarts += restarted
    d = np.asarray(diffs)
    return WorstCaseResult(
        value=float(d.mean()),
        stderr=float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan,
        first_order=float(np.mean(firsts)),
        rho=rho,
        norm=norm,
        adaptive=bool(adaptive),
        steps=steps,
        m=m,
        num_batches=len(d),
        restarted=restarts,
        seed=seed,
        settings=obj.settings(),
        wall_time=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- average case
def average_sharpness(
    obj: Any,
    rho: float,
    *,
    adaptive: bool = False,
    norm: str = "l2",
    samples: int = 100,
    seed: int = 0,
    params: Any = None,
) -> AverageResult:
    """Average-case sharpness ``E_delta[L(w + delta)] - L(w)`` by Monte Carlo over random perturbations.

    ``delta = rho c * N(0, I)`` (``norm="l2"``) or ``delta = rho c * U(-1, 1)^n`` (``"linf"``), with ``c =
    |w|`` (adaptive) or 1, exactly as in Andriushchenko et al.'s ``eval_average_sharpness``. All points are
    evaluated with ``obj.loss_many``. For a quadratic, ``E = rho^2/2 sum_i c_i^2 H_ii`` (``/3`` for ``linf``).

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        rho: the noise scale (> 0).
        adaptive: scale by ``|w|``.
        norm: ``"l2"`` (Gaussian) or ``"linf"`` (uniform).
        samples: number of perturbations (>= 2).
        seed: noise seed.
        params: the point; default the Objective's centre.

    Returns:
        An :class:`AverageResult` with the mean and its standard error.

    Raises:
        ConfigError: ``rho <= 0``, unknown norm, ``samples < 2``, non-finite parameters.

    References:
        Andriushchenko et al., arXiv 2302.07011, Section 3.
    """
    t0 = time.perf_counter()
    rho = check_positive("rho", rho)
    check_choice("norm", norm, ("l2", "linf"))
    samples = check_int("samples", samples, low=2)
    theta = _point(obj, params)
    c = _scale(theta, adaptive)
    gen = torch.Generator().manual_seed(seed)
    loss0 = float(obj.loss_many(theta[None], accuracy=False)["loss"][0])
    losses = []
    for s in range(0, samples, 64):  # bounded memory: 64 points of n parameters at a time
        k = min(64, samples - s)
        if norm == "l2":
            noise = torch.randn((k, theta.numel()), generator=gen, dtype=torch.float64)
        else:
            noise = 2.0 * torch.rand((k, theta.numel()), generator=gen, dtype=torch.float64) - 1.0
        stack = theta[None] + rho * c[None] * noise.to(dtype=theta.dtype, device=theta.device)
        losses.append(obj.loss_many(stack, accuracy=False)["loss"])
    d = np.concatenate(losses) - loss0
    return AverageResult(
        value=float(d.mean()),
        stderr=float(d.std(ddof=1) / math.sqrt(len(d))),
        loss=loss0,
        rho=rho,
        norm=norm,
        adaptive=bool(adaptive),
        samples=samples,
        seed=seed,
        settings=obj.settings(),
        wall_time=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- edge of stability
def edge_of_stability(lr: float, lambda_max: float | Any, momentum: float = 0.0) -> EdgeOfStability:
    """Compare ``eta lambda_max`` with the stability threshold of gradient descent.

    On the quadratic model, GD with step ``eta`` is stable along the top eigendirection iff ``eta lambda_max <
    2``; with heavy-ball momentum ``beta`` iff ``eta lambda_max < 2 (1 + beta)``. Cohen et al. observe that
    full-batch training drives ``lambda_max`` up to ``2 / eta`` and then hovers there ("edge of stability").

    Args:
        lr: the learning rate (> 0).
        lambda_max: the top Hessian eigenvalue (a number or an :class:`~lrbs.curvature.EigenResult`).
        momentum: heavy-ball ``beta`` in ``[0, 1)``.

    Returns:
        An :class:`EdgeOfStability` (value, threshold, stable).

    Raises:
        ConfigError: ``lr <= 0``, ``momentum`` outside ``[0, 1)``, a non-finite eigenvalue.

    References:
        Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the Edge
        of Stability", ICLR 2021 (arXiv 2103.00065).
    """
    lr = check_positive("lr", lr)
    momentum = check_number("momentum", momentum, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False)
    if hasattr(lambda_max, "top"):
        lambda_max = lambda_max.top
    lam = check_number("lambda_max", lambda_max)
    value, threshold = lr * lam, 2.0 * (1.0 + momentum)
    return EdgeOfStability(value, threshold, bool(value < threshold), lr, lam, momentum)


def edge_of_stability_at(
    obj: Any, *, lr: float | None = None, momentum: float = 0.0, seed: int = 0, **eig_options: Any
) -> EdgeOfStability:
    """:func:`edge_of_stability` with ``lambda_max`` measured on ``obj`` (the registry's ``lambda_max``, its
    defaults overridden by ``eig_options``); the registry's ``edge_of_stability``.

    Raises:
        ConfigError: ``lr`` not given, or any error of :func:`edge_of_stability`.
    """
    if lr is None:
        raise ConfigError("edge_of_stability needs the training learning rate: lr=None is not allowed")
    top = MEASURES["lambda_max"].compute(obj, seed=seed, **eig_options)
    return edge_of_stability(lr, top, momentum)


# --------------------------------------------------------------------------- report
#: The one registry of measures (:data:`lrbs.measures.MEASURES`: name -> :class:`~lrbs.measures.Measure`, whose
#: ``options`` are the defaults; override any of them with ``sharpness_report(options={name: {...}})``).
MEASURES = _measures.MEASURES
DEFAULT_MEASURES = tuple(m for m in MEASURES if m != "negative_mass")


@dataclass(frozen=True)
class SharpnessReport:
    """Every requested sharpness measure on one data subset.

    Attributes:
        measures: ``{name: value}``.
        results: ``{name: result object}`` (each with its own settings and ``to_dict()``).
        settings: the Objective's settings (on the subset) plus ``max_samples`` and ``seed``.
        wall_time: seconds.
    """

    measures: dict[str, float]
    results: dict[str, Any]
    settings: dict[str, Any]
    wall_time: float

    def rows(self) -> list[dict[str, Any]]:
        """One row per measure: name, value, standard error (where there is one), options and seconds."""
        out = []
        for name, res in self.results.items():
            d = res.to_dict()
            opts = {k: v for k, v in d.items() if k in _OPTION_KEYS}
            out.append(
                {
                    "measure": name,
                    "value": self.measures[name],
                    "stderr": d.get("stderr"),
                    "options": opts,
                    "seconds": d.get("wall_time"),
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the values, each measure's full result (without arrays) and the shared settings."""
        results = {}
        for name, res in self.results.items():
            d = res.to_dict()
            d.pop("settings", None)
            d.pop("grid", None)
            d.pop("density", None)
            results[name] = d
        return {
            "measures": dict(self.measures),
            "results": results,
            "settings": dict(self.settings),
            "wall_time": self.wall_time,
        }


_OPTION_KEYS = {
    "k",
    "tol",
    "method",
    "num_hvps",
    "num_runs",
    "lanczos_steps",
    "epsilon",
    "max_iter",
    "subspace_dim",
    "rho",
    "norm",
    "steps",
    "adaptive",
    "samples",
    "m",
    "lr",
    "momentum",
    "seed",
    "threshold",
}


def _check_report_request(measures: list[str], options: dict[str, Any], lr: float | None) -> None:
    for name in measures:
        if name not in MEASURES:
            raise unknown_name("measure", name, MEASURES)
    _measures.check_options(measures, options)
    if "edge_of_stability" in measures and lr is None:
        raise ConfigError(
            "measures include 'edge_of_stability' but lr=None: give the training learning rate lr"
        )


def _report_objective(obj: Any, params: Any, max_samples: int | None, seed: int) -> Any:
    """The Objective the report measures: at ``params``, on a seeded subset of ``max_samples`` samples."""
    if params is not None:
        obj = obj.at(params)
    if max_samples is not None and check_int("max_samples", max_samples, low=1) < obj.num_samples:
        obj = obj.subset(max_samples, seed=seed)
    return obj


def sharpness_report(
    obj: Any,
    *,
    measures: Sequence[str] = DEFAULT_MEASURES,
    max_samples: int | None = 1024,
    seed: int = 0,
    lr: float | None = None,
    momentum: float = 0.0,
    options: dict[str, dict[str, Any]] | None = None,
    params: Any = None,
) -> SharpnessReport:
    """All sharpness measures on one seeded data subset, through one Objective.

    Measures (see :data:`MEASURES` for their default options): ``lambda_max`` (Lanczos), ``trace`` (Hutch++),
    ``negative_mass`` (SLQ density mass below 0), ``keskar`` / ``keskar_subspace`` (Keskar et al. 2017),
    ``worst_case`` / ``worst_case_adaptive`` (SAM / ASAM sharpness), ``average`` / ``average_adaptive``
    (Andriushchenko et al. 2023) and ``edge_of_stability`` (``lr * lambda_max``; needs ``lr``, reuses
    ``lambda_max``). ``keskar_subspace`` uses ``p = min(100, n)``.

    Args:
        obj: an :class:`~lrbs.objective.Objective` (its ``bn`` mode is honoured and recorded).
        measures: names to compute, in order.
        max_samples: evaluate on a fixed random subset of this many samples (None: all the Objective's data).
        seed: seed of the subset and of every estimator.
        lr, momentum: the training learning rate and momentum, for ``edge_of_stability``.
        options: per-measure overrides, e.g. ``{"worst_case": {"rho": 0.1, "m": 128}}``.
        params: the point; default the Objective's centre.

    Returns:
        A :class:`SharpnessReport` (``rows()``, ``to_dict()``).

    Raises:
        ConfigError: an unknown measure (the closest name is suggested), ``edge_of_stability`` without ``lr``,
            options for a measure not requested, or any error of the measures themselves.
    """
    t0 = time.perf_counter()
    measures = list(measures)
    options = dict(options or {})
    _check_report_request(measures, options, lr)
    obj = _report_objective(obj, params, max_samples, seed)
    values: dict[str, float] = {}
    results: dict[str, Any] = {}
    top = None
    for name in measures:
        if name == "edge_of_stability":  # reuses lambda_max where it was measured before
            top = top if top is not None else MEASURES["lambda_max"].compute(obj, seed=seed)
            res = edge_of_stability(lr, top, momentum)
        else:
            res = MEASURES[name].compute(obj, seed=seed, **options.get(name, {}))
            top = res if name == "lambda_max" else top
        results[name], values[name] = res, MEASURES[name].value(res)
    settings = {**obj.settings(), "max_samples": max_samples, "seed": seed}
    return SharpnessReport(values, results, settings, time.perf_counter() - t0)
