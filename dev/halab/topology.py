"""The lab's topology and the pure functions that render it: namespaces, addresses, firewall
rulesets and each firewall's config.xml. No I/O here; `halab.lab` builds and drives it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.core.errors import HaError
from hasync.core.osiface import CommandResult, CommandRunner, SubprocessRunner

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
