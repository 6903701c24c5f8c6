"""``fit()``: a plain, deterministic training loop with LR / momentum / batch-size schedules.

The loop owns the data order (:class:`lrbs.batches.BatchStream`: a seeded sampler over indexable data that can
change the batch size between steps without rebuilding a DataLoader, or a loader's own batches), the schedules,
divergence detection (a non-finite loss ends the run with status ``diverged``; it never raises), evaluation,
checkpoints and logging to a :class:`~lrbs.store.Store`. Forward, loss, backward, gradient accumulation, SAM's two
passes, mixed precision and the optimizer step are the one training step, :class:`lrbs.step.TrainStep`.
On CPU the same seed gives the same history, bit for bit. The caller's global random state is left untouched
(the loop runs in a forked RNG).

Indexable data is sampled by a seeded sampler (consecutive ``torch.randperm`` epochs; a batch may span two), so
the batch size may change between steps; a loader yields its own batches, cycled, with its generators reseeded
by ``seed`` and restored afterwards.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import atomic_write, jsonable
from ._util import progress as progress_bar
from .batches import (
    BatchLoss,
    BatchStream,
    LoaderSource,
    MapSource,
    TensorSource,
    as_source,
    batch_size_of,
    collect_batches,
    model_device,
    slice_batch,
    to_device,
)
from .errors import CheckpointError, ConfigError, LrbsTypeError, check_int, check_number
from .step import TrainStep, autocast, check_precision

__all__ = [
    "fit",
    "TrainConfig",
    "FitResult",
    "TrainState",
    "Callback",
    "StopAtTrainAccuracy",
    "save_checkpoint",
    "load_checkpoint",
    "evaluate",
]


# --------------------------------------------------------------------------- results and callbacks
@dataclass
class TrainState:
    """What callbacks see: the live model and optimizer, the current step and its batch.

    ``batch`` is the step's batch as the data gave it (any kind); ``x`` / ``y`` are its two parts when it is an
    ``(x, y)`` tuple, else None. ``batch_loss`` is how a batch becomes a loss (:class:`lrbs.batches.BatchLoss`).
    ``step`` counts iterations; with ``16-mixed`` the schedules count applied updates only.
    """

    step: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    lr: float
    batch_size: int
    loss: float
    samples_seen: int
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    loss_fn: Callable | None = None
    train_data: tuple[torch.Tensor, torch.Tensor] | None = None
    evals: list[dict] = field(default_factory=list)
    logs: dict[str, float] = field(default_factory=dict)
    stop: bool = False
    last_eval: dict[str, float] = field(default_factory=dict)
    max_micro_batch: int | None = None
    batch: Any = None
    batch_loss: BatchLoss | None = None


class Callback:
    """Base class for fit() callbacks; override what you need. ``state.logs`` entries are recorded in the history."""

    def on_start(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        pass

    def on_step(self, state: TrainState) -> None:  # noqa: B027
        pass

    def on_eval(self, state: TrainState) -> None:  # noqa: B027
        pass

    def on_end(self, state: TrainState) -> None:  # noqa: B027
        pass


class StopAtTrainAccuracy(Callback):
    """End training once the training accuracy at an evaluation reaches ``threshold``.

    Keskar et al. train small- and large-batch models until the training accuracy plateaus near 100%, so that a
    generalization gap is not under-training in disguise.
    """

    def __init__(self, threshold: float):
        self.threshold = check_number("stop_train_acc", threshold, low=0.0, high=1.0)
        self.stopped_at: int | None = None

    def on_eval(self, state: TrainState) -> None:
        if state.last_eval.get("train_acc", 0.0) >= self.threshold:
            state.stop = True
            self.stopped_at = state.step


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit`.

    Attributes:
        status: ``"completed"`` or ``"diverged"``.
        history: per-step arrays ``step``, ``samples``, ``lr``, ``batch_size``, ``loss``.
        evals: one dict per evaluation: step, samples, train_loss, train_acc, test_loss, test_acc (+ callback logs).
        final: the last evaluation's metrics.
        wall_time: seconds.
        config: the full config (JSON-able).
        diverged_at: the step whose loss was non-finite, else None.
        run_key: the store key, when a store was given.
    """

    status: str
    history: dict[str, np.ndarray]
    evals: list[dict]
    final: dict[str, float]
    wall_time: float
    config: dict[str, Any]
    diverged_at: int | None = None
    run_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        # the fields a store keeps (not the arrays); like landscape.Direction.settings, a plain field list
        return {
            "status": self.status,
            "final": self.final,
            "wall_time": self.wall_time,
            "diverged_at": self.diverged_at,
            "config": self.config,
            "evals": self.evals,
        }

    def plot(self, ax: Any = None) -> Any:
        """Training loss per step and test accuracy per evaluation (:func:`lrbs.report.figures.plot_fit`).

        Args:
            ax: None (a new figure: loss and accuracy panels), a pair of Axes, or one Axes (accuracy on a twin
                y axis).

        Returns:
            The loss Axes, like every result's ``.plot()`` (its ``.figure`` holds the accuracy panel too).
        """
        from .report.figures import plot_fit

        fig = plot_fit(self, ax=ax)
        if ax is None:
            return fig.axes[0]  # the new figure's panels: [loss, accuracy]
        return ax[0] if isinstance(ax, (list, tuple, np.ndarray)) else ax


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict[str, str] | None = None) -> Path:
    """Save the model's state dict as safetensors (tensors only; loading never executes code), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, save(state, metadata={k: str(v) for k, v in (meta or {}).items()}))


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Load a checkpoint written by :func:`save_checkpoint` (safetensors) or ``torch.save`` of a state dict.

    ``torch.load`` is called with ``weights_only=True``: a file that would need to execute code is refused.
    If ``model`` is given, the state is loaded into it (strict) and a mismatch names the first differing tensor.

    Raises:
        CheckpointError: missing, corrupt or mismatched file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint={str(path)!r} does not exist")
    state: dict[str, torch.Tensor]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or unsafe file
        raise CheckpointError(
            f"checkpoint={str(path)!r} cannot be read (corrupt or not a tensor file): {e}"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint={str(path)!r} is not a state dict of tensors")
    if model is not None:
        _check_state(path, state, model.state_dict())
        model.load_state_dict(state)
    return state


def _check_state(path: Path, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> None:
    """Raise a CheckpointError naming the first tensor where ``state`` and the model's ``own`` state differ."""
    for k, v in own.items():
        if k not in state:
            raise CheckpointError(f"checkpoint={str(path)!r} has no tensor {k!r} that the model needs")
        if state[k].shape != v.shape:
            raise CheckpointError(
                f"checkpoint={str(path)!r}: tensor {k!r} has shape {tuple(state[k].shape)}, the model needs "
                f"{tuple(v.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(
            f"checkpoint={str(path)!r} has tensor {extra[0]!r} that the model does not have"
        )


