"""Shared plumbing of the lab tests (marker `lab`): one lab at a time for the whole session,
rebuilt only when a test needs another variant or left the pair unhealthy, plus measuring helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from halab.lab import Lab, StreamRun, missing_binaries, namespace_support, probe_vip
from halab.topology import FW1, FW2, LAN_VIP, FirewallSpec, LabOptions

ADVBASE = 1
SYNCED_SKEW = 100  # what the sync adds to the backup's advskew (OPNsense's rule)
# acceptance (b): the LAN VIP answers via fw2 within 3 x advbase + advskew/256 + 1 s
UNPLANNED_BOUND = 3 * ADVBASE + SYNCED_SKEW / 256 + 1
RESUME_WINDOW = 10.0  # seconds after the VIP moved in which a surviving stream must flow again
DEFAULT = LabOptions(advbase=ADVBASE)


def skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the lab needs Linux network namespaces"
    if os.geteuid() != 0:
        return "lab tests need root (network namespaces, nftables, keepalived); run `sudo make test-lab`"
    missing = missing_binaries()
    if missing:
        return (f"lab tests need {', '.join(missing)} "
                "(Debian: apt-get install keepalived conntrackd conntrack nftables iproute2)")
    problem = namespace_support()
    if problem:
        return f"lab tests need network namespaces: {problem}"
    return None


class LabHolder:
    """One lab at a time, rebuilt when a test needs another variant or left it unhealthy."""

    def __init__(self) -> None:
        self.lab: Lab | None = None
        self.server: subprocess.Popen[str] | None = None

    def healthy(self) -> bool:
        lab = self.lab
        if lab is None or self.server is None or self.server.poll() is not None:
            return False
        try:
            status = lab.status()
        except Exception:
            return False
        if not status["up"]:
            return False
        for node in status["nodes"][:2]:
            wanted = "MASTER" if node["name"] == "fw1" else "BACKUP"
            if not node.get("carp") or any(row["status"] != wanted for row in node["carp"]):
                return False
            if node.get("demotion") != 0 or node.get("keepalived_pid") is None:
                return False
            if lab.options.state_sync and not (node["state_sync"]["running"] and node["state_sync"]["syncok"]):
                return False
            if node.get("preempt") != lab.options.preempt:
                return False
        return True

    def get(self, options: LabOptions) -> Lab:
        if self.lab is not None and self.lab.options == options and self.healthy():
            return self.lab
        self.close()
        self.lab = Lab(options)
        self.lab.up()
        self.server = self.lab.start_echo_server()
        return self.lab

    def close(self) -> None:
        if self.server is not None:
            self.server.kill()
            self.server.wait()
            self.server = None
        if self.lab is not None:
            self.lab.down()
            self.lab = None


_HOLDER = LabHolder()


def lab_session(request: pytest.FixtureRequest) -> LabHolder:
    """The session's lab holder (skips without root or binaries); the last lab is removed when
    the session ends, so consecutive lab modules share a lab instead of rebuilding it."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    if not getattr(request.config, "_hasync_lab_cleanup", False):
        request.config.add_cleanup(_HOLDER.close)
        request.config._hasync_lab_cleanup = True  # type: ignore[attr-defined]
    return _HOLDER


def state_times(lab: Lab, fw: FirewallSpec, state: str) -> list[float]:
    """Unix times at which each VRRP instance of `fw` last entered `state` (from notify.sh)."""
    backend = lab.backend(fw)
    times: list[float] = []
    for inst in backend.applied_instances():
        words = (backend.paths.state_dir / inst.name).read_text().split()
        if words and words[0] == state:
            times.append(float(words[1]))
    return times


def wait_resumed(run: StreamRun, after: float, timeout: float) -> bool:
    """True once every connection echoed a message after monotonic time `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run.status()
        if status.get("error"):
            return False
        if status.get("last_echo", 0.0) > after:
            return True
        time.sleep(0.05)
    return False


def restore_primary(lab: Lab) -> None:
    lab.set_links(FW1, True)
    lab.wait_states({FW1: "MASTER", FW2: "BACKUP"}, timeout=6 * ADVBASE + 6)


def gate_drops(lab: Lab, fw: FirewallSpec) -> int:
    """Packets the commit gate of `fw` has dropped so far."""
    result = lab._run(["nft", "-j", "list", "chain", "inet", "hasync_gate", "gate"], namespace=fw.namespace)
    drops = 0
    for item in json.loads(result.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and any("drop" in expr for expr in rule["expr"]):
            drops += sum(int(expr["counter"]["packets"]) for expr in rule["expr"] if "counter" in expr)
    return drops


def carp_status_json(lab: Lab, fw: FirewallSpec) -> dict[str, Any]:
    result = lab.opnsense_ha(fw, ["carp", "status", "--json"], check=True)
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def cut_primary_and_measure(lab: Lab, run: StreamRun) -> tuple[float, float, bool]:
    """Cut fw1's LAN and WAN links. Returns (seconds until the LAN VIP answered, monotonic time
    of that answer, whether the stream flowed again within RESUME_WINDOW of it)."""
    cut_at = time.monotonic()
    lab.set_links(FW1, False)
    probe = probe_vip(lab, LAN_VIP, timeout=UNPLANNED_BOUND + 5)
    assert probe["ok"], f"the LAN VIP never answered after fw1's links were cut: {probe}"
    answered = probe["time"] - cut_at
    resumed = wait_resumed(run, probe["time"], RESUME_WINDOW)
    return answered, probe["time"], resumed
