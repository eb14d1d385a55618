"""The Linux failover backend without root: rendering, the notify script, and the backend's
bookkeeping against a fake system that keeps the semantics it relies on.

* Rendering is checked structurally (parsed keepalived blocks, conntrackd sections, nft rules),
  and, where the real tool can check syntax without touching the system, by that tool.
* notify.sh is executed for real (POSIX sh, flock, timeout) with stand-in `conntrackd`, `nft` and
  `python` programs that log their argv, so the order of commit, gate and resync is observed, not
  assumed.
* The backend runs against `FakeLinux`, a CommandRunner that keeps pid files, signals, `ps`, the
  conntrackd daemon state and `ip -j addr`; demotion files are real files.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from hasync.config.vips import VipSpec
from hasync.core.errors import FailoverError
from hasync.core.osiface import CommandResult
from hasync.failover.base import FailoverBackend, PfsyncConfig
from hasync.failover.linux import KeepalivedBackend
from hasync.failover.linux_parse import carp_status, parse_conntrackd_links, parse_ip_json_addresses, parse_vrrp_state
from hasync.failover.linux_render import (
    RESIGN_DEMOTION,
    TRACK_LIMIT,
    LinuxOptions,
    LinuxPaths,
    SyncLink,
    VrrpInstance,
    build_instances,
    clamp_track,
    fill_template,
    render_conntrackd_conf,
    render_gate,
    render_keepalived_conf,
    render_notify_script,
    vrrp_priority,
)

CARP_SECRET = "carp-secret-Zq81-never-in-keepalived"


def vip(vhid: int, subnet: str, *, device: str = "lan0", interface: str = "lan", advbase: int = 1,
        advskew: int = 0, bits: int = 24, peer: str = "", mode: str = "carp") -> VipSpec:
    spec = VipSpec(interface=interface, device=device, vhid=vhid, advbase=advbase, advskew=advskew,
                   subnet=subnet, subnet_bits=bits, password=CARP_SECRET, peer=peer, uuid=f"u{vhid}-{subnet}")
    spec.mode = mode  # type: ignore[attr-defined]  # as hasync.carp tags specs
    return spec


def parse_blocks(text: str) -> list[tuple[str, list[str]]]:
    """keepalived.conf's top-level blocks as (header, body lines), comments dropped."""
    blocks: list[tuple[str, list[str]]] = []
    depth = 0
    header = ""
    body: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if depth == 0 and line.endswith("{"):
            header, body = line[:-1].strip(), []
            depth = 1
            continue
        depth += line.count("{") - line.count("}")
        if depth == 0:
            blocks.append((header, body))
        else:
            body.append(line)
    return blocks


def instances_of(text: str) -> dict[str, list[str]]:
    return {h.split()[1]: b for h, b in parse_blocks(text) if h.startswith("vrrp_instance ")}


def value(body: list[str], key: str) -> str | None:
    for line in body:
        parts = line.split()
        if parts and parts[0] == key:
            return " ".join(parts[1:])
    return None


# --- priority and instance building -------------------------------------------------------------------


def test_priority_keeps_carp_order_and_vrrp_range() -> None:
    priorities = [vrrp_priority(skew) for skew in range(255)]
    assert all(1 <= p <= 254 for p in priorities)
    assert all(a >= b for a, b in itertools.pairwise(priorities))  # worse skew, never better
    assert vrrp_priority(0) == 250 and vrrp_priority(100) == 150  # the mapping
    assert vrrp_priority(0) > vrrp_priority(100)  # the primary beats the synced backup (+100)


def test_track_value_clamps_where_keepalived_would_fault() -> None:
    assert clamp_track(2**20) == TRACK_LIMIT and clamp_track(-(2**20)) == -TRACK_LIMIT
    assert clamp_track(240) == 240 and clamp_track(-5) == -5


def test_instances_group_by_vhid_device_and_family() -> None:
    specs = [
        vip(1, "10.77.1.1"),
        vip(1, "10.77.1.9", mode="ipalias", advskew=0),  # an IP alias on the same vhid
        vip(2, "10.77.2.1", device="wan0", interface="wan", advskew=20, advbase=2),
        vip(1, "fd00::1", bits=64),
    ]
    instances = build_instances(specs)
    names = [i.name for i in instances]
    assert len(set(names)) == len(names) == 3
    lan4 = next(i for i in instances if i.device == "lan0" and i.family == 4)
    assert lan4.addresses == ("10.77.1.1/24", "10.77.1.9/24")
    lan6 = next(i for i in instances if i.family == 6)
    assert lan6.vhid == 1 and not lan6.primary and lan4.primary  # one CARP event per vhid
    wan = next(i for i in instances if i.device == "wan0")
    assert (wan.vhid, wan.advbase, wan.advskew, wan.interface) == (2, 2, 20, "wan")


def test_vhid_parameters_come_from_the_carp_record_not_an_alias() -> None:
    specs = [vip(5, "10.0.0.9", mode="ipalias", advskew=0), vip(5, "10.0.0.1", advskew=42, mode="carp")]
    (inst,) = build_instances(specs)
    assert inst.advskew == 42


