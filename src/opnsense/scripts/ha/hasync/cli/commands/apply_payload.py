"""`opnsense-ha apply-payload FILE`: an offline sync with the same merge engine the agent uses.

The file is a payload in JSON form or the XML-RPC methodCall (as `opnsense-ha payload` prints
them). It is merged into the local config.xml under one exclusive lock and one new revision; the
merge report (no secret values) is printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.node.apply import apply_payload_file

log = logging.getLogger("hasync.apply_payload")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "apply-payload",
        help="merge a payload file (json or xmlrpc) into the local config, as a sync would",
        description="Merge a restore_config_section payload into config.xml (offline sync).",
    )
    parser.add_argument("file", metavar="FILE", help="payload file (JSON or XML-RPC methodCall)")
    parser.add_argument("--accept-unknown-sections", action="store_true",
                        help="also merge sections no registered sync item covers")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registry = SyncItemRegistry.load(args.items_dir)
    store = ConfigStore(args.conf_dir)
    report = apply_payload_file(store, args.file, registry, accept_unknown=args.accept_unknown_sections)
    for warning in report.warnings:
        log.warning("%s", warning)
    json.dump(report.public_dict(), sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
