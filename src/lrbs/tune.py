"""``tune``: the learning rate, batch size and warmup for your model and data, with the evidence.

One call puts the toolkit's measurements together and chooses (every step reported with its numbers):

1. **throughput**: samples/s of a training step at a ladder of batch sizes (powers of two from 32). On CPU the ladder
   stops where a doubling no longer buys :data:`GAIN` more samples/s; on a GPU it runs to the largest batch
   that fits with a :data:`MEMORY_MARGIN` safety margin (a CUDA out-of-memory error ends it);
2. **noise scale**: after a short warm start (a range test at the smallest batch gives its LR), the simple
   noise scale ``B_simple = tr(Σ)/|G|²`` with its bootstrap interval (:func:`lrbs.noise_scale.noise_scale`),
   taken as the critical batch ``B_crit`` (McCandlish et al. 2018), and from it the steps / examples trade-off
   ``S = S_min (1 + B_crit / B)``, ``E = E_min (1 + B / B_crit)``;
3. **batch size**: the largest batch of the ladder that is still gaining throughput *and* costs at most
   :data:`EXAMPLES_OVERHEAD` more examples than the minimum (``B <= 0.25 B_crit``: at a fixed budget of
   examples, ``E / E_min = 1 + B / B_crit`` is the price of a larger batch); the one that bound it is named;
4. **learning rate**: a range test at that batch (:data:`RANGE_REPEATS` sweeps over different data orders,
   the median and spread of the four suggestions) and its recommendation
   (:meth:`lrbs.range_test.RangeTestResult.recommended`);
5. **schedule**: SGD gets one-cycle (Smith & Topin 2019) peaking at that LR, with the inverse momentum cycle;
   Adam / AdamW get a linear warmup of ``min(2 / (1 - β2), T / 10)`` steps (Ma & Yarats 2021) and a cosine
   decay. When the range test ran at a smaller batch than the chosen one (its cost would exceed the budget),
   the LR is scaled from it by the linear (SGD) or square-root (Adam) rule with a gradual warmup (Goyal et al.
   2017) and the rule is recorded.

The user's model, optimizer and random state are never touched: every step trains a private copy inside a
forked RNG. With a :class:`~lrbs.store.Store`, each finished step is stored and a rerun resumes after it.
Anything that cannot be measured (a model that diverges at every LR, a dataset smaller than the smallest batch,
a budget too small for the noise scale) becomes a reason in :attr:`Recommendation.reasons` and a recommendation
marked ``confidence="low"``, never a crash or a silent guess.

References:
    McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training", 2018 (arXiv 1812.06162).
    Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017 (arXiv 1506.01186).
    Smith & Topin, "Super-Convergence", 2019 (arXiv 1708.07120).
    Goyal et al., "Accurate, Large Minibatch SGD", 2017 (arXiv 1706.02677).
    Ma & Yarats, "On the Adequacy of Untuned Warmup for Adaptive Optimization", AAAI 2021 (arXiv 1910.04209).
    Masters & Luschi, "Revisiting Small Batch Training for Deep Neural Networks", 2018 (arXiv 1804.07612).
"""

from __future__ import annotations

import copy
import hashlib
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._util import fmt, jsonable, progress
from .batches import BatchLoss, BatchStream, LoaderSource, as_source, batch_size_of, model_device
from .errors import ConfigError, LrbsError, LrbsTypeError, check_int, check_number, unknown_name
from .schedules import Schedule, cosine, one_cycle, one_cycle_momentum, warmup
from .step import autocast, check_precision, make_grad_scaler

__all__ = [
    "tune",
    "Recommendation",
    "TUNE_OPTIMIZERS",
    "GAIN",
    "EXAMPLES_OVERHEAD",
    "MEMORY_MARGIN",
    "RANGE_REPEATS",
]

#: Optimizer names :func:`tune` accepts (or a callable ``params -> optimizer``).
TUNE_OPTIMIZERS = ("sgd", "adam", "adamw")
#: A doubling of the batch "still gains throughput" when samples/s grow by at least this factor.
GAIN = 1.10
#: The batch may cost at most this fraction more examples than the minimum: ``B <= EXAMPLES_OVERHEAD * B_crit``.
EXAMPLES_OVERHEAD = 0.25
#: On a GPU a batch "fits" when its peak memory is at most ``(1 - MEMORY_MARGIN)`` of the device's memory.
MEMORY_MARGIN = 0.10
#: Sweeps of the range test at the chosen batch.
RANGE_REPEATS = 3

_LADDER_START = (
    32  # first rung of the default ladder (Masters & Luschi 2018: small batches of 2-32 train best)
)
_RANGE = {"start_lr": 1e-6, "end_lr": 10.0, "num_iter": 100}
_RANGE_BUDGET = 0.5  # the range test at the chosen batch may cost at most this fraction of the budget
_WARM_FRACTION, _WARM_MAX_STEPS, _WARM_MIN_STEPS = 0.05, 200, 10
_NS_ESTIMATES, _NS_RATIO = 20, 32  # noise scale: big batches drawn, B_big / B_small
_NS_BUDGET = 0.5  # warm start + noise scale may cost at most this fraction of the budget
_MIN_STEPS = 50  # below this many optimizer steps in the budget, a larger batch is not considered
_WINDOW_SAMPLES, _WINDOW_SECONDS, _WINDOWS = 256, 0.02, 3  # throughput timing: best of 3 windows
_DEFAULT_WARM_LR = {"sgd": 0.01, "adam": 1e-3, "other": 1e-3}


