"""Seeded generator of large, realistic OPNsense config.xml pairs (a primary and its backup).

Why generated and not a real file: real configs that are tens of MB carry customers' addresses,
keys and password hashes, so they cannot ship; and a benchmark needs a size knob. What makes a
real config big is reproduced with the shapes OPNsense writes (reference §9/§10):

* MVC aliases with uuids (many small host/port lists, a few large network tables);
* legacy `filter.rule` with their `created`/`updated` blocks and a sprinkling of ``nosync`` rules,
  and MVC rules in `OPNsense.Firewall.Filter.rules` and `snatrules`;
* NAT port forwards and outbound rules;
* users (bcrypt hashes, API keys, SSH keys) with groups, members and privileges;
* certificates and CAs whose `crt`/`prv` are base64 of PEM (random DER: incompressible, as real
  keys are);
* CARP VIPs per interface plus a few plain IP aliases;
* captive portal templates (base64 zip blobs) and IDS per-signature rule overrides;
* ISC DHCP static maps with a failover peer, Unbound host overrides.

Sizes are reproducible: the same seed and size give byte-identical files. The budget split
between sections is fixed (`SHARES`); each section is filled record by record until its share of
the target is used, measuring every record as it will be written (indented at its final depth).

The backup is the primary as it was some syncs ago: node-specific sections differ (hostname,
interface addresses, `hasync` pointing nowhere, VIP skew +100), ~2% of the synced records are
stale or missing, and it has a few records of its own marked ``nosync``.

Usage: ``python bench/generate.py --size-mb 10 --out DIR`` writes DIR/primary.xml, DIR/backup.xml.
"""

from __future__ import annotations

import argparse
import base64
import random
import sys
import uuid
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

from lxml import etree

# The demo sync account (tests/nodes.py uses the same): user `hasync`, password below, bcrypt hash.
SYNC_USER = "hasync"
SYNC_PASSWORD = "demo-sync-password"
SYNC_HASH = "$2y$10$T.Gzijl3UeYWix3oPMsZIuIhW83TsNncIU.ilN0WhyVXCIsVmkqga"
ROOT_HASH = "$2y$10$FduWWzvi0a2Ya.56iCIG9ezblMqSEf22.ZXgAkSfWxiJb01zuF5Eq"

SYNC_ITEMS = "users,certs,virtualip,aliases,rules,nat,captiveportal,suricata,dhcpd,dnsresolver"

# Fraction of the target size per bulk section (the fixed skeleton is a few KB on top).
SHARES: dict[str, float] = {
    "filter": 0.15,
    "mvc_rules": 0.09,
    "nat": 0.07,
    "aliases": 0.18,
    "users": 0.06,
    "certs": 0.09,
    "captiveportal": 0.08,
    "ids": 0.14,
    "dhcpd": 0.09,
    "unbound": 0.05,
}

INTERFACES = ["wan", "lan", "opt1", "opt2", "opt3", "opt4", "opt5", "opt6"]
HEADER = b'<?xml version="1.0"?>\n'
WORDS = (
    "web mail dns ntp backup office guest iot voip cam printer vpn admin dmz lab build ci mirror "
    "storage db cache proxy ldap radius monitor syslog erp crm shop api edge core branch hq"
).split()


