"""The state both framework callbacks share: settings, cadence, what was measured and what to log.

Framework-free: :mod:`lrbs.integrations.transformers` and :mod:`lrbs.integrations.lightning` call :class:`Monitor`
from their hooks; the measurements themselves are in :mod:`lrbs.integrations.measure`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from ..errors import ConfigError
from .measure import (
    METRICS,
    GradCapture,
    MeasurementWarning,
    NoiseSummary,
    NoiseWindow,
    check_every,
    current_lr,
    guarded,
    host_floats,
    micro_sums,
    probe_estimates,
    protected_rng,
    require,
    sharpness,
    solve_micro,
    stability_threshold,
    trainable_parameters,
)

__all__ = ["Monitor"]

#: steps held unsolved on one process at most (they are solved when published, or when this many wait)
MAX_PENDING = 64


@dataclass
class _Step:
    """One optimizer step's raw readings, kept as tensors until it is solved (many steps, one device sync)."""

    step: int
    micro: list  # |c_i|^2: 0-d tensors, or NaN where the read failed
    totals: list  # the parts of |sum c_i|^2 (0-d tensors or numbers); empty: none read
    total_scale: float  # the totals' loss scale (1: already unscaled)
    sizes: Sequence[float | None]
    shares: Sequence[float] | Callable[[], Sequence[float]]
    micro_scale: float


# --------------------------------------------------------------------------------------------- the shared monitor
def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name}={value!r} is not allowed: must be an integer >= {low}")
    return value