# --------------------------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Recommendation:
    """What :func:`tune` recommends, and why.

    Attributes:
        lr: the peak learning rate.
        batch_size: the (effective) batch size ``B``; ``B = micro_batch_size * accumulation_steps``.
        warmup_steps: steps until the peak LR is reached.
        schedule: the LR schedule over the budget (an lrbs :class:`~lrbs.schedules.Schedule`).
        accumulation_steps: micro-batches accumulated per step (> 1 when ``B`` does not fit in memory).
        total_steps: optimizer steps in the budget, ``floor(budget_samples / B)``.
        optimizer: the optimizer name or callable it was tuned for.
        momentum: the momentum (SGD) / beta1 (Adam) to train with: a number, a schedule, or None (a callable
            optimizer keeps its own).
        confidence: ``"high"``, or ``"low"`` when a step could not be measured (see ``reasons``).
        reasons: why the confidence is low (empty when high).
        evidence: every measurement, JSON-able (``throughput``, ``warm_start``, ``noise_scale``,
            ``batch``, ``range_test``, ``lr``, ``schedule``, ``cost``, ``settings``).
    """

    lr: float
    batch_size: int
    warmup_steps: int
    schedule: Schedule
    accumulation_steps: int
    total_steps: int
    optimizer: Any
    momentum: Any
    confidence: str
    reasons: tuple[str, ...]
    evidence: dict[str, Any]
    train_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def micro_batch_size(self) -> int:
        """The batch that goes through the model at once, ``batch_size // accumulation_steps``."""
        return self.batch_size // self.accumulation_steps

    def fit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`lrbs.fit`: ``fit(model, data, **rec.fit_kwargs())`` trains with it.

        ``optimizer``, ``lr`` (the schedule), ``batch_size``, ``steps`` (the budget), ``momentum``,
        ``max_micro_batch`` (with accumulation), and the ``loss_fn`` / ``compute_loss`` / ``precision`` /
        ``test_data`` that :func:`tune` was given (only those that were given).
        """
        kw: dict[str, Any] = {
            "optimizer": self.optimizer,
            "lr": self.schedule,
            "batch_size": self.batch_size,
            "steps": self.total_steps,
            "momentum": self.momentum,
        }
        if self.accumulation_steps > 1:
            kw["max_micro_batch"] = self.micro_batch_size
        kw.update(self.train_options)
        return kw

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the choices, the confidence and the evidence."""
        return jsonable(
            {
                "lr": self.lr,
                "batch_size": self.batch_size,
                "warmup_steps": self.warmup_steps,
                "schedule": repr(self.schedule),
                "accumulation_steps": self.accumulation_steps,
                "total_steps": self.total_steps,
                "optimizer": self.optimizer if isinstance(self.optimizer, str) else repr(self.optimizer),
                "momentum": self.momentum if not isinstance(self.momentum, Schedule) else repr(self.momentum),
                "confidence": self.confidence,
                "reasons": list(self.reasons),
                "evidence": self.evidence,
            }
        )

    def table(self) -> Any:
        """A ``rich.table.Table``: each choice, its value and where it came from."""
        from rich.table import Table

        t = Table(title=f"lrbs tune: recommendation (confidence: {self.confidence})")
        t.add_column("choice")
        t.add_column("value", justify="right")
        t.add_column("why")
        for name, value, why in _summary_rows(self):
            t.add_row(name, value, why)
        for r in self.reasons:
            t.add_row("[red]low confidence[/]", "", r)
        return t

    def report(self, path: str | Path) -> Path:
        """Write the one-page HTML report (range test, noise scale, throughput ladder, trade-off curve).

        Returns:
            The path written.
        """
        from .report.figures import plot_range_test, plot_throughput, plot_tradeoff
        from .report.html import Figure, Table, write_tune_html

        ev = self.evidence
        figures = []
        rt = ev["range_test"].get("result")
        if rt is not None:
            res = range_result_from_dict(rt)
            figures.append(
                Figure("LR range test", plot_range_test(res, title=_rt_title(self)), _rt_caption(ev))
            )
        ns = ev["noise_scale"].get("result")
        if ns is not None:
            ax = noise_from_dict(ns).plot()
            ax.set_title(f"Gradient noise scale: B_simple = {fmt(ns.get('b_simple'))}")
            figures.append(Figure("Noise scale", ax.figure, ev["noise_scale"]["note"]))
        rows = ev["throughput"]["ladder"]
        if rows:
            fig = plot_throughput(rows, chosen=self.batch_size, knee=ev["throughput"].get("knee"))
            figures.append(Figure("Throughput ladder", fig, ev["throughput"]["note"]))
        b_crit = ev["noise_scale"].get("b_crit")
        if b_crit is not None and math.isfinite(b_crit):
            sizes = [r["batch_size"] for r in rows] or [self.batch_size]
            ci = ev["noise_scale"].get("ci")
            figures.append(
                Figure("Steps / examples trade-off", plot_tradeoff(b_crit, sizes, self.batch_size, ci=ci))
            )
        head = Table("Recommendation", ["choice", "value", "why"], [list(r) for r in _summary_rows(self)])
        return write_tune_html(
            path,
            title="lrbs tune: learning rate, batch size and warmup",
            headline=head,
            confidence=self.confidence,
            reasons=list(self.reasons),
            figures=figures,
            tables=_evidence_tables(ev),
            settings=ev["settings"],
            data=self.to_dict(),
        )


def _summary_rows(rec: Recommendation) -> list[tuple[str, str, str]]:
    ev = rec.evidence
    batch = f"{rec.batch_size}"
    if rec.accumulation_steps > 1:
        batch += f" ({rec.accumulation_steps} x {rec.micro_batch_size})"
    return [
        ("learning rate", fmt(rec.lr), ev["lr"]["reason"]),
        ("batch size", batch, ev["batch"]["reason"]),
        ("warmup steps", str(rec.warmup_steps), ev["schedule"]["warmup_reason"]),
        ("schedule", ev["schedule"]["family"], ev["schedule"]["reason"]),
        (
            "steps",
            str(rec.total_steps),
            f"the budget of {ev['settings']['budget_samples']} samples / {rec.batch_size}",
        ),
        (
            "tune cost",
            f"{ev['cost']['samples']} samples",
            f"{fmt(ev['cost']['seconds'])} s; per step: {ev['cost']['per_step']}",
        ),
    ]


def _rt_title(rec: Recommendation) -> str:
    b = rec.evidence["range_test"].get("batch_size")
    return f"LR range test at batch {b}: recommended {fmt(rec.evidence['range_test'].get('recommended'))}"


def _rt_caption(ev: dict) -> str:
    return str(ev["range_test"].get("reason", ""))


def _evidence_tables(ev: dict) -> list[Any]:
    from .report.html import Table

    ladder = ev["throughput"]["ladder"]
    cols = ["batch_size", "samples_per_s", "gain", "peak_memory_mb", "fits"]
    tables = (
        [Table.from_records("Throughput ladder", ladder, cols, note=ev["throughput"]["note"])]
        if ladder
        else []
    )
    trade = ev["noise_scale"].get("tradeoff") or []
    if trade:
        tables.append(
            Table.from_records(
                "Predicted steps / examples (relative to the minimum)",
                trade,
                ["batch_size", "steps_over_min", "examples_over_min"],
                note="S/S_min = 1 + B_crit/B and E/E_min = 1 + B/B_crit (McCandlish et al. 2018)",
            )
        )
    costs = [{"step": k, "samples": v} for k, v in ev["cost"]["per_step"].items()]
    tables.append(Table.from_records("Cost of tune (samples through forward + backward)", costs))
    return tables


