"""The Linux failover backend's files, rendered from config.xml: pure functions, no I/O but the template.

What `linux.KeepalivedBackend` writes and why each looks as it does:

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

The notify script is `keepalived-notify.sh.template` beside this module, a POSIX sh template whose
``@NAME@`` fields are filled with shell-quoted values (a Python start-up would sit in the
failover path, so it is not Python).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from hasync.config.vips import VipSpec
from hasync.core.errors import FailoverError
from hasync.core.fileio import atomic_write
from hasync.failover.base import check_vip_spec, vhid_owner

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

_DEVICE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,14}$")


RUNTIME_FILE_MODE = 0o644  # read by keepalived's notify script and by every CLI on the node
NOTIFY_TEMPLATE = Path(__file__).resolve().with_name("keepalived-notify.sh.template")
_FIELD_RE = re.compile(r"@([A-Z_]+)@")


def fill_template(template: Path, values: Mapping[str, str]) -> str:
    """`template` with each ``@NAME@`` replaced by ``values[NAME]`` in one pass (a value is never
    scanned again); a field without a value, or a value without a field, is a bug."""
    text = template.read_text()
    wanted = set(_FIELD_RE.findall(text))
    if wanted != set(values):
        raise ValueError(f"{template.name}: fields {sorted(wanted)} but values for {sorted(values)}")
    return _FIELD_RE.sub(lambda match: values[match.group(1)], text)


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
        atomic_write(path, json.dumps(asdict(self), indent=2, sort_keys=True) + "\n", mode=RUNTIME_FILE_MODE)

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


def checked_device(device: str, what: str = "interface") -> str:
    if not _DEVICE_RE.match(device or ""):
        raise FailoverError(f"{device!r} is not a valid {what} device name (check interfaces.<key>.if)")
    return device


def validate_vip(spec: VipSpec) -> None:
    """Refuse what keepalived cannot express before anything is written."""
    checked_device(spec.device)
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
    checked_device(link.device, "pfsync (state sync)")
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
    # the shebang is added here: the template itself is data, not a program (no x bit, no #!)
    return "#!/bin/sh\n" + fill_template(NOTIFY_TEMPLATE, {
        "RUN_DIR": q(str(paths.run_dir)), "STATE_DIR": q(str(paths.state_dir)), "EVENTS": q(str(paths.events)),
        "CONNTRACKD": q(options.conntrackd), "CTD_CONF": q(str(paths.conntrackd_conf)), "NFT": q(options.nft),
        "SYNC": str(1 if sync else 0), "GATE": str(1 if gate else 0), "GROUPED": str(1 if grouped else 0),
        "HOOKS": str(1 if options.hooks else 0), "COMMIT_TIMEOUT": str(int(options.commit_timeout)),
        "GATE_OPEN_CMD": q(open_cmd), "GATE_CLOSE_CMD": q(close_cmd), "CASES": cases, "HOOK_ENV": env,
        "HOOK_CMD": hook_cmd, "HOOKS_LOG": q(str(paths.hooks_log)), "SETTLE_MAX": str(settle_max),
        "SETTLE_POLLS": str(settle_polls),
    })
