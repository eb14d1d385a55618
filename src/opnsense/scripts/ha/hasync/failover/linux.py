"""Linux failover: keepalived (VRRPv3) + conntrackd (FTFW) + an nftables commit gate.

The same config.xml that drives CARP/pfsync on OPNsense is rendered into:

* ``keepalived.conf``: one ``vrrp_instance`` per CARP vhid (and address family), all members of
  one ``vrrp_sync_group`` so the node fails over as a whole, like CARP with a shared demotion.
  ``virtual_router_id`` = vhid, ``advert_int`` = advbase, ``priority`` = 250 - advskew (1..254),
  ``nopreempt`` when ``hasync.disablepreempt`` is 1 (keepalived needs ``state BACKUP`` for that,
  so every instance starts BACKUP, which is also what a CARP node does).
* ``conntrackd.conf`` (FTFW) from the hasync pfsync fields: ``pfsyncinterface`` is the dedicated
  link, ``pfsyncpeerip`` makes it unicast UDP, multicast otherwise.
* ``notify.sh``: keepalived's notify script. GROUP transitions run conntrack-tools'
  primary-backup.sh sequence (MASTER: commit, flush, resync, bulk send; BACKUP: ``-t``, ``-n``);
  INSTANCE transitions record the state (read back by `vip_states`) and feed the CARP hooks
  (``opnsense-ha carp event <vhid>@<dev> <MASTER|BACKUP|INIT>``).
* an nftables table ``hasync_gate``: the fix for the race of keepalived issue #2254.

The race. keepalived adds the VIPs and sends gratuitous ARPs *before* its notify script runs, and
does not wait for it. Until ``conntrackd -c`` has committed the synced states, a packet of a
synced connection that reaches the new master finds no conntrack entry: a lenient ruleset lets
the local stack answer it with a RST (the server's segments are addressed to the SNAT VIP, which
is now local), or the packet creates a fresh conntrack entry that the commit then has to fight.
The gate is a prerouting chain at priority -150 (after conntrack lookup at -200, before NAT and
the filter): while closed it drops, on the VIP interfaces, every packet that is not part of a
connection the kernel already tracks, except VRRP and traffic to the node's own (non-VIP)
addresses. Dropped before NAT and before conntrack confirmation, such a packet leaves no state
behind and provokes no answer; TCP simply retransmits. The notify script opens the gate only
after ``conntrackd -c`` has returned (the client waits until the daemon closed the commit), and
closes it again on any transition away from MASTER. Established flows are let through a closed
gate on purpose: a demoted master keeps forwarding the connections it already tracks for the
clients whose ARP caches still point at it (the drain), so a planned handover loses nothing.

The demotion counter ("our sysctl") lives in a file that only ever gets deltas added, exactly as
FreeBSD's ``net.inet.carp.demotion``. keepalived tracks a second file holding the counter clamped
to +-253 (keepalived turns anything beyond -253 into FAULT; CARP just saturates the skew).
keepalived follows RFC 5798, where a backup ignores a lower-priority advertisement and waits the
full master-down interval (~3 s), whereas a CARP backup with preempt takes over at the first
worse advertisement. To keep CARP's "maintenance hands over in well under a second",
`add_demotion` makes a MASTER whose demotion reaches 240 (the skew at which CARP saturates, so any
healthy peer is better) resign: a one-shot FAULT through a weight-0 ``track_file``, which sends a
priority-0 advertisement; the peer takes over after its skew time (~0.4 s at priority 150).
One difference stays: a MASTER with no live peer that enters maintenance is without its VIPs for
about 3 x advbase until it takes them back, where CARP keeps them. VRRP backups are silent, so the
master cannot know whether anyone listens (conntrackd's heartbeat would tell, but only after a
second of sampling, too late for a sub-second handover).

Runtime files live in ``<conf dir>/linux-ha/`` (so several nodes share a machine in the lab):
the rendered configs, pid/lock/socket files, one state file per instance written by notify.sh,
the counter (reset to 0 when /proc/sys/kernel/random/boot_id changes, like the sysctl at boot)
and ``options.json`` (binaries, gate, log mode), which every process opening the node reads. A
node with a single vhid runs without a sync group (keepalived drops a group of one); its INSTANCE
event then does the GROUP work. CARP hooks start once the GROUP work is done, so their Python
start-up never competes with the commit.

All commands go through the `CommandRunner`; the renderers are pure functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.core.errors import ConfigError, FailoverError
from hasync.core.osiface import Clock, CommandResult, CommandRunner, SystemClock
from hasync.failover.base import (
    CarpGlobals,
    FailoverBackend,
    PfsyncConfig,
    PfsyncState,
    VipSpec,
    VipState,
    check_vip_spec,
    vhid_owner,
)
from hasync.failover.model import carp_vips, pfsync_config, preempt_wanted

log = logging.getLogger(__name__)

RUN_DIR_NAME = "linux-ha"
BASE_PRIORITY = 250
TRACK_LIMIT = 253  # keepalived: a tracked value * weight below -253 means FAULT
RESIGN_DEMOTION = 240  # CARP's maximum skew: from here on any healthy peer advertises better
SYNC_GROUP = "hasync"
GATE_TABLE = "hasync_gate"
TRACK_DEMOTION = "hasync_demotion"
TRACK_RESIGN = "hasync_resign"
CONNTRACKD_PORT = 3780
CONNTRACKD_MCAST_GROUP = "225.0.0.50"
MAX_V3_ADVBASE = 40  # VRRPv3 carries the interval in 12 bits of centiseconds (max 40.95 s)
UNIX_PATH_MAX = 107
VRRP_STATES = ("MASTER", "BACKUP", "FAULT", "STOP")

_DEVICE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,14}$")
_LINK_RE = re.compile(r"device=(?P<device>\S+)\s+status=(?P<status>[A-Z][A-Z_-]*)")


# --- what gets rendered ---------------------------------------------------------------------------


@dataclass(frozen=True)
class VrrpInstance:
    """One keepalived vrrp_instance: a CARP vhid on one device, for one address family."""

    name: str
    interface: str  # config interface key ("lan")
    device: str  # OS device ("lan0")
    vhid: int
    advbase: int
    advskew: int
    family: int  # 4 or 6
    addresses: tuple[str, ...]  # "10.77.1.1/24"
    peer: str = ""  # unicast peer ("" = multicast)
    primary: bool = True  # the instance that reports this vhid's CARP events (v4 when both exist)

    @property
    def priority(self) -> int:
        return vrrp_priority(self.advskew)

    @property
    def carp_subsystem(self) -> str:
        return f"{self.vhid}@{self.device}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VrrpInstance:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["addresses"] = tuple(values.get("addresses", ()))
        return cls(**values)


@dataclass(frozen=True)
class SyncLink:
    """conntrackd's dedicated link: device, our IPv4 on it, and the unicast peer (None = multicast)."""

    device: str
    local: str
    peer: str | None


