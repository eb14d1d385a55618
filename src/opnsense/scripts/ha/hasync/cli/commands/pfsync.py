"""`opnsense-ha pfsync status|apply`: state sync as configured in hasync vs. as running.

`apply` changes the OS only when the running settings differ (re-applying demotes CARP by 240
on FreeBSD, OPNsense issue #10858), so it is safe to call from link-event hooks.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hasync.failover.carp import open_ops


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("pfsync", help="state sync (pfsync/conntrackd) status and apply")
    sub = parser.add_subparsers(dest="pfsync_command", metavar="ACTION", required=True)
    for name, text in (("status", "running vs configured state sync"), ("apply", "apply hasync's settings if changed")):
        action = sub.add_parser(name, help=text)
        action.add_argument("--json", action="store_true", help="machine-readable output")
        action.set_defaults(func=_run, pfsync_action=name)


def _run(args: argparse.Namespace) -> int:
    ops = open_ops(args.conf_dir)
    reply = ops.pfsync_status() if args.pfsync_action == "status" else ops.pfsync_apply()
    if args.json:
        print(json.dumps(reply, indent=2))
    else:
        print(format_pfsync(reply))
    return 0  # differences are in the output; a non-zero exit would make configd drop it


def format_pfsync(reply: dict[str, Any]) -> str:
    state = reply["pfsync"]
    if state["enabled"]:
        line = (f"state sync on: syncdev {state['syncdev']}, peer {state['syncpeer'] or 'multicast'}, "
                f"version {state['version'] or '?'}, defer {'on' if state['defer'] else 'off'}, "
                f"syncok {'?' if state['syncok'] is None else int(state['syncok'])}")
    else:
        line = "state sync off"
    if state["detail"]:
        line += f" ({state['detail']})"
    out = [line]
    if "changed" in reply:
        out.append("applied changes" if reply["changed"] else "already as configured; nothing changed")
    for diff in reply.get("differences", []):
        out.append(f"  differs: {diff}")
    return "\n".join(out)
