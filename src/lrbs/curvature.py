"""The Hessian spectrum of an :class:`~lrbs.objective.Objective`: top eigenvalues, trace and spectral density.

Every estimator here needs only Hessian-vector products, so it is written against a *block operator*
``matmat(V) -> A V`` (``V`` of shape ``(k, n)``, each row multiplied, float64) and then applied to the Hessian
of the full-data loss through ``Objective.hvp``. The operator-level functions (:func:`lanczos_eigenvalues`,
:func:`power_iteration`, :func:`hutchinson_trace`, :func:`hutchpp_trace`, :func:`slq_density`) also accept an
explicit symmetric matrix, which is how they are tested against closed forms.

- Top eigenvalues: Lanczos with full reorthogonalization and a Ritz-residual stop (Golub & Van Loan, *Matrix
  Computations*, §10.1), or power iteration as the baseline (PyHessian's method, Yao et al. 2020, arXiv
  1912.07145, here with the same residual stop instead of its change-in-estimate rule).
- Trace: Hutchinson's estimator -- by default with an independent probe per piece of the data
  (:func:`batch_hutchinson_trace`) -- and Hutch++ (Meyer et al. 2021, arXiv 2010.09649).
- Spectral density: stochastic Lanczos quadrature with Gaussian smoothing (Ghorbani et al. 2019, arXiv
  1901.10159).

The Krylov bases and all reductions are kept in float64 whatever the Objective's dtype; only the HVPs run in
it.

Example:
    >>> from lrbs import Objective, build_model, load_dataset
    >>> ds = load_dataset("blobs", n_train=64, n_test=8, num_features=4, num_classes=3, seed=0)
    >>> obj = Objective(build_model("mlp", dataset=ds, depth=2, width=8), data=ds)
    >>> res = hessian_eigenvalues(obj, k=2)
    >>> bool(res.converged), bool(res.values[0] >= res.values[1]), res.tol_on, res.tol
    (True, True, 'value', 0.001)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import scipy.linalg
import torch

from .errors import ConfigError, LrbsTypeError, ShapeError, check_choice, check_int, check_positive

__all__ = [
    "EigenResult",
    "TraceResult",
    "SpectralDensity",
    "hessian_eigenvalues",
    "hessian_trace",
    "spectral_density",
    "lanczos_eigenvalues",
    "power_iteration",
    "hutchinson_trace",
    "hutchpp_trace",
    "batch_hutchinson_trace",
    "slq_density",
    "hessian_operator",
    "eigen_tolerance",
    "VALUE_TOL",
    "RESIDUAL_TOL",
    "PROBE_SAMPLES",
    "TRACE_RTOL",
]

MatMat = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("LA", "SA", "LM")
#: Default tolerance of :func:`hessian_eigenvalues` on the estimated relative eigenvalue error (``tol_on="value"``):
#: PyHessian's ``eigenvalues(tol=1e-3)`` number, here bounding the error estimate instead of the change of the
#: estimate.
VALUE_TOL = 1e-3
#: Samples sharing one probe in :func:`hessian_trace`'s default (data-split Hutchinson) estimator.
PROBE_SAMPLES = 100
#: Default relative standard error at which :func:`hessian_trace`'s Hutchinson estimator stops.
TRACE_RTOL = 0.04
#: Default tolerance on the relative residual ``||H v - lambda v|| / |lambda|`` (``tol_on="residual"``: with
#: ``return_vectors=True`` and ``method="power"``).
RESIDUAL_TOL = 1e-4


# --------------------------------------------------------------------------- results
@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenvalues of a symmetric operator (the Hessian).

    Attributes:
        values: the eigenvalues, ``(k,)``: descending for ``which="LA"``, ascending for ``"SA"``, by
            descending magnitude for ``"LM"``.
        vectors: unit eigenvectors ``(k, n)`` (float64) when asked for, else None.
        residuals: ``||H v_i - lambda_i v_i||`` per value (for Lanczos the Ritz residual ``|beta_m s_{m,i}|``,
            which equals the true residual in exact arithmetic with full reorthogonalization).
        rel_residuals: ``residuals / |values|``.
        converged: every value met the tolerance: ``rel_residual <= tol`` (``tol_on="residual"``) or
            ``error_estimates / |values| <= tol`` (``tol_on="value"``).
        num_hvps: Hessian-vector products used.
        steps: Lanczos steps (or power iterations, summed over eigenpairs).
        method, which, tol, seed: the settings.
        settings: the Objective's settings (bn mode, dtype, data fingerprint, ...); empty for a plain
            operator.
        wall_time: seconds.
        error_estimates: estimated absolute eigenvalue errors ``min(r, r^2 / gap)`` (Lanczos only; ``gap`` is
            the distance to the nearest other Ritz value), else None.
        tol_on: what ``tol`` bounded: ``"residual"`` or ``"value"``.
    """

    values: np.ndarray
    vectors: torch.Tensor | None
    residuals: np.ndarray
    rel_residuals: np.ndarray
    converged: bool
    num_hvps: int
    steps: int
    method: str
    which: str
    tol: float
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0
    error_estimates: np.ndarray | None = None
    tol_on: str = "residual"

    @property
    def top(self) -> float:
        """The first value (``lambda_max`` for ``which="LA"``)."""
        return float(self.values[0])

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (eigenvectors are left out; store them with ``Store.save_arrays``)."""
        return {
            "values": [float(v) for v in self.values],
            "residuals": [float(r) for r in self.residuals],
            "rel_residuals": [float(r) for r in self.rel_residuals],
            "converged": bool(self.converged),
            "num_hvps": int(self.num_hvps),
            "steps": int(self.steps),
            "method": self.method,
            "which": self.which,
            "tol": self.tol,
            "tol_on": self.tol_on,
            "error_estimates": None
            if self.error_estimates is None
            else [float(e) for e in self.error_estimates],
            "seed": self.seed,
            "settings": dict(self.settings),
            "wall_time": self.wall_time,
        }


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate.

    Attributes:
        value: the estimate of ``tr(H)``.
        stderr: its probe standard error (for Hutch++: of the Hutchinson part, conditional on the sketch).
        num_hvps: Hessian-vector products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: the probe seed.
        settings: the Objective's settings.
        wall_time: seconds.
    """

    value: float
    stderr: float
    num_hvps: int
    method: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: every field (``settings`` copied)."""
        return _summary(self)


# Result field lists repeat on purpose (duplicates tool): num_hvps, seed, settings, wall_time mean the same thing in
# every result of this module and of lrbs.sharpness.
@dataclass(frozen=True)
class SpectralDensity:
    """Smoothed eigenvalue density from stochastic Lanczos quadrature.

    Attributes:
        grid: eigenvalue grid ``(G,)``.
        density: the density on the grid, ``(G,)``; it integrates to 1.
        nodes: Ritz values per run, ``(num_runs, m)`` (NaN-padded when a run ended early).
        weights: their quadrature weights (squared first components of the Ritz vectors), same shape; each row
            sums to 1.
        sigma: the Gaussian smoothing width.
        negative_mass: fraction of the spectral mass below 0 (``mean_runs sum_i w_i [theta_i < 0]``, from the
            unsmoothed quadrature): how much of a saddle the point is.
        num_runs, lanczos_steps, num_hvps, seed: the settings and cost.
        settings: the Objective's settings.
        wall_time: seconds.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    negative_mass: float
    num_runs: int
    lanczos_steps: int
    num_hvps: int
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)
    wall_time: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (grid and density as lists; the raw nodes and weights are left out)."""
        return _summary(self, drop=("nodes", "weights"), lists=("grid", "density"))

    def plot(self, ax: Any = None, *, log: bool = True) -> Any:
        """Plot the density (log y axis by default, as in Ghorbani et al.;
        :func:`lrbs.report.figures.draw_density`); returns the Axes."""
        from .report.figures import draw_density

        return draw_density(self, ax=ax, log=log)


def _summary(result: Any, drop: tuple[str, ...] = (), lists: tuple[str, ...] = ()) -> dict[str, Any]:
    """A result dataclass's fields in order, without ``drop``, the arrays in ``lists`` as lists, dicts copied."""
    out = {}
    for f in fields(result):
        if f.name not in drop:
            v = getattr(result, f.name)
            out[f.name] = v.tolist() if f.name in lists else dict(v) if isinstance(v, dict) else v
    return out


