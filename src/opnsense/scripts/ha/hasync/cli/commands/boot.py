"""`opnsense-ha boot`: re-apply persistent CARP state after a restart (maintenance mode, preempt).

Hook it into OPNsense's early boot stage *before* `early/90-carp` (e.g. as
`/usr/local/etc/rc.syshook.d/early/85-opnsense-ha`), so our +240 is recorded as ours and
OPNsense's own check then sees the node already demoted. Idempotent within one boot.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hasync.failover.carp import open_ops


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("boot", help="re-apply maintenance mode and preempt at boot (idempotent)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_boot)


def _boot(args: argparse.Namespace) -> int:
    reply = open_ops(args.conf_dir).boot()
    if args.json:
        print(json.dumps(reply))
    else:
        print(f"maintenance mode {'on' if reply['maintenancemode'] else 'off'} "
              f"(demotion {reply['demotion_added']:+d}), preempt {'on' if reply['preempt'] else 'off'}")
        for message in reply.get("messages", []):
            print(f"note: {message}")
    return 0
