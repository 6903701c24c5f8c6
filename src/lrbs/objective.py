"""The core: a model, a loss and fixed data, evaluated functionally at any parameters.

Every analysis in lrbs (curvature, sharpness, landscapes, paths, noise scale) is a function of an
:class:`Objective`. The Objective holds a *private copy* of the model and a fixed, ordered set of batches, so that no
analysis can mutate the user's model, its buffers, its ``requires_grad`` flags or its train/eval mode.

Parameters are handled as one flat vector ``theta`` (the trainable parameters in ``named_parameters`` order);
``flatten`` / ``unflatten`` convert to and from a ``{name: tensor}`` dict, and every method accepts either form.

Full-data values are sample-weighted means over the fixed batches: ``L = sum_b n_b L_b / sum_b n_b``.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from .errors import ConfigError, LrbsError, LrbsTypeError, ShapeError, check_choice, check_int

__all__ = ["Objective", "as_tensors"]

BN_MODES = ("eval", "train", "recompute")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def as_tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn an lrbs ``Dataset`` (its train split), a ``Split``, an ``(x, y)`` pair or a DataLoader into two tensors."""
    if hasattr(data, "train") and hasattr(data, "test"):
        data = data.train
    if hasattr(data, "x") and hasattr(data, "y"):
        return data.x, data.y
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if isinstance(data, (torch.utils.data.DataLoader, Iterable)):
        xs, ys = [], []
        for batch in data:
            if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
                raise LrbsTypeError("data batches must be (x, y) pairs")
            xs.append(batch[0])
            ys.append(batch[1])
        if not xs:
            raise ConfigError("data is empty: the loader yielded no batches")
        return torch.cat(xs), torch.cat(ys)
    raise LrbsTypeError(
        f"data={type(data).__name__} is not allowed: give an lrbs Dataset or Split, an (x, y) pair of tensors, "
        "or a DataLoader"
    )


@dataclass(frozen=True)
class _Layout:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    numels: tuple[int, ...]

    @property
    def size(self) -> int:
        return sum(self.numels)


