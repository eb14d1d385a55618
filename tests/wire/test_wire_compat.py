"""Wire compatibility with OPNsense's PHP (IXR) encoder, against the bytes in ../shared/fixtures/wire.

Acceptance of issue 2:
* Encoder: the xmlrpc payload for `system.user,system.group,OPNsense.Firewall.Alias,nat` of the
  shipped config.xml.sample decodes to the same value *with the same XML-RPC types* as the
  request PHP produced (compared as typed trees, so array vs struct, string vs int and the empty
  array all count), and is byte-identical.
* Decoder: every request-*.xml decodes to what the PHP side meant.
Skips cleanly when ../shared is absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.core import xmlsafe
from hasync.payload.build import build_payload
from hasync.payload.merge import merge_payload, revision_description
from hasync.wire import xmlrpc

SAMPLE_SECTIONS = ["system.user", "system.group", "OPNsense.Firewall.Alias", "nat"]
SAMPLE_REQUEST = "request-restore_config_section-sample.xml"


def typed(node: etree._Element) -> Any:
    """A <value> as a typed tree: (type, content), struct members in wire order."""
    kids = [child for child in node if isinstance(child.tag, str)]
    if not kids:
        return ("untyped", node.text or "")
    (inner,) = kids
    if inner.tag == "struct":
        members = []
        for member in inner:
            if not isinstance(member.tag, str):
                continue
            name = member.find("name")
            value = member.find("value")
            assert name is not None and value is not None
            members.append((name.text or "", typed(value)))
        return ("struct", members)
    if inner.tag == "array":
        data = inner.find("data")
        assert data is not None
        return ("array", [typed(value) for value in data if isinstance(value.tag, str)])
    tag = "int" if inner.tag == "i4" else inner.tag
    return (tag, inner.text or "")


def typed_params(body: bytes) -> tuple[str, list[Any]]:
    root = xmlsafe.parse_bytes(body, remove_blank_text=False)
    params = root.find("params")
    values = [] if params is None else [param.find("value") for param in params if isinstance(param.tag, str)]
    return root.findtext("methodName") or "", [typed(value) for value in values if value is not None]


@pytest.fixture
def wire(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "wire"


@pytest.fixture
def sample_root(shared_dir: Path) -> etree._Element:
    return xmlsafe.parse_bytes((shared_dir / "fixtures" / "opnsense" / "config.xml.sample").read_bytes())


def test_sample_payload_has_phps_types_and_bytes(wire: Path, sample_root: etree._Element) -> None:
    payload = build_payload(sample_root, SAMPLE_SECTIONS)
    ours = xmlrpc.dumps_request("opnsense.restore_config_section", [payload])
    theirs = (wire / SAMPLE_REQUEST).read_bytes()
    assert typed_params(ours) == typed_params(theirs)
    assert ours == theirs


def test_typed_comparison_sees_type_differences(wire: Path, sample_root: etree._Element) -> None:
    """Control: the typed walker is not blind. An Alias sent as an empty string instead of an
    empty array, or a struct instead of a one-element list, must compare different."""
    theirs = typed_params((wire / SAMPLE_REQUEST).read_bytes())
    payload = build_payload(sample_root, SAMPLE_SECTIONS)
    payload["OPNsense"]["Firewall"]["Alias"] = ""
    assert typed_params(xmlrpc.dumps_request("opnsense.restore_config_section", [payload])) != theirs
    payload = build_payload(sample_root, SAMPLE_SECTIONS)
    payload["system"]["group"][0]["member"] = "0"
    assert typed_params(xmlrpc.dumps_request("opnsense.restore_config_section", [payload])) != theirs


def _sample_meaning() -> Any:
    """What PHP meant by the sample request, written out from the README and config.xml.sample."""
    return {
        "system": {
            "user": [{
                "name": "root", "descr": "System Administrator", "scope": "system", "groupname": "admins",
                "password": "$2y$10$YRVoF4SgskIsrXOvOQjGieB9XqHPRra9R7d80B3BZdbY/j21TwBfS", "uid": "0",
            }],
            "group": [{
                "name": "admins", "description": "System Administrators", "scope": "system", "gid": "1999",
                "member": ["0"], "priv": ["page-all"],
            }],
        },
        "OPNsense": {"Firewall": {"Alias": []}},
        "nat": {"outbound": {"mode": "automatic"}},
    }


EXPECTED_REQUESTS: dict[str, Any] = {
    "request-firmware_version.xml": ("opnsense.firmware_version", []),
    "request-list_services.xml": ("opnsense.list_services", [[]]),
    "request-restart_service.xml": ("opnsense.restart_service", [{"service": "openvpn", "id": "1"}]),
    SAMPLE_REQUEST: ("opnsense.restore_config_section", None),  # filled from _sample_meaning
}


def test_every_request_decodes_to_what_php_meant(wire: Path) -> None:
    files = sorted(wire.glob("request-*.xml"))
    assert files, "no request-*.xml in the wire fixtures"
    for path in files:
        assert path.name in EXPECTED_REQUESTS, f"{path.name}: no expectation written for this request"
        method, params = EXPECTED_REQUESTS[path.name]
        if params is None:
            params = [_sample_meaning()]
        body = path.read_bytes()
        assert xmlrpc.loads_request(body) == (method, params), path.name
        # and our encoder gives PHP's bytes back for what we decoded
        assert xmlrpc.dumps_request(method, params) == body, path.name


def test_sample_request_merges_into_the_sample_config(wire: Path, sample_root: etree._Element) -> None:
    """A backup running the factory config receives the sample request: users, groups and NAT are
    already equal; the missing Alias model is created empty, as PHP's merge writes it."""
    _, (payload,) = xmlrpc.loads_request((wire / SAMPLE_REQUEST).read_bytes())
    report = merge_payload(sample_root, payload, SyncItemRegistry.load())
    assert report.description == revision_description(payload) == (
        "Merged system, OPNsense, nat config sections from XMLRPC client."
    )
    assert report.changed_sections == ["OPNsense"]
    assert report.sections == ["OPNsense.Firewall.Alias"]
    alias = sample_root.find("OPNsense/Firewall/Alias")
    assert alias is not None and len(alias) == 0
    assert build_payload(sample_root, ["system.user", "system.group", "nat"]) == {
        "system": payload["system"], "nat": payload["nat"]}
    # As in PHP: the empty array is written as <Alias/>, which toArray reads back as "" (Alias is
    # not a list tag), so a later sync from this node would send "" where it received [].
    assert build_payload(sample_root, ["OPNsense.Firewall.Alias"]) == {"OPNsense": {"Firewall": {"Alias": ""}}}
