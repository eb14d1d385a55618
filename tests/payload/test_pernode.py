"""Per-node declarations: the model, drop-ins, payload, merge (both paths) and digests.

Each behaviour is checked next to its control: the same input with the declarations removed
(`without_declarations`) shows the failure the declaration prevents.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.config.items import DEFAULT_ITEMS_DIR, SyncItemRegistry, load_entries
from hasync.config.pernode import Declarations, Selector, parse_path
from hasync.config.store import parse_config_bytes
from hasync.config.tree import element_to_value
from hasync.core.errors import ConfigError, HaError, MethodFault, SyncItemError
from hasync.core.php import php_empty
from hasync.payload import digest as digestmod
from hasync.payload import pernode
from hasync.payload.build import build_payload, payload_for_items
from hasync.payload.merge import merge_payload
from hasync.wire import sections as sectionsmod
from hasync.wire import streamed, xmlrpc
from support.paths import FIXTURES, SHARED
from support.pernode import PERNODE, overlay_tree, without_declarations


def parse_file(path: Path) -> etree._Element:
    return parse_config_bytes(path.read_bytes(), str(path))


def node(name: str) -> etree._Element:
    root = etree.parse(str(FIXTURES / "nodes" / f"{name}.xml"), etree.XMLParser(remove_blank_text=True)).getroot()
    extra = etree.parse(str(PERNODE / f"{name}-extra.xml"), etree.XMLParser(remove_blank_text=True)).getroot()
    overlay_tree(root, extra)
    return root


@pytest.fixture
def registry() -> SyncItemRegistry:
    return SyncItemRegistry.load()


def write(path: Path, content: object) -> Path:
    path.write_text(json.dumps(content))
    return path


# --- the model -----------------------------------------------------------------------------------


def test_path_grammar() -> None:
    rule = parse_path("virtualip.vip[peer].peer")
    assert [s.name for s in rule.steps] == ["virtualip", "vip", "peer"]
    assert rule.steps[1].selector == Selector("peer", None)
    rule = parse_path("OPNsense.cron.jobs.job[description=v1.2 (nightly)]")
    assert rule.steps[-1].selector == Selector("description", "v1.2 (nightly)")
    assert rule.names_record and rule.literal_prefix == ["OPNsense", "cron", "jobs", "job"]
    assert parse_path("dhcpd.*.failover_peerip").literal_prefix == ["dhcpd"]
    for bad in ("", "a..b", "a[", "a[b=c", "a b", "a[=x]", "1a"):
        with pytest.raises(ValueError):
            parse_path(bad)


def test_core_declarations_use_opnsense_field_names(registry: SyncItemRegistry) -> None:
    """Field names as in OPNsense's models: Kea's KeaDhcpv4/6.xml `ha.this_server_name`, the
    Vip.xml `peer`/`peer6`, the ISC DHCP `failover_peerip`, FRR's BGP/OSPF/OSPF6 `routerid`."""
    assert registry.get("kea").declarations.as_json()["local"] == [
        "OPNsense.Kea.dhcp4.ha.this_server_name", "OPNsense.Kea.dhcp6.ha.this_server_name"]
    assert registry.get("virtualip").declarations.as_json()["self_address"] == [
        "virtualip.vip[peer].peer", "virtualip.vip[peer6].peer6"]
    assert registry.get("dhcpd").declarations.as_json()["self_address"] == ["dhcpd.*.failover_peerip"]
    assert registry.get("frr").declarations.as_json()["local"] == [
        "OPNsense.quagga.bgp.routerid", "OPNsense.quagga.ospf.routerid", "OPNsense.quagga.ospf6.routerid"]
    assert registry.get("items" if "items" in registry else "users").declarations == Declarations()


def test_declarations_on_real_kea_example(shared_dir: Path) -> None:
    """OPNsense's own Kea test config has `this_server_name` exactly where the declaration looks."""
    root = parse_file(shared_dir / "fixtures/real/opnsense-core-KeaSnapshots__config.xml")
    payload = build_payload(root, ["OPNsense.Kea"])
    found = pernode.local_fields(payload, SyncItemRegistry.load().declarations())
    assert found == ["OPNsense.Kea.dhcp4.ha.this_server_name", "OPNsense.Kea.dhcp6.ha.this_server_name"]


# --- drop-ins: schema-checked, refused with file and field ----------------------------------------

