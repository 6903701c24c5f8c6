"""``fit()``: a plain, deterministic training loop with LR / momentum / batch-size schedules.

The loop owns the data order (a seeded sampler that can change the batch size between steps without rebuilding a
DataLoader), the schedules, gradient accumulation, SAM's two passes, divergence detection (a non-finite loss ends the
run with status ``diverged``; it never raises), evaluation, checkpoints and logging to a :class:`~lrbs.store.Store`.
On CPU the same seed gives the same history, bit for bit. The caller's global random state is left untouched
(the loop runs in a forked RNG).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, ConfigError, LrbsTypeError, check_int, check_number
from .objective import as_tensors

__all__ = [
    "fit",
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
    """What callbacks see: the live model and optimizer, the current step and its batch."""

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
        return {
            "status": self.status,
            "final": self.final,
            "wall_time": self.wall_time,
            "diverged_at": self.diverged_at,
            "config": self.config,
            "evals": self.evals,
        }

    def plot(self, ax=None):
        """Training loss per step and test accuracy per evaluation."""
        from .report.figures import plot_fit

        return plot_fit(self, ax=ax)


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: dict[str, str] | None = None) -> Path:
    """Save the model's state dict as safetensors (tensors only; loading never executes code)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (meta or {}).items()})
    os.replace(tmp, path)
    return path


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
        own = model.state_dict()
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
        model.load_state_dict(state)
    return state


# --------------------------------------------------------------------------- helpers
def _as_schedule(name: str, value: Any, *, integer: bool = False, **bounds: Any) -> Callable[[int], float]:
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


