"""`opnsense-ha rollback` and `opnsense-ha history`: undo the last sync on the backup.

On the backup: `rollback` restores, byte for byte, the config from before the last sync (see
`hasync.rollback`), then reconfigures CARP VIPs, pfsync, the filter and the affected services.
From the primary: `rollback --remote` asks the backup's agent to do the same (`hasync.rollback`);
a stock OPNsense backup cannot, and the message says where to do it by hand instead.

Exit codes: 0 restored (or nothing to do), 1 refused (config changed since the sync; --force
overrides), 2 error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hasync.agent.serve import service_backend
from hasync.cli.commands.common import add_client_options, client_options, failover_backend
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError
from hasync.core.paths import state_dir
from hasync.node import confirm_state as confirmmod
from hasync.node import rollback as rollbackmod
from hasync.services.backends import ServiceBackend
from hasync.sync.run import peer_from_settings
from hasync.wire.client import ClientOptions, PeerClient
from hasync.wire.discovery import as_struct, discover

STOCK_ROLLBACK = (
    "the backup {peer} offers no hasync.rollback (a stock OPNsense backup, or our agent with --no-extensions): "
    "roll back on the backup itself, in System > Configuration > History, choosing the revision before "
    "'Merged ... config sections from XMLRPC client.'"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rollback", help="restore the backup's config from before the last sync (exit 0 ok, 1 refused, 2 error)")
    parser.add_argument("--remote", action="store_true", help="from the primary: roll back the backup via its agent")
    parser.add_argument("--force", action="store_true", help="roll back even if the config changed since the sync")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--services-dir", type=Path, default=None, metavar="DIR",
                        help="service drop-in directory for the reconfiguration (as `serve --services-dir`)")
    parser.add_argument("--no-restart", action="store_true", help="reload the filter but restart no service")
    add_client_options(parser)
    parser.set_defaults(func=run_rollback)

    history = subparsers.add_parser("history", help="list config revisions (and which one rollback would restore)")
    history.add_argument("--remote", action="store_true", help="the backup's history, via its agent")
    history.add_argument("--json", action="store_true", help="print JSON")
    add_client_options(history)
    history.set_defaults(func=run_history)


def _peer(args: argparse.Namespace) -> PeerClient:
    store = ConfigStore(args.conf_dir)
    root = store.load()
    return peer_from_settings(store.conf_dir, root, read_hasync(root), client_options(args, ClientOptions()))


def _remote(args: argparse.Namespace, method: str, params: list[Any]) -> dict[str, Any]:
    peer = _peer(args)
    if not discover(peer).has(method):
        raise HaError(STOCK_ROLLBACK.format(peer=peer.peer_key))
    return as_struct(peer.call(method, params))


def _services(services_dir: Path | None) -> tuple[ServiceBackend | None, str]:
    try:
        return service_backend(services_dir), ""
    except HaError as exc:
        return None, str(exc)


def run_rollback(args: argparse.Namespace) -> int:
    try:
        if args.remote:
            document = _remote(args, "hasync.rollback", [{"force": bool(args.force)}])
        else:
            store = ConfigStore(args.conf_dir)
            services, why = _services(args.services_dir)
            result = rollbackmod.rollback(
                store, SyncItemRegistry.load(args.items_dir), state_dir=state_dir(store.conf_dir),
                services=services, failover=failover_backend(args.conf_dir), force=args.force,
                reconfigure_services=not args.no_restart,
            )
            if why and result.status == "ok" and result.changed_sections:
                result.warnings.append(f"services: {why}")
            document = result.as_json()
    except HaError as exc:
        document = {"status": "error", "message": str(exc), "warnings": []}
    status = str(document.get("status", "error"))
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        stream = sys.stdout if status in ("ok", "noop") else sys.stderr
        print(f"opnsense-ha: rollback {status}: {document.get('message', '')}", file=stream)
        if status == "ok":
            restarted = document.get("services_restarted") or []
            print(f"  changed sections: {', '.join(document.get('changed_sections') or []) or '(none)'}")
            print(f"  VIPs reconfigured: {document.get('vips_reconfigured', 0)}, removed: "
                  f"{document.get('vips_removed', 0)}; filter reloaded: "
                  f"{'yes' if document.get('filter_reloaded') else 'no'}; services restarted: "
                  f"{', '.join(restarted) or '(none)'}")
        for warning in document.get("warnings") or []:
            print(f"  warning: {warning}", file=sys.stderr)
    return {"ok": 0, "noop": 0, "refused": 1}.get(status, 2)


def run_history(args: argparse.Namespace) -> int:
    if args.remote:
        document = _remote(args, "hasync.history", [])
    else:
        store = ConfigStore(args.conf_dir)
        document = confirmmod.with_state(rollbackmod.history_document(store, state_dir(store.conf_dir)),
                                         state_dir(store.conf_dir))
    if args.json:
        print(json.dumps(document, indent=2))
        return 0
    print(f"config history of {document.get('node') or 'this node'} (newest first):")
    for entry in document.get("entries") or []:
        marks = []
        if entry.get("current"):
            marks.append("current")
        if entry.get("sync"):
            marks.append("sync")
        if entry.get("preserved"):
            marks.append("kept by opnsense-ha before a merge, not in backup/")
        if entry.get("rollback_target"):
            marks.append("rollback target")
        if entry.get("restored_from"):
            marks.append(f"rollback, restored {entry['restored_from']}")
        mark = f" [{', '.join(marks)}]" if marks else ""
        print(f"  {entry.get('time_iso', '')}  {entry.get('file', '')}  {entry.get('username', '') or '-'}: "
              f"{entry.get('description', '')}{mark}")
    plan = as_struct(document.get("rollback", {}))
    print(f"rollback: {plan.get('reason', '')}")
    for line in confirmmod.describe(as_struct(document.get("confirm", {}))):
        print(line)
    return 0