# --------------------------------------------------------------------------------------------- (de)serialization
def _arr(values: Any) -> np.ndarray:
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def range_result_from_dict(d: dict[str, Any]) -> Any:
    """Rebuild a :class:`~lrbs.range_test.RangeTestResult` from its ``to_dict()`` (for stored evidence).

    The curves are float64 lists, so the suggestions of the rebuilt result equal the original's exactly. The
    result's top-level curves are those of its first sweep (as :func:`~lrbs.range_test.lr_range_test` builds it).
    """
    from .range_test import RangeTestResult, RangeTestSweep

    def sweep(s: dict, seed: int) -> RangeTestSweep:
        curves = {k: _arr(s[k]) for k in ("lrs", "losses", "smoothed")}
        flags = {"stopped_early": bool(s["stopped_early"]), "diverged_at": s["diverged_at"]}
        return RangeTestSweep(**curves, **flags, stop_reason=s["stop_reason"], seed=int(s.get("seed", seed)))

    seed = int(d["settings"].get("seed", 0))
    sweeps = (sweep(d, seed), *(sweep(s, seed + i + 1) for i, s in enumerate(d.get("sweeps", []))))
    first = {f.name: getattr(sweeps[0], f.name) for f in fields(RangeTestSweep) if f.name != "seed"}
    return RangeTestResult(
        **first, settings=dict(d["settings"]), sweeps=sweeps, wall_time=float(d.get("wall_time", 0.0))
    )


_NOISE_INTS = ("num_estimates", "small_batch", "big_batch", "num_bootstrap", "seed")
_NOISE_ARRAYS = ("grad_sq_estimates", "trace_sigma_estimates", "small_sq_estimates", "big_sq_estimates")


def noise_from_dict(d: dict[str, Any]) -> Any:
    """Rebuild a :class:`~lrbs.noise_scale.NoiseScale` from its ``to_dict()`` (None -> inf for the ratios)."""
    from .noise_scale import NoiseScale

    ratios = {k: math.inf if d.get(k) is None else float(d[k]) for k in ("b_simple", "ci_low", "ci_high")}
    return NoiseScale(
        **ratios,
        **{k: float(d[k]) for k in ("grad_sq", "trace_sigma", "confidence")},
        **{k: int(d[k]) for k in _NOISE_INTS},
        **{k: _arr(d[k]) for k in _NOISE_ARRAYS},
        finite_population=bool(d["finite_population"]),
        method=str(d["method"]),
        settings=dict(d.get("settings", {})),
    )


# --------------------------------------------------------------------------------------------- context
@dataclass
class _Ctx:
    """What the steps share: the inputs, the progress bar, the store, the running cost and the reasons."""

    model: nn.Module
    data: Any
    source: Any
    n: int | None
    optimizer: Any
    family: str
    beta2: float | None
    loss_fn: Any
    compute_loss: Any
    precision: str
    val_data: Any
    budget: int
    seed: int
    device: torch.device
    store: Any = None
    key: str = ""
    progress: bool = False
    reasons: list[str] = field(default_factory=list)
    cost: dict[str, int] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)

    def extra(self) -> dict[str, Any]:
        """compute_loss / precision for fit, lr_range_test and noise_scale, only when they differ from the default
        (so the call also works with the tensor-only signatures)."""
        kw: dict[str, Any] = {}
        if self.compute_loss is not None:
            kw["compute_loss"] = self.compute_loss
        if self.precision != "32":
            kw["precision"] = self.precision
        return kw

    def bar(self, step: str, total: int) -> Any:
        """The progress bar of one step (kept on screen when it ends; nothing when ``progress=False``)."""
        return progress(f"tune {step}", total, enabled=self.progress, fields={"note": ""}, transient=False)

    def copy_model(self) -> nn.Module:
        m = copy.deepcopy(self.model)
        m.train()
        return m

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        if isinstance(self.optimizer, str):
            from .optim import get_optimizer

            return get_optimizer(self.optimizer, model.parameters(), lr=lr, momentum=0.9)
        opt = self.optimizer(model.parameters())
        if not isinstance(opt, torch.optim.Optimizer):
            raise LrbsTypeError(
                f"optimizer={self.optimizer!r} returned {type(opt).__name__}: a callable optimizer must return a "
                "torch.optim.Optimizer built on the params it is given"
            )
        for g in opt.param_groups:
            g["lr"] = lr
        return opt


def _cached(ctx: _Ctx, step: str, extra: dict[str, Any], compute: Callable[[], dict]) -> dict:
    """Run ``compute()`` (JSON-able evidence of one step), or reload it from the store when it finished before."""
    if ctx.store is None:
        return compute()
    cfg = {"tune": ctx.key, "step": step, **jsonable(extra)}
    rec = ctx.store.find(cfg, kind="tune")
    if rec is not None and rec.result is not None:
        ctx.resumed.append(step)
        return dict(rec.result)
    with ctx.store.run(cfg, "tune") as run:  # an exception marks the step's run failed and is re-raised
        out = jsonable(compute())
        run.finish("completed", result=out)
    return out


