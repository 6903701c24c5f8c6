r"""What the framework callbacks measure, with no framework in sight: noise scale, sharpness, stability.

The HuggingFace and Lightning glue (:mod:`lrbs.integrations.transformers`, :mod:`lrbs.integrations.lightning`)
only decide *when* to call what lives here and *where* the numbers go. Everything here is plain PyTorch.

**Free noise scale from micro-batches.** Under gradient accumulation a step's gradient is the sum of one
contribution :math:`c_i = s_i g_i` per backward pass, where :math:`g_i` is micro-batch :math:`i`'s own (mean)
gradient on :math:`B_i` samples and :math:`s_i` the share the framework gave it (``1/k`` when each loss is divided
by the accumulation count; :math:`n_i / \sum_j n_j` when the loss is normalised by the items of the whole
accumulated batch, as HF does for language models). :class:`GradCapture` reads :math:`|c_i|^2` with one tensor
hook per backward (:func:`torch.autograd.graph.register_multi_grad_hook`: the gradients of that backward, before
they are added to ``.grad``), and the accumulated :math:`|\sum_i c_i|^2` before clipping. All micro-batches of a
step see the same weights, which is what the estimator of McCandlish et al. (2018, App. A) needs. With
:math:`c(B) = (N - B) / (B (N - 1))` for micro-batches drawn without replacement from :math:`N` samples
(:math:`1/B` when :math:`N` is unknown) and :math:`S = \sum_i s_i`:

.. math::

    \mathbb E\,\overline{|g_i|^2} = |G|^2 + \overline{c(B_i)}\,\operatorname{tr}\Sigma, \qquad
    \mathbb E\,\Big|\sum_i s_i g_i\Big|^2 = S^2 |G|^2
        + \Big(\sum_i s_i^2 c(B_i) - \frac{S^2 - \sum_i s_i^2}{N - 1}\Big)\operatorname{tr}\Sigma,

(the last term is the negative covariance of disjoint draws), two linear equations solved by :func:`micro_estimate`
for :math:`|G|^2` and :math:`\operatorname{tr}\Sigma`. With equal shares and sizes it is exactly
:func:`lrbs.noise_scale`'s two-batch-size estimator with :math:`B_s = B` and :math:`B_b = kB`. Under data parallelism
(DDP on :math:`W` ranks) the micro-batches of every rank count and the big gradient is the all-reduced one, the mean
over ranks (a micro-batch's share in it is :math:`s_i / W`): the tensor hooks fire with each rank's *local*
gradient (before DDP's reducer, which runs on the accumulated ``.grad``), the total is read after DDP has written
the mean, and :func:`micro_sums` of every rank are summed by one ``all_reduce`` of 6 float64 numbers per step
(:func:`sum_over_ranks`), so :math:`B_b = kWB`.

The captured gradients are the training gradients themselves (train mode: dropout's noise is part of them);
the probe (:func:`probe_estimates`, when there is no accumulation) and the sharpness run on a private copy in
eval mode (no dropout), like every :class:`~lrbs.Objective` analysis.

**B_simple over a window.** Single-step estimates are noisy and can be negative. :class:`NoiseWindow` keeps the
last ``window`` of them and reports the ratio of their means, :math:`B_\text{simple} = \overline{\operatorname{tr}
\Sigma} / \overline{|G|^2}` (never a mean of ratios), with a percentile-bootstrap interval over the estimates. The
weights move between steps, so it describes the recent stretch of training, not one point.

**Adam.** McCandlish et al. derive ``B_simple`` for SGD: it is a property of the raw gradient's distribution
(:math:`\operatorname{tr}\Sigma/|G|^2`), and that is what lrbs measures whatever the optimizer. lrbs does *not*
fold in Adam's preconditioner :math:`P = \operatorname{diag}(\sqrt{\hat v}) + \epsilon` (the update's own noise
scale would be :math:`\operatorname{tr}(P^{-1}\Sigma P^{-1}) / |P^{-1}G|^2`); under Adam read ``B_simple`` as the
batch size at which the gradient's noise and signal are comparable, a guide to the critical batch rather than a
prediction of Adam's optimal step.

**Sharpness and the edge of stability.** :func:`sharpness` is :func:`lrbs.hessian_eigenvalues` on a fresh
:class:`~lrbs.Objective` built from the live model and a fixed, seeded list of batches (a private copy: the live
model, its optimizer and the random state are untouched). :func:`stability_threshold` gives the value of
``lr * lambda_max`` above which the optimizer diverges on a quadratic with that curvature (Cohen et al. 2021):
``2`` for plain SGD; ``2 (1 + beta) / (1 - d)`` for torch's heavy-ball SGD with momentum ``beta`` and dampening
``d``; ``2 (1 + beta) / (1 + 2 beta)`` with Nesterov. (An EMA-style momentum ``m = beta m + (1 - beta) g``, as in
Adam's first moment, would give ``2 (1 + beta) / (1 - beta)``.) For Adam-type optimizers the bound holds for the
*preconditioned* sharpness :math:`\lambda_\max(P^{-1}H)` (Cohen et al. 2022), not for the raw Hessian's, so no
threshold is given: ``lr * lambda_max`` is logged as a number to follow, not to compare with 2.

References:
    McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162).
    Cohen, Kaur, Li, Kolter & Talwalkar, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
    Stability", ICLR 2021 (arXiv 2103.00065); Cohen et al., "Adaptive Gradient Methods at the Edge of
    Stability", 2022 (arXiv 2207.14484).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._util import jsonable
from ..errors import ConfigError, DependencyError

__all__ = [
    "METRICS",
    "MeasurementWarning",
    "require",
    "protected_rng",
    "guarded",
    "micro_estimate",
    "micro_sums",
    "solve_micro",
    "sum_over_ranks",
    "finite_c",
    "NoiseWindow",
    "NoiseSummary",
    "GradCapture",
    "squared_norm",
    "host_floats",
    "probe_estimates",
    "sharpness",
    "stability_threshold",
    "trainable_parameters",
    "size_or_none",
    "current_lr",
    "recommended_lr",
    "check_every",
]

#: The names under which the callbacks log, in the frameworks' loggers.
METRICS = {
    "b_simple": "lrbs/b_simple",
    "b_simple_low": "lrbs/b_simple_low",
    "b_simple_high": "lrbs/b_simple_high",
    "grad_sq": "lrbs/grad_sq",
    "trace_sigma": "lrbs/trace_sigma",
    "lambda_max": "lrbs/lambda_max",
    "lambda_max_x_lr": "lrbs/lambda_max_x_lr",
    "eos_threshold": "lrbs/eos_threshold",
    "probe_seconds": "lrbs/probe_seconds",
}


class MeasurementWarning(UserWarning):
    """A measurement failed (the reason is in the message); training went on without it."""


# --------------------------------------------------------------------------------------------- dependencies
def _version_tuple(text: str) -> tuple:
    from packaging.version import Version

    return Version(text).release


def require(module: str, minimum: str, extra: str) -> Any:
    """Import ``module`` and check that its ``__version__`` is at least ``minimum``.

    Raises:
        DependencyError: the module is missing (with the ``pip install lrbs[extra]`` hint) or older than
            ``minimum`` (naming the version found and the one needed).
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise DependencyError(
            f"lrbs.integrations.{extra} needs {module} >= {minimum}, which is not installed ({e}): "
            f"pip install 'lrbs[{extra}]'"
        ) from e
    found = str(getattr(mod, "__version__", "0"))
    try:
        too_old = _version_tuple(found) < _version_tuple(minimum)
    except Exception:  # an unparsable version string: say so rather than guess
        too_old = True
    if too_old:
        raise DependencyError(
            f"lrbs.integrations.{extra} needs {module} >= {minimum}, found {module} {found}: "
            f"pip install -U 'lrbs[{extra}]'"
        )
    return mod


