"""LR x batch-size sweeps: a grid of training runs, locally or as Ray tasks, resumable through the store.

A sweep is the cartesian product of a ``grid`` of training options over a ``base`` config. Every cell is one
:func:`lrbs.train.train_config` run; its key is the hash of its canonical config (:func:`lrbs.store.key_for`),
so a sweep started again skips the runs that the store already holds as finished and redoes the rest. Workers
(a process pool or Ray tasks) only compute and return plain dicts; the driver is the only writer to SQLite. The local
pool is :func:`lrbs.pool.shared_pool`: its workers start once per process and are reused by every later sweep.

After training, optional *measures* are computed on the trained model on a fixed, seeded subset of the
training data (:data:`MEASURES`): the top Hessian eigenvalue, the Hessian trace, Keskar et al.'s sharpness.

The heatmap of a sweep draws a metric over (batch size, LR) on log axes with the lines of constant ``lr / B``
overlaid: the "temperature" of SGD, which Smith & Le (2018) and Goyal et al. (2017) tie to generalization and
to the linear scaling rule.

References:
    Smith & Le, "A Bayesian Perspective on Generalization and Stochastic Gradient Descent", ICLR 2018.
    Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour", arXiv 1706.02677.
    Keskar et al., "On Large-Batch Training for Deep Learning: Generalization Gap and Sharp Minima",
    ICLR 2017.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from . import measures
from ._util import fmt, jsonable
from ._util import progress as _progress
from .errors import (
    ConfigError,
    DependencyError,
    LrbsError,
    LrbsTypeError,
    check_choice,
    check_int,
    check_number,
    did_you_mean,
    unknown_name,
)
from .pool import connect_ray

__all__ = [
    "MEASURES",
    "SweepResult",
    "SweepRun",
    "evaluate_grid",
    "grid_configs",
    "landscape_2d_ray",
    "sweep",
]

BACKENDS = ("local", "ray")


# --------------------------------------------------------------------------------------------- measures
#: The measures a sweep can run after training (on the trained model and a fixed seeded subset of the training
#: data, ``measure_samples`` samples, BatchNorm in eval mode): THE registry, :data:`lrbs.measures.MEASURES`
#: (old names such as ``top_eigenvalue`` are its aliases).
#: This mapping holds every registry spelling (canonical names and aliases) -> its Measure.
MEASURES: Mapping[str, measures.Measure] = MappingProxyType(
    {**measures.MEASURES, **{old: measures.MEASURES[new] for old, new in measures.ALIASES.items()}}
)

#: Per-measure options that keep a sweep's values what they were before the one registry: the sweeps asked
#: ``hessian_eigenvalues(obj, k=1, seed=seed)`` with its own default stop rule (a value tolerance), not the
#: registry's residual test.
_MEASURE_OPTIONS: dict[str, dict[str, Any]] = {"lambda_max": {"tol": None, "tol_on": None}}


def _check_measures(measure: Any) -> tuple[str, ...]:
    """The requested measures' canonical names (aliases such as ``top_eigenvalue`` resolved, duplicates dropped),
    each known and importable; results and run configs use these names."""
    if isinstance(measure, str):
        measure = (measure,)
    if not isinstance(measure, (list, tuple)):
        raise LrbsTypeError(
            f"measure={measure!r} is not allowed: must be a list of names from {sorted(MEASURES)}"
        )
    out: list[str] = []
    for name in measure:
        key = measures.canonical(name)  # ConfigError for an unknown name
        if key not in out:
            out.append(key)
    for (
        name
    ) in measure:  # fail before anything runs, not in every worker (the error names the user's spelling)
        module = MEASURES[measures.canonical(name)].module
        try:
            __import__(module)
        except ImportError as e:
            raise DependencyError(
                f"measure={name!r} needs {module}, which cannot be imported ({e}); drop the measure or "
                "install a complete lrbs"
            ) from None
    return tuple(out)


def _measure(obj: Any, name: str, seed: int) -> float:
    """The value of measure ``name`` (any registry spelling) on ``obj``, with the sweep's options."""
    key = measures.canonical(name)
    return float(MEASURES[key](obj, seed=seed, **_MEASURE_OPTIONS.get(key, {})))