ITEM = {"id": "x", "description": "d", "sections": ["OPNsense.X"]}


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({**ITEM, "local": "OPNsense.X.a"}, "local"),
        ({**ITEM, "local": ["OPNsense.X.a", 7]}, "local[1]"),
        ({**ITEM, "local": ["OPNsense.X.a b"]}, "local[0]"),
        ({**ITEM, "local": ["OPNsense.Y.a"]}, "local[0]"),  # outside the item's sections
        ({**ITEM, "local": ["interfaces.lan.ipaddr"]}, "local[0]"),
        ({**ITEM, "self_address": ["OPNsense.X.peers[*]"]}, "self_address[0]"),  # names records
        ({**ITEM, "swap": [["OPNsense.X.a"]]}, "swap[0]"),
        ({**ITEM, "swap": [["OPNsense.X.a.b", "OPNsense.X.c.d"]]}, "swap[0]"),  # not one record
        ({**ITEM, "swap": [["OPNsense.X.a", "OPNsense.X.a"]]}, "swap[0]"),
        ({**ITEM, "sel": ["x"]}, "(top level)"),
        ([ITEM, {"extends": "x", "local": ["OPNsense.X.a["]}], "[1].local[0]"),
        ({"extends": "cron"}, "(top level)"),  # an extension that declares nothing
        ({"extends": "cron", "local": ["OPNsense.cron.jobs.job[x"]}, "local[0]"),
    ],
)
def test_malformed_declaration_names_file_and_field(tmp_path: Path, content: object, field: str) -> None:
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(SyncItemError) as caught:
        SyncItemRegistry.load(tmp_path)
    message = str(caught.value)
    assert str(path) in message
    assert f"field {field}" in message, message


def test_extension_of_unknown_item_and_outside_its_sections(tmp_path: Path) -> None:
    path = write(tmp_path / "ext.json", {"extends": "nope", "local": ["a.b"]})
    with pytest.raises(SyncItemError, match=rf"{path}: field extends: no sync item 'nope'"):
        SyncItemRegistry.load(tmp_path)
    write(path, {"extends": "cron", "local": ["OPNsense.Kea.dhcp4.ha.enabled"]})
    with pytest.raises(SyncItemError, match=rf"{path}: field local\[0\]: .*not inside the item's sections"):
        SyncItemRegistry.load(tmp_path)


def admin_registry(items_dir: Path) -> SyncItemRegistry:
    """The shipped items plus the admin's drop-in that keeps one cron job per node."""
    for source in DEFAULT_ITEMS_DIR.glob("*.json"):
        shutil.copy(source, items_dir)
    shutil.copy(PERNODE / "keep-firmware-job.json", items_dir)
    return SyncItemRegistry.load(items_dir)


def test_admin_drop_in_extends_a_core_item(tmp_path: Path) -> None:
    registry = admin_registry(tmp_path)
    assert registry.get("cron").declarations.as_json()["local"] == [
        "OPNsense.cron.jobs.job[description=Firmware update (each node at its own hour)]"]
    assert [type(e).__name__ for e in load_entries(tmp_path / "keep-firmware-job.json")] == ["ItemExtension"]
    assert registry.get("cron").sections == ["OPNsense.cron"]  # an extension adds declarations only


# --- payload: self_address and swap on the primary ---------------------------------------------------


def _legacy_dhcp_rewrite(payload: dict[str, Any], config: dict[str, Any]) -> None:
    """The code path payload.py had before declarations (kept here as the oracle)."""
    for ifname, conf in (payload.get("dhcpd") or {}).items():
        if not isinstance(conf, dict):
            continue
        peer = conf.get("failover_peerip")
        if not isinstance(peer, str) or peer.strip() == "":
            continue
        peer_ip = ipaddress.IPv4Address(peer.strip())
        best: tuple[int, int, str] | None = None
        for name, iface in (config.get("interfaces") or {}).items():
            try:
                network = ipaddress.IPv4Interface(f"{iface['ipaddr'].strip()}/{iface['subnet'].strip()}")
            except (KeyError, ValueError, AttributeError, TypeError):
                continue
            if peer_ip in network.network and peer_ip != network.ip:
                rank = (network.network.prefixlen, 1 if name == ifname else 0, str(network.ip))
                if best is None or rank[:2] > best[:2]:
                    best = rank
        assert best is not None
        conf["failover_peerip"] = best[2]


def _fixture_configs() -> list[Path]:
    paths = sorted((FIXTURES / "configs").glob("*.xml")) + sorted((FIXTURES / "nodes").glob("*.xml"))
    real = SHARED / "fixtures" / "real"
    return paths + (sorted(real.glob("*.xml")) if real.is_dir() else [])