class Objective:
    """A loss on fixed data, evaluated functionally at any parameters.

    Args:
        model: any ``nn.Module``; it is copied, never modified.
        loss_fn: ``loss_fn(output, y) -> scalar`` with mean reduction; default cross-entropy.
        data: an lrbs ``Dataset`` (its train split), a ``Split``, an ``(x, y)`` pair or a DataLoader.
        batch_size: size of the fixed batches (``None``: one batch with all the data).
        bn: BatchNorm treatment, recorded in every result: ``"eval"`` (frozen running statistics), ``"train"``
            (statistics of each fixed batch, never written back), ``"recompute"`` (fresh running statistics at each
            point from a train-mode pass over the data, then eval mode — Garipov et al.'s ``update_bn``).
        dtype: compute dtype (e.g. ``torch.float64`` for references); default the model's.
        max_samples: evaluate on a fixed, seeded random subset of this many samples.
        seed: seed of that subset.

    Raises:
        LrbsTypeError / ConfigError / ShapeError: bad model, data, batch size or bn mode; data on another device.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        data: Any = None,
        *,
        batch_size: int | None = None,
        bn: str = "eval",
        dtype: torch.dtype | None = None,
        max_samples: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(model, nn.Module):
            raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
        if data is None:
            raise ConfigError("data=None is not allowed: an Objective needs fixed data")
        check_choice("bn", bn, BN_MODES)
        self.bn = bn
        self.loss_fn = loss_fn
        self.seed = seed
        x, y = as_tensors(data)
        if len(x) == 0:
            raise ConfigError("data is empty: an Objective needs at least one sample")
        params = [p for p in model.parameters()]
        device = params[0].device if params else torch.device("cpu")
        if x.device != device:
            raise ConfigError(f"data is on device {x.device} but the model is on {device}: move one of them")
        if max_samples is not None:
            max_samples = check_int("max_samples", max_samples, low=1)
            if max_samples < len(x):
                g = torch.Generator().manual_seed(seed)
                idx = torch.randperm(len(x), generator=g)[:max_samples].to(x.device)
                x, y = x[idx], y[idx]
        n = len(x)
        if batch_size is None:
            batch_size = n
        batch_size = check_int("batch_size", batch_size, low=1)
        self.batch_size = min(batch_size, n)

        # Private copy: the user's model is never touched.
        self._model = copy.deepcopy(model)
        if dtype is not None:
            self._model = self._model.to(dtype)
        self.dtype = next(iter(self._model.parameters())).dtype if params else (dtype or torch.float32)
        self.device = device
        if x.is_floating_point():
            x = x.to(self.dtype)
        self._x, self._y = x, y
        self.has_bn = any(isinstance(m, _BN_TYPES) for m in self._model.modules())
        self._model.train(bn == "train")
        if bn == "train":
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
        self._batches = [
            (self._x[i : i + self.batch_size], self._y[i : i + self.batch_size])
            for i in range(0, n, self.batch_size)
        ]
        self.num_samples = n
        self._graph_cache: tuple[torch.Tensor, list] | None = None
        self.hvp_method: str | None = None
        self.hvp_block: str | None = None
        self.hvp_block_chunk = 16
        self.loss_many_method: str | None = None
        self._check_output()

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

    # ------------------------------------------------------------------ settings
    @property
    def fingerprint(self) -> str:
        """Hash of the fixed data (sha256, 16 hex digits)."""
        import hashlib

        h = hashlib.sha256()
        h.update(self._x.detach().cpu().float().numpy().tobytes())
        h.update(self._y.detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def settings(self) -> dict[str, Any]:
        """The settings every result records."""
        return {
            "bn": self.bn,
            "has_bn": self.has_bn,
            "dtype": str(self.dtype).replace("torch.", ""),
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_params": self.num_params,
            "data_fingerprint": self.fingerprint,
            "loss": "cross_entropy" if self.loss_fn is None else getattr(self.loss_fn, "__name__", "custom"),
        }

    def subset(self, max_samples: int, seed: int = 0, batch_size: int | None = None) -> Objective:
        """The same objective on a fixed, seeded random subset of the data, at the same centre point."""
        other = copy.copy(self)
        n = min(check_int("max_samples", max_samples, low=1), self.num_samples)
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(self.num_samples, generator=g)[:n].to(self._x.device)
        other._x, other._y = self._x[idx], self._y[idx]
        other.num_samples = n
        other.batch_size = min(batch_size or self.batch_size, n)
        other._batches = [
            (other._x[i : i + other.batch_size], other._y[i : i + other.batch_size])
            for i in range(0, n, other.batch_size)
        ]
        other._graph_cache = None
        return other

    def at(self, params) -> Objective:
        """The same objective with a different centre point."""
        other = copy.copy(self)
        other._theta0 = self._as_theta(params).detach().clone()
        other._graph_cache = None
        return other

    @property
    def data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed data (x, y) as tensors."""
        return self._x, self._y

    @property
    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(self._batches)

    # ------------------------------------------------------------------ evaluation
    def _loss_value(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is None:
            return nn.functional.cross_entropy(out, y)
        return self.loss_fn(out, y)

    def _forward(self, theta: torch.Tensor, x: torch.Tensor, buffers: dict | None = None) -> torch.Tensor:
        state = {**self._frozen, **(self._buffers if buffers is None else buffers), **self.unflatten(theta)}
        return functional_call(self._model, state, (x,))

    def _check_output(self) -> None:
        x, y = self._batches[0]
        with torch.no_grad():
            out = self._forward(self._theta0, x[:2])
            val = self._loss_value(out, y[:2])
        if not isinstance(val, torch.Tensor) or val.dim() != 0:
            shape = tuple(val.shape) if isinstance(val, torch.Tensor) else type(val).__name__
            raise ShapeError(f"loss_fn must return a scalar (mean over the batch); it returned shape {shape}")

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
                for x, _ in self._batches:
                    self._forward(theta.detach(), x, buffers)
        finally:
            model.train(False)
            for m, mom in saved.items():
                m.momentum = mom
        return buffers

    def _buffers_at(self, theta: torch.Tensor) -> dict:
        return self._recomputed_buffers(theta) if self.bn == "recompute" else self._buffers

    def _full_loss(self, theta: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers_at(theta)
        total = 0.0
        for x, y in self._batches:
            total = total + self._loss_value(self._forward(theta, x, buffers), y) * len(y)
        return total / self.num_samples

    def loss(self, params=None) -> float:
        """Full-data loss at ``params`` (default: the centre point)."""
        theta = self._theta0 if params is None else self._as_theta(params)
        with torch.no_grad():
            return float(self._full_loss(theta))

    def metrics(self, params=None) -> dict[str, float]:
        """Full-data loss and accuracy at ``params`` (default: the centre point)."""
        theta = self._theta0 if params is None else self._as_theta(params)
        out = self.loss_many(theta[None])
        return {"loss": float(out["loss"][0]), "accuracy": float(out["accuracy"][0])}

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

    # ------------------------------------------------------------------ Hessian-vector products
    def _graph(self, theta: torch.Tensor):
        """Per-batch gradient graphs at ``theta`` built with ``create_graph=True`` (cached for repeated HVPs)."""
        cached = self._graph_cache
        if cached is not None and cached[0].shape == theta.shape and torch.equal(cached[0], theta):
            return cached[1]
        leaf = theta.detach().clone().requires_grad_(True)
        buffers = self._buffers_at(theta.detach())
        graphs = []
        with torch.enable_grad():
            for x, y in self._batches:
                loss = self._loss_value(self._forward(leaf, x, buffers), y) * (len(y) / self.num_samples)
                (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
                graphs.append((leaf, g))
        self._graph_cache = (theta.detach().clone(), graphs)
        return graphs

    def _hvp_revrev(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        graphs = self._graph(theta)
        out = torch.zeros_like(v)
        for leaf, g in graphs:
            (hv,) = torch.autograd.grad(g, leaf, grad_outputs=v, retain_graph=True)
            out += hv
        return out

    def _batch_losses(self, theta: torch.Tensor) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        """One function per fixed batch: ``t -> loss_b(t) * B_b / N`` (their sum is the full-data loss)."""
        buffers = self._buffers_at(theta.detach())

        def weighted(x: torch.Tensor, y: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
            w = len(y) / self.num_samples
            return lambda t: self._loss_value(self._forward(t, x, buffers), y) * w

        return [weighted(x, y) for x, y in self._batches]

    def _hvp_fwdrev(self, theta: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(v)
        for f in self._batch_losses(theta):
            _, hv = torch.func.jvp(torch.func.grad(f), (theta.detach(),), (v,))
            out += hv
        return out

    def _choose_hvp(self, theta: torch.Tensor) -> str:
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
            except (RuntimeError, NotImplementedError):  # e.g. forward-mode AD not covered by an op
                continue
        if not timings:
            raise LrbsError("neither Hessian-vector product implementation works for this model")
        self.hvp_timings = timings
        return min(timings, key=timings.get)

    def hvp(
        self, params, v: torch.Tensor, *, method: str | None = None, block: str | None = None
    ) -> torch.Tensor:
        """Hessian-vector product ``H(params) @ v`` of the full-data loss.

        Args:
            params: the point (dict or flat vector).
            v: a flat vector ``(n,)`` or a block ``(k, n)`` of vectors (each row multiplied).
            method: ``"rev_rev"`` (reverse-over-reverse on a cached gradient graph, PyHessian's way),
                ``"fwd_rev"`` (``torch.func.jvp`` of ``grad``) or ``None``: chosen once per Objective by timing both.
            block: how a block ``(k, n)`` is multiplied: ``"loop"`` (one HVP per row), ``"batched"`` (all rows in
                one pass, in chunks of ``hvp_block_chunk`` rows: ``is_grads_batched`` for ``rev_rev``, ``vmap``
                for ``fwd_rev`` -- the win on GPUs; on this project's CPUs it was 5-6x slower per row) or
                ``None``: chosen once per Objective on the first block of >= 2 rows, by timing both on two of
                its rows, among the ways that agree with the loop (``hvp_block_timings`` records it).

        Returns:
            ``H v`` with the shape of ``v``.
        """
        theta = self._as_theta(params)
        if not isinstance(v, torch.Tensor) or v.shape[-1:] != (self.num_params,) or v.dim() > 2:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ShapeError(f"v has shape {shape}: must be ({self.num_params},) or (k, {self.num_params})")
        v = v.to(dtype=self.dtype, device=theta.device)
        method = self._resolved_hvp_method(theta) if method is None else method
        check_choice("method", method, ("rev_rev", "fwd_rev"))
        if block is not None:
            check_choice("block", block, ("loop", "batched"))
        if v.dim() == 1:
            return self._hvp_fn(method)(theta, v).detach()
        if v.shape[0] < 2:
            return self._hvp_loop(theta, v, method)
        if block is None and self.hvp_block is None:
            self.hvp_block, head = self._choose_hvp_block(theta, v[:2], method)
            return torch.cat([head, self._hvp_block(theta, v[2:], method, self.hvp_block)])
        return self._hvp_block(theta, v, method, block or self.hvp_block)

    def _resolved_hvp_method(self, theta: torch.Tensor) -> str:
        if self.hvp_method is None:
            self.hvp_method = self._choose_hvp(theta)
        return self.hvp_method

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

    def _choose_hvp_block(
        self, theta: torch.Tensor, V: torch.Tensor, method: str
    ) -> tuple[str, torch.Tensor]:
        """Time the loop and the batched block HVP on two rows; returns the choice and ``H V`` (from the loop)."""
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
        except (RuntimeError, NotImplementedError):  # an op without a vmap / batched-gradient rule
            timings["batched"] = math.inf
        self.hvp_block_timings = timings
        return min(timings, key=timings.get), ref

    def hvp_gradient(self, params=None) -> torch.Tensor:
        """The full-data gradient (flat) at ``params``, free when the HVP runs reverse-over-reverse.

        That HVP builds the gradient graph anyway (``create_graph=True``), and its value *is* the gradient: the
        curvature estimators use it as a start vector (it lies mostly in the top Hessian eigenspace, Gur-Ari et
        al. 2018, arXiv 1812.04754). With the forward-over-reverse HVP it costs one ordinary gradient.
        """
        theta = self._as_theta(self._theta0 if params is None else params)
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
        model = self._model
        self._bind_flat()
        buffers = dict(model.named_buffers())
        flat = self._flat
        n = self.num_samples
        with torch.no_grad():
            for i in range(K):
                theta = stack[i]
                flat.copy_(theta)  # the private model's parameters are views of ``flat``
                if self.bn == "recompute":
                    for k, b in self._recomputed_buffers(theta).items():
                        buffers[k].copy_(b)
                total, correct = 0.0, 0
                for x, y in self._batches:
                    out = model(x)
                    total += float(self._loss_value(out, y)) * len(y)
                    if want_acc:
                        correct += int((out.argmax(-1) == y).sum())
                losses[i] = total / n
                if want_acc:
                    accs[i] = correct / n
            # restore the private copy's centre point and buffers
            flat.copy_(self._theta0)
            for k, b in buffers.items():
                b.copy_(self._buffers[k])
        return losses, accs

    def _metrics_batched(
        self, stack: torch.Tensor, want_acc: bool, chunk: int
    ) -> tuple[np.ndarray, np.ndarray]:
        K = stack.shape[0]
        losses, accs = np.empty(K), np.empty(K)

        def point(theta, x, y):
            out = self._forward(theta, x)
            if self.loss_fn is None:
                lo = nn.functional.cross_entropy(out, y)
            else:
                lo = self.loss_fn(out, y)
            return lo, (out.argmax(-1) == y).sum()

        batched = torch.func.vmap(point, in_dims=(0, None, None))
        with torch.no_grad():
            for s in range(0, K, chunk):
                part = stack[s : s + chunk]
                tot = torch.zeros(part.shape[0], dtype=torch.float64, device=part.device)
                cor = torch.zeros(part.shape[0], dtype=torch.float64, device=part.device)
                for x, y in self._batches:
                    lo, c = batched(part, x, y)
                    tot += lo.double() * len(y)
                    cor += c.double()
                losses[s : s + chunk] = (tot / self.num_samples).cpu().numpy()
                accs[s : s + chunk] = (cor / self.num_samples).cpu().numpy()
        return losses, accs

    def _choose_loss_many(self, stack: torch.Tensor, chunk: int) -> str:
        if self.bn == "recompute":
            return "sequential"
        probe = stack[: min(4, len(stack))]
        timings = {}
        for name in ("sequential", "batched"):
            try:
                t0 = time.perf_counter()
                if name == "sequential":
                    self._metrics_sequential(probe, True)
                else:
                    self._metrics_batched(probe, True, chunk)
                timings[name] = time.perf_counter() - t0
            except (RuntimeError, NotImplementedError):  # an op without a vmap rule
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
            method: ``"sequential"`` (write each point into the private model copy and run it — usually fastest on
                CPU for small models), ``"batched"`` (``vmap`` over stacked points — the win on GPUs), or ``None``:
                chosen once per Objective by timing both on the first call.
            chunk: points per batched call (bounds memory); default chosen from the data size.
            accuracy: also compute accuracy (classification).

        Returns:
            ``{"loss": (K,), "accuracy": (K,)}`` float64 arrays; non-finite values are kept as they are.
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
        if method is None:
            if self.loss_many_method is None:
                self.loss_many_method = self._choose_loss_many(stack, chunk)
            method = self.loss_many_method
        check_choice("method", method, ("sequential", "batched"))
        if method == "batched" and self.bn == "recompute":
            method = "sequential"
        if method == "sequential":
            losses, accs = self._metrics_sequential(stack.detach(), accuracy)
        else:
            losses, accs = self._metrics_batched(stack.detach(), accuracy, chunk)
        return {"loss": losses, "accuracy": accs}

    def __repr__(self) -> str:
        return (
            f"Objective(n_params={self.num_params}, n_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"bn={self.bn!r}, dtype={self.dtype})"
        )