def _fingerprint(ctx: _Ctx, settings: dict[str, Any]) -> str:
    """sha256 of the model (class, parameters, buffers), the data and the settings: the identity of a tune."""
    h = hashlib.sha256()
    h.update(type(ctx.model).__qualname__.encode())
    for name, t in [*ctx.model.named_parameters(), *ctx.model.named_buffers()]:
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().float().cpu().numpy()).tobytes())
    fp = getattr(ctx.data, "fingerprint", None)
    if isinstance(fp, str):
        h.update(fp.encode())
    elif hasattr(ctx.source, "tensors"):
        for t in ctx.source.tensors:
            flat = t.detach().reshape(-1)
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            h.update(np.ascontiguousarray(flat[:65536].float().cpu().numpy()).tobytes())
    h.update(repr(sorted(jsonable(settings).items())).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- validation
def _check_optimizer(optimizer: Any) -> Any:
    if isinstance(optimizer, str):
        key = optimizer.lower()
        if key not in TUNE_OPTIMIZERS:
            raise unknown_name("optimizer", optimizer, TUNE_OPTIMIZERS)
        return key
    if isinstance(optimizer, torch.optim.Optimizer) or not callable(optimizer):
        raise LrbsTypeError(
            f"optimizer={optimizer!r} is not allowed: give a name ({', '.join(TUNE_OPTIMIZERS)}) or a callable "
            "params -> optimizer (tune builds its own optimizers on private copies of the model)"
        )
    return optimizer


def _budget(budget_epochs: Any, budget_samples: Any, n: int | None) -> int:
    if (budget_epochs is None) == (budget_samples is None):
        raise ConfigError(
            f"give exactly one of budget_epochs= and budget_samples= (got budget_epochs={budget_epochs!r}, "
            f"budget_samples={budget_samples!r})"
        )
    if budget_samples is not None:
        return check_int("budget_samples", budget_samples, low=1)
    epochs = check_number("budget_epochs", budget_epochs, low=0.0)
    if n is None:
        raise ConfigError(
            "budget_epochs is not allowed with data of unknown size (an unsized loader): give budget_samples="
        )
    return max(1, int(math.ceil(epochs * n)))


def _ladder(batch_sizes: Any, max_batch_size: Any, n: int | None, loader_batch: int | None) -> list[int]:
    """The batch sizes to measure (validated; bounded by ``max_batch_size``; sizes above the data dropped later)."""
    if max_batch_size is not None:
        high = n if n is not None else None
        max_batch_size = check_int("max_batch_size", max_batch_size, low=1, high=high)
    if batch_sizes is not None:
        if isinstance(batch_sizes, (str, bytes)) or not hasattr(batch_sizes, "__iter__"):
            raise LrbsTypeError(f"batch_sizes={batch_sizes!r} is not allowed: must be a list of integers")
        sizes = [check_int(f"batch_sizes[{i}]", b, low=1) for i, b in enumerate(batch_sizes)]
        if not sizes:
            raise ConfigError("batch_sizes=[] is not allowed: give at least one batch size")
        for a, b in zip(sizes, sizes[1:]):
            if b <= a:
                raise ConfigError(
                    f"batch_sizes={sizes} is not allowed: must be strictly increasing ({b} follows {a})"
                )
    elif loader_batch is not None:
        sizes = [loader_batch]
    else:
        top = max_batch_size or n or 4096
        sizes, b = [], _LADDER_START
        while b <= top:
            sizes.append(b)
            b *= 2
        sizes = sizes or [_LADDER_START]  # cut to the data / max_batch_size below, with the reason
    if max_batch_size is not None:
        kept = [b for b in sizes if b <= max_batch_size]
        sizes = kept or [max_batch_size]
    return sizes


def _num_samples(source: Any, data: Any) -> int | None:
    """The number of training samples: the source's, or a DataLoader's sized dataset's (None when unknown)."""
    if source.num_samples is not None:
        return int(source.num_samples)
    dataset = getattr(data, "dataset", None)
    if isinstance(data, torch.utils.data.DataLoader) and not isinstance(
        dataset, torch.utils.data.IterableDataset
    ):
        try:
            return len(dataset)
        except TypeError:
            return None
    return None


def _loader_batch(source: Any) -> int | None:
    if not isinstance(source, LoaderSource):
        return None
    for batch in source:
        return batch_size_of(batch)
    raise ConfigError("data is empty: the loader yielded no batches")


# --------------------------------------------------------------------------------------------- step 1: throughput
def _train_step(model, opt, bl, batch, precision, device, scaler) -> None:
    opt.zero_grad(set_to_none=True)
    with autocast(precision, device):
        loss = bl.loss(model, batch)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()


@dataclass
class _Rig:
    """What the throughput steps train with: a private copy, its optimizer, the loss, the stream, the scaler."""

    model: nn.Module
    opt: torch.optim.Optimizer
    bl: BatchLoss
    stream: BatchStream
    scaler: Any

    def step(self, ctx: _Ctx, b: int) -> None:
        batch = self.stream.next() if isinstance(ctx.source, LoaderSource) else self.stream.next(b)
        _train_step(self.model, self.opt, self.bl, batch, ctx.precision, ctx.device, self.scaler)

    def release(self) -> None:
        """After a CUDA out-of-memory error: drop the gradients and the cached blocks."""
        self.opt.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()


def _time_batch(ctx: _Ctx, rig: _Rig, b: int) -> tuple[float, int]:
    """Best samples/s over a few timing windows of training steps at batch ``b``; returns (rate, samples used)."""
    cuda = ctx.device.type == "cuda"
    rig.step(ctx, b)
    used, best = b, 0.0
    k = max(2, math.ceil(_WINDOW_SAMPLES / b))
    for _ in range(_WINDOWS):
        if cuda:
            torch.cuda.synchronize(ctx.device)
        t0, steps = time.perf_counter(), 0
        while steps < k or time.perf_counter() - t0 < _WINDOW_SECONDS:
            rig.step(ctx, b)
            steps += 1
        if cuda:
            torch.cuda.synchronize(ctx.device)
        dt = time.perf_counter() - t0
        used += steps * b
        best = max(best, steps * b / dt)
    return best, used


def _throughput(ctx: _Ctx, sizes: list[int]) -> dict:
    """Measure the ladder; stop on CPU at the plateau, on GPU at the first size that does not fit."""
    model = ctx.copy_model()
    opt = ctx.make_optimizer(model, 1e-8)  # a tiny LR: the timing must not depend on where training goes
    stream = BatchStream(ctx.source, sizes[0], ctx.device, seed=ctx.seed)
    rig = _Rig(
        model,
        opt,
        BatchLoss(ctx.loss_fn, ctx.compute_loss),
        stream,
        make_grad_scaler(ctx.precision, ctx.device),
    )
    try:
        with ctx.bar("throughput", len(sizes)) as bar:
            out = _measure_ladder(ctx, rig, sizes, bar)
            bar.complete(note=out["stop"])
    finally:
        stream.close()
    out["device"] = str(ctx.device)
    if "micro" in out:  # the evidence's key order as stored before: ladder, stop, samples, device, micro
        out["micro"] = out.pop("micro")
    return out


def _measure_ladder(ctx: _Ctx, rig: _Rig, sizes: list[int], bar: Any) -> dict:
    """Time each rung until the ladder stops (:func:`_ladder_stop`, or out of memory); rows and samples used."""
    cuda = ctx.device.type == "cuda"
    total_mem = torch.cuda.get_device_properties(ctx.device).total_memory if cuda else None
    rows: list[dict] = []
    used = 0
    for b in sizes:
        if cuda:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        try:
            rate, u = _time_batch(ctx, rig, b)
        except torch.OutOfMemoryError:
            rig.release()
            rows.append(
                {"batch_size": b, "samples_per_s": None, "gain": None, "peak_memory_mb": None, "fits": False}
            )
            stop = f"CUDA out of memory at batch {b}"
            if used:
                return {"ladder": rows, "stop": stop, "samples": used}
            micro, used = _fitting_micro(
                ctx, rig, b
            )  # not even the first rung fits: the micro-batch to accumulate
            return {"ladder": rows, "stop": stop, "samples": used, "micro": micro}
        used += u
        peak = torch.cuda.max_memory_allocated(ctx.device) if cuda else None
        prev = max((r["samples_per_s"] for r in rows if r["samples_per_s"]), default=None)
        row = {
            "batch_size": b,
            "samples_per_s": rate,
            "gain": None if prev is None else rate / prev,
            "peak_memory_mb": None if peak is None else peak / 2**20,
            "fits": bool(peak is None or peak <= (1 - MEMORY_MARGIN) * total_mem),
        }
        rows.append(row)
        bar.advance(note=f"B={b}: {rate:.0f} samples/s")
        stop = _ladder_stop(row, cuda)
        if stop:
            return {"ladder": rows, "stop": stop, "samples": used}
    return {"ladder": rows, "stop": "the end of the ladder", "samples": used}


def _ladder_stop(row: dict, cuda: bool) -> str | None:
    """Why the ladder ends after this rung (it does not fit; on CPU, a doubling gained < GAIN), or None."""
    b, gain = row["batch_size"], row["gain"]
    if not row["fits"]:
        return f"batch {b} needs more than {1 - MEMORY_MARGIN:.0%} of the GPU memory"
    if not cuda and gain is not None and gain < GAIN:
        return f"samples/s changed by {gain - 1:+.0%} at batch {b} (a doubling must gain >= {GAIN - 1:.0%})"
    return None


def _fitting_micro(ctx: _Ctx, rig: _Rig, b: int) -> tuple[int | None, int]:
    """Halve ``b`` until a training step fits in memory; (that micro-batch or None, samples used)."""
    micro = b // 2
    while micro >= 1:
        try:
            _, used = _time_batch(ctx, rig, micro)
            return micro, used
        except torch.OutOfMemoryError:
            rig.release()
            micro //= 2
    return None, 0


def _knee(rows: list[dict]) -> int | None:
    """The largest measured batch that fits and still gained throughput (>= GAIN x the best before it)."""
    knee = None
    for r in rows:
        if not r["fits"] or r["samples_per_s"] is None:
            break
        if r["gain"] is None or r["gain"] >= GAIN:
            knee = r["batch_size"]
    return knee


# --------------------------------------------------------------------------------------------- range tests
def _range_test(ctx: _Ctx, batch: int, accum: int, repeats: int, name: str) -> dict:
    """A range test on a private copy at ``batch`` (micro-batches of ``batch // accum``); evidence + cost."""
    from .range_test import lr_range_test

    micro = batch // accum

    def compute() -> dict:
        model = ctx.copy_model()
        opt = ctx.make_optimizer(model, _RANGE["start_lr"])
        kw = dict(ctx.extra())
        if not isinstance(ctx.source, LoaderSource):
            kw["batch_size"] = micro
        if ctx.val_data is not None:
            kw["val_data"] = ctx.val_data
        res = lr_range_test(
            model,
            opt,
            ctx.loss_fn,
            ctx.data,
            accumulation_steps=accum,
            repeats=repeats,
            seed=ctx.seed,
            **_RANGE,
            **kw,
        )
        points = sum(len(sw.lrs) for sw in res.sweeps)
        return {"result": res.to_dict(), "samples": points * batch, "seconds": res.wall_time}

    with ctx.bar(name, 1) as bar:
        out = _cached(ctx, name, {"batch": batch, "accum": accum, "repeats": repeats}, compute)
        bar.complete(note=f"B={batch}")
    ctx.cost[name] = int(out["samples"])
    return out


def _recommended(rt: dict) -> tuple[float | None, str, dict | None]:
    """(lr, reason, spread) of a stored range test; lr None when it has no recommendation (diverged early)."""
    res = range_result_from_dict(rt["result"])
    try:
        sug = res.suggestions()
    except ConfigError as e:
        return None, str(e), None
    return sug.recommended, sug.reason, sug.to_dict()


# --------------------------------------------------------------------------------------------- step 2: noise scale
def _noise_plan(ctx: _Ctx, b0: int) -> tuple[dict | None, str | None]:
    """Warm-start length and the two batch sizes of the estimator, or the reason it cannot be measured."""
    n = ctx.n
    if n is not None and n < 2 * b0:
        return None, (
            f"the noise scale was not measured: the dataset has {n} samples, fewer than two batches of the "
            f"smallest batch {b0} (the estimator needs a small batch and a larger one)"
        )
    k = _NS_RATIO if n is None else max(2, min(_NS_RATIO, 2 ** int(math.log2(n // b0))))
    big = b0 * k
    warm_steps = int(min(_WARM_MAX_STEPS, _WARM_FRACTION * ctx.budget // b0))
    need = warm_steps * b0 + _NS_ESTIMATES * big
    if warm_steps < _WARM_MIN_STEPS or need > _NS_BUDGET * ctx.budget:
        return None, (
            f"the noise scale was not measured: the budget of {ctx.budget} samples is too small (a warm start of "
            f">= {_WARM_MIN_STEPS} steps at batch {b0} and {_NS_ESTIMATES} batches of {big} need {need} "
            f"samples, more than {_NS_BUDGET:.0%} of the budget), so the batch size is not checked against the "
            "critical batch"
        )
    return {"small_batch": b0, "big_batch": big, "warm_steps": warm_steps}, None


def _warm_and_noise(ctx: _Ctx, plan: dict, warm_lr: float) -> dict:
    """Train a copy for ``warm_steps`` at the smallest batch, then measure B_simple at its weights."""
    from .noise_scale import noise_scale
    from .train import fit

    def compute() -> dict:
        model = ctx.copy_model()
        t0 = time.perf_counter()
        mom = 0.9 if isinstance(ctx.optimizer, str) else None
        warm = fit(
            model,
            ctx.data,
            optimizer=ctx.optimizer,
            lr=warm_lr,
            batch_size=plan["small_batch"],
            steps=plan["warm_steps"],
            momentum=mom,
            seed=ctx.seed,
            eval_every=10**9,
            loss_fn=ctx.loss_fn,
            **ctx.extra(),
        )
        out = {
            "warm_start": {
                "lr": warm_lr,
                "batch_size": plan["small_batch"],
                "steps": plan["warm_steps"],
                "status": warm.status,
                "final_loss": float(warm.history["loss"][-1]) if len(warm.history["loss"]) else None,
            },
            "samples": int(plan["warm_steps"] * plan["small_batch"]),
        }
        if warm.status != "completed":
            out["error"] = f"the warm start diverged at step {warm.diverged_at} (lr={warm_lr:.3g})"
            out["seconds"] = time.perf_counter() - t0
            return out
        try:
            ns = noise_scale(
                model,
                ctx.data,
                small_batch=plan["small_batch"],
                big_batch=plan["big_batch"],
                num_estimates=_NS_ESTIMATES,
                seed=ctx.seed,
                loss_fn=ctx.loss_fn,
                **ctx.extra(),
            )
            out["result"] = ns.to_dict()
        except LrbsError as e:
            out["error"] = f"the noise scale could not be measured: {e}"
        out["samples"] += _NS_ESTIMATES * plan["big_batch"]
        out["seconds"] = time.perf_counter() - t0
        return out

    with ctx.bar("warm start + noise scale", 1) as bar:
        out = _cached(ctx, "noise_scale", {**plan, "warm_lr": warm_lr}, compute)
        bar.complete(note="B_simple = " + fmt((out.get("result") or {}).get("b_simple")))
    ctx.cost["noise_scale"] = int(out["samples"])
    return out


def _noise_evidence(ctx: _Ctx, measured: dict | None, why_not: str | None, sizes: list[int]) -> dict:
    """B_crit = B_simple (with its interval) and the predicted trade-off, or why there is none."""
    if measured is None or "result" not in measured:
        why = why_not or measured.get("error", "the noise scale was not measured")
        ctx.reasons.append(why)
        ev = {"b_crit": None, "ci": None, "tradeoff": [], "note": why}
        if measured is not None:
            ev["warm_start"] = measured.get("warm_start")
        return ev
    ns = measured["result"]
    b = ns.get("b_simple")
    lo, hi = ns.get("ci_low"), ns.get("ci_high")
    ev = {"result": ns, "warm_start": measured["warm_start"], "b_crit": b, "ci": [lo, hi]}
    if b is None or not b > 0 or lo is None or hi is None or not lo > 0:
        why = (
            f"the noise scale is not usable (B_simple = {fmt(b)}, {ns['confidence']:.0%} interval {fmt(lo)} .. "
            f"{fmt(hi)}): the gradient signal is below the noise floor at these batch sizes"
        )
        ctx.reasons.append(why)
        ev.update(b_crit=None, tradeoff=[], note=why)
        return ev
    ev["tradeoff"] = [
        {"batch_size": s, "steps_over_min": 1 + b / s, "examples_over_min": 1 + s / b} for s in sizes
    ]
    ev["note"] = (
        f"B_simple = tr(Σ)/|G|² = {fmt(b)} ({ns['confidence']:.0%} bootstrap interval {fmt(lo)} .. {fmt(hi)}), "
        f"measured after a warm start of {measured['warm_start']['steps']} steps at batch "
        f"{measured['warm_start']['batch_size']} (lr {fmt(measured['warm_start']['lr'])}), with B_small = "
        f"{ns['small_batch']} and B_big = {ns['big_batch']}; taken as the critical batch"
    )
    return ev


# --------------------------------------------------------------------------------------------- step 3: batch size
def _choose_batch(ctx: _Ctx, sizes: list[int], thr: dict, noise: dict) -> dict:
    """The largest ladder batch that still gains throughput, is <= 0.25 B_crit and leaves >= 50 steps."""
    knee = _knee(thr["ladder"])
    measured = [r["batch_size"] for r in thr["ladder"] if r["fits"] and r["samples_per_s"] is not None]
    if knee is None:  # not even the first rung fits in memory: accumulate micro-batches
        micro = thr.get("micro")
        if micro is None:
            ctx.reasons.append(f"no batch fits in memory, not even a single sample ({thr['stop']})")
            micro = 1
        return {
            "batch_size": sizes[0],
            "micro_batch": micro,
            "knee": None,
            "bound": "memory",
            "reason": f"the smallest batch of the ladder, as {sizes[0] // micro} accumulated micro-batches of "
            f"{micro} ({thr['stop']})",
        }
    cands = [b for b in measured if b <= knee]
    bound, why = (
        "throughput",
        (
            f"the largest batch still gaining throughput (>= {GAIN - 1:.0%} more samples/s per doubling; "
            f"the ladder stopped: {thr['stop']})"
        ),
    )
    b_crit = noise.get("b_crit")
    if b_crit is not None:
        limit = EXAMPLES_OVERHEAD * b_crit
        ok = [b for b in cands if b <= limit]
        if len(ok) < len(cands):
            cands = ok or cands[:1]
            bound = "critical batch"
            why = (
                f"the largest batch with B <= {EXAMPLES_OVERHEAD:g} B_crit = {fmt(limit)}, i.e. at most "
                f"{EXAMPLES_OVERHEAD:.0%} more examples than the minimum (E/E_min = 1 + B/B_crit, B_crit = "
                f"{fmt(b_crit)})" + ("" if ok else "; even the smallest batch is above it")
            )
    steps_ok = [b for b in cands if ctx.budget // b >= _MIN_STEPS]
    if len(steps_ok) < len(cands):
        if steps_ok:
            cands, bound = steps_ok, "budget"
            why = f"the largest batch that leaves >= {_MIN_STEPS} optimizer steps in the budget of {ctx.budget} samples"
        else:
            cands, bound = cands[:1], "budget"
            why = f"the smallest batch: the budget of {ctx.budget} samples gives only {ctx.budget // cands[0]} steps"
            ctx.reasons.append(
                f"the budget of {ctx.budget} samples gives only {ctx.budget // cands[0]} optimizer steps at the "
                f"smallest batch {cands[0]} (fewer than {_MIN_STEPS})"
            )
    return {"batch_size": cands[-1], "knee": knee, "bound": bound, "reason": f"{why}", "ladder": measured}


# --------------------------------------------------------------------------------------------- step 5: schedule
def _schedule(ctx: _Ctx, lr: float, total: int, scaled: dict | None) -> tuple[Schedule, Any, int, dict]:
    """(LR schedule, momentum, warmup steps, evidence) for the optimizer family."""
    if scaled is not None:
        from .recipes import linear_scaling

        w = max(1, total // 20)
        sched = linear_scaling(
            scaled["lr0"], scaled["batch"], scaled["base_batch"], scaled["rule"], w, total, decay="cosine"
        )
        ev = {
            "family": "scaled warmup + cosine",
            "reason": (
                f"the range test ran at batch {scaled['base_batch']} (lr {fmt(scaled['lr0'])}); the LR is scaled to "
                f"batch {scaled['batch']} by the {scaled['rule']} rule (Goyal et al. 2017 / Hoffer et al. 2017), "
                "then decays by a cosine to 0"
            ),
            "warmup_reason": f"gradual warmup from the unscaled LR over 5% of the {total} steps (Goyal et al. 2017)",
            "scaling_rule": scaled["rule"],
        }
        mom = 0.9 if isinstance(ctx.optimizer, str) else None
        return sched, mom, w, {**ev, "warmup_steps": w, "warmup_shape": "linear", "total_steps": total}
    if ctx.family == "sgd" and total >= 2:
        w = max(1, int(0.3 * total))
        sched = one_cycle(lr, total)
        mom = one_cycle_momentum(total) if isinstance(ctx.optimizer, str) else None
        ev = {
            "family": "one-cycle",
            "reason": (
                "SGD with momentum: one-cycle (Smith & Topin 2019) peaking at the range test's LR, down to "
                "lr/25/1e4 at the end, momentum cycled 0.95 -> 0.85 -> 0.95"
            ),
            "warmup_reason": "one-cycle's first phase: a cosine rise from lr/25 over 30% of the steps",
            "warmup_shape": "cosine",
        }
    else:
        b2 = ctx.beta2 if ctx.beta2 is not None else 0.999
        w = max(1, min(int(round(2 / (1 - b2))), total // 10))
        sched = warmup(cosine(lr, max(1, total - w)), w)
        mom = 0.9 if isinstance(ctx.optimizer, str) else None
        ev = {
            "family": "warmup + cosine",
            "reason": f"{ctx.family}: linear warmup to the range test's LR, then a cosine decay to 0",
            "warmup_reason": (
                f"min(2 / (1 - beta2), 10% of the steps) = min({2 / (1 - b2):.0f}, {total // 10}) (Ma & Yarats "
                "2021: Adam's second-moment estimate needs about 2/(1-beta2) steps)"
            ),
            "warmup_shape": "linear",
        }
    return sched, mom, w, {**ev, "warmup_steps": w, "total_steps": total, "scaling_rule": None}


# --------------------------------------------------------------------------------------------- step 4: learning rate
def _rule(ctx: _Ctx) -> str:
    return "linear" if ctx.family == "sgd" else "sqrt"


def _range_batch(ctx: _Ctx, batch: int, sizes: list[int]) -> int:
    """The chosen batch, or the largest smaller rung whose range test costs at most half the budget."""
    cost = _RANGE["num_iter"] * RANGE_REPEATS
    if cost * batch <= _RANGE_BUDGET * ctx.budget:
        return batch
    ok = [b for b in sizes if b < batch and cost * b <= _RANGE_BUDGET * ctx.budget]
    return ok[-1] if ok else min(sizes[0], batch)


def _choose_lr(ctx: _Ctx, main: dict, rt_batch: int, batch: int, base: dict | None) -> dict:
    """The peak LR from the range test at ``rt_batch`` (scaled to ``batch`` if smaller), with fallbacks."""
    from .recipes import scaling_factor

    lr, why, sug = _recommended(main)
    src_batch = rt_batch
    if lr is None and base is not None:
        lr0, why0, sug0 = _recommended(base)
        if lr0 is not None:
            ctx.reasons.append(
                f"the range test at batch {rt_batch} gave no recommendation ({why}); the LR comes from the "
                f"single sweep at batch {base['batch']}"
            )
            lr, why, sug, src_batch = lr0, why0, sug0, base["batch"]
    if lr is None:
        res = range_result_from_dict(main["result"])
        lr = float(res.lrs[0])
        ctx.reasons.append(
            f"the model diverged at every learning rate of the range test ({why}); the LR is the lowest one tried, "
            f"{lr:.3g}: check the model, the loss and the data before training"
        )
        return {
            "value": lr,
            "source": "lowest LR of the range test",
            "reason": ctx.reasons[-1],
            "scaled": None,
        }
    scaled = None
    reason = f"range test at batch {src_batch}: {why}"
    if src_batch < batch:
        rule = _rule(ctx)
        scaled = {"lr0": lr, "base_batch": src_batch, "batch": batch, "rule": rule}
        lr = lr * scaling_factor(batch, src_batch, rule)
        reason += f"; scaled to batch {batch} by the {rule} rule"
    return {
        "value": lr,
        "source": f"range test at batch {src_batch}",
        "reason": reason,
        "scaled": scaled,
        "suggestions": sug,
    }


# --------------------------------------------------------------------------------------------- tune
class _PreservedRng:
    """Fork torch's RNG (CPU and the model's CUDA device) and restore python's and numpy's states."""

    def __init__(self, device: torch.device):
        self.fork = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])

    def __enter__(self) -> None:
        self.py, self.np = random.getstate(), np.random.get_state()
        self.fork.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.fork.__exit__(*exc)
        random.setstate(self.py)
        np.random.set_state(self.np)


def _family(optimizer: Any, model: nn.Module) -> tuple[str, float | None]:
    if isinstance(optimizer, str):
        return ("sgd", None) if optimizer == "sgd" else ("adam", 0.999)
    probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
    if isinstance(probe, torch.optim.SGD):
        return "sgd", None
    betas = probe.param_groups[0].get("betas") if probe.param_groups else None
    if isinstance(probe, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam", float(betas[1]) if betas else 0.999
    return type(probe).__name__, float(betas[1]) if betas else None


def _setup(
    model,
    data,
    optimizer,
    budget_epochs,
    budget_samples,
    loss_fn,
    compute_loss,
    precision,
    val_data,
    batch_sizes,
    max_batch_size,
    seed,
    store,
    progress,
) -> tuple[_Ctx, list[int]]:  # noqa: E501
    """Validate every argument (before anything runs) and build the shared context."""
    if not isinstance(model, nn.Module):
        raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
    if not any(True for _ in model.parameters()):
        raise ConfigError("model has no parameters: there is nothing to tune")
    optimizer = _check_optimizer(optimizer)
    seed = check_int("seed", seed)
    device = model_device(model)
    precision = check_precision(precision, device)
    source = as_source(data)
    n = _num_samples(source, data)
    budget = _budget(budget_epochs, budget_samples, n)
    sizes = _ladder(batch_sizes, max_batch_size, n, _loader_batch(source))
    family, beta2 = _family(optimizer, model)
    ctx = _Ctx(model, data, source, n, optimizer, family, beta2, loss_fn, compute_loss, precision, val_data,
               budget, seed, device, store=store, progress=bool(progress))  # fmt: skip
    if n is not None and sizes[0] > n:
        kept = [b for b in sizes if b <= n]
        ctx.reasons.append(
            f"the dataset has {n} samples, fewer than the smallest batch {sizes[0]} of the ladder: "
            + ("the ladder starts at the full batch" if not kept else f"the ladder is cut to {kept}")
        )
        sizes = kept or [n]
    elif n is not None:
        sizes = [b for b in sizes if b <= n]
    return ctx, sizes


def _settings(ctx: _Ctx, sizes: list[int], budget_epochs: Any) -> dict[str, Any]:
    """The settings recorded with the evidence (and, hashed with the model and data, the store identity)."""
    return {
        "budget_samples": ctx.budget,
        "budget_epochs": budget_epochs,
        "optimizer": ctx.optimizer
        if isinstance(ctx.optimizer, str)
        else getattr(ctx.optimizer, "__qualname__", type(ctx.optimizer).__name__),
        "family": ctx.family,
        "precision": ctx.precision,
        "seed": ctx.seed,
        "ladder": sizes,
        "num_samples": ctx.n,
        "device": str(ctx.device),
        "data": ctx.source.describe(),
        "model": getattr(ctx.model, "lrbs_spec", {"name": type(ctx.model).__name__}),
        "loss_fn": None
        if ctx.loss_fn is None
        else getattr(ctx.loss_fn, "__name__", type(ctx.loss_fn).__name__),
        "compute_loss": None
        if ctx.compute_loss is None
        else getattr(ctx.compute_loss, "__name__", "callable"),
        "validation": ctx.val_data is not None,
    }


def tune(
    model: nn.Module,
    data: Any,
    *,
    optimizer: str | Callable = "sgd",
    budget_epochs: float | None = None,
    budget_samples: int | None = None,
    loss_fn: Callable | None = None,
    compute_loss: Callable | None = None,
    precision: str = "32",
    val_data: Any = None,
    batch_sizes: list[int] | None = None,
    max_batch_size: int | None = None,
    seed: int = 0,
    store: Any = None,
    progress: bool = True,
) -> Recommendation:
    r"""Choose the learning rate, batch size, warmup and schedule for a training budget, with the evidence.

    The steps (module docstring): throughput ladder, warm start and noise scale
    (``B_crit = B_simple = tr(Σ)/|G|²``), batch size (the largest ladder batch that still gains throughput,
    with :math:`B \le 0.25\,B_\text{crit}` so that :math:`E/E_\text{min} = 1 + B/B_\text{crit} \le 1.25`, and at
    least 50 steps in the budget), the LR from a range test at that batch (3 sweeps, median), and the schedule
    (one-cycle for SGD; linear warmup of :math:`\min(2/(1-\beta_2), T/10)` steps then cosine for Adam).

    Args:
        model: the model (never modified: every step trains a private copy).
        data: the training data, anything :func:`lrbs.batches.as_source` takes (an lrbs Dataset, tensors, a
            torch Dataset, a DataLoader (its batch size is then fixed), a list of batches).
        optimizer: ``"sgd"`` (momentum 0.9), ``"adam"``, ``"adamw"``, or a callable ``params -> optimizer``.
        budget_epochs, budget_samples: the training budget the recommendation is for; exactly one.
        loss_fn, compute_loss: how a batch becomes a loss (the batch protocol, :mod:`lrbs.batches`).
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA only).
        val_data: held-out data: the range test records the validation loss (a pass over it per iteration,
            keep it small) and :meth:`Recommendation.fit_kwargs` evaluates on it.
        batch_sizes: the ladder (strictly increasing); default powers of two from 32 up to ``max_batch_size``
            or the dataset size.
        max_batch_size: the largest batch to consider (1 .. dataset size).
        seed: seeds every step (data orders, the warm start, the bootstrap).
        store: a :class:`~lrbs.store.Store`: finished steps are stored and a rerun resumes after them.
        progress: show a rich progress bar per step.

    Returns:
        A :class:`Recommendation` (``lr``, ``batch_size``, ``warmup_steps``, ``schedule``, ``evidence``,
        ``confidence`` and ``reasons``, ``table()``, ``report(path)``, ``fit_kwargs()``).

    Raises:
        ConfigError: both or neither budget, a non-positive budget, ``max_batch_size`` outside 1 .. dataset size,
            an unknown optimizer name (the closest is suggested), a ladder that is not strictly increasing, a
            precision outside the three names (or ``16-mixed`` without a GPU), empty data.
        LrbsTypeError: a model that is not a module, an optimizer that is neither a name nor a callable.

    Example:
        >>> from lrbs.data import load_dataset
        >>> from lrbs.models import build_model
        >>> ds = load_dataset("blobs", n_train=512, n_test=128, num_features=8, num_classes=3)
        >>> rec = tune(build_model("mlp", dataset=ds, depth=2, width=16), ds, budget_epochs=2, progress=False)
        >>> rec.batch_size in (16, 32, 64, 128, 256, 512), rec.lr > 0
        (True, True)
    """
    t0 = time.perf_counter()
    ctx, sizes = _setup(model, data, optimizer, budget_epochs, budget_samples, loss_fn, compute_loss, precision,
                        val_data, batch_sizes, max_batch_size, seed, store, progress)  # fmt: skip
    settings = _settings(ctx, sizes, budget_epochs)
    if store is not None:
        ctx.key = _fingerprint(ctx, settings)
    with _PreservedRng(ctx.device):
        torch.manual_seed(seed)
        rec = _run(ctx, sizes, settings)
    rec.evidence["cost"]["seconds"] = time.perf_counter() - t0
    return rec


def _run(ctx: _Ctx, sizes: list[int], settings: dict) -> Recommendation:
    thr = _cached(ctx, "throughput", {"sizes": sizes}, lambda: _throughput(ctx, sizes))
    ctx.cost["throughput"] = int(thr["samples"])
    b0 = sizes[0]
    plan, why_not = _noise_plan(ctx, b0)
    base, measured = None, None
    if plan is not None:
        base = _range_test(ctx, b0, 1, 1, "base_range_test")
        base["batch"] = b0
        warm_lr, _, _ = _recommended(base)
        if warm_lr is None:
            warm_lr = _DEFAULT_WARM_LR.get(ctx.family, 1e-3)
            ctx.reasons.append(
                f"the range test at batch {b0} gave no LR for the warm start; it used {warm_lr:g}, a default"
            )
        measured = _warm_and_noise(ctx, plan, warm_lr)
    noise = _noise_evidence(ctx, measured, why_not, sizes)
    batch = _choose_batch(ctx, sizes, thr, noise)
    b = batch["batch_size"]
    accum = b // batch["micro_batch"] if "micro_batch" in batch else 1
    rt_batch = _range_batch(ctx, b, sizes)
    main = _range_test(ctx, rt_batch, accum, RANGE_REPEATS, "range_test")
    lr = _choose_lr(ctx, main, rt_batch, b, base)
    total = max(1, ctx.budget // b)
    sched, mom, w, sched_ev = _schedule(ctx, lr["value"], total, lr["scaled"])
    main_ev = {
        "batch_size": rt_batch,
        "repeats": RANGE_REPEATS,
        "result": main["result"],
        "recommended": lr["value"] if lr["scaled"] is None else lr["scaled"]["lr0"],
        "reason": lr["reason"],
    }
    thr_note = (
        f"samples/s of a full training step (forward, backward, optimizer) at each batch, best of {_WINDOWS} "
        f"windows; the ladder stopped: {thr['stop']}; knee (largest batch still gaining >= {GAIN - 1:.0%} per "
        f"doubling): {batch.get('knee')}"
    )
    evidence = {
        "settings": settings,
        "throughput": {**thr, "knee": batch.get("knee"), "note": thr_note},
        "base_range_test": None if base is None else {"batch_size": b0, "result": base["result"]},
        "noise_scale": noise,
        "batch": batch,
        "range_test": main_ev,
        "lr": {k: v for k, v in lr.items()},
        "schedule": sched_ev,
        "cost": {
            "samples": sum(ctx.cost.values()),
            "per_step": dict(ctx.cost),
            "seconds": 0.0,
            "resumed_steps": list(ctx.resumed),
            "measure": "samples through forward + backward",
        },  # fmt: skip
        "reasons": list(ctx.reasons),
    }
    options: dict[str, Any] = {}
    for k, v in (("loss_fn", ctx.loss_fn), ("compute_loss", ctx.compute_loss), ("test_data", ctx.val_data)):
        if v is not None:
            options[k] = v
    if ctx.precision != "32":
        options["precision"] = ctx.precision
    return Recommendation(
        lr=float(lr["value"]),
        batch_size=int(b),
        warmup_steps=int(w),
        schedule=sched,
        accumulation_steps=accum,
        total_steps=int(total),
        optimizer=ctx.optimizer,
        momentum=mom,
        confidence="low" if ctx.reasons else "high",
        reasons=tuple(ctx.reasons),
        evidence=jsonable(evidence),
        train_options=options,
    )
