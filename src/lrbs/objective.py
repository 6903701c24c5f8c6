"""The core: a model, a loss and fixed data, evaluated functionally at any parameters.

Every analysis in lrbs (curvature, sharpness, landscapes, paths, noise scale) is a function of an
:class:`Objective`. The Objective holds a *private copy* of the model and a fixed, ordered set of batches, so that no
analysis can mutate the user's model, its buffers, its ``requires_grad`` flags or its train/eval mode.

The batches are whatever the user's data yields, read by the one batch protocol of :mod:`lrbs.batches`: ``(x, y)``
or ``(x1, ..., xk, y)`` tuples (``model(x1, ..., xk)``, ``loss_fn(output, y)``), mappings (``model(**batch)`` and the
model's own loss: ``output.loss``, ``output["loss"]`` or the sum of a dict of losses, or ``loss_fn(output, batch)``),
or anything at all through ``compute_loss(model, batch)``. Evaluation at a point ``theta`` is functional
(``torch.func.functional_call`` with the parameters swapped in), so gradients, Hessian-vector products and ``vmap``
over parameter points work for any model the protocol can call.

Parameters are handled as one flat vector ``theta`` (the trainable parameters in ``named_parameters`` order);
``flatten`` / ``unflatten`` convert to and from a ``{name: tensor}`` dict, and every method accepts either form.

Full-data values are weighted means over the fixed batches, ``L = sum_b w_b L_b / sum_b w_b``, where ``w_b`` is the
batch's number of samples unless ``batch_weight`` says otherwise (e.g. the non-ignored label tokens of a language
model). Accuracy (classification logits against integer labels) is a mean over samples, and absent where undefined.

Curvature and landscapes run in the Objective's dtype (float32 or float64, never mixed precision).

**Which implementation runs** is decided by rule, never by a timing race: on CPU the HVP is reverse-over-reverse on
a cached gradient graph (``"rev_rev"``), a block of vectors is multiplied row by row (``"loop"``) and ``loss_many``
writes each point into the private model (``"sequential"``) -- measured fastest on this project's CPUs for small
models; on CUDA, forward-over-reverse (``"fwd_rev"``), the batched block and the batched (``vmap``) ``loss_many``,
where kernel launches dominate. A rule's choice that the model cannot run (an op without forward-mode AD or a
``vmap`` rule) falls back to the CPU choice, and ``settings()`` records what ran. :meth:`Objective.batch_hvp` (one
product per batch, the data-split trace's) runs on stacked copies of the parameters when they fit, by size
(:func:`rule_batch_hvp_block`). The user may set ``obj.hvp_method`` / ``obj.hvp_block`` / ``obj.batch_hvp_block`` /
``obj.loss_many_method`` or pass ``method=`` / ``block=``; timing both ways is an opt-in (``"timed"``).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .batches import (
    BatchLoss,
    Evaluated,
    TensorSource,
    as_source,
    batch_size_of,
    batch_tensors,
    cast_floating,
    collect_batches,
    index_batch,
    model_device,
    slice_batch,
    to_device,
)
from .errors import ConfigError, LrbsError, LrbsTypeError, ShapeError, check_choice, check_int

__all__ = [
    "Objective",
    "HVP_METHODS",
    "HVP_BLOCKS",
    "LOSS_MANY_METHODS",
    "rule_hvp_method",
    "second_order_context",
    "rule_hvp_block",
    "rule_batch_hvp_block",
    "rule_loss_many_method",
]

BN_MODES = ("eval", "train", "recompute")
HVP_METHODS = ("rev_rev", "fwd_rev")
HVP_BLOCKS = ("loop", "batched")
BATCH_HVP_BLOCKS = ("loop", "stacked")
LOSS_MANY_METHODS = ("sequential", "batched")
_OPTIONS = {
    "hvp_method": HVP_METHODS,
    "hvp_block": HVP_BLOCKS,
    "batch_hvp_block": BATCH_HVP_BLOCKS,
    "loss_many_method": LOSS_MANY_METHODS,
}
#: the most entries ``batches x parameters`` of the stacked copies :meth:`Objective.batch_hvp` holds by rule
STACK_LIMIT = 2**24
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)
# What a rule's choice may raise when the model cannot run it (forward-mode AD or vmap not covered by an op).
_UNSUPPORTED = (RuntimeError, NotImplementedError)


def second_order_context():
    """Scaled-dot-product attention on its math backend, for second derivatives: PyTorch's fused attention kernels
    (the default of HuggingFace models) implement neither double backward nor forward-mode AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def rule_hvp_method(device: torch.device | str) -> str:
    """The HVP implementation chosen by rule: ``"fwd_rev"`` on CUDA, ``"rev_rev"`` elsewhere."""
    return "fwd_rev" if torch.device(device).type == "cuda" else "rev_rev"


def rule_hvp_block(device: torch.device | str) -> str:
    """How a block of vectors is multiplied by rule: ``"batched"`` on CUDA, ``"loop"`` elsewhere."""
    return "batched" if torch.device(device).type == "cuda" else "loop"


def rule_batch_hvp_block(num_batches: int, num_groups: int, num_params: int, method: str) -> str:
    """How :meth:`Objective.batch_hvp` multiplies its batches' Hessians by rule: ``"stacked"`` (every batch's
    parameters a row of one stacked leaf per group of same-shaped batches, one ``vmap``-ed forward per group and one
    autograd call per product for all rows) when the HVP is ``rev_rev``, there are at least two batches, at most
    half as many groups as batches, and ``num_batches x num_params <= STACK_LIMIT``; else ``"loop"`` (one autograd
    call per batch). On the 2-core CPUs of bench/RESULTS.md the stacked way cut a pass over 40 pieces of 100
    samples of the trained MNIST-1D mlp from 35-47 ms to 22-24 ms and its graph from ~37 ms to ~13 ms (the loop pays
    a per-call overhead for every small piece); on the cnn1d both ways cost the same at that size."""
    stack = method == "rev_rev" and num_batches >= 2 and 2 * num_groups <= num_batches
    return "stacked" if stack and num_batches * num_params <= STACK_LIMIT else "loop"


def rule_loss_many_method(device: torch.device | str, bn: str = "eval") -> str:
    """The ``loss_many`` path chosen by rule: ``"batched"`` on CUDA, ``"sequential"`` elsewhere or with
    ``bn="recompute"`` (fresh statistics at each point are not batched)."""
    if bn == "recompute":
        return "sequential"
    return "batched" if torch.device(device).type == "cuda" else "sequential"


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.numels)


class _Bound(nn.Module):
    """The private model bound to ``compute_loss``: ``forward(batch)`` is ``compute_loss(model, batch)``, so that
    one ``functional_call`` of this wrapper (names prefixed ``model.``) evaluates it with swapped parameters."""

    def __init__(self, model: nn.Module, batch_loss: BatchLoss):
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch: Any) -> Evaluated:
        return self.batch_loss.evaluate(self.model, batch)