# --------------------------------------------------------------------------------------------- safety
@contextlib.contextmanager
def protected_rng(device: torch.device | None = None) -> Iterator[None]:
    """Run a block with the torch (CPU and ``device``), numpy and python random states saved and restored."""
    devices = [device] if device is not None and device.type == "cuda" else []
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def guarded(what: str, step: int, fn: Callable[[], Any]) -> Any:
    """``fn()``, or None after a :class:`MeasurementWarning` naming ``what``, the step and the reason."""
    try:
        return fn()
    except Exception as e:  # a failed measurement must never end a training run
        warnings.warn(
            f"lrbs: {what} at step {step} failed ({type(e).__name__}: {e}); training goes on without it",
            MeasurementWarning,
            stacklevel=2,
        )
        return None


def size_or_none(batch: Any) -> int | None:
    """The batch's sample count (:func:`lrbs.batches.batch_size_of`), or None where it cannot be read.

    A dict whose first tensor comes before any nested container (the usual keyword batch) is read directly: the
    same first tensor as :func:`~lrbs.batches.batch_tensors`'s depth-first order, without walking the whole batch.
    """
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor):
                return int(v.shape[0]) if v.dim() else 1
            if isinstance(v, (Mapping, tuple, list)):
                break  # a nested container first: the general rule below
    from ..batches import batch_size_of

    try:
        return batch_size_of(batch)
    except Exception:  # an exotic batch must not break the training step; the estimate is skipped instead
        return None


