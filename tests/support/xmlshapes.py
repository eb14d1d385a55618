"""Hypothesis strategies for config.xml shapes: elements with every shape a dict round trip
loses (comments, interleaved tags, attributes, CRs, lone empty list tags), and config roots with
the sections whose merge rules differ (rule lists, VIPs, nosync records, a DHCP failover peer)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st
from lxml import etree

TAGS = ["a", "b", "rule", "item", "alias", "nosync", "descr", "user"]
TEXTS = st.sampled_from(["", "1", "0", " ", "x", "a\rb", "l1\r\nl2", "c\r\r\nd\n", "t&<>\"'", "é", "  pad  ",
                         "tab\there", "nosync"])


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> etree._Element:
    node = etree.Element(draw(st.sampled_from(TAGS)))
    for name in draw(st.lists(st.sampled_from(["uuid", "version", "nosync", "x"]), max_size=2, unique=True)):
        node.set(name, draw(TEXTS))
    if depth < 3 and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            node.append(draw(elements(depth + 1)))
        if draw(st.integers(0, 9)) == 0:
            node.insert(draw(st.integers(0, len(node))), etree.Comment("c"))
    else:
        node.text = draw(TEXTS) or None
        if draw(st.integers(0, 12)) == 0:
            node.append(etree.Comment("only a comment"))
    return node


SECTION_CHOICES = ["filter", "nat", "OPNsense.Firewall.Alias", "OPNsense.Firewall", "virtualip", "dhcpd",
                   "system.user", "x", "x.a", "missing.path", "OPNsense.IDS.rules"]


@st.composite
def configs(draw: st.DrawFn) -> etree._Element:
    """A config root with the shapes that matter: repeated and list tags, nosync records and
    attributes, comments, CRs, VIPs with and without vhid, a DHCP failover peer."""
    root = etree.Element("opnsense")
    lan = etree.SubElement(etree.SubElement(root, "interfaces"), "lan")
    etree.SubElement(lan, "ipaddr").text = "10.0.0.1"
    etree.SubElement(lan, "subnet").text = "24"
    for top in draw(st.lists(st.sampled_from(["filter", "nat", "OPNsense", "virtualip", "dhcpd", "system", "x"]),
                             max_size=7)):
        node = etree.SubElement(root, top)
        for child in draw(st.lists(elements(), max_size=3)):
            node.append(child)
        if top == "OPNsense":
            firewall = etree.SubElement(node, "Firewall")
            aliases = etree.SubElement(etree.SubElement(firewall, "Alias", version="1.0.1"), "aliases")
            for child in draw(st.lists(elements(), max_size=3)):
                alias = etree.SubElement(aliases, "alias", uuid=f"u{len(aliases)}")
                alias.append(child)
                if draw(st.booleans()):
                    etree.SubElement(alias, "nosync").text = draw(st.sampled_from(["1", "0", ""]))
            rules = etree.SubElement(etree.SubElement(node, "IDS"), "rules")
            for _ in range(draw(st.integers(0, 2))):
                etree.SubElement(etree.SubElement(rules, "rule", uuid="r"), "sid").text = "1"
        elif top == "virtualip":
            for _ in range(draw(st.integers(0, 3))):
                vip = etree.SubElement(node, "vip")
                for tag, text in (("vhid", draw(st.sampled_from(["", "1", "7"]))),
                                  ("advskew", draw(st.sampled_from(["", "0", "200", "x"]))),
                                  ("mode", "carp"), ("interface", "lan")):
                    etree.SubElement(vip, tag).text = text or None
                if draw(st.integers(0, 4)) == 0:
                    etree.SubElement(vip, "nosync").text = "1"
        elif top == "dhcpd":
            for _ in range(draw(st.integers(1, 2))):
                conf = etree.SubElement(node, "lan")
                etree.SubElement(conf, "failover_peerip").text = draw(st.sampled_from(["10.0.0.2", " ", ""]))
                etree.SubElement(conf, "staticmap").text = draw(TEXTS)
        elif top == "system":
            for _ in range(draw(st.integers(0, 2))):
                user = etree.SubElement(node, "user")
                etree.SubElement(user, "name").text = draw(TEXTS)
    return root


def fingerprint(node: etree._Element) -> tuple[Any, ...]:
    """What the merge counts as a change (`payload.changes.same_nodes`), written plainly: the tag,
    the sorted attributes, leaf text, whether a leaf holds anything (a comment), the element
    children in order; no comments or tails otherwise."""
    kids = [child for child in node if isinstance(child.tag, str)]
    text = "" if kids else (node.text or "")
    return (node.tag, tuple(sorted(node.attrib.items())), text, len(node) == 0, tuple(fingerprint(k) for k in kids))


def edit(node: etree._Element, choice: int, text: str) -> None:
    """One change somewhere in `node`, `choice` picking where and what: of a value, or of something
    only its bytes show and fingerprints ignore (an empty text, a comment, a PI, a tail, the order
    of attributes)."""
    targets = [n for n in node.iter() if isinstance(n.tag, str)]
    target = targets[choice % len(targets)]
    kind = (choice // len(targets)) % 9
    if kind == 0:
        target.text = text or None  # a leaf's text (mixed content if it has children)
    elif kind == 1 and len(target) == 0:
        target.text = ""  # written <a></a>: the same value as <a/>
    elif kind == 2:
        target.append(etree.Comment("added"))
    elif kind == 3 and len(target.attrib) > 1:
        items = list(target.attrib.items())[::-1]  # the same attributes in another order
        target.attrib.clear()
        for key, value in items:
            target.set(key, value)
    elif kind == 4 and target is not node:
        target.tail = text or "\n  "
    elif kind == 5:
        target.set("x", text)
    elif kind == 6:
        target.tag = TAGS[choice % len(TAGS)]
    elif kind == 7 and len(target):
        target.remove(target[0])
    else:
        target.append(etree.ProcessingInstruction("pi", "<b>"))


@st.composite
def untidy(draw: st.DrawFn) -> etree._Element:
    """`elements()` with text beside child elements and tails sprinkled in (whitespace or not)."""
    node = draw(elements())
    for target in node.iter():
        if not isinstance(target.tag, str):
            continue
        if len(target) and draw(st.integers(0, 6)) == 0:
            target.text = draw(st.sampled_from(["\n  ", "mixed"]))
        if target is not node and draw(st.integers(0, 6)) == 0:
            target.tail = draw(st.sampled_from(["\n    ", "tail"]))
    return node
