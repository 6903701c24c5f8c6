"""How a batch becomes a loss, and where batches come from: the one protocol under every analysis.

**Batches.** A tuple or list ``(x, y)`` or ``(x1, ..., xk, y)`` calls ``model(x1, ..., xk)`` and
``loss_fn(output, y)`` (default cross-entropy). A mapping (a dict, HF ``BatchEncoding``) calls ``model(**batch)``;
its loss is ``loss_fn(output, batch)`` when a ``loss_fn`` is given, else ``output.loss`` (HF ``ModelOutput``),
``output["loss"]``, or the sum of a dict of scalar losses (torchvision's detection convention). Anything else —
or any batch at all, when given — goes through ``compute_loss(model, batch) -> scalar tensor`` (the name and
signature of HF Trainer's ``compute_loss``).

**Weights.** Full-data values are sample-weighted means ``sum_b w_b L_b / sum_b w_b``. A batch's weight is its
number of samples, the leading dimension of its first tensor, unless ``batch_weight(batch) -> float`` says otherwise
(e.g. the number of non-ignored label tokens of a language model:
``batch_weight=lambda b: int((b["labels"] != -100).sum())``).

**Accuracy** is defined for classification only: a 2-D float ``(N, C)`` output (or ``output.logits``) against
integer labels of shape ``(N,)``; elsewhere it is ``None`` (absent, not wrong).

**Sources.** :func:`as_source` turns whatever the user holds into one of three sources: tensors
(:class:`TensorSource`: an lrbs ``Dataset`` or ``Split``, ``(x, y)`` or ``(x1, ..., xk, y)`` tensors, a
``TensorDataset``, a dict of equally long tensors), a map-style dataset (:class:`MapSource`: any
``torch.utils.data.Dataset`` with ``__len__``, e.g. ``Subset`` or a dataset with transforms, collated with
``default_collate`` or the given ``collate_fn``) or an iterable of ready batches (:class:`LoaderSource`: a
``DataLoader`` with any collate function, an ``IterableDataset`` (batched here), a list of batches). Indexable
sources are sampled by index, so streaming never concatenates the whole dataset.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import ConfigError, LrbsError, LrbsTypeError, ShapeError, check_int

__all__ = [
    "BatchLoss",
    "Evaluated",
    "ModelCallError",
    "TensorSource",
    "MapSource",
    "LoaderSource",
    "BatchStream",
    "Sampler",
    "as_source",
    "batch_size_of",
    "batch_tensors",
    "cast_floating",
    "collect_batches",
    "describe_batch",
    "index_batch",
    "model_device",
    "seeded_rng",
    "slice_batch",
    "to_device",
]

LossFn = Callable[[Any, Any], torch.Tensor]
ComputeLoss = Callable[[nn.Module, Any], torch.Tensor]


class ModelCallError(LrbsError, RuntimeError):
    """The model (or ``compute_loss``) raised on a batch; the message names the call that was made."""


# ----------------------------------------------------------------------------------------------- batch structure
def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) batch, depth first, in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in batch_tensors(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in batch_tensors(v)]
    return []


def batch_size_of(batch: Any) -> int:
    """The number of samples of a batch: the leading dimension of its first tensor (0-d counts as 1)."""
    ts = batch_tensors(batch)
    if not ts:
        raise _unreadable(batch, "it holds no tensor")
    t = ts[0]
    return int(t.shape[0]) if t.dim() else 1


def _map(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: _map(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map(v, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map(v, fn) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """The batch with every tensor on ``device`` (mappings become dicts); tensors already there are not copied."""
    device = torch.device(device)
    return _map(batch, lambda t: t if t.device == device else t.to(device, non_blocking=non_blocking))


def cast_floating(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating-point tensors cast to ``dtype`` (integer ids and labels are kept)."""
    return _map(batch, lambda t: t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t)


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of a batch: every tensor whose leading dimension is the batch's size is sliced."""
    n = batch_size_of(batch)
    return _map(batch, lambda t: t[start:stop] if t.dim() and t.shape[0] == n else t)


