"""``lrbs connect``: a path between two checkpoints (linear, Bezier, PolyChain or AutoNEB) and its barriers; zoo
models and datasets or the user's own (``--model pkg.module:factory``, called once per checkpoint, and ``--data
pkg.module:factory``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_zoo_data_options

METHODS = ("linear", "bezier", "polychain", "neb")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("connect", help="mode connectivity between two checkpoints: path and barriers")
    p.add_argument("--a", required=True, help="first checkpoint (.safetensors or a torch state dict)")
    p.add_argument("--b", required=True, help="second checkpoint")
    add_zoo_data_options(p)
    p.add_argument("--method", default="bezier", help="linear, bezier, polychain or neb")
    p.add_argument("--bends", type=int, default=3, help="trainable inner bends of a curve")
    p.add_argument("--epochs", type=float, default=20, help="curve training epochs")
    p.add_argument("--lr", type=float, default=0.05, help="curve / NEB learning rate")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--cycles", type=int, default=4, help="AutoNEB cycles")
    p.add_argument("--steps", type=int, default=100, help="AutoNEB steps per cycle")
    p.add_argument("--points", type=int, default=61, help="points of the linear path")
    p.add_argument("--bn", default="recompute", help="BatchNorm treatment at evaluated points")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for path.json and path.png")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .._util import atomic_write, dumps, fmt
    from ..connectivity import auto_neb, fit_curve, linear_path
    from ..errors import check_choice
    from ..objective import Objective
    from ..train import load_checkpoint
    from ._common import load_data, load_model

    check_choice("--method", args.method, METHODS)
    data = load_data(args)
    ds = data.with_test  # train and test splits, for the test barriers
    models = []
    for ckpt in (args.a, args.b):
        m = load_model(args, data)
        load_checkpoint(ckpt, m)
        models.append(m)
    a, b = models
    if args.method == "linear":
        obj = Objective(a, data=data.train, bn=args.bn, batch_size=1000)
        test_obj = None if data.test is None else Objective(a, data=data.test, bn=args.bn, batch_size=1000)
        path = linear_path(a, b, obj, args.points, test_obj=test_obj)
    else:
        shared = {"lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "bn": args.bn}
        if args.method == "neb":
            path = auto_neb(a, b, ds, cycles=args.cycles, steps=args.steps, **shared)
        else:
            path = fit_curve(a, b, ds, kind=args.method, bends=args.bends, epochs=args.epochs, **shared).path
    table = Table(title=f"{args.method} path: {args.a} -> {args.b}")
    table.add_column("split")
    for name in ("max_loss", "max_minus_mean", "max_above_chord"):
        table.add_column(name, justify="right")
    table.add_column("length", justify="right")
    for split, bars in (("train", path.barriers), ("test", path.test_barriers)):
        if bars is not None:
            table.add_row(
                split,
                *(fmt(bars[k]) for k in ("max_loss", "max_minus_mean", "max_above_chord")),
                fmt(path.length),
            )
    Console().print(table)
    Console().print(f"bn={path.settings['bn']}  samples={path.settings['num_samples']}  points={len(path.t)}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / "path.json", dumps(path.to_dict(), indent=2))
        path.plot().figure.savefig(out / "path.png", dpi=120)
    return 0
