"""The ``optdiag`` command line: ``optdiag demo`` and ``optdiag analyze``.

Exit codes: 0 success, 2 bad input (one line naming the problem, no traceback), 1 internal error.
Each subcommand lives with its layer (``optdiag.demo.cli``, ``optdiag.analysis.cli``) and provides
``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from typing import Sequence

from optdiag import __version__
from optdiag.errors import UsageError

_SUBCOMMANDS = {
    "demo": ("optdiag.demo.cli", "run built-in training scenarios whose verdict is known, and show the diagnosis"),
    "analyze": ("optdiag.analysis.cli", "analyse saved checkpoints and write report.html and report.json"),
}


class _Parser(argparse.ArgumentParser):
    """argparse exits with code 2 on bad arguments already; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optdiag", description="Why did my loss stop going down? Curvature-aware diagnosis.")
    parser.add_argument("--version", action="version", version=f"optdiag {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    debug = args.debug or bool(os.environ.get("OPTDIAG_DEBUG"))
    module = importlib.import_module(_SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(f"optdiag {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"optdiag {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence
        if debug:
            traceback.print_exc()
        print(
            f"optdiag {args.command}: internal error: {type(err).__name__}: {err} "
            "(run with --debug for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1