@dataclass(frozen=True)
class LinuxPaths:
    """Every runtime file of one node, under one directory (distinct per node, so several nodes
    can share a machine, as in the lab)."""

    run_dir: Path

    @classmethod
    def for_conf_dir(cls, conf_dir: str | os.PathLike[str]) -> LinuxPaths:
        return cls(Path(conf_dir) / RUN_DIR_NAME)

    def __getattr__(self, name: str) -> Path:
        try:
            return self.run_dir / _FILES[name]
        except KeyError:
            raise AttributeError(name) from None


_FILES = {
    "keepalived_conf": "keepalived.conf",
    "keepalived_pid": "keepalived.pid",
    "vrrp_pid": "keepalived-vrrp.pid",
    "keepalived_log": "keepalived.log",
    "conntrackd_conf": "conntrackd.conf",
    "conntrackd_sock": "conntrackd.sock",
    "conntrackd_lock": "conntrackd.lock",
    "conntrackd_log": "conntrackd.log",
    "notify_script": "notify.sh",
    "gate_rules": "gate.nft",
    "state_dir": "state",
    "group_state": "group.state",
    "demotion": "demotion",
    "track_file": "demotion.track",
    "resign_file": "resign",
    "epoch": "epoch",
    "allow": "allow",
    "preempt": "preempt",
    "instances_json": "instances.json",
    "pfsync_json": "pfsync.json",
    "options_json": "options.json",
    "lock": "backend.lock",
    "events": "events.log",
    "hooks_log": "hooks.log",
}


@dataclass(frozen=True)
class LinuxOptions:
    """How this node runs its daemons. Saved next to the runtime files, so every process that opens
    the node (agent, CLI, keepalived's notify) renders the same thing."""

    keepalived: str = "keepalived"
    conntrackd: str = "conntrackd"
    nft: str = "nft"
    python: str = sys.executable
    gate: bool = True  # the #2254 commit gate (off only to demonstrate the race)
    foreground_logs: bool = False  # keepalived -n with its log in run_dir (lab); else daemon + syslog
    commit_timeout: int = 10  # seconds the MASTER hook waits for `conntrackd -c` before opening anyway
    purge_timeout: int = 15  # conntrackd PurgeTimeout: old-master kernel entries live this long (drain)
    hooks: bool = True  # call `opnsense-ha carp event` on transitions
    hook_dir: str = ""  # "" = the CARP hook runner's default directory
    router_id: str = ""

    def save(self, path: Path) -> None:
        _atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> LinuxOptions:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise FailoverError(f"{path}: unreadable backend options ({exc}); delete it to use defaults") from None
        if not isinstance(data, dict):
            raise FailoverError(f"{path}: backend options must be a JSON object")
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

    def resolved(self) -> LinuxOptions:
        """Binaries as absolute paths (keepalived runs scripts with a minimal PATH)."""
        def which(name: str) -> str:
            return name if os.path.isabs(name) else (shutil.which(name, path=_SBIN_PATH) or name)

        return LinuxOptions(**{**asdict(self), "keepalived": which(self.keepalived),
                               "conntrackd": which(self.conntrackd), "nft": which(self.nft)})


_SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])


# --- validation and instance building (pure) ------------------------------------------------------


def vrrp_priority(advskew: int) -> int:
    """CARP advskew (0 best .. 254) as a VRRP priority (254 best .. 1): 250 - advskew, clamped."""
    return max(1, min(254, BASE_PRIORITY - advskew))


def clamp_track(demotion: int) -> int:
    """The value keepalived's weight -1 track file gets for a demotion counter."""
    return max(-TRACK_LIMIT, min(TRACK_LIMIT, demotion))


def _checked_device(device: str, what: str = "interface") -> str:
    if not _DEVICE_RE.match(device or ""):
        raise FailoverError(f"{device!r} is not a valid {what} device name (check interfaces.<key>.if)")
    return device


def validate_vip(spec: VipSpec) -> None:
    """Refuse what keepalived cannot express before anything is written."""
    _checked_device(spec.device)
    where = check_vip_spec(spec)
    if spec.advbase > MAX_V3_ADVBASE:
        raise FailoverError(f"{where}: advbase {spec.advbase} s cannot be expressed in VRRPv3 "
                            f"(at most {MAX_V3_ADVBASE} s); lower it for a Linux node")
    address = ipaddress.ip_address(spec.subnet)
    if spec.peer:
        try:
            peer = ipaddress.ip_address(spec.peer)
        except ValueError:
            raise FailoverError(f"{where}: peer {spec.peer!r} is not an IP address") from None
        if peer.version != address.version:
            raise FailoverError(f"{where}: peer {spec.peer} is not of the VIP's address family")


def build_instances(vips: Sequence[VipSpec]) -> list[VrrpInstance]:
    """Group CARP VIPs into VRRP instances: one per (device, vhid, family), in document order."""
    groups: dict[tuple[str, int, int], list[VipSpec]] = {}
    for spec in vips:
        validate_vip(spec)
        family: int = ipaddress.ip_address(spec.subnet).version
        groups.setdefault((spec.device, spec.vhid, family), []).append(spec)
    instances: list[VrrpInstance] = []
    seen_vhids: set[tuple[str, int]] = set()
    for (device, vhid, family), specs in groups.items():
        owner = vhid_owner(specs)
        addresses: list[str] = []
        for spec in specs:
            text = f"{ipaddress.ip_address(spec.subnet)}/{spec.subnet_bits}"
            if text not in addresses:
                addresses.append(text)
        primary = (device, vhid) not in seen_vhids
        seen_vhids.add((device, vhid))
        instances.append(VrrpInstance(
            name=f"VH{vhid}_{device}" + ("" if family == 4 else "_6"),
            interface=owner.interface or device, device=device, vhid=vhid,
            advbase=owner.advbase, advskew=owner.advskew, family=family,
            addresses=tuple(addresses), peer=owner.peer, primary=primary,
        ))
    for (device, vhid), count in _count_vhids(instances).items():
        conflicting = {(i.advbase, i.advskew) for i in instances if (i.device, i.vhid) == (device, vhid)}
        if count > 1 and len(conflicting) > 1:
            raise FailoverError(f"vhid {vhid} on {device}: its IPv4 and IPv6 VIPs disagree on advbase/advskew")
    return instances


