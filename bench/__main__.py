"""``python -m bench [NAME ...] [--quick] [--threads N] [--device cpu|cuda]``: run benchmarks, print one table.

Names are the files ``bench/bench_<name>.py``; with no name, all of them run. ``--device cuda`` runs every
benchmark on the GPU with the peer tools on the same GPU; a benchmark reads the device from
:func:`bench.common.device`. A benchmark whose ``main`` does not take ``device`` runs on the CPU only, and with
``--device cuda`` it is reported as skipped rather than silently measured on the CPU.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from bench.common import DeviceError, peak_gflops, set_device


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(p.stem[len("bench_") :] for p in here.glob("bench_*.py"))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def machine(dev: torch.device, threads: int) -> str:
    """One header line: date, processor, cores, torch, threads, device and the measured peak fp32 rate."""
    where = "cpu" if dev.type == "cpu" else f"{dev} ({torch.cuda.get_device_name(dev)})"
    return (
        f"# {date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
        f"torch {torch.__version__} | {threads} threads | device {where} | "
        f"peak fp32 matmul {peak_gflops():.1f} GFLOP/s"
    )


def run_one(name: str, quick: bool, dev: torch.device) -> list[dict]:
    """Rows of one benchmark on ``dev`` (or a single 'skipped' row when it cannot run there)."""
    main = importlib.import_module(f"bench.bench_{name}").main
    if "device" in inspect.signature(main).parameters:
        return main(quick=quick, device=dev)
    if dev.type != "cpu":
        return [{"benchmark": name, "case": "-", "note": f"skipped: bench_{name}.main runs on the CPU only"}]
    return main(quick=quick)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]: ours and the peers on it")
    args = ap.parse_args(argv)
    try:
        dev = set_device(args.device)
    except DeviceError as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(available())}", file=sys.stderr)
        return 2
    print(machine(dev, args.threads))
    cols = ["benchmark", "case", "ours_s", "peer", "peer_s", "ratio", "gflop", "pct_peak", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in names:
        for r in run_one(name, args.quick, dev):
            print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
