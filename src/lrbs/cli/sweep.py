"""``lrbs sweep SPEC.toml``: run an LR x batch-size grid from a TOML spec, print the table.

The spec has three tables (see ``examples/sweep.toml`` and ``docs/sweep.md``)::

    [base]            training options shared by every run (lrbs.train.CONFIG_DEFAULTS)
    [grid]            option = [values...]; the runs are the cartesian product
    [sweep]           measure, backend, store, max_concurrency, ray_address, num_cpus_per_task, ...

Command-line options override the ``[sweep]`` table. A relative ``store`` in the spec is relative to the spec
file.
"""

from __future__ import annotations

import argparse
import functools
import inspect
from pathlib import Path
from typing import Any

from ..errors import ConfigError, LrbsTypeError, did_you_mean

TABLES = ("base", "grid", "sweep")


@functools.cache
def sweep_options() -> tuple[str, ...]:
    """The ``[sweep]`` options: :func:`lrbs.sweep.sweep`'s public keyword-only parameters, in its order (all
    but ``progress``, which the CLI sets). Read from the signature, so the two never drift apart."""
    from ..sweep import sweep

    return tuple(
        n
        for n, p in inspect.signature(sweep).parameters.items()
        if p.kind is p.KEYWORD_ONLY and not n.startswith("_") and n != "progress"
    )


def __getattr__(name: str) -> Any:
    """``SWEEP_OPTIONS``, computed on first use (:func:`sweep_options`; importing lrbs.sweep imports torch)."""
    if name == "SWEEP_OPTIONS":
        return sweep_options()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _toml() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib


def load_spec(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a sweep spec: ``{"base": {...}, "grid": {...}, "sweep": {...}}``.

    Raises:
        ConfigError: missing file, malformed TOML (the message has the line and column), unknown tables or
            ``[sweep]`` options (the closest name is suggested), a missing ``[grid]``.
    """
    return check_spec(path, read_spec(path))


def read_spec(path: str | Path) -> dict[str, Any]:
    """The spec's tables as TOML gives them, the file and its tables checked (no torch import: the options are
    checked by :func:`check_spec`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"spec={str(path)!r} does not exist: give the path of a TOML sweep spec")
    toml = _toml()
    try:
        data = toml.loads(path.read_text(encoding="utf-8"))
    except toml.TOMLDecodeError as e:  # the message ends with "(at line L, column C)"
        raise ConfigError(f"spec={str(path)!r} is not valid TOML: {e}") from None
    for name in data:
        if name not in TABLES:
            raise _unknown_in_spec(path, f"table [{name}]", name, TABLES)
        if not isinstance(data[name], dict):
            raise LrbsTypeError(f"spec={str(path)!r}: {name} must be a table [{name}], got {data[name]!r}")
    if "grid" not in data:
        raise ConfigError(f"spec={str(path)!r} has no [grid] table: give at least one option = [values]")
    return data


def check_spec(path: str | Path, data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The spec of :func:`read_spec`'s tables ``data`` with its ``[sweep]`` options checked and its store path
    made relative to the spec's folder."""
    path = Path(path)
    opts = dict(data.get("sweep", {}))
    for k in opts:
        if k not in sweep_options():
            raise _unknown_in_spec(path, f"[sweep] option {k!r}", k, sweep_options())
    if isinstance(opts.get("store"), str) and not Path(opts["store"]).is_absolute():
        opts["store"] = str(path.parent / opts["store"])
    return {"base": dict(data.get("base", {})), "grid": dict(data["grid"]), "sweep": opts}


def _unknown_in_spec(path: Path, what: str, name: str, allowed: tuple[str, ...]) -> ConfigError:
    """The error for an unknown table or ``[sweep]`` option of the spec at ``path``: ``what`` as written in the
    spec (``"table [grids]"``), the closest allowed name, then every allowed one in their order. (Not
    :func:`lrbs.errors.unknown_name`: this message names the spec file and the TOML table syntax.)"""
    return ConfigError(
        f"spec={str(path)!r}: unknown {what}.{did_you_mean(name, allowed)} Allowed: {', '.join(allowed)}"
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="train an LR x batch-size grid from a TOML spec (local or Ray)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("spec", help="the TOML spec ([base], [grid], [sweep])")
    p.add_argument("--backend", choices=("local", "ray"), help="override [sweep] backend")
    p.add_argument(
        "--address", dest="ray_address", help="an existing Ray cluster, e.g. 10.0.0.1:6379 or auto"
    )
    p.add_argument("--store", help="results store (SQLite); finished runs in it are skipped")
    p.add_argument("--max-concurrency", type=int, help="runs in flight at once")
    p.add_argument("--measure", nargs="+", help="measures after training (lambda_max, trace, keskar, ...)")
    p.add_argument("--heatmap", metavar="FILE", help="also save a heatmap (png/svg/pdf) of --metric")
    p.add_argument("--metric", default="test_acc", help="the heatmap's metric (default test_acc)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _local_pool(opts: dict[str, Any]) -> bool:
    """Whether the sweep of these options runs in a local process pool (a valid ``max_concurrency`` > 1); a bad
    value is left to :func:`lrbs.sweep.sweep`, whose error names it."""
    n = opts.get("max_concurrency")
    return (
        opts.get("backend", "local") == "local" and isinstance(n, int) and not isinstance(n, bool) and n > 1
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    data = read_spec(args.spec)
    overrides = {
        k: getattr(args, k)
        for k in ("backend", "ray_address", "store", "max_concurrency", "measure")
        if getattr(args, k, None) is not None
    }
    if _local_pool({**data.get("sweep", {}), **overrides}):
        from ..pool import start_fork_server

        start_fork_server()  # the workers import torch while this process does (before the options are checked)
    from ..sweep import sweep

    spec = check_spec(args.spec, data)
    opts = {**spec["sweep"], **overrides}
    result = sweep(spec["base"], spec["grid"], progress=not args.no_progress, **opts)
    console = Console()
    console.print(result.table(title=f"sweep {Path(args.spec).name}"))
    cached = result.settings["num_cached"]
    failed = sum(r.status == "failed" for r in result.runs)
    console.print(
        f"{len(result)} runs ({cached} from the store, {failed} failed) in "
        f"{result.settings['wall_time']:.1f} s"
        + (f"; store: {result.settings['store']}" if result.settings["store"] else "")
    )
    if args.heatmap:
        result.heatmap(args.metric).figure.savefig(args.heatmap, dpi=120, bbox_inches="tight")
        console.print(f"heatmap of {args.metric}: {args.heatmap}")
    return 1 if failed else 0
