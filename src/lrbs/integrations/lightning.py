"""Lightning: a callback that measures the noise scale and sharpness, and an LR finder that leaves no trace.

Example::

    import lightning as L
    from lrbs.integrations.lightning import LrbsCallback, find_lr

    trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[LrbsCallback(sharpness_every=50)])
    find_lr(trainer, model, train_loader, apply=True)    # writes model.lr (or model.learning_rate)
    trainer.fit(model, train_loader)                     # lrbs/* reach the trainer's loggers

What the numbers mean and how they are computed: :mod:`lrbs.integrations.measure`.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..batches import MapSource, as_source
from ..errors import ConfigError, LrbsTypeError
from .measure import (
    GradCapture,
    MeasurementWarning,
    current_lr,
    guarded,
    recommended_lr,
    require,
    size_or_none,
    sum_over_ranks,
    trainable_parameters,
)
from .monitor import Monitor

MIN_LIGHTNING = "2.2"  # the lrbs[lightning] extra's pin; tested with 2.6
REQUIRES = ("lightning", MIN_LIGHTNING, "lightning")  # module, minimum version, lrbs extra
_L = require(*REQUIRES)

__all__ = ["LrbsCallback", "find_lr", "step_loss", "MIN_LIGHTNING", "MeasurementWarning"]

log = logging.getLogger(__name__)


def step_loss(module: Any, batch: Any, batch_idx: int = 0) -> torch.Tensor:
    """The loss of ``module.training_step(batch, batch_idx)`` (a tensor, or the ``"loss"`` of a dict).

    Used on copies of the LightningModule that no Trainer drives: their ``self.log`` calls do nothing (Lightning
    warns that no trainer is attached; that warning is silenced here).
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\).*")
        out = module.training_step(batch, batch_idx)
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, torch.Tensor):
        raise LrbsTypeError(
            f"training_step returned {type(out).__name__}: lrbs needs a loss tensor or a dict with 'loss' "
            "(or pass compute_loss=(module, batch) -> loss)"
        )
    return out


def _map_source(loader: Any) -> Any:
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        len(dataset)
    except TypeError:
        return None
    return MapSource(dataset, collate_fn=getattr(loader, "collate_fn", None))