def trainable_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    """The parameters with ``requires_grad``; ConfigError when there are none."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(
            f"the model ({type(model).__name__}) has no trainable parameters (all requires_grad=False): there is "
            "no gradient to measure; unfreeze some parameters or leave noise_scale=False and sharpness_every=None"
        )
    return params


# --------------------------------------------------------------------------------------------- the estimator
def finite_c(batch: float, num_samples: int | None) -> float:
    """``c(B) = (N - B) / (B (N - 1))``: variance factor of a mean of ``B`` draws without replacement (``1/B``
    for an unknown or infinite ``N``)."""
    if num_samples is None or num_samples <= 1 or batch >= num_samples:
        return 1.0 / batch
    return (num_samples - batch) / (batch * (num_samples - 1))


def micro_sums(
    micro_sq: Sequence[float],
    sizes: Sequence[float],
    shares: Sequence[float],
    *,
    num_samples: int | None = None,
) -> np.ndarray:
    r"""The six sums of one rank's step that :func:`solve_micro` needs (summed over ranks under data parallelism).

    ``[sum |g_i|^2, sum c(B_i), k, sum s_i, sum s_i^2, sum s_i^2 c(B_i)]`` with :math:`|g_i|^2 = |c_i|^2 / s_i^2`
    (arguments as :func:`micro_estimate`).

    Raises:
        ConfigError: lengths that differ, or a share or size <= 0.
    """
    k = len(micro_sq)
    if len(sizes) != k or len(shares) != k:
        raise ConfigError(
            f"micro_sq, sizes and shares have lengths {k}, {len(sizes)}, {len(shares)}: must match"
        )
    if any(s <= 0 for s in shares) or any(b <= 0 for b in sizes):
        raise ConfigError(f"shares {list(shares)} and sizes {list(sizes)} must all be > 0")
    g = cs = total = s2 = s2c = 0  # one pass; each sum accumulated left to right, as sum() does
    for m, b, s in zip(micro_sq, sizes, shares):
        c, ss = finite_c(b, num_samples), s * s
        g, cs, total, s2, s2c = g + m / ss, cs + c, total + s, s2 + ss, s2c + ss * c  # g: sum |g_i|^2
    return np.array([g, cs, float(k), total, s2, s2c], dtype=np.float64)


def solve_micro(
    sums: np.ndarray, total_sq: float, *, num_samples: int | None = None, world: int = 1
) -> tuple[float, float]:
    r"""``(|G|^2, tr Sigma)`` from :func:`micro_sums` (summed over ``world`` ranks) and the step's
    :math:`|\sum c|^2`: the two equations of the module docstring. NaN sums (a rank that could not read its
    step) give ``(nan, nan)``.

    Raises:
        ConfigError: fewer than 2 micro-batches in all, or sizes that leave the two equations degenerate.
    """
    v = np.asarray(sums, dtype=np.float64).tolist()  # Python floats: the same IEEE arithmetic, faster
    if not all(math.isfinite(x) for x in v):
        return math.nan, math.nan
    n = v[2]
    if n < 2:
        raise ConfigError(f"{int(n)} micro-batch gradient(s) at this step: the estimate needs at least 2")
    m1, b1 = v[0] / n, v[1] / n
    s_tot, s2, s2c = v[3] / world, v[4] / world**2, v[5] / world**2
    cross = (s_tot**2 - s2) / (num_samples - 1) if num_samples and num_samples > 1 else 0.0
    b2 = s2c - cross
    det = b2 - s_tot**2 * b1
    if not det < 0:
        raise ConfigError(
            f"micro-batches with sums {v} give one batch size only: the noise scale needs the "
            "micro-batches and their sum to differ in size"
        )
    trace = (float(total_sq) - s_tot**2 * m1) / det
    return float(m1 - b1 * trace), float(trace)


def micro_estimate(
    micro_sq: Sequence[float],
    sizes: Sequence[float],
    shares: Sequence[float],
    total_sq: float,
    *,
    num_samples: int | None = None,
    all_reduce: Callable[[np.ndarray], tuple[np.ndarray, int]] | None = None,
) -> tuple[float, float]:
    r"""One step's unbiased ``(|G|^2, tr Sigma)`` from its micro-batch contributions (module docstring):
    :func:`solve_micro` of the (all-reduced) :func:`micro_sums`.

    Args:
        micro_sq: :math:`|c_i|^2`, the squared norm of each backward's contribution (``k >= 1`` per rank,
            at least 2 in all).
        sizes: :math:`B_i`, samples per micro-batch.
        shares: :math:`s_i`, the factor the micro-batch's mean gradient entered this rank's accumulated gradient
            with (the all-reduced gradient is the mean over ranks, so its share in the total is :math:`s_i / W`).
        total_sq: :math:`|\sum_i c_i|^2` (under data parallelism: of the all-reduced gradient).
        num_samples: :math:`N` for the finite-population factor (None: :math:`1/B`).
        all_reduce: sums a float64 vector over the data-parallel ranks and returns it with the world size
            (:func:`sum_over_ranks`).

    Raises:
        ConfigError: fewer than 2 micro-batches, lengths that differ, a share or size <= 0, or sizes that leave
            the two equations degenerate.
    """
    sums = micro_sums(micro_sq, sizes, shares, num_samples=num_samples)
    world = 1
    if all_reduce is not None:
        sums, world = all_reduce(sums)
    return solve_micro(sums, total_sq, num_samples=num_samples, world=world)


def sum_over_ranks(world: int) -> Callable[[np.ndarray], tuple[np.ndarray, int]] | None:
    """A function that sums a float64 vector over the default process group (one blocking ``all_reduce`` of that
    small tensor: a collective's latency, tens of microseconds with NCCL, ~0.1 ms with gloo) and returns it with
    the world size; None on one process or without an initialised process group."""
    if world <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return None

    def reduce(sums: np.ndarray) -> tuple[np.ndarray, int]:
        t = torch.from_numpy(sums.copy())
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return t.cpu().numpy(), torch.distributed.get_world_size()

    return reduce


@dataclass(frozen=True)
class NoiseSummary:
    """``B_simple`` over the last estimates (ratio of means) with its bootstrap interval.

    Attributes:
        b_simple: ``mean(tr Sigma) / mean(|G|^2)`` (``inf`` when the mean ``|G|^2`` is <= 0).
        grad_sq, trace_sigma: the two means.
        ci_low, ci_high: percentile-bootstrap interval (NaN with fewer than 2 estimates).
        confidence: its level.
        num_estimates: estimates in the window.
        first_step, last_step: the steps they came from.
        source: ``"micro-batches"`` (free) or ``"probe"``.
    """

    # the first seven fields are those of lrbs.noise_scale.NoiseScale on purpose: the same quantities, one name each
    b_simple: float
    grad_sq: float
    trace_sigma: float
    ci_low: float
    ci_high: float
    confidence: float
    num_estimates: int
    first_step: int
    last_step: int
    source: str

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record (non-finite numbers become None: lrbs's one JSON rule, ``lrbs._util.jsonable``)."""
        return jsonable(dict(self.__dict__))


class NoiseWindow:
    """The last ``window`` single-step ``(|G|^2, tr Sigma)`` estimates and their summary.

    The interval resamples the estimates with replacement (``num_bootstrap`` times) and takes the ratio of means
    of each resample; ``"lower"``/``"higher"`` quantiles keep it defined when a resample's mean ``|G|^2`` is <= 0
    (its ratio is infinite) — the same interval as :func:`lrbs.noise_scale`'s (:func:`lrbs.noise_scale.bootstrap_ratio`,
    here seeded by ``[seed, number of estimates]``).
    """

    def __init__(self, window: int, source: str, confidence: float = 0.95, num_bootstrap: int = 1000):
        self.rows: deque[tuple[int, float, float]] = deque(maxlen=window)
        self.source, self.confidence, self.num_bootstrap = source, confidence, num_bootstrap

    def add(self, step: int, grad_sq: float, trace: float) -> None:
        """Record one estimate (non-finite ones, e.g. from an overflowing fp16 step, are dropped)."""
        if math.isfinite(grad_sq) and math.isfinite(trace):
            self.rows.append((int(step), float(grad_sq), float(trace)))

    def __len__(self) -> int:
        return len(self.rows)

    def summary(self, seed: int = 0) -> NoiseSummary | None:
        """The current :class:`NoiseSummary`, or None before the first estimate."""
        from ..noise_scale import b_simple_ratio, bootstrap_ratio

        if not self.rows:
            return None
        steps, g, t = (np.array(c) for c in zip(*self.rows))
        lo = hi = math.nan
        if len(g) >= 2:
            lo, hi = bootstrap_ratio(t, g, self.num_bootstrap, self.confidence, [seed, len(g)])
        return NoiseSummary(
            b_simple=b_simple_ratio(float(t.mean()), float(g.mean())),
            grad_sq=float(g.mean()),
            trace_sigma=float(t.mean()),
            ci_low=lo,
            ci_high=hi,
            confidence=self.confidence,
            num_estimates=len(g),
            first_step=int(steps[0]),
            last_step=int(steps[-1]),
            source=self.source,
        )


# --------------------------------------------------------------------------------------------- gradient capture
_CAT_LIMIT = 2**22  # up to this many gradient entries, one concatenation + dot beats per-tensor norms
# torch's C++ flatten (torch.nn.parallel.comm uses it): the same vector as torch.cat of the reshaped tensors, in
# half its time on small tensors (no Python call per tensor)
_FLATTEN = getattr(torch._utils, "_flatten_dense_tensors", None)


def _raw_squared_norm(tensors: Sequence[torch.Tensor], small: bool) -> torch.Tensor:
    """:func:`squared_norm` in the tensors' dtype on the small path (float64 on the large one), unconverted."""
    if small:
        flat = _FLATTEN(tensors) if _FLATTEN is not None else torch.cat([t.reshape(-1) for t in tensors])
        return torch.dot(flat, flat)
    return torch.nn.utils.get_total_norm(tensors, 2.0).double() ** 2


def squared_norm(tensors: Sequence[torch.Tensor], small: bool | None = None) -> torch.Tensor:
    """``sum_t |t|^2`` as a float64 0-d tensor: one flatten + ``dot`` for small totals (fewest kernel launches),
    per-tensor norms (no copy) for large ones (``small``: which, when the caller knows)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    if small is None:
        small = sum(t.numel() for t in tensors) <= _CAT_LIMIT
    return _raw_squared_norm(tensors, small).double()


def host_floats(values: Sequence[torch.Tensor | float]) -> list[float]:
    """0-d tensors (any dtype, any device) and numbers as Python floats, exactly: ``.item()`` each on the CPU (the
    cheapest there), one stacked device-to-host copy (one sync) for tensors on an accelerator."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if len(tensors) > 1 and tensors[0].device.type != "cpu":
        try:
            got = iter(torch.stack(tensors).tolist())  # promotes to the widest dtype: exact
        except RuntimeError:  # tensors on several devices
            got = iter([t.item() for t in tensors])
    else:
        got = iter([t.item() for t in tensors])
    return [float(next(got)) if isinstance(v, torch.Tensor) else float(v) for v in values]


class GradCapture:
    """Squared norms of each backward's gradient contribution, read by hooks that change nothing.

    A tensor hook on each trainable parameter receives that backward's gradient before it is added to ``.grad``
    (it returns None: the gradient is unchanged); the first one of a backward queues a callback on the autograd
    engine (what DDP uses), which runs when the backward has finished and stores the squared norm of the
    collected gradients as a 0-d tensor (no device sync). When ``total_when`` is given and true at that moment
    (the last micro-batch of a step), one more queued callback, behind those already queued (DDP's, which waits
    for the all-reduce and writes the mean gradient), stores the squared norm of the accumulated ``.grad`` —
    all-reduced under DDP, before anything (clipping) can change it; otherwise the caller reads the total with
    :meth:`grad_sq_of`. Under DDP the tensor hooks fire with this rank's local gradient (the reducer's hooks run
    after them, on the accumulated ``.grad``). Where the engine has no callback queue, one
    :func:`torch.autograd.graph.register_multi_grad_hook` plus a ``register_post_accumulate_grad_hook`` per
    parameter do the same, more slowly, but read the total before DDP's all-reduce (the HF callback then needs the
    probe under DDP; Lightning reads the total itself, after the all-reduce).

    Costs a Python call per parameter per backward (it keeps the gradient, as an alias in a step's first backward)
    and one squared norm over that backward's gradients (one C++ flatten and a dot, left as a 0-d tensor: no
    conversion, no sync), plus one
    per optimizer step: +2-3% on a forward + backward of a tiny GPT-2's micro-batch (28 parameter tensors;
    bench/bench_integrations.py, bench/RESULTS.md). The hooks also fire for other backward
    passes through these parameters (e.g. a gradient penalty inside the loss, reentrant activation
    checkpointing); such steps give more contributions than micro-batches and are skipped by the callbacks.
    """

    def __init__(self, params: Iterable[torch.Tensor], total_when: Callable[[], bool] | None = None):
        self.params = [p for p in params if p.requires_grad]
        self._small = sum(p.numel() for p in self.params) <= _CAT_LIMIT
        self.total_when = total_when
        self.contrib: list[torch.Tensor | float] = []
        self.total_parts: list[torch.Tensor | float] = []
        self._pending: list[torch.Tensor] = []
        self._stealable = True
        self._handles: list[Any] = []
        self.failed = False
        self._queue = self.engine_queue()

    @staticmethod
    def engine_queue() -> Callable | None:
        """The autograd engine's ``queue_callback`` (None where this torch has none)."""
        engine = getattr(torch.autograd.Variable, "_execution_engine", None)
        return getattr(engine, "queue_callback", None)

    def attach(self) -> GradCapture:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        if self._queue is not None:
            self._handles = [p.register_hook(self._on_grad) for p in self.params]
            return self
        self._handles.append(
            torch.autograd.graph.register_multi_grad_hook(self.params, self._on_grads, mode="all")
        )
        if self.total_when is not None:
            for p in self.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._on_accumulated))
        return self

    def detach(self) -> None:
        """Remove the hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        """Forget what the hooks stored (call at the start of each optimizer step)."""
        self.contrib, self.total_parts, self._pending = [], [], []
        self._stealable = True

    def _on_grad(self, grad: torch.Tensor) -> None:
        pending = self._pending
        if not pending:
            self._queue(self._on_backward_end)
        # In a step's first backward (.grad None after zero_grad) AccumulateGrad takes the gradient itself as .grad
        # unless something else holds it: hold an alias (.data: as detach(), without a dispatcher call). After
        # that it adds in place, and holding the hook's own tensor changes nothing (at worst, for a parameter
        # whose first gradient comes later, AccumulateGrad copies it: same values).
        pending.append(grad.data if self._stealable else grad)

    def _norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The squared norm as a 0-d tensor in the gradients' dtype (no device sync, no conversion: the floats
        are read later, many at once), cut from any graph (``create_graph=True`` gradients)."""
        v = _raw_squared_norm(grads, self._small)
        return v.detach() if v.requires_grad else v

    def _on_backward_end(self) -> None:
        grads, self._pending, self._stealable = self._pending, [], False
        try:
            self.contrib.append(self._norm(grads))
            if self.total_when is not None and self.total_when():
                # queued behind the callbacks already queued in this backward, DDP's among them (it waits for
                # the all-reduce and writes the mean gradient into .grad): the total is the all-reduced one
                self._queue(self._read_total)
        except Exception as e:  # e.g. sparse gradients: never let a measurement break the backward pass
            self.contrib.append(math.nan)
            self._warn_failed(e)

    def _read_total(self) -> None:
        try:
            grads = [g for g in [p.grad for p in self.params] if g is not None]
            self.total_parts.append(self._norm(grads) if grads else 0.0)
        except Exception as e:  # never let a measurement break the backward pass
            self.total_parts.append(math.nan)
            self._warn_failed(e)

    def _warn_failed(self, e: Exception) -> None:
        if not self.failed:
            self.failed = True
            warnings.warn(
                f"lrbs: reading the gradient norms failed ({type(e).__name__}: {e}); the noise scale is left "
                "out, training goes on",
                MeasurementWarning,
                stacklevel=3,
            )

    def _on_grads(self, grads: Sequence[torch.Tensor | None]) -> None:
        self.contrib.append(squared_norm([g.detach() for g in grads if g is not None]))

    def _on_accumulated(self, p: torch.Tensor) -> None:
        if p.grad is not None and self.total_when():
            self.total_parts.append(torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64) ** 2)

    @staticmethod
    def grad_sq_of(params: Iterable[torch.Tensor]) -> torch.Tensor:
        """``|grad|^2`` summed over ``params`` (their current ``.grad``), as a float64 0-d tensor."""
        return squared_norm([p.grad.detach() for p in params if p.grad is not None])

    def take_tensors(self) -> tuple[list[torch.Tensor | float], list[torch.Tensor | float]]:
        """``([|c_i|^2 ...], [parts of |sum c_i|^2])`` as stored (0-d tensors, NaN for a failed read; no device
        sync), then :meth:`reset`."""
        out = self.contrib, self.total_parts
        self.reset()
        return out

    def take(self) -> tuple[list[float], float | None]:
        """``([|c_i|^2 ...], |sum c_i|^2 or None)`` as floats (:func:`host_floats`: one device sync), then
        :meth:`reset`."""
        micro, parts = self.take_tensors()
        values = host_floats(micro + parts)
        return values[: len(micro)], sum(values[len(micro) :]) if parts else None