def _concat(batches: list[Any]) -> Any:
    """One batch of every sample of ``batches`` (tensors concatenated leaf by leaf); raises on ragged batches."""
    return batches[0] if len(batches) == 1 else _join(batches, torch.cat)


def _join(batches: list[Any], join: Callable[[list[torch.Tensor]], torch.Tensor]) -> Any:
    """``batches`` joined leaf by leaf with ``join`` (``torch.cat``: their samples in one batch; ``torch.stack``: a
    new leading dimension, one row per batch); raises on mismatched leaves and on leaves that are not tensors."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        return join(batches)
    if isinstance(first, Mapping):
        return {k: _join([b[k] for b in batches], join) for k in first}
    if isinstance(first, (tuple, list)):
        parts = [_join([b[i] for b in batches], join) for i in range(len(first))]
        return type(first)(*parts) if hasattr(first, "_fields") else type(first)(parts)
    raise LrbsTypeError(f"cannot join batch parts of type {type(first).__name__}")


def _rows_of(idx: list[int], device: torch.device) -> slice | torch.Tensor:
    """Rows ``idx`` of a ``(C, n)`` block: a slice (a view, no copy) when they are consecutive, else an index."""
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, device=device)


def _stack_key(batch: Any) -> tuple:
    """Batches with equal keys stack leaf by leaf: the structure and every tensor's shape and dtype."""
    keys = tuple(batch.keys()) if isinstance(batch, Mapping) else ()
    return (type(batch).__name__, keys, tuple((tuple(t.shape), t.dtype) for t in batch_tensors(batch)))


