"""``lrbs noise-scale``: the simple gradient noise scale of a model (McCandlish et al. 2018), with its CI; zoo models
and datasets or the user's own (``--model pkg.module:factory``, ``--data pkg.module:factory``)."""

from __future__ import annotations

import argparse

from ._common import add_zoo_data_options

#: The keyword arguments of :func:`lrbs.noise_scale.noise_scale` and the flags (``args`` names) that give them.
_NOISE_OPTIONS = {
    "small_batch": "small_batch",
    "big_batch": "big_batch",
    "num_estimates": "estimates",
    "seed": "seed",
    "confidence": "confidence",
    "bn": "bn",
    "precision": "precision",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "noise-scale",
        help="gradient noise scale B_simple = tr(Sigma)/|G|^2 with a bootstrap CI (McCandlish et al. 2018)",
    )
    add_zoo_data_options(p, model_default="cnn1d")
    p.add_argument("--checkpoint", default=None, help="load these weights (.safetensors) before measuring")
    p.add_argument("--small-batch", type=int, default=32, help="B_s, the small batch (default 32)")
    p.add_argument("--big-batch", type=int, default=1024, help="B_b, a multiple of B_s (default 1024)")
    p.add_argument("--estimates", type=int, default=20, help="number of big batches drawn (default 20)")
    p.add_argument("--train-steps", type=int, default=None, help="first train this many steps (fit defaults)")
    p.add_argument("--optimizer", default="sgd", help="optimizer for --train-steps")
    p.add_argument("--lr", type=float, default=0.1, help="LR for --train-steps")
    p.add_argument("--batch-size", type=int, default=128, help="batch size for --train-steps")
    p.add_argument("--bn", default="eval", help="BatchNorm mode of the measurement: eval, train, recompute")
    p.add_argument(
        "--precision", default="32", help="32, bf16-mixed or 16-mixed (CUDA) for the forward passes"
    )
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .._util import fmt
    from ..noise_scale import noise_scale
    from ._common import batch_size_for, load_data, load_model

    data = load_data(args)
    model = load_model(args, data, seed=args.seed)
    if args.checkpoint:
        from ..train import load_checkpoint

        load_checkpoint(args.checkpoint, model)
    console = Console()
    if args.train_steps:
        from ..train import fit

        fit(
            model,
            data.fit_data,
            optimizer=args.optimizer,
            lr=args.lr,
            batch_size=batch_size_for(data.fit_data, args.batch_size),
            steps=args.train_steps,
            seed=args.seed,
            progress=console.is_terminal,
        )
    options = {name: getattr(args, flag) for name, flag in _NOISE_OPTIONS.items()}
    res = noise_scale(model, data.train, **options)
    table = Table(title=f"lrbs noise-scale: {args.model} on {data.name}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("B_simple = tr(Sigma)/|G|^2", fmt(res.b_simple))
    table.add_row(f"{res.confidence:.0%} CI (bootstrap)", f"{fmt(res.ci_low)} .. {fmt(res.ci_high)}")
    table.add_row("|G|^2", fmt(res.grad_sq))
    table.add_row("tr(Sigma)", fmt(res.trace_sigma))
    table.add_row("B_s / B_b / estimates", f"{res.small_batch} / {res.big_batch} / {res.num_estimates}")
    table.add_row("bn / samples", f"{res.settings['bn']} / {res.settings['num_samples']}")
    console.print(table)
    return 0
