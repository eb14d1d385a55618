"""A firewall pair in network namespaces: real keepalived, conntrackd, nftables and real packets.

Topology (every address lives inside a namespace this module creates; nothing leaves them)::

    ha-lan (client 10.77.1.100, gw = LAN VIP 10.77.1.1)        ha-wan (server 10.77.2.100)
         |                                                         |
    [br-lan] ------------------ ha-sw ----------------------- [br-wan]
      |      \\                                               /      |
    lan0 (10.77.1.2)   lan0 (10.77.1.3)      wan0 (10.77.2.2)    wan0 (10.77.2.3)
    ha-fw1 (primary, advskew 0) ---- sync0 10.77.3.1/.2 ---- ha-fw2 (backup, advskew 100)

Each firewall forwards LAN -> WAN with a pf-like nftables ruleset: only a SYN creates TCP state,
``ct state invalid drop``, and ``nf_conntrack_tcp_loose=0`` in its namespace, so a mid-stream
packet of a connection whose state was not synced is really dropped. Outbound traffic is
SNATed to the WAN VIP 10.77.2.1. Each firewall runs keepalived, conntrackd (own sockets and lock
files) and, when available, the backup agent, all from its own conf dir under the lab directory
(default /run/opnsense-ha-lab), whose config.xml declares the VIPs and hasync. fw2 gets its VIPs
by a real `opnsense-ha sync` from fw1 over the sync link when the agent and client are available
(`LabOptions.real_sync`), else its config is written directly with the synced skew (+100).

`Lab.down` (and `Lab.up`, first) removes everything a lab made: processes inside the
namespaces, the namespaces (with their interfaces) and the lab directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from .errors import HaError
from .failover.linux import KeepalivedBackend, LinuxOptions, LinuxPaths
from .osiface import Clock, CommandResult, CommandRunner, SubprocessRunner, SystemClock

log = logging.getLogger(__name__)

LAB_DIR = Path("/run/opnsense-ha-lab")
NS_SW = "ha-sw"
NS_LAN = "ha-lan"
NS_WAN = "ha-wan"
LAN_NET = "10.77.1.0/24"
LAN_VIP = "10.77.1.1"
WAN_VIP = "10.77.2.1"
CLIENT_IP = "10.77.1.100"
SERVER_IP = "10.77.2.100"
ECHO_PORT = 7777
AGENT_PORT = 8443
LAN_VHID = 1
WAN_VHID = 2
CARP_PASSWORD_LEN = 24
SYNC_USER = "root"


@dataclass(frozen=True)
class FirewallSpec:
    name: str
    namespace: str
    lan_ip: str
    wan_ip: str
    sync_ip: str
    peer_sync_ip: str
    advskew: int
    primary: bool


FW1 = FirewallSpec("fw1", "ha-fw1", "10.77.1.2", "10.77.2.2", "10.77.3.1", "10.77.3.2", 0, True)
FW2 = FirewallSpec("fw2", "ha-fw2", "10.77.1.3", "10.77.2.3", "10.77.3.2", "10.77.3.1", 100, False)
FIREWALLS = (FW1, FW2)
NAMESPACES = (NS_SW, FW1.namespace, FW2.namespace, NS_LAN, NS_WAN)
REQUIRED_BINARIES = ("ip", "nft", "keepalived", "conntrackd", "flock", "timeout", "setsid")


@dataclass(frozen=True)
class LabOptions:
    state_dir: Path = LAB_DIR
    state_sync: bool = True  # conntrackd on both firewalls (off = the control of acceptance (c))
    gate: bool = True  # the #2254 commit gate (off = its control)
    strict: bool = True  # pf-like input chain; False = a lenient host firewall (accepts invalid)
    preempt: bool = True
    multicast_sync: bool = False  # conntrackd multicast instead of unicast to the peer
    advbase: int = 1
    agent: bool = True  # run `opnsense-ha serve` on each firewall (when available)
    real_sync: bool = True  # fw2's VIPs by `opnsense-ha sync` from fw1 (when available)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LabOptions:
        known = {key: value for key, value in data.items() if key in cls.__dataclass_fields__}
        if "state_dir" in known:
            known["state_dir"] = Path(known["state_dir"])
        return cls(**known)


class LabError(HaError):
    """The lab cannot be built or driven (not root, a binary missing, a step failed)."""


class NetnsRunner:
    """A CommandRunner that runs every command inside one network namespace (`ip netns exec`)."""

    def __init__(self, namespace: str, inner: CommandRunner | None = None) -> None:
        self.namespace = namespace
        self.inner = inner or SubprocessRunner()

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0) -> CommandResult:
        return self.inner.run(["ip", "netns", "exec", self.namespace, *argv], input_text=input_text,
                              timeout=timeout)


# --- pure renderers -------------------------------------------------------------------------------


def render_ruleset(fw: FirewallSpec, *, strict: bool = True) -> str:
    """The firewall's nftables ruleset, pf-like when `strict`.

    Only a SYN may create TCP state (pf's ``flags S/SA``), invalid packets are dropped before any
    accept, and the input policy is drop. `strict=False` models a lenient host firewall (input
    accepts everything, invalid too), the setup in which keepalived #2254 produced resets.
    """
    input_rules = [
        'iif "lo" accept',
        *(["ct state invalid counter drop"] if strict else []),
        "ct state established,related accept",
        "meta l4proto vrrp accept",
        'iifname "sync0" accept',
        "icmp type echo-request accept",
    ]
    lines = [
        f"# lab firewall {fw.name}: forwards lan0 -> wan0, SNAT to the WAN VIP",
        "table inet lab_filter",
        "delete table inet lab_filter",
        "table ip lab_nat",
        "delete table ip lab_nat",
        "table inet lab_filter {",
        "\tchain input {",
        f"\t\ttype filter hook input priority filter; policy {'drop' if strict else 'accept'};",
        *(f"\t\t{rule}" for rule in input_rules),
        *(["\t\tcounter drop"] if strict else []),
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t\tct state untracked counter drop",
        "\t\tct state invalid counter drop",
        "\t\tct state established,related accept",
        '\t\tiifname "lan0" oifname "wan0" tcp flags & (fin | syn | rst | ack) == syn ct state new accept',
        '\t\tiifname "lan0" oifname "wan0" meta l4proto { udp, icmp } ct state new accept',
        "\t\tcounter drop",
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy accept;",
        "\t}",
        "}",
        "table ip lab_nat {",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f'\t\toifname "wan0" ip saddr {LAN_NET} snat to {WAN_VIP}',
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _sub(parent: etree._Element, tag: str, text: str | None = None, **attrib: str) -> etree._Element:
    node = etree.SubElement(parent, tag, attrib)
    if text is not None:
        node.text = text
    return node


def vip_elements(parent: etree._Element, fw: FirewallSpec, *, advbase: int, carp_password: str,
                 advskew: int | None = None) -> None:
    """The two CARP VIPs (LAN vhid 1, WAN vhid 2) as OPNsense stores them."""
    skew = fw.advskew if advskew is None else advskew
    for key, address, vhid, descr in (("lan", LAN_VIP, LAN_VHID, "LAN gateway VIP"),
                                      ("wan", WAN_VIP, WAN_VHID, "WAN SNAT VIP")):
        vip = _sub(parent, "vip", uuid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"opnsense-ha-lab/{key}")))
        for tag, value in (("interface", key), ("mode", "carp"), ("subnet", address), ("subnet_bits", "24"),
                           ("gateway", ""), ("noexpand", "0"), ("nosync", "0"), ("password", carp_password),
                           ("vhid", str(vhid)), ("advbase", str(advbase)), ("advskew", str(skew)),
                           ("descr", descr)):
            _sub(vip, tag, value)


def render_node_config(
    fw: FirewallSpec,
    *,
    with_vips: bool,
    options: LabOptions,
    carp_password: str,
    sync_password: str = "",
    sync_password_hash: str = "",
    agent_url: str = "",
) -> bytes:
    """config.xml of one lab firewall, in OPNsense's layout.

    The primary carries `hasync.synchronizetoip` and the sync credentials (OPNsense stores that
    password in plain text); the backup carries the user they log in as (bcrypt hash only).
    """
    root = etree.Element("opnsense")
    system = _sub(root, "system")
    _sub(system, "hostname", fw.name)
    _sub(system, "domain", "lab.invalid")
    if sync_password_hash:
        group = _sub(system, "group")
        _sub(group, "name", "admins")
        _sub(group, "gid", "1999")
        _sub(group, "member", "0")
        _sub(group, "priv", "page-all")
        user = _sub(system, "user")
        _sub(user, "name", SYNC_USER)
        _sub(user, "uid", "0")
        _sub(user, "scope", "system")
        _sub(user, "groupname", "admins")
        _sub(user, "password", sync_password_hash)
    interfaces = _sub(root, "interfaces")
    for key, device, address, descr in (("lan", "lan0", fw.lan_ip, "LAN"), ("wan", "wan0", fw.wan_ip, "WAN"),
                                        ("opt1", "sync0", fw.sync_ip, "SYNC")):
        node = _sub(interfaces, key)
        _sub(node, "if", device)
        _sub(node, "descr", descr)
        _sub(node, "enable", "1")
        _sub(node, "ipaddr", address)
        _sub(node, "subnet", "24")
    hasync = _sub(root, "hasync", version="1.0.2")
    _sub(hasync, "disablepreempt", "0" if options.preempt else "1")
    _sub(hasync, "disconnectppps", "0")
    _sub(hasync, "pfsyncinterface", "opt1" if options.state_sync else "")
    _sub(hasync, "pfsyncpeerip", "" if options.multicast_sync else fw.peer_sync_ip)
    _sub(hasync, "pfsyncversion", "1400")
    _sub(hasync, "synchronizetoip", agent_url if fw.primary else "")
    _sub(hasync, "verifypeer", "0")
    _sub(hasync, "username", SYNC_USER if fw.primary else "")
    _sub(hasync, "password", sync_password if fw.primary else "")
    _sub(hasync, "syncitems", "virtualip" if fw.primary else "")
    virtualip = _sub(root, "virtualip", version="1.0.1")
    if with_vips:
        vip_elements(virtualip, fw, advbase=options.advbase, carp_password=carp_password)
    etree.indent(root, space="  ")
    return b'<?xml version="1.0"?>\n' + etree.tostring(root, encoding="utf-8") + b"\n"


HOOK_SCRIPT = """#!/bin/sh
# Lab CARP hook: records every transition the hook runner hands us.
printf '%s %s %s\\n' "$(date +%s.%N)" "$1" "$2" >> {log}
"""


# --- the lab --------------------------------------------------------------------------------------


def _python() -> str:
    return sys.executable


def _pythonpath() -> str:
    return str(Path(__file__).resolve().parents[1])


def have_command(name: str) -> bool:
    return importlib.util.find_spec(f"hasync.commands.{name}") is not None


def missing_binaries() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in REQUIRED_BINARIES if shutil.which(name, path=path) is None]


def namespace_support() -> str | None:
    """None if this process can create network namespaces, else why not (containers without
    CAP_SYS_ADMIN, a read-only /run, ...). Creates and removes one throw-away namespace."""
    try:
        from pyroute2 import netns
    except ImportError:
        return "pyroute2 is not installed (the `lab` extra: pip install -e '.[lab]'; `make setup` does)"

    name = f"ha-probe-{os.getpid()}"
    try:
        netns.create(name)
    except Exception as exc:  # pyroute2 raises OSError subclasses, or its own errors from the helper
        return f"cannot create a network namespace ({exc})"
    try:
        netns.remove(name)
    except Exception as exc:
        return f"cannot remove the probe network namespace {name} ({exc})"
    return None


class Lab:
    """Build, drive and tear down the namespace lab."""

    def __init__(self, options: LabOptions | None = None, *, runner: CommandRunner | None = None,
                 clock: Clock | None = None) -> None:
        self.options = options or LabOptions()
        self.runner = runner or SubprocessRunner()
        self.clock: Clock = clock or SystemClock()

    # --- paths ---

    @property
    def state_dir(self) -> Path:
        return self.options.state_dir

    @property
    def state_file(self) -> Path:
        return self.state_dir / "lab.json"

    def node_dir(self, fw: FirewallSpec) -> Path:
        return self.state_dir / fw.name

    def conf_dir(self, fw: FirewallSpec) -> Path:
        return self.node_dir(fw) / "conf"

    def hook_log(self, fw: FirewallSpec) -> Path:
        return self.node_dir(fw) / "carp-hooks.log"

    def agent_url(self, fw: FirewallSpec) -> str:
        return f"https://{fw.sync_ip}:{AGENT_PORT}/"

    # --- plumbing ---

    def _run(self, argv: Sequence[str], *, namespace: str | None = None, input_text: str | None = None,
             check: bool = True, timeout: float = 30.0) -> CommandResult:
        full = ["ip", "netns", "exec", namespace, *argv] if namespace else list(argv)
        result = self.runner.run(full, input_text=input_text, timeout=timeout)
        if check and not result.ok:
            detail = (result.stderr or result.stdout).strip()[-1500:]
            raise LabError(f"`{' '.join(full)}` failed (exit {result.returncode}): {detail}")
        return result

    def sysctl(self, namespace: str, values: dict[str, int]) -> None:
        """Per-namespace sysctls, written to /proc/sys from inside the namespace (no procps needed)."""
        script = "; ".join(f"echo {int(value)} > /proc/sys/{key.replace('.', '/')}" for key, value in values.items())
        self._run(["sh", "-ec", script], namespace=namespace)

    def backend(self, fw: FirewallSpec) -> KeepalivedBackend:
        return KeepalivedBackend(self.conf_dir(fw), NetnsRunner(fw.namespace, self.runner), clock=self.clock)

    def existing_namespaces(self) -> list[str]:
        from pyroute2 import netns

        present = set(netns.listnetns())
        return [name for name in NAMESPACES if name in present]

    # --- teardown ---

    def down(self) -> list[str]:
        """Remove everything a lab made; safe on a half-built or already removed lab."""
        notes: list[str] = []
        present = self.existing_namespaces()
        for fw in FIREWALLS:  # graceful first: keepalived sends priority 0, conntrackd removes its socket
            if fw.namespace in present and self.conf_dir(fw).is_dir():
                try:
                    self.backend(fw).stop()
                except HaError as exc:
                    notes.append(f"{fw.name}: {exc}")
        for name in present:
            self._kill_namespace_processes(name, notes)
        from pyroute2 import netns

        for name in present:
            try:
                netns.remove(name)
            except OSError as exc:
                notes.append(f"removing namespace {name}: {exc}")
        if self.state_dir.exists():
            if not (self.state_file.exists() or self.state_dir == LAB_DIR):
                notes.append(f"{self.state_dir} does not look like a lab directory; left in place")
            else:
                shutil.rmtree(self.state_dir, ignore_errors=True)
        return notes

    def _kill_namespace_processes(self, name: str, notes: list[str]) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._namespace_pids(name)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = self.clock.monotonic() + 3.0
            while self._namespace_pids(name) and self.clock.monotonic() < deadline:
                self.clock.sleep(0.05)
        left = self._namespace_pids(name)
        if left:
            notes.append(f"processes {left} in {name} survived SIGKILL")

    def _namespace_pids(self, name: str) -> list[int]:
        result = self._run(["ip", "netns", "pids", name], check=False)
        return [int(word) for word in result.stdout.split() if word.isdigit() and int(word) != os.getpid()]

    # --- build ---

    def preflight_root(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab needs root (network namespaces, nftables, keepalived)")

    def preflight(self) -> None:
        self.preflight_root()
        missing = missing_binaries()
        if missing:
            raise LabError(f"missing programs: {', '.join(missing)} "
                           "(Debian: apt-get install keepalived conntrackd nftables conntrack iproute2)")
        problem = namespace_support()
        if problem:
            raise LabError(f"{problem}; the lab needs network namespaces (a privileged container or a VM)")

    def up(self) -> dict[str, Any]:
        """Tear down leftovers, build the topology, start the daemons, wait for fw1 MASTER."""
        self.preflight()
        self.down()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        try:
            self._build_network()
            self._configure_firewalls()
            self._start_firewalls()
            self.wait_states({FW1: "MASTER", FW2: "BACKUP"}, timeout=10 + 4 * self.options.advbase)
        except BaseException:
            log.error("lab up failed; logs are in %s until the next `lab down`", self.state_dir)
            raise
        return self.status()

    def _build_network(self) -> None:
        from pyroute2 import IPRoute, netns

        for name in NAMESPACES:
            netns.create(name)
            self.sysctl(name, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        with IPRoute(netns=NS_SW) as sw:
            for bridge in ("br-lan", "br-wan"):
                sw.link("add", ifname=bridge, kind="bridge", br_mcast_snooping=0, br_forward_delay=0)
                sw.link("set", index=sw.link_lookup(ifname=bridge)[0], state="up")
            ports = [(f"{fw.name}-lan", "lan0", fw.namespace, "br-lan") for fw in FIREWALLS]
            ports += [(f"{fw.name}-wan", "wan0", fw.namespace, "br-wan") for fw in FIREWALLS]
            ports += [("cl-lan", "eth0", NS_LAN, "br-lan"), ("srv-wan", "eth0", NS_WAN, "br-wan")]
            for port, inner, namespace, bridge in ports:
                sw.link("add", ifname=port, kind="veth", peer={"ifname": inner, "net_ns_fd": namespace})
                master = sw.link_lookup(ifname=bridge)[0]
                sw.link("set", index=sw.link_lookup(ifname=port)[0], master=master, state="up")
        with IPRoute(netns=FW1.namespace) as fw1:
            fw1.link("add", ifname="sync0", kind="veth", peer={"ifname": "sync0", "net_ns_fd": FW2.namespace})
        addresses = {
            FW1.namespace: [("lan0", FW1.lan_ip), ("wan0", FW1.wan_ip), ("sync0", FW1.sync_ip)],
            FW2.namespace: [("lan0", FW2.lan_ip), ("wan0", FW2.wan_ip), ("sync0", FW2.sync_ip)],
            NS_LAN: [("eth0", CLIENT_IP)],
            NS_WAN: [("eth0", SERVER_IP)],
        }
        for namespace, entries in addresses.items():
            with IPRoute(netns=namespace) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
                for device, address in entries:
                    index = ipr.link_lookup(ifname=device)[0]
                    ipr.addr("add", index=index, address=address, prefixlen=24)
                    ipr.link("set", index=index, state="up")
                if namespace == NS_LAN:
                    ipr.route("add", dst="default", gateway=LAN_VIP)
        with IPRoute(netns=NS_SW) as sw:
            sw.link("set", index=sw.link_lookup(ifname="lo")[0], state="up")

    def _configure_firewalls(self) -> None:
        carp_password = secrets.token_urlsafe(CARP_PASSWORD_LEN)
        sync_password = secrets.token_urlsafe(24)
        sync_hash = ""
        use_agent = self.options.agent and have_command("serve")
        real_sync = use_agent and self.options.real_sync and have_command("sync")
        if use_agent:
            import bcrypt

            sync_hash = bcrypt.hashpw(sync_password.encode(), bcrypt.gensalt(rounds=8)).decode()
            sync_hash = "$2y$" + sync_hash[4:]  # PHP's password_hash prefix
        for fw in FIREWALLS:
            node = self.node_dir(fw)
            conf = self.conf_dir(fw)
            conf.mkdir(parents=True, exist_ok=True)
            hooks = node / "hooks"
            hooks.mkdir(exist_ok=True)
            os.chmod(node, 0o755)
            hook = hooks / "10-lab-record"
            hook.write_text(HOOK_SCRIPT.format(log=self.hook_log(fw)))
            os.chmod(hook, 0o755)
            (node / "services").mkdir(exist_ok=True)
            with_vips = fw.primary or not real_sync
            data = render_node_config(
                fw, with_vips=with_vips, options=self.options, carp_password=carp_password,
                sync_password=sync_password if fw.primary else "",
                sync_password_hash="" if fw.primary else sync_hash,
                agent_url=self.agent_url(FW2) if fw.primary else "",
            )
            (conf / "config.xml").write_bytes(data)
            os.chmod(conf / "config.xml", 0o640)
            self.sysctl(fw.namespace, {"net.ipv4.ip_forward": 1, "net.netfilter.nf_conntrack_tcp_loose": 0,
                                       "net.netfilter.nf_conntrack_tcp_be_liberal": 0})
            ruleset = render_ruleset(fw, strict=self.options.strict)
            self._run(["nft", "-f", "-"], namespace=fw.namespace, input_text=ruleset)
            paths = LinuxPaths.for_conf_dir(conf)
            paths.run_dir.mkdir(parents=True, exist_ok=True)
            LinuxOptions(foreground_logs=True, gate=self.options.gate, hook_dir=str(hooks), router_id=fw.name,
                         python=_python()).save(paths.options_json)
        self._write_state({"real_sync": real_sync, "agent": use_agent})

    def _start_firewalls(self) -> None:
        state = self._read_state()
        for fw in FIREWALLS:
            self.backend(fw).start()
        if state.get("agent"):
            for fw in FIREWALLS:
                self._start_agent(fw)
        if state.get("real_sync"):
            self.sync_primary()

    def _start_agent(self, fw: FirewallSpec) -> None:
        node = self.node_dir(fw)
        log_path = node / "agent.log"
        argv = ["ip", "netns", "exec", fw.namespace, _python(), "-m", "hasync", "--conf-dir", str(self.conf_dir(fw)),
                "serve", "--listen", f"{fw.sync_ip}:{AGENT_PORT}", "--services-dir", str(node / "services"),
                "--state-dir", str(node / "agent")]
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        with open(log_path, "ab") as out:
            subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                             start_new_session=True)
        deadline = self.clock.monotonic() + 15.0
        while b"listening on" not in log_path.read_bytes():
            if self.clock.monotonic() >= deadline:
                raise LabError(f"the agent on {fw.name} did not start: {log_path.read_text()[-800:]}")
            self.clock.sleep(0.05)

    def sync_primary(self) -> dict[str, Any]:
        """`opnsense-ha sync` on fw1 (its VIPs to fw2 through the sync link), as OPNsense would."""
        result = self.opnsense_ha(FW1, ["sync", "--items", "virtualip", "--json"], timeout=120)
        try:
            summary = json.loads(result.stdout or "{}")
        except ValueError:
            summary = {}
        if not result.ok:
            raise LabError(f"opnsense-ha sync on fw1 failed (exit {result.returncode}): "
                           f"{(result.stderr or result.stdout).strip()[-800:]}")
        return summary if isinstance(summary, dict) else {}

    def opnsense_ha(self, fw: FirewallSpec, args: Sequence[str], *, timeout: float = 60.0,
                    check: bool = False) -> CommandResult:
        """Run an `opnsense-ha` command inside the firewall's namespace with its conf dir."""
        argv = ["env", f"PYTHONPATH={_pythonpath()}", _python(), "-m", "hasync", "--conf-dir",
                str(self.conf_dir(fw)), *args]
        return self._run(argv, namespace=fw.namespace, check=check, timeout=timeout)

    # --- state file ---

    def _write_state(self, extra: dict[str, Any]) -> None:
        data = {"options": self.options.to_json(), "created": time.time(), **extra}
        temp = self.state_file.with_name(".lab.json.tmp")
        temp.write_text(json.dumps(data, indent=2))
        os.replace(temp, self.state_file)

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    @classmethod
    def attach(cls, state_dir: Path = LAB_DIR, **kwargs: Any) -> Lab:
        """The lab that is running in `state_dir` (its options as recorded by `up`)."""
        try:
            data = json.loads((state_dir / "lab.json").read_text())
        except (OSError, ValueError):
            raise LabError(f"no lab in {state_dir} (run `opnsense-ha lab up`)") from None
        return cls(LabOptions.from_json(data.get("options", {})), **kwargs)

    # --- status ---

    def carp_states(self, fw: FirewallSpec) -> dict[int, str]:
        """{vhid: MASTER|BACKUP|INIT|DISABLED} of one firewall."""
        return {row.vhid: row.status for row in self.backend(fw).vip_states()}

    def status(self) -> dict[str, Any]:
        present = set(self.existing_namespaces())
        state = self._read_state()
        nodes: list[dict[str, Any]] = []
        for fw in FIREWALLS:
            entry: dict[str, Any] = {
                "name": fw.name, "namespace": fw.namespace, "role": "primary" if fw.primary else "backup",
                "conf_dir": str(self.conf_dir(fw)),
                "agent_url": self.agent_url(fw) if state.get("agent") else None,
                "addresses": {"lan": fw.lan_ip, "wan": fw.wan_ip, "sync": fw.sync_ip},
                "up": fw.namespace in present,
            }
            if entry["up"] and self.conf_dir(fw).is_dir():
                backend = self.backend(fw)
                glob = backend.carp_globals()
                pfsync = backend.pfsync_state()
                entry["carp"] = [{"vhid": row.vhid, "interface": row.interface, "device": row.device,
                                  "subnet": row.subnet, "advskew": row.advskew, "status": row.status}
                                 for row in backend.vip_states()]
                entry["demotion"] = glob.demotion
                entry["preempt"] = glob.preempt
                entry["keepalived_pid"] = backend.keepalived_pid()
                entry["state_sync"] = {"enabled": pfsync.enabled, "running": pfsync.running,
                                       "syncok": pfsync.syncok, "detail": pfsync.detail}
            nodes.append(entry)
        for name, namespace, address, role in (("lan", NS_LAN, CLIENT_IP, "client"),
                                               ("wan", NS_WAN, SERVER_IP, "server")):
            nodes.append({"name": name, "namespace": namespace, "role": role, "address": address,
                          "up": namespace in present})
        return {
            "up": set(NAMESPACES) <= present,
            "state_dir": str(self.state_dir),
            "options": self.options.to_json(),
            "vips": {"lan": f"{LAN_VIP}/24", "wan": f"{WAN_VIP}/24"},
            "real_sync": bool(state.get("real_sync")),
            "nodes": nodes,
        }

    # --- driving ---

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.05) -> float:
        """Wait until `predicate()`; returns the seconds waited, LabError after `timeout`."""
        start = self.clock.monotonic()
        while not predicate():
            if self.clock.monotonic() - start >= timeout:
                raise LabError(f"timed out after {timeout:g}s waiting for {what}")
            self.clock.sleep(poll)
        return self.clock.monotonic() - start

    def all_in(self, fw: FirewallSpec, state: str) -> bool:
        states = self.carp_states(fw)
        return bool(states) and all(value == state for value in states.values())

    def wait_states(self, wanted: dict[FirewallSpec, str], timeout: float) -> float:
        text = ", ".join(f"{fw.name} {state}" for fw, state in wanted.items())
        return self.wait_for(lambda: all(self.all_in(fw, state) for fw, state in wanted.items()), timeout, text)

    def set_links(self, fw: FirewallSpec, up: bool, which: Sequence[str] = ("lan", "wan")) -> None:
        """Plug or unplug a firewall's cables at the switch (its side sees the carrier go)."""
        from pyroute2 import IPRoute

        with IPRoute(netns=NS_SW) as sw:
            for side in which:
                sw.link("set", index=sw.link_lookup(ifname=f"{fw.name}-{side}")[0], state="up" if up else "down")

    def partition(self, on: bool) -> None:
        """Split brain: the firewalls' switch ports are isolated from each other (bridge port
        isolation), so neither hears the other's VRRP while clients still reach both and every
        carrier stays up. Each side believes it is alone."""
        from pyroute2 import IPRoute

        with IPRoute(netns=NS_SW) as sw:
            for fw in FIREWALLS:
                for side in ("lan", "wan"):
                    sw.brport("set", index=sw.link_lookup(ifname=f"{fw.name}-{side}")[0], isolated=1 if on else 0)

    def set_sync_link(self, up: bool) -> None:
        from pyroute2 import IPRoute

        with IPRoute(netns=FW1.namespace) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="sync0")[0], state="up" if up else "down")

    def daemon_pids(self, fw: FirewallSpec, comm: str) -> list[int]:
        """Pids of the processes named `comm` running in the firewall's namespace."""
        pids: list[int] = []
        for pid in self._namespace_pids(fw.namespace):
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() == comm:
                    pids.append(pid)
        return pids

    def mac(self, namespace: str, device: str) -> str:
        from pyroute2 import IPRoute

        with IPRoute(netns=namespace) as ipr:
            link = ipr.get_links(ipr.link_lookup(ifname=device)[0])[0]
            return str(link.get_attr("IFLA_ADDRESS"))

    def neighbour_mac(self, namespace: str, address: str) -> str | None:
        from pyroute2 import IPRoute

        with IPRoute(netns=namespace) as ipr:
            for entry in ipr.get_neighbours(dst=address):
                mac = entry.get_attr("NDA_LLADDR")
                if mac:
                    return str(mac)
        return None

    def spawn(self, namespace: str, args: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """A helper process (python -m hasync.labecho ...) inside a namespace."""
        argv = ["ip", "netns", "exec", namespace, _python(), *args]
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        return subprocess.Popen(argv, env=env, text=True, **kwargs)

    def start_echo_server(self) -> subprocess.Popen[str]:
        proc = self.spawn(NS_WAN, ["-m", "hasync.labecho", "server", "--bind", SERVER_IP, "--port", str(ECHO_PORT)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "echo server" not in line:
            proc.kill()
            raise LabError(f"echo server did not start: {line.strip()}")
        return proc


@dataclass
class StreamRun:
    """A running lab TCP stream (labecho client) and its status file."""

    proc: subprocess.Popen[str]
    status_path: Path
    summary: dict[str, Any] = field(default_factory=dict)

    def status(self) -> dict[str, Any]:
        try:
            data = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        self.summary = json.loads(lines[-1]) if lines else {"error": "client printed no summary", "sent": -1,
                                                            "echoed": 0}
        return self.summary


def start_stream(lab: Lab, *, interval: float = 0.02, drain: float = 10.0, connections: int = 1,
                 name: str = "stream") -> StreamRun:
    """Long-lived TCP streams lan -> wan through the firewall pair, already flowing when returned."""
    status_path = lab.state_dir / f"{name}-{os.getpid()}-{time.monotonic_ns()}.json"
    proc = lab.spawn(NS_LAN, ["-m", "hasync.labecho", "client", "--connect", f"{SERVER_IP}:{ECHO_PORT}",
                              "--interval", str(interval), "--drain", str(drain), "--status", str(status_path),
                              "--connections", str(connections)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    run = StreamRun(proc, status_path)
    try:
        lab.wait_for(lambda: run.status().get("echoed", 0) >= 10 * connections or proc.poll() is not None, 10.0,
                     "the TCP stream to start flowing")
    except LabError:
        run.stop(timeout=5)
        raise
    if proc.poll() is not None:
        run.stop()
        raise LabError(f"the TCP stream failed to start: {run.summary}")
    return run


def probe_vip(lab: Lab, address: str = LAN_VIP, timeout: float = 10.0) -> dict[str, Any]:
    """ICMP echo from the client to `address` until the first reply (monotonic time of it)."""
    proc = lab.spawn(NS_LAN, ["-m", "hasync.labecho", "probe", "--target", address, "--timeout", str(timeout)],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout + 10)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {"ok": False, "error": out.strip()}