# --------------------------------------------------------------------------- helpers
def as_schedule(name: str, value: Any, *, integer: bool = False, **bounds: Any) -> Callable[[int], float]:
    """A constant (checked: a number, or an integer >= 1) or a callable ``step -> value`` as a schedule."""
    if callable(value):
        return value
    if integer:
        v = check_int(name, value, low=1)
        return lambda step: v
    v = check_number(name, value, **(bounds or {"low": 0.0}))
    return lambda step: v


def _describe(value: Any) -> Any:
    if isinstance(value, (int, float, str)) or value is None:
        return value
    return repr(value)


#: Evaluation on a loader (or an iterable dataset) uses its first this many samples, collected once.
LOADER_EVAL_SAMPLES = 4096


class EvalSet:
    """Data evaluated again and again (fit's evaluations): indexable data is read in consecutive slices of
    ``batch_size`` at each evaluation (nothing is held); a loader's first ``max_samples`` samples (default
    :data:`LOADER_EVAL_SAMPLES`) are collected once, seeded, and kept on ``device``. With ``max_samples`` given,
    indexable data is a fixed seeded subset of that size too."""

    def __init__(
        self,
        data: Any,
        batch_size: int,
        device: torch.device,
        *,
        max_samples: int | None = None,
        seed: int = 0,
        name: str = "data",
        batch_loss: BatchLoss | None = None,
    ):
        src = (
            data if isinstance(data, (TensorSource, MapSource, LoaderSource)) else as_source(data, name=name)
        )
        self.source, self.batch_size, self.device = (
            src,
            check_int("eval_batch_size", batch_size, low=1),
            device,
        )
        self.fixed: list[Any] | None = None
        if isinstance(src, LoaderSource) or max_samples is not None:
            cap = LOADER_EVAL_SAMPLES if max_samples is None else max_samples
            try:
                fixed = collect_batches(src, batch_size=self.batch_size, max_samples=cap, seed=seed)
            except LrbsTypeError:
                if not isinstance(src, LoaderSource) or batch_loss is None or batch_loss.compute_loss is None:
                    raise  # only compute_loss reads batches without tensors
                if batch_loss.batch_weight is None:
                    raise LrbsTypeError(
                        f"the batches of {name} hold no tensor, so their samples cannot be counted: pass "
                        "batch_weight=(batch) -> number of samples"
                    ) from None
                fixed = _collect_weighted(src, cap, seed, batch_loss)  # batches without tensors
            self.fixed = [to_device(b, device) for b in fixed]

    def batches(self) -> Iterable[Any]:
        """The batches of one evaluation, in order."""
        if self.fixed is not None:
            return self.fixed
        n, b, src = self.source.num_samples, self.batch_size, self.source
        return (to_device(src.slice(i, min(i + b, n)), self.device) for i in range(0, n, b))


def _collect_weighted(src: LoaderSource, cap: int, seed: int, batch_loss: BatchLoss) -> list[Any]:
    """The loader's first batches until their ``batch_weight`` reaches ``cap`` (for batches holding no tensor, which
    :func:`lrbs.batches.collect_batches` cannot count), under a forked, seeded RNG; the loader is restored."""
    out, total = [], 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        src.reseed(seed)
        try:
            for batch in src:
                out.append(batch)
                total += batch_loss.weight(batch)
                if total >= cap:
                    break
        finally:
            src.restore()
    if not out:
        raise ConfigError("data is empty: the loader yielded no batches")
    return out


def evaluate_batches(
    model: nn.Module,
    batches: Iterable[Any],
    batch_loss: BatchLoss | None = None,
    precision: str = "32",
) -> dict[str, float | None]:
    r"""Weighted mean loss and accuracy over ``batches`` in eval mode (the model's modes are restored).

    .. math::  L = \frac{\sum_b w_b L_b}{\sum_b w_b}, \qquad \text{acc} = \frac{\sum_b \#\text{correct}_b}{\sum_b n_b}

    with :math:`w_b` the batch's weight (:meth:`lrbs.batches.BatchLoss.weight`); ``accuracy`` is None where it is
    undefined (not classification logits against integer labels, or ``compute_loss``).

    Raises:
        ConfigError: the batches have total weight 0.
    """
    bl = batch_loss if batch_loss is not None else BatchLoss()
    device = model_device(model)
    was = {k: m.training for k, m in model.named_modules()}
    model.eval()
    total = weight = 0.0
    correct, count, acc = 0, 0, True
    try:
        with torch.no_grad(), autocast(precision, device):
            for batch in batches:
                ev = bl.evaluate(model, batch)
                total += float(ev.loss) * ev.weight
                weight += ev.weight
                c = bl.correct(ev.output, batch) if acc else None
                if c is None:
                    acc = False
                else:
                    correct += int(c)
                    count += batch_size_of(batch)
    finally:
        for k, m in model.named_modules():
            m.training = was.get(k, m.training)
    if weight == 0:
        raise ConfigError("the evaluation data have total weight 0: nothing to average")
    return {"loss": total / weight, "accuracy": correct / count if acc and count else None}


