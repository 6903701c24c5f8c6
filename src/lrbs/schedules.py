"""Pure schedules for the learning rate, the momentum and the batch size: ``value = schedule(step)``.

A :class:`Schedule` is a small frozen, picklable object. ``s(t)`` is the value used for the optimizer step
``t`` (``t = 0`` is the first step); ``s.values(n)`` gives the first ``n`` values; ``repr(s)`` reads like the
constructor call and :func:`parse` turns it back into an equal schedule, without ``eval``. A finite schedule
has a ``total_steps``; past it the last value holds (PyTorch's ``OneCycleLR`` raises instead,
``pytorch/pytorch#38170``).

Every schedule that PyTorch also has gives, at every step of a full run, the LR that the PyTorch scheduler
puts into the optimizer, to 1e-9 relative (``tests/test_schedules_torch.py`` steps both side by side):

=================================================  ==========================================================
lrbs                                               PyTorch
=================================================  ==========================================================
``constant(v)``                                    no scheduler, ``lr=v``
``linear(b*s, b*e, T)``                            ``LinearLR(start_factor=s, end_factor=e, total_iters=T)``
``exponential(b, gamma)``                          ``ExponentialLR(gamma)``
``step(b, k, gamma)`` / ``step(b, [m1, m2], g)``   ``StepLR(step_size=k)`` / ``MultiStepLR([m1, m2])``
``cosine(b, T, end)``                              ``CosineAnnealingLR(T_max=T, eta_min=end)``, t <= T
``polynomial(b, T, power=p)``                      ``PolynomialLR(total_iters=T, power=p)``
``cyclic(...)``, ``cyclic_momentum(...)``          ``CyclicLR`` (all modes, LR and momentum / beta1)
``one_cycle(...)``, ``one_cycle_momentum(...)``    ``OneCycleLR`` (cos / linear, ``three_phase``)
``sgdr(b, T0, m, minimum)``                        ``CosineAnnealingWarmRestarts(T_0, T_mult=m, eta_min)``
=================================================  ==========================================================

:func:`attach` adapts any schedule to a ``torch.optim.lr_scheduler.LRScheduler`` whose state is only the step,
and :func:`apply` sets the optimizer's values for one step. Batch-size schedules (:func:`batch_ramp`,
:func:`batch_step`) are the same type with integer values; :func:`scale_lr` and :func:`grow_batch_instead`
couple the LR to the batch size.

References:
    Smith, "Cyclical Learning Rates for Training Neural Networks", 2017 (arXiv 1506.01186).
    Smith & Topin, "Super-Convergence", 2019 (arXiv 1708.07120).
    Loshchilov & Hutter, "SGDR: Stochastic Gradient Descent with Warm Restarts", 2017 (arXiv 1608.03983).
    Hu et al., "MiniCPM", 2024 (arXiv 2404.06395); Hägele et al., 2024 (arXiv 2405.18392) for WSD / 1-sqrt.
    Goyal et al., "Accurate, Large Minibatch SGD", 2017 (arXiv 1706.02677).
    Smith et al., "Don't Decay the Learning Rate, Increase the Batch Size", 2018 (arXiv 1711.00489).
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.optim.lr_scheduler import LRScheduler

from lrbs._schedule_spec import parse_spec
from lrbs.errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number, check_positive

__all__ = [
    "Schedule",
    "constant",
    "linear",
    "exponential",
    "step",
    "cosine",
    "polynomial",
    "inverse_sqrt",
    "warmup",
    "cyclic",
    "cyclic_momentum",
    "sgdr",
    "one_cycle",
    "one_cycle_momentum",
    "wsd",
    "join",
    "batch_ramp",
    "batch_step",
    "check_batch_schedule",
    "scale_lr",
    "grow_batch_instead",
    "LrAndBatch",
    "parse",
    "attach",
    "apply",
    "ScheduleLR",
    "SCHEDULES",
]

_DEFAULT_HORIZON = 100


# ------------------------------------------------------------------------------------------------------------
# argument checks


def _nonneg(name: str, value: Any) -> float:
    return check_number(name, value, low=0.0, low_inclusive=True)


def _increasing(name: str, values: Any, *, low: int = 1) -> tuple[int, ...]:
    if isinstance(values, np.ndarray) and values.ndim == 1:
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise LrbsTypeError(f"{name}={values!r} is not allowed: must be a list of integers")
    out = tuple(check_int(f"{name}[{i}]", v, low=low) for i, v in enumerate(values))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(f"{name}={list(out)} is not allowed: must be strictly increasing integers >= {low}")
    return out


def _checked_pieces(kind: str, pieces: tuple, cuts_name: str, cuts: Any) -> tuple[tuple, tuple[int, ...]]:
    """The pieces of a piecewise schedule, each checked, and the strictly increasing cuts between them (one
    fewer): the rule ``join`` (schedules, boundaries) and ``batch_step`` (sizes, milestones) share.

    ``pieces`` is ``(name, values, check, what, reject)``: ``check(f"{name}[i]", value)`` checks one piece,
    ``what`` names them in the error, and a value of a type in ``reject`` is not a list of pieces.
    """
    name, values, check, what, reject = pieces
    if isinstance(values, reject) or not isinstance(values, Sequence) or not values:
        raise LrbsTypeError(f"{name}={values!r} is not allowed: must be a non-empty list of {what}")
    values = tuple(check(f"{name}[{i}]", v) for i, v in enumerate(values))
    cuts = _increasing(cuts_name, cuts)
    if len(cuts) != len(values) - 1:
        raise ConfigError(
            f"{kind} got {len(values)} {name} and {cuts_name}={list(cuts)}: "
            f"len({cuts_name}) must be len({name}) - 1 = {len(values) - 1}"
        )
    return values, cuts


def _check_schedule(name: str, value: Any) -> Schedule:
    if not isinstance(value, Schedule):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a Schedule (e.g. cosine(...))")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be True or False")
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return repr(value)


def _set(obj: Any, **values: Any) -> None:
    for name, value in values.items():
        object.__setattr__(obj, name, value)


# ------------------------------------------------------------------------------------------------------------
# the base type


@dataclass(frozen=True, repr=False)
class Schedule:
    """A pure map from the step ``t >= 0`` to a value (LR, momentum or batch size).

    Subclasses implement ``_at(t)`` for a validated integer ``t`` and a ``total_steps`` property (``None`` for
    an infinite schedule). Schedules compare by value, hash, pickle, and multiply by a number (``0.5 * s``).
    """

    _name = "schedule"

    def __call__(self, step: int) -> float:
        """The value for optimizer step ``step`` (0-based). Past ``total_steps`` the last value holds.

        Raises:
            LrbsTypeError: If ``step`` is not an integer.
            ConfigError: If ``step`` is negative.
        """
        return self._at(check_int("step", step, low=0))

    def _at(self, t: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def integer(self) -> bool:
        """True for schedules whose values are integers (batch sizes)."""
        return False

    def values(self, n: int) -> np.ndarray:
        """The first ``n`` values, ``[s(0), ..., s(n-1)]``, as float64 (int64 for batch-size schedules)."""
        n = check_int("n", n, low=0)
        dtype = np.int64 if self.integer else np.float64
        return np.fromiter((self._at(t) for t in range(n)), dtype=dtype, count=n)

    def horizon(self) -> int:
        """Steps worth looking at: ``total_steps + 1`` if finite, else a few periods (or 100)."""
        total = self.total_steps
        return total + 1 if total is not None else self._default_horizon()

    def _default_horizon(self) -> int:
        return _DEFAULT_HORIZON

    def _breaks(self, horizon: int) -> list[int]:
        """Steps (local to this schedule) where a phase starts or ends."""
        return []

    def key_steps(self, n: int | None = None) -> list[int]:
        """The steps worth printing: 0, each phase boundary ``b`` and ``b - 1``, and ``n - 1``."""
        n = self.horizon() if n is None else check_int("n", n, low=1)
        steps = {0, n - 1}
        for b in self._breaks(n):
            steps.update(x for x in (b - 1, b) if 0 <= x < n)
        return sorted(steps)

    def __repr__(self) -> str:
        args = ", ".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in fields(self))
        return f"{self._name}({args})"

    def __mul__(self, factor: Any) -> Schedule:
        if isinstance(factor, bool) or not isinstance(factor, (int, float, np.floating, np.integer)):
            return NotImplemented
        return Scaled(factor, self)

    __rmul__ = __mul__

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able record: the name, the spec (``parse(spec) == self``) and ``total_steps``."""
        return {"name": self._name, "spec": repr(self), "total_steps": self.total_steps}

    def plot(self, n: int | None = None, ax: Any = None) -> Any:
        """Plot the first ``n`` values (default :meth:`horizon`) on ``ax`` or a new figure
        (:func:`lrbs.report.figures.draw_schedule`); return the Axes."""
        from .report.figures import draw_schedule

        return draw_schedule(self, self.horizon() if n is None else check_int("n", n, low=1), ax=ax)

    if TYPE_CHECKING:

        @property
        def total_steps(self) -> int | None: ...