@pytest.mark.parametrize(("change", "message"), [
    ({"vhid": 0}, "vhid must be 1..255"),
    ({"vhid": 256}, "vhid must be 1..255"),
    ({"advbase": 41}, "VRRPv3"),
    ({"advbase": 0}, "advbase must be"),
    ({"advskew": 255}, "advskew must be"),
    ({"device": "lan0; rm -rf /"}, "not a valid interface"),
    ({"subnet": "10.0.0.300"}, "not an IP address"),
    ({"subnet_bits": 33}, "out of range"),
    ({"peer": "fd00::2"}, "address family"),
])
def test_bad_vips_are_refused_with_a_reason(change: dict[str, object], message: str) -> None:
    spec = vip(1, "10.77.1.1")
    for key, new in change.items():
        setattr(spec, key, new)
    with pytest.raises(FailoverError, match=re.escape(message)):
        build_instances([spec])


# --- keepalived.conf ----------------------------------------------------------------------------------


def lab_like(advskew: int = 0) -> list[VrrpInstance]:
    return build_instances([vip(1, "10.77.1.1", advskew=advskew),
                            vip(2, "10.77.2.1", device="wan0", interface="wan", advskew=advskew)])


def test_keepalived_conf_one_instance_per_vhid_in_one_sync_group(tmp_path: Path) -> None:
    paths = LinuxPaths(tmp_path)
    text = render_keepalived_conf(lab_like(advskew=100), paths, preempt=True, router_id="fw2")
    blocks = dict(parse_blocks(text))
    instances = instances_of(text)
    assert set(instances) == {"VH1_lan0", "VH2_wan0"}
    group = blocks["vrrp_sync_group hasync"]
    assert {"VH1_lan0", "VH2_wan0"} <= set(group)
    assert "sync_group_tracking_weight" in group  # else keepalived ignores weighted tracking in groups
    for name, vhid, device in (("VH1_lan0", "1", "lan0"), ("VH2_wan0", "2", "wan0")):
        body = instances[name]
        assert value(body, "virtual_router_id") == vhid
        assert value(body, "advert_int") == "1"
        assert value(body, "priority") == str(vrrp_priority(100))
        assert value(body, "state") == "BACKUP"
        assert value(body, "interface") == device
        assert "nopreempt" not in body
        assert "hasync_demotion weight -1" in body and "hasync_resign weight 0" in body
        assert value(body, "notify") == f'"{paths.notify_script}"'
    assert "vrrp_version 3" in blocks["global_defs"]
    track = blocks["vrrp_track_file hasync_demotion"]
    assert value(track, "file") == f'"{paths.track_file}"' and value(track, "weight") == "-1"
    assert CARP_SECRET not in text  # VRRPv3 has no authentication; the CARP password stays out


def test_nopreempt_needs_and_gets_state_backup(tmp_path: Path) -> None:
    text = render_keepalived_conf(lab_like(), LinuxPaths(tmp_path), preempt=False)
    for body in instances_of(text).values():
        assert "nopreempt" in body and value(body, "state") == "BACKUP"


def test_single_instance_has_no_sync_group_and_unicast_peer(tmp_path: Path) -> None:
    insts = build_instances([vip(7, "192.0.2.1", peer="192.0.2.3")])
    text = render_keepalived_conf(insts, LinuxPaths(tmp_path), preempt=True)
    assert not any(h.startswith("vrrp_sync_group") for h, _ in parse_blocks(text))
    body = instances_of(text)["VH7_lan0"]
    assert "192.0.2.3" in body[body.index("unicast_peer {") + 1]