def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    batch_size: int = 1000,
    *,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
    max_samples: int | None = None,
    precision: str = "32",
    seed: int = 0,
) -> dict[str, float | None]:
    """Loss and accuracy of ``model`` on ``data`` in eval mode (the model's modes are restored afterwards).

    ``data`` is anything :func:`lrbs.batches.as_source` takes. Indexable data is read in consecutive slices of
    ``batch_size`` (all of it, or a seeded subset of ``max_samples``); a loader contributes its first
    ``max_samples`` samples (default :data:`LOADER_EVAL_SAMPLES`). The loss is the weighted mean over batches
    (see :func:`evaluate_batches`); ``accuracy`` is None where it is undefined.
    """
    device = model_device(model)
    precision = check_precision(precision, device)
    bl = BatchLoss(loss_fn, compute_loss, batch_weight)
    es = EvalSet(data, batch_size, device, max_samples=max_samples, seed=seed)
    return evaluate_batches(model, es.batches(), bl, precision)


def make_optimizer(
    optimizer: Any,
    model: nn.Module,
    lr0: float,
    momentum: float,
    weight_decay: float,
    rho: float | None,
    opts: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer ``fit`` trains with: an instance as is, a name through :func:`lrbs.optim.get_optimizer`, or
    a callable ``params -> optimizer``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        from .optim import get_optimizer

        extra = {"rho": rho} if rho is not None else {}
        extra.update(opts or {})
        return get_optimizer(optimizer, params, lr=lr0, momentum=momentum, weight_decay=weight_decay, **extra)
    if callable(optimizer):
        return optimizer(params)
    raise LrbsTypeError(
        f"optimizer={optimizer!r} is not allowed: a name (see lrbs.optim.list_optimizers()), an optimizer, or a "
        "callable params -> optimizer"
    )


def set_group_values(
    opt: torch.optim.Optimizer, lr: float, ratios: list[float], momentum: float | None
) -> None:
    """Set every param group's lr to ``lr * ratio`` and its momentum (SGD) or beta1 (Adam) to ``momentum``."""
    for g, r in zip(opt.param_groups, ratios):
        g["lr"] = lr * r
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, *tuple(g["betas"])[1:])
            elif "momentum" in g:
                g["momentum"] = momentum


def micro_batches(
    batch: Any, size: int, max_micro_batch: int | None, batch_loss: BatchLoss
) -> tuple[list[Any], list[float] | None]:
    r"""Split a batch of ``size`` samples into micro-batches of at most ``max_micro_batch`` and their loss scales.

    The scales are :math:`c_i = w_i / \sum_j w_j` (by default :math:`w_i = |b_i|`, computed as ``len(b_i) / B``),
    so the accumulated loss is the full batch's weighted mean. One micro-batch: ``([batch], None)``.
    """
    if max_micro_batch is None or max_micro_batch >= size:
        return [batch], None
    starts = range(0, size, max_micro_batch)
    parts = [slice_batch(batch, s, s + max_micro_batch) for s in starts]
    if batch_loss.batch_weight is None:
        return parts, [(min(s + max_micro_batch, size) - s) / size for s in starts]
    w = [batch_loss.weight(p) for p in parts]
    tw = sum(w)
    if tw <= 0:
        raise ConfigError("batch_weight gave a total weight of 0 for a training batch: nothing to average")
    return parts, [x / tw for x in w]


# --------------------------------------------------------------------------- data of fit
@dataclass
class TrainData:
    """What ``fit`` trains on: the source, its size (None when unknown) and whether batches are the loader's."""

    source: Any
    num_samples: int | None
    loader: bool
    batch_size: int | None  # the loader's batch size (None: unknown or not a loader)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(x, y)`` when the data are two tensors (callbacks' ``state.train_data``), else None."""
        src = self.source
        if isinstance(src, TensorSource) and src.keys is None and len(src.tensors) == 2:
            return src.tensors[0], src.tensors[1]
        return None


def train_data(dataset: Any, batch_size: Any, device: torch.device) -> TrainData:
    """Normalize ``fit``'s data argument (see :func:`fit`); a bare ``IterableDataset`` is batched by ``batch_size``.

    Raises:
        ConfigError: empty data, data on another (non-CPU) device than the model, a ``batch_size`` that differs
            from a DataLoader's own.
    """
    iterable = isinstance(dataset, torch.utils.data.IterableDataset)
    src = as_source(dataset, name="dataset", batch_size=batch_size if isinstance(batch_size, int) else None)
    if isinstance(src, TensorSource) and src.device.type != "cpu" and src.device != device:
        raise ConfigError(f"data is on device {src.device} but the model is on {device}: move one of them")
    if not isinstance(src, LoaderSource):
        return TrainData(src, src.num_samples, False, None)
    it = src.iterable
    own = getattr(it, "batch_size", None) if isinstance(it, torch.utils.data.DataLoader) else None
    if not iterable and batch_size is not None and batch_size != own:
        raise ConfigError(
            f"batch_size={_describe(batch_size)} is not allowed with a {type(it).__name__} of batch_size={own}: "
            "leave it None (the loader's batches are used) or pass the dataset itself"
        )
    n = None
    ds = getattr(it, "dataset", None)
    if ds is not None and not isinstance(ds, torch.utils.data.IterableDataset):
        try:
            n = len(ds)
        except TypeError:
            n = None
    elif isinstance(it, (list, tuple)):
        try:
            n = sum(batch_size_of(b) for b in it)
        except LrbsTypeError:  # batches without tensors (for compute_loss): size unknown
            n = None
    return TrainData(src, n, True, own)