# ------------------------------------------------------------------------------------------------------------
# elementary schedules


@dataclass(frozen=True, repr=False)
class Constant(Schedule):
    value: float
    _name = "constant"

    def __post_init__(self) -> None:
        _set(self, value=_nonneg("value", self.value))

    @property
    def total_steps(self) -> None:
        return None

    def _at(self, t: int) -> float:
        return self.value


def constant(value: float) -> Schedule:
    """The same value at every step: ``s(t) = value``.

    Raises:
        ConfigError: If ``value`` is negative or not finite.
    """
    return Constant(value)


@dataclass(frozen=True, repr=False)
class _Anneal(Schedule):
    """Base of the schedules that go from ``start`` to ``end`` over ``steps`` steps and then hold (``Linear``,
    ``Cosine``, which declare the fields): their checks, ``total_steps = steps`` and the one break at ``steps``."""

    if TYPE_CHECKING:
        start: float
        end: float
        steps: int

    def __post_init__(self) -> None:
        _set(self, start=_nonneg("start", self.start), end=_nonneg("end", self.end))
        _set(self, steps=check_int("steps", self.steps, low=1))

    @property
    def total_steps(self) -> int:
        return self.steps

    def _breaks(self, horizon: int) -> list[int]:
        return [self.steps]


@dataclass(frozen=True, repr=False)
class Linear(_Anneal):
    start: float
    end: float
    steps: int
    _name = "linear"

    def _at(self, t: int) -> float:
        return self.start + (self.end - self.start) * min(t, self.steps) / self.steps


def linear(start: float, end: float, steps: int) -> Schedule:
    """Linear interpolation, then hold: ``s(t) = start + (end - start) * min(t, steps) / steps``.

    Equals PyTorch's ``LinearLR`` with ``start = base * start_factor``, ``end = base * end_factor``,
    ``steps = total_iters``.

    Raises:
        ConfigError: If ``start`` or ``end`` is negative or not finite, or ``steps < 1``.
        LrbsTypeError: If ``steps`` is not an integer.
    """
    return Linear(start, end, steps)


@dataclass(frozen=True, repr=False)
class Exponential(Schedule):
    start: float
    gamma: float
    steps: int | None = None
    _name = "exponential"

    def __post_init__(self) -> None:
        _set(self, start=_nonneg("start", self.start), gamma=check_positive("gamma", self.gamma))
        if self.steps is not None:
            _set(self, steps=check_int("steps", self.steps, low=1))

    @property
    def total_steps(self) -> int | None:
        return self.steps

    def _at(self, t: int) -> float:
        return self.start * self.gamma ** (t if self.steps is None else min(t, self.steps))

    def _breaks(self, horizon: int) -> list[int]:
        return [] if self.steps is None else [self.steps]


def exponential(
    start: float, gamma: float | None = None, steps: int | None = None, *, end: float | None = None
) -> Schedule:
    """Exponential decay: ``s(t) = start * gamma ** min(t, steps)`` (no end if ``steps`` is None).

    Give either ``gamma``, or ``end`` and ``steps`` (then ``gamma = (end / start) ** (1 / steps)``, so that
    ``s(steps) = end`` up to rounding). Equals PyTorch's ``ExponentialLR``.

    Raises:
        ConfigError: If both or neither of ``gamma`` and ``end`` are given, ``end`` without ``steps``, or a
            value out of range (``start``, ``end`` and ``gamma`` must be finite and > 0).
    """
    if (gamma is None) == (end is None):
        raise ConfigError(
            f"exponential(gamma={gamma!r}, end={end!r}) is not allowed: give exactly one of them"
        )
    if end is not None:
        if steps is None:
            raise ConfigError(f"exponential(end={end!r}, steps=None) is not allowed: end needs steps >= 1")
        start = check_positive("start", start)
        gamma = (check_positive("end", end) / start) ** (1.0 / check_int("steps", steps, low=1))
    return Exponential(start, gamma, steps)


@dataclass(frozen=True, repr=False)
class Step(Schedule):
    base: float
    milestones: int | tuple[int, ...]
    gamma: float = 0.1
    _name = "step"

    def __post_init__(self) -> None:
        _set(self, base=_nonneg("base", self.base), gamma=check_positive("gamma", self.gamma))
        if isinstance(self.milestones, (int, np.integer)) and not isinstance(self.milestones, bool):
            _set(self, milestones=check_int("milestones", self.milestones, low=1))
        else:
            _set(self, milestones=_increasing("milestones", self.milestones))

    @property
    def total_steps(self) -> int | None:
        if isinstance(self.milestones, int):
            return None
        return self.milestones[-1] if self.milestones else None

    def _decays(self, t: int) -> int:
        if isinstance(self.milestones, int):
            return t // self.milestones
        return bisect.bisect_right(self.milestones, t)

    def _at(self, t: int) -> float:
        return self.base * self.gamma ** self._decays(t)

    def _default_horizon(self) -> int:
        return 3 * self.milestones + 1 if isinstance(self.milestones, int) else _DEFAULT_HORIZON

    def _breaks(self, horizon: int) -> list[int]:
        if isinstance(self.milestones, int):
            return list(range(self.milestones, horizon, self.milestones))
        return list(self.milestones)