# --------------------------------------------------------------------------- operators
def _as_operator(op: MatMat | torch.Tensor | np.ndarray, n: int | None) -> tuple[MatMat, int]:
    """An explicit symmetric matrix or a block matmat -> (float64 block matmat, n)."""
    if isinstance(op, (torch.Tensor, np.ndarray)):
        A = torch.as_tensor(op, dtype=torch.float64)
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ShapeError(f"operator has shape {tuple(A.shape)}: an explicit matrix must be square (n, n)")
        return (lambda V: V @ A.T), A.shape[0]
    if not callable(op):
        raise LrbsTypeError(
            f"operator={type(op).__name__} is not allowed: a square matrix or a matmat callable"
        )
    if n is None:
        raise ConfigError("n=None is not allowed with a matmat callable: give the operator's size n")
    return op, check_int("n", n, low=1)


def hessian_operator(obj: Any, params: Any = None) -> tuple[MatMat, torch.Tensor]:
    """The Hessian of ``obj`` at ``params`` (default: its centre) as a float64 block matmat.

    Returns:
        ``(matmat, theta)``: ``matmat(V)`` maps ``(k, n)`` or ``(n,)`` float64 to ``H V`` (float64, same
        shape, on ``V``'s device), computed with ``obj.hvp`` in the Objective's dtype on its device; ``theta``
        is the (finite) point. The estimators keep their Krylov bases and probes on the CPU (seeded CPU
        generators, the same numbers on every device); only the HVPs run on the Objective's device.

    Raises:
        ConfigError: non-finite parameters.
    """
    theta = obj.check_finite(obj.theta() if params is None else params)

    def matmat(V: torch.Tensor) -> torch.Tensor:
        return obj.hvp(theta, V.to(obj.dtype)).to(device=V.device, dtype=torch.float64)

    return matmat, theta


def _check_common(n: int, k: int, tol: float, which: str) -> tuple[int, float]:
    k = check_int("k", k, low=1)
    if k > n:
        raise ConfigError(f"k={k} is not allowed: must be <= the number of parameters ({n})")
    tol = check_positive("tol", tol)
    check_choice("which", which, WHICH)
    return k, tol


def _start_vector(n: int, init: Any, seed: int) -> torch.Tensor:
    if init is None:
        g = torch.Generator().manual_seed(seed)
        v = torch.randn(n, generator=g, dtype=torch.float64)
    else:
        v = torch.as_tensor(init).detach().to(dtype=torch.float64, device="cpu").reshape(-1).clone()
        if v.shape != (n,):
            raise ShapeError(f"init has {v.numel()} entries: must be a vector of the {n} parameters")
        if not torch.isfinite(v).all() or float(v.norm()) == 0.0:
            raise ConfigError("init must be a finite, non-zero vector")
    return v / v.norm()


