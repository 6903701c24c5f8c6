"""``python -m bench [NAME ...] [--quick]``: run named benchmarks and print one table.

Names are the files ``bench/bench_<name>.py``; with no name, all of them run.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from datetime import date
from pathlib import Path

import torch

from bench.common import peak_gflops


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(p.stem[len("bench_") :] for p in here.glob("bench_*.py"))


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default all): {', '.join(available())}")
    ap.add_argument("--quick", action="store_true", help="smaller workloads")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = args.names or available()
    unknown = [n for n in names if n not in available()]
    if unknown:
        print(f"unknown benchmark {unknown[0]!r}; known: {', '.join(available())}", file=sys.stderr)
        return 2
    print(
        f"# {date.today()} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | "
        f"torch {torch.__version__} | {args.threads} threads | peak fp32 matmul {peak_gflops():.1f} GFLOP/s"
    )
    cols = ["benchmark", "case", "ours_s", "peer", "peer_s", "ratio", "gflop", "pct_peak", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for name in names:
        mod = importlib.import_module(f"bench.bench_{name}")
        for r in mod.main(quick=args.quick):
            print("| " + " | ".join(fmt(r.get(c)) for c in cols) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
