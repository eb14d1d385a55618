"""`opnsense-ha` command line: a thin shell over the library.

Global options (`--conf-dir`, `--items-dir`) come before the subcommand, as in
`opnsense-ha --conf-dir DIR serve ...`. Subcommands live in `hasync.cli.commands.*`; each module's
`register(subparsers)` adds its parsers and sets `func` to a callable taking the parsed args and
returning the exit code. `HaError`s become a one-line message on stderr and exit code 2.

Only the module of the command being run is imported: a command module pulls in what it needs
(the agent, the lab, the checks, TLS key generation), and a cron or configd `sync` should not pay
for all of them at every start. A command lives in the module of its name (`apply-payload` in
`apply_payload`), or in the module `COMMAND_MODULES` names; without a known command (`--help`, a
typo) every module is imported, so the listing and argparse's errors stay complete.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from hasync.cli import commands
from hasync.core.errors import HaError
from hasync.core.logsetup import setup_syslog

# Commands that share a module with a sibling command; every other command `x-y` is in `x_y`.
COMMAND_MODULES = {"trust": "sync", "status": "remote", "version": "remote", "services": "remote",
                   "history": "rollback"}


def add_global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conf-dir", default="/conf", help="directory with config.xml and backup/ (default /conf)")
    parser.add_argument("--items-dir", default=None, help="directory of plugin sync item JSON files")
    parser.add_argument("-v", "--verbose-log", action="store_true", help="debug logging on stderr")


def command_modules() -> list[str]:
    """Names of the command modules (read from the package directory, nothing imported)."""
    return sorted(path.stem for path in Path(commands.__file__).parent.glob("*.py") if path.stem != "__init__")


def module_of(command: str | None) -> str | None:
    """The module that registers `command`, or None when the word names no command module."""
    if command is None:
        return None
    name = COMMAND_MODULES.get(command, command.replace("-", "_"))
    return name if name in command_modules() and name != "common" else None


def requested_command(argv: Sequence[str] | None) -> str | None:
    """The subcommand word of `argv` (after the global options), without importing any command."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    add_global_options(pre)
    pre.add_argument("command", nargs="?")
    try:
        known, _rest = pre.parse_known_args(argv)
    except argparse.ArgumentError:  # e.g. `--conf-dir` without a value: the full parser says so
        return None
    command: str | None = known.command
    return command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser for `command` alone, or for every command when it names none we know."""
    parser = argparse.ArgumentParser(prog="opnsense-ha", description=__doc__.splitlines()[0])
    add_global_options(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    only = module_of(command)
    for name in [only] if only else command_modules():
        module = importlib.import_module(f"{commands.__name__}.{name}")
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None, *, ends_process: bool = False) -> int:
    """Run one command; `ends_process`: the process ends right after (`exit_process`), so the
    command may leave what it built to that end (`keep_until_exit`)."""
    parser = build_parser(requested_command(argv))
    args = parser.parse_args(argv)
    args.ends_process = ends_process
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


def exit_process(code: int) -> NoReturn:
    """End this process with `code`, without the interpreter's last garbage collection.

    At exit Python walks every object the run created (the modules, a parsed config) looking for
    cycles, only to free them all anyway: ~10 ms of a no-op sync's ~100 ms. Frozen objects are
    not walked, and freezing is harmless when nothing runs afterwards. For process entry points
    only (the launcher, `python -m hasync`, the configd scripts), never for in-process callers.
    """
    gc.freeze()
    sys.exit(code)


def run() -> NoReturn:
    """The `opnsense-ha` process: `main` with the command line, then `exit_process`."""
    exit_process(main(ends_process=True))


if __name__ == "__main__":
    run()