@pytest.mark.parametrize("path", _fixture_configs(), ids=lambda p: p.name)
def test_dhcp_failover_declaration_gives_byte_identical_payloads(path: Path, registry: SyncItemRegistry) -> None:
    """The failover rewrite as a declaration: the same XML-RPC bytes as the code path it replaced."""
    root = parse_config_bytes(path.read_bytes(), str(path))
    ids = [i for i in registry.ids() if i != "virtualip"]  # no VIP peers here: the old code had no VIP rule
    try:
        got = xmlrpc.dumps_request("m", [payload_for_items(root, registry, ids)])
    except HaError:
        pytest.skip("the config has a failover peer no interface faces (an error either way)")
    expected_payload = payload_for_items(root, without_declarations(registry), ids)
    _legacy_dhcp_rewrite(expected_payload, element_to_value(root))
    assert got == xmlrpc.dumps_request("m", [expected_payload])


def test_dhcp_failover_control_without_the_declaration(registry: SyncItemRegistry) -> None:
    root = parse_file(FIXTURES / "configs" / "primary.xml")
    with_rule = payload_for_items(root, registry, ["dhcpd"])
    without = payload_for_items(root, without_declarations(registry), ["dhcpd"])
    assert with_rule["dhcpd"]["lan"]["failover_peerip"] == "192.168.10.2"
    assert without["dhcpd"]["lan"]["failover_peerip"] == "192.168.10.3"  # the peer's own address


def test_unicast_carp_peer_becomes_our_address_facing_it(registry: SyncItemRegistry) -> None:
    root = node("primary")
    notes: list[pernode.Note] = []
    payload = build_payload(root, ["virtualip"], registry.declarations(), notes)
    vip = next(v for v in payload["virtualip"]["vip"] if v["vhid"] == "5")
    assert (vip["peer"], vip["peer6"]) == ("10.77.1.2", "fd00:77:1::2")
    assert vip["advskew"] == 100
    assert {(n.old, n.new) for n in notes} == {("10.77.1.3", "10.77.1.2"), ("fd00:77:1::3", "fd00:77:1::2")}
    assert all(n.path.startswith("virtualip.vip[uuid=6f3c1a2e-0001-4a1b-9c2d-000000000005].") for n in notes)
    control = build_payload(root, ["virtualip"], Declarations())
    assert next(v for v in control["virtualip"]["vip"] if v["vhid"] == "5")["peer"] == "10.77.1.3"
    assert "peer" not in next(v for v in payload["virtualip"]["vip"] if v["vhid"] == "1")  # multicast VIP


def test_unicast_peer_on_the_real_carp_example(shared_dir: Path, registry: SyncItemRegistry) -> None:
    """OPNsense's documented CARP pair: the master's LAN VIP made unicast towards the backup's LAN
    address; the payload carries the master's own LAN address."""
    master = parse_file(shared_dir / "fixtures/real/opnsense-docs__Carp_example_master.xml")
    backup = parse_file(shared_dir / "fixtures/real/opnsense-docs__Carp_example_backup.xml")
    backup_lan = backup.findtext("interfaces/lan/ipaddr")
    vip = next(v for v in master.iter("vip") if v.findtext("interface") == "lan")
    etree.SubElement(vip, "peer").text = backup_lan
    payload = build_payload(master, ["virtualip"], registry.declarations())
    sent = next(v for v in payload["virtualip"]["vip"] if v["interface"] == "lan")
    assert sent["peer"] == master.findtext("interfaces/lan/ipaddr") != backup_lan
    assert build_payload(master, ["virtualip"], Declarations())["virtualip"]["vip"][1]["peer"] == backup_lan


def test_peer_no_interface_faces_is_an_error_naming_the_field(registry: SyncItemRegistry) -> None:
    root = node("primary")
    next(v for v in root.iter("vip") if v.findtext("vhid") == "5").find("peer").text = "203.0.113.9"
    with pytest.raises(ConfigError, match=r"virtualip\.vip\[uuid=6f3c1a2e-0001-4a1b-9c2d-000000000005\]\.peer "
                                          r"203\.0\.113\.9: no interface has a static IPv4 subnet"):
        build_payload(root, ["virtualip"], registry.declarations())