class Objective:
    """A loss on fixed data, evaluated functionally at any parameters.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        loss_fn: ``loss_fn(output, y) -> scalar`` (mean reduction) for tuple batches, ``loss_fn(output, batch)`` for
            mappings; default cross-entropy for tuples and the model's own loss for mappings. A
            :class:`~lrbs.batches.BatchLoss` is also accepted (then ``compute_loss`` and ``batch_weight`` must be
            None).
        data: anything :func:`lrbs.batches.as_source` takes: an lrbs ``Dataset`` (its train split) or ``Split``,
            ``(x, y)`` / ``(x1, ..., xk, y)`` tensors, a map-style or iterable ``torch.utils.data.Dataset``, a
            DataLoader (any collate function), a list of batches.
        compute_loss: ``compute_loss(model, batch) -> scalar tensor`` (HF Trainer's name), used for every batch.
        batch_weight: ``batch_weight(batch) -> float``, a batch's weight in full-data means (default: its number
            of samples).
        batch_size: size of the fixed batches of an indexable source (tensors: ``None`` is one batch with all the
            data; map-style datasets: 256); a loader keeps its own batches.
        max_samples: evaluate on a fixed, seeded random subset of this many samples (loaders: their first
            ``max_samples`` samples, under an RNG seeded by ``seed``; unsized loaders stop at 4096 by default).
        seed: seed of that subset.
        bn: BatchNorm treatment, recorded in every result: ``"eval"`` (frozen running statistics), ``"train"``
            (statistics of each fixed batch, never written back), ``"recompute"`` (fresh running statistics at each
            point from a train-mode pass over the data, then eval mode — Garipov et al.'s ``update_bn``).
        dtype: compute dtype (e.g. ``torch.float64`` for references), applied to the model and to the floating
            tensors of the batches (integer ids and labels are kept); default the model's.

    Raises:
        LrbsTypeError / ConfigError / ShapeError: bad model, data, loss, batch size or bn mode; tensor data on
            another device than the model; a batch the protocol cannot read (named, with the two fixes).
        ModelCallError: the model raised on the first batch (the message names the call).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable | BatchLoss | None = None,
        data: Any = None,
        *,
        compute_loss: Callable | None = None,
        batch_weight: Callable[[Any], float] | None = None,
        batch_size: int | None = None,
        max_samples: int | None = None,
        seed: int = 0,
        bn: str = "eval",
        dtype: torch.dtype | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
        if data is None:
            raise ConfigError("data=None is not allowed: an Objective needs fixed data")
        check_choice("bn", bn, BN_MODES)
        self.bn = bn
        self.seed = seed
        self.batch_loss = self._make_batch_loss(loss_fn, compute_loss, batch_weight)
        self.loss_fn = self.batch_loss.loss_fn
        device = model_device(model)
        src = as_source(data, batch_size=batch_size)
        if isinstance(src, TensorSource) and src.device != device:
            raise ConfigError(
                f"data is on device {src.device} but the model is on {device}: move one of them"
            )
        self.source_kind = src.kind
        batches = collect_batches(src, batch_size=batch_size, max_samples=max_samples, seed=seed)
        self._setup_model(model, dtype, device)
        self._set_batches([cast_floating(to_device(b, device), self.dtype) for b in batches])
        self._graph_cache: tuple[torch.Tensor, str, Any] | None = None  # (theta, kind, graph)
        self.hvp_method: str | None = None
        self.hvp_block: str | None = None
        self.hvp_block_chunk = 16
        self.batch_hvp_block: str | None = None
        self.loss_many_method: str | None = None
        self.fallbacks: dict[str, str] = {}
        self._stats_from: Objective | None = None
        self._check_output()

    @staticmethod
    def _make_batch_loss(loss_fn, compute_loss, batch_weight) -> BatchLoss:
        if isinstance(loss_fn, BatchLoss):
            if compute_loss is not None or batch_weight is not None:
                raise ConfigError(
                    "loss_fn is a BatchLoss: give compute_loss= and batch_weight= to it, not to the Objective"
                )
            return loss_fn
        return BatchLoss(loss_fn=loss_fn, compute_loss=compute_loss, batch_weight=batch_weight)

    def _setup_model(self, model: nn.Module, dtype: torch.dtype | None, device: torch.device) -> None:
        """The private copy, its flat trainable parameters, frozen parameters and buffers."""
        self._model = copy.deepcopy(model)
        if dtype is not None:
            self._model = self._model.to(dtype)
        params = list(self._model.parameters())
        self.dtype = params[0].dtype if params else (dtype or torch.float32)
        self.device = device
        self.has_bn = any(isinstance(m, _BN_TYPES) for m in self._model.modules())
        self._model.train(self.bn == "train")
        if self.bn == "train":
            # Batch statistics without writing running buffers (and so usable under vmap).
            for m in self._model.modules():
                if isinstance(m, _BN_TYPES):
                    m.running_mean = None
                    m.running_var = None
                    m.num_batches_tracked = None
                    m.track_running_stats = False
        named = [(k, p) for k, p in self._model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError(
                "the model has no trainable parameters (requires_grad=True): nothing to analyse"
            )
        self._layout = _Layout(
            tuple(k for k, _ in named), tuple(p.shape for _, p in named), tuple(p.numel() for _, p in named)
        )
        self._frozen = {k: p.detach() for k, p in self._model.named_parameters() if not p.requires_grad}
        self._buffers = {k: b.detach().clone() for k, b in self._model.named_buffers()}
        self._theta0 = torch.cat([p.detach().reshape(-1) for _, p in named]).clone()
        for p in self._model.parameters():
            p.requires_grad_(False)
        # The private copy's trainable parameters become views of one flat buffer, so that writing a point
        # (the sequential loss_many path) is a single copy.
        self._flat = self._theta0.clone()
        self._bind_flat()
        self._bound = (
            _Bound(self._model, self.batch_loss) if self.batch_loss.compute_loss is not None else None
        )

    def _set_batches(self, batches: list[Any]) -> None:
        self._batches = batches
        sizes = [batch_size_of(b) for b in batches]
        self.num_samples = sum(sizes)
        self.batch_size = max(sizes)
        self._weights = [self.batch_loss.weight(b) for b in batches]
        self._total_weight = float(sum(self._weights))
        if not self._total_weight > 0:
            raise ConfigError(
                f"the batches' weights sum to {self._total_weight}: batch_weight must give a positive total"
            )
        self._data_cache = None

    def _bind_flat(self) -> dict[str, torch.Tensor]:
        """Make the private model's trainable parameters views of ``self._flat`` (again, e.g. after unpickling)."""
        named = dict(self._model.named_parameters())
        first = named[self._layout.names[0]]
        if first.data_ptr() != self._flat.data_ptr():
            for k, chunk, shape in zip(
                self._layout.names, torch.split(self._flat, list(self._layout.numels)), self._layout.shapes
            ):
                named[k].data = chunk.view(shape)
        return named

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_graph_cache"] = None  # autograd graphs cannot be pickled
        state["_data_cache"] = None
        return state

    # ------------------------------------------------------------------ parameters
    @property
    def num_params(self) -> int:
        """Number of trainable parameters."""
        return self._layout.size

    @property
    def param_names(self) -> tuple[str, ...]:
        return self._layout.names

    @property
    def param_shapes(self) -> dict[str, torch.Size]:
        return dict(zip(self._layout.names, self._layout.shapes))

    def params(self) -> dict[str, torch.Tensor]:
        """A copy of the centre point (the model's parameters when the Objective was made) as a dict."""
        return self.unflatten(self._theta0.clone())

    def theta(self) -> torch.Tensor:
        """A copy of the centre point as a flat vector."""
        return self._theta0.clone()

    def flatten(self, params: Mapping[str, torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """``{name: tensor}`` -> flat vector (a flat vector is checked and returned as is)."""
        if isinstance(params, torch.Tensor):
            if params.shape[-1:] != (self.num_params,):
                raise ShapeError(
                    f"parameter vector has shape {tuple(params.shape)} but the model has {self.num_params} "
                    "trainable parameters"
                )
            return params
        if not isinstance(params, Mapping):
            raise LrbsTypeError(
                f"params={type(params).__name__} is not allowed: a dict of tensors or a flat tensor"
            )
        missing = [k for k in self._layout.names if k not in params]
        if missing:
            raise ShapeError(f"params is missing {missing[0]!r} (and {len(missing) - 1} more)")
        out = []
        for k, shape in zip(self._layout.names, self._layout.shapes):
            t = params[k]
            if t.shape != shape:
                raise ShapeError(
                    f"params[{k!r}] has shape {tuple(t.shape)} but the model needs {tuple(shape)}"
                )
            out.append(t.reshape(-1))
        return torch.cat(out)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Flat vector -> ``{name: tensor}`` (views into ``theta``, so it stays differentiable)."""
        theta = self.flatten(theta)
        chunks = torch.split(theta, list(self._layout.numels))
        return {k: c.view(s) for k, c, s in zip(self._layout.names, chunks, self._layout.shapes)}

    def _as_theta(self, params) -> torch.Tensor:
        theta = self.flatten(params)
        if theta.dtype != self.dtype:
            theta = theta.to(self.dtype)
        return theta

    def check_finite(self, params) -> torch.Tensor:
        """Return the flat parameters, raising ConfigError if any is NaN or infinite."""
        theta = self._as_theta(params)
        if not torch.isfinite(theta).all():
            bad = int((~torch.isfinite(theta)).sum())
            raise ConfigError(
                f"params has {bad} non-finite entries (NaN or inf): curvature is undefined there"
            )
        return theta

    # ------------------------------------------------------------------ data and settings
    @property
    def batches(self) -> list[Any]:
        """The fixed batches (on the model's device, floating tensors in the Objective's dtype)."""
        return list(self._batches)

    @property
    def batch_weights(self) -> list[float]:
        """Each fixed batch's weight ``w_b`` in full-data means (its sample count unless ``batch_weight``)."""
        return list(self._weights)

    @property
    def total_weight(self) -> float:
        """``sum_b w_b``: the denominator of every full-data mean."""
        return self._total_weight

    @property
    def has_accuracy(self) -> bool:
        """Whether accuracy is defined (classification logits against integer labels)."""
        return self._has_accuracy

    @property
    def data(self) -> Any:
        """The fixed data as one batch, its tensors concatenated: ``(x, y)`` for ``(x, y)`` data.

        Raises:
            LrbsTypeError: ragged batches (e.g. padded to different lengths) that cannot be concatenated.
        """
        if self._data_cache is None:
            try:
                self._data_cache = _concat(self._batches)
            except (RuntimeError, LrbsTypeError) as e:
                raise LrbsTypeError(
                    f"the fixed batches cannot be concatenated into one ({e}): use obj.batches"
                ) from None
        return self._data_cache

    @property
    def fingerprint(self) -> str:
        """Hash of the fixed data (sha256 of every batch tensor, floating ones as float32; 16 hex digits).

        Tensors are hashed position by position across batches, so ``(x, y)`` data hash as ``x`` then ``y``
        whatever the batch size.
        """
        h = hashlib.sha256()
        per = [batch_tensors(b) for b in self._batches]
        keys = [list(b.keys()) for b in self._batches if isinstance(b, Mapping)]
        if keys:
            h.update(repr(keys[0]).encode())
        if len({len(p) for p in per}) == 1:
            order = [p[j] for j in range(len(per[0])) for p in per]
        else:
            order = [t for p in per for t in p]
        for t in order:
            t = t.detach().cpu()
            h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def _loss_name(self) -> str:
        bl = self.batch_loss
        if bl.compute_loss is not None:
            return getattr(bl.compute_loss, "__name__", "custom")
        if bl.loss_fn is not None:
            return getattr(bl.loss_fn, "__name__", "custom")
        return "model" if isinstance(self._batches[0], Mapping) else "cross_entropy"

    def settings(self) -> dict[str, Any]:
        """The settings every result records, including which HVP and ``loss_many`` implementations run."""
        out = {
            "bn": self.bn,
            "has_bn": self.has_bn,
            "dtype": str(self.dtype).replace("torch.", ""),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_params": self.num_params,
            "data_fingerprint": self.fingerprint,
            "loss": self._loss_name(),
            "hvp_method": self.hvp_method or rule_hvp_method(self.device),
            "hvp_block": self.hvp_block or rule_hvp_block(self.device),
            "loss_many_method": self.loss_many_method or rule_loss_many_method(self.device, self.bn),
        }
        if self.batch_hvp_block is not None:
            out["batch_hvp_block"] = self.batch_hvp_block
        if self.batch_loss.batch_weight is not None:
            out["total_weight"] = self.total_weight
        if self.source_kind != "tensors":
            out["source"] = self.source_kind
        if self.fallbacks:
            out["fallbacks"] = dict(self.fallbacks)
        return out

    def subset(self, max_samples: int, seed: int = 0, batch_size: int | None = None) -> Objective:
        """The same objective on a fixed, seeded random subset of the data, at the same centre point.

        The subset is ``torch.randperm(num_samples, Generator().manual_seed(seed))[:max_samples]`` of the samples
        in batch order, cut into batches of ``batch_size`` (default the current one). Ragged batches that cannot
        be concatenated keep their own batches, each reduced to its selected samples.
        """
        other = copy.copy(self)
        n = min(check_int("max_samples", max_samples, low=1), self.num_samples)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.num_samples, generator=g)[:n]
        b = min(check_int("batch_size", batch_size, low=1) if batch_size else self.batch_size, n)
        try:
            whole = _concat(self._batches)
        except (RuntimeError, LrbsTypeError):
            whole = None
        if whole is not None:
            sub = index_batch(whole, idx.to(self.device))
            batches = [slice_batch(sub, i, i + b) for i in range(0, n, b)]
        else:
            batches = self._ragged_subset(idx)
        other._set_batches(batches)
        other._graph_cache = None
        return other

    def rebatched(self, batch_size: int) -> Objective:
        """The same objective with each of its batches cut, in order, into pieces of at most ``batch_size``
        samples (same samples, same centre; each piece weighted by ``batch_weight``, default its sample count).

        The full-data loss is unchanged when a batch's loss is the weighted mean of its samples' losses (the
        protocol's convention, which :meth:`subset` relies on too); with ``bn="recompute"`` the statistics still
        come from this objective's batches. The data-split trace estimator of
        :func:`lrbs.curvature.hessian_trace` uses it to draw one probe per piece.

        Raises:
            ConfigError: ``batch_size < 1``; ``bn="train"`` (batch statistics would change with the cut).
        """
        b = check_int("batch_size", batch_size, low=1)
        if self.bn == "train":
            raise ConfigError(
                "bn='train' is not allowed for rebatched(): batch statistics depend on how the data is cut; "
                "use bn='eval' or bn='recompute'"
            )
        pieces = [
            slice_batch(batch, i, i + b) for batch in self._batches for i in range(0, batch_size_of(batch), b)
        ]
        other = copy.copy(self)
        other._set_batches(pieces)
        other._graph_cache = None
        if self.bn == "recompute" and self._stats_from is None:
            other._stats_from = self
        return other

    def _ragged_subset(self, idx: torch.Tensor) -> list[Any]:
        starts = np.cumsum([0] + [batch_size_of(b) for b in self._batches])
        out = []
        for i, batch in enumerate(self._batches):
            rows = idx[(idx >= int(starts[i])) & (idx < int(starts[i + 1]))] - int(starts[i])
            if len(rows):
                out.append(index_batch(batch, rows.to(self.device)))
        return out

    def at(self, params) -> Objective:
        """The same objective with a different centre point."""
        other = copy.copy(self)
        other._theta0 = self._as_theta(params).detach().clone()
        other._graph_cache = None
        return other

    # ------------------------------------------------------------------ batch-level evaluation
    def _state(self, theta: torch.Tensor | Mapping, buffers: dict | None) -> dict[str, torch.Tensor]:
        """The module state at ``theta``: a flat vector, or ``{name: tensor}`` of every trainable parameter (used
        as given, e.g. the per-batch rows of the stacked HVP)."""
        params = dict(theta) if isinstance(theta, Mapping) else self.unflatten(theta)
        return {**self._frozen, **(self._buffers if buffers is None else buffers), **params}

    def forward(self, theta: torch.Tensor, batch: Any, buffers: dict | None = None) -> Any:
        """The model's output on ``batch`` at the flat point ``theta`` (functional, differentiable in ``theta``).

        The call is the protocol's: ``model(x1, ..., xk)`` for a tuple ``(x1, ..., xk, y)``, ``model(**batch)`` for
        a mapping. ``buffers`` default to the Objective's (see :meth:`buffers_at`).

        Raises:
            ModelCallError: the model raised (the message names the call).
        """
        state = self._state(theta, buffers)
        return self.batch_loss.output(lambda *a, **k: functional_call(self._model, state, a, k), batch)

    def evaluate_on(self, theta: torch.Tensor, batch: Any, buffers: dict | None = None) -> Evaluated:
        """Loss, output and weight of one batch at ``theta`` (functional; works with ``compute_loss``, whose
        output is None)."""
        if self._bound is None:
            out = self.forward(theta, batch, buffers)
            return Evaluated(self.batch_loss.loss_of(out, batch), out, self.batch_loss.weight(batch))
        state = {f"model.{k}": v for k, v in self._state(theta, buffers).items()}
        return functional_call(self._bound, state, (batch,))

    def loss_on(self, theta: torch.Tensor, batch: Any, buffers: dict | None = None) -> torch.Tensor:
        """The scalar loss tensor of one batch at ``theta`` (differentiable in ``theta``)."""
        return self.evaluate_on(theta, batch, buffers).loss

    def buffers_at(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """The buffers used at ``theta``: the model's, or with ``bn="recompute"`` fresh BatchNorm statistics
        (from this objective's data, or from the objective given to :meth:`with_bn_statistics_from`)."""
        if self.bn != "recompute":
            return self._buffers
        return (self._stats_from or self)._recomputed_buffers(theta)

    def with_bn_statistics_from(self, other: Objective) -> Objective:
        """The same objective whose recomputed BatchNorm statistics (``bn="recompute"``) come from ``other``'s
        data -- e.g. a test-set objective evaluated with statistics of the train data, as Garipov et al.'s
        ``update_bn`` does.

        Raises:
            LrbsTypeError: ``other`` is not an Objective. ShapeError: its parameter layout differs.
        """
        if not isinstance(other, Objective):
            raise LrbsTypeError(f"other={type(other).__name__} is not allowed: must be an Objective")
        if other.param_shapes != self.param_shapes:
            raise ShapeError(
                "other has a different parameter layout: it must be an Objective of the same model"
            )
        out = copy.copy(self)
        out._stats_from = other
        out._graph_cache = None
        return out

    def _check_output(self) -> None:
        """One forward pass on two samples of the first batch: the loss is readable and a scalar."""
        batch = self._batches[0]
        probe = slice_batch(batch, 0, 2)
        with torch.no_grad():
            try:
                ev = self.evaluate_on(self._theta0, probe)
            except LrbsError:
                self.evaluate_on(self._theta0, batch)  # the error again, naming the user's own shapes
                raise
        self._has_accuracy = self.batch_loss.correct(ev.output, probe) is not None

    def _recomputed_buffers(self, theta: torch.Tensor) -> dict:
        """BatchNorm running statistics recomputed at ``theta``: exact cumulative average over the data."""
        if not self.has_bn:
            return self._buffers
        model = self._model
        saved = {}
        for m in model.modules():
            if isinstance(m, _BN_TYPES):
                saved[m] = m.momentum
                m.momentum = None  # cumulative moving average = exact mean over batches
        buffers = {k: b.clone() for k, b in self._buffers.items()}
        for k in buffers:
            if k.endswith("running_mean") or k.endswith("num_batches_tracked"):
                buffers[k].zero_()
            elif k.endswith("running_var"):
                buffers[k].fill_(1.0)
        model.train(True)
        try:
            with torch.no_grad():
                for batch in self._batches:
                    self.forward(theta.detach(), batch, buffers)
        finally:
            model.train(False)
            for m, mom in saved.items():
                m.momentum = mom
        return buffers

    # ------------------------------------------------------------------ full-data values
    def _full_loss(self, theta: torch.Tensor) -> torch.Tensor:
        buffers = self.buffers_at(theta)
        total = 0.0
        for batch, w in zip(self._batches, self._weights):
            total = total + self.loss_on(theta, batch, buffers) * w
        return total / self._total_weight

    def loss(self, params=None) -> float:
        """Full-data loss ``sum_b w_b L_b / sum_b w_b`` at ``params`` (default: the centre point)."""
        theta = self._theta0 if params is None else self._as_theta(params)
        with torch.no_grad():
            return float(self._full_loss(theta))

    def metrics(self, params=None) -> dict[str, float | None]:
        """Full-data loss and accuracy at ``params`` (default: the centre point); accuracy is None where it is
        undefined (not a classification output)."""
        theta = self._theta0 if params is None else self._as_theta(params)
        out = self.loss_many(theta[None])
        acc = float(out["accuracy"][0]) if self._has_accuracy else None
        return {"loss": float(out["loss"][0]), "accuracy": acc}

    def loss_tensor(self, theta: torch.Tensor) -> torch.Tensor:
        """Differentiable full-data loss at a flat ``theta`` (for callers building their own autograd graphs)."""
        return self._full_loss(self._as_theta(theta))

    def grad(self, params=None, *, return_loss: bool = False):
        """Gradient of the full-data loss (same form as ``params``: dict or flat vector)."""
        theta0 = self._theta0 if params is None else self._as_theta(params)
        theta = theta0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            loss = self._full_loss(theta)
            (g,) = torch.autograd.grad(loss, theta)
        out = self.unflatten(g) if isinstance(params, Mapping) else g
        return (out, float(loss)) if return_loss else out

    # ------------------------------------------------------------------ method choice
    def _choice(self, kind: str, given: str | None) -> tuple[str, bool]:
        """``(method, by_rule)`` for ``kind`` in hvp_method / hvp_block / loss_many_method: the call's argument,
        else the attribute, else the rule (which is then stored, so results record it)."""
        options = _OPTIONS[kind]
        name = "block" if kind in ("hvp_block", "batch_hvp_block") else "method"
        if given is not None:
            if given != "timed":
                check_choice(name, given, options)
            return given, False
        current = getattr(self, kind)
        if current is not None:
            check_choice(kind, current, options + ("timed",))
            return current, False
        rules = {
            "hvp_method": lambda: rule_hvp_method(self.device),
            "hvp_block": lambda: rule_hvp_block(self.device),
            "batch_hvp_block": lambda: rule_batch_hvp_block(
                len(self._batches), len(self._stack_groups()), self.num_params, "rev_rev"
            ),
            "loss_many_method": lambda: rule_loss_many_method(self.device, self.bn),
        }
        setattr(self, kind, rules[kind]())
        return getattr(self, kind), True

    def _fall_back(self, kind: str, failed: str, to: str, err: Exception) -> str:
        """A rule's choice the model cannot run: use the CPU choice from now on, and record why."""
        if isinstance(err, torch.OutOfMemoryError):
            raise err
        setattr(self, kind, to)
        self.fallbacks[kind] = f"{failed} failed ({type(err).__name__}: {str(err)[:200]}); {to} ran"
        return to

    # ------------------------------------------------------------------ Hessian-vector products
    def _cached(self, theta: torch.Tensor, kind: str, build: Callable[[torch.Tensor], Any]) -> Any:
        """The gradient graph of ``kind`` at ``theta``: the cached one (one graph is kept), else ``build(theta)``."""
        cached = self._graph_cache
        if (
            cached is not None
            and cached[1] == kind
            and cached[0].shape == theta.shape
            and torch.equal(cached[0], theta)
        ):
            return cached[2]
        self._graph_cache = None  # free the old graph before building the new one
        graph = build(theta)
        self._graph_cache = (theta.detach().clone(), kind, graph)
        return graph

    def _graph(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-batch gradient graphs at ``theta`` built with ``create_graph=True`` (cached for repeated HVPs)."""
        return self._cached(theta, "loop", self._build_graph)

    def _build_graph(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        leaf = theta.detach().clone().requires_grad_(True)
        buffers = self.buffers_at(theta.detach())
        graphs = []
        with torch.enable_grad():
            for batch, w in zip(self._batches, self._weights):
                loss = self.loss_on(leaf, batch, buffers) * (w / self._total_weight)
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                graphs.append((leaf, g))
        return graphs

    def _stack_groups(self) -> list[list[int]]:
        """The batches' indices grouped by :func:`_stack_key` (same-shaped batches), in order of first appearance."""
        groups: dict[tuple, list[int]] = {}
        for i, batch in enumerate(self._batches):
            groups.setdefault(_stack_key(batch), []).append(i)
        return list(groups.values())

    def _build_stacked(self, theta: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor], list]]:
        """``[(indices, leaves, gradients)]`` per group of same-shaped batches: each trainable parameter's leaf
        holds one copy of it per batch (a row each, contiguous per parameter: batched matmuls on views of one flat
        ``(C, n)`` leaf ran 2-3x slower), the group's batches are stacked on a new leading dimension and ``vmap``
        evaluates batch ``c``'s loss at row ``c``, so row ``c`` of the gradients (``create_graph=True``) is batch
        ``c``'s weighted gradient and its derivative reaches row ``c`` of the leaves only."""
        buffers = self.buffers_at(theta.detach())
        names = self._layout.names

        def piece_loss(parts: tuple[torch.Tensor, ...], batch: Any) -> torch.Tensor:
            return self.loss_on(dict(zip(names, parts)), batch, buffers)

        out = []
        with torch.enable_grad():
            for idx in self._stack_groups():
                rows = len(idx)
                leaves = [
                    p.detach().expand(rows, *p.shape).clone().requires_grad_(True)
                    for p in self.unflatten(theta.detach()).values()
                ]
                batch = _join([self._batches[i] for i in idx], torch.stack)
                weights = [self._weights[i] / self._total_weight for i in idx]
                scale = torch.tensor(weights, dtype=theta.dtype, device=theta.device)
                losses = torch.func.vmap(piece_loss)(tuple(leaves), batch)
                grads = torch.autograd.grad((losses * scale).sum(), leaves, create_graph=True)
                out.append((_rows_of(idx, theta.device), leaves, list(grads)))
        return out

    def _stacked_rows(self, theta: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
        """:meth:`batch_hvp`'s rows with one autograd call over the stacked graphs (``d(sum_c g_c . v_c)`` with
        respect to the stacked leaves: row ``c`` is ``H_c v_c``)."""
        groups = self._cached(theta, "stacked", self._build_stacked)
        numels = list(self._layout.numels)
        total = 0
        for idx, _, grads in groups:
            parts = torch.split(V[idx], numels, dim=1)
            total = total + sum((g * v.view(g.shape)).sum() for g, v in zip(grads, parts))
        leaves = [leaf for _, group, _ in groups for leaf in group]
        rows = torch.autograd.grad(total, leaves, retain_graph=True)
        out = torch.empty_like(V)
        k = 0
        for idx, group, _ in groups:
            parts = [r.reshape(r.shape[0], -1) for r in rows[k : k + len(group)]]
            if isinstance(idx, slice):  # consecutive batches (the usual case): written in place, no gather
                torch.cat(parts, dim=1, out=out[idx])
            else:
                out[idx] = torch.cat(parts, dim=1)
            k += len(group)
        return out

    def _hvp_revrev(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        graphs = self._graph(theta)
        out = torch.zeros_like(v)
        for leaf, g in graphs:
            # d(g . v)/d(theta) is H v, bitwise the same as grad_outputs=v, and it avoids the symbolic-shape
            # machinery (a sympy import of 0.7-3.4 s) that a non-scalar grad_outputs pulls in on the first call.
            (hv,) = torch.autograd.grad(torch.dot(g, v), leaf, retain_graph=True)
            out += hv
        return out

    def _batch_losses(self, theta: torch.Tensor) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One function per fixed batch: ``t -> L_b(t) w_b / sum w`` (their sum is the full-data loss)."""
        buffers = self.buffers_at(theta.detach())

        def weighted(batch: Any, w: float) -> Callable[[torch.Tensor], torch.Tensor]:
            c = w / self._total_weight
            return lambda t: self.loss_on(t, batch, buffers) * c

        return [weighted(b, w) for b, w in zip(self._batches, self._weights)]

    def _hvp_fwdrev(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for f in self._batch_losses(theta):
            _, hv = torch.func.jvp(torch.func.grad(f), (theta.detach(),), (v,))
            out += hv
        return out

    def _time_hvp(self, theta: torch.Tensor) -> str:
        """Opt-in (``method="timed"``): time both HVPs, keep the faster (``hvp_timings`` records them)."""
        v = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=self.dtype).to(
            theta.device
        )
        timings = {}
        for name, fn in (("rev_rev", self._hvp_revrev), ("fwd_rev", self._hvp_fwdrev)):
            try:
                fn(theta, v)  # warm-up (builds the cached graph for rev_rev)
                t0 = time.perf_counter()
                fn(theta, v)
                fn(theta, v)
                timings[name] = time.perf_counter() - t0
            except _UNSUPPORTED:  # e.g. forward-mode AD not covered by an op
                continue
        if not timings:
            raise LrbsError("neither Hessian-vector product implementation works for this model")
        self.hvp_timings = timings
        return min(timings, key=timings.get)

    def _resolved_hvp_method(self, theta: torch.Tensor, given: str | None = None) -> str:
        method, _ = self._choice("hvp_method", given)
        if method == "timed":
            method = self._time_hvp(theta)
            self.hvp_method = method
        return method

    def hvp(
        self, params, v: torch.Tensor, *, method: str | None = None, block: str | None = None
    ) -> torch.Tensor:
        """Hessian-vector product ``H(params) @ v`` of the full-data loss.

        Args:
            params: the point (dict or flat vector).
            v: a flat vector ``(n,)`` or a block ``(k, n)`` of vectors (each row multiplied).
            method: ``"rev_rev"`` (reverse-over-reverse on a cached gradient graph, PyHessian's way),
                ``"fwd_rev"`` (``torch.func.jvp`` of ``grad``), ``"timed"`` (time both once, keep the faster in
                ``obj.hvp_method``) or ``None``: ``obj.hvp_method``, else the rule (:func:`rule_hvp_method`:
                ``fwd_rev`` on CUDA, ``rev_rev`` elsewhere; a ``fwd_rev`` the model cannot run falls back to
                ``rev_rev``, recorded in ``settings()["fallbacks"]``).
            block: how a block ``(k, n)`` is multiplied: ``"loop"`` (one HVP per row), ``"batched"`` (all rows in
                one pass, in chunks of ``hvp_block_chunk`` rows: ``is_grads_batched`` for ``rev_rev``, ``vmap``
                for ``fwd_rev`` -- the win on GPUs; on this project's CPUs it was 5-6x slower per row),
                ``"timed"`` (time both on two rows of the first block, among the ways that agree with the loop;
                ``hvp_block_timings`` records it) or ``None``: ``obj.hvp_block``, else the rule
                (:func:`rule_hvp_block`).

        Returns:
            ``H v`` with the shape of ``v``.
        """
        theta = self._as_theta(params)
        if not isinstance(v, torch.Tensor) or v.shape[-1:] != (self.num_params,) or v.dim() > 2:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ShapeError(f"v has shape {shape}: must be ({self.num_params},) or (k, {self.num_params})")
        v = v.to(dtype=self.dtype, device=theta.device)
        explicit = method is not None or self.hvp_method is not None
        method = self._resolved_hvp_method(theta, method)
        if block is not None and block != "timed":
            check_choice("block", block, HVP_BLOCKS)
        with second_order_context():
            try:
                return self._hvp_rows(theta, v, method, block)
            except _UNSUPPORTED as e:
                if explicit or method == "rev_rev":
                    raise
                return self._hvp_rows(theta, v, self._fall_back("hvp_method", method, "rev_rev", e), block)

    def _hvp_rows(self, theta: torch.Tensor, v: torch.Tensor, method: str, block: str | None) -> torch.Tensor:
        if v.dim() == 1:
            return self._hvp_fn(method)(theta, v).detach()
        if v.shape[0] < 2:
            return self._hvp_loop(theta, v, method)
        block, by_rule = self._choice("hvp_block", block)
        if block == "timed":
            self.hvp_block, head = self._time_hvp_block(theta, v[:2], method)
            return torch.cat([head, self._hvp_block(theta, v[2:], method, self.hvp_block)])
        if not by_rule or block == "loop":
            return self._hvp_block(theta, v, method, block)
        try:
            return self._hvp_block(theta, v, method, block)
        except _UNSUPPORTED as e:
            return self._hvp_block(theta, v, method, self._fall_back("hvp_block", block, "loop", e))

    def _hvp_block(self, theta: torch.Tensor, V: torch.Tensor, method: str, block: str) -> torch.Tensor:
        if len(V) == 0:
            return V.clone()
        if block == "loop":
            return self._hvp_loop(theta, V, method)
        c = self.hvp_block_chunk
        return torch.cat([self._hvp_batched(theta, V[i : i + c], method) for i in range(0, len(V), c)])

    def _hvp_fn(self, method: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return self._hvp_revrev if method == "rev_rev" else self._hvp_fwdrev

    def _hvp_loop(self, theta: torch.Tensor, V: torch.Tensor, method: str) -> torch.Tensor:
        fn = self._hvp_fn(method)
        return torch.stack([fn(theta, row) for row in V]).detach()

    def _hvp_batched(self, theta: torch.Tensor, V: torch.Tensor, method: str) -> torch.Tensor:
        out = torch.zeros_like(V)
        if method == "rev_rev":
            for leaf, g in self._graph(theta):
                (hv,) = torch.autograd.grad(g, leaf, grad_outputs=V, retain_graph=True, is_grads_batched=True)
                out += hv
            return out.detach()
        t0 = theta.detach()
        for f in self._batch_losses(theta):

            def one(u, f=f):
                return torch.func.jvp(torch.func.grad(f), (t0,), (u,))[1]

            out += torch.func.vmap(one)(V)
        return out.detach()

    def _time_hvp_block(self, theta: torch.Tensor, V: torch.Tensor, method: str) -> tuple[str, torch.Tensor]:
        """Opt-in (``block="timed"``): time the loop and the batched block HVP on two rows; returns the choice and
        ``H V`` (from the loop). A batched way that disagrees with the loop is never chosen."""
        t0 = time.perf_counter()
        ref = self._hvp_loop(theta, V, method)
        timings = {"loop": time.perf_counter() - t0}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # vmap's "no batching rule, falling back" performance warning
                got = self._hvp_batched(theta, V, method)  # warm-up, and the correctness check
                t0 = time.perf_counter()
                self._hvp_batched(theta, V, method)
                timings["batched"] = time.perf_counter() - t0
            scale = float(ref.abs().max())
            tol = (1e-4 if self.dtype == torch.float32 else 1e-10) * max(scale, 1e-30)
            if not bool(((got - ref).abs() <= tol).all()):
                timings["batched"] = math.inf  # disagrees with the loop: never chosen
        except _UNSUPPORTED:  # an op without a vmap / batched-gradient rule
            timings["batched"] = math.inf
        self.hvp_block_timings = timings
        return min(timings, key=timings.get), ref

    def batch_hvp(
        self, params, V: torch.Tensor, *, method: str | None = None, block: str | None = None
    ) -> torch.Tensor:
        """Row ``c`` of ``V`` times the Hessian of batch ``c``'s term ``(w_c / sum w) L_c`` of the full-data loss.

        The batch Hessians sum to the full-data Hessian, so ``batch_hvp(p, V).sum(0) == hvp(p, v)`` when every
        row of ``V`` is ``v``; with independent rows it is the block-diagonal operator ``diag(H_1, ..., H_C)``
        that the data-split trace estimator probes. One pass costs one full-data HVP.

        Args:
            params: the point (dict or flat vector).
            V: ``(len(batches), num_params)``.
            method: as :meth:`hvp` (``"rev_rev"`` reuses the cached per-batch gradient graphs).
            block: with ``rev_rev``, how the batches are multiplied: ``"loop"`` (one autograd call per batch),
                ``"stacked"`` (one copy of the parameters per batch, a ``vmap``-ed forward per group of same-shaped
                batches, one autograd call for all rows) or ``None``: ``obj.batch_hvp_block``, else the rule
                (:func:`rule_batch_hvp_block`, stored in ``obj.batch_hvp_block`` and ``settings()``). A stacked
                way chosen by rule that the model cannot run under ``vmap`` (data-dependent control flow,
                ``.item()``, random ops) or that runs out of memory falls back to the loop, recorded in
                ``settings()["fallbacks"]``.

        Returns:
            ``(len(batches), num_params)``.

        Raises:
            ShapeError: ``V`` is not one row per batch.
            ConfigError: an unknown ``block``.
        """
        theta = self._as_theta(params)
        shape = (len(self._batches), self.num_params)
        if not isinstance(V, torch.Tensor) or tuple(V.shape) != shape:
            got = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ShapeError(f"V has shape {got}: must be {shape} (one row per batch)")
        if block is not None:
            check_choice("block", block, BATCH_HVP_BLOCKS)
        V = V.to(dtype=self.dtype, device=theta.device)
        explicit = method is not None or self.hvp_method is not None
        method = self._resolved_hvp_method(theta, method)
        if method == "rev_rev":
            way, by_rule = self._choice("batch_hvp_block", block)
            if way == "stacked":
                rows = self._try_stacked(theta, V, by_rule)
                if rows is not None:
                    return rows
        try:
            return self._batch_hvp_rows(theta, V, method)
        except _UNSUPPORTED as e:
            if explicit or method == "rev_rev":
                raise
            return self._batch_hvp_rows(theta, V, self._fall_back("hvp_method", method, "rev_rev", e))

    def _try_stacked(self, theta: torch.Tensor, V: torch.Tensor, by_rule: bool) -> torch.Tensor | None:
        """The stacked rows, or None after falling back to the loop (a rule's choice the model cannot run)."""
        try:
            with second_order_context():
                return self._stacked_rows(theta, V).detach()
        except (*_UNSUPPORTED, ValueError, TypeError) as e:
            self._graph_cache = None  # a partly built stacked graph
            if not by_rule:
                raise
            if isinstance(
                e, torch.OutOfMemoryError
            ):  # the loop holds one copy of the parameters, not one per batch
                e = RuntimeError(f"out of memory: {e}")
            self._fall_back("batch_hvp_block", "stacked", "loop", e)
            return None

    def _batch_hvp_rows(self, theta: torch.Tensor, V: torch.Tensor, method: str) -> torch.Tensor:
        with second_order_context():
            if method == "rev_rev":
                pairs = zip(self._graph(theta), V)
                rows = [
                    torch.autograd.grad(torch.dot(g, v), leaf, retain_graph=True)[0] for (leaf, g), v in pairs
                ]
            else:
                t0 = theta.detach()
                pairs = zip(self._batch_losses(theta), V)
                rows = [torch.func.jvp(torch.func.grad(f), (t0,), (v,))[1] for f, v in pairs]
        return torch.stack(rows).detach()

    def hvp_gradient(self, params=None) -> torch.Tensor:
        """The full-data gradient (flat) at ``params``, free when the HVP runs reverse-over-reverse.

        That HVP builds the gradient graph anyway (``create_graph=True``), and its value *is* the gradient: the
        curvature estimators use it as a start vector (it lies mostly in the top Hessian eigenspace, Gur-Ari et
        al. 2018, arXiv 1812.04754). With the forward-over-reverse HVP it costs one ordinary gradient.
        """
        theta = self._as_theta(self._theta0 if params is None else params)
        with second_order_context():
            if self._resolved_hvp_method(theta) != "rev_rev":
                return self.grad(theta)
            graphs = self._graph(theta)
        out = torch.zeros_like(theta)
        for _, g in graphs:
            out += g.detach()
        return out

    def clear_cache(self) -> None:
        """Drop the cached gradient graph (frees its memory)."""
        self._graph_cache = None

    # ------------------------------------------------------------------ many points
    def _metrics_sequential(self, stack: torch.Tensor, want_acc: bool) -> tuple[np.ndarray, np.ndarray]:
        K = stack.shape[0]
        losses, accs = np.empty(K), np.full(K, np.nan)
        want_acc = want_acc and self._has_accuracy
        model, bl = self._model, self.batch_loss
        self._bind_flat()
        buffers = dict(model.named_buffers())
        flat = self._flat
        n, W = self.num_samples, self._total_weight
        with torch.no_grad():
            try:
                for i in range(K):
                    theta = stack[i]
                    flat.copy_(theta)  # the private model's parameters are views of ``flat``
                    if self.bn == "recompute":
                        for k, b in self.buffers_at(theta).items():
                            buffers[k].copy_(b)
                    total, correct = 0.0, 0
                    for batch, w in zip(self._batches, self._weights):
                        ev = bl.evaluate(model, batch)
                        total += float(ev.loss) * w
                        if want_acc:
                            correct += int(bl.correct(ev.output, batch))
                    losses[i] = total / W
                    if want_acc:
                        accs[i] = correct / n
            finally:  # restore the private copy's centre point and buffers
                flat.copy_(self._theta0)
                for k, b in buffers.items():
                    b.copy_(self._buffers[k])
        return losses, accs

    def _metrics_batched(
        self, stack: torch.Tensor, want_acc: bool, chunk: int
    ) -> tuple[np.ndarray, np.ndarray]:
        K = stack.shape[0]
        losses, accs = np.empty(K), np.full(K, np.nan)
        want_acc = want_acc and self._has_accuracy
        bl = self.batch_loss

        def batched(batch: Any) -> Callable[[torch.Tensor], Any]:
            def point(theta):
                ev = self.evaluate_on(theta, batch)
                return (ev.loss, bl.correct(ev.output, batch)) if want_acc else ev.loss

            return torch.func.vmap(point)

        with torch.no_grad():
            for s in range(0, K, chunk):
                part = stack[s : s + chunk]
                tot = torch.zeros(part.shape[0], dtype=torch.float64, device=part.device)
                cor = torch.zeros(part.shape[0], dtype=torch.float64, device=part.device)
                for batch, w in zip(self._batches, self._weights):
                    got = batched(batch)(part)
                    lo = got[0] if want_acc else got
                    tot += lo.double() * w
                    if want_acc:
                        cor += got[1].double()
                losses[s : s + chunk] = (tot / self._total_weight).cpu().numpy()
                if want_acc:
                    accs[s : s + chunk] = (cor / self.num_samples).cpu().numpy()
        return losses, accs

    def _time_loss_many(self, stack: torch.Tensor, chunk: int) -> str:
        """Opt-in (``method="timed"``): time both paths on up to four points (``loss_many_timings``)."""
        if self.bn == "recompute":
            return "sequential"
        probe = stack[: min(4, len(stack))]
        timings = {}
        for name in LOSS_MANY_METHODS:
            try:
                t0 = time.perf_counter()
                if name == "sequential":
                    self._metrics_sequential(probe, True)
                else:
                    self._metrics_batched(probe, True, chunk)
                timings[name] = time.perf_counter() - t0
            except _UNSUPPORTED:  # an op without a vmap rule
                continue
        self.loss_many_timings = timings
        return min(timings, key=timings.get)

    def loss_many(
        self,
        params_stack: torch.Tensor,
        *,
        method: str | None = None,
        chunk: int | None = None,
        accuracy: bool = True,
    ) -> dict[str, np.ndarray]:
        """Full-data loss (and accuracy) at K points in one call.

        Args:
            params_stack: ``(K, n)`` flat parameter vectors.
            method: ``"sequential"`` (write each point into the private model copy and run it — fastest on CPU for
                small models), ``"batched"`` (``vmap`` over stacked points — the win on GPUs), ``"timed"`` (time
                both once, keep the faster in ``obj.loss_many_method``) or ``None``: ``obj.loss_many_method``, else
                the rule (:func:`rule_loss_many_method`; a batched path the model cannot run falls back to the
                sequential one, recorded in ``settings()["fallbacks"]``). ``bn="recompute"`` is always sequential.
            chunk: points per batched call (bounds memory); default chosen from the data size.
            accuracy: also compute accuracy (where defined).

        Returns:
            ``{"loss": (K,), "accuracy": (K,)}`` float64 arrays; accuracy is NaN where it is undefined (not a
            classification output) or not asked for; non-finite losses are kept as they are.
        """
        stack = self._as_theta(params_stack)
        if stack.dim() == 1:
            stack = stack[None]
        if stack.shape[0] == 0:
            return {"loss": np.empty(0), "accuracy": np.empty(0)}
        if chunk is None:
            # keep roughly <= 64M activations floats per call
            per_point = max(1, self.batch_size * 256)
            chunk = max(1, min(64, (64 * 2**20) // per_point))
        chunk = check_int("chunk", chunk, low=1)
        method, by_rule = self._choice("loss_many_method", method)
        if method == "timed":
            method = self.loss_many_method = self._time_loss_many(stack, chunk)
        if method == "batched" and self.bn == "recompute":
            method = "sequential"
        if method == "sequential":
            losses, accs = self._metrics_sequential(stack.detach(), accuracy)
        else:
            try:
                losses, accs = self._metrics_batched(stack.detach(), accuracy, chunk)
            except _UNSUPPORTED as e:
                if not by_rule:
                    raise
                self._fall_back("loss_many_method", "batched", "sequential", e)
                losses, accs = self._metrics_sequential(stack.detach(), accuracy)
        return {"loss": losses, "accuracy": accs}

    def __repr__(self) -> str:
        return (
            f"Objective(n_params={self.num_params}, n_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"bn={self.bn!r}, dtype={self.dtype})"
        )