def _sbin(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


@pytest.mark.skipif(_sbin("keepalived") is None or _sbin("unshare") is None, reason="keepalived not installed")
def test_real_keepalived_accepts_the_rendered_config(tmp_path: Path) -> None:
    """`keepalived -t` in a throw-away network namespace (gone when the command exits)."""
    if os.geteuid() != 0:
        pytest.skip("keepalived -t with real interfaces needs root (a private network namespace)")
    insts = build_instances([vip(1, "192.0.2.1", device="vt0", interface="lan"),
                             vip(2, "198.51.100.1", device="vt1", interface="wan", advskew=100, peer="198.51.100.3")])
    paths = LinuxPaths(tmp_path)
    conf = tmp_path / "keepalived.conf"
    conf.write_text(render_keepalived_conf(insts, paths, preempt=False, router_id="unit test"))
    paths.notify_script.write_text("#!/bin/sh\nexit 0\n")
    paths.notify_script.chmod(0o755)
    os.chmod(tmp_path, 0o755)
    script = ("ip link add vt0 type veth peer name vt1 && "
              "ip addr add 192.0.2.2/24 dev vt0 && ip addr add 198.51.100.2/24 dev vt1 && "
              f'exec {_sbin("keepalived")} -t -f "$0"')
    result = subprocess.run([_sbin("unshare") or "unshare", "--net", "sh", "-c", script, str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# --- conntrackd.conf ----------------------------------------------------------------------------------


def sections(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def test_conntrackd_unicast_when_a_peer_is_set(tmp_path: Path) -> None:
    paths = LinuxPaths(tmp_path / "fw1")
    text = render_conntrackd_conf(SyncLink("sync0", "10.77.3.1", "10.77.3.2"), paths, ignore=["10.77.1.2"])
    lines = sections(text)
    assert "Mode FTFW {" in lines and "UDP {" in lines and "Multicast {" not in lines
    assert "IPv4_address 10.77.3.1" in lines and "IPv4_Destination_Address 10.77.3.2" in lines
    assert "Interface sync0" in lines
    assert f"Path {paths.conntrackd_sock}" in lines and f"LockFile {paths.conntrackd_lock}" in lines
    assert "IPv4_address 10.77.1.2" in lines and "IPv4_address 127.0.0.1" in lines


def test_conntrackd_multicast_without_a_peer(tmp_path: Path) -> None:
    text = render_conntrackd_conf(SyncLink("sync0", "10.77.3.1", None), LinuxPaths(tmp_path), ignore=[])
    lines = sections(text)
    assert "Multicast {" in lines and "UDP {" not in lines
    assert "IPv4_interface 10.77.3.1" in lines and "Interface sync0" in lines


def test_two_nodes_on_one_machine_never_share_sockets_or_locks(tmp_path: Path) -> None:
    link = SyncLink("sync0", "10.77.3.1", "10.77.3.2")
    one = sections(render_conntrackd_conf(link, LinuxPaths.for_conf_dir(tmp_path / "a"), ignore=[]))
    two = sections(render_conntrackd_conf(link, LinuxPaths.for_conf_dir(tmp_path / "b"), ignore=[]))
    own = {line for line in one if line.startswith(("Path ", "LockFile ", "LogFile "))}
    assert len(own) == 3 and not own & set(two)


def test_conntrackd_paths_it_cannot_parse_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FailoverError, match="blanks"):
        render_conntrackd_conf(SyncLink("sync0", "10.0.0.1", None), LinuxPaths(tmp_path / "a b"), ignore=[])
    with pytest.raises(FailoverError, match="UNIX socket"):
        render_conntrackd_conf(SyncLink("sync0", "10.0.0.1", None), LinuxPaths(tmp_path / ("x" * 120)), ignore=[])


# --- the commit gate ----------------------------------------------------------------------------------


def test_gate_rules_drop_unsynced_traffic_only_while_closed() -> None:
    closed = render_gate(lab_like(), open_=False)
    opened = render_gate(lab_like(), open_=True)
    assert 'set ifaces { type ifname; elements = { "lan0", "wan0" }; }' in closed
    assert "set open { type ifname; }" in closed
    assert 'set open { type ifname; elements = { "lan0", "wan0" }; }' in opened
    chain = closed[closed.index("chain gate"):]
    order = [chain.index(part) for part in ("priority -150", "iifname @open accept",
                                            "ct state established,related accept", "meta l4proto vrrp accept",
                                            "ip daddr @vips4", "fib daddr type", "counter drop\n\t}")]
    assert order == sorted(order)
    assert "10.77.1.1, 10.77.2.1" in closed


def test_no_vips_means_no_gate() -> None:
    text = render_gate([], open_=False)
    assert "chain" not in text and "delete table inet hasync_gate" in text


@pytest.mark.skipif(_sbin("nft") is None, reason="nft not installed")
def test_real_nft_accepts_the_gate(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("nft -c needs root")
    insts = build_instances([vip(1, "10.77.1.1"), vip(1, "fd00::1", bits=64)])
    for open_ in (False, True):
        rules = tmp_path / f"gate-{open_}.nft"
        rules.write_text(render_gate(insts, open_=open_))
        nft = _sbin("nft") or "nft"
        result = subprocess.run([nft, "-c", "-f", str(rules)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr


# --- notify.sh, executed ------------------------------------------------------------------------------


class NotifyRig:
    """A rendered notify.sh with stand-in programs that log what they were asked to do."""

    def __init__(self, root: Path, *, sync: bool = True, instances: list[VrrpInstance] | None = None,
                 commit: str = "exit 0", commit_timeout: int = 10, gate: bool = True) -> None:
        self.root = root
        self.log = root / "calls.log"
        bin_dir = root / "bin"
        bin_dir.mkdir()
        self.paths = LinuxPaths(root / "run")
        self.paths.run_dir.mkdir()
        self.paths.state_dir.mkdir()
        fakes = {
            "conntrackd": f'echo "conntrackd $3" >> {self.log}\nif [ "$3" = -c ]; then {commit}; fi\nexit 0\n',
            "nft": f'echo "nft $*" >> {self.log}\n',
            "python": f'echo "hook $*" >> {self.log}\n',
        }
        for name, body in fakes.items():
            path = bin_dir / name
            path.write_text("#!/bin/sh\n" + body)
            path.chmod(0o755)
        options = LinuxOptions(conntrackd=str(bin_dir / "conntrackd"), nft=str(bin_dir / "nft"),
                               python=str(bin_dir / "python"), commit_timeout=commit_timeout, gate=gate,
                               hook_dir="/hooks")
        self.instances = instances if instances is not None else lab_like()
        script = render_notify_script(self.instances, self.paths, options, conf_dir="/conf", sync=sync)
        self.paths.notify_script.write_text(script)
        self.paths.notify_script.chmod(0o755)

    def fire(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/bin/sh", str(self.paths.notify_script), *args], capture_output=True, text=True,
                              timeout=30)

    def calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def wait_calls(self, predicate: object, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            calls = self.calls()
            if callable(predicate) and predicate(calls):
                return calls
            time.sleep(0.02)
        return self.calls()


needs_sh = pytest.mark.skipif(any(shutil.which(n) is None for n in ("flock", "timeout")),
                              reason="flock/timeout (util-linux, coreutils) not installed")


@needs_sh
def test_master_commits_before_the_gate_opens_then_resyncs(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path)
    assert rig.fire("GROUP", "hasync", "MASTER", "0").returncode == 0
    calls = [c for c in rig.calls() if not c.startswith("hook")]
    assert calls == ["conntrackd -c", 'nft add element inet hasync_gate open { "lan0", "wan0" }',
                     "conntrackd -f", "conntrackd -R", "conntrackd -B"]
    assert rig.paths.group_state.read_text().strip() == "MASTER"


@needs_sh
def test_backup_closes_the_gate_then_shortens_timers_and_requests_resync(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path)
    for state in ("BACKUP", "FAULT", "STOP"):
        rig.log.unlink(missing_ok=True)
        rig.fire("GROUP", "hasync", state, "0")
        assert rig.calls() == ["nft flush set inet hasync_gate open", "conntrackd -t", "conntrackd -n"]
        assert rig.paths.group_state.read_text().strip() == state


@needs_sh
def test_a_failed_commit_still_opens_the_gate_and_says_so(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, commit="exit 1")
    rig.fire("GROUP", "hasync", "MASTER", "0")
    assert any("nft add element" in c for c in rig.calls())
    assert "conntrackd -c failed (exit 1)" in rig.paths.events.read_text()


@needs_sh
def test_a_hanging_commit_is_bounded(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, commit="sleep 30", commit_timeout=1)
    started = time.monotonic()
    rig.fire("GROUP", "hasync", "MASTER", "0")
    assert time.monotonic() - started < 10
    assert any("nft add element" in c for c in rig.calls())
    assert "exit 124" in rig.paths.events.read_text()


@needs_sh
def test_without_state_sync_only_the_gate_moves(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, sync=False)
    rig.fire("GROUP", "hasync", "MASTER", "0")
    rig.fire("GROUP", "hasync", "BACKUP", "0")
    assert [c.split()[0] for c in rig.calls()] == ["nft", "nft"]


@needs_sh
def test_gate_off_runs_plain_primary_backup_sequence(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, gate=False)
    rig.fire("GROUP", "hasync", "MASTER", "0")
    assert rig.calls() == ["conntrackd -c", "conntrackd -f", "conntrackd -R", "conntrackd -B"]


@needs_sh
def test_a_superseded_transition_is_skipped(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, commit="sleep 1")
    first = subprocess.Popen(["/bin/sh", str(rig.paths.notify_script), "GROUP", "hasync", "MASTER", "0"])
    rig.wait_calls(lambda calls: "conntrackd -c" in calls)
    rig.fire("GROUP", "hasync", "BACKUP", "0")  # waits for the lock, then runs
    rig.fire("GROUP", "hasync", "MASTER", "0")
    first.wait(timeout=30)
    # the last transition wins: the node ends MASTER with the gate open
    assert rig.paths.group_state.read_text().strip() == "MASTER"
    assert rig.calls()[-4].startswith("nft add element")


@needs_sh
def test_instance_records_state_and_runs_carp_hooks(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, commit_timeout=1)  # hooks wait at most ~4 s for the group
    rig.fire("INSTANCE", "VH2_wan0", "MASTER", "150")
    rig.fire("INSTANCE", "VH1_lan0", "FAULT", "250")
    assert parse_vrrp_state((rig.paths.state_dir / "VH2_wan0").read_text()) == "MASTER"
    assert parse_vrrp_state((rig.paths.state_dir / "VH1_lan0").read_text()) == "FAULT"
    calls = rig.wait_calls(lambda calls: len([c for c in calls if c.startswith("hook")]) == 2, timeout=10)
    hooks = sorted(c for c in calls if c.startswith("hook"))
    assert hooks == ["hook -m hasync --conf-dir /conf carp event 1@lan0 INIT --hook-dir /hooks",
                     "hook -m hasync --conf-dir /conf carp event 2@wan0 MASTER --hook-dir /hooks"]
    assert not any(c.startswith("conntrackd") for c in calls)  # grouped: the GROUP event does that


@needs_sh
def test_hooks_wait_for_the_node_wide_transition(tmp_path: Path) -> None:
    """The CARP hook (a Python start-up) runs only once the GROUP handler finished: it must not
    compete with the commit for the CPU, and a MASTER hook should find the gate open."""
    rig = NotifyRig(tmp_path)
    rig.fire("INSTANCE", "VH1_lan0", "MASTER", "250")
    time.sleep(0.5)
    assert not any(c.startswith("hook") for c in rig.calls())
    rig.fire("GROUP", "hasync", "MASTER", "0")
    calls = rig.wait_calls(lambda calls: any(c.startswith("hook") for c in calls))
    gate_opened = next(i for i, c in enumerate(calls) if c.startswith("nft add element"))
    assert calls.index("conntrackd -c") < gate_opened < next(i for i, c in enumerate(calls) if c.startswith("hook"))
    assert "hook -m hasync --conf-dir /conf carp event 1@lan0 MASTER --hook-dir /hooks" in calls


@needs_sh
def test_a_lone_instance_also_drives_state_sync(tmp_path: Path) -> None:
    rig = NotifyRig(tmp_path, instances=build_instances([vip(3, "10.1.1.1")]))
    rig.fire("INSTANCE", "VH3_lan0", "MASTER", "250")
    calls = rig.wait_calls(lambda calls: any(c.startswith("hook") for c in calls))
    assert [c for c in calls if c.startswith("conntrackd")] == ["conntrackd -c", "conntrackd -f", "conntrackd -R",
                                                                "conntrackd -B"]


# --- parsers ------------------------------------------------------------------------------------------


def test_parsers() -> None:
    link = ("UDP traffic device=sync0 status=RUNNING role=ACTIVE:\n   40 Bytes sent   48 Bytes recv\n"
            "UDP traffic device=sync1 status=DOWN role=BACKUP:\n"
            "UDP traffic device=sync2 status=NO-CARRIER role=BACKUP:\n")
    assert parse_conntrackd_links(link) == {"sync0": "RUNNING", "sync1": "DOWN", "sync2": "NO-CARRIER"}
    assert parse_vrrp_state("MASTER 1795653209.90\n") == "MASTER" and parse_vrrp_state("garbage") is None
    assert [carp_status(s) for s in ("MASTER", "BACKUP", "FAULT", "STOP", None)] == [
        "MASTER", "BACKUP", "INIT", "INIT", "INIT"]
    ip_json = json.dumps([{"ifname": "sync0", "addr_info": [{"family": "inet", "local": "10.77.3.1", "prefixlen": 24}]},
                          {"ifname": "lo", "addr_info": []}])
    assert parse_ip_json_addresses(ip_json) == {"sync0": [("10.77.3.1", 24)]}
    with pytest.raises(FailoverError, match="JSON"):
        parse_ip_json_addresses("not json")


# --- the backend against a fake system ----------------------------------------------------------------


class FakeLinux:
    """A CommandRunner with the behaviour the backend depends on.

    keepalived writes its pid file and stays alive until SIGTERM; /proc/<pid>/comm names live pids;
    conntrackd -d starts a daemon that answers `-s link` until `-k`; `ip -j addr` reports addresses.
    """

    def __init__(self, addresses: dict[str, list[tuple[str, int]]]) -> None:
        self.addresses = addresses
        self.calls: list[list[str]] = []
        self.alive: dict[int, str] = {}
        self.next_pid = 4000
        self.conntrackd_starts = 0
        self.conntrackd_running = False
        self.loaded_gates: list[str] = []

    def _ok(self, argv: Sequence[str], out: str = "") -> CommandResult:
        return CommandResult(tuple(argv), 0, out, "")

    def _fail(self, argv: Sequence[str], err: str = "") -> CommandResult:
        return CommandResult(tuple(argv), 1, "", err)

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0) -> CommandResult:
        argv = list(argv)
        self.calls.append(argv)
        name = os.path.basename(argv[0])
        if name == "cat" and argv[1].startswith("/proc/") and argv[1].endswith("/comm"):
            comm = self.alive.get(int(argv[1].split("/")[2]))
            return self._ok(argv, comm + "\n") if comm else self._fail(argv)
        if name == "sh" and argv[1] == "-c" and argv[2].startswith("kill -"):
            pid = int(argv[4])
            if pid not in self.alive:
                return self._fail(argv, "no such process")
            if argv[2].split()[1] in ("-TERM", "-KILL"):
                del self.alive[pid]
            return self._ok(argv)
        if name == "keepalived":
            if "-t" in argv:
                return self._ok(argv)
            self.next_pid += 1
            Path(argv[argv.index("-p") + 1]).write_text(f"{self.next_pid}\n")
            self.alive[self.next_pid] = "keepalived"
            return self._ok(argv)
        if name == "conntrackd":
            if "-d" in argv:
                self.conntrackd_running = True
                self.conntrackd_starts += 1
                return self._ok(argv)
            if not self.conntrackd_running:
                return self._fail(argv, "cannot connect to the daemon")
            if "-k" in argv:
                self.conntrackd_running = False
            if "-s" in argv:
                return self._ok(argv, "UDP traffic device=sync0 status=RUNNING role=ACTIVE:\n")
            return self._ok(argv)
        if name == "nft":
            self.loaded_gates.append(Path(argv[-1]).read_text())
            return self._ok(argv)
        if name == "ip":
            device = argv[argv.index("dev") + 1] if "dev" in argv else None
            links = [{"ifname": dev, "addr_info": [{"family": "inet", "local": a, "prefixlen": p} for a, p in addrs]}
                     for dev, addrs in self.addresses.items() if device in (None, dev)]
            return self._ok(argv, json.dumps(links))
        return self._fail(argv, f"{name}: unexpected in this test")

    def signals(self, name: str) -> int:
        return sum(1 for argv in self.calls if argv[:2] == ["sh", "-c"] and argv[2].startswith(f"kill -{name} "))

    def count(self, *words: str) -> int:
        return sum(1 for argv in self.calls if all(w in argv for w in words))


CONFIG = """<?xml version="1.0"?>
<opnsense>
  <interfaces>
    <lan><if>lan0</if><ipaddr>10.77.1.2</ipaddr><subnet>24</subnet></lan>
    <wan><if>wan0</if><ipaddr>10.77.2.2</ipaddr><subnet>24</subnet></wan>
    <opt1><if>sync0</if><ipaddr>10.77.3.1</ipaddr><subnet>24</subnet></opt1>
  </interfaces>
  <hasync>
    <disablepreempt>{disablepreempt}</disablepreempt>
    <pfsyncinterface>opt1</pfsyncinterface>
    <pfsyncpeerip>10.77.3.2</pfsyncpeerip>
  </hasync>
  <virtualip>
    <vip uuid="a"><interface>lan</interface><mode>carp</mode><subnet>10.77.1.1</subnet><subnet_bits>24</subnet_bits>
      <vhid>1</vhid><advbase>1</advbase><advskew>0</advskew><password>{secret}</password></vip>
    <vip uuid="b"><interface>wan</interface><mode>carp</mode><subnet>10.77.2.1</subnet><subnet_bits>24</subnet_bits>
      <vhid>2</vhid><advbase>1</advbase><advskew>0</advskew><password>{secret}</password></vip>
  </virtualip>
</opnsense>
"""


@pytest.fixture
def node(tmp_path: Path) -> tuple[KeepalivedBackend, FakeLinux]:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.xml").write_text(CONFIG.format(disablepreempt="0", secret=CARP_SECRET))
    fake = FakeLinux({"lo": [("127.0.0.1", 8)], "lan0": [("10.77.1.2", 24)], "sync0": [("10.77.3.1", 24)]})
    options = LinuxOptions(keepalived="/usr/sbin/keepalived", conntrackd="/usr/sbin/conntrackd", nft="/usr/sbin/nft",
                           hooks=False)
    backend = KeepalivedBackend(conf, fake, options=options)
    backend.start()
    return backend, fake


def set_states(backend: KeepalivedBackend, state: str) -> None:
    for inst in backend.applied_instances():
        (backend.paths.state_dir / inst.name).write_text(f"{state} 1.0\n")


def test_from_conf_dir_is_what_the_factory_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hasync.failover.factory import get_backend

    monkeypatch.setenv("OPNSENSE_HA_FAILOVER", "keepalived")
    backend = get_backend(tmp_path, FakeLinux({}))
    assert isinstance(backend, KeepalivedBackend) and isinstance(backend, FailoverBackend)
    assert backend.paths.run_dir == tmp_path / "linux-ha"


def test_start_renders_everything_and_runs_the_daemons(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    assert backend.keepalived_pid() is not None and fake.conntrackd_running
    assert set(instances_of(backend.paths.keepalived_conf.read_text())) == {"VH1_lan0", "VH2_wan0"}
    assert "IPv4_Destination_Address 10.77.3.2" in backend.paths.conntrackd_conf.read_text()
    assert "SYNC=1" in backend.paths.notify_script.read_text()
    assert os.access(backend.paths.notify_script, os.X_OK)
    assert "chain gate" in fake.loaded_gates[-1] and "elements = { \"lan0\"" in fake.loaded_gates[-1]
    assert CARP_SECRET not in "".join(p.read_text() for p in backend.paths.run_dir.iterdir() if p.is_file())


def test_demotion_is_additive_and_shared(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node
    other = KeepalivedBackend.from_conf_dir(backend.conf_dir, FakeLinux({}))  # another process, same node
    backend.add_demotion(100)
    other.add_demotion(240)
    backend.add_demotion(-240)
    assert backend.carp_globals().demotion == other.carp_globals().demotion == 100
    backend.add_demotion(2**20)  # OPNsense's service-check demotion
    assert backend.carp_globals().demotion == 100 + 2**20
    assert int(backend.paths.track_file.read_text()) == TRACK_LIMIT  # keepalived saturates, never FAULTs
    backend.add_demotion(-(2**20) - 100)
    assert backend.carp_globals().demotion == 0 and int(backend.paths.track_file.read_text()) == 0


def test_concurrent_demotion_writers_lose_nothing(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node

    def writer() -> None:
        mine = KeepalivedBackend.from_conf_dir(backend.conf_dir, FakeLinux({}))
        for _ in range(50):
            mine.add_demotion(1)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert backend.carp_globals().demotion == 200


def watch_resign(backend: KeepalivedBackend, react: bool) -> tuple[threading.Thread, list[str]]:
    """Plays keepalived: when the resign file says 1, the instances leave MASTER (if `react`)."""
    seen: list[str] = []

    def loop() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            text = backend.paths.resign_file.read_text().strip()
            if not seen or seen[-1] != text:
                seen.append(text)
            if text == "1" and react:
                set_states(backend, "FAULT")
            if seen[-1] == "0" and len(seen) > 1:
                return
            time.sleep(0.002)

    thread = threading.Thread(target=loop)
    thread.start()
    return thread, seen


def test_reaching_240_makes_a_master_resign_once(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node
    set_states(backend, "MASTER")
    thread, seen = watch_resign(backend, react=True)
    backend.add_demotion(RESIGN_DEMOTION)
    thread.join()
    assert seen == ["0", "1", "0"]  # faulted for a moment, then an ordinary node again
    set_states(backend, "MASTER")
    backend.add_demotion(10)  # already past 240: no second resignation
    assert backend.paths.resign_file.read_text().strip() == "0"


def test_small_demotion_or_a_backup_never_resigns(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node
    set_states(backend, "MASTER")
    backend.add_demotion(100)  # below 240: keepalived's own priority handling (RFC 5798)
    assert backend.paths.resign_file.read_text().strip() == "0"
    set_states(backend, "BACKUP")
    backend.add_demotion(200)
    assert backend.paths.resign_file.read_text().strip() == "0"


def test_vip_states_map_keepalived_to_carp(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node
    (backend.paths.state_dir / "VH1_lan0").write_text("MASTER 1.0\n")
    (backend.paths.state_dir / "VH2_wan0").write_text("FAULT 1.0\n")
    rows = {(r.vhid, r.subnet): r for r in backend.vip_states()}
    assert rows[(1, "10.77.1.1/24")].status == "MASTER" and rows[(1, "10.77.1.1/24")].interface == "lan"
    assert rows[(2, "10.77.2.1/24")].status == "INIT"
    backend.set_allow(False)
    assert {r.status for r in backend.vip_states()} == {"DISABLED"} and backend.keepalived_pid() is None
    assert backend.carp_globals().allow is False
    backend.configure_vips([], [vip(1, "10.77.1.1"), vip(2, "10.77.2.1", device="wan0", interface="wan")])
    # `carp disable` also takes the VIPs down; the configured ones are still listed, DISABLED
    assert backend.applied_instances() == []
    assert sorted((r.vhid, r.status) for r in backend.vip_states()) == [(1, "DISABLED"), (2, "DISABLED")]
    backend.set_allow(True)  # then, as `carp enable` does, the VIPs come back
    backend.configure_vips([vip(1, "10.77.1.1"), vip(2, "10.77.2.1", device="wan0", interface="wan")], [])
    assert backend.keepalived_pid() is not None and backend.carp_globals().allow is True


def test_stopped_keepalived_reports_init(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    set_states(backend, "MASTER")
    fake.alive.clear()
    assert {r.status for r in backend.vip_states()} == {"INIT"}


def test_unchanged_state_sync_is_not_reapplied(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    """conntrackd's #10858: a restart would drop the peer's states; re-applying must be a no-op."""
    backend, fake = node
    desired = PfsyncConfig(syncdev="sync0", syncpeer="10.77.3.2")
    starts = fake.conntrackd_starts
    assert backend.apply_pfsync(desired) is False
    assert backend.apply_pfsync(desired) is False
    assert fake.conntrackd_starts == starts and fake.count("-k") == 0
    assert backend.apply_pfsync(PfsyncConfig(syncdev="sync0", syncpeer=None)) is True  # -> multicast
    assert fake.conntrackd_starts == starts + 1
    assert "Multicast {" in backend.paths.conntrackd_conf.read_text()
    state = backend.pfsync_state()
    assert state.enabled and state.running and state.syncok and state.syncpeer is None
    assert backend.apply_pfsync(PfsyncConfig(syncdev=None, syncpeer=None)) is True
    assert not fake.conntrackd_running and "SYNC=0" in backend.paths.notify_script.read_text()
    assert backend.pfsync_state().enabled is False
    assert backend.apply_pfsync(PfsyncConfig(syncdev=None, syncpeer=None)) is False


def test_a_dead_conntrackd_is_reported_and_restarted(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    fake.conntrackd_running = False
    state = backend.pfsync_state()
    assert state.enabled and not state.running and state.syncok is False
    assert backend.apply_pfsync(PfsyncConfig(syncdev="sync0", syncpeer="10.77.3.2")) is True
    assert fake.conntrackd_running


def test_state_sync_needs_an_address_on_the_link(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, _ = node
    with pytest.raises(FailoverError, match="no IPv4 address"):
        backend.apply_pfsync(PfsyncConfig(syncdev="lan9", syncpeer="10.77.3.2"))
    with pytest.raises(FailoverError, match="pfsyncpeerip"):
        backend.apply_pfsync(PfsyncConfig(syncdev="sync0", syncpeer="not-an-ip"))


def test_configure_vips_merges_and_reloads_only_on_change(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    pid = backend.keepalived_pid()
    hups = fake.signals("HUP")
    lan, wan = build_instances([vip(1, "10.77.1.1"), vip(2, "10.77.2.1", device="wan0", interface="wan")])
    changed = vip(2, "10.77.2.1", device="wan0", interface="wan", advskew=100)
    backend.configure_vips([changed], [])
    instances = instances_of(backend.paths.keepalived_conf.read_text())
    assert value(instances["VH2_wan0"], "priority") == str(vrrp_priority(100))
    assert value(instances["VH1_lan0"], "priority") == str(vrrp_priority(0))  # untouched VIPs stay
    assert fake.signals("HUP") == hups + 1 and backend.keepalived_pid() == pid
    backend.configure_vips([changed], [])
    assert fake.signals("HUP") == hups + 1  # nothing changed, no reload
    backend.configure_vips([], [vip(1, "10.77.1.1")])
    assert set(instances_of(backend.paths.keepalived_conf.read_text())) == {"VH2_wan0"}
    assert '"lan0"' not in fake.loaded_gates[-1]
    everything = [vip(1, "10.77.1.1"), vip(2, "10.77.2.1", device="wan0", interface="wan")]
    backend.configure_vips([], everything)  # what `carp disable` asks for
    assert backend.keepalived_pid() is None and backend.vip_states() == []
    assert lan.name == "VH1_lan0" and wan.name == "VH2_wan0"


def test_bad_vip_changes_nothing(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    before = backend.paths.keepalived_conf.read_text()
    calls = len(fake.calls)
    with pytest.raises(FailoverError):
        backend.configure_vips([vip(300, "10.77.9.1")], [])
    assert backend.paths.keepalived_conf.read_text() == before and len(fake.calls) == calls


def test_preempt_switch_rerenders_and_reloads(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    hups = fake.signals("HUP")
    backend.set_preempt(False)
    assert all("nopreempt" in body for body in instances_of(backend.paths.keepalived_conf.read_text()).values())
    assert backend.carp_globals().preempt is False and fake.signals("HUP") == hups + 1
    backend.set_preempt(True)
    assert not any("nopreempt" in body for body in instances_of(backend.paths.keepalived_conf.read_text()).values())


def test_the_counter_starts_at_zero_with_every_boot(tmp_path: Path) -> None:
    """Like net.inet.carp.demotion: kept across processes, reset when the machine reboots."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.xml").write_text(CONFIG.format(disablepreempt="0", secret=CARP_SECRET))
    kernel = tmp_path / "boot_id"
    kernel.write_text("boot-one\n")
    fake = FakeLinux({"sync0": [("10.77.3.1", 24)]})
    options = LinuxOptions(keepalived="/usr/sbin/keepalived", conntrackd="/usr/sbin/conntrackd", nft="/usr/sbin/nft")
    first = KeepalivedBackend(conf, fake, options=options, kernel_boot_id=kernel)
    first.add_demotion(240)
    epoch = first.boot_id()
    again = KeepalivedBackend(conf, fake, options=options, kernel_boot_id=kernel)
    assert again.carp_globals().demotion == 240 and again.boot_id() == epoch and len(epoch) == 32
    kernel.write_text("boot-two\n")  # the machine rebooted
    after = KeepalivedBackend(conf, fake, options=options, kernel_boot_id=kernel)
    assert after.carp_globals().demotion == 0 and after.paths.track_file.read_text().strip() == "0"
    assert after.boot_id() != epoch
    after.add_demotion(7)
    assert KeepalivedBackend(conf, fake, options=options, kernel_boot_id=kernel).carp_globals().demotion == 7


def test_stop_takes_everything_down(node: tuple[KeepalivedBackend, FakeLinux]) -> None:
    backend, fake = node
    backend.stop()
    assert backend.keepalived_pid() is None and not fake.conntrackd_running
    assert "chain" not in fake.loaded_gates[-1]


def test_the_notify_template_and_its_values_must_match(tmp_path: Path) -> None:
    """A field the code does not fill (or a value for no field) is a bug, never a literal `@X@`
    left in the script keepalived runs."""
    template = tmp_path / "t.sh.template"
    template.write_text("A=@A@ B=@B@ @A@\n")
    assert fill_template(template, {"A": "@B@", "B": "1"}) == "A=@B@ B=1 @B@\n"  # one pass: values are not rescanned
    with pytest.raises(ValueError, match="fields"):
        fill_template(template, {"A": "1"})
    with pytest.raises(ValueError, match="fields"):
        fill_template(template, {"A": "1", "B": "2", "C": "3"})
