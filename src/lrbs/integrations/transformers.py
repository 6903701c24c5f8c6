"""HuggingFace ``transformers.Trainer``: a callback that measures the noise scale and sharpness, and an LR finder.

Example (a ``Trainer`` you already have)::

    from lrbs.integrations.transformers import LrbsCallback, attach, find_lr

    result = find_lr(trainer, apply=True)          # writes trainer.args.learning_rate
    attach(trainer, LrbsCallback(sharpness_every=50))
    trainer.train()                                # lrbs/* in trainer.state.log_history and report_to

What the numbers mean and how they are computed: :mod:`lrbs.integrations.measure`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..batches import MapSource, as_source
from ..errors import ConfigError, LrbsTypeError
from .measure import (
    GradCapture,
    MeasurementWarning,
    current_lr,
    protected_rng,
    recommended_lr,
    require,
    size_or_none,
    sum_over_ranks,
    trainable_parameters,
)
from .monitor import Monitor

# The measure imports above and the pin below have lightning.py's shape on purpose: each glue module takes the
# same framework-free pieces from measure.py and pins its own framework (nothing left to share).
MIN_TRANSFORMERS = "4.40"  # the lrbs[transformers] extra's pin; tested with 5.24
REQUIRES = ("transformers", MIN_TRANSFORMERS, "transformers")  # module, minimum version, lrbs extra
_hf = require(*REQUIRES)

__all__ = ["LrbsCallback", "attach", "find_lr", "MIN_TRANSFORMERS", "MeasurementWarning"]

log = logging.getLogger(__name__)


def _shifts_labels(model: Any) -> bool:
    """Whether the model's own loss shifts labels by one (causal LMs), i.e. counts ``labels[..., 1:]``.

    Read from the loss the model computes (``model.loss_function``: a GPT-2 without a ``loss_type`` falls back to
    the causal-LM loss), not from ``loss_type`` alone as the Trainer's item count does: the share of a micro-batch
    is the items its loss sums over ``num_items_in_batch``, whatever the Trainer counted there.
    """
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # transformers < 4.46: no item-normalised losses either
        return False
    is_ed = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
    try:
        loss = model.loss_function
    except Exception:  # a model without the loss-function mechanism
        return False
    return loss is ForCausalLMLoss and not is_ed


def _labels(kwargs: dict, shift: bool) -> tuple[torch.Tensor | None, bool]:
    """The tensor whose items (entries other than -100) the model's loss sums over ``num_items_in_batch``, and
    whether that is ``labels[..., 1:]`` (None: no such tensor). A reference, read later by :func:`_label_counts`."""
    labels = kwargs.get("shift_labels")
    shifted = False
    if labels is None:
        labels, shifted = kwargs.get("labels"), shift
    return (labels, shifted) if isinstance(labels, torch.Tensor) else (None, False)


def _label_counts(labels: list[torch.Tensor], shifted: list[bool]) -> torch.Tensor:
    """The label items of each micro-batch (entries other than -100; of ``labels[..., 1:]`` where shifted) as one
    int64 tensor: one stack and one count for labels of one shape, dtype and device (the usual case, no device
    sync), else one count per micro-batch."""
    first = labels[0]
    same = all(t.shape == first.shape and t.dtype == first.dtype and t.device == first.device for t in labels)
    if same and first.dim() and all(f == shifted[0] for f in shifted):
        stacked = torch.stack(labels)
        if shifted[0]:
            stacked = stacked[..., 1:]
        return stacked.ne(-100).flatten(1).sum(1)
    return torch.stack([(t[..., 1:] if f else t).ne(-100).sum() for t, f in zip(labels, shifted)])


class _Items:
    """The label items of the micro-batches of consecutive steps, counted together (:func:`_label_counts`: one
    pass for labels of one shape) when first read, or as soon as the labels held reach :data:`_HELD_LABELS`
    bytes; until then references to the labels, no copy (the Trainer leaves them as they are; a model that edited
    its labels in place during the forward would be counted after the edit). Takes no more labels once counted
    (``tried``)."""

    def __init__(self) -> None:
        self.labels: list[torch.Tensor] = []
        self.shifted: list[bool] = []
        self.nbytes = 0
        self.counts: torch.Tensor | None = None
        self.values: list[int] | None = None
        self.tried = False

    def add(self, labels: list[torch.Tensor], shifted: list[bool]) -> tuple[int, int]:
        """Hold one step's labels; their positions in the group."""
        start = len(self.labels)
        self.labels += labels
        self.shifted += shifted
        self.nbytes += sum(t.nelement() * t.element_size() for t in labels)
        if self.nbytes >= _HELD_LABELS:
            self.count()
        return start, start + len(labels)

    def count(self) -> None:
        """Count every micro-batch held (asynchronously on an accelerator) and let the labels go."""
        self.tried = True
        try:
            self.counts = _label_counts(self.labels, self.shifted)
        except Exception:  # left to each step's own count in read()
            return
        self.labels, self.shifted = [], []

    def read(self, start: int, stop: int) -> list[int] | None:
        """The counts of the micro-batches at ``start:stop`` (None where they cannot be counted)."""
        if not self.tried:
            self.count()
        if self.counts is None:  # a batch the one pass cannot count: this step on its own
            try:
                return _label_counts(self.labels[start:stop], self.shifted[start:stop]).tolist()
            except Exception:  # never break training; equal shares are assumed instead
                return None
        if self.values is None:
            self.values = self.counts.tolist()
        return self.values[start:stop]