def index_batch(batch: Any, idx: torch.Tensor) -> Any:
    """Samples ``idx`` of a batch (same rule as :func:`slice_batch`)."""
    n = batch_size_of(batch)
    return _map(batch, lambda t: t[idx.to(t.device)] if t.dim() and t.shape[0] == n else t)


def describe_batch(batch: Any) -> str:
    """``dict with keys ['input_ids', 'labels']`` / ``tuple of 3: shapes [(8, 40), (8, 3), (8,)]`` / ``str``."""
    name = type(batch).__name__
    if isinstance(batch, Mapping):
        return f"{name} with keys {list(batch.keys())}"
    if isinstance(batch, (tuple, list)):
        return f"{name} of {len(batch)}: {[_shape(v) for v in batch]}"
    if isinstance(batch, torch.Tensor):
        return f"Tensor of shape {tuple(batch.shape)}"
    return name


def _shape(v: Any) -> Any:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _unreadable(batch: Any, why: str) -> LrbsTypeError:
    return LrbsTypeError(
        f"cannot read a batch of type {describe_batch(batch)}: {why}. Batches are (x, y) / (x1, ..., xk, y) "
        "tuples or mappings for model(**batch); for anything else pass loss_fn=(output, target_or_batch) -> "
        "loss, or compute_loss=(model, batch) -> scalar loss tensor"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------------------- batch -> loss
class Evaluated:
    """What one forward pass gave: the scalar ``loss`` tensor, the model ``output`` and the batch's ``weight``."""

    __slots__ = ("loss", "output", "weight")

    def __init__(self, loss: torch.Tensor, output: Any, weight: float):
        self.loss, self.output, self.weight = loss, output, weight


class BatchLoss:
    """How a batch becomes a loss (see the module docstring): one object, used by every analysis and loop.

    Args:
        loss_fn: ``loss_fn(output, y)`` for tuple batches, ``loss_fn(output, batch)`` for mappings; mean
            reduction. Default: cross-entropy for tuples, the model's own loss for mappings.
        compute_loss: ``compute_loss(model, batch) -> scalar tensor``; when given it is used for every batch.
        batch_weight: ``batch_weight(batch) -> float``, the batch's weight in a full-data mean (default: its
            number of samples).
    """

    def __init__(
        self,
        loss_fn: LossFn | None = None,
        compute_loss: ComputeLoss | None = None,
        batch_weight: Callable[[Any], float] | None = None,
    ):
        for name, fn in (
            ("loss_fn", loss_fn),
            ("compute_loss", compute_loss),
            ("batch_weight", batch_weight),
        ):
            if fn is not None and not callable(fn):
                raise LrbsTypeError(f"{name}={fn!r} is not allowed: must be a callable")
        if loss_fn is not None and compute_loss is not None:
            raise ConfigError(
                "give loss_fn= or compute_loss=, not both (compute_loss computes the whole loss)"
            )
        self.loss_fn, self.compute_loss, self.batch_weight = loss_fn, compute_loss, batch_weight

    @property
    def name(self) -> str:
        """What the loss is, for the settings of results."""
        fn = self.compute_loss or self.loss_fn
        if fn is None:
            return "cross_entropy|model"
        return getattr(fn, "__name__", type(fn).__name__)

    # -- the call -------------------------------------------------------------------------------------------------
    def split(self, batch: Any) -> tuple[tuple, dict, Any]:
        """``(args, kwargs, target)`` of the model call for a tuple or mapping batch."""
        if isinstance(batch, Mapping):
            return (), dict(batch), batch
        if isinstance(batch, (tuple, list)):
            if len(batch) < 2:
                raise _unreadable(batch, "a tuple batch needs at least (x, y)")
            return tuple(batch[:-1]), {}, batch[-1]
        raise _unreadable(batch, "it is neither a tuple nor a mapping")

    def output(self, model: Callable, batch: Any) -> Any:
        """``model(*args, **kwargs)`` for the batch, with a failure reported as the call that was made."""
        args, kwargs, _ = self.split(batch)
        try:
            return model(*args, **kwargs)
        except (LrbsError, torch.OutOfMemoryError):
            raise
        except Exception as e:
            raise ModelCallError(
                f"the model raised {type(e).__name__}: {e} — call was {_call_text(args, kwargs)}"
            ) from e

    def loss_of(self, output: Any, batch: Any) -> torch.Tensor:
        """The scalar loss of ``output`` on ``batch``."""
        if isinstance(batch, Mapping):
            loss = self.loss_fn(output, batch) if self.loss_fn is not None else _model_loss(output, batch)
        else:
            target = batch[-1]
            loss = (
                nn.functional.cross_entropy(output, target)
                if self.loss_fn is None
                else self.loss_fn(output, target)
            )
        return _check_scalar(loss, "loss_fn" if self.loss_fn is not None else "the model's loss")

    def evaluate(self, model: Callable, batch: Any) -> Evaluated:
        """Forward pass and loss of one batch. ``model`` is a module or any callable taking the model's inputs."""
        if self.compute_loss is not None:
            try:
                loss = self.compute_loss(model, batch)
            except (LrbsError, torch.OutOfMemoryError):
                raise
            except Exception as e:
                raise ModelCallError(
                    f"compute_loss raised {type(e).__name__}: {e} — on a batch of type {describe_batch(batch)}"
                ) from e
            return Evaluated(_check_scalar(loss, "compute_loss"), None, self.weight(batch))
        out = self.output(model, batch)
        return Evaluated(self.loss_of(out, batch), out, self.weight(batch))

    def loss(self, model: Callable, batch: Any) -> torch.Tensor:
        """The scalar loss of one batch."""
        return self.evaluate(model, batch).loss

    def weight(self, batch: Any) -> float:
        """The batch's weight in full-data means."""
        if self.batch_weight is None:
            return float(batch_size_of(batch))
        w = float(self.batch_weight(batch))
        if not (math.isfinite(w) and w >= 0):
            raise ConfigError(f"batch_weight returned {w!r} for a batch: must be a finite number >= 0")
        return w

    # -- accuracy -------------------------------------------------------------------------------------------------
    def correct(self, output: Any, batch: Any) -> torch.Tensor | None:
        """Number of correct predictions (a 0-d tensor) where accuracy is defined, else None."""
        if output is None:
            return None
        logits = output
        if not isinstance(logits, torch.Tensor):
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, Mapping):
                logits = output.get("logits")
        if isinstance(batch, Mapping):
            target = batch.get("labels", batch.get("label"))
        elif isinstance(batch, (tuple, list)):
            target = batch[-1]
        else:
            return None
        if not (isinstance(logits, torch.Tensor) and isinstance(target, torch.Tensor)):
            return None
        if logits.dim() != 2 or not logits.is_floating_point() or target.dim() != 1:
            return None
        if target.is_floating_point() or target.dtype == torch.bool or len(target) != len(logits):
            return None
        return (logits.argmax(-1) == target).sum()

    def defines_accuracy(self, model: Callable, batch: Any) -> bool:
        """Whether accuracy is defined for this model and batch (one forward pass, no gradients)."""
        if self.compute_loss is not None:
            return False
        with torch.no_grad():
            return self.correct(self.output(model, batch), batch) is not None


