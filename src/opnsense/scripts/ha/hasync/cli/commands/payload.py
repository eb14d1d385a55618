"""`opnsense-ha payload`: print exactly what a sync would send to the backup.

`--format json` prints the nested value (``@attributes`` keys as they travel); `--format xmlrpc`
prints the byte-exact `opnsense.restore_config_section` methodCall. The output carries the
secrets the sync carries (password hashes, private keys, CARP passwords) because it is meant to
be fed to `apply-payload` or compared byte for byte; `--redact` masks them for showing to a
person, and such output is refused by `apply-payload`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import SyncItemError
from hasync.payload.build import payload_for_items, redact, selected_item_ids
from hasync.wire import xmlrpc

log = logging.getLogger("hasync.payload")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "payload",
        help="print the payload a sync would send (json or the exact XML-RPC call)",
        description="Build the restore_config_section payload from the local config.xml.",
    )
    parser.add_argument("--items", default=None, metavar="A,B",
                        help="comma-separated sync item ids (default: hasync.syncitems)")
    parser.add_argument("--format", choices=("json", "xmlrpc"), default="json", help="output form (default json)")
    parser.add_argument("--redact", action="store_true",
                        help="mask secret values for display (the result cannot be applied)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    registry = SyncItemRegistry.load(args.items_dir)
    root = ConfigStore(args.conf_dir).load()
    ids = selected_item_ids(root, args.items)
    if args.items is None:
        # Stored ids: like rc.filter_synchronize, skip those no installed item defines.
        ids, unknown = registry.split_known(ids)
        if unknown:
            log.warning("ignoring sync item(s) stored in hasync that no item defines: %s", ", ".join(unknown))
        if not ids:
            raise SyncItemError("none of the sync items stored in hasync is known here")
    value = payload_for_items(root, registry, ids)
    if args.redact:
        value = redact(value)
    if args.format == "xmlrpc":
        sys.stdout.flush()
        sys.stdout.buffer.write(xmlrpc.dumps_request("opnsense.restore_config_section", [value]))
        sys.stdout.buffer.flush()
    else:
        json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    return 0