def step(base: float, milestones: int | Sequence[int], gamma: float = 0.1) -> Schedule:
    """Step decay: ``s(t) = base * gamma ** d(t)``, d the number of milestones passed.

    ``milestones`` is a list of steps (``d(t) = #{m <= t}``, PyTorch's ``MultiStepLR``) or one integer period
    ``k`` (``d(t) = t // k``, PyTorch's ``StepLR(step_size=k)``).

    Raises:
        ConfigError: If milestones are not strictly increasing integers >= 1, or ``base``/``gamma`` is out of
            range.
    """
    return Step(base, tuple(milestones) if isinstance(milestones, list) else milestones, gamma)


@dataclass(frozen=True, repr=False)
class Cosine(_Anneal):
    start: float
    steps: int
    end: float = 0.0
    _name = "cosine"

    def _at(self, t: int) -> float:
        return (
            self.end + (self.start - self.end) * (1 + math.cos(math.pi * min(t, self.steps) / self.steps)) / 2
        )


def cosine(start: float, steps: int, end: float = 0.0) -> Schedule:
    """Cosine annealing (Loshchilov & Hutter 2017): ``s(t) = end + (start - end)(1 + cos(pi min(t,T)/T))/2``.

    Equals PyTorch's ``CosineAnnealingLR(T_max=steps, eta_min=end)`` for ``t <= steps`` (PyTorch then rises
    again; here ``end`` holds).

    Raises:
        ConfigError: If ``steps < 1`` or a value is negative or not finite.
    """
    return Cosine(start, steps, end)


@dataclass(frozen=True, repr=False)
class Polynomial(Schedule):
    start: float
    steps: int
    end: float = 0.0
    power: float = 1.0
    _name = "polynomial"

    def __post_init__(self) -> None:
        _set(self, start=_nonneg("start", self.start), end=_nonneg("end", self.end))
        _set(self, steps=check_int("steps", self.steps, low=1), power=check_positive("power", self.power))

    @property
    def total_steps(self) -> int:
        return self.steps

    def _at(self, t: int) -> float:
        return (self.start - self.end) * (1 - min(t, self.steps) / self.steps) ** self.power + self.end

    def _breaks(self, horizon: int) -> list[int]:
        return [self.steps]


def polynomial(start: float, steps: int, end: float = 0.0, power: float = 1.0) -> Schedule:
    """Polynomial decay (optax ``polynomial_schedule``): ``s(t) = (start - end)(1 - min(t,T)/T)^power + end``.

    Equals PyTorch's ``PolynomialLR(total_iters=steps, power=power)`` when ``end = 0``.

    Raises:
        ConfigError: If ``steps < 1``, ``power <= 0``, or a value is negative or not finite.
    """
    return Polynomial(start, steps, end, power)


@dataclass(frozen=True, repr=False)
class InverseSqrt(Schedule):
    peak: float
    timescale: float
    _name = "inverse_sqrt"

    def __post_init__(self) -> None:
        _set(self, peak=_nonneg("peak", self.peak), timescale=check_positive("timescale", self.timescale))

    @property
    def total_steps(self) -> None:
        return None

    def _at(self, t: int) -> float:
        return self.peak * math.sqrt(self.timescale / (t + self.timescale))

    def _default_horizon(self) -> int:
        return max(_DEFAULT_HORIZON, int(10 * self.timescale) + 1)


def inverse_sqrt(peak: float, timescale: float | None = None, warmup: int = 0) -> Schedule:
    """Inverse square-root decay (Vaswani et al. 2017; HF ``get_inverse_sqrt_schedule``).

    ``s(t) = peak * sqrt(tau / (t + tau))`` with ``tau = timescale``, which defaults to ``warmup`` (or 10,000
    when ``warmup = 0``, as in HF). With ``warmup > 0`` the result is ``warmup(inverse_sqrt(peak, tau),
    warmup)``: a linear warmup prefix, after which the decay sees the step ``t - warmup``, as HF does.

    Raises:
        ConfigError: If ``peak`` is negative, ``timescale <= 0`` or ``warmup < 0``.
    """
    warmup_steps = check_int("warmup", warmup, low=0)
    tau = timescale if timescale is not None else (warmup_steps if warmup_steps > 0 else 10_000)
    decay = InverseSqrt(peak, tau)
    return Warmup(decay, warmup_steps) if warmup_steps > 0 else decay


# ------------------------------------------------------------------------------------------------------------
# composition


@dataclass(frozen=True, repr=False)
class Warmup(Schedule):
    schedule: Schedule
    steps: int
    start: float | None = None
    kind: str = "linear"
    _name = "warmup"

    def __post_init__(self) -> None:
        _check_schedule("schedule", self.schedule)
        _set(
            self, steps=check_int("steps", self.steps, low=1), kind=check_choice("kind", self.kind, _WARMUPS)
        )
        target = self.schedule._at(0)
        start = target / (self.steps + 1) if self.start is None else _nonneg("start", self.start)
        if self.kind == "exponential" and (start <= 0 or target <= 0):
            raise ConfigError(
                f"warmup(kind='exponential') with start={start!r} and schedule(0)={target!r} is not allowed: "
                "both must be > 0"
            )
        _set(self, start=start)

    @property
    def total_steps(self) -> int | None:
        inner = self.schedule.total_steps
        return None if inner is None else self.steps + inner

    def _at(self, t: int) -> float:
        if t >= self.steps:
            return self.schedule._at(t - self.steps)
        target = self.schedule._at(0)
        if self.kind == "linear":
            return self.start + (target - self.start) * t / self.steps
        return self.start * (target / self.start) ** (t / self.steps)

    def _default_horizon(self) -> int:
        return self.steps + self.schedule._default_horizon()

    def _breaks(self, horizon: int) -> list[int]:
        return [self.steps] + [self.steps + b for b in self.schedule._breaks(horizon - self.steps)]


_WARMUPS = ("linear", "exponential")


def warmup(schedule: Schedule, steps: int, start: float | None = None, kind: str = "linear") -> Schedule:
    """Prefix ``schedule`` with a warmup of ``steps`` steps; afterwards the schedule sees ``t - steps``.

    For ``t < W`` (``W = steps``, ``v = schedule(0)``): ``linear``: ``start + (v - start) t / W``;
    ``exponential``: ``start (v / start)^(t / W)``. The default ``start = v / (W + 1)`` gives the evenly
    spaced ramp ``v (t + 1) / (W + 1)``, so the first step does not have LR 0 (unlike HF,
    ``transformers#34754``) and the ramp joins the schedule without a jump. The total length is ``W +
    schedule.total_steps``, as optax's ``warmup_cosine_decay_schedule`` (whose ``decay_steps`` includes the
    warmup).

    Raises:
        ConfigError: If ``steps < 1``, ``start`` is negative, ``kind`` is unknown, or an exponential warmup
            would start or end at 0.
        LrbsTypeError: If ``schedule`` is not a Schedule.
    """
    return Warmup(schedule, steps, start, kind)


