"""`opnsense-ha items`: the sync items this node knows, like OPNsense's `pluginctl -x`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hasync.config.items import SyncItemRegistry


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "items",
        help="list the sync items ({id: description}, like pluginctl -x)",
        description="Print the known sync items (core and --items-dir plugin files) as JSON.",
    )
    parser.add_argument("--verbose", action="store_true", help="print the full metadata of every item")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registry = SyncItemRegistry.load(args.items_dir)
    if args.verbose:
        data: dict[str, Any] = {item.id: item.to_dict() for item in registry}
    else:
        data = registry.options()
    json.dump(data, sys.stdout, indent=4, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
