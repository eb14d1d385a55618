"""`opnsense-ha sync` and `opnsense-ha trust` (primary side)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hasync.cli.commands.common import add_client_options, client_options, failover_backend, item_list
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core import schemas
from hasync.core.memory import keep_until_exit
from hasync.sync.run import Step, SyncOptions, SyncRun, trust_store
from hasync.wire.client import ClientOptions

#: sync's exit status by result status; anything else is 1 (error).
EXIT_CODES = {"ok": 0, "error": 1, "lockout": 3, "rolled-back": 4, "unconfirmed": 5}


def register(subparsers: Any) -> None:
    sync = subparsers.add_parser("sync", help="push the selected config sections to the backup")
    sync.add_argument("--items", type=item_list, default=None, help="comma-separated sync item ids")
    sync.add_argument("--restart-services", action="store_true", help="reload templates and restart services")
    sync.add_argument("--pre-check-master", action="store_true",
                      help="only sync when every local CARP VIP is MASTER (for cron)")
    sync.add_argument("--dry-run", action="store_true", help="probe the backup and build the payload, send nothing")
    sync.add_argument("--ignore-version", action="store_true", help="sync despite a major/minor version skew")
    sync.add_argument("--full", action="store_true",
                      help="send every selected item (default: only items whose digests differ from the backup's)")
    sync.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                      help="always use OPNsense's XML-RPC call, even when the backup offers the fast path")
    sync.add_argument("--allow-lockout", action="store_true",
                      help="merge even if the sync account would lose its access to the backup (default: the "
                           "backup refuses such a merge and this exits 3)")
    sync.add_argument("--confirm", type=int, default=None, metavar="SECONDS",
                      help="commit-confirmed: the backup rolls the sync back after SECONDS unless this run "
                           "confirms it after checking the backup (default: the syncconfirm setting; 0: off). "
                           "Exit 4 rolled back, 5 not confirmed")
    sync.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    add_client_options(sync)
    sync.set_defaults(func=run_sync)

    trust = subparsers.add_parser("trust", help="show or reset pinned backup certificates (TOFU)")
    trust.add_argument("--reset", action="store_true", help="forget the pinned certificate(s)")
    trust.add_argument("--peer", default=None, help="only this host:port")
    trust.set_defaults(func=run_trust)


def print_step(step: Step) -> None:
    mark = "ok" if step.ok else "FAILED"
    detail = f": {step.detail}" if step.detail else ""
    print(f"[{step.seconds:7.3f}s] {step.step} {mark}{detail}", file=sys.stderr, flush=True)


def run_sync(args: argparse.Namespace) -> int:
    registry = SyncItemRegistry.load(args.items_dir)
    options = SyncOptions(
        items=args.items,
        restart_services=args.restart_services,
        pre_check_master=args.pre_check_master,
        dry_run=args.dry_run,
        ignore_version=args.ignore_version,
        client=client_options(args, ClientOptions()),
        full=args.full,
        fast_path=args.fast_path,
        allow_lockout=args.allow_lockout,
        confirm=args.confirm,
    )
    run = SyncRun(ConfigStore(args.conf_dir), registry, options,
                  failover=failover_backend(args.conf_dir) if args.pre_check_master else None,
                  progress=print_step)
    if args.ends_process:
        keep_until_exit(run)
    result = run.run()
    if args.json:
        document = result.as_json()
        schemas.validate("sync-result", document)
        print(json.dumps(document, indent=2))
    elif result.status in ("rolled-back", "unconfirmed"):
        print(f"opnsense-ha: sync {result.message}", file=sys.stderr)
    elif result.status != "ok":
        print(f"opnsense-ha: sync failed: {result.message}", file=sys.stderr)
    elif result.confirm.get("state") == "confirmed":
        print(f"opnsense-ha: sync confirmed (the backup would have rolled back at {result.confirm['deadline']})",
              file=sys.stderr)
    elif result.skipped:
        print(f"opnsense-ha: {result.skipped}", file=sys.stderr)
    return EXIT_CODES.get(result.status, 1)


def run_trust(args: argparse.Namespace) -> int:
    store = trust_store(args.conf_dir)
    if args.reset:
        removed = store.reset(args.peer)
        print(f"forgot {removed} pinned certificate(s)")
        return 0
    pins = store.pins()
    for peer, fp in sorted(pins.items()):
        print(f"{peer} {fp}")
    if not pins:
        print("no pinned certificates")
    return 0