@dataclass(frozen=True, repr=False)
class Join(Schedule):
    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]
    _name = "join"

    def __post_init__(self) -> None:
        pieces = ("schedules", self.schedules, _check_schedule, "Schedules", (Schedule,))
        scheds, bounds = _checked_pieces("join", pieces, "boundaries", self.boundaries)
        _set(self, schedules=scheds, boundaries=bounds)

    @property
    def integer(self) -> bool:
        return all(s.integer for s in self.schedules)

    @property
    def total_steps(self) -> int | None:
        last = self.schedules[-1].total_steps
        if last is None:
            return None
        return (self.boundaries[-1] if self.boundaries else 0) + last

    def _at(self, t: int) -> float:
        i = bisect.bisect_right(self.boundaries, t)
        return self.schedules[i]._at(t - (self.boundaries[i - 1] if i else 0))

    def _default_horizon(self) -> int:
        return (self.boundaries[-1] if self.boundaries else 0) + self.schedules[-1]._default_horizon()

    def _breaks(self, horizon: int) -> list[int]:
        out: list[int] = []
        for b, s in zip((0, *self.boundaries), self.schedules):
            out += [b] + [b + x for x in s._breaks(horizon - b)]
        return out


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """Piecewise composition (optax ``join_schedules``): piece ``i`` runs from ``boundaries[i-1]``.

    ``s(t) = schedules[i](t - b_i)`` where ``i = #{b in boundaries : b <= t}`` and ``b_i`` is the start of
    piece ``i`` (0 for the first): each piece sees its local step.

    Raises:
        ConfigError: If ``boundaries`` are not strictly increasing integers >= 1, or
            ``len(boundaries) != len(schedules) - 1``.
        LrbsTypeError: If a piece is not a Schedule.
    """
    return Join(tuple(schedules) if isinstance(schedules, (list, tuple)) else schedules, tuple(boundaries))


@dataclass(frozen=True, repr=False)
class Scaled(Schedule):
    factor: float
    schedule: Schedule

    def __post_init__(self) -> None:
        _check_schedule("schedule", self.schedule)
        factor = _nonneg("factor", self.factor)
        if isinstance(self.schedule, Scaled):  # fold 2 * (0.5 * s) into 1.0 * s
            factor, inner = factor * self.schedule.factor, self.schedule.schedule
            _set(self, schedule=inner)
        _set(self, factor=factor)

    @property
    def total_steps(self) -> int | None:
        return self.schedule.total_steps

    def _at(self, t: int) -> float:
        return self.factor * self.schedule._at(t)

    def __repr__(self) -> str:
        return f"{self.factor!r} * {self.schedule!r}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": "scaled", "spec": repr(self), "total_steps": self.total_steps}

    def _default_horizon(self) -> int:
        return self.schedule._default_horizon()

    def _breaks(self, horizon: int) -> list[int]:
        return self.schedule._breaks(horizon)


# ------------------------------------------------------------------------------------------------------------
# cyclical schedules


_CYCLIC_MODES = ("triangular", "triangular2", "exp_range")


def _clr(t: int, up: int, down: int, mode: str, gamma: float) -> tuple[float, float]:
    """The CLR triangle ``s`` in [0, 1] and amplitude scale ``g`` at step ``t``, in PyTorch's arithmetic."""
    total = float(up) + float(down)
    ratio = up / total
    cycle = math.floor(1 + t / total)
    x = 1.0 + t / total - cycle
    s = x / ratio if x <= ratio else (x - 1) / (ratio - 1)
    if mode == "triangular":
        g = 1.0
    elif mode == "triangular2":
        g = 1 / (2.0 ** (cycle - 1))
    else:
        g = gamma**t
    return s, g


@dataclass(frozen=True, repr=False)
class _CyclicBase(Schedule):
    base: float
    peak: float
    step_size_up: int
    step_size_down: int | None = None
    mode: str = "triangular"
    gamma: float = 1.0
    _low, _high = "base", "peak"

    def __post_init__(self) -> None:
        base, peak = _nonneg(self._low, self.base), _nonneg(self._high, self.peak)
        if peak < base:
            raise ConfigError(f"{self._high}={peak!r} is not allowed: must be >= {self._low}={base!r}")
        up = check_int("step_size_up", self.step_size_up, low=1)
        down = up if self.step_size_down is None else check_int("step_size_down", self.step_size_down, low=1)
        mode = check_choice("mode", self.mode, _CYCLIC_MODES)
        gamma = check_number("gamma", self.gamma, low=0.0, high=1.0)
        _set(self, base=base, peak=peak, step_size_up=up, step_size_down=down, mode=mode, gamma=gamma)

    @property
    def total_steps(self) -> None:
        return None

    def _default_horizon(self) -> int:
        return 2 * (self.step_size_up + self.step_size_down) + 1

    def _breaks(self, horizon: int) -> list[int]:
        period = self.step_size_up + self.step_size_down
        return [
            c + d for c in range(0, horizon, period) for d in (self.step_size_up, period) if c + d < horizon
        ]


@dataclass(frozen=True, repr=False)
class Cyclic(_CyclicBase):
    _name = "cyclic"

    def _at(self, t: int) -> float:
        s, g = _clr(t, self.step_size_up, self.step_size_down, self.mode, self.gamma)
        return self.base + (self.peak - self.base) * s * g

    def momentum(self, base: float = 0.8, peak: float = 0.9) -> Schedule:
        """The matching inverse momentum schedule, :func:`cyclic_momentum` with the same cycle."""
        return cyclic_momentum(base, peak, self.step_size_up, self.step_size_down, self.mode, self.gamma)


@dataclass(frozen=True, repr=False)
class CyclicMomentum(_CyclicBase):
    _name = "cyclic_momentum"

    def _at(self, t: int) -> float:
        s, g = _clr(t, self.step_size_up, self.step_size_down, self.mode, self.gamma)
        return self.peak - (self.peak - self.base) * s * g


def cyclic(
    base: float,
    peak: float,
    step_size_up: int,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
) -> Schedule:
    """Cyclical learning rate (Smith 2017), equal to PyTorch's ``CyclicLR``.

    With ``T = up + down``, ``r = up / T``, ``c = floor(1 + t/T)``, ``x = 1 + t/T - c`` and ``s = x/r`` if
    ``x <= r`` else ``(x - 1)/(r - 1)``: ``s(t) = base + (peak - base) * s * g`` with ``g = 1``
    (``triangular``), ``2^-(c-1)`` (``triangular2``) or ``gamma^t`` (``exp_range``). Only the amplitude
    decays; ``base`` stays.

    Raises:
        ConfigError: If ``peak < base``, a step size is < 1, ``mode`` is unknown (the closest is suggested) or
            ``gamma`` is outside [0, 1].
    """
    return Cyclic(base, peak, step_size_up, step_size_down, mode, gamma)


def cyclic_momentum(
    base: float = 0.8,
    peak: float = 0.9,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
) -> Schedule:
    """Momentum cycled inversely to :func:`cyclic`: ``m(t) = peak - (peak - base) * s * g``.

    Defaults are PyTorch's ``base_momentum=0.8``, ``max_momentum=0.9``; use it for SGD momentum or Adam's
    beta1 (:func:`attach` picks the right one).

    Raises:
        ConfigError: As :func:`cyclic`.
    """
    return CyclicMomentum(base, peak, step_size_up, step_size_down, mode, gamma)


