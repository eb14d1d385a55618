"""`opnsense-ha diff`: what the next sync would change on the backup (primary side).

Exit status like diff(1): 0 no difference, 1 differences, 2 trouble (unreachable backup, bad
config, no basis for comparing). With --json an error is a JSON document too, so configd's
script_output and scripts always get one parsable answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hasync.cli.commands.common import add_client_options, client_options, item_list
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError
from hasync.health.diff import diff_with_backup
from hasync.health.diff_render import colour_wanted, render_json, render_summary, render_unified
from hasync.wire.client import ClientOptions


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "diff", help="show what a sync would change on the backup (exit 0 same, 1 differs, 2 error)")
    parser.add_argument("--items", type=item_list, default=None, help="comma-separated sync item ids")
    parser.add_argument("--json", action="store_true", help="machine-readable result (schema diff-result)")
    parser.add_argument("--format", choices=("summary", "unified"), default="summary",
                        help="summary: records and fields (default); unified: diff -u of the sections")
    parser.add_argument("--color", "--colour", dest="color", choices=("auto", "always", "never"), default="auto",
                        help="colour output (default auto: only on a terminal, never with NO_COLOR)")
    parser.add_argument("-v", "--verbose", action="store_true", help="list the fields of added/removed records")
    add_client_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        registry = SyncItemRegistry.load(args.items_dir)
        report = diff_with_backup(ConfigStore(args.conf_dir), registry, client_options(args, ClientOptions()),
                                  args.items)
    except HaError as exc:
        if args.json:
            print(json.dumps({"status": "error", "source": "live", "fallback": False, "note": "", "target": "",
                              "snapshot_time": 0, "differences": 0, "items": [], "message": str(exc)}, indent=2))
        print(f"opnsense-ha: diff: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(render_json(report))
        return report.exit_code
    colour = colour_wanted(args.color, sys.stdout)
    if args.format == "unified":
        text = render_unified(report, colour)
        if text:
            print(text)
        if not report.differences:
            print("no differences")
    else:
        print(render_summary(report, colour, verbose_added=args.verbose))
    return report.exit_code
