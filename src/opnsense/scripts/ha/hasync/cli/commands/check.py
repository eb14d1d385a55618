"""`opnsense-ha check`: health of the HA pair for cron, monit and Nagios (exit 0/1/2/3).

Output: a Nagios status line plus one line per check (default), a JSON document validated
against `schemas/check-result.schema.json` (--json), or one line of at most 512 bytes for monit
(--monit). Every non-OK check is also sent to syslog as one line (unless --no-syslog).

monit example (`/usr/local/etc/monit.opnsense.d/opnsense-ha.conf`)::

    check program opnsense_ha with path "/usr/local/sbin/opnsense-ha check --monit"
        every 2 cycles
        if status == 1 then alert
        if status > 1 then alert

A failure of the check itself (unreadable config.xml) is UNKNOWN (exit 3), as Nagios expects.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from hasync.cli.commands.common import add_client_options, client_options, failover_backend
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError
from hasync.health import checks
from hasync.wire.client import ClientOptions


def _ids(text: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise argparse.ArgumentTypeError("expected a comma-separated list of check ids")
    return ids


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "check", help="health checks of the HA pair (Nagios exit codes 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN)")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="JSON document (schema check-result)")
    output.add_argument("--monit", action="store_true", help="one line of at most 512 bytes, for monit")
    parser.add_argument("--only", type=_ids, default=None, metavar="IDS",
                        help=f"run only these checks ({', '.join(checks.CHECK_IDS)})")
    parser.add_argument("--skip", type=_ids, default=None, metavar="IDS", help="leave these checks out")
    parser.add_argument("--expiry-days", type=int, default=checks.EXPIRY_DAYS,
                        help=f"warn when the agent certificate expires within this many days "
                             f"(default {checks.EXPIRY_DAYS})")
    parser.add_argument("--no-syslog", action="store_true", help="do not log non-OK checks to syslog")
    parser.add_argument("--syslog-socket", default=checks.SYSLOG_SOCKET, help=argparse.SUPPRESS)
    add_client_options(parser)
    parser.set_defaults(func=run, connect_timeout=5.0, timeout=15.0, retries=0)


def _error_document(message: str) -> dict[str, Any]:
    return {"status": checks.UNKNOWN, "exit_code": 3, "node": "", "role": "unknown", "peer": "", "fallback": False,
            "time": round(time.time(), 3), "summary": message, "checks": []}


def run(args: argparse.Namespace) -> int:
    try:
        store = ConfigStore(args.conf_dir)
        context = checks.CheckContext(
            store=store,
            registry=SyncItemRegistry.load(args.items_dir),
            failover=failover_backend(args.conf_dir),
            client_options=client_options(args, ClientOptions()),
            expiry_days=args.expiry_days,
        )
        report = checks.run_checks(context, args.only, args.skip)
    except HaError as exc:
        message = f"check could not run: {exc}"
        if args.json:
            print(json.dumps(_error_document(message), indent=2))
        else:
            print(f"OPNSENSE-HA UNKNOWN - {message}" if not args.monit else f"UNKNOWN: {message}"[:512])
        return 3
    if not args.no_syslog:
        checks.emit_syslog(report, args.syslog_socket)
    if args.json:
        print(json.dumps(checks.render_json(report), indent=2))
    elif args.monit:
        print(checks.render_monit(report))
    else:
        print(checks.render_text(report))
    return report.exit_code
