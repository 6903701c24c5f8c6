"""``lrbs find-lr``: the LR range test on a zoo model or the user's own (``--model pkg.module:factory``, ``--data
pkg.module:factory``), with the suggestions and the one it recommends."""

from __future__ import annotations

import argparse
from typing import Any

from .._util import fmt
from ._common import add_zoo_data_options

#: The flags recorded in the run's config under the same name.
_CONFIG_FLAGS = (
    "optimizer",
    "momentum",
    "weight_decay",
    "num_iter",
    "start_lr",
    "end_lr",
    "mode",
    "batch_size",
    "repeats",
    "seed",
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("find-lr", help="LR range test: suggestions, whether they agree, and a recommendation")
    add_zoo_data_options(p, model_default="cnn1d")
    p.add_argument("--optimizer", default="sgd", help="sgd, adam, adamw, sam, asam, lars, lamb")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (Adam's beta1)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--num-iter", type=int, default=100, help="iterations of the sweep (>= 10)")
    p.add_argument("--start-lr", type=float, default=1e-7)
    p.add_argument("--end-lr", type=float, default=10.0)
    p.add_argument("--mode", default="exp", help="exp (geometric) or linear")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--repeats", type=int, default=1, help="sweeps over different data orders (median + spread)"
    )
    p.add_argument("--plot", default=None, help="write the loss-vs-lr figure here (png, svg, pdf)")
    p.add_argument("--store", default=None, help="SQLite store to record the test in")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..errors import ConfigError
    from ..optim import get_optimizer
    from ..range_test import lr_range_test
    from ._common import batch_size_for, load_data, load_model, recorded_run

    console = Console()
    data = load_data(args)
    model = load_model(args, data, seed=args.seed)
    opt = get_optimizer(
        args.optimizer,
        model.parameters(),
        lr=args.start_lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
    )
    config = {"command": "find-lr", "model": args.model, "model_opts": args.model_opts or {}}
    config["dataset"] = data.describe()
    config.update({name: getattr(args, name) for name in _CONFIG_FLAGS})
    with recorded_run(args.store, config, "range_test") as record:
        res = lr_range_test(
            model,
            opt,
            data=data.fit_data,
            start_lr=args.start_lr,
            end_lr=args.end_lr,
            num_iter=args.num_iter,
            mode=args.mode,
            batch_size=batch_size_for(data.fit_data, args.batch_size),
            repeats=args.repeats,
            seed=args.seed,
        )
        record.finish(res.to_dict(), _metric_rows(res))
    console.print(
        f"lrbs find-lr: {args.model} on {data.name}, {args.optimizer}, "
        f"{args.start_lr:g} -> {args.end_lr:g} ({args.mode}), {_stop_text(res)}"
    )
    try:
        sug = res.suggestions()
    except ConfigError as e:  # the sweep diverged too early: say so and what to change
        console.print(f"[red]no suggestion:[/] {e}")
        return 1
    _print_suggestions(console, sug, args.repeats)
    _print_bounds(console, res)
    if args.plot:
        res.plot().figure.savefig(args.plot, bbox_inches="tight")
        console.print(f"figure written to {args.plot}")
    if record.key is not None:
        console.print(f"stored as run {record.key[:16]} in {args.store}")
    return 0


def _metric_rows(res: Any) -> list[tuple[int, str, float]]:
    """The store's metric rows of a range test: ``lr``, ``loss`` and ``smoothed`` per iteration."""
    rows = [(i, "lr", float(v)) for i, v in enumerate(res.lrs)]
    rows += [(i, "loss", float(v)) for i, v in enumerate(res.losses)]
    return rows + [(i, "smoothed", float(v)) for i, v in enumerate(res.smoothed)]


def _stop_text(res: Any) -> str:
    if res.stopped_early:
        return f"stopped at lr={fmt(res.lrs[res.diverged_at], digits=3)} ({res.stop_reason}, iteration {res.diverged_at})"
    return f"ran all {len(res.lrs)} iterations"


def _print_suggestions(console: Any, sug: Any, repeats: int) -> None:
    """The table of suggested learning rates (with their spread over repeats), agreement and recommendation."""
    from rich.table import Table

    from ..range_test import SUGGESTION_METHODS

    table = Table(title="suggested learning rates")
    table.add_column("method")
    table.add_column("lr", justify="right")
    if repeats > 1:
        for col in ("min", "max", "geo sd"):
            table.add_column(col, justify="right")
    for m in SUGGESTION_METHODS:
        row = [m, fmt(sug.lrs[m], digits=3)]
        if repeats > 1:
            sp = sug.spread[m]
            geo_sd = "-" if sp["geo_sd"] is None else f"{sp['geo_sd']:.2f}"
            row += [fmt(sp["min"], digits=3), fmt(sp["max"], digits=3), geo_sd]
        table.add_row(*row)
    console.print(table)
    agree = "agree" if sug.agree else "disagree"
    console.print(f"the suggestions {agree} (max/min = {sug.ratio:.2f}; they agree when <= 3)")
    console.print(f"[bold]recommended lr: {fmt(sug.recommended, digits=3)}[/]  because {sug.reason}")


def _print_bounds(console: Any, res: Any) -> None:
    from ..errors import ConfigError

    try:
        base, top = res.lr_bounds()
        console.print(
            f"cyclic / one-cycle bounds: base_lr={fmt(base, digits=3)}, max_lr={fmt(top, digits=3)}"
        )
    except ConfigError as e:
        console.print(f"no cyclic bounds: {e}")
