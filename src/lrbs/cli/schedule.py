"""``lrbs schedule SPEC``: preview a schedule before training: its values at the key steps, and a plot."""

from __future__ import annotations

import argparse

from ..errors import check_int


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``schedule`` subcommand."""
    p = subparsers.add_parser(
        "schedule",
        help="print a schedule's values at its key steps (start, phase boundaries, end)",
        description=(
            "Preview an LR, momentum or batch-size schedule. SPEC is a constructor call such as "
            "'one_cycle(peak=0.1, total_steps=1000)', 'warmup(cosine(start=0.1, steps=900), steps=100)' "
            "or '0.5 * cosine(start=0.1, steps=100)'."
        ),
    )
    p.add_argument("spec", help='the schedule, e.g. "one_cycle(peak=0.1, total_steps=1000)"')
    p.add_argument(
        "--steps", type=int, default=None, help="number of steps to show (default: the schedule's end)"
    )
    p.add_argument(
        "--plot", metavar="PATH", default=None, help="also save a plot of the schedule (PNG, SVG, PDF)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse the spec, print the key-step table, optionally save the plot; return the exit status."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..errors import ConfigError
    from ..schedules import parse

    schedule = parse(args.spec)
    n = schedule.horizon() if args.steps is None else check_int("--steps", args.steps, low=1)
    values = schedule.values(n)
    total = schedule.total_steps

    table = Table()
    table.add_column("step", justify="right")
    table.add_column("batch size" if schedule.integer else "value", justify="right")
    table.add_column("note")
    for t in schedule.key_steps(n):
        note = "start" if t == 0 else ""
        if total is not None and t >= total:
            note = "end (holds after)"
        table.add_row(str(t), str(values[t]) if schedule.integer else f"{values[t]:.6g}", note)
    console = Console()
    console.print(Text(repr(schedule)), soft_wrap=True)  # Text: a spec's [..] must not be read as markup
    console.print(table)
    console.print(
        f"steps shown: {n}  total_steps: {total if total is not None else 'none (infinite)'}  "
        f"min: {values.min():.6g}  max: {values.max():.6g}"
    )
    if args.plot:
        ax = schedule.plot(n)
        try:
            ax.figure.savefig(args.plot, dpi=120)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--plot={args.plot!r} cannot be written: {exc}") from None
        console.print(f"plot written to {args.plot}")
    return 0