class Gen:
    """All randomness goes through one seeded `random.Random`, so output is a function of seed+size."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.counter = 0

    def uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def word(self) -> str:
        return self.rng.choice(WORDS)

    def name(self, prefix: str = "") -> str:
        self.counter += 1
        return f"{prefix}{self.word()}_{self.word()}_{self.counter}"

    def ip(self, net: int = 10) -> str:
        r = self.rng
        return f"{net}.{r.randrange(256)}.{r.randrange(256)}.{r.randrange(1, 255)}"

    def mac(self) -> str:
        return ":".join(f"{self.rng.randrange(256):02x}" for _ in range(6))

    def stamp(self) -> str:
        return f"{self.rng.randrange(1_500_000_000, 1_760_000_000)}.{self.rng.randrange(10000):04d}"

    def hexid(self, n: int = 13) -> str:
        return "".join(self.rng.choice("0123456789abcdef") for _ in range(n))

    def blob(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def pem_b64(self, kind: str, der_len: int) -> str:
        """base64 of a PEM block of random DER: the shape and entropy of a real crt/prv field."""
        body = base64.b64encode(self.blob(der_len)).decode()
        lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
        pem = f"-----BEGIN {kind}-----\n{lines}\n-----END {kind}-----\n"
        return base64.b64encode(pem.encode()).decode()

    def bcrypt(self) -> str:
        alphabet = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
        return "$2y$10$" + "".join(self.rng.choice(alphabet) for _ in range(53))


def sub(parent: etree._Element, tag: str, text: str | None = None, **attrib: str) -> etree._Element:
    node = etree.SubElement(parent, tag, attrib)
    if text is not None:
        node.text = text
    return node


def leaves(parent: etree._Element, pairs: list[tuple[str, str]]) -> None:
    for tag, text in pairs:
        sub(parent, tag, text if text != "" else None)


def change_block(g: Gen, parent: etree._Element, tag: str, page: str) -> None:
    block = sub(parent, tag)
    leaves(block, [("username", f"root@{g.ip()}"), ("time", g.stamp()), ("description", f"{page} made changes")])


def record_size(node: etree._Element, depth: int) -> int:
    """Bytes this record takes in the written file (OPNsense layout: 2-space indent)."""
    probe = deepcopy(node)
    etree.indent(probe, space="  ", level=depth)
    return len(etree.tostring(probe)) + 2 * depth + 1


def fill(parent: etree._Element, depth: int, budget: int, make: Callable[[etree._Element], etree._Element]) -> int:
    """Append records made by `make(parent)` until `budget` bytes are used; returns the count."""
    used = count = 0
    while used < budget:
        record = make(parent)
        used += record_size(record, depth)
        count += 1
    return count


# --- record makers ------------------------------------------------------------------------------


def legacy_rule(g: Gen, parent: etree._Element) -> etree._Element:
    r = g.rng
    rule = sub(parent, "rule")
    leaves(rule, [("type", r.choice(["pass", "pass", "block", "reject"])), ("interface", r.choice(INTERFACES)),
                  ("ipprotocol", "inet"), ("statetype", "keep state"),
                  ("protocol", r.choice(["tcp", "udp", "tcp/udp"])),
                  ("descr", f"{g.word()} {g.word()} access {g.counter}"), ("direction", "in"), ("quick", "1")])
    if r.random() < 0.3:
        sub(rule, "log", "1")
    if r.random() < 0.05:
        sub(rule, "disabled", "1")
    if r.random() < 0.005:
        sub(rule, "nosync", "1")
    src = sub(rule, "source")
    if r.random() < 0.5:
        sub(src, "any", "1")
    else:
        sub(src, "address", g.ip() + "/24")
    dst = sub(rule, "destination")
    sub(dst, "address", g.name("h_") if r.random() < 0.4 else g.ip())
    sub(dst, "port", str(r.choice([22, 53, 80, 443, 8443, 3389, 5060])))
    change_block(g, rule, "updated", "/firewall_rules_edit.php")
    change_block(g, rule, "created", "/firewall_rules_edit.php")
    g.counter += 1
    return rule


def mvc_rule(g: Gen, parent: etree._Element) -> etree._Element:
    r = g.rng
    rule = sub(parent, "rule", uuid=g.uuid())
    g.counter += 1
    leaves(rule, [
        ("enabled", "1"), ("statetype", "keep"), ("state-policy", ""), ("sequence", str(g.counter * 10)),
        ("action", r.choice(["pass", "block"])), ("quick", "1"), ("interfacenot", "0"),
        ("interface", r.choice(INTERFACES)), ("direction", "in"), ("ipprotocol", "inet"),
        ("protocol", r.choice(["TCP", "UDP", "any"])), ("source_net", g.ip() + "/24"), ("source_not", "0"),
        ("source_port", ""), ("destination_net", g.name("net_")), ("destination_not", "0"),
        ("destination_port", str(r.choice([80, 443, 8080, 25, 993]))), ("gateway", ""), ("replyto", ""),
        ("log", str(r.randrange(2))), ("categories", ""), ("description", f"{g.word()} policy {g.counter}"),
    ])
    return rule


def snat_rule(g: Gen, parent: etree._Element) -> etree._Element:
    rule = sub(parent, "rule", uuid=g.uuid())
    g.counter += 1
    leaves(rule, [("enabled", "1"), ("nonat", "0"), ("sequence", str(g.counter)), ("interface", "wan"),
                  ("ipprotocol", "inet"), ("protocol", "any"), ("source_net", g.ip() + "/24"), ("source_not", "0"),
                  ("source_port", ""), ("destination_net", "any"), ("destination_not", "0"),
                  ("destination_port", ""), ("target", g.ip(203)), ("target_port", ""), ("log", "0"),
                  ("categories", ""), ("description", f"snat {g.word()} {g.counter}")])
    return rule


def port_forward(g: Gen, parent: etree._Element) -> etree._Element:
    r = g.rng
    rule = sub(parent, "rule")
    g.counter += 1
    leaves(rule, [("protocol", r.choice(["tcp", "udp"])), ("interface", "wan"), ("ipprotocol", "inet"),
                  ("descr", f"forward {g.word()} {g.counter}"), ("tag", ""), ("tagged", ""), ("poolopts", ""),
                  ("associated-rule-id", f"nat_{g.hexid(13)}"), ("target", g.ip()),
                  ("local-port", str(r.choice([22, 80, 443, 3389])))])
    src = sub(rule, "source")
    sub(src, "any", "1")
    dst = sub(rule, "destination")
    sub(dst, "network", "wanip")
    sub(dst, "port", str(r.randrange(1024, 65000)))
    change_block(g, rule, "updated", "/firewall_nat_edit.php")
    change_block(g, rule, "created", "/firewall_nat_edit.php")
    return rule


def outbound_rule(g: Gen, parent: etree._Element) -> etree._Element:
    rule = sub(parent, "rule")
    g.counter += 1
    leaves(rule, [("interface", "wan"), ("ipprotocol", "inet"), ("descr", f"outbound {g.counter}"),
                  ("tag", ""), ("tagged", ""), ("poolopts", ""), ("target", g.ip(198))])
    src = sub(rule, "source")
    sub(src, "network", g.ip() + "/24")
    dst = sub(rule, "destination")
    sub(dst, "any", "1")
    change_block(g, rule, "created", "/firewall_nat_out_edit.php")
    return rule


def alias(g: Gen, parent: etree._Element, scale: int = 10) -> etree._Element:
    r = g.rng
    kind = r.choices(["host", "network", "port", "urltable"], weights=[50, 35, 14, 1])[0]
    if kind == "network" and r.random() < 0.01:
        entries = [f"{g.ip()}/{r.randrange(16, 32)}" for _ in range(r.randrange(200, 600) * scale)]  # a block list
    elif kind == "port":
        entries = [str(r.randrange(1, 65535)) for _ in range(r.randrange(1, 12))]
    elif kind == "urltable":
        entries = [f"https://lists.example.net/{g.word()}/{g.hexid(8)}.txt"]
    else:
        entries = [g.ip() for _ in range(r.randrange(1, 25))]
    node = sub(parent, "alias", uuid=g.uuid())
    leaves(node, [("enabled", "1"), ("name", g.name("a_")), ("type", kind), ("path_expression", ""),
                  ("proto", ""), ("interface", ""), ("counters", "0"),
                  ("updatefreq", "1" if kind == "urltable" else ""), ("content", "\n".join(entries)),
                  ("password", ""), ("username", ""), ("authtype", ""), ("categories", ""),
                  ("description", f"{g.word()} {kind} list")])
    return node


def user(g: Gen, parent: etree._Element) -> etree._Element:
    r = g.rng
    g.counter += 1
    node = sub(parent, "user")
    keys = "\n".join(f"{base64.b64encode(g.blob(60)).decode()}|$6${g.hexid(16)}${g.hexid(86)}"
                     for _ in range(r.randrange(0, 3)))
    leaves(node, [("name", f"u{g.counter:06d}"), ("descr", f"{g.word().title()} {g.word().title()}"),
                  ("scope", "user"), ("groupname", ""), ("password", g.bcrypt()), ("uid", str(2000 + g.counter)),
                  ("expires", ""), ("authorizedkeys", g.pem_b64("OPENSSH PUBLIC KEY", 280) if r.random() < 0.3 else ""),
                  ("ipsecpsk", ""), ("otp_seed", ""), ("shell", ""), ("email", f"u{g.counter}@example.net"),
                  ("comment", ""), ("landing_page", ""), ("apikeys", keys)])
    for _ in range(r.randrange(0, 3)):
        sub(node, "priv", r.choice(["page-dashboard-all", "page-diagnostics-logs", "page-firewall-rules"]))
    return node


def cert(g: Gen, parent: etree._Element) -> etree._Element:
    node = sub(parent, "cert", uuid=g.uuid())
    leaves(node, [("refid", g.hexid(13)), ("descr", f"{g.word()}.example.net"), ("caref", "ca_root_1"),
                  ("crt", g.pem_b64("CERTIFICATE", 1200)), ("prv", g.pem_b64("PRIVATE KEY", 1700))])
    return node


def cp_template(g: Gen, parent: etree._Element, largest: int = 240_000) -> etree._Element:
    node = sub(parent, "template", uuid=g.uuid())
    zipped = base64.b64encode(g.blob(g.rng.randrange(largest // 4, largest))).decode()
    leaves(node, [("fileid", g.hexid(40)), ("name", f"portal {g.word()}"), ("content", zipped)])
    return node


def ids_rule(g: Gen, parent: etree._Element) -> etree._Element:
    node = sub(parent, "rule", uuid=g.uuid())
    g.counter += 1
    leaves(node, [("sid", str(2_000_000 + g.counter)), ("enabled", str(g.rng.randrange(2))),
                  ("action", g.rng.choice(["alert", "drop"]))])
    return node


def staticmap(g: Gen, parent: etree._Element) -> etree._Element:
    node = sub(parent, "staticmap")
    g.counter += 1
    leaves(node, [("mac", g.mac()), ("cid", ""), ("ipaddr", f"10.77.{(g.counter >> 8) & 255}.{g.counter & 255}"),
                  ("hostname", f"host-{g.counter}"), ("descr", f"{g.word()} device"), ("filename", ""),
                  ("rootpath", ""), ("defaultleasetime", ""), ("maxleasetime", ""), ("gateway", ""),
                  ("domain", ""), ("domainsearchlist", ""), ("ddnsdomain", ""), ("ddnsdomainprimary", ""),
                  ("ddnsdomainkeyname", ""), ("ddnsdomainkey", ""), ("tftp", ""), ("ldap", "")])
    return node


def host_override(g: Gen, parent: etree._Element) -> etree._Element:
    node = sub(parent, "host", uuid=g.uuid())
    leaves(node, [("enabled", "1"), ("hostname", g.name("h")), ("domain", "corp.example.net"), ("rr", "A"),
                  ("mxprio", ""), ("mx", ""), ("server", g.ip()), ("description", "")])
    return node


# --- the document -------------------------------------------------------------------------------


def build_primary(size: int, seed: int) -> etree._Element:
    g = Gen(seed)
    budget = {key: int(size * share) for key, share in SHARES.items()}
    root = etree.Element("opnsense")
    sub(root, "theme", "opnsense")
    system = sub(root, "system")
    leaves(system, [("hostname", "fw-a"), ("domain", "bench.test"), ("timezone", "Etc/UTC"),
                    ("timeservers", "0.pool.ntp.test 1.pool.ntp.test")])
    admins = sub(system, "group")
    leaves(admins, [("name", "admins"), ("description", "System Administrators"), ("scope", "system"),
                    ("gid", "1999"), ("member", "0"), ("priv", "page-all")])
    sync_group = sub(system, "group")
    leaves(sync_group, [("name", "hasync"), ("description", "HA sync"), ("scope", "local"), ("gid", "2000"),
                        ("member", "2000"), ("priv", "page-xmlrpclibrary")])
    root_user = sub(system, "user")
    leaves(root_user, [("name", "root"), ("descr", "System Administrator"), ("scope", "system"),
                       ("groupname", "admins"), ("password", ROOT_HASH), ("uid", "0")])
    sync_user = sub(system, "user")
    leaves(sync_user, [("name", SYNC_USER), ("descr", "XMLRPC sync user"), ("scope", "user"),
                       ("password", SYNC_HASH), ("uid", "2000")])
    fill(system, 2, budget["users"] * 9 // 10, lambda p: user(g, p))
    for index in range(max(3, min(40, size // 250_000))):
        grp = sub(system, "group")
        leaves(grp, [("name", f"team_{index}"), ("description", f"{g.word()} team"), ("scope", "local"),
                     ("gid", str(3000 + index))])
        for _ in range(g.rng.randrange(5, 60)):
            sub(grp, "member", str(2001 + g.rng.randrange(max(g.counter, 1))))
        for _ in range(g.rng.randrange(1, 8)):
            sub(grp, "priv", f"page-{g.word()}-{g.word()}")
    leaves(system, [("nextuid", str(3000 + g.counter)), ("nextgid", "3100")])
    webgui = sub(system, "webgui")
    sub(webgui, "protocol", "https")
    sub(system, "backupcount", "20")

    interfaces = sub(root, "interfaces")
    for index, name in enumerate(INTERFACES):
        node = sub(interfaces, name)
        leaves(node, [("enable", "1"), ("if", f"vtnet{index}"), ("descr", name.upper()),
                      ("ipaddr", f"10.{index}.0.2" if name != "wan" else "198.51.100.2"),
                      ("subnet", "24")])

    dhcpd = sub(root, "dhcpd")
    lan = sub(dhcpd, "lan")
    leaves(lan, [("enable", "1"), ("failover_peerip", "10.1.0.3")])
    rng_node = sub(lan, "range")
    leaves(rng_node, [("from", "10.1.0.100"), ("to", "10.1.0.199")])
    fill(lan, 3, budget["dhcpd"], lambda p: staticmap(g, p))

    filt = sub(root, "filter")
    fill(filt, 2, budget["filter"], lambda p: legacy_rule(g, p))

    nat = sub(root, "nat")
    fill(nat, 2, budget["nat"] * 7 // 10, lambda p: port_forward(g, p))
    outbound = sub(nat, "outbound")
    sub(outbound, "mode", "hybrid")
    fill(outbound, 3, budget["nat"] * 3 // 10, lambda p: outbound_rule(g, p))

    vips = sub(root, "virtualip")
    vhid = 0
    for index, name in enumerate(INTERFACES):
        for host in (1, 254):
            vhid += 1
            vip = sub(vips, "vip", uuid=g.uuid())
            leaves(vip, [("interface", name), ("mode", "carp"),
                         ("subnet", f"10.{index}.0.{host}" if name != "wan" else f"198.51.100.{host}"),
                         ("subnet_bits", "24"), ("vhid", str(vhid)), ("advbase", "1"), ("advskew", "0"),
                         ("password", g.hexid(24)), ("descr", f"{name} CARP {host}")])
    for index in range(4):
        vip = sub(vips, "vip", uuid=g.uuid())
        leaves(vip, [("interface", "lan"), ("mode", "ipalias"), ("subnet", f"10.1.0.{20 + index}"),
                     ("subnet_bits", "32"), ("descr", f"alias {index}")])

    ca = sub(root, "ca")
    leaves(ca, [("refid", "ca_root_1"), ("descr", "Bench Root CA"), ("crt", g.pem_b64("CERTIFICATE", 1400)),
                ("prv", g.pem_b64("PRIVATE KEY", 1700)), ("serial", "1000")])
    fill(root, 1, budget["certs"], lambda p: cert(g, p))

    opn = sub(root, "OPNsense")
    cp = sub(opn, "captiveportal", version="1.0.0")
    zones = sub(cp, "zones")
    for index in range(3):
        zone = sub(zones, "zone", uuid=g.uuid())
        leaves(zone, [("enabled", "1"), ("zoneid", str(index)), ("interfaces", INTERFACES[2 + index]),
                      ("authservers", "Local Database"), ("idletimeout", "60"), ("hardtimeout", "240"),
                      ("template", ""), ("description", f"guest zone {index}")])
    templates = sub(cp, "templates")
    largest = max(4_000, min(240_000, budget["captiveportal"] // 3))  # several templates even in small configs
    fill(templates, 4, budget["captiveportal"], lambda p: cp_template(g, p, largest))

    ids = sub(opn, "IDS", version="1.0.9")
    ids_rules = sub(ids, "rules")
    fill(ids_rules, 4, budget["ids"] * 95 // 100, lambda p: ids_rule(g, p))
    policies = sub(ids, "policies")
    for index in range(20):
        policy = sub(policies, "policy", uuid=g.uuid())
        leaves(policy, [("enabled", "1"), ("prio", str(index)), ("action", "alert,drop"),
                        ("rulesets", ",".join(g.hexid(8) for _ in range(10))), ("content", ""),
                        ("new_action", "drop"), ("description", f"policy {index}")])
    files = sub(ids, "files")
    fill(files, 4, budget["ids"] * 5 // 100, lambda p: _ids_file(g, p))
    general = sub(ids, "general")
    leaves(general, [("enabled", "1"), ("ips", "1"), ("promisc", "0"), ("interfaces", "wan"),
                     ("homenet", "192.168.0.0/16,10.0.0.0/8,172.16.0.0/12"), ("MPMAlgo", "hs")])

    firewall = sub(opn, "Firewall")
    alias_root = sub(firewall, "Alias", version="1.0.1")
    geoip = sub(alias_root, "geoip")
    sub(geoip, "url")
    aliases = sub(alias_root, "aliases")
    scale = max(1, min(10, budget["aliases"] // 500_000))  # block lists of 2000-6000 entries in big configs
    fill(aliases, 5, budget["aliases"], lambda p: alias(g, p, scale))
    category = sub(firewall, "Category", version="1.0.0")
    cats = sub(category, "categories")
    for index in range(12):
        cat = sub(cats, "category", uuid=g.uuid())
        leaves(cat, [("name", f"cat_{g.word()}_{index}"), ("auto", "0"), ("color", g.hexid(6))])
    filter_mvc = sub(firewall, "Filter", version="1.0.4")
    rules = sub(filter_mvc, "rules")
    fill(rules, 5, budget["mvc_rules"] * 7 // 10, lambda p: mvc_rule(g, p))
    snat = sub(filter_mvc, "snatrules")
    fill(snat, 5, budget["mvc_rules"] * 3 // 10, lambda p: snat_rule(g, p))

    unbound = sub(opn, "unboundplus", version="1.0.9")
    general_u = sub(unbound, "general")
    leaves(general_u, [("enabled", "1"), ("port", "53"), ("dnssec", "1")])
    hosts = sub(unbound, "hosts")
    fill(hosts, 4, budget["unbound"], lambda p: host_override(g, p))

    hasync = sub(root, "hasync", version="1.0.2")
    leaves(hasync, [("disablepreempt", "0"), ("disconnectppps", "0"), ("pfsyncinterface", "opt1"),
                    ("pfsyncpeerip", "10.2.0.3"), ("pfsyncversion", "1400"), ("pfsyncdefer", "0"),
                    ("synchronizetoip", "https://127.0.0.1:8443/"), ("verifypeer", "0"),
                    ("username", SYNC_USER), ("password", SYNC_PASSWORD), ("syncitems", SYNC_ITEMS)])
    revision = sub(root, "revision")
    leaves(revision, [("username", "root@10.1.0.50"), ("description", "/firewall_rules.php made changes"),
                      ("time", "1764115200.00")])
    return root


def _ids_file(g: Gen, parent: etree._Element) -> etree._Element:
    node = sub(parent, "file", uuid=g.uuid())
    leaves(node, [("filename", f"emerging-{g.word()}-{g.hexid(4)}.rules"), ("filter", ""),
                  ("enabled", str(g.rng.randrange(2)))])
    return node


def derive_backup(primary: etree._Element, seed: int) -> etree._Element:
    """The backup as it was some syncs ago: own node settings, ~2% stale records, own nosync records."""
    g = Gen(seed ^ 0x5EED)
    root = deepcopy(primary)
    root.find("system/hostname").text = "fw-b"  # type: ignore[union-attr]
    for node in root.iterfind("interfaces/*/ipaddr"):
        if node.text and node.text.endswith(".2"):
            node.text = node.text[:-2] + ".3"
    root.find("hasync/synchronizetoip").text = None  # type: ignore[union-attr]
    root.find("dhcpd/lan/failover_peerip").text = "10.1.0.2"  # type: ignore[union-attr]
    for node in root.iterfind("virtualip/vip/advskew"):
        node.text = "100"
    # stale records: an older description, or the record not there yet
    for path, field in (("filter/rule", "descr"), ("OPNsense/Firewall/Alias/aliases/alias", "description"),
                        ("OPNsense/Firewall/Filter/rules/rule", "description"), ("nat/rule", "descr"),
                        ("OPNsense/IDS/rules/rule", "action"), ("system/user", "descr")):
        for record in list(root.iterfind(path)):
            roll = g.rng.random()
            if roll < 0.01:
                found = record.find(field)
                if found is not None:
                    found.text = (found.text or "") + " (old)"
            elif roll < 0.015:
                parent = record.getparent()
                assert parent is not None
                parent.remove(record)
    # the backup's own records, kept across syncs
    aliases = root.find("OPNsense/Firewall/Alias/aliases")
    assert aliases is not None
    for index in range(3):
        own = etree.Element("alias", uuid=g.uuid())
        leaves(own, [("enabled", "1"), ("name", f"fw_b_local_{index}"), ("type", "host"),
                     ("content", g.ip()), ("nosync", "1"), ("description", "backup only")])
        aliases.insert(index, own)
    return root


def serialize(root: etree._Element) -> bytes:
    etree.indent(root, space="  ")
    return HEADER + etree.tostring(root, encoding="utf-8") + b"\n"


def generate(size_mb: float, seed: int = 6) -> tuple[bytes, bytes]:
    """(primary, backup) config.xml bytes, reproducible for (size_mb, seed)."""
    size = int(size_mb * 1024 * 1024)
    primary = build_primary(size, seed)
    backup = derive_backup(primary, seed)
    return serialize(primary), serialize(backup)


def write_pair(out: Path, size_mb: float, seed: int = 6) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    primary, backup = generate(size_mb, seed)
    paths = out / "primary.xml", out / "backup.xml"
    paths[0].write_bytes(primary)
    paths[1].write_bytes(backup)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=float, required=True)
    parser.add_argument("--seed", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    primary, backup = write_pair(args.out, args.size_mb, args.seed)
    for path in (primary, backup):
        print(f"{path}: {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