class Monitor:
    """What both callbacks share: the settings, when to measure, what was measured and what to log.

    Each framework's ``LrbsCallback`` is a Monitor (it subclasses this class and the framework's callback base), so
    this ``__init__`` is their one signature, with its arguments documented here once. The framework glue calls
    :meth:`start` when training starts, :meth:`begin_step` / :meth:`end_step` around each optimizer step's
    micro-batches (free noise scale), :meth:`after_step` after each optimizer step (probe and sharpness, at their
    cadence) and :meth:`publish` when it logs. Every measurement runs under :func:`protected_rng` and
    :func:`guarded`: it cannot change the random stream or end the run.
    """

    #: ``(module, minimum version, extra)`` a subclass's framework needs, checked when it is built (None: nothing)
    requires: tuple[str, str, str] | None = None
    #: the ``compute_loss`` used when none is given (None: the model's own loss, ``model(**batch).loss``)
    default_loss: Callable | None = None

    def __init__(
        self,
        noise_scale: bool = True,
        sharpness_every: int | None = None,
        sharpness_samples: int = 512,
        log_every: int | None = None,
        *,
        window: int = 50,
        probe_data: Any = None,
        probe_micro_batches: int = 4,
        probe_draws: int = 4,
        compute_loss: Callable | None = None,
        batch_weight: Callable | None = None,
        confidence: float = 0.95,
        seed: int = 0,
    ):
        """
        Args:
            noise_scale: measure ``B_simple``.
            sharpness_every: measure ``lambda_max`` every this many optimizer steps (None: never).
            sharpness_samples: size of the fixed subset for the Hessian.
            log_every: probe cadence (default: the trainer's logging interval).
            window: number of recent estimates behind ``lrbs/b_simple``.
            probe_data: held data for the probe (a map-style dataset collated by the trainer's collator, or any
                data :func:`lrbs.batches.as_source` takes), ``"train"`` for the training set, or None.
            probe_micro_batches, probe_draws: the probe's big batch in micro-batches, and draws per probe.
            compute_loss: ``compute_loss(model, batch)`` for the probe and the sharpness (default
                :attr:`default_loss`: the model's own loss for HF, ``training_step``'s for Lightning).
            batch_weight: ``batch_weight(batch)``, the weight of a batch in the probe's and the sharpness's means
                (default: its sample count).
            confidence: level of the bootstrap interval of ``lrbs/b_simple``.
            seed: seeds the sharpness subset, the probe draws and the bootstrap.

        Raises:
            ConfigError: a cadence < 1, a size out of range, a non-callable loss or weight.
            DependencyError: the framework missing or older than :attr:`requires` says.
        """
        if self.requires is not None:
            require(*self.requires)
        if not isinstance(noise_scale, bool):
            raise ConfigError(f"noise_scale={noise_scale!r} is not allowed: must be True or False")
        self.noise_scale = noise_scale
        self.sharpness_every = check_every("sharpness_every", sharpness_every)
        self.sharpness_samples = _check_int("sharpness_samples", sharpness_samples, 1)
        self.log_every = check_every("log_every", log_every)
        self.window_size = _check_int("window", window, 2)
        self.probe_data = probe_data
        self.probe_micro_batches = _check_int("probe_micro_batches", probe_micro_batches, 2)
        self.probe_draws = _check_int("probe_draws", probe_draws, 2)
        for name, fn in (("compute_loss", compute_loss), ("batch_weight", batch_weight)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name}={fn!r} is not allowed: must be a callable or None")
        self.compute_loss = compute_loss if compute_loss is not None else self.default_loss
        self.batch_weight = batch_weight
        if not (isinstance(confidence, float) and 0.0 < confidence < 1.0):
            raise ConfigError(f"confidence={confidence!r} is not allowed: must be a float in (0, 1)")
        self.confidence = confidence
        self.seed = _check_int("seed", seed, 0)
        self.capture: GradCapture | None = None
        self.window: NoiseWindow | None = None
        self.free = False
        self.values: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self._eigvec: Any = "auto"
        self._warned: set[str] = set()
        self._fresh = False
        self._pending: list[_Step] = []

    # ---- lifecycle
    def start(
        self,
        model: nn.Module,
        *,
        accumulation: int,
        world: int,
        free_possible: bool,
        micro_batch: int | None,
        num_samples: int | None,
        train_source: Any,
        probe_source: Any,
        log_every: int,
        total_when: Callable[[], bool] | None,
    ) -> None:
        """Check the setup and attach the hooks (ConfigError on a setup that cannot be measured)."""
        params = trainable_parameters(model)
        self.log_every = self.log_every or log_every
        self.num_samples, self.micro_batch = num_samples, micro_batch
        self.train_source, self.probe_source = train_source, probe_source
        self.free = self.noise_scale and free_possible and (accumulation >= 2 or world >= 2)
        if self.noise_scale and not self.free:
            if probe_source is None:
                why = (
                    f"gradient accumulation {accumulation} on {world} process(es) gives one: set gradient "
                    "accumulation >= 2 (free), or"
                    if free_possible
                    else "the free micro-batch estimate needs each rank's whole gradient, which sharded training "
                    "(DeepSpeed, FSDP) does not have:"
                )
                raise ConfigError(
                    f"noise_scale=True needs two batch sizes, and {why} pass probe_data= (held data, an extra "
                    f"{self.probe_draws} x {self.probe_micro_batches} micro-batch gradients every log_every "
                    "steps; probe_data='train' samples the training set), or noise_scale=False"
                )
            if micro_batch is None:
                raise ConfigError("the probe needs the micro-batch size: the train batch size is unknown")
        if self.sharpness_every is not None and train_source is None:
            raise ConfigError(
                "sharpness_every needs a map-style training dataset to take its fixed subset from (the training "
                "data has no length); leave sharpness_every=None"
            )
        if self.noise_scale:
            self.window = NoiseWindow(
                self.window_size, "micro-batches" if self.free else "probe", self.confidence
            )
        if self.free:
            self.capture = GradCapture(params, total_when).attach()

    def stop(self) -> None:
        """Solve the steps still held (:meth:`flush`) and remove the hooks."""
        self.flush()
        if self.capture is not None:
            self.capture.detach()
            self.capture = None

    # ---- free noise scale
    def begin_step(self) -> None:
        if self.capture is not None:
            self.capture.reset()

    def end_step(
        self,
        step: int,
        sizes: Sequence[float | None],
        shares: Sequence[float] | Callable[[], Sequence[float]],
        *,
        micro_scale: float = 1.0,
        total_sq: Any = None,
        all_reduce: Callable | None = None,
    ) -> None:
        """Turn the step's captured contributions into one estimate (skipped, with one warning, when the number
        of backward passes does not match the micro-batches).

        ``shares`` may be a function that returns them, called when the step is solved; ``total_sq`` (a number or
        a 0-d tensor, already unscaled) defaults to the capture's own total, divided by ``micro_scale**2`` like
        the contributions. On one process the step is held as tensors and solved with the others at the next
        :meth:`publish`, :meth:`summary` or :meth:`stop` (at most :data:`MAX_PENDING` held): no device sync and
        no arithmetic in the training step. Under data parallelism (``all_reduce``,
        :func:`~lrbs.integrations.measure.sum_over_ranks`) it is solved at once, and every rank takes part in the
        one collective of each step whatever happened to it: a rank that cannot read its step sends NaN sums, and
        every rank then leaves that step out (no rank waits for another forever).
        """
        if self.capture is None:
            return
        micro, parts = self.capture.take_tensors()
        totals, total_scale = (parts, float(micro_scale)) if total_sq is None else ([total_sq], 1.0)
        rec = _Step(step, micro, totals, total_scale, sizes, shares, float(micro_scale))
        if all_reduce is not None:
            self._solve([rec], all_reduce)
            return
        self._pending.append(rec)
        if len(self._pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Solve the steps held on one process into estimates, in step order."""
        pending, self._pending = self._pending, []
        if pending:
            self._solve(pending, None)

    def _solve(self, records: list[_Step], all_reduce: Callable | None) -> None:
        """Read the records' norms as floats (:func:`~lrbs.integrations.measure.host_floats`: one device-to-host
        copy for all of them on an accelerator) and turn each record into its estimate."""
        flat = [v for r in records for v in (*r.micro, *r.totals)]
        got = guarded("reading the gradient norms", records[0].step, lambda: host_floats(flat))
        values = iter(got if got is not None else [math.nan] * len(flat))
        for r in records:
            micro = [next(values) for _ in r.micro]
            totals = [next(values) for _ in r.totals]
            total = sum(totals) / r.total_scale**2 if totals and r.total_scale else None
            shares = r.shares
            if callable(shares):
                shares = guarded("the micro-batch shares", r.step, shares)
            self._estimate(r.step, micro, r.sizes, shares, r.micro_scale, total, all_reduce)

    def _estimate(
        self,
        step: int,
        micro_sq: list[float],
        sizes: Sequence[float | None],
        shares: Sequence[float] | None,
        micro_scale: float,
        total: float | None,
        all_reduce: Callable | None,
    ) -> None:
        sums = self._step_sums(step, micro_sq, sizes, shares, micro_scale, total)
        world = 1
        if all_reduce is not None:
            reduced = guarded("the noise-scale all-reduce", step, lambda: all_reduce(sums))
            if reduced is None:
                return
            sums, world = reduced
        if total is None:
            return
        est = guarded(
            "the noise-scale estimate",
            step,
            lambda: solve_micro(sums, total, num_samples=self.num_samples, world=world),
        )
        if est is not None:
            self.window.add(step, *est)
            self._fresh = True

    def _step_sums(
        self,
        step: int,
        micro_sq: Sequence[float],
        sizes: Sequence[float | None],
        shares: Sequence[float] | None,
        micro_scale: float,
        total: float | None,
    ) -> np.ndarray:
        """This rank's :func:`~lrbs.integrations.measure.micro_sums`, or NaNs (after one warning) for a step
        that cannot be read."""
        bad = np.full(6, math.nan)
        if shares is None:  # their function failed, and said so
            return bad
        if any(b is None for b in sizes):
            self.warn_once(
                "sizes",
                f"lrbs: the batch size of a micro-batch at step {step} cannot be read; such "
                "steps are left out of the noise scale",
            )
            return bad
        if total is None or len(micro_sq) != len(sizes):
            self.warn_once(
                "mismatch",
                f"lrbs: step {step} had {len(micro_sq)} backward pass(es) through the parameters for {len(sizes)} "
                "micro-batch(es); such steps are left out of the noise scale",
            )
            return bad
        scale2 = float(micro_scale) ** 2
        sums = guarded(
            "the noise-scale estimate",
            step,
            lambda: micro_sums([m / scale2 for m in micro_sq], sizes, shares, num_samples=self.num_samples),
        )
        return bad if sums is None else sums

    # ---- probe and sharpness
    def after_step(self, step: int, model: nn.Module, optimizer: Any, lr: float | None = None) -> None:
        """Run the probe and the sharpness measurement when their cadence says so (``lr``: the learning rate the
        step used, default the optimizer's current one)."""
        probe = self.noise_scale and not self.free and step % self.log_every == 0
        sharp = self.sharpness_every is not None and step % self.sharpness_every == 0
        if not (probe or sharp):
            return
        device = next(iter(model.parameters())).device
        if probe:
            with protected_rng(device):
                guarded("the noise-scale probe", step, lambda: self._probe(step, model))
        if sharp:
            with protected_rng(device):
                guarded("the sharpness measurement", step, lambda: self._sharpness(model, optimizer, lr))

    def _probe(self, step: int, model: nn.Module) -> None:
        t0 = time.perf_counter()
        res = probe_estimates(
            model,
            self.probe_source,
            small_batch=self.micro_batch,
            big_batch=self.micro_batch * self.probe_micro_batches,
            num_estimates=self.probe_draws,
            seed=self.seed + step,
            compute_loss=self.compute_loss,
            batch_weight=self.batch_weight,
        )
        for g, t in zip(res.grad_sq_estimates, res.trace_sigma_estimates):
            self.window.add(step, float(g), float(t))
        self.values[METRICS["probe_seconds"]] = time.perf_counter() - t0
        self._fresh = True

    def _sharpness(self, model: nn.Module, optimizer: Any, lr: float | None) -> None:
        res = sharpness(
            model,
            self.train_source,
            max_samples=self.sharpness_samples,
            # batches of 4 micro-batches: fewer, larger HVP passes, memory still of the order of a training step
            batch_size=None if self.micro_batch is None else 4 * self.micro_batch,
            compute_loss=self.compute_loss,
            batch_weight=self.batch_weight,
            init=self._eigvec,
            seed=self.seed,
        )
        lam = float(res.values[0])
        self._eigvec = res.vectors[0] if res.vectors is not None else "auto"
        self.values[METRICS["lambda_max"]] = lam
        lr = current_lr(optimizer) if lr is None else lr
        if lr is not None:
            self.values[METRICS["lambda_max_x_lr"]] = lr * lam
        threshold = stability_threshold(optimizer)
        if threshold is not None:
            self.values[METRICS["eos_threshold"]] = threshold
        self._fresh = True

    # ---- output
    def publish(self, step: int) -> dict[str, float]:
        """The metrics measured since the last call (empty when nothing is new), also kept in :attr:`history`."""
        self.flush()
        if not self._fresh:
            return {}
        out = dict(self.values)
        summary = self.window.summary(self.seed) if self.window is not None else None
        if summary is not None:
            out[METRICS["b_simple"]] = summary.b_simple
            out[METRICS["grad_sq"]] = summary.grad_sq
            out[METRICS["trace_sigma"]] = summary.trace_sigma
            if summary.num_estimates >= 2:
                out[METRICS["b_simple_low"]] = summary.ci_low
                out[METRICS["b_simple_high"]] = summary.ci_high
        self.values = {}
        self._fresh = False
        self.history.append({"step": step, **out})
        return out

    def summary(self) -> NoiseSummary | None:
        """The noise scale over the current window (None before the first estimate)."""
        self.flush()
        return self.window.summary(self.seed) if self.window is not None else None

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, MeasurementWarning, stacklevel=3)