# --------------------------------------------------------------------------------------------- the worker
def _run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Train one config and measure it; never raises: a failure comes back as ``status="failed"``.

    Runs in a worker process (Ray task, process pool) or in the driver; returns plain JSON-able data.
    """
    fault = task.get("fault") or {}
    marker = fault.get("exit_once")
    if marker and not os.path.exists(marker):  # test hook: a worker that dies the first time it runs
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(int(task["threads"]))
    t0 = time.perf_counter()
    out: dict[str, Any] = {
        "status": "failed",
        "final": {},
        "measures": {},
        "history": {},
        "evals": [],
        "error": None,
        "pid": os.getpid(),
        "host": socket.gethostname(),
    }
    try:
        from .objective import Objective
        from .train import train_config

        model, res = train_config(task["config"])
        out["status"] = res.status
        out["final"] = jsonable(dict(res.final))
        out["history"] = {k: np.asarray(v).tolist() for k, v in res.history.items()}
        out["evals"] = jsonable(res.evals)
        if res.status == "completed" and task["measure"]:
            from .data import load_dataset

            cfg = res.config["train_config"]
            ds = load_dataset(cfg["dataset"], **(cfg["dataset_opts"] or {}))
            obj = Objective(
                model, None, ds.train, max_samples=task["measure_samples"], seed=task["measure_seed"]
            )
            for name in task["measure"]:
                out["measures"][name] = _measure(obj, name, task["measure_seed"])
            out["measure_settings"] = {**obj.settings(), "seed": task["measure_seed"]}
    except Exception as e:  # a failing run is recorded, it never stops the sweep
        out["status"] = "failed"
        tb = traceback.format_exc(limit=-3)
        out["error"] = f"{type(e).__name__}: {e}\n{tb}"
    finally:
        torch.set_num_threads(threads_before)
    out["wall_time"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class SweepRun:
    """One cell of a sweep.

    Attributes:
        key: the store key (hash of ``store_config``).
        params: the grid values of this cell, e.g. ``{"lr": 0.1, "batch_size": 32, "seed": 0}``.
        config: the full normalized training config.
        status: ``"completed"``, ``"diverged"`` or ``"failed"``.
        final: final metrics (train/test loss and accuracy, ``gap`` = test_loss - train_loss, ``acc_gap`` =
            train_acc - test_acc).
        measures: the measures, by canonical name (e.g. ``lambda_max``).
        error: the error text of a failed run.
        wall_time: seconds in the worker.
        cached: True when the run was found finished in the store and not recomputed.
    """

    key: str
    params: dict[str, Any]
    config: dict[str, Any]
    status: str
    final: dict[str, float]
    measures: dict[str, float]
    error: str | None = None
    wall_time: float | None = None
    cached: bool = False

    def row(self) -> dict[str, Any]:
        """One flat dict: grid values, status, final metrics, measures, key."""
        keep = ("train_loss", "train_acc", "test_loss", "test_acc", "gap", "acc_gap")
        return {
            **self.params,
            "status": self.status,
            **{k: self.final.get(k) for k in keep if k in self.final},
            **self.measures,
            "key": self.key,
            "cached": self.cached,
        }

    def to_dict(self) -> dict[str, Any]:
        """All fields, in their order (``dataclasses.asdict``)."""
        return asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """The table of a sweep: one :class:`SweepRun` per grid cell, in grid order.

    Attributes:
        runs: the runs.
        grid: the grid (key -> list of values).
        base: the base config.
        settings: backend, measures, store path, concurrency, wall time.
    """

    runs: tuple[SweepRun, ...]
    grid: dict[str, list]
    base: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per run (see :meth:`SweepRun.row`)."""
        return [r.row() for r in self.runs]

    def to_dicts(self) -> list[dict[str, Any]]:
        """The rows, JSON-able."""
        return jsonable(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "grid": self.grid,
                "base": self.base,
                "settings": self.settings,
                "runs": [r.to_dict() for r in self.runs],
            }
        )

    def __len__(self) -> int:
        return len(self.runs)

    def table(self, title: str | None = "sweep") -> Any:
        """A rich ``Table`` of the rows (grid values, status, final metrics, measures)."""
        from rich.table import Table

        rows = self.rows
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols and k not in ("key", "cached")]
        table = Table(title=title)
        for c in cols:  # fold, never truncate, numbers; the status stays on one line
            if c == "status":
                table.add_column(c, justify="left", no_wrap=True, min_width=9)
            else:
                table.add_column(c, justify="right", overflow="fold")
        for r in rows:
            table.add_row(*[_fmt(r.get(c)) for c in cols])
        return table

    def pivot(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(batch_sizes, lrs, values)`` with ``values[i, j]`` the mean of ``metric`` over the runs (e.g.
        seeds) at ``lrs[i]``, ``batch_sizes[j]``; NaN where no run finished.

        Raises:
            ConfigError: unknown metric (the message lists the available ones), or non-numeric lr / batch
                size.
        """
        rows = self.rows
        known = sorted(
            {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "cached"}
        )
        if metric not in known:
            raise unknown_name("metric", metric, known)
        lrs, bss = [], []
        for run in self.runs:
            lr, b = run.config.get("lr"), run.config.get("batch_size")
            for name, v in (("lr", lr), ("batch_size", b)):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ConfigError(f"heatmap needs numeric {name} values, got {name}={v!r} (a schedule?)")
            lrs.append(float(lr))
            bss.append(float(b))
        lr_axis, b_axis = np.array(sorted(set(lrs))), np.array(sorted(set(bss)))
        total = np.zeros((len(lr_axis), len(b_axis)))
        count = np.zeros_like(total)
        for row, lr, b in zip(rows, lrs, bss):
            v = row.get(metric)
            if isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                i, j = int(np.searchsorted(lr_axis, lr)), int(np.searchsorted(b_axis, b))
                total[i, j] += v
                count[i, j] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        return b_axis, lr_axis, values

    def heatmap(self, metric: str = "test_acc", ax: Any = None, temperature_lines: bool = True) -> Any:
        """Draw ``metric`` over batch size (x) and learning rate (y), log axes, mean over seeds.

        The dashed lines are lines of constant ``lr / B`` (Smith & Le 2018's noise "temperature"; Goyal et al.
        2017's linear scaling rule keeps a run on one of them), through the grid's lr/B ratios (at most 9). The
        drawing is :func:`lrbs.report.figures.draw_sweep_heatmap`.

        Args:
            metric: ``test_acc``, ``test_loss``, ``train_loss``, ``gap``, ``acc_gap`` or a measure name.
            ax: a matplotlib Axes to draw into; default a new Figure.
            temperature_lines: overlay the iso-``lr/B`` lines.

        Returns:
            The matplotlib Axes (its figure is ``ax.figure``), as every result's ``.plot()`` returns.
        """
        from .report.figures import draw_sweep_heatmap

        b_axis, lr_axis, values = self.pivot(metric)
        return draw_sweep_heatmap(b_axis, lr_axis, values, metric, ax=ax, temperature_lines=temperature_lines)


def _fmt(v: Any) -> str:
    """A table cell: floats in the one number format (:func:`lrbs._util.fmt`), None blank, the rest as text."""
    if isinstance(v, float):
        return fmt(v)
    return "" if v is None else str(v)


# --------------------------------------------------------------------------------------------- grid
def grid_configs(
    base_config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]]
) -> list[tuple[dict, dict]]:
    """The cartesian product of ``grid`` over ``base_config``: a list of ``(params, normalized config)``.

    The order is that of :func:`itertools.product` over the grid keys in the order given (the last key varies
    fastest).

    Raises:
        ConfigError: a grid key that training does not accept (the message lists the valid ones), an empty
            list of values, or an invalid base config.
        LrbsTypeError: the grid is not a dict of lists.
    """
    from .train import TrainConfig, normalize_config

    if not isinstance(base_config, Mapping):
        raise LrbsTypeError(f"base_config={base_config!r} is not allowed: must be a dict of training options")
    if not isinstance(grid, Mapping):
        raise LrbsTypeError(f"grid={grid!r} is not allowed: must be a dict of option -> list of values")
    values: dict[str, list] = {}
    for k, v in grid.items():
        if k not in TrainConfig.names():
            raise ConfigError(
                f"grid key {k!r} is not a training option.{did_you_mean(k, TrainConfig.names())} "
                f"Valid options: {', '.join(sorted(TrainConfig.names()))}"
            )
        if isinstance(v, (str, bytes, Mapping)) or not isinstance(v, (list, tuple, np.ndarray, range)):
            raise LrbsTypeError(f"grid[{k!r}]={v!r} is not allowed: must be a list of values")
        if len(v) == 0:
            raise ConfigError(f"grid[{k!r}]=[] is not allowed: must be a non-empty list of values")
        values[k] = [x.item() if isinstance(x, np.generic) else x for x in v]
    normalize_config(dict(base_config))  # a bad base config fails here, once, with its own message
    out = []
    for combo in itertools.product(*values.values()):
        params = dict(zip(values, combo))
        out.append((params, normalize_config({**base_config, **params})))
    return out


# --------------------------------------------------------------------------------------------- ray plumbing
# --------------------------------------------------------------------------------------------- sweep
def sweep(
    base_config: Mapping[str, Any],
    grid: Mapping[str, Sequence[Any]],
    *,
    measure: Sequence[str] = (),
    backend: str = "local",
    store: Any = None,
    max_concurrency: int | None = None,
    ray_address: str | None = None,
    num_cpus_per_task: float = 1,
    num_gpus_per_task: float = 0,
    max_retries: int = 3,
    measure_samples: int = 1000,
    measure_seed: int = 0,
    connect_timeout: float = 30.0,
    progress: bool = True,
    _fault: dict[str, str] | None = None,
) -> SweepResult:
    """Train every cell of an LR x batch-size (x seed x ...) grid, skip what the store already holds.

    Each run is ``lrbs.train.train_config({**base_config, **cell})`` followed by the ``measure`` list on the
    trained model. The run's store config is ``{"train": <normalized config>, "measure": [...],
    "measure_samples": n, "measure_seed": s}`` (kind ``"sweep"``) and its key is :func:`lrbs.store.key_for`
    of it: a run found ``completed`` or ``diverged`` is not recomputed; a ``failed`` one is retried. Workers
    return plain dicts; only this process writes the store, each run in one transaction as soon as its result
    arrives.

    Args:
        base_config: training options shared by every run (see :data:`lrbs.train.CONFIG_DEFAULTS`).
        grid: option -> list of values, e.g. ``{"lr": [0.01, 0.1], "batch_size": [32, 256], "seed": [0, 1]}``.
        measure: names from :data:`MEASURES` computed after training.
        backend: ``"local"`` (in this process, or a process pool when ``max_concurrency > 1``) or ``"ray"``.
        store: a :class:`lrbs.store.Store`, a path to one, or None (nothing is persisted or skipped).
        max_concurrency: runs in flight at once (local default 1, Ray default all).
        ray_address: an existing cluster (``"host:port"``, ``"ray://host:port"``, ``"auto"``); default: use
            the running Ray instance or start a local one with ``ray.init(num_cpus=max_concurrency)``.
        num_cpus_per_task: CPUs reserved per Ray task; also ``torch.set_num_threads`` inside every run (the
            same thread count makes the local and Ray backends give bitwise equal results on CPU).
        num_gpus_per_task: GPUs reserved per Ray task (fractions allowed).
        max_retries: Ray re-runs a task whose worker process died this many times.
        measure_samples, measure_seed: the fixed training subset of the measures.
        connect_timeout: seconds to reach ``ray_address`` before giving up.
        progress: show a rich progress bar.

    Returns:
        A :class:`SweepResult` with one run per grid cell, in grid order (duplicate cells are run once).

    Raises:
        ConfigError: bad grid or options (before anything runs); DependencyError: Ray or a measure's module
        missing; LrbsError: the Ray cluster cannot be reached (nothing is written).
    """
    cells = grid_configs(base_config, grid)
    measure = _check_measures(measure)
    check_choice("backend", backend, BACKENDS)
    if max_concurrency is not None:
        max_concurrency = check_int("max_concurrency", max_concurrency, low=1)
    threads = check_number("num_cpus_per_task", num_cpus_per_task, low=0.0)
    check_number("num_gpus_per_task", num_gpus_per_task, low=0.0, low_inclusive=True)
    max_retries = check_int("max_retries", max_retries, low=0)
    measure_samples = check_int("measure_samples", measure_samples, low=1)
    connect_timeout = check_number("connect_timeout", connect_timeout, low=0.0)
    _check_places(backend, ray_address, store)
    tasks = _tasks(cells, measure, measure_samples, measure_seed, threads, _fault)
    t0 = time.perf_counter()
    where = (backend, ray_address, max_concurrency, connect_timeout, threads, num_gpus_per_task, max_retries)
    results, db_path = _execute(tasks, where, store, progress)
    settings = {
        "backend": backend,
        "measure": list(measure),
        "measure_samples": measure_samples,
        "measure_seed": measure_seed,
        "num_cpus_per_task": num_cpus_per_task,
        "num_gpus_per_task": num_gpus_per_task,
        "max_concurrency": max_concurrency,
    }
    return _result(tasks, results, grid, base_config, settings, db_path, t0)


def _execute(tasks: list[dict], where: tuple, store: Any, progress: bool) -> tuple[dict, Any]:
    """Run the tasks on the executor that ``where`` (:func:`_executor`'s arguments) names; a Ray instance this
    sweep started is shut down afterwards, also when a run raises."""
    execute, started_ray = _executor(*where)
    try:
        return _run_tasks(tasks, execute, store, progress)
    finally:
        if started_ray is not None:
            started_ray.shutdown()


def _result(
    tasks: list[dict],
    results: dict,
    grid: Mapping,
    base_config: Mapping,
    settings: dict,
    db_path: Any,
    t0: float,
) -> SweepResult:
    """The runs in grid order; ``settings`` (the sweep's options) gain the store, the wall time and the cache hits."""
    settings = {
        **settings,
        "store": db_path,
        "wall_time": time.perf_counter() - t0,
        "num_cached": sum(r.cached for r in results.values()),
    }
    runs = tuple(results[t["key"]] for t in tasks)
    return SweepResult(runs, {k: list(v) for k, v in grid.items()}, dict(base_config), settings)


def _executor(
    backend: str,
    ray_address: str | None,
    max_concurrency: int | None,
    connect_timeout: float,
    cpus: float,
    gpus: float,
    retries: int,
) -> tuple[Callable, Any]:
    """``(execute(todo, collect, start), ray)``: the backend's task runner, and the Ray module when this call
    started Ray (the caller shuts it down), else None. Ray is connected here, before any store is opened."""
    if backend != "ray":
        return functools.partial(_execute_local, workers=max_concurrency or 1), None
    ray, started = connect_ray(ray_address, max_concurrency, connect_timeout)
    execute = functools.partial(
        _execute_ray, ray, max_concurrency=max_concurrency, cpus=cpus, gpus=gpus, retries=retries
    )
    return execute, ray if started else None


def _check_places(backend: str, ray_address: Any, store: Any) -> None:
    """Reject a ``ray_address`` without the Ray backend and a ``store`` that is no Store or path."""
    from .store import Store

    if ray_address is not None and (not isinstance(ray_address, str) or backend != "ray"):
        raise ConfigError(f"ray_address={ray_address!r} is not allowed: give a str, with backend='ray'")
    if store is not None and not isinstance(store, (Store, str, os.PathLike)):
        raise LrbsTypeError(f"store={store!r} is not allowed: must be a Store, a path or None")


def _tasks(
    cells: list[tuple[dict, dict]],
    measure: tuple[str, ...],
    measure_samples: int,
    measure_seed: int,
    threads: float,
    fault: dict[str, str] | None,
) -> list[dict[str, Any]]:
    """One task per distinct cell, in grid order; its key is :func:`lrbs.store.key_for` of its store config."""
    from .store import key_for

    tasks, seen = [], set()
    for params, cfg in cells:
        store_cfg = {
            "train": cfg,
            "measure": list(measure),
            "measure_samples": measure_samples,
            "measure_seed": measure_seed,
        }
        key = key_for(store_cfg)  # also rejects values with no JSON form, before anything runs
        if key in seen:
            continue
        seen.add(key)
        tasks.append(
            {
                "key": key,
                "params": params,
                "config": cfg,
                "store_config": store_cfg,
                "measure": measure,
                "measure_samples": measure_samples,
                "measure_seed": measure_seed,
                "threads": max(1, int(threads)),
                "fault": fault,
            }
        )
    return tasks


def _run_tasks(
    tasks: list[dict], execute: Callable, store: Any, progress: bool
) -> tuple[dict[str, SweepRun], str | None]:
    """Serve what the store holds, run the rest with ``execute(todo, collect, start)``; ``({key: run}, store
    path)``. Each result is written to the store as it arrives (:func:`_finish`)."""
    from .store import Store

    own_store = isinstance(store, (str, os.PathLike))
    db = Store(store) if own_store else store
    results: dict[str, SweepRun] = {}
    records: dict[str, Any] = {}  # key -> its lrbs.store.Run, from submission to result

    def start(task: dict) -> None:
        if db is not None:
            records[task["key"]] = db.run(task["store_config"], "sweep").start()

    try:
        todo = []
        for t in tasks:
            rec = db.find(t["store_config"], kind="sweep") if db is not None else None
            if rec is not None:
                results[t["key"]] = _run_from_record(t, rec)
            else:
                todo.append(t)
        done = len(tasks) - len(todo)
        last = {"last": f"{done} from the store" if done else ""}
        with _progress(
            "sweep", len(tasks), enabled=progress, completed=done, transient=False, fields=last
        ) as bar:

            def collect(task: dict, out: dict) -> None:
                run = _finish(records.pop(task["key"], None), task, out)
                results[task["key"]] = run
                if bar.enabled:
                    bar.advance(last=_last(run))

            execute(todo, collect, start)
    finally:
        for record in records.values():  # in flight when the sweep stopped: never left "running"
            if record.running:
                record.fail("the sweep stopped before this run's result arrived")
        if own_store and db is not None:
            db.close()
    return results, None if db is None else str(db.path)


def _last(run: SweepRun) -> str:
    """The progress bar's text for a finished run: its grid values, status and test accuracy."""
    p = ", ".join(f"{k}={v}" for k, v in run.params.items())
    acc = run.final.get("test_acc")
    return f"{p}: {run.status}" + (f" test_acc={acc:.3f}" if isinstance(acc, float) else "")


def _finish(record: Any, task: dict, out: dict) -> SweepRun:
    """Write one worker result to its store run (``record``, a :class:`lrbs.store.Run`, or None: no store) in
    one transaction and build its row."""
    final = dict(out.get("final") or {})
    if "test_loss" in final and "train_loss" in final:
        final["gap"] = _diff(final["test_loss"], final["train_loss"])
    if "test_acc" in final and "train_acc" in final:
        final["acc_gap"] = _diff(final["train_acc"], final["test_acc"])
    status = out.get("status", "failed")
    run = SweepRun(
        task["key"],
        task["params"],
        task["config"],
        status,
        final,
        dict(out.get("measures") or {}),
        out.get("error"),
        out.get("wall_time"),
        False,
    )
    if record is not None:
        result = {
            "params": task["params"],
            "status": status,
            "final": final,
            "measures": run.measures,
            "measure_settings": out.get("measure_settings"),
            "evals": out.get("evals", []),
            "wall_time": out.get("wall_time"),
            "worker": {"pid": out.get("pid"), "host": out.get("host")},
        }
        hist = out.get("history") or {}
        rows = []
        for name, col in (("train_loss", "loss"), ("lr", "lr"), ("batch_size", "batch_size")):
            rows += [(int(s), name, float(v)) for s, v in zip(hist.get("step", []), hist.get(col, []))]
        for e in out.get("evals", []):
            rows += [
                (int(e["step"]), k, float(v))
                for k, v in e.items()
                if k != "step" and isinstance(v, (int, float)) and v is not None
            ]
        if status == "failed":
            record.finish("failed", result, rows, error=out.get("error") or "failed")
        else:
            record.finish(status, result, rows)
    return run


def _diff(a: Any, b: Any) -> float | None:
    if a is None or b is None:
        return None
    return float(a) - float(b)


def _run_from_record(task: dict, rec: Any) -> SweepRun:
    res = rec.result or {}
    return SweepRun(
        task["key"],
        task["params"],
        task["config"],
        rec.status,
        dict(res.get("final") or {}),
        dict(res.get("measures") or {}),
        rec.error,
        res.get("wall_time"),
        True,
    )


def _failed_out(e: BaseException) -> dict[str, Any]:
    """The result of a run that never came back from its worker (the worker or the pool died)."""
    return {"status": "failed", "error": f"{type(e).__name__}: {e}"}


def _execute_local(todo: list[dict], collect: Callable, start: Callable, workers: int) -> None:
    """Run the tasks here (one worker) or in the process-wide pool of warm workers (:func:`lrbs.pool.shared_pool`,
    started once and reused by later sweeps), at most ``workers`` in flight; results are recorded here, in the
    order they finish. A worker that dies fails only its own run (``status="failed"``)."""
    if workers == 1 or len(todo) <= 1:
        for t in todo:
            start(t)
            collect(t, _run_task(t))
        return
    from .pool import shared_pool

    pool = shared_pool(workers).start()
    finished: queue.Queue = queue.Queue()
    waiting, in_flight = list(todo), 0

    def submit_more() -> None:
        nonlocal in_flight
        while waiting and in_flight < workers:
            t = waiting.pop(0)
            start(t)
            try:
                job = pool.submit(_run_task, t, threads=None, describe=f"sweep run {t['params']}")
            except LrbsError as e:  # the pool stopped (its workers died starting: a script without the guard)
                collect(t, _failed_out(e))
                continue
            job.add_done_callback(lambda j, t=t: finished.put((t, j)))
            in_flight += 1

    submit_more()
    while in_flight:
        t, job = finished.get()
        in_flight -= 1
        submit_more()  # the freed worker gets its next run before this result is written (~30 ms in the store)
        try:
            out = job.result()
        except Exception as e:  # a dead worker process (WorkerDied)
            out = _failed_out(e)
        collect(t, out)


def _execute_ray(
    ray: Any,
    todo: list[dict],
    collect: Callable,
    start: Callable,
    max_concurrency: int | None,
    cpus: float,
    gpus: float,
    retries: int,
) -> None:
    remote = ray.remote(_run_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=retries)
    limit = max_concurrency or len(todo) or 1
    queue, pending = list(todo), {}
    while queue or pending:
        while queue and len(pending) < limit:
            t = queue.pop(0)
            start(t)
            pending[remote.remote(t)] = t
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            t = pending.pop(ref)
            try:
                out = ray.get(ref)
            except Exception as e:  # the worker died more than max_retries times
                out = _failed_out(e)
            collect(t, out)


# --------------------------------------------------------------------------------------------- landscape
# shards
def _grid_points(theta: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, ab: np.ndarray) -> torch.Tensor:
    """``theta + alpha * d1 + beta * d2`` for each row ``(alpha, beta)`` of ``ab``, in the centre's dtype."""
    a = torch.as_tensor(ab[:, 0], dtype=theta.dtype)[:, None]
    b = torch.as_tensor(ab[:, 1], dtype=theta.dtype)[:, None]
    return theta[None] + a * d1[None] + b * d2[None]


def _eval_shard(
    obj: Any,
    theta: torch.Tensor,
    d1: torch.Tensor,
    d2: torch.Tensor,
    ab: np.ndarray,
    method: str,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    if threads is not None:
        torch.set_num_threads(threads)
    return obj.loss_many(_grid_points(theta, d1, d2, ab), method=method)


def evaluate_grid(
    obj: Any,
    d1: torch.Tensor,
    d2: torch.Tensor,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    backend: str = "local",
    shards: int = 4,
    method: str = "sequential",
    ray_address: str | None = None,
    num_cpus_per_task: float = 1,
    connect_timeout: float = 30.0,
) -> dict[str, Any]:
    """Loss and accuracy on the 2-D slice ``theta* + alpha * d1 + beta * d2`` (Li et al. 2018), in shards.

    The ``len(alphas) * len(betas)`` points are split into ``shards`` contiguous pieces; each piece is one
    :meth:`lrbs.objective.Objective.loss_many` call, either here (``backend="local"``) or in a Ray task that
    receives the objective, the flat centre and the two directions (shared once through the object store) and
    returns arrays; the driver stitches them. The values equal a single local ``loss_many`` call on the same
    points exactly (the points are built by the same expression, ``method`` is fixed).

    Args:
        obj: an :class:`~lrbs.objective.Objective` (or a ``(model, data)`` pair); its centre is
            ``obj.theta()``.
        d1, d2: flat directions ``(n,)``.
        alphas, betas: grid coordinates; the result is indexed ``[i, j] = (alphas[i], betas[j])``.
        backend: ``"local"`` or ``"ray"``.
        shards: number of pieces.
        method: ``loss_many``'s method (``"sequential"`` or ``"batched"``), fixed so that shards agree.

    Returns:
        ``{"loss": (A, B), "accuracy": (A, B), "alphas", "betas", "settings"}``.

    Raises:
        ShapeError / ConfigError: directions of the wrong size, empty grids, bad backend; DependencyError: no
        Ray.
    """
    check_choice("backend", backend, BACKENDS)
    check_choice("method", method, ("sequential", "batched"))
    shards = check_int("shards", shards, low=1)
    obj, theta, dirs, alphas, betas = _grid_inputs(obj, d1, d2, alphas, betas)
    ab = np.stack(np.meshgrid(alphas, betas, indexing="ij"), -1).reshape(-1, 2)
    pieces = [p for p in np.array_split(ab, min(shards, len(ab))) if len(p)]
    if backend == "local":
        outs = [_eval_shard(obj, theta, dirs[0], dirs[1], p, method) for p in pieces]
    else:
        timeout = check_number("connect_timeout", connect_timeout, low=0.0)
        outs = _ray_shards(obj, theta, dirs, pieces, method, ray_address, num_cpus_per_task, timeout)
    shape = (len(alphas), len(betas))
    loss = np.concatenate([o["loss"] for o in outs]).reshape(shape)
    acc = np.concatenate([o["accuracy"] for o in outs]).reshape(shape)
    settings = {**obj.settings(), "backend": backend, "shards": len(pieces), "method": method}
    return {"loss": loss, "accuracy": acc, "alphas": alphas, "betas": betas, "settings": settings}


def _grid_inputs(obj: Any, d1: Any, d2: Any, alphas: Any, betas: Any) -> tuple:
    """``(objective, theta, [d1, d2], alphas, betas)`` checked: an Objective (or a ``(model, data)`` pair),
    directions of the flat parameter shape in theta's dtype, non-empty float64 coordinate vectors."""
    from .errors import ShapeError
    from .objective import Objective

    if isinstance(obj, tuple) and len(obj) == 2:
        obj = Objective(obj[0], None, obj[1])
    if not isinstance(obj, Objective):
        raise LrbsTypeError(
            f"obj={type(obj).__name__} is not allowed: must be an Objective or a (model, data) pair"
        )
    theta = obj.theta()
    dirs = []
    for name, d in (("d1", d1), ("d2", d2)):
        d = torch.as_tensor(d)
        if d.shape != theta.shape:
            raise ShapeError(
                f"{name} has shape {tuple(d.shape)}: must be ({obj.num_params},), the objective's "
                "flat parameter layout"
            )
        dirs.append(d.to(theta.dtype))
    alphas = np.asarray(alphas, dtype=np.float64).reshape(-1)
    betas = np.asarray(betas, dtype=np.float64).reshape(-1)
    if len(alphas) == 0 or len(betas) == 0:
        raise ConfigError(f"alphas and betas must be non-empty (got {len(alphas)} and {len(betas)} values)")
    return obj, theta, dirs, alphas, betas


def _ray_shards(
    obj: Any,
    theta: torch.Tensor,
    dirs: list[torch.Tensor],
    pieces: list[np.ndarray],
    method: str,
    ray_address: str | None,
    num_cpus_per_task: float,
    timeout: float,
) -> list[dict[str, np.ndarray]]:
    """The shards as Ray tasks; the objective, centre and directions go through the object store once."""
    ray, started = connect_ray(ray_address, None, timeout)
    try:
        shipped = _shippable(obj)
        refs = [ray.put(x) for x in (shipped, theta, dirs[0], dirs[1])]
        task = ray.remote(_eval_shard).options(num_cpus=num_cpus_per_task)
        threads = max(1, int(num_cpus_per_task))
        return ray.get([task.remote(*refs, p, method, threads) for p in pieces])
    finally:
        if started:
            ray.shutdown()


def landscape_2d_ray(
    obj: Any,
    d1: torch.Tensor,
    d2: torch.Tensor,
    alphas: Sequence[float],
    betas: Sequence[float],
    *,
    shards: int = 4,
    **kw: Any,
) -> dict[str, Any]:
    """:func:`evaluate_grid` with ``backend="ray"``: a 2-D loss landscape evaluated as Ray shards."""
    return evaluate_grid(obj, d1, d2, alphas, betas, backend="ray", shards=shards, **kw)


def _shippable(obj: Any) -> Any:
    """A shallow copy of the objective without its cached autograd graph (which cannot be pickled)."""
    import copy

    other = copy.copy(obj)
    other.clear_cache()
    return other