def _call_text(args: tuple, kwargs: dict) -> str:
    if kwargs:
        return f"model(**batch) with keys {list(kwargs.keys())} ({', '.join(f'{k}: {_shape(v)}' for k, v in kwargs.items())})"
    return f"model({', '.join(str(_shape(a)) for a in args)})"


def _model_loss(output: Any, batch: Any) -> torch.Tensor:
    """The loss a model computed itself: ``output.loss``, ``output["loss"]`` or the sum of a dict of losses."""
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
        if (
            loss is None
            and output
            and all(
                isinstance(v, torch.Tensor) and v.dim() == 0 and v.is_floating_point()
                for v in output.values()
            )
        ):
            loss = sum(output.values())
    if isinstance(loss, torch.Tensor):
        return loss
    what = type(output).__name__
    keys = f" with keys {list(output.keys())}" if isinstance(output, Mapping) else ""
    raise LrbsTypeError(
        f"the model's output ({what}{keys}) on a batch of type {describe_batch(batch)} has no loss: give the "
        "model its labels (e.g. a 'labels' key), or pass loss_fn=(output, batch) -> loss, or "
        "compute_loss=(model, batch) -> scalar loss tensor"
    )


def _check_scalar(loss: Any, who: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise LrbsTypeError(f"{who} returned {type(loss).__name__}: must return a scalar torch.Tensor")
    if loss.dim() != 0:
        raise ShapeError(
            f"{who} must return a scalar (mean over the batch); it returned a tensor of shape {tuple(loss.shape)}"
        )
    return loss


# ----------------------------------------------------------------------------------------------- data sources
class TensorSource:
    """Samples held as equally long tensors; a batch is a tuple (or dict) of the indexed tensors."""

    kind = "tensors"

    def __init__(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor]):
        self.keys = list(tensors.keys()) if isinstance(tensors, Mapping) else None
        self.tensors = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        lens = {len(t) for t in self.tensors}
        if len(lens) != 1:
            raise ConfigError(f"data has tensors of different lengths {sorted(lens)}: they must match")
        self.num_samples = lens.pop()

    def take(self, idx: torch.Tensor) -> Any:
        """The batch of samples ``idx``."""
        parts = [t[idx.to(t.device)] if idx.device != t.device else t[idx] for t in self.tensors]
        return dict(zip(self.keys, parts)) if self.keys is not None else tuple(parts)

    def slice(self, start: int, stop: int) -> Any:
        """The batch of samples ``start:stop`` (views, no copy)."""
        parts = [t[start:stop] for t in self.tensors]
        return dict(zip(self.keys, parts)) if self.keys is not None else tuple(parts)

    @property
    def device(self) -> torch.device:
        return self.tensors[0].device

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.kind,
            "num_samples": self.num_samples,
            "shapes": [tuple(t.shape) for t in self.tensors],
        }