def _select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the k wanted Ritz values, in output order."""
    if which == "LA":
        return np.argsort(-theta, kind="stable")[:k]
    if which == "SA":
        return np.argsort(theta, kind="stable")[:k]
    return np.argsort(-np.abs(theta), kind="stable")[:k]


# --------------------------------------------------------------------------- Lanczos
class _Lanczos:
    """Lanczos tridiagonalization with full (twice-repeated) Gram-Schmidt reorthogonalization.

    ``Q`` holds the orthonormal basis (float64, on the operator's device), ``alpha``/``beta`` the tridiagonal.
    """

    def __init__(self, matmat: MatMat, v0: torch.Tensor, max_steps: int, restart_seed: int | None):
        self.matmat = matmat
        self.n = v0.numel()
        # empty, not zeros: rows are written before they are read, and zero-filling 100 x n float64 up front
        # cost a visible part of a short first call (0.1 s of 0.3 s for a 15k-parameter model on a loaded CPU)
        self.Q = torch.empty(max_steps, self.n, dtype=torch.float64, device=v0.device)
        self.Q[0] = v0
        self.alpha: list[float] = []
        self.beta: list[float] = []  # beta[j] couples q_j and q_{j+1}
        self.num_matvecs = 0
        self.max_steps = max_steps
        self.restart = torch.Generator().manual_seed(restart_seed) if restart_seed is not None else None
        self.exhausted = False
        self.anorm = 0.0  # largest |alpha| / beta so far: the scale that breakdown is judged against

    @property
    def m(self) -> int:
        return len(self.alpha)

    def step(self) -> None:
        j = self.m
        q = self.Q[j]
        w = self.matmat(q[None])[0].to(torch.float64)
        self.num_matvecs += 1
        a = float(q @ w)
        self.alpha.append(a)
        w = w - a * q
        if j > 0:
            w = w - self.beta[j - 1] * self.Q[j - 1]
        basis = self.Q[: j + 1]
        for _ in range(2):  # "twice is enough" (Parlett)
            w = w - basis.T @ (basis @ w)
        b = float(w.norm())
        # Breakdown is judged against the operator's size seen so far (not this step's alpha alone): after a
        # restart in a (near-)null space, a step-local scale let roundoff noise be normalized up and blow up.
        self.anorm = max(self.anorm, abs(a), self.beta[j - 1] if j > 0 else 0.0)
        scale = max(self.anorm, 1e-300)
        if j + 1 >= min(self.max_steps, self.n):
            self.beta.append(b)
            self.exhausted = j + 1 >= self.n
            return
        if b <= 1e-10 * scale:
            # Invariant subspace found: exact Ritz pairs so far. Continue in a fresh direction (beta = 0
            # decouples).
            self.beta.append(0.0)
            if self.restart is None:
                self.exhausted = True
                return
            r = torch.randn(self.n, generator=self.restart, dtype=torch.float64).to(w.device)
            for _ in range(2):
                r = r - basis.T @ (basis @ r)
            self.Q[j + 1] = r / r.norm()
        else:
            self.beta.append(b)
            self.Q[j + 1] = w / b

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of T, and Ritz residuals ``|beta_m s_{m,i}|``."""
        m = self.m
        a = np.asarray(self.alpha)
        if m == 1:
            theta, S = a.copy(), np.ones((1, 1))
        else:
            theta, S = scipy.linalg.eigh_tridiagonal(a, np.asarray(self.beta[: m - 1]))
        res = np.abs(self.beta[m - 1] * S[m - 1, :])
        return theta, S, res


def _iterate(
    lz: _Lanczos, k: int, which: str, tol: float, tol_on: str, min_steps: int, max_iter: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Lanczos steps until the ``k`` wanted Ritz values meet ``tol`` (after ``max(k, min_steps)`` steps), the
    Krylov space is exhausted or ``max_iter`` steps ran.

    Returns ``(theta, S, residuals, idx, rel_residuals, error_estimates, converged)`` of the last test.
    """
    while True:
        lz.step()
        m = lz.m
        if m >= max(k, min_steps) or lz.exhausted or m >= max_iter:
            theta, S, res = lz.ritz()
            idx = _select(theta, min(k, m), which)
            floor = 1e-12 * max(float(np.abs(theta).max()), 1e-300)
            rel = res[idx] / np.maximum(np.abs(theta[idx]), floor)
            err = _value_errors(theta, res, idx)
            crit = rel if tol_on == "residual" else err / np.maximum(np.abs(theta[idx]), floor)
            converged = len(idx) == k and bool(np.all(crit <= tol))
            if converged or lz.exhausted or m >= max_iter:
                return theta, S, res, idx, rel, err, converged


def lanczos_eigenvalues(
    operator: MatMat | torch.Tensor | np.ndarray,
    n: int | None = None,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_iter: int | None = None,
    min_steps: int = 20,
    seed: int = 0,
    init: Any = None,
    return_vectors: bool = False,
    tol_on: str = "residual",
) -> EigenResult:
    """Extreme eigenvalues of a symmetric operator by Lanczos with full reorthogonalization.

    Runs the Lanczos recurrence ``A Q_m = Q_m T_m + beta_m q_{m+1} e_m^T`` and, after ``min_steps`` steps,
    stops as soon as the ``k`` wanted Ritz pairs ``(theta_i, Q_m s_i)`` of ``T_m`` have relative Ritz residual
    ``|beta_m s_{m,i}| / |theta_i| <= tol`` (the residual ``||A y_i - theta_i y_i||``; eigenvalue errors are
    ``O(residual^2 / gap)``), not PyHessian's change-in-estimate rule.

    Args:
        operator: an explicit symmetric ``(n, n)`` matrix, or ``matmat(V)`` for ``V`` of shape ``(k, n)``.
        n: the size (needed with a callable).
        k: how many eigenvalues.
        which: ``"LA"`` largest algebraic (default: a large negative eigenvalue is not "sharp"), ``"SA"``
            smallest algebraic, ``"LM"`` largest magnitude.
        tol: relative residual tolerance (> 0).
        max_iter: at most this many steps (= matvecs); default ``min(n, max(100, 20 k))``.
        min_steps: never stop before this many steps (guards against misconvergence to an inner eigenvalue).
        seed: seed of the Gaussian start vector.
        init: a start vector (warm start, e.g. the previous top eigenvector while tracking training).
        return_vectors: also return the Ritz vectors ``(k, n)``.
        tol_on: ``"residual"`` (default): stop on the relative Ritz residual, a bound that also makes the
            eigenvectors accurate; ``"value"``: stop on the estimated relative *eigenvalue* error ``min(r, r^2 /
            gap) / |theta|`` (Kato-Temple / Saad, *Numerical Methods for Large Eigenvalue Problems* Thm 3.9,
            with ``gap`` the distance to the nearest other Ritz value), which is what a tolerance on the
            eigenvalue itself (PyHessian's ``tol``) asks for and needs fewer steps.

    Returns:
        An :class:`EigenResult` (``settings`` empty).

    Raises:
        ConfigError: ``k > n``, ``tol <= 0``, unknown ``which``, bad ``max_iter``.
        ShapeError: ``init`` of the wrong size; a non-square matrix.

    References:
        Lanczos (1950); Golub & Van Loan, *Matrix Computations* (4th ed.), §10.1; Parlett, *The Symmetric
        Eigenvalue Problem* (reorthogonalization).
    """
    t0 = time.perf_counter()
    matmat, n = _as_operator(operator, n)
    k, tol = _check_common(n, k, tol, which)
    check_choice("tol_on", tol_on, ("residual", "value"))
    if max_iter is None:
        max_iter = min(n, max(100, 20 * k))
    max_iter = min(check_int("max_iter", max_iter, low=k), n)
    min_steps = min(check_int("min_steps", min_steps, low=1), max_iter)
    lz = _Lanczos(matmat, _start_vector(n, init, seed), max_iter, restart_seed=seed + 1)
    theta, S, res, idx, rel, err, converged = _iterate(lz, k, which, tol, tol_on, min_steps, max_iter)
    m = lz.m
    vectors = None
    if return_vectors:
        vectors = (torch.as_tensor(S[:, idx].T, dtype=torch.float64, device=lz.Q.device) @ lz.Q[:m]).cpu()
    return EigenResult(
        values=theta[idx].copy(),
        vectors=vectors,
        residuals=res[idx].copy(),
        rel_residuals=rel,
        converged=converged,
        num_hvps=lz.num_matvecs,
        steps=m,
        method="lanczos",
        which=which,
        tol=tol,
        seed=seed,
        wall_time=time.perf_counter() - t0,
        error_estimates=err,
        tol_on=tol_on,
    )


def _value_errors(theta: np.ndarray, res: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Eigenvalue error estimates ``min(r, r^2 / gap)`` of the selected Ritz values.

    ``|lambda - theta| <= r`` always holds for some eigenvalue; with no other eigenvalue within ``gap`` of
    ``theta`` the error is at most ``r^2 / gap`` (Kato-Temple). The gap is taken from the other Ritz values,
    which is an estimate, not a bound, while eigenvalues next to ``theta`` are still unconverged.
    """
    out = res[idx].astype(np.float64).copy()
    if len(theta) < 2:
        return out
    for j, i in enumerate(idx):
        gap = float(np.min(np.abs(np.delete(theta, i) - theta[i])))
        if gap > 0.0:
            out[j] = min(out[j], out[j] ** 2 / gap)
    return out


# --------------------------------------------------------------------------- power iteration
def _power_run(
    matmat: MatMat,
    n: int,
    k: int,
    tol: float,
    max_iter: int,
    v0: torch.Tensor,
    shift: float,
    sign: float,
    seed: int,
) -> tuple[list[float], list[torch.Tensor], list[float], int, int, bool]:
    """Power iteration on ``sign * A - shift * I``, deflated by projection onto the found vectors."""
    g = torch.Generator().manual_seed(seed + 1)
    found: list[torch.Tensor] = []
    values, residuals = [], []
    count = steps = 0
    ok = True

    def project(x: torch.Tensor) -> torch.Tensor:
        for u in found:
            x = x - (u @ x) * u
        return x

    for i in range(k):
        v = v0.clone() if i == 0 else torch.randn(n, generator=g, dtype=torch.float64)
        v = project(v)
        v = v / v.norm()
        lam, res = 0.0, math.inf
        for _ in range(max_iter):
            w = project(sign * matmat(v[None])[0].to(torch.float64) - shift * v)
            count += 1
            steps += 1
            lam = float(v @ w)
            res = float((w - lam * v).norm())
            if res <= tol * max(abs(lam + shift), 1e-300):  # relative to the unshifted eigenvalue
                break
            nw = float(w.norm())
            if nw == 0.0:  # v is in the null space of the deflated operator
                break
            v = w / nw
        else:
            ok = False
        found.append(v)
        values.append(lam)
        residuals.append(res)
    return values, found, residuals, count, steps, ok


def power_iteration(
    operator: MatMat | torch.Tensor | np.ndarray,
    n: int | None = None,
    k: int = 1,
    *,
    which: str = "LA",
    tol: float = 1e-4,
    max_iter: int = 1000,
    seed: int = 0,
    init: Any = None,
    return_vectors: bool = False,
) -> EigenResult:
    """Extreme eigenvalues by power iteration with deflation: the baseline (PyHessian's method).

    Iterates ``v <- A v / ||A v||`` with the Rayleigh quotient ``lambda = v^T A v`` and stops when the
    relative residual ``||A v - lambda v|| / |lambda| <= tol`` (the same test as :func:`lanczos_eigenvalues`).
    Further eigenpairs are found on the operator projected orthogonally to the ones already found. Power
    iteration converges to the largest *magnitude*; for ``which="LA"`` (``"SA"``) the operator is shifted by
    ``-|lambda_LM|`` so that the algebraic order is the magnitude order (this costs one extra run when the
    spectrum has large negative values). It needs about ``log(tol) / log(lambda_2 / lambda_1)`` matvecs per
    eigenpair.

    Args: as :func:`lanczos_eigenvalues`; ``max_iter`` counts iterations per eigenpair.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ConfigError / ShapeError: as :func:`lanczos_eigenvalues`.
    """
    t0 = time.perf_counter()
    matmat, n = _as_operator(operator, n)
    k, tol = _check_common(n, k, tol, which)
    max_iter = check_int("max_iter", max_iter, low=1)
    v0 = _start_vector(n, init, seed)
    sign = -1.0 if which == "SA" else 1.0
    vals, vecs, res, count, steps, ok = _power_run(
        matmat, n, 1 if which != "LM" else k, tol, max_iter, v0, 0.0, sign, seed
    )
    if which != "LM" and (k > 1 or vals[0] < 0):
        shift = -abs(vals[0])  # sign*A - shift*I is positive semi-definite: magnitude order = algebraic order
        vals, vecs, res, c2, s2, ok = _power_run(
            matmat, n, k, tol, max_iter, vecs[0] if vals[0] > 0 else v0, shift, sign, seed
        )
        vals = [v + shift for v in vals]
        count, steps = count + c2, steps + s2
    values = sign * np.asarray(vals)
    residuals = np.asarray(res)
    rel = residuals / np.maximum(np.abs(values), 1e-300)
    return EigenResult(
        values=values,
        vectors=torch.stack(vecs) if return_vectors else None,
        residuals=residuals,
        rel_residuals=rel,
        converged=ok,
        num_hvps=count,
        steps=steps,
        method="power",
        which=which,
        tol=tol,
        seed=seed,
        wall_time=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- trace
def _rademacher(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (rows, n), generator=g).to(torch.float64) * 2.0 - 1.0


#: row ``b`` holds the 8 bits of the byte ``b`` as signs (bit set: +1)
_BYTE_SIGNS = ((torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1) * 2 - 1


def _rademacher_bytes(rows: int, n: int, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Rademacher ``(rows, n)`` entries from one random byte per 8 of them (a table lookup): the same
    distribution as :func:`_rademacher` at an eighth of the random draws (3-5x faster for the data-split probes).
    :func:`_rademacher` stays for Hutch++ and the one-probe estimator: their recorded numbers (the study's
    Hutch++ trace among them) follow its stream."""
    b = torch.randint(0, 256, (rows, (n + 7) // 8), generator=g)
    return _BYTE_SIGNS.to(dtype)[b].reshape(rows, -1)[:, :n]


def hutchinson_trace(
    operator: MatMat | torch.Tensor | np.ndarray,
    n: int | None = None,
    *,
    num_matvecs: int = 100,
    block: int = 10,
    rtol: float | None = None,
    seed: int = 0,
) -> TraceResult:
    """Girard-Hutchinson trace estimate with Rademacher probes, evaluated in blocks.

    ``tr(A) ~= (1/m) sum_j z_j^T A z_j`` with ``z_j`` uniform on ``{-1, 1}^n``; its variance is ``2 (||A||_F^2
    - sum_i A_ii^2) / m``. The standard error is the sample standard deviation over ``sqrt(m)``.

    Args:
        operator: an explicit symmetric matrix or a block matmat.
        n: the size (with a callable).
        num_matvecs: the budget ``m`` (>= 2).
        block: probes per matmat call.
        rtol: optional early stop: once at least two blocks are in, stop when ``stderr <= rtol * |estimate|``
            (a confidence-interval criterion, unlike PyHessian's change of the running mean).
        seed: probe seed.

    Returns:
        A :class:`TraceResult`.

    References:
        Hutchinson (1990), Commun. Stat. Simul. Comput. 19(2); Avron & Toledo (2011), J. ACM 58(2).
    """
    t0 = time.perf_counter()
    matmat, n = _as_operator(operator, n)
    m = check_int("num_matvecs", num_matvecs, low=2)
    block = check_int("block", block, low=1)
    if rtol is not None:
        rtol = check_positive("rtol", rtol)
    g = torch.Generator().manual_seed(seed)
    samples: list[float] = []
    while len(samples) < m:
        b = min(block, m - len(samples))
        Z = _rademacher(b, n, g)
        samples.extend((Z * matmat(Z).to(torch.float64).cpu()).sum(1).tolist())
        if rtol is not None and len(samples) >= 2 * min(block, m // 2):
            mean, se = _mean_se(samples)
            if se <= rtol * abs(mean):
                break
    mean, se = _mean_se(samples)
    return TraceResult(mean, se, len(samples), "hutchinson", seed, wall_time=time.perf_counter() - t0)


def _mean_se(samples: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (``scipy.stats.sem``; inf for one sample)."""
    from scipy.stats import sem

    x = np.asarray(samples, dtype=np.float64)
    return float(x.mean()), float(sem(x)) if len(x) > 1 else math.inf


def batch_hutchinson_trace(
    batch_matmat: Callable[[torch.Tensor], torch.Tensor],
    shape: tuple[int, int],
    *,
    num_passes: int = 99,
    rtol: float = TRACE_RTOL,
    min_passes: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> TraceResult:
    """Hutchinson's estimate of ``tr(A_1 + ... + A_C)`` with an independent Rademacher probe for every term.

    ``batch_matmat(Z)`` maps ``Z`` of shape ``(C, n)`` to the rows ``A_c z_c``. One pass gives ``sum_c z_c^T A_c
    z_c``: Hutchinson's estimator of the block-diagonal ``diag(A_1, ..., A_C)``, which has the same trace, so it
    is unbiased with per-pass variance ``2 sum_c (||A_c||_F^2 - sum_i (A_c)_ii^2)`` -- ``C`` times smaller than
    one shared probe's ``2 (||sum_c A_c||_F^2 - ...)`` when the terms are alike (the Hessians of pieces of the
    data: their sum is the full-data Hessian). The standard error after ``P`` passes is ``sqrt(sum_c s_c^2 /
    P)`` with ``s_c^2`` the sample variance of term ``c`` over the passes (``C (P - 1)`` degrees of freedom, so
    the early stop is not fooled by two lucky passes as a per-pass variance would be).

    Args:
        batch_matmat: the block map (``dtype`` in, any float dtype out).
        shape: ``(C, n)``.
        num_passes: at most this many passes (>= 2).
        rtol: stop once ``stderr <= rtol |estimate|``; 0: all passes.
        min_passes: never stop before this many passes (>= 2; with 2 the standard error has ``C`` degrees of
            freedom, 40 for the default pieces of 4000 samples).
        seed: probe seed.
        dtype: of the probes (their entries are exact in any float dtype; the terms are summed in float64).

    Returns:
        A :class:`TraceResult` whose ``num_hvps`` counts passes (each ``C`` products, one full-data HVP of work).

    References:
        Hutchinson (1990); Avron & Toledo (2011), J. ACM 58(2).
    """
    t0 = time.perf_counter()
    passes = check_int("num_passes", num_passes, low=2)
    min_passes = check_int("min_passes", min_passes, low=2)
    if rtol != 0:
        check_positive("rtol", rtol)
    C, n = (check_int("shape[0]", shape[0], low=1), check_int("shape[1]", shape[1], low=1))
    g = torch.Generator().manual_seed(seed)
    terms = np.empty((passes, C))
    for p in range(passes):
        Z = _rademacher_bytes(C, n, g, dtype)
        rows = batch_matmat(Z).cpu()
        terms[p] = (
            (Z * rows.to(dtype)).sum(1, dtype=torch.float64).numpy()
        )  # products of +-1: exact in any dtype
        mean, se = _split_mean_se(terms[: p + 1])
        if p + 1 >= min_passes and se <= rtol * abs(mean):
            break
    return TraceResult(mean, se, p + 1, "hutchinson", seed, wall_time=time.perf_counter() - t0)


def _split_mean_se(terms: np.ndarray) -> tuple[float, float]:
    """Mean over passes of the summed terms, and its standard error from each term's variance over passes."""
    mean = float(terms.sum(1).mean())
    if len(terms) < 2:
        return mean, math.inf
    return mean, float(math.sqrt(terms.var(axis=0, ddof=1).sum() / len(terms)))


def hutchpp_trace(
    operator: MatMat | torch.Tensor | np.ndarray,
    n: int | None = None,
    *,
    num_matvecs: int = 99,
    seed: int = 0,
) -> TraceResult:
    """Hutch++ trace estimate: an exact trace on a sketched top subspace plus Hutchinson on the rest.

    With ``s = m // 3`` sketch probes ``S`` and ``g = m - 2 s`` residual probes ``G`` (Rademacher), ``Q =
    orth(A S)``, ``tr(A) ~= tr(Q^T A Q) + (1/g) tr(G^T P A P G)`` with ``P = I - Q Q^T``. For PSD ``A`` this
    needs ``O(1/eps)`` matvecs for relative error ``eps`` instead of Hutchinson's ``O(1/eps^2)``. The reported
    standard error is that of the residual Hutchinson part given the sketch.

    Args:
        operator: an explicit symmetric matrix or a block matmat.
        n: the size (with a callable).
        num_matvecs: the budget ``m`` (>= 3); split into thirds.
        seed: probe seed.

    Returns:
        A :class:`TraceResult`.

    References:
        Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", SOSA 2021 (arXiv
        2010.09649), Algorithm 1.
    """
    t0 = time.perf_counter()
    matmat, n = _as_operator(operator, n)
    m = check_int("num_matvecs", num_matvecs, low=3)
    g = torch.Generator().manual_seed(seed)
    s = min(m // 3, n)
    S = _rademacher(s, n, g)
    Y = matmat(S).to(torch.float64).cpu()
    Q, _ = torch.linalg.qr(Y.T)  # (n, s), orthonormal columns
    AQ = matmat(Q.T.contiguous()).to(torch.float64).cpu()
    low_rank = float((Q.T * AQ).sum())
    r = m - 2 * s
    G = _rademacher(r, n, g)
    G = G - (G @ Q) @ Q.T
    samples = (G * matmat(G).to(torch.float64).cpu()).sum(1).tolist()
    mean, se = _mean_se(samples) if r > 1 else (float(samples[0]) if r == 1 else 0.0, math.inf if r else 0.0)
    return TraceResult(low_rank + mean, se, 2 * s + r, "hutch++", seed, wall_time=time.perf_counter() - t0)


# --------------------------------------------------------------------------- spectral density
def _slq_quadrature(
    matmat: MatMat, n: int, runs: int, steps: int, g: torch.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """``(nodes, weights, matvecs)`` of ``runs`` Lanczos quadratures of ``steps`` steps from unit Rademacher
    starts (NaN-padded nodes and zero weights where a run ended early)."""
    nodes = np.full((runs, steps), np.nan)
    weights = np.zeros((runs, steps))
    count = 0
    for r in range(runs):
        v = _rademacher(1, n, g)[0] / math.sqrt(n)
        lz = _Lanczos(matmat, v, steps, restart_seed=None)
        while lz.m < steps and not lz.exhausted:
            lz.step()
        count += lz.num_matvecs
        theta, S, _ = lz.ritz()
        nodes[r, : lz.m] = theta
        weights[r, : lz.m] = S[0, :] ** 2
    return nodes, weights, count


def _density_grid(grid: Any, lo: float, hi: float, sigma: float) -> np.ndarray:
    """The density's grid: ``grid`` points (default ~8 per ``sigma``, 1000 to 200000) over ``[lo - 6 sigma, hi +
    6 sigma]``, or the given increasing, finite points."""
    if grid is None or isinstance(grid, (int, np.integer)):
        span = (hi - lo) + 12 * sigma
        points = (
            check_int("grid", grid, low=2)
            if grid is not None
            else int(min(max(1000, 8 * span / sigma), 200_000))
        )
        return np.linspace(lo - 6 * sigma, hi + 6 * sigma, points)
    t = np.asarray(grid, dtype=np.float64).reshape(-1)
    if t.size < 2 or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise ConfigError("grid must be an int >= 2 or an increasing, finite sequence of at least 2 points")
    return t


def _smoothed_density(t: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    """``phi(t) = (1/R) sum_runs sum_i w_i N(t; theta_i, sigma^2)`` over the finite nodes."""
    ok = np.isfinite(nodes)
    th, w = nodes[ok], weights[ok]
    density = np.zeros_like(t)
    for c in range(0, th.size, 256):  # bounded memory: (G, 256) at a time
        d = (t[:, None] - th[None, c : c + 256]) / sigma
        density += (np.exp(-0.5 * d * d) * w[None, c : c + 256]).sum(1)
    density /= nodes.shape[0] * sigma * math.sqrt(2 * math.pi)
    return density


def slq_density(
    operator: MatMat | torch.Tensor | np.ndarray,
    n: int | None = None,
    *,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    grid: int | Sequence[float] | np.ndarray | None = None,
    sigma: float | None = None,
    seed: int = 0,
) -> SpectralDensity:
    """Spectral density by stochastic Lanczos quadrature (SLQ), smoothed with a Gaussian.

    For each run a unit Rademacher vector ``v`` starts ``m`` Lanczos steps (full reorthogonalization); the
    Ritz values ``theta_i`` and weights ``w_i = s_{1,i}^2`` (squared first components of the eigenvectors of
    ``T_m``) form a Gauss quadrature of the spectral measure ``v^T delta(A - t) v``, whose expectation is
    ``(1/n) sum_j delta(lambda_j - t)``. The density is ``phi(t) = (1/R) sum_runs sum_i w_i N(t; theta_i,
    sigma^2)``.

    Args:
        operator: an explicit symmetric matrix or a block matmat.
        n: the size (with a callable).
        num_runs: independent start vectors ``R``.
        lanczos_steps: steps per run ``m`` (capped at ``n``).
        grid: number of grid points, or the grid itself; default: enough points for ~8 per ``sigma`` over
            ``[min theta - 6 sigma, max theta + 6 sigma]`` (at least 1000).
        sigma: smoothing width; default ``(max theta - min theta) / m`` (eigenthings' choice).
        seed: probe seed.

    Returns:
        A :class:`SpectralDensity`.

    References:
        Ghorbani, Krishnan & Xiao, "An Investigation into Neural Net Optimization via Hessian Eigenvalue
        Density", ICML 2019 (arXiv 1901.10159); Lin, Saad & Yang, SIAM Review 58(1), 2016.
    """
    t0 = time.perf_counter()
    matmat, n = _as_operator(operator, n)
    runs = check_int("num_runs", num_runs, low=1)
    steps = min(check_int("lanczos_steps", lanczos_steps, low=1), n)
    if sigma is not None:
        sigma = check_positive("sigma", sigma)
    nodes, weights, count = _slq_quadrature(matmat, n, runs, steps, torch.Generator().manual_seed(seed))
    lo, hi = float(np.nanmin(nodes)), float(np.nanmax(nodes))
    if sigma is None:
        sigma = max(hi - lo, 1e-6 * max(1.0, abs(lo), abs(hi))) / steps
    t = _density_grid(grid, lo, hi, sigma)
    density = _smoothed_density(t, nodes, weights, sigma)
    negative = float((weights * (np.nan_to_num(nodes, nan=0.0) < 0)).sum() / runs)
    return SpectralDensity(
        grid=t,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        negative_mass=negative,
        num_runs=runs,
        lanczos_steps=steps,
        num_hvps=count,
        seed=seed,
        wall_time=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- on the Objective
def _with_settings(result: Any, obj: Any, t0: float, **extra: Any) -> Any:
    import dataclasses

    # the Objective's settings record which HVP ran; the device is added where they do not name it
    settings = {"hvp_method": obj.hvp_method, "device": str(obj.device), **obj.settings(), **extra}
    return dataclasses.replace(result, settings=settings, wall_time=time.perf_counter() - t0)


def hessian_eigenvalues(
    obj: Any,
    k: int = 1,
    *,
    method: str = "lanczos",
    which: str = "LA",
    tol: float | None = None,
    max_iter: int | None = None,
    min_steps: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    init: Any = "auto",
    params: Any = None,
    tol_on: str | None = None,
) -> EigenResult:
    """Top-``k`` eigenvalues of the Hessian of the full-data loss of ``obj``.

    ``H = nabla^2 L(theta)`` with ``L`` the sample-weighted mean loss over the Objective's fixed batches,
    applied through ``obj.hvp``; the model itself is never touched. ``which="LA"`` (default) gives the largest
    *algebraic* eigenvalues: ``lambda_max`` is the curvature that limits the step size (``eta lambda_max < 2``).
    The defaults deliver a relative eigenvalue error of about ``1e-3`` in a few HVPs (measured against
    PyHessian's defaults: :func:`eigen_tolerance`); ask for ``tol_on="residual"`` to certify the value.

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        k: number of eigenvalues (``<= obj.num_params``).
        method: ``"lanczos"`` (full reorthogonalization, Ritz-residual stop) or ``"power"`` (the baseline).
        which: ``"LA"``, ``"SA"`` or ``"LM"`` (see :func:`lanczos_eigenvalues`).
        tol: relative tolerance on the estimated eigenvalue error (``tol_on="value"``, see
            :func:`lanczos_eigenvalues`) or on the residual ``||H v - lambda v|| / |lambda|``
            (``tol_on="residual"``); default :data:`VALUE_TOL` (``1e-3``) on the value, :data:`RESIDUAL_TOL`
            (``1e-4``) on the residual.
        max_iter: Lanczos steps (default ``min(n, max(100, 20 k))``) or power iterations per pair (default
            1000).
        min_steps: Lanczos steps before the test may stop it; default ``k + 2`` with ``tol_on="value"`` (speed at
            a stated accuracy), 20 with ``tol_on="residual"``, and ``k`` from a warm start vector ``init``.
        seed: seed of the random part of the start vector.
        return_vectors: also return the eigenvectors ``(k, n)``.
        init: the start vector. ``"auto"`` (default): ``"gradient"`` for ``which="LA"``/``"LM"``, ``"random"``
            for ``"SA"``; ``"gradient"``: the normalized full-data gradient plus an equally weighted random unit
            vector (the gradient lies mostly in the top Hessian eigenspace, Gur-Ari et al. 2018, so this saves
            steps; the random half guards against a start orthogonal to the top eigenvector; it costs no extra
            work with the reverse-over-reverse HVP, whose graph holds the gradient); ``"random"``: Gaussian; or
            a warm-start vector (flat, ``(n,)``), e.g. the previous top eigenvector. At a stationary point the
            gradient start falls back to random. ``settings["start"]`` records what was used.
        params: the point (dict or flat vector); default the Objective's centre.
        tol_on: ``"value"`` (Lanczos only) or ``"residual"``; default ``"value"`` for eigenvalues alone,
            ``"residual"`` with ``return_vectors=True`` or ``method="power"`` (see :func:`eigen_tolerance`).

    Returns:
        An :class:`EigenResult` whose ``settings`` record the Objective's (bn mode, dtype, data fingerprint,
        ...).

    Raises:
        ConfigError: ``k > n``, ``tol <= 0``, unknown ``method``/``which``/``tol_on``, ``tol_on="value"`` with
            ``method="power"``, non-finite parameters.
        ShapeError: ``init`` of the wrong size.


    References:
        Yao et al., "PyHessian", arXiv 1912.07145; Ghorbani et al. 2019, arXiv 1901.10159.
    """
    t0 = time.perf_counter()
    check_choice("method", method, ("lanczos", "power"))
    tol_on, tol = eigen_tolerance(method, tol_on, tol, return_vectors)
    matmat, theta = hessian_operator(obj, params)
    n = obj.num_params
    _check_common(n, k, tol, which)  # before any work
    given = not isinstance(init, str)
    init, start = _hessian_start(obj, theta, init, which, seed)
    if method == "lanczos" and min_steps is None:
        min_steps = k if given else (k + 2 if tol_on == "value" else 20)
    opts = {"which": which, "tol": tol, "seed": seed, "init": init, "return_vectors": return_vectors}
    if method == "lanczos":
        res = lanczos_eigenvalues(matmat, n, k, max_iter=max_iter, min_steps=min_steps, tol_on=tol_on, **opts)
    else:
        res = power_iteration(matmat, n, k, max_iter=1000 if max_iter is None else max_iter, **opts)
    return _with_settings(res, obj, t0, start=start)


def eigen_tolerance(
    method: str, tol_on: str | None, tol: float | None, return_vectors: bool
) -> tuple[str, float]:
    """The stopping test of :func:`hessian_eigenvalues` after its defaults: ``(tol_on, tol)``.

    ``tol_on=None`` is ``"value"`` for Lanczos eigenvalues alone, and ``"residual"`` when the eigenvectors are
    returned or with ``method="power"`` (a small residual is what makes a vector accurate; power iteration has
    no other test). ``tol=None`` is :data:`VALUE_TOL` (``1e-3``) on the value and :data:`RESIDUAL_TOL`
    (``1e-4``) on the residual.

    **What the defaults deliver.** ``hessian_eigenvalues(obj)`` runs Lanczos from the gradient start and stops
    once the estimated relative eigenvalue error ``min(r, r^2 / gap) / |theta| <= 1e-3`` (PyHessian's
    ``eigenvalues()`` asks for ``tol=1e-3`` on the change of its power-iteration estimate, whose true error is
    larger). Measured on the trained MNIST-1D models of ``bench/bench_curvature.py`` (4000 samples, 2026-12-01):
    mlp (``lambda_2 / lambda_1 = 0.96``) 4 HVPs, true relative error 1.5e-3 (1.5-1.9e-3 over start seeds;
    PyHessian's defaults: 12 HVPs on average, median error 9.1e-3, 5.7e-3 to 2.0e-2); cnn1d 3 HVPs, 2.9e-4
    (PyHessian: 6.8 HVPs, median 8.7e-4, 3.8e-4 to 1.2e-3). The
    estimate takes the gap from the other Ritz values, which overstates the true gap while they are
    unconverged, so with close top eigenvalues the true error can exceed ``tol`` a few times (mlp: 1.5x).
    Ask for ``tol_on="residual"`` (and a smaller ``tol``) when the value must be certified: a residual ``r``
    bounds the error by ``r`` (and by ``r^2 / gap`` with the true gap). With ``return_vectors=True`` the
    default is that residual test at ``1e-4``, which also makes the vectors accurate.

    Raises:
        ConfigError: an unknown ``tol_on``, or ``tol_on="value"`` with ``method="power"``.
    """
    if tol_on is None:
        tol_on = "residual" if (method == "power" or return_vectors) else "value"
    check_choice("tol_on", tol_on, ("residual", "value"))
    if method == "power" and tol_on != "residual":
        raise ConfigError(f"tol_on={tol_on!r} is not allowed with method='power': only with 'lanczos'")
    if tol is None:
        tol = VALUE_TOL if tol_on == "value" else RESIDUAL_TOL
    return tol_on, tol


def _hessian_start(obj: Any, theta: torch.Tensor, init: Any, which: str, seed: int) -> tuple[Any, str]:
    """Resolve ``init`` of :func:`hessian_eigenvalues` to ``(vector or None, what it was)``."""
    if not isinstance(init, str):
        return init, "given" if init is not None else "random"
    check_choice("init", init, ("auto", "gradient", "random"))
    if init == "random" or (init == "auto" and which == "SA"):
        return None, "random"
    g = obj.hvp_gradient(theta).detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    gn = float(g.norm())
    if not math.isfinite(gn) or gn == 0.0:
        return None, "random (zero gradient)"
    r = _start_vector(g.numel(), None, seed)
    return g / gn + r, "gradient+random"


def hessian_trace(
    obj: Any,
    *,
    method: str = "hutchinson",
    num_hvps: int = 99,
    seed: int = 0,
    rtol: float | None = None,
    probe_samples: int | None = PROBE_SAMPLES,
    params: Any = None,
) -> TraceResult:
    """Trace of the Hessian of the full-data loss: data-split Hutchinson (default) or Hutch++.

    **The default** draws one Rademacher probe per piece of ``probe_samples`` samples
    (:func:`batch_hutchinson_trace` on :meth:`Objective.rebatched <lrbs.objective.Objective.rebatched>`): one
    pass over the data -- the work of one full-data HVP, the pieces multiplied together on stacked parameter
    copies when they fit (``settings["batch_hvp_block"]``) -- averages many independent probes; it stops after at
    least 2 passes once the standard error is within ``rtol = TRACE_RTOL`` (4%) of the estimate. On the trained
    MNIST-1D mlp / cnn1d of ``bench/bench_curvature.py`` a pass has a relative sd of 4.3-4.6% / 9.1% against
    12.5% / 22.3% for one probe on all the data (smaller pieces gain little more: the samples' Hessians differ),
    and the default's RMS error was 2.8% (2 passes) / 4.3% (4 passes) against 3.5% / 6.1% for PyHessian's
    ``trace()`` default after its 14-22 HVPs (times: bench/RESULTS.md).
    A trace near zero against the probe noise (an indefinite Hessian, at initialization) runs the whole budget;
    ``stderr`` says how well it is known. ``probe_samples=None``: one probe for all the data (the classic
    estimator); with ``bn="train"`` the Objective's batches are the pieces. ``method="hutch++"`` spends
    ``num_hvps`` full-data HVPs on Hutch++ (its low-rank sketch pays at tight accuracy on decaying spectra).

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        method: ``"hutchinson"`` or ``"hutch++"``.
        num_hvps: the budget in full-data HVPs (Hutchinson: passes, at most).
        seed: probe seed.
        rtol: Hutchinson only: stop once ``stderr <= rtol |estimate|`` (default ``TRACE_RTOL``; 0 spends the
            whole budget).
        probe_samples: Hutchinson only: samples sharing one probe (None: one probe for all the data).
        params: the point; default the Objective's centre.

    Returns:
        A :class:`TraceResult` (value, standard error, HVPs, settings with ``probe_samples`` and ``probes``).

    Raises:
        ConfigError: unknown method, a budget too small, ``rtol`` or ``probe_samples`` with Hutch++,
            non-finite parameters.

    References:
        Hutchinson (1990); Meyer et al., arXiv 2010.09649; Yao et al., arXiv 1912.07145 (Hessian trace of
        networks).
    """
    t0 = time.perf_counter()
    check_choice("method", method, ("hutch++", "hutchinson"))
    if method == "hutch++":
        if rtol is not None:
            raise ConfigError(f"rtol={rtol!r} is not allowed with method='hutch++': only with 'hutchinson'")
        if probe_samples != PROBE_SAMPLES:
            raise ConfigError(
                f"probe_samples={probe_samples!r} is not allowed with method='hutch++': only with 'hutchinson'"
            )
        matmat, _ = hessian_operator(obj, params)
        return _with_settings(hutchpp_trace(matmat, obj.num_params, num_matvecs=num_hvps, seed=seed), obj, t0)
    num_hvps = check_int("num_hvps", num_hvps, low=2)
    rtol = TRACE_RTOL if rtol is None else (0.0 if rtol == 0 else check_positive("rtol", rtol))
    if probe_samples is None:
        matmat, _ = hessian_operator(obj, params)
        res = hutchinson_trace(matmat, obj.num_params, num_matvecs=num_hvps, seed=seed, rtol=rtol or None)
        return _with_settings(res, obj, t0, probe_samples=None, probes=res.num_hvps)
    probe_samples = check_int("probe_samples", probe_samples, low=1)
    split = obj if obj.bn == "train" else obj.rebatched(probe_samples)
    theta = split.check_finite(split.theta() if params is None else params)
    shape = (len(split.batches), split.num_params)
    mm = lambda V: split.batch_hvp(theta, V)  # noqa: E731
    res = batch_hutchinson_trace(mm, shape, num_passes=num_hvps, rtol=rtol, seed=seed, dtype=split.dtype)
    obj.hvp_method = obj.hvp_method or split.hvp_method
    extra = {"batch_hvp_block": split.batch_hvp_block or "loop"}
    if split.fallbacks:
        extra["fallbacks"] = {**obj.fallbacks, **split.fallbacks}
    return _with_settings(res, obj, t0, probe_samples=probe_samples, probes=res.num_hvps * shape[0], **extra)


def spectral_density(
    obj: Any,
    *,
    num_runs: int = 10,
    lanczos_steps: int = 80,
    grid: int | Sequence[float] | np.ndarray | None = None,
    sigma: float | None = None,
    seed: int = 0,
    params: Any = None,
) -> SpectralDensity:
    """Hessian eigenvalue density of the full-data loss by stochastic Lanczos quadrature (see
    :func:`slq_density`).

    Args:
        obj: an :class:`~lrbs.objective.Objective`.
        num_runs, lanczos_steps, grid, sigma, seed: as :func:`slq_density`.
        params: the point; default the Objective's centre.

    Returns:
        A :class:`SpectralDensity` with ``negative_mass`` and ``plot(log=...)``.

    Raises:
        ConfigError: bad sizes, ``sigma <= 0``, a bad grid, non-finite parameters.

    References:
        Ghorbani et al., arXiv 1901.10159; Yao et al., arXiv 1912.07145.
    """
    t0 = time.perf_counter()
    matmat, _ = hessian_operator(obj, params)
    res = slq_density(
        matmat,
        obj.num_params,
        num_runs=num_runs,
        lanczos_steps=lanczos_steps,
        grid=grid,
        sigma=sigma,
        seed=seed,
    )
    return _with_settings(res, obj, t0)
