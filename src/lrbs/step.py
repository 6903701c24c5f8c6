"""THE training step: forward under a precision, loss through the batch protocol, backward, optimizer step.

``fit``, ``ddp_train`` and the range test share :class:`TrainStep`; the loops around it own only what differs
(sampling and schedules, the LR sweep, the process group). One step on micro-batches :math:`b_1, \\dots, b_k`
with loss scales :math:`c_i` is

.. math::

    g = \\nabla_w \\sum_i c_i L(w; b_i), \\qquad L_{\\text{step}} = \\sum_i c_i L(w; b_i),

then (optionally) SAM's second pass at :math:`w + \\hat\\epsilon`, gradient clipping to
:math:`\\|g\\|_2 \\le` ``clip_grad_norm``, and one optimizer step. With :math:`c_i = w_i / \\sum_j w_j`
(:math:`w_i` the micro-batch's weight, by default its number of samples) the accumulated gradient is the
gradient of the full batch's sample-weighted mean loss. The LR schedule of the caller advances once per
optimizer step, never per micro-batch.

**Precision** (Lightning's names): ``"32"``, ``"bf16-mixed"`` (autocast to bfloat16, CPU or GPU) and
``"16-mixed"`` (autocast to float16 with a ``torch.amp.GradScaler``, CUDA only). The GradScaler multiplies the
loss by :math:`s` before backward and divides the gradients by :math:`s` before the step; a step whose
gradients hold an inf or NaN is skipped and :math:`s` halves. :meth:`TrainStep.update` returns False for a
skipped step, so callers do not count it as an LR step. Under the scaler, SAM unscales before its ascent step
and skips both passes' update when either pass's gradients are not finite (davda54/sam #97).

The BatchNorm helpers that keep SAM's second pass from moving the running statistics live here too
(:func:`frozen_running_stats`, re-exported by :mod:`lrbs.optim`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .batches import BatchLoss, model_device
from .errors import ConfigError, LrbsTypeError, check_choice, check_positive

__all__ = [
    "PRECISIONS",
    "StepResult",
    "TrainStep",
    "autocast",
    "check_precision",
    "disable_running_stats",
    "enable_running_stats",
    "frozen_running_stats",
    "is_sam",
    "make_grad_scaler",
]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")


# ----------------------------------------------------------------------------------------------- precision
def check_precision(precision: Any, device: torch.device | str) -> str:
    """Validate ``precision`` for ``device``: one of :data:`PRECISIONS`; ``16-mixed`` needs a CUDA device."""
    if precision in (32, "32-true", "fp32"):
        precision = "32"
    check_choice("precision", precision, PRECISIONS)
    if precision == "16-mixed" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"precision='16-mixed' is not allowed on device {torch.device(device)}: float16 autocast with a "
            "GradScaler needs a CUDA GPU; use precision='bf16-mixed' (CPU or GPU) or '32'"
        )
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a null context for ``"32"``)."""
    if precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device | str) -> Any:
    """A ``torch.amp.GradScaler`` for ``16-mixed``, else None."""
    if precision != "16-mixed":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


# ----------------------------------------------------------------------------------------------- BatchNorm
def _bn_modules(model: nn.Module) -> Iterator[_NormBase]:
    for m in model.modules():
        if isinstance(m, _NormBase) and m.track_running_stats:
            yield m