def _sgdr_cycle(t: int, first: int, mult: float) -> tuple[int, float, float]:
    """(cycle index i, step within the cycle, cycle length) for SGDR cycles ``T_i = first * mult^i``."""
    if mult == 1.0:
        i, t_c = divmod(t, first)
        return i, t_c, first
    if mult == int(mult):  # integer multiplier: exact integer arithmetic, as PyTorch's T_i *= T_mult
        m = int(mult)
        i = int(math.log(t / first * (m - 1) + 1, m))
        while first * (m**i - 1) // (m - 1) > t:
            i -= 1
        while first * (m ** (i + 1) - 1) // (m - 1) <= t:
            i += 1
        return i, t - first * (m**i - 1) // (m - 1), first * m**i
    i = math.floor(math.log(1 - t / first * (1 - mult), mult))  # timm's closed form for a float cycle_mul
    while i > 0 and first * (1 - mult**i) / (1 - mult) > t:
        i -= 1
    while first * (1 - mult ** (i + 1)) / (1 - mult) <= t:
        i += 1
    return i, t - first * (1 - mult**i) / (1 - mult), first * mult**i


@dataclass(frozen=True, repr=False)
class SGDR(Schedule):
    peak: float
    first_cycle: int
    cycle_mult: float = 1.0
    minimum: float = 0.0
    peak_decay: float = 1.0
    _name = "sgdr"

    def __post_init__(self) -> None:
        _set(self, peak=_nonneg("peak", self.peak), minimum=_nonneg("minimum", self.minimum))
        _set(self, first_cycle=check_int("first_cycle", self.first_cycle, low=1))
        _set(self, cycle_mult=check_number("cycle_mult", self.cycle_mult, low=1.0, low_inclusive=True))
        _set(self, peak_decay=check_number("peak_decay", self.peak_decay, low=0.0, high=1.0))

    @property
    def total_steps(self) -> None:
        return None

    def cycle(self, step: int) -> tuple[int, float, float]:
        """``(i, t_cur, T_i)``: the cycle index, the step within it and its length at ``step``."""
        return _sgdr_cycle(check_int("step", step, low=0), self.first_cycle, self.cycle_mult)

    def _at(self, t: int) -> float:
        i, t_cur, length = _sgdr_cycle(t, self.first_cycle, self.cycle_mult)
        top = self.peak * self.peak_decay**i
        return self.minimum + (top - self.minimum) * (1 + math.cos(math.pi * t_cur / length)) / 2

    def _default_horizon(self) -> int:
        return int(self.first_cycle * (1 + self.cycle_mult + self.cycle_mult**2)) + 1

    def _breaks(self, horizon: int) -> list[int]:
        out, start, length = [], 0.0, float(self.first_cycle)
        while start + length < horizon:
            start += length
            length *= self.cycle_mult
            out.append(math.ceil(start))
        return out


def sgdr(
    peak: float, first_cycle: int, cycle_mult: float = 1.0, minimum: float = 0.0, peak_decay: float = 1.0
) -> Schedule:
    """Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter 2017), with peak decay as timm.

    Cycle ``i`` lasts ``T_i = first_cycle * cycle_mult^i`` steps (``cycle_mult >= 1``, integer or float as
    timm's ``cycle_mul``) and peaks at ``peak * peak_decay^i``: ``s(t) = minimum + (peak_i - minimum)(1 +
    cos(pi t_c/T_i))/2`` with ``t_c`` the step within the cycle. With ``peak_decay = 1`` and an integer
    ``cycle_mult`` it equals PyTorch's ``CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)``, which has no
    peak decay (``pytorch#62640``).

    Raises:
        ConfigError: If ``first_cycle < 1``, ``cycle_mult < 1``, ``peak_decay`` is outside (0, 1] or a value
            is negative or not finite.
    """
    return SGDR(peak, first_cycle, cycle_mult, minimum, peak_decay)


_ANNEALS = ("cos", "linear")


def _anneal(kind: str, start: float, end: float, pct: float) -> float:
    if kind == "cos":  # same float operations as torch.optim.lr_scheduler.OneCycleLR
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
    return (end - start) * pct + start


