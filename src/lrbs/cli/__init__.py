"""The ``lrbs`` command: parses arguments, calls the public API, prints. Nothing else.

Each subcommand is a module here with ``add_parser(subparsers)`` and ``run(args) -> int``. Errors that lrbs raises on
purpose (``LrbsError``) print one line and exit with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import LrbsError

# subcommand name -> module (imported lazily so `lrbs --version` stays fast)
SUBCOMMANDS = {
    "train": "train",
    "study": "study",
    "schedule": "schedule",
    "find-lr": "find_lr",
    "sharpness": "sharpness",
    "landscape": "landscape",
    "connect": "connect",
    "noise-scale": "noise_scale",
    "sweep": "sweep",
    "tune": "tune",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one clear line, exit status 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or of the subcommand ``only`` alone: some subcommands' options import
    torch (their defaults), and ``lrbs study`` / ``lrbs sweep`` start their workers' imports before their own."""
    from .. import __version__

    parser = _Parser(prog="lrbs", description="Learning rate and batch size: measure, choose, reproduce.")
    parser.add_argument("--version", action="version", version=f"lrbs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module in SUBCOMMANDS.items():  # every subcommand module ships with lrbs
        if only is None or name == only:
            importlib.import_module(f".{module}", __name__).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--version"]:  # answered before any subcommand (and torch) is imported
        from .. import __version__

        print(f"lrbs {__version__}")
        return 0
    parser = build_parser(argv[0] if argv[:1] and argv[0] in SUBCOMMANDS else None)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LrbsError as e:
        print(f"lrbs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lrbs: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # console script
    sys.exit(main())