def disable_running_stats(model: nn.Module) -> None:
    """Freeze the running statistics of every BatchNorm (and tracking InstanceNorm) layer in ``model``.

    Sets each layer's ``momentum`` to 0 and saves ``running_mean``, ``running_var`` and
    ``num_batches_tracked``; :func:`enable_running_stats` restores the momentum and those buffers, so
    a forward pass in between leaves them exactly as they were (``num_batches_tracked`` included, which
    momentum 0 alone would not). Batch statistics are still used for normalisation in train mode.

    Args:
        model: the model; layers are found with ``model.modules()``.
    """
    for m in _bn_modules(model):
        if hasattr(m, "_lrbs_backup"):
            continue  # already disabled: keep the first backup
        buffers = {
            k: b.detach().clone()
            for k, b in (
                ("running_mean", m.running_mean),
                ("running_var", m.running_var),
                ("num_batches_tracked", m.num_batches_tracked),
            )
            if b is not None
        }
        m._lrbs_backup = (m.momentum, buffers)
        m.momentum = 0.0


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`: restore each layer's momentum and its saved running statistics.

    Args:
        model: the model passed to :func:`disable_running_stats`.
    """
    for m in _bn_modules(model):
        backup = m.__dict__.pop("_lrbs_backup", None)
        if backup is None:
            continue
        momentum, buffers = backup
        m.momentum = momentum
        with torch.no_grad():
            for k, b in buffers.items():
                getattr(m, k).copy_(b)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: :func:`disable_running_stats` on entry, :func:`enable_running_stats` on exit.

    Args:
        model: the model whose normalisation layers are frozen.

    Yields:
        The model.
    """
    disable_running_stats(model)
    try:
        yield model
    finally:
        enable_running_stats(model)


# ----------------------------------------------------------------------------------------------- the step
def _unit_weight(batch: Any) -> float:
    return 1.0


def is_sam(optimizer: Any) -> bool:
    """Whether ``optimizer`` takes SAM's two passes (it has ``first_step`` and ``second_step``)."""
    return hasattr(optimizer, "first_step") and hasattr(optimizer, "second_step")


class StepResult(NamedTuple):
    """What one :class:`TrainStep` call gave.

    Attributes:
        loss: the step's loss :math:`\\sum_i c_i L(w; b_i)` at the weights before the update (detached 0-d
            tensor; no host sync was made to get it).
        losses: each micro-batch's scaled loss :math:`c_i L(w; b_i)` (detached), in order.
        applied: False when the GradScaler skipped the update (non-finite gradients): not an LR step.
    """

    loss: torch.Tensor
    losses: tuple[torch.Tensor, ...]
    applied: bool


class TrainStep:
    """The one training step, configured once and called per step (see the module docstring).

    Args:
        model: the module to train (a ``DistributedDataParallel`` wrapper too: gradients are then all-reduced
            only on the last micro-batch, through its ``no_sync``).
        optimizer: any ``torch.optim.Optimizer``; a SAM-like optimizer (``first_step`` / ``second_step``, e.g.
            :class:`lrbs.optim.SAM`) gets its two passes, the second with BatchNorm statistics frozen.
        batch_loss: how a batch becomes a loss (:class:`lrbs.batches.BatchLoss`; default: tuples with
            cross-entropy, mappings with the model's own loss).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA only).
        clip_grad_norm: clip the gradient's global 2-norm to this before the step (after unscaling); None: no
            clipping.
        device: the device whose autocast is used (default: the model's).
        scaler: a ``torch.amp.GradScaler`` to use instead of the one ``16-mixed`` creates (e.g. a CPU scaler in
            tests, or one whose state the caller keeps across runs).

    Attributes:
        skipped: how many updates the GradScaler skipped so far.

    Raises:
        ConfigError: an unknown precision, ``16-mixed`` without CUDA, ``clip_grad_norm <= 0``, a GradScaler with
            a SAM optimizer that is not :class:`lrbs.optim.SAM`.
        LrbsTypeError: ``model`` is not a module or ``optimizer`` not an optimizer.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        batch_loss: BatchLoss | None = None,
        *,
        precision: str = "32",
        clip_grad_norm: float | None = None,
        device: torch.device | str | None = None,
        scaler: Any = None,
    ):
        if not isinstance(model, nn.Module):
            raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise LrbsTypeError(
                f"optimizer={type(optimizer).__name__} is not allowed: must be a torch.optim.Optimizer"
            )
        device = model_device(model) if device is None else torch.device(device)
        self.model, self.optimizer = model, optimizer
        self.batch_loss = batch_loss if batch_loss is not None else BatchLoss()
        self.precision = check_precision(precision, device)
        self.device_type = device.type
        self.scaler = scaler if scaler is not None else make_grad_scaler(self.precision, device)
        self.clip = None if clip_grad_norm is None else check_positive("clip_grad_norm", clip_grad_norm)
        self.sam = is_sam(optimizer)
        if self.scaler is not None and self.sam and not hasattr(optimizer, "restore_weights"):
            raise ConfigError(
                f"optimizer={type(optimizer).__name__} is not allowed with a GradScaler (precision='16-mixed'): "
                "SAM under a GradScaler needs lrbs.optim.SAM (it restores the weights without stepping when a "
                "pass is skipped); use precision='bf16-mixed' or '32'"
            )
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.no_sync = getattr(model, "no_sync", None)
        self.lean = self.precision == "32" and self.scaler is None and self.no_sync is None
        self.skipped = 0
        # compute_loss batches may hold no tensor: the step needs no weight, so it evaluates with a constant one
        cl = self.batch_loss.compute_loss
        self._compute = None if cl is None else BatchLoss(compute_loss=cl, batch_weight=_unit_weight)

    # -- the halves ---------------------------------------------------------------------------------------------
    def loss(self, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch at the current weights (under autocast when mixed precision)."""
        bl = self.batch_loss
        if self._compute is not None:
            return self._compute.evaluate(self.model, batch).loss
        return bl.loss_of(bl.output(self.model, batch), batch)

    def forward_backward(
        self,
        micro_batches: Sequence[Any],
        scales: Sequence[float] | None = None,
        divisor: int | None = None,
        *,
        zero_grad: bool = True,
    ) -> tuple[torch.Tensor, ...]:
        """Forward, loss and backward of every micro-batch; the gradients accumulate in ``.grad``.

        Args:
            micro_batches: the step's batches (one for a plain step).
            scales: multiply micro-batch ``i``'s loss by ``scales[i]`` (e.g. ``len(b_i) / B``); None: 1.
            divisor: divide every loss by this instead (the mean of equal micro-batches, ``L_i / k``).
            zero_grad: zero the gradients first (``set_to_none=True``).

        Returns:
            Each micro-batch's scaled loss, detached.
        """
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        if self.lean and scales is None and divisor is None and len(micro_batches) == 1:
            lo = self.loss(micro_batches[0])  # the common case: no context, no rescaling
            lo.backward()
            return (lo.detach(),)
        out = []
        last = len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            sync = self.no_sync() if self.no_sync is not None and i < last else contextlib.nullcontext()
            with sync:
                with autocast(self.precision, self.device_type):
                    lo = self.loss(batch)
                if scales is not None:
                    lo = lo * scales[i]
                elif divisor is not None:
                    lo = lo / divisor
                (self.scaler.scale(lo) if self.scaler is not None else lo).backward()
            out.append(lo.detach())
        return tuple(out)

    def update(
        self,
        micro_batches: Sequence[Any] = (),
        scales: Sequence[float] | None = None,
        divisor: int | None = None,
    ) -> bool:
        """Clip, step (SAM: the second pass on the same micro-batches and scales first); True if applied.

        Returns:
            False when the GradScaler found non-finite gradients and skipped the update (the scale is lowered);
            True otherwise.
        """
        if self.sam:
            return self._sam_update(micro_batches, scales, divisor)
        opt, scaler = self.optimizer, self.scaler
        if scaler is None:
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            opt.step()
            return True
        before = scaler.get_scale()
        if self.clip is not None:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        scaler.step(opt)
        return self._scaler_update(before)

    def __call__(
        self,
        micro_batches: Sequence[Any],
        scales: Sequence[float] | None = None,
        divisor: int | None = None,
    ) -> StepResult:
        """One full step: zero the gradients, :meth:`forward_backward`, :meth:`update`."""
        losses = self.forward_backward(micro_batches, scales, divisor)
        applied = self.update(micro_batches, scales, divisor)
        total = losses[0]
        for lo in losses[1:]:
            total = total + lo
        return StepResult(total, losses, applied)

    # -- internals ----------------------------------------------------------------------------------------------
    def _scaler_update(self, before: float) -> bool:
        self.scaler.update()
        applied = self.scaler.get_scale() >= before  # the scale only drops when a step was skipped
        self.skipped += not applied
        return applied

    def _sam_update(self, micro_batches, scales, divisor) -> bool:
        opt, scaler = self.optimizer, self.scaler
        if not micro_batches:
            raise ConfigError(
                "a SAM step needs its micro-batches again for the second pass: pass them to update()"
            )
        before = None
        if scaler is not None:
            before = scaler.get_scale()
            scaler.unscale_(opt)  # the ascent step needs the true gradient
            grads = [p.grad for p in self.params if p.grad is not None]
            if not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))):
                return self._scaler_update(before)  # skip both passes; the scale drops
        opt.first_step(zero_grad=True)
        with frozen_running_stats(self.model):  # BN statistics are not updated by the second pass
            self.forward_backward(micro_batches, scales, divisor, zero_grad=False)
        if scaler is None:
            if self.clip is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            opt.second_step(zero_grad=False)
            return True
        opt.restore_weights()  # back to w; the base optimizer steps only if the second pass is finite
        base = opt.base_optimizer
        if self.clip is not None:
            scaler.unscale_(base)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        scaler.step(base)
        return self._scaler_update(before)
