"""Sweep scale-out: 4 equal runs on 2 workers against 1 worker (local process pool, Ray), 1 torch thread each.

The peer of each parallel case is the same 4 runs one after the other in this process (``max_concurrency=1``);
``ratio = ours / sequential`` so the speed-up is ``1 / ratio`` (>= 1.7x expected on 2 cores). The local pool is
:func:`lrbs.pool.shared_pool`: its workers start once per process and later sweeps reuse them. The first pool row
includes starting them (fork server + ``import torch``, what a user waits for once); the "warm" row is the best of
two later sweeps interleaved with two sequential ones (best of two too). Ray's cluster start (``ray.init``) is
outside the timed region; its workers are warmed up by one small task first.

The last local row (not with ``--quick``) is what a user types: ``lrbs sweep examples/sweep.toml`` (the README's
example, 32 runs) in a fresh process each, ``--max-concurrency 2`` against the default of one run at a time, two
pairs in ABBA order, each with its own new store; its time is the whole command's (imports and the pool's start
included).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import peak_gflops, row
from lrbs.sweep import sweep

BASE = {"model": "mlp", "dataset": "mnist1d", "lr": 0.05, "batch_size": 64, "eval_every": 10**9}
GRID = {"seed": [0, 1, 2, 3]}  # 4 equal runs (distinct keys)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sweep.toml"


def _time(**kw) -> tuple[float, list]:
    t0 = time.perf_counter()
    res = sweep(BASE_STEPS, GRID, progress=False, num_cpus_per_task=1, **kw)
    wall = time.perf_counter() - t0
    assert all(r.status == "completed" for r in res.runs), [r.error for r in res.runs]
    return wall, [r.final["test_loss"] for r in res.runs]


def main(quick: bool = False) -> list[dict]:
    global BASE_STEPS
    steps = 400 if quick else 1500
    BASE_STEPS = {**BASE, "steps": steps}
    case = f"4 x mlp mnist1d sgd b64 x{steps}, 1 thread/run (peak fp32 {peak_gflops():.0f} GFLOP/s)"
    rows = []
    from lrbs.pool import shutdown_shared_pool

    shutdown_shared_pool()  # the first pool sweep below starts its workers
    t_seq, ref = _time(max_concurrency=1)
    rows.append(row("sweep", f"{case}: local sequential", t_seq, note="1 worker (the reference)"))
    t_pool, vals = _time(max_concurrency=2)
    rows.append(
        row(
            "sweep",
            f"{case}: local 2 processes, first call (starts the workers)",
            t_pool,
            "local sequential",
            t_seq,
            note=f"speed-up {t_seq / t_pool:.2f}x; results equal: {vals == ref}",
        )
    )
    seq, warm = [t_seq], []
    for _ in range(2):  # interleaved
        warm.append(_time(max_concurrency=2)[0])
        seq.append(_time(max_concurrency=1)[0])
    rows.append(
        row(
            "sweep",
            f"{case}: local 2 processes, warm (workers reused)",
            min(warm),
            "local sequential",
            min(seq),
            note=f"best of 2 vs best of 3; speed-up {min(seq) / min(warm):.2f}x",
        )
    )
    if not quick:
        rows.append(_cli_row())
    try:
        import ray
    except ImportError:
        return rows
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        sweep({**BASE, "steps": 1}, {"seed": [10, 11]}, backend="ray", progress=False)  # warm the 2 workers
        t_ray2, vals2 = _time(backend="ray")
        rows.append(
            row(
                "sweep",
                f"{case}: Ray 2 CPUs",
                t_ray2,
                "local sequential",
                t_seq,
                note=f"speed-up {t_seq / t_ray2:.2f}x; results equal: {vals2 == ref}",
            )
        )
        if not quick:
            t_ray1, _ = _time(backend="ray", max_concurrency=1)
            rows.append(
                row(
                    "sweep",
                    f"{case}: Ray 2 CPUs vs Ray 1 task at a time",
                    t_ray2,
                    "Ray 1 at a time",
                    t_ray1,
                    note=f"speed-up {t_ray1 / t_ray2:.2f}x",
                )
            )
    finally:
        ray.shutdown()
    return rows


def _cli_time(concurrency: int) -> float:
    """Wall time of ``lrbs sweep examples/sweep.toml --max-concurrency N`` in a fresh process, new store."""
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "lrbs", "sweep", str(EXAMPLE), "--store", f"{d}/sweep.sqlite"]
        t0 = time.perf_counter()
        done = subprocess.run(
            [*cmd, "--max-concurrency", str(concurrency)], capture_output=True, text=True, cwd=d
        )
        wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"lrbs sweep failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return wall


def _cli_row(pairs: int = 2) -> dict:
    """The README's sweep from the command line, 2 processes against 1, ``pairs`` pairs in ABBA order."""
    two, one = [], []
    for p in range(pairs):
        for c in (2, 1) if p % 2 == 0 else (1, 2):
            (two if c == 2 else one).append(_cli_time(c))
    ratios = [a / b for a, b in zip(two, one)]
    return row(
        "sweep",
        f"`lrbs sweep examples/sweep.toml` (32 runs), fresh process each (peak fp32 {peak_gflops():.0f} GFLOP/s)",
        statistics.median(two),
        "--max-concurrency 1 (the default)",
        statistics.median(one),
        note=f"{pairs} ABBA pairs, ratios {', '.join(f'{r:.2f}' for r in ratios)}; the whole command each",
    )


BASE_STEPS: dict = {}
