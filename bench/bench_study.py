"""The study on every core: ``lrbs study --jobs N`` (N = the CPUs) against ``--jobs 1``, fresh stores, interleaved.

Every run is a fresh ``python -m lrbs study`` process writing to a fresh output directory (what a user waits for,
imports and worker start included). The runs alternate ``--jobs 1`` / ``--jobs N`` in ABBA order, the peak fp32
matmul rate (one thread, as every study run uses) is measured before each run, and each ``--jobs N`` store is
checked to hold the same paper numbers as the ``--jobs 1`` one. ``ratio = jobs N / jobs 1`` wall time (target
<= 0.6 on 2 cores). The note gives the load average before each run and the mean number of runs in flight (stored
per-run times / wall time): on a machine shared with other work each run of ``--jobs N`` takes longer and the ratio
says little, while the runs in flight still show whether the workers were kept busy. ``--quick`` (or ``python -m bench study --quick``): the quick study only, once each; the default
run adds the default study (8-15 min per run on 2 cores), once each.

    python -m bench.bench_study [--default] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import peak_gflops, row


def _peak_one_thread() -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return peak_gflops.__wrapped__(n=1024, repeat=5)
    finally:
        torch.set_num_threads(before)


def _numbers(out: Path) -> dict:
    con = sqlite3.connect(out / "lab.sqlite")
    rows = con.execute("select config, result from runs where kind = 'paper'").fetchall()
    con.close()
    return {json.loads(c)["paper"]: json.loads(r) for c, r in rows}


def _in_flight(out: Path, wall: float) -> float:
    """Sum of the stored per-run times (training wall time, measurement seconds) over the study's wall time: the
    mean number of runs in flight. It shows how well the pool keeps its workers busy even when other processes
    take the cores (each run then takes longer, and the wall time says little)."""
    con = sqlite3.connect(out / "lab.sqlite")
    rows = con.execute("select result from runs where kind in ('train', 'measure')").fetchall()
    con.close()
    total = 0.0
    for (res,) in rows:
        r = json.loads(res or "{}")
        total += r.get("wall_time") or r.get("seconds") or 0.0
    return total / wall


def _run(quick: bool, jobs: int, out: Path) -> float:
    argv = [sys.executable, "-m", "lrbs", "study", "--jobs", str(jobs), "--out", str(out)]
    if quick:
        argv.append("--quick")
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return wall


def compare(quick: bool, reps: int = 1, jobs: int | None = None) -> list[dict]:
    """``reps`` pairs of runs, ABBA-interleaved; one row per pair plus the best-of ratio."""
    jobs = jobs or len(os.sched_getaffinity(0))
    name = "quick study" if quick else "default study"
    rows, t1s, tns = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(reps):
            order = (1, jobs) if r % 2 == 0 else (jobs, 1)
            times, peaks, outs, loads = {}, {}, {}, {}
            for j in order:
                peaks[j] = _peak_one_thread()
                loads[j] = os.getloadavg()[0]
                outs[j] = Path(tmp) / f"{r}_{j}"
                times[j] = _run(quick, j, outs[j])
            same = _numbers(outs[1]) == _numbers(outs[jobs])
            busy = {j: _in_flight(outs[j], times[j]) for j in (1, jobs)}
            t1s.append(times[1])
            tns.append(times[jobs])
            rows.append(
                row(
                    "study",
                    f"{name}, --jobs {jobs} (pair {r + 1}, order {order[0]},{order[1]})",
                    times[jobs],
                    "--jobs 1",
                    times[1],
                    note=f"--jobs 1 / --jobs {jobs}: peak 1-thread fp32 {peaks[1]:.0f} / {peaks[jobs]:.0f} GFLOP/s, "
                    f"load average {loads[1]:.1f} / {loads[jobs]:.1f} before the run, runs in flight "
                    f"{busy[1]:.2f} / {busy[jobs]:.2f}; numbers equal: {same}",
                )
            )
    if reps > 1:
        rows.append(row("study", f"{name}, --jobs {jobs}: best of {reps}", min(tns), "--jobs 1", min(t1s)))
    return rows


def main(quick: bool = False) -> list[dict]:
    rows = compare(True, reps=1 if quick else 2)
    if not quick:
        rows += compare(False, reps=1)
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.bench_study")
    ap.add_argument("--default", action="store_true", help="the default study instead of the quick one")
    ap.add_argument("--reps", type=int, default=2, help="pairs of runs (ABBA order)")
    ap.add_argument("--jobs", type=int, default=None, help="the parallel run's --jobs (default: the CPUs)")
    args = ap.parse_args()
    for r in compare(not args.default, args.reps, args.jobs):
        print(f"{r['case']}: {r['ours_s']:.1f} s vs {r['peer_s']:.1f} s, ratio {r['ratio']:.2f}; {r['note']}")
