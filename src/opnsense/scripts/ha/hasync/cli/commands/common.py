"""Helpers shared by several subcommands (not a subcommand itself: `register` is a no-op)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hasync.core.errors import HaError
from hasync.wire.client import ClientOptions

if TYPE_CHECKING:  # loaded by `failover_backend` only when a command needs it
    from hasync.failover.base import FailoverBackend


def register(_subparsers: Any) -> None:
    """Not a command module."""


def item_list(text: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of sync item ids")
    return items


def add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connect-timeout", type=float, default=10.0, help="seconds (default 10)")
    parser.add_argument("--timeout", type=float, default=240.0, help="total seconds per call (default 240)")
    parser.add_argument("--retries", type=int, default=2, help="retries on connection errors (default 2)")


def client_options(args: argparse.Namespace, base: ClientOptions) -> ClientOptions:
    if args.connect_timeout <= 0 or args.timeout <= 0 or args.retries < 0:
        raise HaError("--connect-timeout and --timeout must be positive, --retries zero or more")
    base.connect_timeout = args.connect_timeout
    base.total_timeout = args.timeout
    base.retries = args.retries
    return base


def failover_backend(conf_dir: str | Path) -> FailoverBackend:
    """The node's failover backend (`OPNSENSE_HA_FAILOVER=none` gives a no-op one).

    Imported here, not at the top: a sync or status run that never touches CARP must not pay for
    the failover layer at start-up (one of the layering test's allowlisted late imports)."""
    from hasync.failover.factory import get_backend

    return get_backend(conf_dir)