def test_swap_trades_fields_of_each_record(tmp_path: Path) -> None:
    write(tmp_path / "pair.json", {"id": "pair", "description": "d", "sections": ["OPNsense.Pair"],
                                   "swap": [["OPNsense.Pair.link[*].this", "OPNsense.Pair.link[*].other"]]})
    registry = SyncItemRegistry.load(tmp_path)
    root = etree.fromstring(
        "<opnsense><OPNsense><Pair><link><this>a</this><other>b</other></link>"
        "<link><this>c</this></link></Pair></OPNsense></opnsense>")
    payload = payload_for_items(root, registry, ["pair"])
    assert payload["OPNsense"]["Pair"]["link"] == [{"this": "b", "other": "a"}, {"other": "c"}]
    assert payload_for_items(root, without_declarations(registry), ["pair"])["OPNsense"]["Pair"]["link"][0] == \
        {"this": "a", "other": "b"}


# --- merge, both paths -------------------------------------------------------------------------------


def _kea(root: etree._Element, family: str, field: str) -> str | None:
    return root.findtext(f"OPNsense/Kea/{family}/ha/{field}")


def test_merge_keeps_the_backups_local_values(registry: SyncItemRegistry) -> None:
    primary, backup = node("primary"), node("backup")
    payload = payload_for_items(primary, registry, ["kea"])
    before = copy.deepcopy(payload)
    report = merge_payload(backup, payload, registry)
    assert payload == before  # the caller's payload is not changed (copy-on-write)
    assert (_kea(backup, "dhcp4", "this_server_name"), _kea(backup, "dhcp6", "this_server_name")) == ("fw-b", "fw-b")
    assert _kea(backup, "dhcp4", "enabled") == "1"  # the rest of Kea follows the primary
    assert _kea(backup, "dhcp4", "max_unacked_clients") == "2"
    assert backup.findtext("OPNsense/Kea/dhcp4/subnets/subnet4/subnet") == "10.77.1.0/24"
    assert len(backup.findall("OPNsense/Kea/dhcp4/ha_peers/peer")) == 2
    assert report.kept_local == ["OPNsense.Kea.dhcp4.ha.this_server_name", "OPNsense.Kea.dhcp6.ha.this_server_name"]
    control = node("backup")
    merge_payload(control, payload, without_declarations(registry))
    assert _kea(control, "dhcp4", "this_server_name") == "fw-a"  # what OPNsense does (#9801, #7354)


def test_local_value_the_backup_lacks_stays_absent(registry: SyncItemRegistry) -> None:
    primary, backup = node("primary"), node("backup")
    ha = backup.find("OPNsense/Kea/dhcp4/ha")
    ha.remove(ha.find("this_server_name"))
    merge_payload(backup, payload_for_items(primary, registry, ["kea"]), registry)
    assert backup.find("OPNsense/Kea/dhcp4/ha/this_server_name") is None  # never the primary's name
    assert _kea(backup, "dhcp4", "enabled") == "1"


def test_a_kept_local_value_is_no_change(registry: SyncItemRegistry) -> None:
    primary, backup = node("primary"), node("backup")
    merge_payload(backup, payload_for_items(primary, registry, ["kea"]), registry)
    again = merge_payload(backup, payload_for_items(primary, registry, ["kea"]), registry)
    assert not again.changed and again.sections == []


def test_fast_path_merges_the_same_config(registry: SyncItemRegistry) -> None:
    """Fast path and compatible path: the same payload, so the same merged bytes."""
    primary = node("primary")
    sections = registry.sections_for(["kea", "virtualip", "cron"])
    blob = sectionsmod.build_blob(primary, sections, declarations=registry.declarations())
    assert blob.param["pernode"]["self_address"] == ["virtualip.vip[peer].peer", "virtualip.vip[peer6].peer6"]
    fast = sectionsmod.decode_param(blob.param).payload
    compatible = xmlrpc.loads_request(xmlrpc.dumps_request("m", [build_payload(
        primary, sections, registry.declarations())]))[1][0]
    assert fast == compatible
    merged = []
    for payload in (fast, compatible):
        backup = node("backup")
        merge_payload(backup, payload, registry)
        merged.append(etree.tostring(backup))
    assert merged[0] == merged[1]
    backup = etree.fromstring(merged[0])
    assert _kea(backup, "dhcp4", "this_server_name") == "fw-b"
    assert backup.xpath("string(virtualip/vip[vhid='5']/peer)") == "10.77.1.2"


