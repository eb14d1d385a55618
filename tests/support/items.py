"""Run one subcommand module the way `hasync.cli` does, without importing every other command.

The CLI discovers all command modules; testing ours through a parser built from just the module
under test keeps these tests independent of unrelated commands while exercising the same
`register()`/handler contract and the same global options.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from types import ModuleType

from hasync.core.errors import HaError


def run_command(module: ModuleType, argv: Sequence[str]) -> tuple[int, str]:
    """(exit code, error message) for `opnsense-ha [global options] <command> ...`."""
    parser = argparse.ArgumentParser(prog="opnsense-ha")
    parser.add_argument("--conf-dir", default="/conf")
    parser.add_argument("--items-dir", default=None)
    subparsers = parser.add_subparsers(dest="command", required=True)
    module.register(subparsers)
    args = parser.parse_args(list(argv))
    try:
        return int(args.func(args) or 0), ""
    except HaError as exc:  # what cli.main turns into exit code 2
        return 2, str(exc)
