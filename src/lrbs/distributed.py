"""Data-parallel large-batch training under ``torchrun`` (DDP), with the gradient noise scale for free.

``torchrun --nproc-per-node N -m lrbs train --ddp ...`` (or :func:`ddp_train` in a script started by torchrun)
trains one config on N processes: gloo on CPU, nccl on GPU.

*Batches.* ``config["batch_size"]`` is the **global** batch ``B``; each rank computes the gradient of
``B / N`` samples and DDP averages them, so the update is that of one process at batch ``B``. Every rank
draws the same seeded global batch (the sampler of :func:`lrbs.train.fit`: consecutive seeded permutations of
the training set) and takes its own contiguous slice of it, so the ranks see disjoint samples
(DistributedSampler semantics) and **always the same number of batches**: no padding and no dropped tail are
needed, and no rank can wait forever for another. ``B`` must be divisible by ``N`` (checked at every step of
a batch-size schedule). The same config therefore trains the same model on any number of ranks, up to
floating-point reduction order.

*LR rules.* ``lr_rule="linear"`` (Goyal et al. 2017: ``lr = lr0 * B / B0``) or ``"sqrt"`` (Hoffer et al. 2017)
scale the LR tuned at ``base_batch_size`` ``B0`` by the **global** batch, never the per-rank one (the
recurring bug of reference §6b), optionally after ``warmup`` steps of linear warmup.

*Noise scale.* :class:`DDPNoiseScale` is a DDP communication hook (the k-diffusion approach, McCandlish et al.
2018, App. A): it records ``|bucket|^2`` before the all-reduce (the per-rank gradient, ``B_small = B / N``)
and after the averaging all-reduce (the global gradient, ``B_big = B``); one scalar all-reduce gives the mean
per-rank norm.

References:
    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv 1706.02677.
    McCandlish et al., "An Empirical Model of Large-Batch Training", arXiv 1812.06162.
    Hoffer et al., "Train longer, generalize better", arXiv 1705.08741.
"""

from __future__ import annotations

import gc
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError, check_choice, check_int, check_number

__all__ = ["DDPNoiseScale", "ddp_train", "init_process_group", "two_batch_noise_scale"]

LR_RULES = ("linear", "sqrt")


# --------------------------------------------------------------------------------------------- estimator
def two_batch_noise_scale(
    g_small_sq: float, g_big_sq: float, b_small: float, b_big: float
) -> tuple[float, float]:
    """Unbiased estimates of ``|G|^2`` and ``tr(Sigma)`` from squared gradient norms at two batch sizes.

    .. math::
        |G|^2 \\approx \\frac{B_b |G_b|^2 - B_s |G_s|^2}{B_b - B_s}, \\qquad
        \\mathrm{tr}\\Sigma \\approx \\frac{|G_s|^2 - |G_b|^2}{1/B_s - 1/B_b}

    (McCandlish et al. 2018, Appendix A). Both gradients must be taken at the same weights; ``|G_s|^2`` is the
    mean over the small batches. ``B_simple = tr(Sigma) / |G|^2``. The arithmetic is
    :func:`lrbs.noise_scale.two_batch_estimate` with ``c(B) = 1/B`` (samples drawn with replacement); this adds
    the checks of the batch sizes.

    Raises:
        ConfigError: ``b_small >= b_big`` or a batch size <= 0.
    """
    b_s, b_b = check_number("b_small", b_small, low=0.0), check_number("b_big", b_big, low=0.0)
    if b_s >= b_b:
        raise ConfigError(f"b_small={b_small!r} is not allowed: must be < b_big={b_big!r}")
    from .noise_scale import two_batch_estimate

    g2, trace = two_batch_estimate(g_small_sq, g_big_sq, 1.0 / b_s, 1.0 / b_b)
    return float(g2), float(trace)


