"""`make bench-failover`: failover figures measured in the namespace lab (root).

For each of ``--runs`` runs (default 5) it measures, with ``--connections`` parallel long-lived
TCP streams (default 10) from the client to the server through the firewall pair:

* unplanned failover: fw1's LAN and WAN links are cut. "VIP takeover" is the time from the cut to
  the first ICMP reply of the LAN VIP (now via fw2); "TCP gap" is the longest time any stream
  went without an echo around the failover;
* planned handover: `carp maintenance enter` on fw1 (the same CarpOps the CLI uses, in-process so
  Python's start-up is not counted). "fw2 MASTER" is the time from the call to the moment fw2's
  keepalived reported MASTER for every vhid; "TCP gap" as above; "back to fw1" is the gap when
  `leave` hands the VIPs back (preempt);
* connection survival: the share of streams that came through the run (failover and failback)
  with no reset and every message echoed in order.

It prints one table (min / median / max over the runs) and, with ``--json FILE``, the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from halab.lab import Lab, StreamRun, missing_binaries, probe_vip, start_stream
from halab.topology import FW1, FW2, LAN_VIP, LabError, LabOptions
from hasync.config.store import ConfigStore
from hasync.failover.carp import CarpOps


def wait_resumed(run: StreamRun, after: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run.status()
        if status.get("last_echo", 0.0) > after:
            return True
        time.sleep(0.05)
    return False


def survived(summary: dict[str, Any]) -> tuple[int, int]:
    streams = summary.get("streams") or []
    ok = sum(1 for st in streams if st["error"] is None and st["echoed"] == st["sent"])
    return ok, len(streams)


def unplanned_run(lab: Lab, connections: int) -> dict[str, float]:
    run = start_stream(lab, connections=connections, name="bench-unplanned")
    try:
        time.sleep(1.0)
        cut = time.monotonic()
        lab.set_links(FW1, False)
        probe = probe_vip(lab, LAN_VIP, timeout=15)
        if not probe["ok"]:
            raise LabError("the LAN VIP did not answer after the cut")
        wait_resumed(run, probe["time"], 15)
        time.sleep(1.0)
        gap = run.status()["max_gap"]
        lab.set_links(FW1, True)
        lab.wait_states({FW1: "MASTER", FW2: "BACKUP"}, timeout=15)
        time.sleep(1.5)
    finally:
        lab.set_links(FW1, True)
        summary = run.stop()
    ok, total = survived(summary)
    return {"vip_takeover_s": probe["time"] - cut, "tcp_gap_s": gap, "survival": ok / total if total else 0.0,
            "survived": ok, "connections": total}


def planned_run(lab: Lab, connections: int) -> dict[str, float]:
    ops = CarpOps(ConfigStore(lab.conf_dir(FW1)), lab.backend(FW1))
    run = start_stream(lab, connections=connections, name="bench-planned")
    entered = False
    try:
        time.sleep(1.0)
        started = time.time()
        ops.maintenance_enter()
        entered = True
        lab.wait_states({FW2: "MASTER"}, timeout=10)
        backend = lab.backend(FW2)
        master_at = max(float((backend.paths.state_dir / inst.name).read_text().split()[1])
                        for inst in backend.applied_instances())
        time.sleep(1.5)
        enter_gap = run.status()["max_gap"]
        ops.maintenance_leave()
        entered = False
        lab.wait_states({FW1: "MASTER", FW2: "BACKUP"}, timeout=15)
        time.sleep(1.5)
    finally:
        if entered:
            ops.maintenance_leave()
        summary = run.stop()
    ok, total = survived(summary)
    return {"fw2_master_s": master_at - started, "tcp_gap_s": enter_gap, "leave_gap_s": summary["max_gap"],
            "survival": ok / total if total else 0.0, "survived": ok, "connections": total}


ROWS: list[tuple[str, str, str, Callable[[float], str]]] = [
    ("unplanned", "vip_takeover_s", "unplanned failover: LAN VIP answers via fw2 (s)", lambda v: f"{v:.3f}"),
    ("unplanned", "tcp_gap_s", "unplanned failover: longest TCP gap (s)", lambda v: f"{v:.3f}"),
    ("unplanned", "survival", "unplanned failover + failback: connections surviving", lambda v: f"{v:.0%}"),
    ("planned", "fw2_master_s", "maintenance enter: fw2 MASTER after (s)", lambda v: f"{v:.3f}"),
    ("planned", "tcp_gap_s", "maintenance enter: longest TCP gap (s)", lambda v: f"{v:.3f}"),
    ("planned", "leave_gap_s", "maintenance enter + leave: longest TCP gap (s)", lambda v: f"{v:.3f}"),
    ("planned", "survival", "maintenance enter + leave: connections surviving", lambda v: f"{v:.0%}"),
]


def table(results: dict[str, list[dict[str, float]]], connections: int) -> str:
    width = max(len(label) for _, _, label, _ in ROWS)
    lines = [f"{'metric':<{width}}  runs  {'min':>7}  {'median':>7}  {'max':>7}"]
    for kind, key, label, fmt in ROWS:
        values = [run[key] for run in results[kind]]
        if not values:
            continue
        lines.append(f"{label:<{width}}  {len(values):>4}  {fmt(min(values)):>7}  "
                     f"{fmt(statistics.median(values)):>7}  {fmt(max(values)):>7}")
    for kind in ("unplanned", "planned"):
        ok = sum(int(run["survived"]) for run in results[kind])
        total = sum(int(run["connections"]) for run in results[kind])
        if total:
            lines.append(f"{kind} total: {ok}/{total} connections survived ({connections} per run)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None, help="also write the raw numbers here")
    parser.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench-failover needs root (it builds the namespace lab)", file=sys.stderr)
        return 2
    missing = missing_binaries()
    if missing:
        print(f"bench-failover needs {', '.join(missing)} (apt-get install keepalived conntrackd conntrack "
              "nftables iproute2)", file=sys.stderr)
        return 2
    lab = Lab(LabOptions())
    print("building the lab ...", file=sys.stderr, flush=True)
    status = lab.up()
    server = lab.start_echo_server()
    results: dict[str, list[dict[str, float]]] = {"unplanned": [], "planned": []}
    try:
        for index in range(args.runs):
            for kind, measure in (("unplanned", unplanned_run), ("planned", planned_run)):
                figures = measure(lab, args.connections)
                results[kind].append(figures)
                shown = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
                print(f"run {index + 1}/{args.runs} {kind}: {shown}", file=sys.stderr, flush=True)
    finally:
        server.kill()
        if not args.keep:
            lab.down()
    print(f"failover in the lab: advbase 1 s, fw2 advskew 100 (synced: {status['real_sync']}), "
          f"{args.connections} TCP streams at 50 msg/s each, {args.runs} runs")
    print(table(results, args.connections))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
