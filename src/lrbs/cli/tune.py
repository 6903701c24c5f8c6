"""``lrbs tune``: the learning rate, batch size and warmup for a zoo model and dataset, with the evidence."""

from __future__ import annotations

import argparse

from ._common import add_zoo_data_options

#: The flags passed to :func:`lrbs.tune.tune` under the same name.
_TUNE_OPTIONS = (
    "optimizer",
    "budget_epochs",
    "budget_samples",
    "precision",
    "batch_sizes",
    "max_batch_size",
    "seed",
)


def _sizes(text: str) -> list[int]:
    """'16,32,64' -> [16, 32, 64] (the order is checked by lrbs.tune)."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers such as 16,32,64, got {text!r}"
        ) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="choose the learning rate, batch size, warmup and schedule for a budget, with the evidence",
    )
    add_zoo_data_options(p, model_default="cnn1d")
    p.add_argument("--optimizer", default="sgd", help="sgd (momentum 0.9), adam or adamw")
    p.add_argument("--budget-epochs", type=float, default=None, help="training budget in epochs")
    p.add_argument("--budget-samples", type=int, default=None, help="training budget in samples")
    p.add_argument("--batch-sizes", type=_sizes, default=None, help="the ladder, e.g. 16,32,64,128")
    p.add_argument("--max-batch-size", type=int, default=None, help="the largest batch to consider")
    p.add_argument("--precision", default="32", help="32, bf16-mixed or 16-mixed (CUDA)")
    p.add_argument("--store", default=None, help="SQLite store: finished steps are kept and a rerun resumes")
    p.add_argument("--report", default=None, help="write the one-page HTML report here")
    p.add_argument("--json", default=None, help="write the recommendation and its evidence here (JSON)")
    p.add_argument(
        "--train", action="store_true", help="then train with the recommendation and print the result"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from ..tune import tune
    from ._common import load_data, load_model

    console = Console()
    data = load_data(args)
    model = load_model(args, data, seed=args.seed)
    store = None
    if args.store:
        from ..store import Store

        store = Store(args.store)
    try:
        options = {name: getattr(args, name) for name in _TUNE_OPTIONS}
        rec = tune(model, data.fit_data, **options, store=store, progress=not args.no_progress)
    finally:
        if store is not None:
            store.close()
    console.print(rec.table())
    if args.report:
        console.print(f"report written to {rec.report(args.report)}")
    if args.json:
        from .._util import atomic_write, dumps

        atomic_write(args.json, dumps(rec.to_dict(), indent=1) + "\n")
        console.print(f"evidence written to {args.json}")
    if args.train:
        from ..train import fit

        extra = {"test_data": data.test} if data.dataset is None and data.test is not None else {}
        res = fit(
            load_model(args, data, seed=args.seed),
            data.fit_data,
            seed=args.seed,
            progress=not args.no_progress,
            **rec.fit_kwargs(),
            **extra,
        )
        acc = res.final.get("test_acc")
        console.print(f"trained: {res.status}, test accuracy {acc if acc is None else f'{acc:.4f}'}")
    return 0
