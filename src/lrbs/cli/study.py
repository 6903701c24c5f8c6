"""``lrbs study``: reproduce the seed's claims on the embedded MNIST-1D data and write an HTML report."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="reproduce every claim of the seed on MNIST-1D -> DIR/report.html")
    p.add_argument("--quick", action="store_true", help="reduced budget (about 1-1.5 minutes on 2 cores)")
    p.add_argument("--out", default="study", help="output directory (report.html, lab.sqlite, artifacts)")
    p.add_argument("--papers", default=None, help="comma-separated subset of the paper modules")
    p.add_argument("--backend", default="local", choices=["local", "ray"])
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 1 quick, 3 full)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per run (default 1; small models)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="training runs and measurements in parallel: worker processes (Ray: CPUs); default the number of "
        "CPUs; 1 runs everything in this process (same numbers either way)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..papers import WORKER_PRELOAD
    from ..pool import available_cpus, start_fork_server

    if args.backend == "local" and (args.jobs or available_cpus()) > 1:
        start_fork_server(WORKER_PRELOAD)  # the workers' imports run while this process does its own
    from rich.console import Console
    from rich.table import Table

    from ..study import parse_papers, run_study

    console = Console()
    res = run_study(
        args.out,
        quick=args.quick,
        papers=parse_papers(args.papers),
        backend=args.backend,
        seeds=args.seeds,
        threads=args.threads,
        jobs=args.jobs,
        progress=console.is_terminal,
        log=lambda m: console.print(m, markup=False),
    )
    table = Table(title=f"lrbs study ({res.seconds:.0f}s): {res.report}")
    for c in ("claim", "verdict"):
        table.add_column(c)
    for r in res.papers.values():
        for f in r.findings:
            table.add_row(f.claim, f.verdict)
    console.print(table)
    console.print(f"report: {res.report}\nstore:  {res.store}")
    return 0