class MapSource:
    """A map-style dataset (``__getitem__`` + ``__len__``); a batch is ``collate_fn([ds[i] for i in idx])``."""

    kind = "map"

    def __init__(self, dataset: Any, collate_fn: Callable | None = None):
        self.dataset = dataset
        self.collate_fn = collate_fn or torch.utils.data.default_collate
        self.num_samples = len(dataset)

    def take(self, idx: torch.Tensor) -> Any:
        return self.collate_fn([self.dataset[int(i)] for i in idx.tolist()])

    def slice(self, start: int, stop: int) -> Any:
        return self.collate_fn([self.dataset[i] for i in range(start, stop)])

    device = torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "num_samples": self.num_samples, "dataset": type(self.dataset).__name__}


class LoaderSource:
    """Ready batches from an iterable (a DataLoader, a batched IterableDataset, a list of batches).

    ``reseed(seed)`` seeds the loader's own generators (shuffling samplers), and ``restore()`` puts their states
    back, so a consumer can replay the same order and leave the loader as it found it.
    """

    kind = "loader"

    def __init__(self, iterable: Iterable):
        self.iterable = iterable
        self.generators = _loader_generators(iterable)
        self._states = [g.get_state() for g in self.generators]
        try:
            self.num_batches: int | None = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            self.num_batches = None
        self.num_samples = None

    def reseed(self, seed: int) -> None:
        for g in self.generators:
            g.manual_seed(seed)

    def restore(self) -> None:
        for g, s in zip(self.generators, self._states):
            g.set_state(s)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.iterable)

    device = torch.device("cpu")

    def describe(self) -> dict[str, Any]:
        return {"source": self.kind, "loader": type(self.iterable).__name__, "num_batches": self.num_batches}


def _loader_generators(loader: Any) -> list[torch.Generator]:
    cands = [getattr(loader, "generator", None), getattr(getattr(loader, "sampler", None), "generator", None)]
    bs = getattr(loader, "batch_sampler", None)
    cands.append(getattr(getattr(bs, "sampler", None), "generator", None))
    out: list[torch.Generator] = []
    for g in cands:
        if isinstance(g, torch.Generator) and all(g is not h for h in out):
            out.append(g)
    return out


