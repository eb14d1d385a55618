"""`opnsense-ha` command line: a thin shell over the library.

Global options (`--conf-dir`, `--items-dir`) come before the subcommand, as in
`opnsense-ha --conf-dir DIR serve ...`. Subcommands live in `hasync.cli.commands.*`; each module's
`register(subparsers)` adds its parsers and sets `func` to a callable taking the parsed args and
returning the exit code. `HaError`s become a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from hasync.cli import commands
from hasync.core.errors import HaError
from hasync.core.logsetup import setup_syslog


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opnsense-ha", description=__doc__.splitlines()[0])
    parser.add_argument("--conf-dir", default="/conf", help="directory with config.xml and backup/ (default /conf)")
    parser.add_argument("--items-dir", default=None, help="directory of plugin sync item JSON files")
    parser.add_argument("-v", "--verbose-log", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{module_info.name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose_log else logging.INFO,
        format="opnsense-ha: %(message)s",
        stream=sys.stderr,
    )
    setup_syslog()
    try:
        return int(args.func(args) or 0)
    except HaError as exc:
        print(f"opnsense-ha: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `opnsense-ha items | head`
        sys.stderr.close()
        return 141


if __name__ == "__main__":
    sys.exit(main())