class LrbsCallback(Monitor, _L.pytorch.Callback):
    r"""A Lightning ``Callback`` that logs the gradient noise scale and the sharpness during ``fit``.

    **Noise scale** (``noise_scale=True``): free with ``accumulate_grad_batches >= 2`` or under data parallelism.
    Tensor hooks read each micro-batch's gradient contribution (share ``1/accumulate_grad_batches``, as Lightning
    divides each loss) and, in ``on_before_optimizer_step`` (before clipping; unscaled by the GradScaler;
    all-reduced under DDP), the accumulated gradient; :func:`~lrbs.integrations.measure.micro_estimate` gives one
    estimate of ``|G|^2`` and ``tr Sigma`` per optimizer step (under DDP from every rank's micro-batches against the
    all-reduced gradient: the estimate's sums are all-reduced). ``lrbs/b_simple`` is the ratio of their means over
    the last ``window`` steps, with a bootstrap interval (``lrbs/b_simple_low`` / ``_high``), in samples per batch.
    Cost: a tensor hook per parameter and one squared norm per backward, one more per step; under DDP also one
    blocking ``all_reduce`` of 6 float64 numbers per optimizer step (a collective's latency). With accumulation 1
    on one device, ``probe_data`` (held data or ``"train"``) is needed: every ``log_every`` steps :func:`lrbs.noise_scale` runs on
    ``probe_draws`` batches of ``probe_micro_batches`` micro-batches (that many extra forward-backward passes of a
    micro-batch, plus a copy of the module); its time is logged as ``lrbs/probe_seconds``.

    **Sharpness** (``sharpness_every=n``): every ``n`` optimizer steps, ``lrbs/lambda_max`` (top Hessian eigenvalue
    on a fixed, seeded subset of ``sharpness_samples`` training samples, on a private copy in eval mode),
    ``lrbs/lambda_max_x_lr`` and, for SGD, ``lrbs/eos_threshold`` (see :mod:`lrbs.integrations.measure`).

    The loss of a batch is ``module.training_step(batch, 0)`` on the copy (:func:`step_loss`) unless
    ``compute_loss`` says otherwise. Values go to every attached logger (``trainer.loggers``, at the step they were
    published: every ``log_every`` steps, default ``trainer.log_every_n_steps``) and to ``pl_module.log`` (so
    ``trainer.callback_metrics`` has them). The callback changes nothing about training (copies, read-only hooks,
    a saved-and-restored random state); a failed measurement is a
    :class:`~lrbs.integrations.measure.MeasurementWarning` and training goes on.

    Args: those of :class:`~lrbs.integrations.monitor.Monitor` (its ``__init__``: the one signature of both
    callbacks); ``compute_loss`` defaults to :func:`step_loss`.

    Raises:
        ConfigError: ``sharpness_every`` / ``log_every`` < 1, bad sizes; at ``on_train_start``, all parameters
            frozen or accumulation 1 on one device without probe data.
        DependencyError: lightning missing or older than :data:`MIN_LIGHTNING`.
    """

    requires = REQUIRES
    default_loss = staticmethod(step_loss)
    _new_step = True
    _stepped = False
    _scale = 1.0
    _lr: float | None = None

    def on_train_start(self, trainer, pl_module):
        loader = trainer.train_dataloader
        source = _map_source(loader)
        self._params = trainable_parameters(pl_module)
        self._sizes: list[int | None] = []
        self._accum = int(trainer.accumulate_grad_batches)
        self.start(
            pl_module,
            accumulation=self._accum,
            world=int(trainer.world_size),
            free_possible=True,
            micro_batch=getattr(loader, "batch_size", None),
            num_samples=source.num_samples if source is not None else None,
            train_source=source,
            probe_source=self._probe_source(source, loader),
            log_every=int(trainer.log_every_n_steps),
            total_when=None,
        )
        self._reduce = sum_over_ranks(int(trainer.world_size))
        self._new_step = True

    def _probe_source(self, train_source: Any, loader: Any) -> Any:
        data = self.probe_data
        if data is None:
            return None
        if isinstance(data, str):
            if data != "train" or train_source is None:
                raise ConfigError(
                    f"probe_data={data!r} is not allowed: 'train' (with a map-style training dataset), a "
                    "dataset, a DataLoader or None"
                )
            return train_source
        if isinstance(data, torch.utils.data.Dataset) and not isinstance(
            data, torch.utils.data.IterableDataset
        ):
            return MapSource(data, collate_fn=getattr(loader, "collate_fn", None))
        return as_source(data, name="probe_data")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.free:
            return
        if self._new_step:
            self.begin_step()
            self._sizes, self._new_step = [], False
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self._scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
        self._sizes.append(size_or_none(batch))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._stepped = True
        self._lr = current_lr(optimizer)  # the step's LR, before any scheduler moves it
        if not self.free:
            return
        step = int(trainer.global_step) + 1
        total = guarded(
            "the accumulated gradient's norm", step, lambda: float(GradCapture.grad_sq_of(self._params))
        )
        sizes, self._sizes, self._new_step = self._sizes, [], True
        self.end_step(
            step,
            sizes,
            [1.0 / self._accum] * len(sizes),
            micro_scale=self._scale,
            total_sq=total,
            all_reduce=self._reduce,
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._stepped:
            return
        self._stepped = False
        step = int(trainer.global_step)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.after_step(step, pl_module, optimizer, lr=self._lr)
        if step % self.log_every:
            return
        out = self.publish(step)
        if not out:
            return
        for lg in trainer.loggers:
            lg.log_metrics(out, step=step)
        for name, value in out.items():
            pl_module.log(name, float(value), on_step=True, on_epoch=False, logger=False)

    def on_train_end(self, trainer, pl_module):
        self.stop()


# --------------------------------------------------------------------------------------------- find_lr
_PRECISIONS = {"32-true": "32", "32": "32", "bf16-mixed": "bf16-mixed", "16-mixed": "16-mixed"}


def _precision(trainer: Any) -> str:
    p = str(getattr(trainer, "precision", "32-true"))
    if p not in _PRECISIONS:
        raise ConfigError(
            f"trainer precision={p!r} is not allowed for find_lr: one of {sorted(_PRECISIONS)} "
            "(the range test's precisions)"
        )
    return _PRECISIONS[p]


def _optimizer_of(configured: Any) -> torch.optim.Optimizer:
    """The single optimizer in whatever ``configure_optimizers()`` returned."""
    out = configured
    if isinstance(out, Mapping):
        out = out.get("optimizer")
    if isinstance(out, (list, tuple)):
        first = out[0] if out else None
        if isinstance(first, (list, tuple)):  # ([optimizers], [schedulers])
            out = first
        opts = [o.get("optimizer") if isinstance(o, Mapping) else o for o in out]
        opts = [o for o in opts if isinstance(o, torch.optim.Optimizer)]
        if len(opts) != 1:
            raise ConfigError(
                f"configure_optimizers() returned {len(opts)} optimizers: find_lr sweeps one optimizer"
            )
        out = opts[0]
    if not isinstance(out, torch.optim.Optimizer):
        raise LrbsTypeError(
            f"configure_optimizers() returned {type(configured).__name__}: find_lr needs an optimizer, a list of "
            "one, or a dict with 'optimizer'"
        )
    return out


def _train_loader(model: Any, train_dataloaders: Any, datamodule: Any) -> Any:
    if train_dataloaders is not None:
        return train_dataloaders
    if datamodule is not None:
        return datamodule.train_dataloader()
    try:
        return model.train_dataloader()
    except Exception as e:  # Lightning raises when the module does not define it
        raise ConfigError(
            "find_lr has no training data: pass train_dataloaders= or datamodule=, or define "
            f"train_dataloader() on the LightningModule ({type(e).__name__}: {e})"
        ) from e


def find_lr(
    trainer: Any,
    model: Any,
    train_dataloaders: Any = None,
    datamodule: Any = None,
    *,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iter: int = 100,
    apply: bool = False,
    attr: str | None = None,
    seed: int = 0,
    **range_test_kwargs: Any,
) -> Any:
    """The LR range test (:func:`lrbs.lr_range_test`) with the module, optimizer, data and settings ``fit`` would use.

    The sweep trains a copy of ``model`` (so the module, and any trainer reference it holds, is untouched) with the
    optimizer its ``configure_optimizers()`` builds on that copy, the loss of its ``training_step``
    (:func:`step_loss`), the trainer's ``precision`` and ``accumulate_grad_batches``, on the trainer's root device.
    The torch / numpy / python random states and the loader's seeded generators are restored afterwards, so
    ``trainer.fit`` then sees the same data order and initial state as without ``find_lr``. Unlike Lightning's
    ``Tuner.lr_find`` nothing is checkpointed to disk and the trainer is not reset.

    Args:
        trainer: the ``lightning.Trainer`` that will fit.
        model: the ``LightningModule``.
        train_dataloaders, datamodule: the training data as ``fit`` takes it (default the module's
            ``train_dataloader()``).
        start_lr, end_lr, num_iter: the sweep (see :func:`lrbs.lr_range_test`).
        apply: write the recommended LR (``result.recommended()``) to ``model.<attr>`` (default the first of
            ``lr``, ``learning_rate`` the module has; ``hparams`` too), where ``configure_optimizers`` reads it; then
            check that a fresh ``configure_optimizers()`` uses it. Where it went is in
            ``result.settings["applied"]``; when the module has no such attribute nothing is written and a
            :class:`~lrbs.integrations.measure.MeasurementWarning` says so (the result is still returned).
        attr: the attribute to write.
        seed: seeds the sweep's data order.
        **range_test_kwargs: passed on (``mode``, ``smoothing``, ``diverge_factor``, ``repeats``, ...).

    Returns:
        The :class:`~lrbs.RangeTestResult`.

    Raises:
        ConfigError: no training data, all parameters frozen, several optimizers, an unsupported precision.
        DependencyError: lightning missing or too old.
    """
    require(*REQUIRES)
    from ..range_test import lr_range_test

    trainable_parameters(model)
    loader = _train_loader(model, train_dataloaders, datamodule)
    precision = _precision(trainer)
    twin = copy.deepcopy(model).to(trainer.strategy.root_device)
    optimizer = _optimizer_of(twin.configure_optimizers())
    res = lr_range_test(
        twin,
        optimizer,
        data=loader,
        compute_loss=step_loss,
        precision=precision,
        accumulation_steps=int(trainer.accumulate_grad_batches),
        start_lr=start_lr,
        end_lr=end_lr,
        num_iter=num_iter,
        seed=seed,
        restore=False,  # the copy is thrown away; random states and loader generators are restored anyway
        **range_test_kwargs,
    )
    res.settings["applied"] = _apply(model, res, attr) if apply else None
    return res


def _apply(model: Any, res: Any, attr: str | None) -> dict[str, Any] | None:
    lr, why = recommended_lr(res)
    if lr is None:
        return None
    names = [attr] if attr is not None else [n for n in ("lr", "learning_rate") if hasattr(model, n)]
    if not names or not hasattr(model, names[0]):
        warnings.warn(
            f"lrbs find_lr: recommended lr={lr:.4g} ({why}) was not written: {type(model).__name__} has no "
            f"{attr or 'lr or learning_rate'} attribute for configure_optimizers() to read; set it yourself",
            MeasurementWarning,
            stacklevel=3,
        )
        return None
    name = names[0]
    setattr(model, name, lr)
    where = [f"model.{name}"]
    hp = getattr(model, "hparams", None)
    if isinstance(hp, Mapping) and name in hp:
        hp[name] = lr
        where.append(f"model.hparams[{name!r}]")
    used = float(_optimizer_of(copy.deepcopy(model).configure_optimizers()).param_groups[0]["lr"])
    if not np.isclose(used, lr, rtol=1e-6):
        warnings.warn(
            f"lrbs find_lr: wrote lr={lr:.4g} to model.{name}, but configure_optimizers() builds an optimizer with "
            f"lr={used:.4g}: make it read self.{name}",
            MeasurementWarning,
            stacklevel=3,
        )
    log.info("lrbs find_lr: learning rate %.4g (%s) written to %s", lr, why, ", ".join(where))
    return {"lr": lr, "why": why, "where": where, "optimizer_lr": used}