Source = TensorSource | MapSource | LoaderSource


def as_source(data: Any, *, name: str = "data", batch_size: int | None = None) -> Source:
    """Normalize a data argument into a source (see the module docstring).

    Args:
        data: an lrbs ``Dataset`` (its train split is used) or ``Split``; ``(x, y)`` / ``(x1, ..., xk, y)`` tensors
            or a dict of equally long tensors; any map-style ``torch.utils.data.Dataset``; an ``IterableDataset``
            (batched here with ``batch_size``); a ``DataLoader``; a list of batches; a source (returned as is).
        name: the argument's name, for error messages.
        batch_size: batch size used to batch a bare ``IterableDataset`` (default 64).

    Raises:
        ConfigError: ``data`` is None or empty; tensors of different lengths.
        LrbsTypeError: a type the protocol cannot read.
    """
    if isinstance(data, (TensorSource, MapSource, LoaderSource)):
        return data
    if data is None:
        raise ConfigError(
            f"{name}=None is not allowed: give a Dataset, a DataLoader, (x, y) tensors or a list of batches"
        )
    src = _as_source(data, name, batch_size)
    if src.num_samples == 0 or (isinstance(src, LoaderSource) and src.num_batches == 0):
        raise ConfigError(f"{name} is empty: {type(data).__name__} has no samples")
    return src


def _as_source(data: Any, name: str, batch_size: int | None) -> Source:
    from .data import Split

    if hasattr(data, "train") and hasattr(data, "test") and not isinstance(data, torch.utils.data.Dataset):
        data = data.train  # an lrbs Dataset
    if isinstance(data, Split):  # exactly its tensors (a user dataset with .x/.y may transform its items)
        return TensorSource((data.x, data.y))
    if isinstance(data, torch.utils.data.TensorDataset):
        return TensorSource(data.tensors)
    if isinstance(data, (tuple, list)) and len(data) >= 2 and all(isinstance(t, torch.Tensor) for t in data):
        return TensorSource(data)
    if isinstance(data, Mapping) and data and all(isinstance(t, torch.Tensor) for t in data.values()):
        return TensorSource(data)
    if isinstance(data, torch.utils.data.DataLoader):
        return LoaderSource(data)
    if isinstance(data, torch.utils.data.IterableDataset):
        b = 64 if batch_size is None else check_int("batch_size", batch_size, low=1)
        return LoaderSource(torch.utils.data.DataLoader(data, batch_size=b))
    if isinstance(data, torch.utils.data.Dataset) and _has_len(data):
        return MapSource(data)
    if isinstance(data, (tuple, list)):
        return LoaderSource(data)  # a list of ready batches
    raise LrbsTypeError(
        f"{name}={type(data).__name__} is not allowed: give an lrbs Dataset or Split, (x, y) or (x1, ..., xk, y) "
        "tensors, a torch Dataset (map-style or iterable), a DataLoader, or a list of batches"
    )


def _has_len(obj: Any) -> bool:
    try:
        len(obj)
    except TypeError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- sampling