def _count_vhids(instances: Sequence[VrrpInstance]) -> dict[tuple[str, int], int]:
    counts: dict[tuple[str, int], int] = {}
    for inst in instances:
        counts[(inst.device, inst.vhid)] = counts.get((inst.device, inst.vhid), 0) + 1
    return counts


# --- renderers (pure) -----------------------------------------------------------------------------


def _q(text: str) -> str:
    """A keepalived.conf / conntrackd.conf string value; our paths never hold quotes or newlines."""
    if any(ch in text for ch in "\"\n\r"):
        raise FailoverError(f"path {text!r} contains a quote or newline; use a plain directory")
    return f'"{text}"'


def _bare(text: str) -> str:
    """A conntrackd.conf path: its lexer takes no quotes, so no blanks or quotes are allowed."""
    if not text or any(ch.isspace() or ch in "\"'{}#" for ch in text):
        raise FailoverError(f"path {text!r} contains blanks, quotes or braces; use a plain directory")
    return text


def render_keepalived_conf(
    instances: Sequence[VrrpInstance], paths: LinuxPaths, *, preempt: bool, router_id: str = ""
) -> str:
    """keepalived.conf for `instances` (VRRPv3, one sync group, demotion and resign track files)."""
    lines = [
        "# Rendered by opnsense-ha (hasync.failover.linux) from config.xml. Do not edit:",
        "# every VIP, preempt or state-sync change rewrites it.",
        "global_defs {",
    ]
    if router_id:
        lines.append(f"    router_id {_keepalived_word(router_id)}")
    lines += [
        "    vrrp_version 3",
        "    enable_script_security",
        "    script_user root",
        "}",
        "",
        "# The demotion counter (net.inet.carp.demotion's equivalent), clamped to +-253:",
        f"vrrp_track_file {TRACK_DEMOTION} {{",
        f"    file {_q(str(paths.track_file))}",
        "    weight -1",
        "    init_file 0",
        "}",
        "# Non-zero = FAULT: written for a moment to resign mastership (priority-0 advertisement).",
        f"vrrp_track_file {TRACK_RESIGN} {{",
        f"    file {_q(str(paths.resign_file))}",
        "    weight 0",
        "    init_file 0 overwrite",
        "}",
    ]
    notify = _q(str(paths.notify_script))
    if len(instances) > 1:  # keepalived drops a sync group of one member
        lines += ["", f"vrrp_sync_group {SYNC_GROUP} {{", "    group {"]
        lines += [f"        {inst.name}" for inst in instances]
        lines += ["    }", "    sync_group_tracking_weight", f"    notify {notify}", "}"]
    for inst in instances:
        lines += [
            "",
            f"vrrp_instance {inst.name} {{",
            f"    # CARP vhid {inst.vhid} on {inst.interface} ({inst.device}), advskew {inst.advskew}",
            "    state BACKUP",
            f"    interface {inst.device}",
            f"    virtual_router_id {inst.vhid}",
            f"    priority {inst.priority}",
            f"    advert_int {inst.advbase}",
        ]
        if not preempt:
            lines.append("    nopreempt")
        if inst.peer:
            lines += ["    unicast_peer {", f"        {inst.peer}", "    }"]
        lines += [
            "    track_file {",
            f"        {TRACK_DEMOTION} weight -1",
            f"        {TRACK_RESIGN} weight 0",
            "    }",
            "    virtual_ipaddress {",
        ]
        lines += [f"        {address} dev {inst.device}" for address in inst.addresses]
        lines += ["    }", f"    notify {notify}", "}"]
    return "\n".join(lines) + "\n"


def _keepalived_word(text: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_.\-]", "_", text)[:64]
    return word or "opnsense-ha"


def render_conntrackd_conf(
    link: SyncLink, paths: LinuxPaths, *, ignore: Sequence[str], purge_timeout: int = 15
) -> str:
    """conntrackd.conf, FTFW over `link` (UDP unicast to the peer, or multicast)."""
    _checked_device(link.device, "pfsync (state sync)")
    for path in (paths.conntrackd_sock,):
        if len(str(path)) > UNIX_PATH_MAX:
            raise FailoverError(f"{path}: longer than a UNIX socket path may be ({UNIX_PATH_MAX}); "
                                "use a shorter conf dir")
    lines = [
        "# Rendered by opnsense-ha (hasync.failover.linux) from config.xml hasync.pfsync*. Do not edit.",
        "Sync {",
        "\tMode FTFW {",
        "\t\tResendQueueSize 131072",
        f"\t\tPurgeTimeout {int(purge_timeout)}",
        "\t\tACKWindowSize 300",
        "\t\tDisableExternalCache Off",
        "\t\tStartupResync on",
        "\t}",
    ]
    if link.peer:
        lines += [
            "\tUDP {",
            f"\t\tIPv4_address {link.local}",
            f"\t\tIPv4_Destination_Address {link.peer}",
            f"\t\tPort {CONNTRACKD_PORT}",
        ]
    else:
        lines += [
            "\tMulticast {",
            f"\t\tIPv4_address {CONNTRACKD_MCAST_GROUP}",
            f"\t\tGroup {CONNTRACKD_PORT}",
            f"\t\tIPv4_interface {link.local}",
        ]
    lines += [
        f"\t\tInterface {link.device}",
        "\t\tSndSocketBuffer 1249280",
        "\t\tRcvSocketBuffer 1249280",
        "\t\tChecksum on",
        "\t}",
        "}",
        "General {",
        "\tHashSize 32768",
        "\tHashLimit 131072",
        f"\tLogFile {_bare(str(paths.conntrackd_log))}",
        "\tSyslog off",
        f"\tLockFile {_bare(str(paths.conntrackd_lock))}",
        "\tUNIX {",
        f"\t\tPath {_bare(str(paths.conntrackd_sock))}",
        "\t}",
        "\tNetlinkBufferSize 2097152",
        "\tNetlinkBufferSizeMaxGrowth 8388608",
        "\tNetlinkOverrunResync On",
        "\tFilter From Userspace {",
        "\t\tProtocol Accept {",
        "\t\t\tTCP",
        "\t\t\tSCTP",
        "\t\t\tUDP",
        "\t\t\tICMP",
        "\t\t\tIPv6-ICMP",
        "\t\t}",
        "\t\tAddress Ignore {",
    ]
    seen: set[str] = set()
    for address in ["127.0.0.1", "::1", *ignore]:
        ip = ipaddress.ip_address(address)
        if str(ip) in seen:
            continue
        seen.add(str(ip))
        lines.append(f"\t\t\tIPv{ip.version}_address {ip}")
    lines += ["\t\t}", "\t}", "}"]
    return "\n".join(lines) + "\n"


