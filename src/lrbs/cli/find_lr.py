"""``lrbs find-lr``: the LR range test on a zoo model or the user's own (``--model pkg.module:factory``, ``--data
pkg.module:factory``), with the suggestions and the one it recommends."""

from __future__ import annotations

import argparse

from ._common import add_data_option, add_model_option, json_dict


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("find-lr", help="LR range test: suggestions, whether they agree, and a recommendation")
    add_model_option(p, default="cnn1d")
    p.add_argument("--dataset", default="mnist1d", help="dataset name (mnist1d, blobs, teacher, cifar10)")
    p.add_argument("--dataset-opts", default=None, type=json_dict, help="JSON dict of dataset options")
    add_data_option(p)
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


def _optimizer(name: str, params, lr: float, momentum: float, weight_decay: float):
    try:
        from ..optim import get_optimizer
    except ImportError:  # pragma: no cover - lrbs.optim ships with lrbs; torch.optim is the fallback
        import torch

        from ..errors import check_choice

        name = check_choice("optimizer", name, ("sgd", "adam", "adamw"))
        if name == "sgd":
            return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay)
    return get_optimizer(name, params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ..errors import ConfigError
    from ..range_test import SUGGESTION_METHODS, lr_range_test
    from ._common import batch_size_for, load_data, load_model

    console = Console()
    data = load_data(args)
    model = load_model(args, data, seed=args.seed)
    opt = _optimizer(args.optimizer, model.parameters(), args.start_lr, args.momentum, args.weight_decay)
    config = {
        "command": "find-lr",
        "model": args.model,
        "model_opts": args.model_opts or {},
        "dataset": data.describe(),
        "optimizer": args.optimizer,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "num_iter": args.num_iter,
        "start_lr": args.start_lr,
        "end_lr": args.end_lr,
        "mode": args.mode,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "seed": args.seed,
    }
    store = key = None
    if args.store:
        from ..store import Store

        store = Store(args.store)
        key = store.start_run(config, kind="range_test", rerun=True)
    try:
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
        if store is not None:
            rows = [(i, "lr", float(v)) for i, v in enumerate(res.lrs)]
            rows += [(i, "loss", float(v)) for i, v in enumerate(res.losses)]
            rows += [(i, "smoothed", float(v)) for i, v in enumerate(res.smoothed)]
            store.finish_run(key, "completed", result=res.to_dict(), metrics=rows)
    except BaseException as e:
        if store is not None:
            store.fail_run(key, f"{type(e).__name__}: {e}")
            store.close()
        raise
    if store is not None:
        store.close()

    stop = (
        f"stopped at lr={res.lrs[res.diverged_at]:.3g} ({res.stop_reason}, iteration {res.diverged_at})"
        if res.stopped_early
        else f"ran all {len(res.lrs)} iterations"
    )
    console.print(
        f"lrbs find-lr: {args.model} on {data.name}, {args.optimizer}, "
        f"{args.start_lr:g} -> {args.end_lr:g} ({args.mode}), {stop}"
    )
    try:
        sug = res.suggestions()
    except ConfigError as e:  # the sweep diverged too early: say so and what to change
        console.print(f"[red]no suggestion:[/] {e}")
        return 1
    table = Table(title="suggested learning rates")
    table.add_column("method")
    table.add_column("lr", justify="right")
    if args.repeats > 1:
        for col in ("min", "max", "geo sd"):
            table.add_column(col, justify="right")
    for m in SUGGESTION_METHODS:
        row = [m, f"{sug.lrs[m]:.3g}"]
        if args.repeats > 1:
            sp = sug.spread[m]
            row += [
                f"{sp['min']:.3g}",
                f"{sp['max']:.3g}",
                "-" if sp["geo_sd"] is None else f"{sp['geo_sd']:.2f}",
            ]
        table.add_row(*row)
    console.print(table)
    agree = "agree" if sug.agree else "disagree"
    console.print(f"the suggestions {agree} (max/min = {sug.ratio:.2f}; they agree when <= 3)")
    console.print(f"[bold]recommended lr: {sug.recommended:.3g}[/]  because {sug.reason}")
    try:
        base, top = res.lr_bounds()
        console.print(f"cyclic / one-cycle bounds: base_lr={base:.3g}, max_lr={top:.3g}")
    except ConfigError as e:
        console.print(f"no cyclic bounds: {e}")
    if args.plot:
        ax = res.plot()
        ax.figure.savefig(args.plot, bbox_inches="tight")
        console.print(f"figure written to {args.plot}")
    if key is not None:
        console.print(f"stored as run {key[:16]} in {args.store}")
    return 0