_HELD_LABELS = 4 * 2**20  # bytes of labels an _Items holds before it counts them


def _scalar(x: Any) -> float:
    """A count the Trainer passes as a number or a tensor (expanded over GPUs under DataParallel): its value."""
    if isinstance(x, torch.Tensor):
        return float(x.item() if x.numel() == 1 else x.reshape(-1)[0].item())
    return float(x)


def _map_source(dataset: Any, collate_fn: Callable | None) -> Any:
    """A map-style dataset (torch or HF ``datasets``) read through the Trainer's collator, else None."""
    if dataset is None or isinstance(
        dataset, (torch.utils.data.IterableDataset, torch.utils.data.DataLoader)
    ):
        return None
    try:
        len(dataset)
    except TypeError:
        return None
    return MapSource(dataset, collate_fn=collate_fn)


class LrbsCallback(Monitor, _hf.TrainerCallback):
    r"""A ``TrainerCallback`` that logs the gradient noise scale and the sharpness while the Trainer trains.

    **Noise scale** (``noise_scale=True``): free with ``gradient_accumulation_steps >= 2`` or under data
    parallelism (DDP, ``world_size > 1``; also both). Tensor hooks read each micro-batch's gradient contribution —
    under DDP this rank's local one, before the all-reduce — and the accumulated gradient before clipping (under
    DDP the all-reduced one); shares: the Trainer's own normalisation, ``1/k``, or the label items of each
    micro-batch over ``num_items_in_batch`` when the model normalises by it (times the world size when
    ``average_tokens_across_devices``, as ``Trainer.compute_loss`` scales the loss).
    :func:`~lrbs.integrations.measure.micro_estimate` turns every optimizer step into one estimate of ``|G|^2``
    and ``tr Sigma`` (small batch: a micro-batch of one rank; big batch: the all-reduced, accumulated gradient's
    ``k x world_size`` micro-batches); the logged ``lrbs/b_simple`` is the ratio of their means over the last
    ``window`` steps with its bootstrap interval (``lrbs/b_simple_low`` / ``_high``), in samples (sequences) per
    batch. Cost: a tensor hook per parameter and one squared norm per backward, one more per step, and a reference
    to each micro-batch's labels; on one process the step's numbers wait as tensors and are solved, label items
    counted, many steps at once when the callback logs (about 2% of a tiny GPT-2's step in all, bench/RESULTS.md);
    under DDP each step is solved at once, with one blocking ``all_reduce`` of 6 float64 numbers per optimizer step
    (a collective's latency). Under DeepSpeed or FSDP (sharded gradients), and with accumulation 1
    on one process, ``probe_data`` is needed (held data, or ``"train"``): every ``log_every`` steps
    :func:`lrbs.noise_scale` runs on ``probe_draws`` batches of ``probe_micro_batches x per_device_train_batch_size``
    samples, i.e. ``probe_draws x probe_micro_batches`` extra forward-backward passes of a micro-batch plus a copy of
    the model; its wall time is logged as ``lrbs/probe_seconds``.

    **Sharpness** (``sharpness_every=n``): every ``n`` optimizer steps, the top Hessian eigenvalue
    ``lrbs/lambda_max`` of the loss on a fixed, seeded subset of ``sharpness_samples`` training samples (collated by
    the Trainer's collator), on a private copy of the model in eval mode (dropout off), warm-started from the last
    eigenvector; ``lrbs/lambda_max_x_lr`` is the current LR times it and ``lrbs/eos_threshold`` the optimizer's
    stability bound where one applies (2 for SGD; none for AdamW, the Trainer's default — see
    :mod:`lrbs.integrations.measure`).

    **Logging.** Values measured since the last log are added to the Trainer's log row
    (``trainer.state.log_history``) at each ``on_log``; to reach ``report_to`` integrations (TensorBoard, W&B, ...),
    which run before user callbacks, put this callback first with :func:`attach`. Every measurement runs on a copy
    or through read-only hooks, under a saved-and-restored random state: training with the callback gives the same
    weights as without it. A measurement that fails is a :class:`~lrbs.integrations.measure.MeasurementWarning`
    with the reason, and training goes on.

    Args: those of :class:`~lrbs.integrations.monitor.Monitor` (its ``__init__``: the one signature of both
    callbacks).

    Raises:
        ConfigError: ``sharpness_every`` or ``log_every`` < 1, bad sizes; at ``on_train_begin``, all parameters
            frozen, or accumulation 1 on one process (or sharded gradients) without probe data.
        DependencyError: transformers missing or older than :data:`MIN_TRANSFORMERS`.
    """

    requires = REQUIRES
    _handle: Any = None
    _scale = 1.0
    _lr: float | None = None
    _world, _across, _reduce = 1, False, None
    _shift = False

    # ---- setup
    def on_train_begin(
        self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs
    ):
        loader = train_dataloader
        dataset = getattr(loader, "dataset", None)
        collate = getattr(loader, "collate_fn", None)
        train_source = _map_source(dataset, collate)
        world = int(getattr(args, "world_size", 1) or 1)
        self._micro: list[tuple] = []
        self._items = _Items()
        sharded = bool(getattr(args, "deepspeed", None) or getattr(args, "fsdp", None))
        self._world = world
        self._across = world > 1 and bool(getattr(args, "average_tokens_across_devices", False))
        self._reduce = sum_over_ranks(world)
        self.start(
            model,
            accumulation=int(args.gradient_accumulation_steps),
            world=world,
            free_possible=not sharded and (world == 1 or GradCapture.engine_queue() is not None),
            micro_batch=int(args.per_device_train_batch_size),
            num_samples=train_source.num_samples if train_source is not None else None,
            train_source=train_source,
            probe_source=self._probe_source(train_source, collate),
            log_every=_logging_steps(args, state),
            total_when=_sync_now,
        )
        if self.free:
            self._shift = _shifts_labels(model)
            self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _probe_source(self, train_source: Any, collate: Callable | None) -> Any:
        data = self.probe_data
        if data is None:
            return None
        if isinstance(data, str):
            if data != "train":
                raise ConfigError(f"probe_data={data!r} is not allowed: 'train', a dataset, or None")
            if train_source is None:
                raise ConfigError("probe_data='train' needs a map-style training dataset (it has no length)")
            return train_source
        return _map_source(data, collate) or as_source(data, name="probe_data")

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        """Per forward: the sample count and a reference to the labels (counted later, many steps at once)."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, generation
        num_items = kwargs.get("num_items_in_batch")
        labels, shifted = _labels(kwargs, self._shift) if num_items is not None else (None, False)
        self._micro.append((size_or_none(kwargs if kwargs else args), labels, shifted, num_items))

    # ---- per step
    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        self.begin_step()
        self._micro = []
        scaler = getattr(optimizer, "scaler", None)
        self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._lr = current_lr(optimizer) if optimizer is not None else None  # before the scheduler moves it

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        step = int(state.global_step)
        if self.free:
            micro, self._micro = self._micro, []
            self.end_step(  # total: the capture's, read before unscaling (end_step divides it by micro_scale**2)
                step,
                [m[0] for m in micro],
                self._shares(micro),
                micro_scale=self._scale,
                all_reduce=self._reduce,
            )
        self.after_step(step, model, optimizer, lr=self._lr)

    def _shares(self, micro: list[tuple]) -> list[float] | Callable[[], list[float]]:
        """Each micro-batch's share in this rank's accumulated gradient, as its loss was normalised: its label
        items over ``num_items_in_batch`` (which ``compute_loss`` multiplies by the world size when that counts
        the items of every rank, ``average_tokens_across_devices``), else ``1/k``. A function that returns them
        when the step is solved: the items of many steps are counted at once (:class:`_Items`)."""
        equal = [1.0 / max(1, len(micro))] * len(micro)
        if not micro or any(m[1] is None for m in micro):
            return equal
        if self._items.tried:
            self._items = _Items()
        items = self._items
        start, stop = items.add([m[1] for m in micro], [m[2] for m in micro])
        num_items, div = micro[-1][3], (self._world if self._across else 1)

        def shares() -> list[float]:
            counts = items.read(start, stop)
            total = _scalar(num_items) / div
            return [c / total for c in counts] if counts is not None and total > 0 else equal

        return shares

    def on_log(self, args, state, control, logs=None, **kwargs):
        out = self.publish(int(state.global_step))
        if not out:
            return
        if logs is not None:
            logs.update(out)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(out)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def _logging_steps(args: Any, state: Any) -> int:
    """``args.logging_steps`` in steps (a value below 1 is a fraction of the run, as the Trainer reads it)."""
    every = float(args.logging_steps)
    if every < 1:
        every = every * max(1, int(state.max_steps or 1))
    return max(1, math.ceil(every))


def _sync_now() -> bool:
    """Whether the current backward is the last of the accumulation (accelerate's shared gradient state)."""
    if not _GRADIENT_STATE:
        from accelerate.state import GradientState

        _GRADIENT_STATE.append(GradientState())  # a shared-state object: one instance sees every update
    return bool(_GRADIENT_STATE[0].sync_gradients)


_GRADIENT_STATE: list[Any] = []


def attach(trainer: Any, callback: LrbsCallback | None = None, **kwargs: Any) -> LrbsCallback:
    """Put ``callback`` (or ``LrbsCallback(**kwargs)``) first among the Trainer's callbacks and return it.

    First, so that the values it adds in ``on_log`` reach the ``report_to`` integrations (TensorBoard, W&B, ...),
    which the Trainer places before user callbacks.
    """
    require(*REQUIRES)
    if callback is None:
        callback = LrbsCallback(**kwargs)
    elif kwargs:
        raise ConfigError("give a callback or its keyword arguments, not both")
    if not isinstance(callback, LrbsCallback):
        raise LrbsTypeError(f"callback={type(callback).__name__} is not allowed: must be an LrbsCallback")
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


# --------------------------------------------------------------------------------------------- find_lr
def _precision(args: Any) -> str:
    if getattr(args, "fp16", False):
        return "16-mixed"
    if getattr(args, "bf16", False):
        return "bf16-mixed"
    return "32"


def _fresh_optimizer(trainer: Any) -> torch.optim.Optimizer:
    """The optimizer ``trainer.create_optimizer()`` builds, without leaving it on the trainer."""
    saved = trainer.optimizer
    trainer.optimizer = None
    try:
        return trainer.create_optimizer()
    finally:
        trainer.optimizer = saved


def _train_loader(trainer: Any) -> Any:
    """``trainer.get_train_dataloader()`` under a forked RNG (accelerate seeds the sampler from torch's RNG)."""
    acc = getattr(trainer, "accelerator", None)
    known = list(getattr(acc, "_dataloaders", []) or [])
    with protected_rng(getattr(trainer.args, "device", None)):
        loader = trainer.get_train_dataloader()
    registry = getattr(acc, "_dataloaders", None)
    if isinstance(registry, list) and loader in registry and loader not in known:
        registry.remove(loader)  # accelerate remembers prepared loaders; leave it as it was
    return loader


def find_lr(
    trainer: Any,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    apply: bool = False,
    seed: int | None = None,
    **range_test_kwargs: Any,
) -> Any:
    """The LR range test (:func:`lrbs.lr_range_test`) on the Trainer's own model, optimizer, data and settings.

    The optimizer is the one the Trainer would build (``trainer.create_optimizer()``, not kept; or the one passed
    in ``optimizers=``), the data its train DataLoader (collator, batch size, column removal), the loss
    ``trainer.compute_loss``, the precision ``args.bf16`` / ``args.fp16`` and the accumulation
    ``args.gradient_accumulation_steps``. Everything is restored bit-exactly afterwards — the model's parameters,
    buffers and gradients, the optimizer's state, the torch / numpy / python random states (so the Trainer's data
    order is unchanged) — and ``trainer.train()`` then runs exactly as it would have.

    Args:
        trainer: a ``transformers.Trainer`` with a ``train_dataset``.
        start_lr, end_lr, num_iter: the sweep (see :func:`lrbs.lr_range_test`).
        apply: write the recommended LR (``result.recommended()``) to ``trainer.args.learning_rate``, where the
            Trainer reads it when it builds the optimizer and scheduler (and to the param groups of an optimizer
            passed in ``optimizers=``). Where it went is recorded in ``result.settings["applied"]`` and logged.
        seed: seeds the sweep's data order (default ``args.seed``).
        **range_test_kwargs: passed on (``mode``, ``smoothing``, ``diverge_factor``, ``repeats``, ...).

    Returns:
        The :class:`~lrbs.RangeTestResult`.

    Raises:
        ConfigError: the trainer has no ``train_dataset``, or all parameters are frozen.
        DependencyError: transformers missing or too old.
    """
    require(*REQUIRES)
    from ..range_test import lr_range_test

    if getattr(trainer, "train_dataset", None) is None:
        raise ConfigError(
            "trainer.train_dataset is None: find_lr needs the training data; pass train_dataset= to the Trainer"
        )
    model = trainer.model
    trainable_parameters(model)
    args = trainer.args
    loader = _train_loader(trainer)
    optimizer = trainer.optimizer if trainer.optimizer is not None else _fresh_optimizer(trainer)
    res = lr_range_test(
        model,
        optimizer,
        data=loader,
        compute_loss=lambda m, b: trainer.compute_loss(m, b),
        precision=_precision(args),
        accumulation_steps=int(args.gradient_accumulation_steps),
        start_lr=start_lr,
        end_lr=end_lr,
        num_iter=num_iter,
        seed=int(args.seed if seed is None else seed),
        restore=True,
        **range_test_kwargs,
    )
    res.settings["applied"] = _apply(trainer, res) if apply else None
    return res


def _apply(trainer: Any, res: Any) -> dict[str, Any]:
    lr, why = recommended_lr(res)
    if lr is None:
        return None
    where = ["trainer.args.learning_rate"]
    trainer.args.learning_rate = lr
    if trainer.optimizer is not None:  # a user optimizer: the Trainer will not rebuild it
        groups = trainer.optimizer.param_groups
        base = float(groups[0]["lr"]) or 1.0
        for g in groups:
            g["lr"] = lr * float(g["lr"]) / base
            if "initial_lr" in g:
                g["initial_lr"] = g["lr"]
        where.append("trainer.optimizer.param_groups[*]['lr']")
    log.info("lrbs find_lr: learning rate %.4g (%s) written to %s", lr, why, ", ".join(where))
    return {"lr": lr, "why": why, "where": where}
