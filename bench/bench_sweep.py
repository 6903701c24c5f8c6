"""Sweep scale-out: 4 equal runs on 2 workers against 1 worker (local process pool, Ray), 1 torch thread each.

The peer of each parallel case is the same 4 runs one after the other in this process (``max_concurrency=1``);
``ratio = ours / sequential`` so the speed-up is ``1 / ratio`` (>= 1.7x expected on 2 cores). The local pool is
:func:`lrbs.pool.shared_pool`: its workers start once per process and later sweeps reuse them. The first pool row
includes starting them (fork server + ``import torch``, what a user waits for once); the "warm" row is the best of
two later sweeps interleaved with two sequential ones (best of two too). Ray's cluster start (``ray.init``) is
outside the timed region; its workers are warmed up by one small task first.
"""

from __future__ import annotations

import time

from bench.common import peak_gflops, row
from lrbs.sweep import sweep

BASE = {"model": "mlp", "dataset": "mnist1d", "lr": 0.05, "batch_size": 64, "eval_every": 10**9}
GRID = {"seed": [0, 1, 2, 3]}  # 4 equal runs (distinct keys)


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


BASE_STEPS: dict = {}