def gate_devices(instances: Sequence[VrrpInstance]) -> list[str]:
    devices: list[str] = []
    for inst in instances:
        if inst.device not in devices:
            devices.append(inst.device)
    return devices


def _nft_set_elements(values: Sequence[str], *, quote: bool) -> str:
    return ", ".join(f'"{value}"' if quote else value for value in values)


def render_gate(instances: Sequence[VrrpInstance], *, open_: bool, table: str = GATE_TABLE) -> str:
    """`nft -f` input that atomically (re)creates the commit gate; deletes it when there are no VIPs."""
    lines = [f"table inet {table}", f"delete table inet {table}"]
    devices = gate_devices(instances)
    if not devices:
        return "\n".join(lines) + "\n"
    vip4 = [a.split("/")[0] for i in instances if i.family == 4 for a in i.addresses]
    vip6 = [a.split("/")[0] for i in instances if i.family == 6 for a in i.addresses]
    lines += [
        f"table inet {table} {{",
        "\t# Interfaces carrying CARP/VRRP VIPs.",
        f"\tset ifaces {{ type ifname; elements = {{ {_nft_set_elements(devices, quote=True)} }}; }}",
        "\t# Filled by notify.sh once `conntrackd -c` returned (MASTER); flushed on leaving MASTER.",
        "\tset open { type ifname;"
        + (f" elements = {{ {_nft_set_elements(devices, quote=True)} }};" if open_ else "") + " }",
    ]
    if vip4:
        lines.append(f"\tset vips4 {{ type ipv4_addr; elements = {{ {_nft_set_elements(vip4, quote=False)} }}; }}")
    if vip6:
        lines.append(f"\tset vips6 {{ type ipv6_addr; elements = {{ {_nft_set_elements(vip6, quote=False)} }}; }}")
    lines += [
        "\tchain gate {",
        "\t\t# after conntrack (-200), before NAT (-100) and filter (0)",
        "\t\ttype filter hook prerouting priority -150; policy accept;",
        "\t\tiifname != @ifaces accept",
        "\t\tiifname @open accept",
        "\t\t# connections this kernel already tracks (the drain of a demoted master)",
        "\t\tct state established,related accept",
        "\t\tmeta l4proto vrrp accept",
    ]
    if vip4:
        lines.append("\t\tip daddr @vips4 counter drop")
    if vip6:
        lines.append("\t\tip6 daddr @vips6 counter drop")
    lines += [
        "\t\t# the node's own addresses (agent, management, neighbour discovery)",
        "\t\tfib daddr type { local, broadcast, multicast } accept",
        "\t\t# would be forwarded, but its state is not committed yet",
        "\t\tcounter drop",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_notify_script(
    instances: Sequence[VrrpInstance],
    paths: LinuxPaths,
    options: LinuxOptions,
    *,
    conf_dir: str,
    sync: bool,
    pythonpath: str = "",
) -> str:
    """keepalived's notify script (POSIX sh: a Python start-up would sit in the failover path)."""
    devices = gate_devices(instances)
    open_cmd = f"add element inet {GATE_TABLE} open {{ {_nft_set_elements(devices, quote=True)} }}"
    close_cmd = f"flush set inet {GATE_TABLE} open"
    grouped = len(instances) > 1
    gate = options.gate and bool(devices)
    cases = "\n".join(
        f"        {inst.name}) carp={inst.carp_subsystem} ;;" for inst in instances if inst.primary
    )
    hook_argv = [options.python, "-m", "hasync", "--conf-dir", conf_dir, "carp", "event"]
    hook_tail = ["--hook-dir", options.hook_dir] if options.hook_dir else []
    hook_cmd = " ".join(shlex.quote(part) for part in hook_argv) + ' "$carp" "$carp_state"'
    if hook_tail:
        hook_cmd += " " + " ".join(shlex.quote(part) for part in hook_tail)
    env = f"PYTHONPATH={shlex.quote(pythonpath)} " if pythonpath else ""
    q = shlex.quote
    settle_polls = (int(options.commit_timeout) + 3) * 20
    settle_max = settle_polls // 20
    return f"""#!/bin/sh
# Rendered by opnsense-ha (hasync.failover.linux). Do not edit: rewritten on every change.
#
# keepalived runs this on every VRRP transition: "GROUP|INSTANCE <name> <state> <priority>".
# GROUP (the whole node) drives state sync like conntrack-tools' primary-backup.sh, with one
# change: on MASTER the nftables commit gate opens only once `conntrackd -c` has returned, so no
# packet of a synced connection is handled before its state is in the kernel (keepalived #2254).
# INSTANCE records the state for `opnsense-ha carp status` and runs the CARP hooks.
umask 022
RUN_DIR={q(str(paths.run_dir))}
STATE_DIR={q(str(paths.state_dir))}
EVENTS={q(str(paths.events))}
CONNTRACKD={q(options.conntrackd)}
CTD_CONF={q(str(paths.conntrackd_conf))}
NFT={q(options.nft)}
SYNC={1 if sync else 0}
GATE={1 if gate else 0}
GROUPED={1 if grouped else 0}
HOOKS={1 if options.hooks else 0}
COMMIT_TIMEOUT={int(options.commit_timeout)}

note() {{
    printf '%s %s\\n' "$(date +%s.%N)" "$*" >> "$EVENTS"
}}

put() {{  # put FILE TEXT: atomic replace, so readers never see half a state
    printf '%s\\n' "$2" > "$1.$$" && mv -f "$1.$$" "$1"
}}

ctd() {{
    "$CONNTRACKD" -C "$CTD_CONF" "$@" >/dev/null 2>&1 || note "conntrackd $* failed (exit $?)"
}}

gate_open() {{
    [ "$GATE" = 1 ] || return 0
    "$NFT" {q(open_cmd)} 2>>"$EVENTS" || note "opening the gate failed"
}}

gate_close() {{
    [ "$GATE" = 1 ] || return 0
    "$NFT" {q(close_cmd)} 2>>"$EVENTS" || note "closing the gate failed"
}}

group() {{
    state=$1
    put "$RUN_DIR/group.wanted" "$state"
    exec 9>>"$RUN_DIR/notify.lock"
    flock 9
    read -r wanted < "$RUN_DIR/group.wanted" || wanted=
    if [ "$wanted" != "$state" ]; then
        note "group $state superseded by $wanted"
        return 0
    fi
    case "$state" in
    MASTER)
        note "group MASTER: committing"
        if [ "$SYNC" = 1 ]; then
            timeout "$COMMIT_TIMEOUT" "$CONNTRACKD" -C "$CTD_CONF" -c >/dev/null 2>&1 \\
                || note "conntrackd -c failed (exit $?); opening the gate anyway"
        fi
        gate_open
        put "$RUN_DIR/group.state" MASTER
        note "group MASTER: gate open"
        if [ "$SYNC" = 1 ]; then
            ctd -f
            ctd -R
            ctd -B
        fi
        note "group MASTER: done"
        ;;
    BACKUP|FAULT|STOP)
        gate_close
        put "$RUN_DIR/group.state" "$state"
        note "group $state: gate closed"
        if [ "$SYNC" = 1 ]; then
            ctd -t
            ctd -n
        fi
        note "group $state: done"
        ;;
    *)
        note "group: unknown state $state"
        ;;
    esac
}}

instance() {{
    name=$1
    state=$2
    put "$STATE_DIR/$name" "$state $(date +%s.%N)"
    note "instance $name $state"
    case "$name" in
{cases}
        *) carp= ;;
    esac
    case "$state" in
        MASTER|BACKUP) carp_state=$state ;;
        FAULT|STOP) carp_state=INIT ;;
        *) return 0 ;;
    esac
    if [ "$HOOKS" = 1 ] && [ -n "$carp" ]; then
        # after the node-wide transition (commit, gate) is done: a Python start-up must not take
        # the CPU from the commit, and a MASTER hook should find the node forwarding
        ( settle "$state"; {env}exec nice -n 10 {hook_cmd} ) >>{q(str(paths.hooks_log))} 2>&1 </dev/null &
    fi
}}

settle() {{  # wait (at most ~{settle_max}s) until group.state is $1
    i=0
    while [ "$i" -lt {settle_polls} ]; do
        read -r current < "$RUN_DIR/group.state" 2>/dev/null && [ "$current" = "$1" ] && return 0
        sleep 0.05
        i=$((i + 1))
    done
    return 0
}}

case "$1" in
    GROUP)
        group "$3"
        ;;
    INSTANCE)
        instance "$2" "$3"
        [ "$GROUPED" = 1 ] || group "$3"
        ;;
    *)
        note "ignored notify: $*"
        ;;
esac
exit 0
"""


# --- parsers (pure) -------------------------------------------------------------------------------


def parse_conntrackd_links(text: str) -> dict[str, str]:
    """`conntrackd -s link`: {device: status} (RUNNING, DOWN, ...)."""
    return {m.group("device"): m.group("status") for m in _LINK_RE.finditer(text)}


def parse_vrrp_state(text: str) -> str | None:
    """A state file written by notify.sh: "MASTER 1795653209.90" -> "MASTER"."""
    word = text.split()[0] if text.split() else ""
    return word if word in VRRP_STATES else None


def carp_status(vrrp_state: str | None) -> str:
    """keepalived's state as CARP's: FAULT/STOP/unknown are INIT (no link, not running)."""
    return vrrp_state if vrrp_state in ("MASTER", "BACKUP") else "INIT"


def parse_ip_json_addresses(text: str) -> dict[str, list[tuple[str, int]]]:
    """`ip -j addr show`: {device: [(address, prefixlen), ...]}."""
    try:
        data = json.loads(text or "[]")
    except ValueError:
        raise FailoverError("`ip -j addr show` did not print JSON (iproute2 too old?)") from None
    result: dict[str, list[tuple[str, int]]] = {}
    for link in data if isinstance(data, list) else []:
        name = str(link.get("ifname", ""))
        for info in link.get("addr_info", []) or []:
            local = info.get("local")
            if local:
                result.setdefault(name, []).append((str(local), int(info.get("prefixlen", 0))))
    return result


# --- small file helpers ---------------------------------------------------------------------------


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(temp, mode)
    os.replace(temp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# --- the backend ----------------------------------------------------------------------------------


class KeepalivedBackend(FailoverBackend):
    """`FailoverBackend` over keepalived + conntrackd + nftables, for one node's conf dir."""

    name = "keepalived"

    def __init__(
        self,
        conf_dir: str | os.PathLike[str],
        runner: CommandRunner,
        *,
        paths: LinuxPaths | None = None,
        options: LinuxOptions | None = None,
        clock: Clock | None = None,
        timeout: float = 30.0,
        kernel_boot_id: Path = Path("/proc/sys/kernel/random/boot_id"),
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.kernel_boot_id = kernel_boot_id
        self.runner = runner
        self.paths = paths or LinuxPaths.for_conf_dir(self.conf_dir)
        self.options = (options or LinuxOptions.load(self.paths.options_json)).resolved()
        self.clock: Clock = clock or SystemClock()
        self.timeout = timeout

    @classmethod
    def from_conf_dir(cls, conf_dir: str | os.PathLike[str], runner: CommandRunner) -> KeepalivedBackend:
        """The backend of the node whose config.xml lives in `conf_dir` (options as saved there)."""
        return cls(conf_dir, runner)

    # --- plumbing ---

    def _run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
             input_text: str | None = None) -> CommandResult:
        result = self.runner.run(list(argv), input_text=input_text, timeout=timeout or self.timeout)
        if check and not result.ok:
            detail = (result.stderr or result.stdout).strip().replace("\n", " ")[:400]
            raise FailoverError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {detail or 'no output'}")
        return result

    def _prepare(self) -> None:
        try:
            self._prepare_files()
        except PermissionError as exc:
            raise FailoverError(f"{self.paths.run_dir}: {exc.strerror} (run as root)") from None

    def _prepare_files(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.paths.run_dir, 0o755)  # keepalived's script security refuses writable dirs
        self.paths.state_dir.mkdir(exist_ok=True)
        with self._flock(self.paths.demotion.with_name("demotion.lock")):
            kernel = self._kernel_boot()
            parts = (_read(self.paths.epoch) or "").split()
            fresh = not parts or not self.paths.demotion.exists()
            rebooted = bool(kernel) and (len(parts) < 2 or parts[1] != kernel)
            if fresh or rebooted:
                # like the kernel's sysctl, the counter starts at 0 with every boot of the machine
                if rebooted and not fresh:
                    log.info("the machine rebooted since the demotion counter started; resetting it to 0")
                _atomic_write(self.paths.demotion, "0\n")
                _atomic_write(self.paths.track_file, "0\n")
                _atomic_write(self.paths.epoch, f"{uuid.uuid4().hex} {kernel}".strip() + "\n")
            if not self.paths.track_file.exists():
                _atomic_write(self.paths.track_file, f"{clamp_track(self.demotion())}\n")

    def _kernel_boot(self) -> str:
        try:
            return self.kernel_boot_id.read_text().strip()
        except OSError:
            return ""

    @contextlib.contextmanager
    def _flock(self, target: Path) -> Iterator[None]:
        """An exclusive flock on `target` with a bounded wait (a stuck holder is an error, not a hang)."""
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = self.clock.monotonic() + self.timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if self.clock.monotonic() >= deadline:
                        raise FailoverError(f"{target} is held by another opnsense-ha process "
                                            f"(waited {self.timeout:g}s); retry when it has finished") from None
                    self.clock.sleep(0.02)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _locked(self, path: Path | None = None) -> Iterator[None]:
        self._prepare()
        with self._flock(path or self.paths.lock):
            yield

    def _load_root(self) -> etree._Element:
        from hasync.config.store import ConfigStore

        return ConfigStore(self.conf_dir).load()

    def _signal(self, pid: int, name: str, *, check: bool = True) -> CommandResult:
        """`kill -NAME pid` through the shell's builtin (the kill binary is procps', not always there)."""
        return self._run(["sh", "-c", f'kill -{name} "$1"', "kill", str(pid)], check=check)

    def _pid_alive(self, pidfile: Path, comm: str) -> int | None:
        text = _read(pidfile)
        if not text or not text.strip().isdigit():
            return None
        pid = text.strip()
        result = self._run(["cat", f"/proc/{pid}/comm"], check=False)
        return int(pid) if result.ok and result.stdout.strip() == comm else None

    # --- reading ---

    def applied_instances(self) -> list[VrrpInstance]:
        text = _read(self.paths.instances_json)
        if not text:
            return []
        try:
            data = json.loads(text)
            return [VrrpInstance.from_json(item) for item in data["instances"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FailoverError(f"{self.paths.instances_json}: unreadable ({exc}); re-apply the VIPs") from None

    def keepalived_pid(self) -> int | None:
        return self._pid_alive(self.paths.keepalived_pid, "keepalived")

    def vrrp_states(self) -> dict[str, str | None]:
        """keepalived's own state per instance name (None = nothing recorded)."""
        return {inst.name: parse_vrrp_state(_read(self.paths.state_dir / inst.name) or "")
                for inst in self.applied_instances()}

    def vip_states(self) -> list[VipState]:
        allowed = self._allowed()
        instances = self.applied_instances()
        if not allowed and not instances:
            # `carp disable` took the VIPs down; like OPNsense, still list the configured ones
            try:
                instances = build_instances(carp_vips(self._load_root()))
            except (ConfigError, FailoverError):
                instances = []
        if not instances:
            return []
        running = self.keepalived_pid() is not None
        states = self.vrrp_states()
        rows: list[VipState] = []
        for inst in instances:
            if not allowed:
                status = "DISABLED"
            elif not running:
                status = "INIT"
            else:
                status = carp_status(states.get(inst.name))
            for address in inst.addresses:
                rows.append(VipState(interface=inst.interface, device=inst.device, vhid=inst.vhid,
                                     advbase=inst.advbase, advskew=inst.advskew, subnet=address, status=status))
        return rows

    def _allowed(self) -> bool:
        return (_read(self.paths.allow) or "1").strip() != "0"

    def _preempt(self) -> bool | None:
        text = _read(self.paths.preempt)
        return None if text is None else text.strip() == "1"

    def _effective_preempt(self) -> tuple[bool, bool]:
        """(preempt, whether it came from config.xml because `set_preempt` never ran)."""
        preempt = self._preempt()
        if preempt is not None:
            return preempt, False
        try:
            return preempt_wanted(self._load_root()), True
        except ConfigError:
            return True, True

    def demotion(self) -> int:
        text = (_read(self.paths.demotion) or "0").strip()
        try:
            return int(text)
        except ValueError:
            raise FailoverError(f"{self.paths.demotion}: {text!r} is not a number") from None

    def carp_globals(self) -> CarpGlobals:
        self._prepare()  # a reboot since the last write resets the counter first
        preempt, _ = self._effective_preempt()
        return CarpGlobals(demotion=self.demotion(), allow=self._allowed(), preempt=preempt)

    def boot_id(self) -> str:
        """Changes whenever the demotion counter starts afresh: a reboot, or a new run dir."""
        self._prepare()
        parts = (_read(self.paths.epoch) or "").split()
        return parts[0] if parts else ""

    def _applied_pfsync(self) -> dict[str, Any] | None:
        text = _read(self.paths.pfsync_json)
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def conntrackd_running(self) -> bool:
        if not self.paths.conntrackd_conf.exists():
            return False
        return self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-s", "link"],
                         check=False, timeout=5).ok

    def pfsync_state(self) -> PfsyncState:
        applied = self._applied_pfsync()
        if not applied:
            return PfsyncState(enabled=False, syncdev=None, syncpeer=None, version=None, defer=None,
                               syncok=None, running=False,
                               detail="state sync off (hasync.pfsyncinterface is empty)")
        result = self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-s", "link"],
                           check=False, timeout=5)
        device = applied.get("syncdev")
        peer = applied.get("syncpeer") or None
        if not result.ok:
            return PfsyncState(enabled=True, syncdev=device, syncpeer=peer, version=None, defer=None,
                               syncok=False, running=False,
                               detail=f"conntrackd is not running ({(result.stderr or result.stdout).strip()[:200]})")
        links = parse_conntrackd_links(result.stdout)
        status = links.get(str(device), "missing")
        return PfsyncState(enabled=True, syncdev=device, syncpeer=peer, version=None, defer=None,
                           syncok=status == "RUNNING", running=True,
                           detail=f"conntrackd FTFW over {device} ({'unicast ' + peer if peer else 'multicast'}), "
                                  f"link {status}")

    # --- writing: demotion, allow, preempt ---

    def add_demotion(self, delta: int) -> None:
        """Add `delta` to the counter (never set it); resign mastership when it reaches 240."""
        if delta == 0:
            return
        with self._locked(self.paths.demotion.with_name("demotion.lock")):
            before = self.demotion()
            after = before + int(delta)
            _atomic_write(self.paths.demotion, f"{after}\n")
            _atomic_write(self.paths.track_file, f"{clamp_track(after)}\n")
            log.info("demotion %d %+d = %d", before, delta, after)
        if before < RESIGN_DEMOTION <= after:
            self.resign()

    def resign(self, timeout: float = 2.0) -> bool:
        """Make a MASTER hand over now (CARP's immediate preemption at a worse advertisement).

        A weight-0 track file set to 1 faults every instance: keepalived sends a priority-0
        advertisement and removes the VIPs, and the peer becomes master after its skew time. We
        clear the fault as soon as keepalived has left MASTER, so the node is an ordinary BACKUP
        again and still takes over if the peer is gone. True if it was MASTER.
        """
        if self.keepalived_pid() is None:
            return False
        if not any(state == "MASTER" for state in self.vrrp_states().values()):
            return False
        log.info("resigning VRRP mastership (demotion reached %d)", RESIGN_DEMOTION)
        _atomic_write(self.paths.resign_file, "1\n")
        try:
            deadline = self.clock.monotonic() + timeout
            while self.clock.monotonic() < deadline:
                if not any(state == "MASTER" for state in self.vrrp_states().values()):
                    break
                self.clock.sleep(0.01)
        finally:
            _atomic_write(self.paths.resign_file, "0\n")
        return True

    def set_allow(self, allow: bool) -> None:
        """CARP allow=0: keepalived stops (VIPs removed, priority 0 sent); allow=1 starts it again."""
        with self._locked():
            _atomic_write(self.paths.allow, "1\n" if allow else "0\n")
            if not allow:
                self._stop_keepalived()
            elif self.applied_instances():
                self._ensure_keepalived()

    def set_preempt(self, preempt: bool) -> None:
        with self._locked():
            _atomic_write(self.paths.preempt, "1\n" if preempt else "0\n")
            self._render_vrrp(self.applied_instances())

    # --- writing: VIPs ---

    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        """VIPs now = config.xml's CARP VIPs, minus `removed`, with `vips` added or replacing.

        keepalived takes the whole instance list at once, so this re-renders everything; a
        SIGHUP reload keeps the states of unchanged instances.
        """
        for spec in [*vips, *removed]:
            validate_vip(spec)
        try:
            current = carp_vips(self._load_root())
        except ConfigError:
            current = []

        def key(spec: VipSpec) -> tuple[str, int, str]:
            return (spec.device, spec.vhid, str(ipaddress.ip_address(spec.subnet)))

        gone = {key(spec) for spec in removed}
        merged: dict[tuple[str, int, str], VipSpec] = {key(s): s for s in current if key(s) not in gone}
        for spec in vips:
            merged[key(spec)] = spec
        instances = build_instances(list(merged.values()))
        with self._locked():
            self._render_vrrp(instances)

    def _render_vrrp(self, instances: list[VrrpInstance]) -> bool:
        """Write keepalived.conf, notify.sh and the gate for `instances`; reload or start keepalived."""
        self._prepare()
        preempt, from_config = self._effective_preempt()
        if from_config:
            _atomic_write(self.paths.preempt, "1\n" if preempt else "0\n")
        conf = render_keepalived_conf(instances, self.paths, preempt=preempt, router_id=self.options.router_id)
        self._write_notify(instances)
        self._apply_gate(instances)
        _atomic_write(self.paths.instances_json,
                      json.dumps({"instances": [asdict(i) for i in instances]}, indent=1) + "\n")
        old = _read(self.paths.keepalived_conf)
        changed = old != conf
        if changed:
            _atomic_write(self.paths.keepalived_conf, conf)
        pid = self.keepalived_pid()
        if not instances:
            if pid is not None:
                self._stop_keepalived()
            return changed
        if not self._allowed():
            return changed
        if pid is None:
            self._ensure_keepalived()
        elif changed:
            self._check_keepalived_conf()
            log.info("reloading keepalived (configuration changed)")
            self._signal(pid, "HUP")
        return changed

    def _write_notify(self, instances: Sequence[VrrpInstance]) -> None:
        package_parent = str(Path(__file__).resolve().parents[2])
        options = self.options
        if options.hooks and importlib.util.find_spec("hasync.hooks") is None:
            options = LinuxOptions(**{**asdict(options), "hooks": False})
        script = render_notify_script(instances, self.paths, options, conf_dir=str(self.conf_dir),
                                      sync=self._applied_pfsync() is not None, pythonpath=package_parent)
        if _read(self.paths.notify_script) != script:
            _atomic_write(self.paths.notify_script, script, mode=0o755)

    def _apply_gate(self, instances: Sequence[VrrpInstance]) -> None:
        """Re-create the gate, open only on a committed MASTER. Under notify.sh's lock, so a
        transition cannot open the old table while we replace it with a closed one."""
        with self._flock(self.paths.run_dir / "notify.lock"):
            if not self.options.gate:
                rules = render_gate([], open_=False)
            else:
                is_master = (_read(self.paths.group_state) or "").strip() == "MASTER"
                rules = render_gate(instances, open_=is_master and self.keepalived_pid() is not None)
            _atomic_write(self.paths.gate_rules, rules)
            self._run([self.options.nft, "-f", str(self.paths.gate_rules)])

    def _check_keepalived_conf(self) -> None:
        result = self._run([self.options.keepalived, "-t", "-f", str(self.paths.keepalived_conf)], check=False)
        if not result.ok:
            detail = (result.stderr or result.stdout).strip().replace("\n", "; ")[:600]
            raise FailoverError(f"keepalived rejects {self.paths.keepalived_conf}: {detail}")

    def _ensure_keepalived(self) -> None:
        if self.keepalived_pid() is not None:
            return
        if not self.paths.keepalived_conf.exists():
            raise FailoverError("no keepalived.conf rendered yet; configure the VIPs first")
        self._check_keepalived_conf()
        for stale in [*self.paths.state_dir.iterdir(), self.paths.group_state,
                      self.paths.run_dir / "group.wanted"]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # left by an earlier run: keepalived reports afresh
        _atomic_write(self.paths.resign_file, "0\n")
        argv = [self.options.keepalived, "-P", "-D", "-f", str(self.paths.keepalived_conf),
                "-p", str(self.paths.keepalived_pid), "-r", str(self.paths.vrrp_pid)]
        if self.options.foreground_logs:
            argv = ["sh", "-c", 'exec setsid "$@" -n -l -G </dev/null >>"$0" 2>&1 &',
                    str(self.paths.keepalived_log), *argv]
        log.info("starting keepalived")
        self._run(argv)
        deadline = self.clock.monotonic() + 5.0
        while self.keepalived_pid() is None:
            if self.clock.monotonic() >= deadline:
                raise FailoverError(f"keepalived did not start (see {self.paths.keepalived_log} or syslog)")
            self.clock.sleep(0.05)

    def _stop_keepalived(self) -> None:
        pid = self.keepalived_pid()
        if pid is None:
            return
        log.info("stopping keepalived (pid %d)", pid)
        self._signal(pid, "TERM", check=False)
        deadline = self.clock.monotonic() + 5.0
        while self.keepalived_pid() is not None:
            if self.clock.monotonic() >= deadline:
                self._signal(pid, "KILL", check=False)
                break
            self.clock.sleep(0.05)

    # --- writing: state sync ---

    def _addresses(self, device: str | None = None) -> dict[str, list[tuple[str, int]]]:
        argv = ["ip", "-j", "addr", "show"] + (["dev", device] if device else [])
        return parse_ip_json_addresses(self._run(argv).stdout)

    def _sync_link(self, desired: PfsyncConfig) -> SyncLink:
        device = _checked_device(str(desired.syncdev), "pfsync (state sync)")
        peer: str | None = None
        if desired.syncpeer:
            try:
                peer = str(ipaddress.IPv4Address(desired.syncpeer.strip()))
            except ValueError:
                raise FailoverError(f"pfsync peer {desired.syncpeer!r} is not an IPv4 address "
                                    "(hasync.pfsyncpeerip)") from None
        ipv4 = [a for a, _ in self._addresses(device).get(device, []) if ipaddress.ip_address(a).version == 4]
        if not ipv4:
            raise FailoverError(f"state sync device {device} has no IPv4 address; conntrackd needs one "
                                "to send from (configure the pfsync interface's address)")
        return SyncLink(device=device, local=ipv4[0], peer=peer)

    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        """Bring conntrackd to `desired`; only touches it when something differs.

        Restarting conntrackd empties its external cache (the peer's states), so, like pfsync's
        #10858, re-applying an unchanged configuration must do nothing. Compared are the settings
        (device, peer, our address), not the rendered text. `version` and `defer` have no
        conntrackd equivalent and are ignored.
        """
        with self._locked():
            applied = self._applied_pfsync()
            if desired.syncdev is None:
                if applied is None and not self.conntrackd_running():
                    return False
                self._stop_conntrackd()
                with contextlib.suppress(FileNotFoundError):
                    self.paths.pfsync_json.unlink()
                self._write_notify(self.applied_instances())
                log.info("state sync (conntrackd) off")
                return True
            link = self._sync_link(desired)
            wanted = {"syncdev": link.device, "syncpeer": link.peer or "", "local": link.local}
            running = self.conntrackd_running()
            if applied == wanted and running:
                return False
            own = [address for entries in self._addresses().values() for address, _ in entries]
            vips = [a.split("/")[0] for inst in self.applied_instances() for a in inst.addresses]
            conf = render_conntrackd_conf(link, self.paths, ignore=[*own, *vips],
                                          purge_timeout=self.options.purge_timeout)
            self._stop_conntrackd()
            _atomic_write(self.paths.conntrackd_conf, conf)
            self._start_conntrackd()
            _atomic_write(self.paths.pfsync_json, json.dumps(wanted, sort_keys=True) + "\n")
            self._write_notify(self.applied_instances())
            if (_read(self.paths.group_state) or "").strip() == "MASTER":
                self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-B"], check=False)
            log.info("state sync (conntrackd) on over %s%s", link.device,
                     f" to {link.peer}" if link.peer else " (multicast)")
            return True

    def _start_conntrackd(self) -> None:
        for stale in (self.paths.conntrackd_lock, self.paths.conntrackd_sock):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # only reached when no daemon answers on the socket
        self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-d"])
        deadline = self.clock.monotonic() + 5.0
        while not self.conntrackd_running():
            if self.clock.monotonic() >= deadline:
                raise FailoverError(f"conntrackd did not start (see {self.paths.conntrackd_log})")
            self.clock.sleep(0.05)

    def _stop_conntrackd(self) -> None:
        if not self.conntrackd_running():
            return
        self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-k"], check=False)
        deadline = self.clock.monotonic() + 5.0
        while self.conntrackd_running() and self.clock.monotonic() < deadline:
            self.clock.sleep(0.05)

    # --- whole-node lifecycle (boot / lab) ---

    def start(self) -> None:
        """Bring the node up from config.xml: state sync, VIPs, gate, keepalived."""
        self._prepare()
        if not self.paths.options_json.exists():
            self.options.save(self.paths.options_json)
        root = self._load_root()
        if self._preempt() is None:
            _atomic_write(self.paths.preempt, "1\n" if preempt_wanted(root) else "0\n")
        instances = build_instances(carp_vips(root))
        with self._locked():
            _atomic_write(self.paths.instances_json,
                          json.dumps({"instances": [asdict(i) for i in instances]}, indent=1) + "\n")
        self.apply_pfsync(pfsync_config(root))
        with self._locked():
            self._render_vrrp(instances)

    def stop(self) -> None:
        """Stop keepalived and conntrackd and remove the gate (VIPs go with keepalived)."""
        with self._locked():
            self._stop_keepalived()
            self._stop_conntrackd()
            _atomic_write(self.paths.gate_rules, render_gate([], open_=False))
            self._run([self.options.nft, "-f", str(self.paths.gate_rules)], check=False)

    def events(self) -> list[tuple[float, str]]:
        """notify.sh's transition log: (unix time, message)."""
        rows: list[tuple[float, str]] = []
        for line in (_read(self.paths.events) or "").splitlines():
            stamp, _, message = line.partition(" ")
            with contextlib.suppress(ValueError):
                rows.append((float(stamp), message))
        return rows