class Sampler:
    """Seeded sampling without replacement; epochs are consecutive permutations and a batch may span two.

    The order is ``torch.randperm(n, generator)`` epoch after epoch — the same stream for every consumer (fit, the
    range test, the noise scale), so a seed means the same batches everywhere.
    """

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def take(self, b: int) -> torch.Tensor:
        """The indices of the next ``b`` samples."""
        parts, need = [], b
        while need:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            k = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + k])
            self.pos += k
            need -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class BatchStream:
    """An endless, seeded stream of batches on ``device`` from any source.

    Indexable sources (tensors, map-style datasets) draw ``batch_size`` samples with :class:`Sampler`
    (``torch.Generator().manual_seed(seed)``); a loader source yields its own batches, cycled, with its generators
    reseeded by ``seed`` (call :meth:`close` to restore them). ``next(b)`` may ask for another batch size at each
    step (batch-size schedules) on indexable sources; a loader's batch size is its own.
    """

    def __init__(self, source: Source, batch_size: int | None, device: torch.device, seed: int = 0):
        self.source, self.device = source, torch.device(device)
        self.batch_size = batch_size
        self.indexable = not isinstance(source, LoaderSource)
        if self.indexable:
            self.sampler = Sampler(source.num_samples, torch.Generator().manual_seed(seed))
        else:
            source.reseed(seed)
            self._it: Iterator[Any] | None = iter(source)

    def next(self, batch_size: int | None = None) -> Any:
        """The next batch, on the stream's device."""
        if self.indexable:
            b = batch_size or self.batch_size
            idx = self.sampler.take(b)
            src = self.source
            if isinstance(src, TensorSource) and src.device.type != "cpu":
                idx = idx.to(src.device, non_blocking=True)
            batch = src.take(idx)
        else:
            batch = self._next_loader()
        return to_device(batch, self.device, non_blocking=True)

    def _next_loader(self) -> Any:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.source)
            try:
                return next(self._it)
            except StopIteration:
                raise ConfigError("data is empty: the loader yielded no batches") from None

    def close(self) -> None:
        """Restore a loader source's generators (a no-op for indexable sources)."""
        if not self.indexable:
            self.source.restore()


def collect_batches(
    source: Source,
    *,
    batch_size: int | None,
    max_samples: int | None,
    seed: int = 0,
    default_batch: int = 256,
    max_unsized: int = 4096,
) -> list[Any]:
    """A fixed, seeded, bounded list of batches (for an :class:`Objective`), on the source's device.

    Indexable sources: a seeded random subset of ``max_samples`` samples (``torch.randperm`` with
    ``Generator().manual_seed(seed)``; all samples, in order, when ``max_samples`` is None or not smaller), cut into
    consecutive batches of ``batch_size`` (tensors: one batch of everything by default; map-style datasets:
    ``default_batch``). Loader sources: the loader's batches, in order, under a fork of the RNG seeded by ``seed``
    (so a shuffling loader gives the same batches every time and the caller's random state is untouched), until
    ``max_samples`` samples (the last batch trimmed); an unsized loader stops at ``max_unsized`` samples when
    ``max_samples`` is None.
    """
    if not isinstance(source, LoaderSource):
        return _collect_indexed(source, batch_size, max_samples, seed, default_batch)
    limit = (
        max_samples if max_samples is not None else (None if source.num_batches is not None else max_unsized)
    )
    out, n = [], 0
    with seeded_rng(seed):
        source.reseed(seed)
        try:
            for batch in source:
                b = batch_size_of(batch)
                if limit is not None and n + b > limit:
                    batch, b = slice_batch(batch, 0, limit - n), limit - n
                if b > 0:
                    out.append(batch)
                n += b
                if limit is not None and n >= limit:
                    break
        finally:
            source.restore()
    if not out:
        raise ConfigError("data is empty: the loader yielded no batches")
    return out


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block under torch's CPU, Python's and NumPy's global RNGs seeded by ``seed``, and put the caller's
    states back afterwards (random transforms and shuffling loaders then give the same batches every time, and
    the user's random state is untouched)."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def _collect_indexed(source: Source, batch_size, max_samples, seed, default_batch) -> list[Any]:
    n = source.num_samples
    idx = None
    if max_samples is not None:
        max_samples = check_int("max_samples", max_samples, low=1)
        if max_samples < n:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(n, generator=g)[:max_samples]
            n = max_samples
    if batch_size is None:
        batch_size = n if isinstance(source, TensorSource) else min(n, default_batch)
    b = min(check_int("batch_size", batch_size, low=1), n)
    if isinstance(source, TensorSource):
        if idx is None:
            return [source.slice(i, i + b) for i in range(0, n, b)]
        sub = TensorSource([t[idx.to(t.device)] for t in source.tensors])
        sub.keys = source.keys
        return [sub.slice(i, i + b) for i in range(0, n, b)]
    order = torch.arange(n) if idx is None else idx
    with seeded_rng(seed):  # a dataset's random transforms draw from the seeded, restored RNGs
        return [source.take(order[i : i + b]) for i in range(0, n, b)]
