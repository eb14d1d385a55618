"""`opnsense-ha version|status|services ...`: the status page's data about the backup."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from hasync.cli.commands.common import add_client_options, client_options
from hasync.cli.commands.sync import print_step
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError
from hasync.node import confirm_state as confirmmod
from hasync.sync.confirm import fetch_state
from hasync.sync.status import Remote, error_document
from hasync.wire.client import ClientOptions


def register(subparsers: Any) -> None:
    version = subparsers.add_parser("version", help="firmware versions of the backup and this node (JSON)")
    add_client_options(version)
    version.set_defaults(func=lambda a: _emit(a, lambda r: r.version()))

    status = subparsers.add_parser("status", help="the backup's versions and services")
    status.add_argument("--json", action="store_true")
    add_client_options(status)
    status.set_defaults(func=run_status)

    services = subparsers.add_parser("services", help="list or act on the backup's services (JSON)")
    actions = services.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list")
    add_client_options(listing)
    listing.set_defaults(func=lambda a: _emit(a, lambda r: r.services()))
    for action in ("start", "stop", "restart"):
        sub = actions.add_parser(action, help=f"sync, reload templates, then {action} NAME [ID]")
        sub.add_argument("name")
        sub.add_argument("id", nargs="?", default="")
        add_client_options(sub)
        sub.set_defaults(func=lambda a, act=action: _emit(a, lambda r: r.service_action(act, a.name, a.id)))
    templates = actions.add_parser("reload-templates", help="re-render the backup's configuration templates")
    add_client_options(templates)
    templates.set_defaults(func=lambda a: _emit(a, lambda r: r.reload_templates()))
    every = actions.add_parser("restart-all", help="Synchronize and reconfigure all")
    add_client_options(every)
    every.set_defaults(func=lambda a: _emit(a, lambda r: r.restart_all()))


def _remote(args: argparse.Namespace) -> Remote:
    return Remote(ConfigStore(args.conf_dir), SyncItemRegistry.load(args.items_dir),
                  client_options(args, ClientOptions()), progress=print_step)


def _emit(args: argparse.Namespace, action: Callable[[Remote], dict[str, Any]]) -> int:
    try:
        document = action(_remote(args))
        code = 0
    except HaError as exc:
        document, code = error_document(exc), 1
    print(json.dumps(document, indent=2))
    return code


def run_status(args: argparse.Namespace) -> int:
    try:
        remote = _remote(args)
        version = remote.version()
        services = remote.services()
        confirm = fetch_state(remote.peer())  # None on a stock backup
    except HaError as exc:
        if args.json:
            print(json.dumps(error_document(exc), indent=2))
        else:
            print(f"The backup firewall is not accessible: {exc}", file=sys.stderr)
        return 1
    if args.json:
        document = {"version": version["response"], "services": services["response"]}
        if confirm is not None:
            document["confirm"] = confirm
        print(json.dumps(document, indent=2))
        return 0
    firmware = version["response"].get("firmware", {})
    print(f"backup firmware {firmware.get('version', '?')} (this node {firmware.get('_my_version', '?')})")
    print(f"{'SERVICE':<24} {'ID':<6} {'STATUS':<8} DESCRIPTION")
    for service in services["response"]:
        state = "running" if service.get("status") else ("n/a" if service.get("nocheck") else "stopped")
        print(f"{service.get('name', ''):<24} {service.get('id', '') or '':<6} {state:<8} "
              f"{service.get('description', '')}")
    for line in confirmmod.describe(confirm or {}):
        print(line)
    return 0
