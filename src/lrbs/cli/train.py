"""``lrbs train``: train a model (from the zoo or the user's ``--model pkg.module:factory``) on a dataset (built-in
or ``--data pkg.module:factory``), with a progress bar and a final table."""

from __future__ import annotations

import argparse

from ._common import add_config_flags, add_train_options, config_from_args, uses_own_code


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (progress bar, final table, optional store/checkpoint)")
    add_train_options(p)
    names = ("eval_every", "lr_rule", "base_batch_size", "warmup")
    add_config_flags(p, names, flags={"base_batch_size": "--base-batch"})
    p.add_argument("--store", default=None, help="SQLite store to record the run in")
    p.add_argument("--checkpoint", default=None, help="write the final weights here (.safetensors)")
    p.add_argument("--ddp", action="store_true", help="data-parallel training under torchrun (gloo on CPU)")
    p.add_argument("--sync-bn", action="store_true", help="with --ddp: convert BatchNorm to SyncBatchNorm")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..errors import ConfigError

    cfg = _config(args)
    own = uses_own_code(args)
    if own and args.ddp:
        raise ConfigError(
            "--ddp is not allowed with --model/--data import specs: every rank rebuilds the run from built-in "
            "names; use built-in names, or call lrbs.ddp_train from your own script"
        )
    console = Console()
    store = None
    if args.store:
        from ..store import Store

        store = Store(args.store)
    try:
        result = _train(args, cfg, store, own, console.is_terminal)
    finally:
        if store is not None:
            store.close()
    if result is None:  # not rank 0 of a --ddp run
        return 0
    console.print(_table(result, cfg["model"], args.data or cfg["dataset"]))
    return 0


def _config(args: argparse.Namespace) -> dict:
    """The run's config: the train options, ``eval_every`` and the LR-scaling options that were given."""
    from ..errors import ConfigError

    if args.steps is None and args.epochs is None:
        raise ConfigError("give --steps or --epochs")
    cfg = config_from_args(args)
    cfg["eval_every"] = args.eval_every
    for key, val in (
        ("lr_rule", args.lr_rule),
        ("base_batch_size", args.base_batch),
        ("warmup", args.warmup),
    ):
        if val is not None:
            cfg[key] = val
    return cfg


def _train(args: argparse.Namespace, cfg: dict, store, own: bool, progress: bool):
    """The FitResult: the user's own code, a DDP run (None on ranks other than 0) or the built-in names."""
    if own:
        return _train_own(args, cfg, store, progress)
    if args.ddp:
        from ..distributed import ddp_train

        return ddp_train(cfg, store=store, sync_bn=args.sync_bn, checkpoint=args.checkpoint)
    from ..train import train_config

    _, result = train_config(cfg, store=store, checkpoint=args.checkpoint, progress=progress)
    return result


def _table(result, model: str, data_name: str):
    """The final metrics, the wall time and the store key as one table."""
    from rich.table import Table

    from .._util import fmt

    table = Table(title=f"lrbs train: {model} on {data_name} ({result.status})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result.final.items():
        table.add_row(k, fmt(v))
    table.add_row("wall time (s)", f"{result.wall_time:.1f}")
    if result.run_key:
        table.add_row("store key", result.run_key[:16])
    return table


def _train_own(args: argparse.Namespace, cfg: dict, store, progress: bool):
    """The user's own model and/or data (import specs): resolve them, then fit with the same options."""
    from ._common import fit_from_config, load_data, load_model

    data = load_data(args)
    seed = cfg["seed"]
    model = load_model(args, data, seed=seed)
    return fit_from_config(cfg, model, data, store=store, checkpoint=args.checkpoint, progress=progress)