def evaluate(
    model: nn.Module,
    data: Any,
    loss_fn: Callable | None = None,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Loss and accuracy of ``model`` on ``data`` in eval mode (the model's mode is restored afterwards)."""
    x, y = as_tensors(data)
    was = model.training
    model.eval()
    total, correct = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(y), batch_size):
                xb, yb = x[i : i + batch_size], y[i : i + batch_size]
                out = model(xb)
                lo = nn.functional.cross_entropy(out, yb) if loss_fn is None else loss_fn(out, yb)
                total += float(lo) * len(yb)
                correct += int((out.argmax(-1) == yb).sum())
    finally:
        model.train(was)
    return {"loss": total / len(y), "accuracy": correct / len(y)}


class _Sampler:
    """Seeded sampling without replacement; epochs are consecutive permutations and a batch may span two."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.g = n, generator
        self.perm = torch.randperm(n, generator=generator)
        self.pos = 0

    def take(self, b: int) -> torch.Tensor:
        parts, need = [], b
        while need:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.g), 0
            k = min(need, self.n - self.pos)
            parts.append(self.perm[self.pos : self.pos + k])
            self.pos += k
            need -= k
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def _make_optimizer(
    optimizer: Any,
    model: nn.Module,
    lr0: float,
    momentum: float,
    weight_decay: float,
    rho: float | None,
    opts: dict[str, Any] | None = None,
) -> torch.optim.Optimizer:
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


def _set_group_values(
    opt: torch.optim.Optimizer, lr: float, ratios: list[float], momentum: float | None
) -> None:
    for g, r in zip(opt.param_groups, ratios):
        g["lr"] = lr * r
        if momentum is not None:
            if "betas" in g:
                g["betas"] = (momentum, *tuple(g["betas"])[1:])
            elif "momentum" in g:
                g["momentum"] = momentum


def _is_sam(opt: torch.optim.Optimizer) -> bool:
    return hasattr(opt, "first_step") and hasattr(opt, "second_step")


# --------------------------------------------------------------------------- fit
def fit(
    model: nn.Module,
    dataset: Any,
    *,
    optimizer: str | torch.optim.Optimizer | Callable = "sgd",
    lr: float | Callable[[int], float] = 0.1,
    batch_size: int | Callable[[int], int] = 128,
    steps: int | None = None,
    epochs: float | None = None,
    momentum: float | Callable[[int], float] = 0.9,
    weight_decay: float = 0.0,
    rho: float | None = None,
    optimizer_opts: dict[str, Any] | None = None,
    seed: int = 0,
    eval_every: int | None = None,
    eval_batch_size: int = 1000,
    max_micro_batch: int | None = None,
    loss_fn: Callable | None = None,
    test_data: Any = None,
    callbacks: Iterable[Callback] = (),
    store: Any = None,
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    config: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``dataset``.

    Args:
        model: the model to train (it is trained in place, like any training loop).
        dataset: an lrbs ``Dataset`` (train + test splits), a ``Split`` or an ``(x, y)`` pair.
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"``, ``"sam"``, ``"asam"``, ``"lars"``, ``"lamb"``, an optimizer
            instance, or a callable ``params -> optimizer``.
        lr: a float or a schedule ``step -> lr`` (step 0 is the first update). With several param groups the
            schedule sets the first group and the others keep their ratio to it.
        batch_size: an int or a schedule ``step -> int``: the batch drawn at each step may change.
        steps, epochs: the length of training; exactly one of them (an epoch is ``len(train) / batch_size(0)``
            steps... computed in samples: training stops once ``epochs * len(train)`` samples were seen).
        momentum: SGD momentum (or Adam's beta1), a float or a schedule.
        weight_decay: L2 weight decay of the optimizer.
        rho: SAM's neighbourhood size (for ``"sam"`` / ``"asam"``).
        optimizer_opts: extra options of a named optimizer (e.g. ``{"base": "adam"}`` for SAM on Adam).
        seed: seeds the data order (and dropout, inside a forked RNG).
        eval_every: evaluate every this many steps (default: about 20 evaluations per run) and at the end.
        max_micro_batch: split a larger batch into accumulated micro-batches of at most this size (the effective
            batch, and any LR rule, count the accumulated batch).
        loss_fn: ``loss_fn(output, y)``, mean reduction; default cross-entropy.
        test_data: evaluation data when ``dataset`` has no test split.
        callbacks: :class:`Callback` objects.
        store: a :class:`~lrbs.store.Store`; the run, its metrics and its final result are written to it.
        checkpoint: write the final weights here (safetensors).
        progress: show a rich progress bar.
        config: extra JSON-able entries recorded in the result's config (e.g. the model's name).

    Returns:
        A :class:`FitResult`; a non-finite loss ends the run with ``status="diverged"`` (it never raises).

    Raises:
        ConfigError / LrbsTypeError: invalid arguments (checked before anything is trained).
    """
    # ---- validate everything first: nothing is trained on bad input
    if not isinstance(model, nn.Module):
        raise LrbsTypeError(f"model={type(model).__name__} is not allowed: must be a torch.nn.Module")
    x_train, y_train = as_tensors(dataset)
    if test_data is None and hasattr(dataset, "test"):
        test_data = dataset.test
    n_train = len(y_train)
    if n_train == 0:
        raise ConfigError("dataset is empty")
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    if x_train.device != device:
        raise ConfigError(
            f"data is on device {x_train.device} but the model is on {device}: move one of them"
        )
    if (steps is None) == (epochs is None):
        raise ConfigError(f"give exactly one of steps= and epochs= (got steps={steps!r}, epochs={epochs!r})")
    lr_s = _as_schedule("lr", lr)
    bs_s = _as_schedule("batch_size", batch_size, integer=True)
    mom_s = (
        _as_schedule("momentum", momentum, low=0.0, low_inclusive=True, high=1.0, high_inclusive=False)
        if momentum is not None
        else None
    )
    b0 = bs_s(0)
    for name, val in (("lr", lr_s(0)),):
        check_number(name, val, low=0.0)
    if isinstance(b0, bool) or not isinstance(b0, (int, np.integer)) or b0 < 1 or b0 > n_train:
        raise ConfigError(
            f"batch_size={b0!r} is not allowed: must be an integer >= 1 and <= {n_train} (train size)"
        )
    if steps is not None:
        steps = check_int("steps", steps, low=1)
        max_samples = None
    else:
        epochs = check_number("epochs", epochs, low=0.0)
        max_samples = int(math.ceil(epochs * n_train))
        steps = 10**9
    check_number("weight_decay", weight_decay, low=0.0, low_inclusive=True)
    if max_micro_batch is not None:
        max_micro_batch = check_int("max_micro_batch", max_micro_batch, low=1)
    total_steps_est = steps if max_samples is None else max(1, max_samples // b0)
    if eval_every is None:
        eval_every = max(1, total_steps_est // 20)
    eval_every = check_int("eval_every", eval_every, low=1)
    opt = _make_optimizer(
        optimizer, model, lr_s(0), mom_s(0) if mom_s else 0.0, weight_decay, rho, optimizer_opts
    )
    base = opt.param_groups[0]["lr"] or 1.0
    ratios = [g["lr"] / base if base else 1.0 for g in opt.param_groups]
    callbacks = list(callbacks)

    cfg = {
        "model": getattr(model, "lrbs_spec", {"name": type(model).__name__}),
        "dataset": dataset.describe() if hasattr(dataset, "describe") else {"n_train": n_train},
        "optimizer": optimizer if isinstance(optimizer, str) else type(opt).__name__,
        "lr": _describe(lr),
        "batch_size": _describe(batch_size),
        "steps": None if max_samples is not None else steps,
        "epochs": epochs,
        "momentum": _describe(momentum),
        "weight_decay": weight_decay,
        "rho": rho,
        "optimizer_opts": optimizer_opts,
        "seed": seed,
        "max_micro_batch": max_micro_batch,
        "eval_every": eval_every,
        **(config or {}),
    }
    run_key = None
    if store is not None:
        run_key = store.start_run(cfg, kind="fit")

    hist: dict[str, list] = {"step": [], "samples": [], "lr": [], "batch_size": [], "loss": []}
    evals: list[dict] = []
    status, diverged_at = "completed", None
    t_start = time.perf_counter()
    sam = _is_sam(opt)
    lossf = loss_fn or nn.functional.cross_entropy

    def do_eval(step: int, samples: int, state: TrainState) -> dict:
        row = {"step": step, "samples": samples}
        tr = evaluate(model, (x_train, y_train), loss_fn, eval_batch_size)
        row["train_loss"], row["train_acc"] = tr["loss"], tr["accuracy"]
        if test_data is not None:
            te = evaluate(model, test_data, loss_fn, eval_batch_size)
            row["test_loss"], row["test_acc"] = te["loss"], te["accuracy"]
        state.evals = evals
        state.last_eval = row
        for cb in callbacks:
            cb.on_eval(state)
        row.update(state.logs)
        state.logs = {}
        evals.append(row)
        return row

    bar = None
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(
            TextColumn("[bold]fit[/]"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeRemainingColumn(),
            transient=True,
        )
        bar.start()
        task = bar.add_task("fit", total=total_steps_est, loss=float("nan"))

    model.train()
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        sampler = _Sampler(n_train, gen)
        state = TrainState(
            0,
            model,
            opt,
            lr_s(0),
            b0,
            float("nan"),
            0,
            loss_fn=loss_fn,
            train_data=(x_train, y_train),
            max_micro_batch=max_micro_batch,
        )
        for cb in callbacks:
            cb.on_start(state)
        samples = 0
        step = 0
        last_set: tuple = ()
        try:
            while step < steps and (max_samples is None or samples < max_samples):
                b = int(bs_s(step))
                if b < 1 or b > n_train:
                    raise ConfigError(
                        f"batch_size schedule gave {b} at step {step}: must be >= 1 and <= {n_train} (train size)"
                    )
                cur_lr = float(lr_s(step))
                if not math.isfinite(cur_lr) or cur_lr < 0:
                    raise ConfigError(
                        f"lr schedule gave {cur_lr} at step {step}: must be a finite number >= 0"
                    )
                cur_mom = float(mom_s(step)) if mom_s else None
                if (cur_lr, cur_mom) != last_set:  # constant schedules write the groups once
                    _set_group_values(opt, cur_lr, ratios, cur_mom)
                    last_set = (cur_lr, cur_mom)
                idx = sampler.take(b).to(device)
                xb, yb = x_train[idx], y_train[idx]
                micro = max_micro_batch or b
                opt.zero_grad(set_to_none=True)
                loss_val = 0.0
                if micro >= b:  # one pass, no slicing or rescaling (the common case, kept lean)
                    lo = lossf(model(xb), yb)
                    lo.backward()
                    loss_val = float(lo.detach())
                else:
                    for s in range(0, b, micro):
                        xm, ym = xb[s : s + micro], yb[s : s + micro]
                        lo = lossf(model(xm), ym) * (len(ym) / b)
                        lo.backward()
                        loss_val += float(lo.detach())
                if not math.isfinite(loss_val):
                    status, diverged_at = "diverged", step
                    break
                if sam:
                    from .optim import frozen_running_stats

                    opt.first_step(zero_grad=True)
                    with frozen_running_stats(model):  # BN statistics are not updated by the second pass
                        for s in range(0, b, micro):
                            xm, ym = xb[s : s + micro], yb[s : s + micro]
                            (lossf(model(xm), ym) * (len(ym) / b)).backward()
                    opt.second_step(zero_grad=False)
                else:
                    opt.step()
                samples += b
                hist["step"].append(step)
                hist["samples"].append(samples)
                hist["lr"].append(cur_lr)
                hist["batch_size"].append(b)
                hist["loss"].append(loss_val)
                state.step, state.lr, state.batch_size, state.loss = step, cur_lr, b, loss_val
                state.samples_seen, state.x, state.y = samples, xb, yb
                for cb in callbacks:
                    cb.on_step(state)
                step += 1
                if bar is not None:
                    bar.update(task, advance=1, loss=loss_val)
                if state.stop:
                    break
                if step % eval_every == 0:
                    row = do_eval(step, samples, state)
                    if not math.isfinite(row["train_loss"]):
                        status, diverged_at = "diverged", step
                        break
                    if state.stop:
                        break
        except BaseException as e:
            if bar is not None:
                bar.stop()
            if store is not None and run_key is not None:
                store.fail_run(run_key, f"{type(e).__name__}: {e}")
            raise
        if status == "completed" and (not evals or evals[-1]["step"] != step):
            do_eval(step, samples, state)
        for cb in callbacks:
            cb.on_end(state)
    if bar is not None:
        bar.stop()
    wall = time.perf_counter() - t_start
    final = {k: v for k, v in (evals[-1] if evals else {}).items() if isinstance(v, (int, float))}
    if status == "diverged":
        final = {"train_loss": float("nan"), "diverged_at": diverged_at, "step": diverged_at}
    history = {k: np.asarray(v) for k, v in hist.items()}
    if checkpoint is not None and status == "completed":
        save_checkpoint(model, checkpoint, meta={"lrbs": "fit"})
    result = FitResult(status, history, evals, final, wall, cfg, diverged_at, run_key)
    if store is not None and run_key is not None:
        rows = [(int(s), "batch_loss", float(v)) for s, v in zip(history["step"], history["loss"])]
        rows += [(int(s), "lr", float(v)) for s, v in zip(history["step"], history["lr"])]
        rows += [(int(s), "batch_size", float(v)) for s, v in zip(history["step"], history["batch_size"])]
        for e in evals:
            rows += [
                (int(e["step"]), k, float(v))
                for k, v in e.items()
                if k not in ("step",) and isinstance(v, (int, float))
            ]
        store.finish_run(run_key, status, result=_jsonable(result.to_dict()), metrics=rows)
    return result


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    return repr(obj)


# --------------------------------------------------------------------------- config-driven training
#: The keys a training config (``lrbs train`` options, sweep grids) may hold, with their defaults.
CONFIG_DEFAULTS: dict[str, Any] = {
    "model": "cnn1d",
    "model_opts": {},
    "dataset": "mnist1d",
    "dataset_opts": {},
    "optimizer": "sgd",
    "lr": 0.1,
    "batch_size": 128,
    "steps": None,
    "epochs": None,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "rho": None,
    "optimizer_opts": {},
    "seed": 0,
    "model_seed": None,
    "eval_every": None,
    "max_micro_batch": None,
    "lr_rule": None,  # "linear" | "sqrt": scale lr from base_batch_size to the (global) batch (Goyal et al. 2017)
    "base_batch_size": None,
    "warmup": None,  # gradual warmup steps to the scaled LR
    "stop_train_acc": None,  # end the run once the training accuracy reaches this (Keskar's "until plateau")
}


def _parse_spec(name: str, value: Any) -> Any:
    """A schedule given as a string spec (``"cosine(start=0.1, steps=1000)"``) becomes a Schedule."""
    if isinstance(value, str):
        from .schedules import parse

        return parse(value)
    return value


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and reject unknown keys (the message lists the valid ones)."""
    unknown = [k for k in config if k not in CONFIG_DEFAULTS]
    if unknown:
        from .errors import closest

        hint = closest(unknown[0], CONFIG_DEFAULTS)
        did = f" Did you mean {hint!r}?" if hint else ""
        raise ConfigError(
            f"unknown training option {unknown[0]!r}.{did} Valid options: {', '.join(sorted(CONFIG_DEFAULTS))}"
        )
    cfg = {**CONFIG_DEFAULTS, **config}
    if cfg["steps"] is None and cfg["epochs"] is None:
        raise ConfigError("give exactly one of steps= and epochs= (got neither)")
    return cfg


def train_config(
    config: dict[str, Any],
    *,
    store: Any = None,
    callbacks: Iterable[Callback] = (),
    checkpoint: str | os.PathLike | None = None,
    progress: bool = False,
    dataset: Any = None,
) -> tuple[nn.Module, FitResult]:
    """Build the model and dataset named in ``config`` and train: the engine behind ``lrbs train`` and sweeps.

    Args:
        config: options as in :data:`CONFIG_DEFAULTS` (``model``, ``dataset``, ``optimizer``, ``lr`` (a number or a
            schedule spec string), ``batch_size`` (an int or a spec), ``steps`` or ``epochs``, ``seed``, ...).
            The model is initialised with ``model_seed`` (default: ``seed``).
        dataset: an already loaded ``Dataset`` to reuse (must match ``config["dataset"]``).

    Returns:
        ``(model, FitResult)``; the result's config is the normalized ``config``.
    """
    from .data import load_dataset
    from .models import build_model

    cfg = normalize_config(config)
    ds = dataset if dataset is not None else load_dataset(cfg["dataset"], **(cfg["dataset_opts"] or {}))
    mseed = cfg["seed"] if cfg["model_seed"] is None else cfg["model_seed"]
    model = build_model(cfg["model"], dataset=ds, seed=mseed, **(cfg["model_opts"] or {}))
    lr = _parse_spec("lr", cfg["lr"])
    batch = _parse_spec("batch_size", cfg["batch_size"])
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
        momentum=_parse_spec("momentum", cfg["momentum"]),
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
        config={"train_config": _jsonable(cfg)},
    )
    return model, result
