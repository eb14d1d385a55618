"""Conversion between config.xml elements and the nested value OPNsense's PHP builds.

`element_to_value` follows `Config::toArray()` and `value_to_elements` follows `Config::fromArray()`
(reference §10). The nested value is what travels over XML-RPC, so its shape must match the PHP
side exactly:

* attributes of an element with children live under the key ``@attributes``;
* attributes of a leaf element live under a sibling key ``<tag>@attributes``;
* an element with children becomes a dict, a leaf becomes its text (``''`` when empty);
* a tag repeated among siblings becomes a list in document order;
* tags in `LIST_TAGS` are lists even when single; a lone *empty* leaf of such a tag becomes ``[]``.

What a dict cannot keep (documented in the README as well):

* the relative order of *different* sibling tags that interleave (``<a/><b/><a/>`` comes back as
  ``<a/><a/><b/>``): the merge engine therefore works on the XML tree, never on a dict round trip;
* text of an element that also has child elements (mixed content), comments and processing
  instructions;
* attributes of the second and later items of a repeated *leaf* tag (PHP keeps only one
  ``<tag>@attributes`` key, and puts it back on the first item).
* a blank first item of a repeated list tag: ``<member/><member>2</member>`` reads as ``["2"]``
  (the lone-empty-list-tag rule makes the first one ``[]`` before the second arrives; PHP too).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeAlias

from lxml import etree

# `listtags()` of src/etc/inc/config.inc (reference §10).
LIST_TAGS: frozenset[str] = frozenset(
    """acls alias aliasurl allowedip allowedhostname authserver bridged build_port_path ca cacert
    cert crl clone config container columnitem dhcp_ranges disk dnsserver dnsupdate domainoverrides
    element encryption-algorithm-option field fieldname gateway_item gateway_group gif gre group
    hash-algorithm-option hosts ifgroupentry igmpentry interface_array item key lagg lbpool member
    menu mobilekey monitor_type mount npt ntpserver onetoone openvpn-server openvpn-client
    openvpn-csc option package passthrumac phase1 phase2 ppp pppoe priv proxyarpnet pool pages pipe
    radnsserver roll route row rrddatafile rule schedule service servernat servers
    serversdisabled staticmap subqueue tab timerange tunnel user vip virtual_server vlan winsserver
    wolentry widget""".split()
)

ATTRIBUTES = "@attributes"

Value: TypeAlias = "str | list[Any] | dict[str, Any]"


def _is_sequential(value: object) -> bool:
    """PHP's isArraySequential(): a list (our dicts are never sequential)."""
    return isinstance(value, list)


def element_to_value(node: etree._Element, list_tags: frozenset[str] = LIST_TAGS) -> dict[str, Any]:
    """Convert the children (and attributes) of `node` into a dict, as `Config::toArray()` does."""
    result: dict[str, Any] = {}
    if node.attrib:
        result[ATTRIBUTES] = {str(k): str(v) for k, v in node.attrib.items()}
    for child in node:
        if not isinstance(child.tag, str):  # comments, processing instructions
            continue
        name = child.tag
        if len(child) > 0:
            sub = element_to_value(child, list_tags)
            if name in result:
                old = result[name]
                if not _is_sequential(old):
                    result[name] = [old]
                result[name].append(sub)
            elif name in list_tags:
                result[name] = [sub]
            else:
                result[name] = sub
        else:
            text = child.text or ""
            if name in result:
                if not isinstance(result[name], list):
                    result[name] = [result[name]]
                result[name].append(text)
            elif name in list_tags:
                result[name] = [text] if text.strip() != "" else []
            else:
                result[name] = text
            if child.attrib:
                result[name + ATTRIBUTES] = {str(k): str(v) for k, v in child.attrib.items()}
    return result


def value_to_elements(tag: str, value: Any) -> list[etree._Element]:
    """`Config::fromArray()` for one key: a list yields one element per item, each named `tag`;
    an empty array gives an empty ``<tag/>`` as PHP writes it (so a later toArray sees the same
    shape); ``False`` yields nothing (PHP skips false values); ``True`` becomes ``"1"``."""
    if value is False:
        return []
    if isinstance(value, list):
        if not value:
            return [etree.Element(tag)]
        out: list[etree._Element] = []
        for item in value:
            out.extend(value_to_elements(tag, item))
        return out
    element = etree.Element(tag)
    if isinstance(value, dict):
        fill_element(element, value)
    else:
        element.text = scalar_text(value) or None
    return [element]


def fill_element(element: etree._Element, value: Mapping[str, Any]) -> None:
    """Append the children described by dict `value` to `element`, in the dict's order."""
    leaf_attributes = False
    for key, item in value.items():
        if key == ATTRIBUTES:
            for name, attr in item.items():
                element.set(name, scalar_text(attr))
        elif key.endswith(ATTRIBUTES):
            leaf_attributes = True
        else:
            _append(element, key, item)
    if not leaf_attributes:
        return
    for key, item in value.items():
        if key != ATTRIBUTES and key.endswith(ATTRIBUTES):
            target = next(element.iterchildren(key[: -len(ATTRIBUTES)]), None)
            if target is not None:
                for name, attr in item.items():
                    target.set(name, scalar_text(attr))


def _append(parent: etree._Element, tag: str, value: Any) -> None:
    """``parent.extend(value_to_elements(tag, value))``, but built in place: a standalone element
    is a document of its own in lxml, and moving it into the tree walks it again."""
    if value is False:
        return
    if isinstance(value, list):
        if not value:
            etree.SubElement(parent, tag)
        for item in value:
            _append(parent, tag, item)
        return
    child = etree.SubElement(parent, tag)
    if isinstance(value, dict):
        fill_element(child, value)
    else:
        text = scalar_text(value)
        if text:
            child.text = text


def scalar_text(value: Any) -> str:
    """A config value as element text, the way PHP casts it when writing XML."""
    if value is True:
        return "1"
    if value is None or value is False:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)




def get_path(root_value: dict[str, Any], dotted: str) -> Any:
    """Follow a dotted path through a nested value; None when any level is missing."""
    node: Any = root_value
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def find_path(root: etree._Element, dotted: str) -> list[etree._Element]:
    """All elements at a dotted path below `root` (several when the last tag repeats)."""
    nodes = [root]
    for part in dotted.split("."):
        nodes = [child for node in nodes for child in node if child.tag == part]
        if not nodes:
            return []
    return nodes
