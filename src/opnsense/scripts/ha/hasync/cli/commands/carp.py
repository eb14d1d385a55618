"""`opnsense-ha carp ...`: CARP status, maintenance mode, disable/enable, preempt, transition events.

Replies of the changing actions are JSON in OPNsense's `carp_set_status` shape
(`{"status": "ok", "action": ...}`), so configd actions can hand them to the GUI unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from hasync.core.logsetup import setup_syslog
from hasync.failover.carp import CarpOps, open_ops
from hasync.failover.hooks import DEFAULT_HOOK_DIR, DEFAULT_TIMEOUT, run_carp_hooks


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("carp", help="CARP status and control (maintenance, disable, preempt, events)")
    sub = parser.add_subparsers(dest="carp_command", metavar="ACTION", required=True)

    status = sub.add_parser("status", help="VIP states and the demotion counter")
    status.add_argument("--json", action="store_true", help="OPNsense get_vip_status JSON (+ 'hasync' facts)")
    status.set_defaults(func=_status)

    maintenance = sub.add_parser("maintenance", help="persistent maintenance mode (+240 demotion)")
    maintenance.add_argument("mode", choices=("enter", "leave"))
    maintenance.set_defaults(func=_maintenance)

    sub.add_parser("disable", help="temporarily disable CARP (allow=0, VIP addresses removed)").set_defaults(
        func=lambda args: _reply(_ops(args).disable()))
    sub.add_parser("enable", help="undo a temporary disable").set_defaults(
        func=lambda args: _reply(_ops(args).enable()))

    preempt = sub.add_parser("preempt", help="switch preemption on/off (persisted in hasync.disablepreempt)")
    preempt.add_argument("mode", choices=("on", "off"))
    preempt.set_defaults(func=lambda args: _reply(_ops(args).set_preempt(args.mode == "on")))

    set_status = sub.add_parser("set-status", help="OPNsense carp_set_status: maintenance (toggle)|disable|enable")
    set_status.add_argument("action")
    set_status.set_defaults(func=_set_status)

    event = sub.add_parser("event", help="run the CARP transition hooks: <vhid>@<if> <MASTER|BACKUP|INIT>")
    event.add_argument("subsystem", help="<vhid>@<interface>, e.g. 1@vtnet0")
    event.add_argument("state", help="MASTER, BACKUP or INIT")
    event.add_argument("--hook-dir", default=str(DEFAULT_HOOK_DIR), help=f"(default {DEFAULT_HOOK_DIR})")
    event.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per script")
    event.set_defaults(func=_event)


def _ops(args: argparse.Namespace) -> CarpOps:
    return open_ops(args.conf_dir)


def _reply(reply: dict[str, Any]) -> int:
    """Print the reply; exit 0 like OPNsense's carp_set_status.php even for {"status": "failed"},
    because configd's script_output would replace the JSON by "Execute error" otherwise. Real
    failures raise HaError (exit 2)."""
    print(json.dumps(reply))
    return 0


def _maintenance(args: argparse.Namespace) -> int:
    ops = _ops(args)
    return _reply(ops.maintenance_enter() if args.mode == "enter" else ops.maintenance_leave())


def _set_status(args: argparse.Namespace) -> int:
    return _reply(_ops(args).set_status(args.action))


def _status(args: argparse.Namespace) -> int:
    status = _ops(args).status()
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print(format_status(status))
    return 0


def format_status(status: dict[str, Any]) -> str:
    """A terminal view of `CarpOps.status()`."""
    carp = status["carp"]
    facts = status["hasync"]
    lines = [
        f"CARP {'allowed' if carp['allow'] == '1' else 'DISABLED'}, demotion {carp['demotion']} "
        f"(maintenance {facts['maintenance_demotion']}, other {facts['external_demotion']}), "
        f"maintenance mode {'ON' if carp['maintenancemode'] else 'off'}, "
        f"preempt {'on' if facts['preempt'] else 'off'} (backend {facts['backend']})",
    ]
    lines += [f"  demotion cause: {cause}" for cause in facts["external_demotion_causes"]]
    if carp["status_msg"]:
        lines.append("  " + carp["status_msg"].replace("<br />", " "))
    header = f"{'VHID':<18} {'INTERFACE':<14} {'ADDRESS':<28} {'MODE':<8} STATUS"
    lines.append(header)
    for row in status["rows"]:
        lines.append(f"{row['vhid_txt']:<18} {row['interface'] or '-':<14} {row['subnet']:<28} "
                     f"{row['mode']:<8} {row['status_txt']}")
    return "\n".join(lines)


def _event(args: argparse.Namespace) -> int:
    setup_syslog()
    results = run_carp_hooks(args.subsystem, args.state, hook_dir=args.hook_dir, timeout=args.timeout)
    failed = [r for r in results if r.returncode != 0]
    for result in failed:
        print(f"opnsense-ha: carp hook {result.script} failed (exit {result.returncode})", file=sys.stderr)
    return 1 if failed else 0
