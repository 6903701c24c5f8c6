"""``lrbs landscape``: a filter-normalized 2-D loss surface around a checkpoint (npz + json + png); zoo models and
datasets or the user's own (``--model pkg.module:factory``, ``--data pkg.module:factory``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_zoo_data_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("landscape", help="2-D loss surface around a checkpoint (Li et al. 2018)")
    p.add_argument("--checkpoint", required=True, help="weights (.safetensors or a torch state dict)")
    add_zoo_data_options(p)
    p.add_argument("--grid", type=int, default=21, help="points per axis")
    p.add_argument("--range", type=float, default=1.0, help="the grid spans [-range, range] on both axes")
    p.add_argument("--norm", default="filter", help="direction normalization: filter, layer, none")
    p.add_argument(
        "--ignore", default="biasbn", help="1-D tensors: biasbn (zero) or none (the weight itself)"
    )
    p.add_argument("--bn", default="eval", help="BatchNorm treatment: eval, train or recompute")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate on a fixed random subset")
    p.add_argument("--seed", type=int, default=0, help="seed of the directions (and of the subset)")
    p.add_argument("--test", action="store_true", help="also evaluate the test split at every point")
    p.add_argument("--out", default="landscape_out", help="output directory (resumes a partial grid there)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    from .._util import fmt
    from ..errors import ConfigError, check_int, check_positive
    from ..landscape import landscape_2d, nonconvexity, random_direction
    from ..objective import Objective
    from ..train import load_checkpoint
    from ._common import load_data, load_model

    grid = check_int("--grid", args.grid, low=2)
    rng = check_positive("--range", args.range)
    data = load_data(args)
    if args.test and data.test is None:
        raise ConfigError(
            f"--test is not allowed with --data {data.name}: its factory returned no (train, test) pair"
        )
    model = load_model(args, data)
    load_checkpoint(args.checkpoint, model)
    obj = Objective(model, data=data.train, bn=args.bn, max_samples=args.max_samples, seed=args.seed)
    test_obj = Objective(model, data=data.test, bn=args.bn) if args.test else None
    d1 = random_direction(obj, norm=args.norm, ignore=args.ignore, seed=args.seed)
    d2 = random_direction(obj, norm=args.norm, ignore=args.ignore, seed=args.seed + 1)
    coords = np.linspace(-rng, rng, grid)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    land = landscape_2d(obj, d1, d2, coords, coords, path=out / "landscape", progress=True, test_obj=test_obj)
    land.plot("contour").figure.savefig(out / "landscape.png", dpi=120)
    table = Table(title=f"landscape {args.model} @ {args.checkpoint}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    centre = land.loss[int(np.argmin(np.abs(coords))), int(np.argmin(np.abs(coords)))]
    table.add_row("grid", f"{grid} x {grid} on [-{rng:g}, {rng:g}]")
    table.add_row("centre loss", fmt(centre))
    table.add_row("min / max loss", f"{fmt(np.nanmin(land.loss))} / {fmt(np.nanmax(land.loss))}")
    if grid >= 3:
        nc = nonconvexity(land)
        table.add_row("non-convex fraction (low-loss region)", f"{nc.fraction_negative:.3f}")
        table.add_row("mean |lambda_min/lambda_max|", f"{nc.mean_ratio:.3f}")
    table.add_row("bn / samples", f"{obj.bn} / {obj.num_samples}")
    table.add_row("files", f"{out / 'landscape.npz'}, .json, .png")
    Console().print(table)
    return 0
