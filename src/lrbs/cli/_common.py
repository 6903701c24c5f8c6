"""Argument helpers shared by subcommands."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError


def add_train_options(p: argparse.ArgumentParser, *, steps_default: int | None = None) -> None:
    """The options of ``lrbs train`` (also used by sharpness --train, noise-scale, find-lr)."""
    p.add_argument("--model", default="cnn1d", help="model name (see lrbs.list_models())")
    p.add_argument("--model-opts", default=None, type=json_dict, help="JSON dict, e.g. '{\"depth\": 4}'")
    p.add_argument("--dataset", default="mnist1d", help="dataset name (mnist1d, blobs, teacher, cifar10)")
    p.add_argument("--dataset-opts", default=None, type=json_dict, help='JSON dict, e.g. \'{"path": "..."}\'')
    p.add_argument("--optimizer", default="sgd", help="sgd, adam, adamw, sam, asam, lars, lamb")
    p.add_argument(
        "--lr", default="0.1", help="a number or a schedule spec, e.g. 'cosine(start=0.1, steps=1000)'"
    )
    p.add_argument("--batch-size", default="128", help="an integer or a batch schedule spec")
    p.add_argument("--steps", type=int, default=steps_default)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rho", type=float, default=None, help="SAM neighbourhood size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-micro-batch", type=int, default=None, help="accumulate micro-batches of at most this size"
    )


def json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def number_or_spec(name: str, text: str, *, integer: bool = False) -> Any:
    """'0.1' -> 0.1, '128' -> 128, anything else is kept as a schedule spec string (parsed later, safely)."""
    try:
        return int(text) if integer else float(text)
    except ValueError:
        if integer:
            try:
                float(text)
            except ValueError:
                return text
            raise ConfigError(
                f"{name}={text!r} is not allowed: must be an integer or a schedule spec"
            ) from None
        return text


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": args.model,
        "model_opts": args.model_opts or {},
        "dataset": args.dataset,
        "dataset_opts": args.dataset_opts or {},
        "optimizer": args.optimizer,
        "lr": number_or_spec("--lr", args.lr),
        "batch_size": number_or_spec("--batch-size", args.batch_size, integer=True),
        "steps": args.steps,
        "epochs": args.epochs,
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "rho": args.rho,
        "seed": args.seed,
        "max_micro_batch": args.max_micro_batch,
    }
