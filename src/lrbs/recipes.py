"""Large-batch recipes on top of :mod:`lrbs.schedules`: LR scaling with warmup, batch warmup, accumulation.

- :func:`linear_scaling`: the LR for a batch ``B`` from one tuned at ``B0`` (linear or square-root rule), with
  Goyal et al.'s gradual warmup from the unscaled to the scaled LR and an optional decay;
- :func:`small_batch_warmup`: train with a small batch first, then switch to the large one (Keskar et al.'s
  suggested remedy for the large-batch generalization gap), with the LR that matches each batch;
- :func:`grow_batch_instead`: turn step LR decay into batch-size growth (Smith et al. 2018);
- :func:`accumulation_plan`: the micro-batches ``fit(max_micro_batch=...)`` accumulates into one batch.

References:
    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", 2017 (arXiv 1706.02677).
    Hoffer et al., "Train longer, generalize better", 2017 (arXiv 1705.08741).
    Keskar et al., "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima", 2017
    (arXiv 1609.04836).
    Smith et al., "Don't Decay the Learning Rate, Increase the Batch Size", 2018 (arXiv 1711.00489).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, LrbsTypeError, check_choice, check_int, check_number
from .schedules import (
    LrAndBatch,
    Schedule,
    batch_step,
    constant,
    cosine,
    grow_batch_instead,
    join,
    linear,
    warmup,
)

__all__ = [
    "RULES",
    "DECAYS",
    "scaling_factor",
    "linear_scaling",
    "BatchCoupledLR",
    "small_batch_warmup",
    "grow_batch_instead",
    "accumulation_plan",
    "LrAndBatch",
]

#: LR scaling rules: ``linear`` (Goyal et al.), ``sqrt`` (Krizhevsky 2014; Hoffer et al.), ``none``.
RULES = ("linear", "sqrt", "none")
#: Decays :func:`linear_scaling` can append after the warmup.
DECAYS = ("constant", "cosine", "linear")


def scaling_factor(batch_size: float, base_batch_size: float, rule: str = "linear") -> float:
    """The LR multiplier ``k`` for batch ``B`` from ``B0``: ``B/B0`` (linear), ``sqrt(B/B0)`` (sqrt) or 1 (none).

    Raises:
        ConfigError: a batch size <= 0 or an unknown rule (the closest name is suggested).
    """
    ratio = check_number("batch_size", batch_size, low=0.0) / check_number(
        "base_batch_size", base_batch_size, low=0.0
    )
    rule = check_choice("rule", rule, RULES)
    return ratio if rule == "linear" else math.sqrt(ratio) if rule == "sqrt" else 1.0


@dataclass(frozen=True, repr=False)
class BatchCoupledLR(Schedule):
    """``lr(t) = base(t) * k(B(t))``: an LR that follows a batch-size schedule by a scaling rule.

    ``k(B) = B / B0`` (linear) or ``sqrt(B / B0)`` (sqrt). Built by :func:`linear_scaling` when the batch size
    is a schedule (e.g. :func:`~lrbs.schedules.batch_ramp`).
    """

    base: Schedule
    batch_size: Schedule
    base_batch_size: int
    rule: str = "linear"
    _name = "batch_coupled_lr"

    def __post_init__(self) -> None:
        for name in ("base", "batch_size"):
            if not isinstance(getattr(self, name), Schedule):
                raise LrbsTypeError(f"{name}={getattr(self, name)!r} is not allowed: must be a Schedule")
        object.__setattr__(self, "base_batch_size", check_int("base_batch_size", self.base_batch_size, low=1))
        check_choice("rule", self.rule, RULES)

    @property
    def total_steps(self) -> int | None:
        a, b = self.base.total_steps, self.batch_size.total_steps
        return None if a is None and b is None else max(x for x in (a, b) if x is not None)

    def _at(self, t: int) -> float:
        return self.base._at(t) * scaling_factor(self.batch_size._at(t), self.base_batch_size, self.rule)

    def _breaks(self, horizon: int) -> list[int]:
        return sorted(set(self.base._breaks(horizon)) | set(self.batch_size._breaks(horizon)))


def _schedule_object(name: str, value: Any) -> Schedule:
    """``value`` as a :class:`~lrbs.schedules.Schedule` object: a Schedule unchanged, a number ``>= 0`` as
    :func:`~lrbs.schedules.constant`.

    Unlike :func:`lrbs.train.as_schedule`, which gives ``fit`` a plain ``step -> value`` callable and accepts any
    callable, the recipes need a Schedule object (its algebra ``k * base``, :func:`~lrbs.schedules.warmup`, its
    break points), so a plain callable is refused here.

    Raises:
        LrbsTypeError: ``value`` is neither a number nor a Schedule (a bool or a plain callable included).
        ConfigError: a negative number.
    """
    if isinstance(value, Schedule):
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LrbsTypeError(f"{name}={value!r} is not allowed: must be a number or a Schedule")
    return constant(check_number(name, value, low=0.0, low_inclusive=True))


def linear_scaling(
    lr: float | Schedule,
    batch_size: int | Schedule,
    base_batch_size: int,
    rule: str = "linear",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    decay: str | None = None,
) -> Schedule:
    r"""The LR schedule for batch size ``B``, from an LR tuned at ``B0`` (Goyal et al. 2017).

    The peak LR is :math:`k\,\eta` with :math:`k = B/B_0` (``rule="linear"``) or :math:`\sqrt{B/B_0}`
    (``"sqrt"``). With ``warmup_steps = W > 0`` the LR ramps linearly from the *unscaled* :math:`\eta` to
    :math:`k\eta` over the first ``W`` steps (Goyal et al.'s gradual warmup, in steps rather than epochs):
    :math:`\eta_t = \eta + (k\eta - \eta)\,t/W`. After the warmup:

    - ``decay=None`` / ``"constant"``: :math:`k\eta` (or :math:`k\,\eta(t - W)` when ``lr`` is a schedule, which
      as in :func:`~lrbs.schedules.warmup` starts after the warmup);
    - ``"cosine"`` / ``"linear"``: from :math:`k\eta` to 0 at step ``total_steps`` (which includes the warmup).

    When ``batch_size`` is a schedule (a ramp), the LR follows it: :math:`\eta_t = \eta(t)\,k(B(t))`
    (:class:`BatchCoupledLR`); the batch ramp then plays the warmup's part, so ``warmup_steps`` must be 0.

    Args:
        lr: the LR at ``base_batch_size``: a number or a Schedule.
        batch_size: the batch size actually used (the *global* batch: per-rank x world x accumulation), or a
            batch-size schedule.
        base_batch_size: ``B0``, the batch the LR was tuned for.
        rule: ``"linear"``, ``"sqrt"`` or ``"none"``.
        warmup_steps: gradual warmup length ``W`` (0: none).
        total_steps: the run length, needed by the ``cosine`` and ``linear`` decays.
        decay: ``None``, ``"constant"``, ``"cosine"`` or ``"linear"`` (only with a numeric ``lr``).

    Returns:
        A :class:`~lrbs.schedules.Schedule` (``fit(lr=...)`` accepts it).

    Raises:
        ConfigError: unknown rule or decay (the closest name is suggested), a batch size <= 0, a decay without
            ``total_steps``, ``warmup_steps >= total_steps``, a decay with a schedule ``lr``, or a warmup with a
            batch-size schedule.
        LrbsTypeError: ``lr`` or ``batch_size`` of the wrong type.

    Example:
        >>> s = linear_scaling(0.1, 1024, 256, warmup_steps=4)
        >>> [round(s(t), 3) for t in range(6)]
        [0.1, 0.175, 0.25, 0.325, 0.4, 0.4]

    References:
        Goyal et al., "Accurate, Large Minibatch SGD", 2017 (arXiv 1706.02677), Sec. 2.1-2.2.
        Hoffer et al., "Train longer, generalize better", 2017 (arXiv 1705.08741) for the square-root rule.
    """
    rule = check_choice("rule", rule, RULES)
    base_batch_size = check_int("base_batch_size", base_batch_size, low=1)
    warmup_steps = check_int("warmup_steps", warmup_steps, low=0)
    if decay is not None:
        decay = check_choice("decay", decay, DECAYS)
    if total_steps is not None:
        total_steps = check_int("total_steps", total_steps, low=1)
    base = _schedule_object("lr", lr)
    if isinstance(batch_size, Schedule):
        return _batch_coupled(base, batch_size, base_batch_size, rule, warmup_steps, decay)
    batch_size = check_int("batch_size", batch_size, low=1)
    k = scaling_factor(batch_size, base_batch_size, rule)
    if decay in ("cosine", "linear"):
        scaled = _decayed(lr, k, decay, warmup_steps, total_steps)
    else:
        scaled = k * base if k != 1.0 else base
    if warmup_steps == 0:
        return scaled
    return warmup(scaled, warmup_steps, start=base(0))


def _batch_coupled(
    base: Schedule,
    batch_size: Schedule,
    base_batch_size: int,
    rule: str,
    warmup_steps: int,
    decay: str | None,
) -> BatchCoupledLR:
    """:func:`linear_scaling` for a batch-size schedule: the LR follows the ramp (no warmup, no decay)."""
    if warmup_steps:
        raise ConfigError(
            f"warmup_steps={warmup_steps} is not allowed with a batch-size schedule: the LR already follows the "
            "batch ramp; give warmup_steps=0"
        )
    if decay not in (None, "constant"):
        raise ConfigError(
            f"decay={decay!r} is not allowed with a batch-size schedule: pass the decayed LR as a Schedule"
        )
    return BatchCoupledLR(base, batch_size, base_batch_size, rule)


def _decayed(lr: Any, k: float, decay: str, warmup_steps: int, total_steps: int | None) -> Schedule:
    """The post-warmup part of :func:`linear_scaling`'s ``cosine`` / ``linear`` decay: from ``k lr`` to 0 over
    ``total_steps - warmup_steps`` steps (``lr`` a number)."""
    if isinstance(lr, Schedule):
        raise ConfigError(
            f"decay={decay!r} is not allowed with a Schedule lr: put the decay into that schedule"
        )
    if total_steps is None:
        raise ConfigError(f"decay={decay!r} needs total_steps= (the run length, warmup included)")
    if warmup_steps >= total_steps:
        raise ConfigError(f"warmup_steps={warmup_steps} is not allowed: must be < total_steps={total_steps}")
    peak = float(lr) * k
    rest = total_steps - warmup_steps
    return cosine(peak, rest) if decay == "cosine" else linear(peak, 0.0, rest)


def small_batch_warmup(
    small: int,
    large: int,
    switch_step: int,
    *,
    lr: float | None = None,
    rule: str | None = None,
    base_batch_size: int | None = None,
) -> Schedule | LrAndBatch:
    """Train with batch ``small`` for ``switch_step`` steps, then with ``large``.

    Keskar et al. (2017, Sec. 4) observe that a few epochs of small-batch training before switching to a large
    batch steer the run away from sharp minima; the schedule is ``B(t) = small`` for ``t < switch_step``, else
    ``large`` (:func:`~lrbs.schedules.batch_step`). With ``lr`` and ``rule`` also given, the LR that goes with
    each batch is returned too: ``lr * k(B(t))`` with ``k`` from :func:`scaling_factor` relative to
    ``base_batch_size`` (default ``small``).

    Returns:
        The batch-size schedule, or ``LrAndBatch(lr, batch_size)`` when ``lr`` and ``rule`` are given.

    Raises:
        ConfigError: sizes < 1, ``large <= small``, ``switch_step < 1``, an unknown rule, or only one of ``lr`` and
            ``rule``.
    """
    small = check_int("small", small, low=1)
    large = check_int("large", large, low=1)
    if large <= small:
        raise ConfigError(f"large={large} is not allowed with small={small}: must be > small")
    switch_step = check_int("switch_step", switch_step, low=1)
    batches = batch_step([small, large], [switch_step])
    if lr is None and rule is None:
        return batches
    if lr is None or rule is None:
        raise ConfigError(
            f"give both lr= and rule= for the matching LR schedule (got lr={lr!r}, rule={rule!r})"
        )
    lr = check_number("lr", lr, low=0.0)
    b0 = small if base_batch_size is None else check_int("base_batch_size", base_batch_size, low=1)
    lrs = [constant(lr * scaling_factor(b, b0, rule)) for b in (small, large)]
    return LrAndBatch(join(lrs, [switch_step]), batches)


def accumulation_plan(batch_size: int, max_micro_batch: int) -> tuple[int, ...]:
    """The micro-batch sizes ``fit(max_micro_batch=m)`` accumulates into one batch of ``B``.

    ``B`` is cut into consecutive chunks of ``m`` and a last, smaller one: ``(m, ..., m, B mod m)``. Each
    micro-batch loss is weighted by its share ``b_i / B``, so the accumulated gradient equals the gradient of the
    whole batch (for models without BatchNorm; BatchNorm sees micro-batch statistics, as "ghost batch norm").

    Example:
        >>> accumulation_plan(1000, 256)
        (256, 256, 256, 232)

    Raises:
        ConfigError: ``batch_size < 1`` or ``max_micro_batch < 1``.
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    max_micro_batch = check_int("max_micro_batch", max_micro_batch, low=1)
    full, rest = divmod(batch_size, max_micro_batch)
    return (max_micro_batch,) * full + ((rest,) if rest else ())