# --------------------------------------------------------------------------------------------- probe, sharpness
def probe_estimates(
    model: nn.Module,
    source: Any,
    *,
    small_batch: int,
    big_batch: int,
    num_estimates: int,
    seed: int,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
) -> Any:
    """:func:`lrbs.noise_scale` at the live weights on held data (a private copy; nothing is mutated).

    Returns the :class:`~lrbs.NoiseScale`; its per-draw estimates feed a :class:`NoiseWindow`. Cost: one copy of
    the model and ``num_estimates * big_batch / small_batch`` micro-batch gradients of ``small_batch`` samples
    (forward + backward each), i.e. about ``num_estimates * big_batch`` samples of training compute.
    """
    from ..noise_scale import noise_scale

    return noise_scale(
        model,
        source,
        small_batch=small_batch,
        big_batch=big_batch,
        num_estimates=num_estimates,
        seed=seed,
        compute_loss=compute_loss,
        batch_weight=batch_weight,
    )


def sharpness(
    model: nn.Module,
    source: Any,
    *,
    max_samples: int,
    batch_size: int | None,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
    init: Any = "auto",
    tol: float = 1e-3,
    seed: int = 0,
) -> Any:
    """The top Hessian eigenvalue of the loss on a fixed, seeded subset of ``source`` at the live weights.

    :func:`lrbs.hessian_eigenvalues` on a fresh :class:`~lrbs.Objective` (a private copy of the model with its
    current buffers, in eval mode; the subset of ``max_samples`` samples is the same at every call for a given
    ``seed``). ``init`` may be the previous top eigenvector (a warm start). Returns the
    :class:`~lrbs.EigenResult`, with its vector.
    """
    from ..curvature import hessian_eigenvalues
    from ..objective import Objective

    obj = Objective(
        model,
        data=source,
        compute_loss=compute_loss,
        batch_weight=batch_weight,
        max_samples=max_samples,
        batch_size=batch_size,
        seed=seed,
    )
    if isinstance(init, torch.Tensor) and init.shape != (obj.num_params,):
        init = "auto"
    return hessian_eigenvalues(obj, k=1, tol=tol, seed=seed, init=init, return_vectors=True)