@dataclass(frozen=True, repr=False)
class _OneCycleBase(Schedule):
    total_steps: int
    pct_start: float = 0.3
    anneal: str = "cos"
    three_phase: bool = False

    def _check_phases(self) -> None:
        total = check_int("total_steps", self.total_steps, low=2)
        pct = check_number("pct_start", self.pct_start, low=0.0, high=1.0, high_inclusive=False)
        _set(self, total_steps=total, pct_start=pct, anneal=check_choice("anneal", self.anneal, _ANNEALS))
        _check_bool("three_phase", self.three_phase)
        ends = self._ends()
        if not all(b > a for a, b in zip((0.0, *ends), ends)):
            need = (
                "2 < 2*pct_start*total_steps < total_steps + 1"
                if self.three_phase
                else "1 < pct_start*total_steps"
            )
            raise ConfigError(
                f"pct_start={pct!r} with total_steps={total} is not allowed: the phases would end at steps "
                f"{[round(e, 3) for e in ends]}; every phase needs at least one step ({need})"
            )

    def _ends(self) -> list[float]:
        first = float(self.pct_start * self.total_steps) - 1
        if self.three_phase:
            return [first, float(2 * self.pct_start * self.total_steps) - 2, self.total_steps - 1]
        return [first, self.total_steps - 1]

    def _points(self) -> list[tuple[float, float]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _at(self, t: int) -> float:
        t = min(t, self.total_steps - 1)
        start_step = 0.0
        ends, points = self._ends(), self._points()
        for i, end_step in enumerate(ends):
            if t <= end_step or i == len(ends) - 1:
                return _anneal(self.anneal, *points[i], (t - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable")  # pragma: no cover

    def _breaks(self, horizon: int) -> list[int]:
        return [round(e) for e in self._ends()]


@dataclass(frozen=True, repr=False)
class OneCycle(_OneCycleBase):
    peak: float = 0.0  # placed after total_steps by dataclass rules; the constructor puts it first
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    _name = "one_cycle"

    def __post_init__(self) -> None:
        self._check_phases()
        _set(self, peak=_nonneg("peak", self.peak))
        _set(self, div_factor=check_positive("div_factor", self.div_factor))
        _set(self, final_div_factor=check_positive("final_div_factor", self.final_div_factor))

    def __repr__(self) -> str:
        names = (
            "peak",
            "total_steps",
            "pct_start",
            "div_factor",
            "final_div_factor",
            "anneal",
            "three_phase",
        )
        return f"one_cycle({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def _points(self) -> list[tuple[float, float]]:
        initial = self.peak / self.div_factor
        minimum = initial / self.final_div_factor
        if self.three_phase:
            return [(initial, self.peak), (self.peak, initial), (initial, minimum)]
        return [(initial, self.peak), (self.peak, minimum)]

    def momentum(self, base: float = 0.85, peak: float = 0.95) -> Schedule:
        """The matching inverse momentum schedule, :func:`one_cycle_momentum` with the same phases."""
        return one_cycle_momentum(self.total_steps, self.pct_start, base, peak, self.anneal, self.three_phase)


@dataclass(frozen=True, repr=False)
class OneCycleMomentum(_OneCycleBase):
    base: float = 0.85
    peak: float = 0.95
    _name = "one_cycle_momentum"

    def __post_init__(self) -> None:
        self._check_phases()
        base, peak = _nonneg("base", self.base), _nonneg("peak", self.peak)
        if peak < base:
            raise ConfigError(f"peak={peak!r} is not allowed: must be >= base={base!r}")
        _set(self, base=base, peak=peak)

    def _points(self) -> list[tuple[float, float]]:
        if self.three_phase:
            return [(self.peak, self.base), (self.base, self.peak), (self.peak, self.peak)]
        return [(self.peak, self.base), (self.base, self.peak)]


def one_cycle(
    peak: float,
    total_steps: int,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    anneal: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """The 1cycle policy (Smith & Topin 2019), equal to PyTorch's ``OneCycleLR`` at every step.

    From ``initial = peak / div_factor`` up to ``peak`` over the first phase (ending at step ``pct_start*T -
    1``), then down to ``initial / final_div_factor`` at step ``T - 1``; with ``three_phase`` back to
    ``initial`` at ``2 pct_start T - 2`` first. Between phase ends: ``cos``: ``end + (start - end)(1 + cos(pi
    p))/2``, ``linear``: ``start + (end - start) p``, with ``p`` the fraction of the phase done. The last
    value holds after ``T - 1``.

    Raises:
        ConfigError: If ``total_steps < 2``, ``pct_start`` is outside [0, 1) or leaves a phase without steps,
            ``anneal`` is unknown, or a factor is not > 0.
        LrbsTypeError: If ``three_phase`` is not a bool.
    """
    return OneCycle(total_steps, pct_start, anneal, three_phase, peak, div_factor, final_div_factor)


def one_cycle_momentum(
    total_steps: int,
    pct_start: float = 0.3,
    base: float = 0.85,
    peak: float = 0.95,
    anneal: str = "cos",
    three_phase: bool = False,
) -> Schedule:
    """Momentum cycled inversely to :func:`one_cycle`: ``peak -> base`` in phase 1, back to ``peak`` after.

    Defaults 0.95 -> 0.85 -> 0.95 as PyTorch's ``OneCycleLR`` (``max_momentum``, ``base_momentum``) and
    fastai; in three-phase mode the third phase stays at ``peak``. Use it for SGD momentum or Adam's beta1.

    Raises:
        ConfigError: As :func:`one_cycle`, or if ``peak < base``.
    """
    return OneCycleMomentum(total_steps, pct_start, anneal, three_phase, base, peak)


_WSD_DECAYS = ("linear", "cosine", "1-sqrt")


@dataclass(frozen=True, repr=False)
class WSD(Schedule):
    peak: float
    warmup: int
    stable: int
    decay: int
    decay_kind: str = "1-sqrt"
    min_ratio: float = 0.0
    start: float | None = None
    _name = "wsd"

    def __post_init__(self) -> None:
        _set(self, peak=_nonneg("peak", self.peak), warmup=check_int("warmup", self.warmup, low=0))
        _set(
            self, stable=check_int("stable", self.stable, low=0), decay=check_int("decay", self.decay, low=1)
        )
        _set(self, decay_kind=check_choice("decay_kind", self.decay_kind, _WSD_DECAYS))
        _set(self, min_ratio=check_number("min_ratio", self.min_ratio, low=0.0, low_inclusive=True, high=1.0))
        start = self.peak / (self.warmup + 1) if self.start is None else _nonneg("start", self.start)
        _set(self, start=start)

    @property
    def total_steps(self) -> int:
        return self.warmup + self.stable + self.decay

    def _at(self, t: int) -> float:
        if t < self.warmup:
            return self.start + (self.peak - self.start) * t / self.warmup
        p = min(t - self.warmup - self.stable, self.decay) / self.decay
        if p <= 0:
            return self.peak
        if self.decay_kind == "linear":
            f = 1 - p
        elif self.decay_kind == "cosine":
            f = (1 + math.cos(math.pi * p)) / 2
        else:
            f = 1 - math.sqrt(p)
        return self.peak * (self.min_ratio + (1 - self.min_ratio) * f)

    def _breaks(self, horizon: int) -> list[int]:
        return [b for b in (self.warmup, self.warmup + self.stable, self.total_steps) if b > 0]


def wsd(
    peak: float,
    warmup: int,
    stable: int | None = None,
    decay: int = 1,
    decay_kind: str = "1-sqrt",
    min_ratio: float = 0.0,
    start: float | None = None,
    *,
    total_steps: int | None = None,
) -> Schedule:
    """Warmup-stable-decay (MiniCPM, Hu et al. 2024; 1-sqrt cooldown, Hägele et al. 2024).

    Linear warmup from ``start`` (default ``peak / (warmup + 1)``, see :func:`warmup`) to ``peak`` over
    ``warmup`` steps, ``peak`` for ``stable`` steps, then with ``p = (t - warmup - stable) / decay`` in [0,
    1]: ``s = peak (m + (1 - m) f(p))``, ``m = min_ratio``, ``f = 1 - p`` (``linear``), ``(1 + cos(pi p))/2``
    (``cosine``) or ``1 - sqrt(p)`` (``1-sqrt``, the default). ``m * peak`` holds after ``total_steps``. Give
    ``stable`` or ``total_steps`` (then ``stable = total_steps - warmup - decay``).

    Raises:
        ConfigError: If neither or both of ``stable`` and ``total_steps`` are given, ``warmup + decay``
            exceeds ``total_steps``, ``decay < 1``, ``decay_kind`` is unknown or ``min_ratio`` is outside [0,
            1].
    """
    if (stable is None) == (total_steps is None):
        raise ConfigError(
            f"wsd(stable={stable!r}, total_steps={total_steps!r}) is not allowed: give exactly one"
        )
    if total_steps is not None:
        total = check_int("total_steps", total_steps, low=1)
        w, d = check_int("warmup", warmup, low=0), check_int("decay", decay, low=1)
        if w + d > total:
            raise ConfigError(
                f"warmup={w} + decay={d} is not allowed with total_steps={total}: must be <= total_steps"
            )
        stable = total - w - d
    return WSD(peak, warmup, stable, decay, decay_kind, min_ratio, start)


# ------------------------------------------------------------------------------------------------------------
# batch-size schedules


@dataclass(frozen=True, repr=False)
class BatchRamp(Schedule):
    start: int
    end: int
    steps: int
    increment: int | None = None
    _name = "batch_ramp"

    def __post_init__(self) -> None:
        start, end = check_int("start", self.start, low=1), check_int("end", self.end, low=1)
        if end < start:
            raise ConfigError(f"end={end} is not allowed: must be >= start={start}")
        inc = start if self.increment is None else check_int("increment", self.increment, low=1)
        if (end - start) % inc:
            raise ConfigError(
                f"increment={inc} is not allowed: end - start = {end - start} must be a multiple of it"
            )
        _set(self, start=start, end=end, steps=check_int("steps", self.steps, low=1), increment=inc)

    @property
    def integer(self) -> bool:
        return True

    @property
    def total_steps(self) -> int:
        return self.steps

    def _at(self, t: int) -> int:
        n = (self.end - self.start) // self.increment
        return self.start + self.increment * min(n, t * n // self.steps)

    def _breaks(self, horizon: int) -> list[int]:
        return [self.steps]


def batch_ramp(start: int, end: int, steps: int, increment: int | None = None) -> Schedule:
    """Linear batch-size ramp in fixed increments (Megatron-LM ``rampup_batch_size``), then hold ``end``.

    With ``n = (end - start) / increment`` increments spread evenly over ``steps``:
    ``B(t) = start + increment * min(n, floor(t n / steps))``. ``increment`` defaults to ``start``.

    Raises:
        ConfigError: If a size is < 1, ``end < start``, ``steps < 1``, or ``end - start`` is not a multiple of
            ``increment``.
    """
    return BatchRamp(start, end, steps, increment)


# Join's shape (duplicates pairs the two): pieces and the cuts between them, checked by the one _checked_pieces;
# what stays alike is the Schedule protocol every subclass spells out (integer, total_steps, _at, _breaks).
@dataclass(frozen=True, repr=False)
class BatchStep(Schedule):
    sizes: tuple[int, ...]
    milestones: tuple[int, ...]
    _name = "batch_step"

    def __post_init__(self) -> None:
        pieces = ("sizes", self.sizes, functools.partial(check_int, low=1), "integers", (str, bytes))
        sizes, milestones = _checked_pieces("batch_step", pieces, "milestones", self.milestones)
        _set(self, sizes=sizes, milestones=milestones)

    @property
    def integer(self) -> bool:
        return True

    @property
    def total_steps(self) -> int | None:
        return self.milestones[-1] if self.milestones else None

    def _at(self, t: int) -> int:
        return self.sizes[bisect.bisect_right(self.milestones, t)]

    def _breaks(self, horizon: int) -> list[int]:
        return list(self.milestones)


def batch_step(sizes: Sequence[int], milestones: Sequence[int]) -> Schedule:
    """Batch size switched at milestones: ``B(t) = sizes[#{m <= t}]`` (e.g. a small-batch warmup first).

    Raises:
        ConfigError: If a size is < 1, milestones are not strictly increasing integers >= 1, or
            ``len(milestones) != len(sizes) - 1``.
    """
    return BatchStep(tuple(sizes) if isinstance(sizes, list) else sizes, tuple(milestones))


def check_batch_schedule(schedule: Schedule, steps: int, dataset_size: int) -> np.ndarray:
    """Check that a batch-size schedule gives integers in ``[1, dataset_size]`` for steps ``0 .. steps-1``.

    Returns:
        The int64 batch sizes for those steps.

    Raises:
        LrbsTypeError: If ``schedule`` is not a Schedule or a value is not an integer.
        ConfigError: If a batch size is 0 (or below) or larger than ``dataset_size``; the message names the
            step.
    """
    _check_schedule("schedule", schedule)
    steps = check_int("steps", steps, low=1)
    dataset_size = check_int("dataset_size", dataset_size, low=1)
    out = np.empty(steps, dtype=np.int64)
    for t in range(steps):
        b = schedule._at(t)
        if b != int(b):
            raise LrbsTypeError(
                f"batch size {b!r} at step {t} of {schedule!r} is not allowed: must be an integer"
            )
        if not 1 <= b <= dataset_size:
            raise ConfigError(
                f"batch size {int(b)} at step {t} of {schedule!r} is not allowed: must be an integer >= 1 "
                f"and <= dataset_size={dataset_size}"
            )
        out[t] = b
    return out


_RULES = ("linear", "sqrt")


def scale_lr(lr: float | Schedule, batch_size: float, base_batch_size: float, rule: str = "linear") -> Any:
    """Scale an LR tuned at ``base_batch_size`` to ``batch_size``.

    ``linear`` (Goyal et al. 2017): ``lr * B / B0``; ``sqrt`` (Krizhevsky 2014; Hoffer et al. 2017):
    ``lr * sqrt(B / B0)``. ``lr`` may be a number (returns a float) or a Schedule (returns the scaled
    schedule).

    Raises:
        ConfigError: If a batch size is not > 0, ``lr`` is negative, or ``rule`` is unknown.
        LrbsTypeError: If ``lr`` is neither a number nor a Schedule.
    """
    ratio = check_positive("batch_size", batch_size) / check_positive("base_batch_size", base_batch_size)
    factor = ratio if check_choice("rule", rule, _RULES) == "linear" else math.sqrt(ratio)
    if isinstance(lr, Schedule):
        return factor * lr
    return _nonneg("lr", lr) * factor


class LrAndBatch(NamedTuple):
    """An LR schedule and the batch-size schedule that goes with it."""

    lr: Schedule
    batch_size: Schedule


def _pieces(schedule: Schedule) -> tuple[list[float], tuple[int, ...]]:
    if isinstance(schedule, Constant):
        return [schedule.value], ()
    if isinstance(schedule, Step) and isinstance(schedule.milestones, tuple):
        return [schedule._at(0)] + [schedule._at(m) for m in schedule.milestones], schedule.milestones
    if isinstance(schedule, Join) and all(isinstance(s, Constant) for s in schedule.schedules):
        return [s.value for s in schedule.schedules], schedule.boundaries
    raise ConfigError(
        f"lr_schedule={schedule!r} is not allowed: must be piecewise constant, i.e. "
        "step(base, [m1, m2, ...], gamma) with a milestone list, a join of constant(...) pieces, "
        "or a constant"
    )


def grow_batch_instead(lr_schedule: Schedule, base_batch_size: int, max_batch_size: int) -> LrAndBatch:
    """Turn a step-decay LR schedule into a batch-size increase (Smith et al. 2018).

    Where the LR would drop from ``lr_0`` to ``lr_k``, the batch grows instead to
    ``B_k = min(max_batch_size, round(B0 * lr_0 / lr_k))`` and the LR becomes ``lr_k * B_k / B0``: that is
    ``lr_0`` while the batch can grow (exactly so when ``lr_0 / lr_k`` is an integer), and LR decay takes over
    once the batch is capped. ``lr / B`` thus equals the original ``lr_k / B0`` at every step, the quantity
    that sets the SGD noise scale.

    Returns:
        ``LrAndBatch(lr, batch_size)``: a join of constants and a :func:`batch_step` with the same milestones.

    Raises:
        ConfigError: If ``lr_schedule`` is not piecewise constant, its values are not > 0 and non-increasing,
            or ``max_batch_size < base_batch_size``.
    """
    _check_schedule("lr_schedule", lr_schedule)
    base = check_int("base_batch_size", base_batch_size, low=1)
    cap = check_int("max_batch_size", max_batch_size, low=base)
    values, milestones = _pieces(lr_schedule)
    if values[0] <= 0 or any(b > a for a, b in zip(values, values[1:])) or values[-1] <= 0:
        raise ConfigError(
            f"lr_schedule={lr_schedule!r} is not allowed: its values must be > 0 and non-increasing"
        )
    sizes = [min(cap, max(base, round(base * values[0] / v))) for v in values]
    lrs = [v * b / base for v, b in zip(values, sizes)]
    return LrAndBatch(Join(tuple(Constant(x) for x in lrs), milestones), BatchStep(tuple(sizes), milestones))


# ------------------------------------------------------------------------------------------------------------
# spec parser


SCHEDULES: MappingProxyType[str, Callable[..., Schedule]] = MappingProxyType(
    {
        f.__name__: f
        for f in (
            constant,
            linear,
            exponential,
            step,
            cosine,
            polynomial,
            inverse_sqrt,
            warmup,
            cyclic,
            cyclic_momentum,
            sgdr,
            one_cycle,
            one_cycle_momentum,
            wsd,
            join,
            batch_ramp,
            batch_step,
        )
    }
)


def parse(spec: str) -> Schedule:
    """Build a schedule from a spec such as ``"warmup(cosine(start=0.1, steps=900), steps=100)"``, safely.

    The spec is Python call syntax restricted to the constructors in :data:`SCHEDULES`, number/string/list
    literals, unary minus, and ``*`` by a number (``"0.5 * cosine(start=0.1, steps=100)"``); it is walked with
    :mod:`ast`, never evaluated. ``parse(repr(s)) == s`` for every schedule.

    Example:
        >>> parse("0.5 * cosine(start=0.1, steps=100)")(100)
        0.0

    Raises:
        ConfigError: If the spec is malformed, uses anything else, or names an unknown schedule (the closest
            known name is suggested).
    """
    return parse_spec(spec, SCHEDULES, Schedule)


# ------------------------------------------------------------------------------------------------------------
# torch adapter


def _per_group(name: str, value: Any, groups: list[dict], *, ratios: bool) -> list[tuple[Callable, float]]:
    if isinstance(value, (list, tuple)):
        if len(value) != len(groups):
            raise ConfigError(
                f"{name}= got {len(value)} schedules for {len(groups)} param groups: "
                "give one schedule, or one per group"
            )
        for i, s in enumerate(value):
            if not callable(s):
                raise LrbsTypeError(f"{name}[{i}]={s!r} is not allowed: must be a Schedule")
        return [(s, 1.0) for s in value]
    if not callable(value):
        raise LrbsTypeError(
            f"{name}={value!r} is not allowed: must be a Schedule or a list of one per param group"
        )
    if not ratios:
        return [(value, 1.0)] * len(groups)
    first = float(groups[0].get("initial_lr", groups[0]["lr"]))
    if first == 0 and len(groups) > 1:
        raise ConfigError(
            "param group 0 has lr=0, so the other groups' LR ratios to it are undefined: "
            "pass lr=[...] with one schedule per group"
        )
    return [(value, float(g.get("initial_lr", g["lr"])) / first if first else 1.0) for g in groups]


def _momentum_key(optimizer: Any) -> str:
    group = optimizer.param_groups[0]
    if "momentum" in group:
        return "momentum"
    if "betas" in group:
        return "betas"
    raise ConfigError(
        f"momentum= was given but {type(optimizer).__name__} has neither 'momentum' nor 'betas' in its "
        "param groups: use an optimizer with momentum (SGD, RMSprop) or beta1 (Adam, AdamW, ...)"
    )


def _set_momentum(groups: list[dict], key: str, values: list[float]) -> None:
    for group, m in zip(groups, values):
        if key == "momentum":
            group["momentum"] = m
        else:
            group["betas"] = (m, *group["betas"][1:])


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LrbsTypeError(f"optimizer={optimizer!r} is not allowed: must be a torch.optim.Optimizer")


def apply(optimizer: torch.optim.Optimizer, step: int, lr: Any = None, momentum: Any = None) -> list[float]:
    """Set each param group's LR (and momentum or beta1) to the schedule's value at ``step``.

    With one LR schedule, group ``i`` gets ``lr(step) * lr_i / lr_0`` where ``lr_i`` is the group's
    ``initial_lr`` (recorded on the first call, as PyTorch schedulers do), so groups keep their ratios; or
    pass ``lr=[s0, s1, ...]``, one per group. ``momentum`` sets ``group["momentum"]`` or
    ``group["betas"][0]``.

    Returns:
        The LR set in each group.

    Raises:
        LrbsTypeError: If ``optimizer`` is not a torch optimizer or a schedule is not callable.
        ConfigError: If ``step < 0``, a per-group list has the wrong length, or the optimizer has no momentum.
    """
    _check_optimizer(optimizer)
    t = check_int("step", step, low=0)
    groups = optimizer.param_groups
    out = []
    if lr is not None:
        for g in groups:
            g.setdefault("initial_lr", g["lr"])
        out = [s(t) * f for s, f in _per_group("lr", lr, groups, ratios=True)]
        for g, v in zip(groups, out):
            g["lr"] = v
    if momentum is not None:
        key = _momentum_key(optimizer)
        _set_momentum(groups, key, [s(t) for s, _ in _per_group("momentum", momentum, groups, ratios=False)])
    return out


def attach(optimizer: torch.optim.Optimizer, lr: Any, momentum: Any = None) -> LRScheduler:
    """Drive ``optimizer`` with pure schedules through a standard torch ``LRScheduler``.

    Call ``scheduler.step()`` after each ``optimizer.step()``, as usual: the values in the optimizer before
    optimizer step ``t`` (0-based) are ``lr(t)`` (scaled per group as in :func:`apply`) and ``momentum(t)``.
    ``state_dict()`` is ``{"step": t}``: saving at step ``k``, loading into a fresh optimizer and scheduler
    and continuing gives exactly the values of an uninterrupted run.

    Returns:
        The scheduler (a ``torch.optim.lr_scheduler.LRScheduler``).

    Raises:
        LrbsTypeError: If ``optimizer`` is not a torch optimizer or a schedule is not callable.
        ConfigError: If a per-group list has the wrong length or ``momentum`` is given for an optimizer
            without momentum or betas.
    """
    _check_optimizer(optimizer)
    return ScheduleLR(optimizer, lr, momentum)


class ScheduleLR(LRScheduler):
    """A torch ``LRScheduler`` whose LRs (and momenta) are pure functions of the step; its state is the step.

    Build it with :func:`attach`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: Any, momentum: Any = None) -> None:
        groups = optimizer.param_groups
        self._lrs = _per_group("lr", lr, groups, ratios=True)
        self._momenta = None
        if momentum is not None:
            self._momentum_key = _momentum_key(optimizer)
            self._momenta = _per_group("momentum", momentum, groups, ratios=False)
        super().__init__(optimizer, last_epoch=-1)

    def get_lr(self) -> list[float]:
        """The LR of each group at ``last_epoch``; also sets the momenta, as PyTorch's ``OneCycleLR`` does."""
        t = self.last_epoch
        if self._momenta is not None:
            _set_momentum(self.optimizer.param_groups, self._momentum_key, [s(t) for s, _ in self._momenta])
        return [s(t) * f for s, f in self._lrs]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, int]:
        """``{"step": t}``: the schedules are pure, so the step is the whole state."""
        return {"step": self.last_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Jump to the saved step and write that step's values into the optimizer.

        Raises:
            ConfigError: If ``state_dict`` is not ``{"step": <int >= 0>}``.
        """
        if not isinstance(state_dict, dict) or "step" not in state_dict:
            raise ConfigError(f"state_dict={state_dict!r} is not allowed: must be {{'step': <int >= 0>}}")
        self.last_epoch = check_int("state_dict['step']", state_dict["step"], low=0)
        for group, value in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = value
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]