def _check_batch(b: Any, n_train: int | None, where: str) -> int:
    if (
        isinstance(b, bool)
        or not isinstance(b, (int, np.integer))
        or b < 1
        or (n_train is not None and b > n_train)
    ):
        limit = f" and <= {n_train} (train size)" if n_train is not None else ""
        raise ConfigError(f"batch_size{where}={b!r} is not allowed: must be an integer >= 1{limit}")
    return int(b)


# --------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    dataset: Any,
    *,
    optimizer: str | torch.optim.Optimizer | Callable = "sgd",
    lr: float | Callable[[int], float] = 0.1,
    batch_size: int | Callable[[int], int] | None = None,
    steps: int | None = None,
    epochs: float | None = None,
    momentum: float | Callable[[int], float] = 0.9,
    weight_decay: float = 0.0,
    rho: float | None = None,
    optimizer_opts: dict[str, Any] | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    eval_batch_size: int = 1000,
    eval_max_samples: int | None = None,
    max_micro_batch: int | None = None,
    loss_fn: Callable | None = None,
    compute_loss: Callable | None = None,
    batch_weight: Callable | None = None,
    precision: str = "32",
    clip_grad_norm: float | None = None,
    test_data: Any = None,
    callbacks: Iterable[Callback] = (),
    store: Any = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``dataset``, one :class:`lrbs.step.TrainStep` per step.

    Args:
        model: the model to train (it is trained in place, like any training loop).
        dataset: anything :func:`lrbs.batches.as_source` takes (sampling: the module docstring): an lrbs
            ``Dataset`` (train + test splits), a ``Split``, ``(x, y)`` / ``(x1, ..., xk, y)`` / a dict of tensors,
            a ``TensorDataset``, any map-style ``Dataset``, an ``IterableDataset``, a ``DataLoader``, batches.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"sam"``, ``"asam"``, ``"lars"``, ``"lamb"``, an optimizer
            instance, or a callable ``params -> optimizer``.
        lr: a float or a schedule ``update -> lr`` (update 0 is the first optimizer step). With several param
            groups the schedule sets the first group and the others keep their ratio to it.
        batch_size: an int or a schedule ``update -> int`` (default 128; also batches a bare ``IterableDataset``);
            None with a DataLoader or a list of batches (theirs are used; another value is an error).
        steps, epochs: the length of training; exactly one of them. ``steps`` counts iterations (batches
            drawn); ``epochs`` stops once ``epochs * len(train)`` samples were seen (needs data of known size).
        momentum, weight_decay, rho, optimizer_opts: SGD momentum (or Adam's beta1; a float or a schedule), L2
            weight decay, SAM's neighbourhood size; extra options of a named optimizer (``{"base": "adam"}``).
        seed: seeds the data order (and dropout, inside a forked RNG).
        eval_every, eval_batch_size, eval_max_samples: evaluate every this many steps (default: about 20 per
            run) and at the end, in batches of this size, on a fixed seeded subset of this many samples (default:
            all of indexable data; the first :data:`LOADER_EVAL_SAMPLES` of a loader).
        max_micro_batch: split a larger batch into accumulated micro-batches of at most this size (the effective
            batch, and any LR rule, count the accumulated batch; the schedules advance once per optimizer step).
        loss_fn: ``loss_fn(output, y)`` for tuple batches / ``loss_fn(output, batch)`` for mappings, mean
            reduction; default cross-entropy (tuples) or the model's own loss (mappings).
        compute_loss: ``compute_loss(model, batch) -> scalar tensor`` for any batch (HF Trainer's name).
        batch_weight: ``batch_weight(batch) -> float``, a batch's weight in means and micro-batch scales
            (default: its number of samples).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA; a GradScaler whose skipped steps are not
            LR steps: the schedules index applied updates; the history gets an ``applied`` column).
        clip_grad_norm: clip the gradient's global 2-norm to this before each step.
        test_data, callbacks: evaluation data when ``dataset`` has no test split; :class:`Callback` objects.
        store, checkpoint: a :class:`~lrbs.store.Store` (run, metrics, result); final weights (safetensors).
        progress, config: show a progress bar; extra JSON-able entries for the result's config.

    Returns:
        A :class:`FitResult` (``status="diverged"`` after a non-finite loss: it never raises); evaluation rows
        hold ``train_acc`` / ``test_acc`` only where accuracy is defined.

    Raises:
        ConfigError / LrbsTypeError: invalid arguments (checked before anything is trained).
    """
    if not isinstance(model, nn.Module):
        raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
    device = model_device(model)
    data = train_data(dataset, batch_size, device)
    if test_data is None and hasattr(dataset, "test") and not isinstance(dataset, torch.utils.data.Dataset):
        test_data = dataset.test
    loop = _FitLoop(model, data, device, locals())
    return loop.run(dataset, test_data, list(callbacks), store, checkpoint, progress, config)


class _FitLoop:
    """fit()'s validated settings and its loop (split out of :func:`fit` to keep each piece short)."""

    def __init__(self, model: nn.Module, data: TrainData, device: torch.device, kw: dict[str, Any]):
        self.model, self.data, self.device, self.kw = model, data, device, kw
        n = data.num_samples
        steps, epochs = kw["steps"], kw["epochs"]
        if (steps is None) == (epochs is None):
            raise ConfigError(
                f"give exactly one of steps= and epochs= (got steps={steps!r}, epochs={epochs!r})"
            )
        bs = kw["batch_size"]
        if data.loader and callable(bs):
            raise ConfigError(
                f"batch_size={_describe(bs)} is not allowed with a loader: a batch-size schedule needs indexable "
                "data (tensors or a map-style Dataset), a loader's batches are its own"
            )
        if data.loader:
            self.bs_s = None
        else:
            self.bs_s = as_schedule("batch_size", 128 if bs is None else bs, integer=True)
        self.lr_s = as_schedule("lr", kw["lr"])
        mom = kw["momentum"]
        self.mom_s = (
            as_schedule("momentum", mom, low=0.0, low_inclusive=True, high=1.0, high_inclusive=False)
            if mom is not None
            else None
        )
        check_number("lr", self.lr_s(0), low=0.0)
        b0 = _check_batch(self.bs_s(0), n, "") if self.bs_s is not None else data.batch_size
        self.b0 = b0
        if steps is not None:
            self.steps, self.max_samples = check_int("steps", steps, low=1), None
            self.epochs = epochs
        else:
            epochs = check_number("epochs", epochs, low=0.0)
            if n is None:
                raise ConfigError(
                    f"epochs={epochs!r} is not allowed with data of unknown size ({type(data.source.iterable).__name__}"
                    "): give steps="
                )
            self.steps, self.max_samples = 10**9, int(math.ceil(epochs * n))
            self.epochs = epochs
        check_number("weight_decay", kw["weight_decay"], low=0.0, low_inclusive=True)
        mmb = kw["max_micro_batch"]
        self.micro = None if mmb is None else check_int("max_micro_batch", mmb, low=1)
        per = b0 or 1
        est = self.steps if self.max_samples is None else max(1, self.max_samples // per)
        self.total_steps_est = est
        ev = kw["eval_every"]
        self.eval_every = check_int("eval_every", max(1, est // 20) if ev is None else ev, low=1)
        if kw["eval_max_samples"] is not None:
            check_int("eval_max_samples", kw["eval_max_samples"], low=1)
        self.precision = check_precision(kw["precision"], device)
        self.batch_loss = BatchLoss(kw["loss_fn"], kw["compute_loss"], kw["batch_weight"])
        self.opt = make_optimizer(
            kw["optimizer"],
            model,
            self.lr_s(0),
            self.mom_s(0) if self.mom_s else 0.0,
            kw["weight_decay"],
            kw["rho"],
            kw["optimizer_opts"],
        )
        self.step_fn = TrainStep(
            model, self.opt, self.batch_loss, precision=self.precision, clip_grad_norm=kw["clip_grad_norm"]
        )
        base = self.opt.param_groups[0]["lr"] or 1.0
        self.ratios = [g["lr"] / base if base else 1.0 for g in self.opt.param_groups]

    def config(self, dataset: Any, extra: dict[str, Any] | None) -> dict[str, Any]:
        """The run's config (JSON-able); arguments at their defaults add no keys (run keys stay stable)."""
        kw, data = self.kw, self.data
        if hasattr(dataset, "describe"):
            ds = dataset.describe()
        elif isinstance(data.source, TensorSource):
            ds = {"n_train": data.num_samples}
        else:
            ds = {**data.source.describe(), "n_train": data.num_samples}
        cfg = {
            "model": getattr(self.model, "lrbs_spec", {"name": type(self.model).__name__}),
            "dataset": ds,
            "optimizer": kw["optimizer"] if isinstance(kw["optimizer"], str) else type(self.opt).__name__,
            "lr": _describe(kw["lr"]),
            "batch_size": _describe(kw["batch_size"] if kw["batch_size"] is not None else self.b0),
            "steps": None if self.max_samples is not None else self.steps,
            "epochs": self.epochs,
            "momentum": _describe(kw["momentum"]),
            "weight_decay": kw["weight_decay"],
            "rho": kw["rho"],
            "optimizer_opts": kw["optimizer_opts"],
            "seed": kw["seed"],
            "max_micro_batch": self.micro,
            "eval_every": self.eval_every,
        }
        if self.precision != "32":
            cfg["precision"] = self.precision
        if kw["clip_grad_norm"] is not None:
            cfg["clip_grad_norm"] = kw["clip_grad_norm"]
        if kw["eval_max_samples"] is not None:
            cfg["eval_max_samples"] = kw["eval_max_samples"]
        if kw["loss_fn"] is not None or kw["compute_loss"] is not None or kw["batch_weight"] is not None:
            cfg["loss"] = self.batch_loss.name
        return {**cfg, **(extra or {})}

    def eval_sets(self, test_data: Any) -> tuple[EvalSet, EvalSet | None]:
        kw = self.kw
        b, cap, seed = kw["eval_batch_size"], kw["eval_max_samples"], kw["seed"]
        bl = self.batch_loss
        tr = EvalSet(
            self.data.source, b, self.device, max_samples=cap, seed=seed, name="dataset", batch_loss=bl
        )
        te = None
        if test_data is not None:
            te = EvalSet(
                test_data, b, self.device, max_samples=cap, seed=seed, name="test_data", batch_loss=bl
            )
        return tr, te

    def evaluate(self, step: int, samples: int, state: TrainState, sets, evals, callbacks) -> dict:
        row: dict[str, Any] = {"step": step, "samples": samples}
        for prefix, es in zip(("train", "test"), sets):
            if es is None:
                continue
            r = evaluate_batches(self.model, es.batches(), self.batch_loss, self.precision)
            row[f"{prefix}_loss"] = r["loss"]
            if r["accuracy"] is not None:
                row[f"{prefix}_acc"] = r["accuracy"]
        state.evals = evals
        state.last_eval = row
        for cb in callbacks:
            cb.on_eval(state)
        row.update(state.logs)
        state.logs = {}
        evals.append(row)
        return row

    def run(self, dataset, test_data, callbacks, store, checkpoint, progress, extra) -> FitResult:
        """Train (in the store's run of the config, when a store is given) and write the result to the store."""
        cfg = self.config(dataset, extra)
        sets = self.eval_sets(test_data)
        if store is None:
            return self.fit(cfg, sets, callbacks, checkpoint, progress, None)
        with store.run(cfg, "fit") as run:  # an exception marks the run failed and is re-raised
            result = self.fit(cfg, sets, callbacks, checkpoint, progress, run.key)
            run.finish(result.status, result=jsonable(result.to_dict()), metrics=metric_rows(result))
        return result

    def fit(self, cfg, sets, callbacks, checkpoint, progress, run_key: str | None) -> FitResult:
        """The timed training, the final metrics and the checkpoint of a completed run."""
        t_start = time.perf_counter()
        with progress_bar("fit", self.total_steps_est, enabled=progress, fields={"loss": "loss nan"}) as bar:
            status, diverged_at, rows, evals = self.train(sets, callbacks, bar)
        wall = time.perf_counter() - t_start
        final = final_metrics(status, diverged_at, evals)
        if checkpoint is not None and status == "completed":
            save_checkpoint(self.model, checkpoint, meta={"lrbs": "fit"})
        return FitResult(
            status, history_of(rows, self.precision), evals, final, wall, cfg, diverged_at, run_key
        )

    def train(self, sets, callbacks, bar) -> tuple[str, int | None, list[tuple], list[dict]]:
        """The loop (in a forked RNG seeded by ``seed``); returns status, diverged_at, history rows, evals."""
        device, seed = self.device, self.kw["seed"]
        self.model.train()
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(seed)
            stream = BatchStream(self.data.source, self.b0, device, seed)
            state = TrainState(
                0,
                self.model,
                self.opt,
                self.lr_s(0),
                self.b0 or 0,
                float("nan"),
                0,
                loss_fn=self.kw["loss_fn"],
                train_data=self.data.tensors,
                max_micro_batch=self.micro,
                batch_loss=self.batch_loss,
            )
            try:
                for cb in callbacks:
                    cb.on_start(state)
                out = self.loop(stream, state, sets, callbacks, bar)
                for cb in callbacks:
                    cb.on_end(state)
            finally:
                stream.close()
        return out

    def loop(self, stream, state, sets, callbacks, bar) -> tuple[str, int | None, list[tuple], list[dict]]:
        """The steps and evaluations until ``steps`` / ``epochs``, a stop request or a non-finite loss."""
        rows: list[tuple] = []
        evals: list[dict] = []
        status, diverged_at = "completed", None
        step, updates, samples = 0, 0, 0
        last_set: tuple = ()
        src = self.data.source
        direct = src if isinstance(src, TensorSource) and src.device == self.device else None
        while step < self.steps and (self.max_samples is None or samples < self.max_samples):
            cur_lr, last_set = self.set_hyper(updates, last_set)
            batch, b = self.next_batch(stream, direct, updates)
            loss_val, mbs, scales = self.forward_backward(batch, b)
            if not math.isfinite(loss_val):
                status, diverged_at = "diverged", step
                break
            applied = self.step_fn.update(mbs, scales)
            updates += applied
            samples += b
            rows.append((step, samples, cur_lr, b, loss_val, applied))
            state.step, state.lr, state.batch_size, state.loss = step, cur_lr, b, loss_val
            state.samples_seen, state.batch = samples, batch
            state.x, state.y = _xy(batch)
            for cb in callbacks:
                cb.on_step(state)
            step += 1
            if bar.enabled:
                bar.advance(loss=f"loss {loss_val:.4f}")
            if state.stop:
                break
            if step % self.eval_every == 0:
                row = self.evaluate(step, samples, state, sets, evals, callbacks)
                if not math.isfinite(row.get("train_loss", 0.0)):
                    status, diverged_at = "diverged", step
                    break
                if state.stop:
                    break
        if status == "completed" and (not evals or evals[-1]["step"] != step):
            self.evaluate(step, samples, state, sets, evals, callbacks)
        return status, diverged_at, rows, evals

    def set_hyper(self, updates: int, last_set: tuple) -> tuple[float, tuple]:
        """Write the schedules' lr (and momentum) of update ``updates`` into the param groups when they changed."""
        cur_lr = float(self.lr_s(updates))
        if not math.isfinite(cur_lr) or cur_lr < 0:
            raise ConfigError(f"lr schedule gave {cur_lr} at step {updates}: must be a finite number >= 0")
        cur_mom = float(self.mom_s(updates)) if self.mom_s else None
        if (cur_lr, cur_mom) != last_set:  # constant schedules write the groups once
            set_group_values(self.opt, cur_lr, self.ratios, cur_mom)
            last_set = (cur_lr, cur_mom)
        return cur_lr, last_set

    def next_batch(self, stream: BatchStream, direct: TensorSource | None, updates: int) -> tuple[Any, int]:
        """The step's batch and its number of samples (the batch-size schedule's value at ``updates``)."""
        if self.bs_s is None:
            batch = stream.next()
            return batch, samples_of(batch, self.batch_loss)
        b, n = int(self.bs_s(updates)), self.data.num_samples
        if b < 1 or b > n:
            raise ConfigError(
                f"batch_size schedule gave {b} at step {updates}: must be >= 1 and <= {n} (train size)"
            )
        # tensors already on the model's device: index them directly (no per-step device check)
        return (direct.take(stream.sampler.take(b)) if direct is not None else stream.next(b)), b

    def forward_backward(self, batch: Any, b: int) -> tuple[float, list[Any], list[float] | None]:
        """The step's loss (summed over micro-batches), its micro-batches and their loss scales."""
        step_fn = self.step_fn
        if (
            self.micro is None and not step_fn.sam
        ):  # one pass, no slicing or rescaling (the common case, lean)
            return float(step_fn.forward_backward([batch])[0]), [batch], None
        mbs, scales = micro_batches(batch, b, self.micro, self.batch_loss)
        return sum(float(lo) for lo in step_fn.forward_backward(mbs, scales)), mbs, scales


def history_of(rows: list[tuple], precision: str) -> dict[str, np.ndarray]:
    """fit's per-step history arrays from its rows; the ``applied`` column only with ``16-mixed``."""
    keys = ("step", "samples", "lr", "batch_size", "loss", "applied")
    cols = list(zip(*rows)) if rows else [() for _ in keys]
    history = {k: np.asarray(c) for k, c in zip(keys, cols)}
    if precision != "16-mixed":
        history.pop("applied")
    else:
        history["applied"] = history["applied"].astype(bool)
    return history


def samples_of(batch: Any, batch_loss: BatchLoss) -> int:
    """The number of samples a loader's batch counts for (``samples``, ``epochs``): the leading dimension of its
    first tensor; for a batch without tensors (read by ``compute_loss``), its ``batch_weight``.

    Raises:
        LrbsTypeError: a batch without tensors and no ``batch_weight`` to count it.
    """
    try:
        return batch_size_of(batch)
    except LrbsTypeError:
        if batch_loss.compute_loss is None:
            raise
        if batch_loss.batch_weight is None:
            raise LrbsTypeError(
                f"the batches of dataset (here a {type(batch).__name__}) hold no tensor, so their samples cannot be "
                "counted: pass batch_weight=(batch) -> number of samples"
            ) from None
        return int(round(batch_loss.weight(batch)))


def _xy(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` of an ``(x, y)`` tuple batch (callbacks' ``state.x`` / ``state.y``), else ``(None, None)``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    return None, None


def final_metrics(status: str, diverged_at: int | None, evals: list[dict]) -> dict[str, Any]:
    """A fit's ``final``: the last evaluation's numbers; for a diverged run NaN loss and the step it diverged."""
    if status == "diverged":
        return {"train_loss": float("nan"), "diverged_at": diverged_at, "step": diverged_at}
    return {k: v for k, v in (evals[-1] if evals else {}).items() if isinstance(v, (int, float))}


def metric_rows(result: FitResult, series: tuple[str, ...] = ()) -> list[tuple[int, str, float]]:
    """A fit's metric rows ``(step, name, value)`` for the store: the per-step history as ``batch_loss``, ``lr``,
    ``batch_size`` (and the history columns ``series``), then every number of each evaluation.

    The per-step mini-batch loss has its own name: evaluation rows (``train_loss``, ...) at the same steps must
    not overwrite it.
    """
    history, steps = result.history, result.history["step"]
    names = (("batch_loss", "loss"), ("lr", "lr"), ("batch_size", "batch_size"), *((s, s) for s in series))
    rows = [(int(s), name, float(v)) for name, col in names for s, v in zip(steps, history[col])]
    for e in result.evals:
        rows += [
            (int(e["step"]), k, float(v)) for k, v in e.items() if k != "step" and isinstance(v, (int, float))
        ]
    return rows


# --------------------------------------------------------------------------- config-driven training
def _opt(default: Any, cli: str | None, help: str, *, factory: Callable | None = None) -> Any:
    """A :class:`TrainConfig` field: its default, the kind of its CLI flag (None: no flag) and its help text."""
    meta = {"cli": cli, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: The CLI kinds of :meth:`TrainConfig.cli_options`: how a flag's text becomes the option's value.
CLI_KINDS = ("str", "int", "float", "json", "number_or_spec", "int_or_spec")


@dataclass(frozen=True)
class TrainConfig:
    """The options of config-driven training (``lrbs train``, sweep grids, TOML specs, :func:`train_config`).

    Values are kept as given (no conversion), so a config's run key is the same whichever way it came in.
    ``lr``, ``batch_size`` and ``momentum`` may be schedule spec strings (``"cosine(start=0.1, steps=1000)"``).
    Each field's metadata holds ``help`` and ``cli`` (one of :data:`CLI_KINDS`, or None where no flag exists):
    :meth:`cli_options` lists them for the command line.
    """

    model: str = _opt("cnn1d", "str", "model name (see lrbs.models)")
    model_opts: dict[str, Any] = _opt(None, "json", "JSON dict of model options", factory=dict)
    dataset: str = _opt("mnist1d", "str", "dataset name (mnist1d, blobs, teacher, cifar10)")
    dataset_opts: dict[str, Any] = _opt(None, "json", 'JSON dict, e.g. \'{"path": "..."}\'', factory=dict)
    optimizer: str = _opt("sgd", "str", "sgd, adam, adamw, sam, asam, lars, lamb")
    lr: float | str | Callable[[int], float] = _opt(
        0.1, "number_or_spec", "a number or a schedule spec, e.g. 'cosine(start=0.1, steps=1000)'"
    )
    batch_size: int | str | Callable[[int], int] = _opt(
        128, "int_or_spec", "an integer or a batch schedule spec"
    )
    steps: int | None = _opt(None, "int", "training length in iterations (exactly one of steps and epochs)")
    epochs: float | None = _opt(None, "float", "training length in epochs (exactly one of steps and epochs)")
    momentum: float | str = _opt(0.9, "float", "SGD momentum (Adam's beta1)")
    weight_decay: float = _opt(0.0, "float", "L2 weight decay of the optimizer")
    rho: float | None = _opt(None, "float", "SAM neighbourhood size")
    optimizer_opts: dict[str, Any] = _opt(None, "json", "JSON dict of extra optimizer options", factory=dict)
    seed: int = _opt(0, "int", "seeds the data order (and dropout)")
    model_seed: int | None = _opt(None, "int", "seeds the model's initialisation (default: seed)")
    eval_every: int | None = _opt(None, "int", "evaluate every this many steps (default: about 20 per run)")
    max_micro_batch: int | None = _opt(None, "int", "accumulate micro-batches of at most this size")
    lr_rule: str | None = _opt(
        None, "str", "linear or sqrt: scale lr from base_batch_size to the (global) batch (Goyal et al. 2017)"
    )
    base_batch_size: int | None = _opt(None, "int", "the batch size the lr was tuned for (lr_rule, warmup)")
    warmup: int | None = _opt(None, "int", "gradual warmup steps to the scaled lr")
    stop_train_acc: float | None = _opt(
        None, "float", 'end the run once the training accuracy reaches this (Keskar\'s "until plateau")'
    )

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in order."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """``{name: default}`` of every option (fresh dicts for the ``*_opts``)."""
        return cls().to_dict()

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        """The config of a mapping: unknown keys are rejected (the message lists the valid ones and the closest).

        Raises:
            ConfigError: an unknown key, or neither ``steps`` nor ``epochs``.
        """
        names = cls.names()
        unknown = [k for k in config if k not in names]
        if unknown:
            from .errors import did_you_mean

            raise ConfigError(
                f"unknown training option {unknown[0]!r}.{did_you_mean(unknown[0], names)} "
                f"Valid options: {', '.join(sorted(names))}"
            )
        cfg = cls(**config)
        if cfg.steps is None and cfg.epochs is None:
            raise ConfigError("give exactly one of steps= and epochs= (got neither)")
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` in field order (the values themselves, not copies)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def cli_options(cls) -> list[dict[str, Any]]:
        """One entry per option with a command-line flag: ``{"name", "flag", "kind", "default", "help"}``.

        ``flag`` is ``--`` plus the name with ``-`` for ``_``; ``kind`` is one of :data:`CLI_KINDS` (the CLI maps
        it to its converter: ``json`` a JSON dict, ``number_or_spec`` / ``int_or_spec`` a number or a schedule
        spec string); ``default`` is the option's default.
        """
        defaults = cls.defaults()
        return [
            {
                "name": f.name,
                "flag": "--" + f.name.replace("_", "-"),
                "kind": f.metadata["cli"],
                "default": defaults[f.name],
                "help": f.metadata["help"],
            }
            for f in fields(cls)
            if f.metadata.get("cli") is not None
        ]


#: The keys a training config (``lrbs train`` options, sweep grids) may hold, with their defaults
#: (derived from :class:`TrainConfig`; kept for existing callers).
CONFIG_DEFAULTS: dict[str, Any] = TrainConfig.defaults()


def parse_spec(name: str, value: Any) -> Any:
    """A schedule given as a string spec (``"cosine(start=0.1, steps=1000)"``) becomes a Schedule."""
    if isinstance(value, str):
        from .schedules import parse

        return parse(value)
    return value


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject unknown keys (the message lists the valid ones): ``TrainConfig.from_dict``."""
    return TrainConfig.from_dict(config).to_dict()


def train_config(
    config: dict[str, Any],
    *,
    store: Any = None,
    callbacks: Iterable[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    dataset: Any = None,
    precision: str = "32",
) -> tuple[nn.Module, FitResult]:
    """Build the model and dataset named in ``config`` and train: the engine behind ``lrbs train`` and sweeps.

    Args:
        config: options as in :data:`CONFIG_DEFAULTS` (``model``, ``dataset``, ``optimizer``, ``lr`` (a number or a
            schedule spec string), ``batch_size`` (an int or a spec), ``steps`` or ``epochs``, ``seed``, ...).
            The model is initialised with ``model_seed`` (default: ``seed``).
        dataset: an already loaded ``Dataset`` to reuse (must match ``config["dataset"]``).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (see :func:`fit`); not a config key, so configs
            and their run keys stay as they were; a non-default precision is recorded in the result's config.

    Returns:
        ``(model, FitResult)``; the result's config is the normalized ``config``.
    """
    from .data import load_dataset
    from .models import build_model

    cfg = normalize_config(config)
    ds = dataset if dataset is not None else load_dataset(cfg["dataset"], **(cfg["dataset_opts"] or {}))
    mseed = cfg["seed"] if cfg["model_seed"] is None else cfg["model_seed"]
    model = build_model(cfg["model"], dataset=ds, seed=mseed, **(cfg["model_opts"] or {}))
    lr = parse_spec("lr", cfg["lr"])
    batch = parse_spec("batch_size", cfg["batch_size"])
    if cfg["lr_rule"] is not None or cfg["warmup"]:
        from .recipes import linear_scaling

        if cfg["base_batch_size"] is None:
            raise ConfigError("lr_rule/warmup need base_batch_size= (the batch size the lr was tuned for)")
        lr = linear_scaling(
            lr,
            batch,
            cfg["base_batch_size"],
            rule=cfg["lr_rule"] or "linear",
            warmup_steps=cfg["warmup"] or 0,
        )
    result = fit(
        model,
        ds,
        optimizer=cfg["optimizer"],
        lr=lr,
        batch_size=batch,
        steps=cfg["steps"],
        epochs=cfg["epochs"],
        momentum=parse_spec("momentum", cfg["momentum"]),
        weight_decay=cfg["weight_decay"],
        rho=cfg["rho"],
        optimizer_opts=cfg["optimizer_opts"] or None,
        seed=cfg["seed"],
        eval_every=cfg["eval_every"],
        max_micro_batch=cfg["max_micro_batch"],
        callbacks=[
            *callbacks,
            *([StopAtTrainAccuracy(cfg["stop_train_acc"])] if cfg["stop_train_acc"] else []),
        ],
        store=store,
        checkpoint=checkpoint,
        progress=progress,
        config={"train_config": jsonable(cfg)},
        precision=precision,
    )
    return model, result
