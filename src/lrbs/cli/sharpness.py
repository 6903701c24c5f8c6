"""``lrbs sharpness``: every sharpness measure of a checkpoint (or of a model trained first) in one table; zoo
models and datasets or the user's own (``--model pkg.module:factory``, ``--data pkg.module:factory``)."""

from __future__ import annotations

import argparse
from typing import Any

from ._common import add_train_options, config_from_args, json_dict


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sharpness",
        help="Hessian lambda_max, trace, Keskar, worst-case and average-case sharpness of a model",
    )
    add_train_options(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--checkpoint", default=None, help="weights to measure (.safetensors or a torch state dict)"
    )
    src.add_argument("--train", action="store_true", help="train first with the fit options, then measure")
    p.add_argument("--measures", default=None, help="comma-separated names (default: all but negative_mass)")
    p.add_argument("--max-samples", type=int, default=1024, help="seeded data subset shared by every measure")
    p.add_argument("--bn", default="eval", help="BatchNorm treatment: eval, train or recompute")
    p.add_argument(
        "--eos-lr", type=float, default=None, help="learning rate for edge_of_stability (default --lr)"
    )
    p.add_argument(
        "--options",
        default=None,
        type=json_dict,
        help='per-measure options, JSON: \'{"worst_case": {"rho": 0.1}}\'',
    )
    p.add_argument("--store", default=None, help="SQLite store to record the result in (kind 'sharpness')")
    p.set_defaults(func=run)


def _measures(args: argparse.Namespace) -> list[str]:
    from ..errors import unknown_name
    from ..sharpness import DEFAULT_MEASURES, MEASURES

    if args.measures is None:
        return list(DEFAULT_MEASURES)
    names = [m.strip() for m in args.measures.split(",") if m.strip()]
    for name in names:  # checked before any training
        if name not in MEASURES:
            raise unknown_name("measure", name, MEASURES)
    return names


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..objective import Objective
    from ..sharpness import sharpness_report
    from ._common import load_data, recorded_run

    cfg = config_from_args(args)
    measures = _measures(args)
    lr = _eos_lr(args, cfg, measures)
    data = load_data(args)
    obj = Objective(_model(args, cfg, data), data=data.fit_data, bn=args.bn)
    config = {
        "source": "train" if args.train else {"checkpoint": str(args.checkpoint)},
        "model": cfg["model"],
        "model_opts": cfg["model_opts"],
        "dataset": data.name,
        "dataset_opts": cfg["dataset_opts"],
        "train": cfg if args.train else None,
        "measures": measures,
        "max_samples": args.max_samples,
        "bn": args.bn,
        "seed": args.seed,
        "lr": lr,
        "momentum": args.momentum,
        "options": args.options or {},
    }
    with recorded_run(args.store, config, "sharpness") as record:
        report = sharpness_report(
            obj,
            measures=measures,
            max_samples=args.max_samples,
            seed=args.seed,
            lr=lr,
            momentum=args.momentum if lr is not None else 0.0,
            options=args.options,
        )
        record.finish(report.to_dict(), [(0, name, float(v)) for name, v in report.measures.items()])
    Console().print(_table(report, cfg["model"], data.name, record.key))
    return 0


def _eos_lr(args: argparse.Namespace, cfg: dict[str, Any], measures: list[str]) -> float | None:
    """The learning rate of edge_of_stability: ``--eos-lr``, else a numeric ``--lr``; without one, the measure is
    dropped from ``measures`` (a schedule spec has no single lr; give --eos-lr for it)."""
    lr = args.eos_lr
    if lr is None and isinstance(cfg["lr"], float):
        lr = cfg["lr"]
    if lr is None and "edge_of_stability" in measures:
        measures.remove("edge_of_stability")
    return lr


def _model(args: argparse.Namespace, cfg: dict[str, Any], data: Any) -> Any:
    """The model to measure: trained first (``--train``) or loaded from ``--checkpoint``."""
    from ..train import load_checkpoint, train_config
    from ._common import fit_from_config, load_model, uses_own_code

    if args.train and not uses_own_code(args):
        model, _ = train_config(cfg, dataset=data.dataset)
        return model
    model = load_model(args, data, seed=cfg["seed"])
    if args.train:
        fit_from_config(cfg, model, data)
    else:
        load_checkpoint(args.checkpoint, model)
    return model


def _table(report: Any, model: str, data_name: str, key: str | None) -> Any:
    """The measures of ``report`` as one table (value, stderr, options, seconds)."""
    from rich.table import Table

    from .._util import fmt

    s = report.settings
    table = Table(
        title=f"lrbs sharpness: {model} on {data_name} ({s['num_samples']} samples, "
        f"bn={s['bn']}, {s['num_params']} parameters)"
    )
    for col, justify in (
        ("measure", "left"),
        ("value", "right"),
        ("stderr", "right"),
        ("options", "left"),
        ("seconds", "right"),
    ):
        table.add_column(col, justify=justify)
    for row in report.rows():
        opts = ", ".join(f"{k}={v}" for k, v in row["options"].items() if k != "seed")
        table.add_row(row["measure"], fmt(row["value"]), fmt(row["stderr"]), opts, fmt(row["seconds"]))
    if key:
        table.caption = f"store key {key[:16]}"
    return table