def stability_threshold(optimizer: Any) -> float | None:
    """The bound on ``lr * lambda_max`` for ``optimizer``'s first param group (module docstring): torch SGD's
    plain, heavy-ball (with dampening) and Nesterov forms; None for every other optimizer — for adaptive ones
    (Adam, AdamW, RMSprop, ...) no bound applies to the raw Hessian."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate / Lightning wrappers
    if not isinstance(opt, torch.optim.SGD):
        return None
    group = opt.param_groups[0]
    beta = float(group.get("momentum", 0.0) or 0.0)
    if beta == 0.0:
        return 2.0
    if group.get("nesterov", False):
        return 2.0 * (1.0 + beta) / (1.0 + 2.0 * beta)
    damp = float(group.get("dampening", 0.0) or 0.0)
    return 2.0 * (1.0 + beta) / (1.0 - damp) if damp < 1.0 else None


def current_lr(optimizer: Any) -> float | None:
    """The learning rate of the optimizer's first param group (None when it has none)."""
    opt = getattr(optimizer, "optimizer", optimizer)
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return None
    lr = groups[0].get("lr")
    return float(lr) if lr is not None else None


def recommended_lr(res: Any) -> tuple[float | None, str]:
    """``res.recommended()`` of a :class:`~lrbs.RangeTestResult`, or ``(None, reason)`` with a
    :class:`MeasurementWarning` when the sweep cannot recommend (both ``find_lr`` keep the result either way)."""
    try:
        return res.recommended()
    except ConfigError as e:
        warnings.warn(f"lrbs find_lr: no learning rate was written ({e})", MeasurementWarning, stacklevel=4)
        return None, str(e)


def check_every(name: str, value: Any) -> int | None:
    """None, or an integer >= 1 (ConfigError naming ``name`` otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= 1 (steps) or None (off)")
    return value
