"""`python -m halab up|down|status`: the network-namespace failover lab (root), a development tool.

The lab lives outside the product package (`hasync` never imports it; pyroute2 is needed only
here), so its command is this module rather than an `opnsense-ha` subcommand. `make setup` puts
`dev/` on the virtualenv's path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from halab.lab import Lab
from halab.topology import LAB_DIR, LabError, LabOptions
from hasync.core.errors import HaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m halab", description="build, inspect or remove the namespace "
                                     "failover lab (root)")
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="(re)build the lab: namespaces, nftables, keepalived, conntrackd, agents")
    up.add_argument("--state-dir", type=Path, default=LAB_DIR, help=f"lab files (default {LAB_DIR})")
    up.add_argument("--no-state-sync", action="store_true", help="no conntrackd (connections will not survive)")
    up.add_argument("--no-gate", action="store_true", help="without the commit gate (keepalived #2254 race open)")
    up.add_argument("--lenient", action="store_true", help="lenient input chain instead of the pf-like one")
    up.add_argument("--no-preempt", action="store_true", help="hasync.disablepreempt=1 on both firewalls")
    up.add_argument("--multicast-sync", action="store_true", help="conntrackd multicast instead of unicast")
    up.add_argument("--no-agent", action="store_true", help="do not run `opnsense-ha serve` on the firewalls")
    up.add_argument("--direct-config", action="store_true",
                    help="write fw2's VIPs directly instead of syncing them from fw1")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    up.set_defaults(func=_up)
    down = sub.add_parser("down", help="remove everything the lab made (processes, namespaces, files)")
    down.add_argument("--state-dir", type=Path, default=LAB_DIR)
    down.set_defaults(func=_down)
    status = sub.add_parser("status", help="each node's namespace, conf dir, agent URL and CARP state")
    status.add_argument("--state-dir", type=Path, default=LAB_DIR)
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=_status)
    return parser


def _print(status: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(status, indent=2))
        return
    print(f"lab {'up' if status['up'] else 'DOWN'} in {status['state_dir']} "
          f"(LAN VIP {status['vips']['lan']}, WAN VIP {status['vips']['wan']})")
    for node in status["nodes"]:
        line = f"  {node['name']:<4} {node['namespace']:<7} {node['role']:<8}"
        if "conf_dir" in node:
            carp = " ".join(f"vhid{row['vhid']}={row['status']}" for row in node.get("carp", []))
            line += f" {carp or '-'}  demotion {node.get('demotion', '-')}  conf {node['conf_dir']}"
            if node.get("agent_url"):
                line += f"  agent {node['agent_url']}"
        else:
            line += f" {node['address']}"
        print(line)


def _up(args: argparse.Namespace) -> int:
    options = LabOptions(
        state_dir=args.state_dir, state_sync=not args.no_state_sync, gate=not args.no_gate,
        strict=not args.lenient, preempt=not args.no_preempt, multicast_sync=args.multicast_sync,
        agent=not args.no_agent, real_sync=not args.direct_config,
    )
    _print(Lab(options).up(), args.json)
    return 0


def _down(args: argparse.Namespace) -> int:
    lab = Lab(LabOptions(state_dir=args.state_dir))
    lab.preflight_root()
    for note in lab.down():
        print(f"halab: {note}")
    return 0


def _status(args: argparse.Namespace) -> int:
    try:
        lab = Lab.attach(args.state_dir)
    except LabError:
        lab = Lab(LabOptions(state_dir=args.state_dir))
    lab.preflight_root()
    status = lab.status()
    _print(status, args.json)
    return 0 if status["up"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except HaError as exc:
        print(f"halab: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