@dataclass
class DDPNoiseScale:
    """A DDP communication hook that averages gradients and reads the gradient noise scale on the way.

    Register with ``ddp_model.register_comm_hook(None, noise.hook)``; after each backward call
    :meth:`update` (it does the one scalar all-reduce and updates the EMAs). Inside the hook, for every
    bucket: ``|g_rank|^2`` is accumulated before the all-reduce and ``|mean_r g_r|^2`` after it.

    EMAs of ``|G|^2`` and ``tr(Sigma)`` are kept **separately** (a ratio of EMAs, not an EMA of the ratio),
    debiased by ``1 - beta^t``, each clamped at >= 1e-8 in ``b_simple``.

    Attributes:
        beta: EMA factor.
        process_group: the data-parallel group (default: the world).
        enabled: set False to pass gradients through without recording (e.g. SAM's second pass).
        records: per update: ``g_small_sq`` (mean per-rank), ``g_big_sq``, ``g2``, ``trace``, ``b_simple``.
    """

    beta: float = 0.99
    process_group: Any = None
    enabled: bool = True
    records: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in _GNS_KEYS})

    def __post_init__(self) -> None:
        self.beta = check_number(
            "beta", self.beta, low=0.0, high=1.0, high_inclusive=False, low_inclusive=True
        )
        self._small = torch.zeros((), dtype=torch.float64)
        self._big = torch.zeros((), dtype=torch.float64)
        self._ema_g2 = self._ema_tr = 0.0
        self._t = 0

    def hook(self, state, bucket):  # no annotations: DDP checks them against its own types
        """The hook: ``(state, GradBucket) -> Future[Tensor]`` with the averaged bucket."""
        buf = bucket.buffer()
        world = dist.get_world_size(self.process_group)
        if self.enabled:
            self._small = self._small.to(buf.device) + buf.detach().double().square().sum()
        buf.div_(world)
        fut = dist.all_reduce(buf, group=self.process_group, async_op=True).get_future()

        def after(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            if self.enabled:
                self._big = self._big.to(out.device) + out.detach().double().square().sum()
            return out

        return fut.then(after)

    def update(self, b_small: int, b_big: int, extra: torch.Tensor | None = None) -> torch.Tensor | None:
        """Reduce the per-rank norms (one all-reduce, with ``extra`` scalars riding along), update the EMAs.

        Args:
            b_small: the per-rank batch. b_big: the global batch.
            extra: a 1-D float tensor averaged over ranks in the same all-reduce (e.g. the loss).

        Returns:
            ``extra`` averaged over ranks.
        """
        world = dist.get_world_size(self.process_group)
        payload = torch.cat(
            [
                self._small.reshape(1).cpu(),
                (extra if extra is not None else torch.zeros(0)).double().reshape(-1).cpu(),
            ]
        )
        payload = _all_reduce_mean(payload, self.process_group, self._small.device, world)
        small, big = float(payload[0]), float(self._big)
        self._small = torch.zeros((), dtype=torch.float64)
        self._big = torch.zeros((), dtype=torch.float64)
        if b_small < b_big:
            g2, tr = two_batch_noise_scale(small, big, b_small, b_big)
            if math.isfinite(g2) and math.isfinite(tr):
                self._t += 1
                self._ema_g2 = self.beta * self._ema_g2 + (1 - self.beta) * g2
                self._ema_tr = self.beta * self._ema_tr + (1 - self.beta) * tr
        else:  # one rank: no second batch size, no estimate
            g2 = tr = math.nan
        rec = {"g_small_sq": small, "g_big_sq": big, "g2": g2, "trace": tr, "b_simple": self.b_simple}
        for k, v in rec.items():
            self.records[k].append(v)
        return None if extra is None else payload[1:]

    @property
    def b_simple(self) -> float:
        """``max(EMA[tr Sigma], 1e-8) / max(EMA[|G|^2], 1e-8)`` (debiased EMAs); NaN before any estimate."""
        if self._t == 0:
            return math.nan
        debias = 1 - self.beta**self._t if self.beta > 0 else 1.0
        return max(self._ema_tr / debias, 1e-8) / max(self._ema_g2 / debias, 1e-8)


_GNS_KEYS = ("g_small_sq", "g_big_sq", "g2", "trace", "b_simple")


def _all_reduce_mean(t: torch.Tensor, group: Any, device: torch.device, world: int) -> torch.Tensor:
    t = t.to(device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return (t / world).cpu()


# --------------------------------------------------------------------------------------------- process group
def init_process_group(backend: str | None = None) -> tuple[int, int, bool]:
    """Join the process group that ``torchrun`` describes in the environment (``RANK``, ``WORLD_SIZE``, ...).

    Without torchrun's variables a one-process gloo group is created (a file store in a temporary folder), so
    the same code runs in a plain ``python`` process.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, else gloo.

    Returns:
        ``(rank, world_size, created)``; ``created`` is False when a group already existed.

    Raises:
        ConfigError: an unknown backend, or nccl without CUDA.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    check_choice("backend", backend, ("gloo", "nccl"))
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("backend='nccl' is not allowed without CUDA: use 'gloo' on CPU")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://")
    else:
        path = os.path.join(tempfile.mkdtemp(prefix="lrbs_pg_"), "store")
        dist.init_process_group(backend, init_method=f"file://{path}", rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), True


# --------------------------------------------------------------------------------------------- training
def ddp_train(
    config: dict[str, Any],
    *,
    lr_rule: str | None = None,
    base_batch_size: int | None = None,
    sync_bn: bool = False,
    store: Any = None,
    checkpoint: str | os.PathLike | None = None,
    noise_scale: bool = True,
    noise_beta: float = 0.99,
    return_model: bool = False,
    precision: str = "32",
) -> Any:
    """Train ``config`` data-parallel on the ranks that ``torchrun`` started (or on one process without it).

    ``config`` holds the options of :func:`lrbs.train.train_config`; its ``batch_size`` is the **global**
    batch. Rank ``r`` of ``N`` computes the gradient of slice ``r`` of every global batch; DDP averages the
    gradients. With ``lr_rule``, the LR is ``scale_lr(lr, B_global, base_batch_size, rule)`` (linear:
    ``lr * B / B0``; sqrt: ``lr * sqrt(B / B0)``), optionally preceded by ``config["warmup"]`` steps of linear
    warmup. A non-finite loss (averaged over ranks, so every rank decides alike) ends the run as ``diverged``.

    Args:
        config: training options (:data:`lrbs.train.CONFIG_DEFAULTS`); ``lr_rule``, ``base_batch_size`` and
            ``warmup`` may also be given there (the keyword arguments win).
        lr_rule: ``"linear"``, ``"sqrt"`` or None (the LR as given).
        base_batch_size: the batch ``B0`` at which ``lr`` was tuned (required with ``lr_rule``).
        sync_bn: convert BatchNorm layers to ``SyncBatchNorm`` (statistics over the global batch); default:
            each rank normalises with its own batch statistics, and rank 0's running statistics are broadcast.
        store: a :class:`~lrbs.store.Store` or a path; only rank 0 writes (kind ``"fit"``).
        checkpoint: rank 0 writes the final weights here (safetensors).
        noise_scale: read the gradient noise scale with :class:`DDPNoiseScale` (needs >= 2 ranks for values).
        noise_beta: its EMA factor.
        return_model: return ``(model, result)`` on every rank instead.
        precision: ``"32"``, ``"bf16-mixed"`` or ``"16-mixed"`` (CUDA, a GradScaler: a skipped update is not an LR
            step, and the history gets an ``applied`` column). The step is :class:`lrbs.step.TrainStep`, the one
            ``fit`` uses (DDP all-reduces on the last micro-batch only). Under ``16-mixed`` the noise-scale hook
            reads scaled gradients: ``gns_g2`` and ``gns_trace`` carry the factor ``s^2``, ``b_simple`` (their
            ratio) does not.

    Returns:
        A :class:`lrbs.train.FitResult` on rank 0 and None on the other ranks (or ``(model, result)`` on every
        rank with ``return_model``). Its history has the per-step global loss and ``gns_*`` columns
        (``gns_g_small_sq``, ``gns_g_big_sq``, ``gns_g2``, ``gns_trace``, ``gns_b_simple``).

    Raises:
        ConfigError: bad options, a global batch not divisible by the number of ranks, ``lr_rule`` without
            ``base_batch_size``.
    """
    from .train import normalize_config

    cfg = normalize_config(dict(config))
    rule, b0, warm = _lr_rule_options(cfg, lr_rule, base_batch_size)
    noise_beta = check_number(
        "noise_beta", noise_beta, low=0.0, high=1.0, low_inclusive=True, high_inclusive=False
    )
    rank, world, created = init_process_group()
    run = None
    try:
        run = _DDPRun(cfg, rank, world, precision, sync_bn)
        run.schedules(rule, b0, warm)
        result = run.train(
            noise_scale,
            noise_beta,
            store,
            checkpoint,
            {"lr_rule": rule, "base_batch_size": b0, "warmup": warm, "sync_bn": bool(sync_bn)},
        )
        ddp_model = run.model
    finally:
        # The DDP Reducer must die before its process group: destroying a gloo group that a live Reducer still
        # holds left the Reducer's later destructor joining a gloo thread forever (a hang seen in the test suite).
        if run is not None:
            run.ddp = run.hook = run.train_step = None
        run = None
        gc.collect()
        if created:
            dist.destroy_process_group()
    if return_model:
        return ddp_model, result
    return result if rank == 0 else None


def _lr_rule_options(
    cfg: dict[str, Any], lr_rule: str | None, base_batch_size: int | None
) -> tuple[Any, Any, Any]:
    """The checked ``(lr_rule, base_batch_size, warmup)`` of ddp_train (arguments before the config's keys)."""
    rule = lr_rule if lr_rule is not None else cfg.get("lr_rule")
    b0 = base_batch_size if base_batch_size is not None else cfg.get("base_batch_size")
    warm = cfg.get("warmup")
    if rule is not None:
        check_choice("lr_rule", rule, LR_RULES)
        if b0 is None:
            raise ConfigError(f"lr_rule={rule!r} needs base_batch_size=: the batch at which lr was tuned")
        b0 = check_int("base_batch_size", b0, low=1)
    if warm is not None:
        warm = check_int("warmup", warm, low=1)
    return rule, b0, warm


class _DDPRun:
    """One rank's part of :func:`ddp_train`: the model and data, the schedules, the loop and the record."""

    def __init__(self, cfg: dict[str, Any], rank: int, world: int, precision: str, sync_bn: bool):
        from .data import load_dataset
        from .models import build_model
        from .step import check_precision

        self.cfg, self.rank, self.world = cfg, rank, world
        device = (
            torch.device(f"cuda:{torch.cuda.current_device()}")
            if dist.get_backend() == "nccl"
            else torch.device("cpu")
        )
        self.device = device
        self.precision = check_precision(precision, device)
        self.ds = ds = load_dataset(cfg["dataset"], **(cfg["dataset_opts"] or {}))
        mseed = cfg["seed"] if cfg["model_seed"] is None else cfg["model_seed"]
        model = build_model(cfg["model"], dataset=ds, seed=mseed, **(cfg["model_opts"] or {}))
        if sync_bn:
            if device.type == "cpu":
                raise ConfigError(
                    "sync_bn=True is not allowed on CPU: SyncBatchNorm runs only on GPUs (nccl)"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model.to(device)
        self.train_xy = (ds.train.x.to(device), ds.train.y.to(device))
        self.test = (ds.test.x.to(device), ds.test.y.to(device))
        self.n_train = len(self.train_xy[1])

    def schedules(self, rule: str | None, b0: int | None, warm: int | None) -> None:
        """The batch-size, lr (scaled by ``rule``, warmed up) and momentum schedules and the run's length."""
        from . import schedules
        from .train import as_schedule, parse_spec

        cfg, n_train = self.cfg, self.n_train
        self.bs_s = as_schedule("batch_size", parse_spec("batch_size", cfg["batch_size"]), integer=True)
        lr_spec = parse_spec("lr", cfg["lr"])
        self.B = B = int(self.bs_s(0))
        _check_global_batch(B, self.world, n_train, 0)
        self.lr_factor = 1.0
        if rule is not None:
            self.lr_factor = B / b0 if rule == "linear" else math.sqrt(B / b0)
            lr_spec = schedules.scale_lr(lr_spec if callable(lr_spec) else float(lr_spec), B, b0, rule)
        if warm is not None:
            base = lr_spec if isinstance(lr_spec, schedules.Schedule) else schedules.constant(float(lr_spec))
            lr_spec = schedules.warmup(base, warm)
        self.lr_s = as_schedule("lr", lr_spec)
        self.mom_s = (
            as_schedule("momentum", parse_spec("momentum", cfg["momentum"]))
            if cfg["momentum"] is not None
            else None
        )
        if cfg["steps"] is not None:
            self.steps, self.max_samples = check_int("steps", cfg["steps"], low=1), None
        else:
            self.max_samples = int(math.ceil(check_number("epochs", cfg["epochs"], low=0.0) * n_train))
            self.steps = 10**9
        self.micro = (
            check_int("max_micro_batch", cfg["max_micro_batch"], low=1) if cfg["max_micro_batch"] else None
        )
        total_est = self.steps if self.max_samples is None else max(1, self.max_samples // B)
        self.eval_every = check_int("eval_every", cfg["eval_every"] or max(1, total_est // 20), low=1)

    def record(self, info: dict[str, Any]) -> dict[str, Any]:
        """The run's config as the store keeps it: model, dataset, training config and the DDP settings."""
        from ._util import jsonable

        ddp_info = {
            "world_size": self.world,
            "backend": dist.get_backend(),
            "global_batch": self.B,
            "per_rank_batch": self.B // self.world,
            "lr_rule": info["lr_rule"],
            "base_batch_size": info["base_batch_size"],
            "lr_factor": self.lr_factor,
            "warmup": info["warmup"],
            "sync_bn": info["sync_bn"],
            "sampler": "shared seeded global batch, contiguous slice per rank",
        }
        if self.precision != "32":
            ddp_info["precision"] = self.precision
        return {
            "model": getattr(self.model, "lrbs_spec", {"name": self.cfg["model"]}),
            "dataset": self.ds.describe(),
            "train_config": jsonable(self.cfg),
            "ddp": ddp_info,
        }

    def train(self, noise_scale: bool, noise_beta: float, store: Any, checkpoint: Any, info: dict) -> Any:
        """Wrap the model in DDP, run the loop and write the result (rank 0) to the store and the checkpoint."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        from ._util import jsonable
        from .batches import BatchLoss
        from .step import TrainStep
        from .train import make_optimizer, metric_rows

        cfg, device = self.cfg, self.device
        self.ddp = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.hook = DDPNoiseScale(beta=noise_beta) if noise_scale else None
        if self.hook is not None:
            self.ddp.register_comm_hook(None, self.hook.hook)
        mom_s = self.mom_s
        self.opt = opt = make_optimizer(
            cfg["optimizer"],
            self.model,
            self.lr_s(0),
            mom_s(0) if mom_s else 0.0,
            cfg["weight_decay"],
            cfg["rho"],
        )
        base_lr = opt.param_groups[0]["lr"] or 1.0
        self.ratios = [g["lr"] / base_lr if base_lr else 1.0 for g in opt.param_groups]
        self.batch_loss = BatchLoss()
        self.train_step = TrainStep(self.ddp, opt, self.batch_loss, precision=self.precision, device=device)
        record = self.record(info)
        db, own_db = _open_store(store, self.rank)
        if db is None:
            return self.fit(record, checkpoint, None)
        try:
            with db.run(record, "fit") as run:  # an exception marks the run failed and is re-raised
                result = self.fit(record, checkpoint, run.key)
                rows = metric_rows(result, series=("gns_b_simple",))
                run.finish(result.status, result=jsonable(result.to_dict()), metrics=rows)
        finally:
            if own_db:
                db.close()
        return result

    def fit(self, record: dict[str, Any], checkpoint: Any, run_key: str | None) -> Any:
        """The timed loop, the final metrics and (rank 0) the checkpoint of a completed run: the FitResult."""
        from .train import FitResult, final_metrics, save_checkpoint

        t_start = time.perf_counter()
        status, diverged_at, hist, evals = self.loop()
        wall = time.perf_counter() - t_start
        final = final_metrics(status, diverged_at, evals)
        history = {k: np.asarray(v) for k, v in hist.items()}
        if checkpoint is not None and status == "completed" and self.rank == 0:
            save_checkpoint(self.model, checkpoint, meta={"lrbs": "ddp_train"})
        return FitResult(status, history, evals, final, wall, record, diverged_at, run_key)

    def evaluate(self, step: int, samples: int, evals: list[dict]) -> None:
        from .train import evaluate

        tr, te = evaluate(self.model, self.train_xy), evaluate(self.model, self.test)
        row = {
            "step": step,
            "samples": samples,
            "train_loss": tr["loss"],
            "train_acc": tr["accuracy"],
            "test_loss": te["loss"],
            "test_acc": te["accuracy"],
        }
        if self.hook is not None:
            row["b_simple"] = self.hook.b_simple
        evals.append(row)

    def loop(self) -> tuple[str, int | None, dict[str, list], list[dict]]:
        """The steps (in a forked RNG seeded by ``seed``): the shared global batch, this rank's slice of it."""
        from .batches import Sampler, TensorSource
        from .train import set_group_values

        cfg, device, rank, world, hook = self.cfg, self.device, self.rank, self.world, self.hook
        hist: dict[str, list] = {"step": [], "samples": [], "lr": [], "batch_size": [], "loss": []}
        hist.update({f"gns_{k}": [] for k in _GNS_KEYS})
        evals: list[dict] = []
        status, diverged_at = "completed", None
        source = TensorSource(self.train_xy)
        self.model.train()
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
            torch.manual_seed(cfg["seed"])
            sampler = Sampler(self.n_train, torch.Generator(device="cpu").manual_seed(cfg["seed"]))
            step = samples = updates = 0
            while step < self.steps and (self.max_samples is None or samples < self.max_samples):
                B = int(self.bs_s(updates))
                _check_global_batch(B, world, self.n_train, updates)
                b = B // world
                cur_lr = float(self.lr_s(updates))
                set_group_values(
                    self.opt, cur_lr, self.ratios, float(self.mom_s(updates)) if self.mom_s else None
                )
                batch = source.take(sampler.take(B)[rank * b : (rank + 1) * b])
                loss_val, mbs, scales = self.forward_backward(batch, b, B)
                if not math.isfinite(loss_val):  # the same decision on every rank: no rank is left waiting
                    status, diverged_at = "diverged", step
                    break
                if hook is not None:
                    hook.enabled = False  # SAM's second pass is not a gradient sample
                applied = self.train_step.update(mbs, scales)
                if hook is not None:
                    hook.enabled = True
                updates += applied
                if self.precision == "16-mixed":
                    hist.setdefault("applied", []).append(applied)
                samples += B
                for k, v in (
                    ("step", step),
                    ("samples", samples),
                    ("lr", cur_lr),
                    ("batch_size", B),
                    ("loss", loss_val),
                ):
                    hist[k].append(v)
                for k in _GNS_KEYS:
                    hist[f"gns_{k}"].append(hook.records[k][-1] if hook is not None else math.nan)
                step += 1
                if step % self.eval_every == 0:
                    self.evaluate(step, samples, evals)
            if status == "completed" and (not evals or evals[-1]["step"] != step):
                self.evaluate(step, samples, evals)
        return status, diverged_at, hist, evals

    def forward_backward(self, batch: Any, b: int, B: int) -> tuple[float, list[Any], list[float] | None]:
        """This rank's loss and gradient of its slice; the loss averaged over ranks (with the noise-scale reduce)."""
        from .train import micro_batches

        mbs, scales = micro_batches(batch, b, self.micro, self.batch_loss)
        loss_val = sum(float(lo) for lo in self.train_step.forward_backward(mbs, scales))
        local = torch.tensor([loss_val], dtype=torch.float64)
        if self.hook is not None:
            return float(self.hook.update(b, B, extra=local)[0]), mbs, scales
        return float(_all_reduce_mean(local, None, self.device, self.world)[0]), mbs, scales


def _check_global_batch(B: int, world: int, n_train: int, step: int) -> None:
    if isinstance(B, bool) or B < 1 or n_train < B:
        raise ConfigError(
            f"batch_size={B!r} (global, step {step}) is not allowed: must be >= 1 and <= {n_train}"
        )
    if B % world:
        raise ConfigError(
            f"batch_size={B} (global, step {step}) is not allowed on {world} ranks: the global batch must be "
            f"divisible by the number of ranks (e.g. {max(world, B - B % world)})"
        )


def _open_store(store: Any, rank: int) -> tuple[Any, bool]:
    """Rank 0's store and whether this opened it (a path); ``(None, False)`` on the other ranks or without one."""
    if store is None or rank != 0:
        return None, False
    from .store import Store

    if isinstance(store, Store):
        return store, False
    return Store(store), True