def test_a_section_at_a_time_keeps_the_same_local_values(registry: SyncItemRegistry) -> None:
    """The agent's merge of a fast-path request a section at a time (`wire.streamed`) keeps the
    declared-local fields and rewrites the per-node ones as the whole request's merge does."""
    primary = node("primary")
    sections = registry.sections_for(["kea", "virtualip", "cron"])
    param = sectionsmod.build_blob(primary, sections, declarations=registry.declarations()).param
    outcomes = []
    for decode in (sectionsmod.decode_param, streamed.decode_streamed):
        backup = node("backup")
        payload = decode(dict(param, data=list(param["data"])), sectionsmod.MAX_INFLATED).payload
        report = merge_payload(backup, payload, registry)
        outcomes.append((etree.tostring(backup), report.public_dict(), type(payload).__name__))
    assert outcomes[1][2] == "StreamedSections"
    assert outcomes[1][:2] == outcomes[0][:2]
    assert outcomes[1][1]["kept_local"] == ["OPNsense.Kea.dhcp4.ha.this_server_name",
                                            "OPNsense.Kea.dhcp6.ha.this_server_name"]
    merged = etree.fromstring(outcomes[1][0])
    assert _kea(merged, "dhcp4", "this_server_name") == "fw-b"
    assert merged.xpath("string(virtualip/vip[vhid='5']/peer)") == "10.77.1.2"


def test_fast_path_without_rules_from_the_primary_uses_the_shipped_ones(registry: SyncItemRegistry) -> None:
    blob = sectionsmod.build_blob(node("primary"), ["virtualip"], declarations=registry.declarations())
    param = dict(blob.param)
    del param["pernode"]
    payload = sectionsmod.decode_param(param).payload
    assert next(v for v in payload["virtualip"]["vip"] if v["vhid"] == "5")["peer"] == "10.77.1.2"


def test_corrected_unicast_peer_reconfigures_carp_on_the_backup(registry: SyncItemRegistry) -> None:
    """A backup that got the peer copied verbatim (pointing at itself) is corrected by the next
    sync, and the merge reports the VIP as changed so CARP is reconfigured, not just the file."""
    primary, backup = node("primary"), node("backup")
    merge_payload(backup, payload_for_items(primary, without_declarations(registry), ["virtualip"]), registry)
    assert backup.xpath("string(virtualip/vip[vhid='5']/peer)") == "10.77.1.3"  # OPNsense's behaviour (#8120)
    report = merge_payload(backup, payload_for_items(primary, registry, ["virtualip"]), registry)
    assert [(vip.spec.vhid, vip.changed_fields) for vip in report.vips_changed] == [(5, ("peer", "peer6"))]


@pytest.mark.parametrize("rules", [{"self_address": ["virtualip.vip[*]"]}, {"self_address": [7]},
                                   {"swap": [["a.b"]]}, {"swap": "a"}, "x"])
def test_fast_path_refuses_malformed_rules_from_the_wire(rules: Any, registry: SyncItemRegistry) -> None:
    param = dict(sectionsmod.build_blob(node("primary"), ["virtualip"], declarations=registry.declarations()).param)
    param["pernode"] = rules
    with pytest.raises(MethodFault, match="'pernode'"):
        sectionsmod.decode_param(param)


def test_admin_local_record_is_kept_whole(tmp_path: Path) -> None:
    registry = admin_registry(tmp_path)
    primary, backup = node("primary"), node("backup")
    payload = payload_for_items(primary, registry, ["cron"])
    merge_payload(backup, payload, registry)
    jobs = {job.findtext("description"): job.findtext("hours") for job in backup.iter("job")}
    assert jobs == {"Firmware update (each node at its own hour)": "4", "Remote backup": "*"}
    control = node("backup")
    merge_payload(control, payload, without_declarations(registry))
    assert {job.findtext("hours") for job in control.iter("job")} == {"3", "*"}


# --- digests ---------------------------------------------------------------------------------------


def test_local_difference_is_no_digest_difference(registry: SyncItemRegistry) -> None:
    primary, backup = node("primary"), node("backup")
    merge_payload(backup, payload_for_items(primary, registry, ["kea"]), registry)
    ours = digestmod.item_digests(digestmod.primary_item_values(primary, registry, ["kea"]), registry)
    values, _ = digestmod.backup_item_values(backup, registry, ["kea"])
    assert digestmod.item_digests(values, registry) == ours
    # control: the digests without the declaration differ (digest-first would resend forever)
    assert digestmod.item_digests(values) != digestmod.item_digests(
        digestmod.primary_item_values(primary, registry, ["kea"]))


def test_prune_does_not_touch_shared_values(registry: SyncItemRegistry) -> None:
    values = digestmod.primary_item_values(node("primary"), registry, ["kea"])
    before = copy.deepcopy(values)
    pernode.prune_local(values["kea"], registry.declarations())
    assert values == before
    assert not php_empty(values["kea"]["OPNsense"]["Kea"]["dhcp4"]["ha"]["this_server_name"])
