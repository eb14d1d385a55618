"""hasync.* agent methods over real TLS, the canonical digest form, the snapshot, discovery."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.agent.hasync_methods import METHODS
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.config.tree import element_to_value
from hasync.core.errors import ConfigError, RemoteFault
from hasync.payload import digest
from hasync.payload.build import build_payload, copy_section
from hasync.payload.merge import merge_payload
from hasync.sync import snapshot
from hasync.wire import xmlrpc
from hasync.wire.discovery import discover
from support.health import agent, backend, backup_kernel, edit, fresh_pair, peer, sync
from support.nodes import Pair
from support.paths import FIXTURES, SHARED

ITEMS = ["users", "aliases", "rules", "nat", "virtualip"]


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return fresh_pair(tmp_path)


def local_digests(pair: Pair, ids: list[str] = ITEMS) -> dict[str, str]:
    root = ConfigStore(pair.primary).load()
    return digest.item_digests(digest.primary_item_values(root, SyncItemRegistry.load(), ids))


def remote_digests(pair: Pair, ids: list[str] = ITEMS) -> dict[str, str]:
    digests, unknown = digest.parse_digest_reply(peer(pair).call("hasync.digest", [ids]))
    assert unknown == []
    return digests


# --- discovery and switching off ----------------------------------------------------------------


def test_list_methods_names_every_extension(pair: Pair) -> None:
    with agent(pair):
        features = discover(peer(pair))
    assert set(METHODS) <= features.methods
    assert features.extensions and features.has("opnsense.restore_config_section")


def test_extensions_switched_off_look_like_stock_opnsense(pair: Pair) -> None:
    with agent(pair, extensions=False):
        client = peer(pair)
        features = discover(client)
        assert not features.extensions and not any(m.startswith("hasync.") for m in features.methods)
        assert features.has("opnsense.firmware_version")  # control: the stock methods are all there
        with pytest.raises(RemoteFault) as info:
            client.call("hasync.digest", [ITEMS])
    assert info.value.code == xmlrpc.UNKNOWN_METHOD
    assert "hasync.digest does not exist" in info.value.fault_string


def test_capabilities_describe_the_node(pair: Pair) -> None:
    with agent(pair):
        caps = peer(pair).call("hasync.capabilities")
    assert caps["agent"] == "opnsense-ha" and caps["canonical"] == digest.CANONICAL_FORM
    assert caps["algorithm"] == "sha256" and set(caps["methods"]) == set(METHODS)
    assert caps["node"] == {"hostname": "fw-b", "synchronizetoip_set": False, "role": "backup"}
    assert {"digest", "export_sections", "carp_status", "history", "rollback"} <= set(caps["features"])


# --- digests -------------------------------------------------------------------------------------


def test_digests_equal_after_sync_and_differ_before(pair: Pair) -> None:
    with agent(pair):
        before = remote_digests(pair)
        local = local_digests(pair)
        # control: the fixture backup really differs in every item but users
        assert {i for i in ITEMS if before[i] != local[i]} == {"aliases", "rules", "nat", "virtualip"}
        sync(pair)
        after = remote_digests(pair)
    assert after == local_digests(pair)
    # ... although the backup keeps its own nosync alias and its plain IP alias VIP, and stores
    # the CARP VIPs with advskew 100 where the primary has 0
    root = ConfigStore(pair.backup).load()
    assert "fw_b_monitoring" in [a.findtext("name") for a in root.iterfind(".//aliases/alias")]
    assert [v.findtext("advskew") for v in root.iterfind("virtualip/vip") if v.findtext("vhid")] == ["100", "100"]
    assert any(v.findtext("mode") == "ipalias" for v in root.iterfind("virtualip/vip"))


def test_a_local_edit_on_the_backup_changes_only_its_item(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        synced = remote_digests(pair)
        with edit(pair.backup) as root:
            alias = next(a for a in root.iterfind(".//aliases/alias") if a.findtext("name") == "admin_nets")
            alias.find("content").text = "10.99.0.0/16"
        after = remote_digests(pair)
    assert {i for i in ITEMS if after[i] != synced[i]} == {"aliases"}


def test_backup_nosync_records_are_not_drift_but_other_records_are(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        synced = remote_digests(pair)
        with edit(pair.backup) as root:
            aliases = root.find("OPNsense/Firewall/Alias/aliases")
            local = etree.SubElement(aliases, "alias", uuid="0d6a3b3c-3333-4c5e-8d2f-00000000000a")
            for tag, text in (("enabled", "1"), ("name", "only_here"), ("type", "host"), ("content", "10.1.1.1"),
                              ("nosync", "1")):
                etree.SubElement(local, tag).text = text
        assert remote_digests(pair) == synced
        with edit(pair.backup) as root:  # control: the same record without nosync is drift
            node = root.find("OPNsense/Firewall/Alias/aliases/alias[@uuid='0d6a3b3c-3333-4c5e-8d2f-00000000000a']")
            node.remove(node.find("nosync"))
        assert remote_digests(pair)["aliases"] != synced["aliases"]


def test_advskew_transform_is_not_drift_but_an_untransformed_skew_is(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        synced = remote_digests(pair)
        with edit(pair.backup) as root:
            vip = next(v for v in root.iterfind("virtualip/vip") if v.findtext("vhid") == "1")
            vip.find("advskew").text = "0"  # the primary's own value: the backup would win elections
        assert remote_digests(pair)["virtualip"] != synced["virtualip"]


def test_digest_of_all_items_and_unknown_ids(pair: Pair) -> None:
    with agent(pair):
        reply = peer(pair).call("hasync.digest", [["rules", "no-such-item"]])
        everything = peer(pair).call("hasync.digest")
    assert set(reply["items"]) == {"rules"} and reply["unknown"] == ["no-such-item"]
    assert set(everything["items"]) == set(SyncItemRegistry.load().ids())
    assert all(len(value) == 64 for value in everything["items"].values())


def test_export_sections_is_raw_payload_form(pair: Pair) -> None:
    with agent(pair):
        reply = peer(pair).call("hasync.export_sections", [["aliases", "virtualip", "bogus"]])
    assert reply["unknown"] == ["bogus"]
    aliases = reply["items"]["aliases"]
    assert aliases["sections"] == ["aliases", "OPNsense.Firewall.Alias"]
    records = aliases["value"]["OPNsense"]["Firewall"]["Alias"]["aliases"]["alias"]
    assert [r["name"] for r in records] == ["fw_b_monitoring"] and records[0]["nosync"] == "1"  # nosync kept
    assert aliases["value"]["aliases"] == []  # legacy path missing: sent as [] like the primary does
    vips = reply["items"]["virtualip"]["value"]["virtualip"]["vip"]
    vips = vips if isinstance(vips, list) else [vips]
    assert [v["mode"] for v in vips] == ["ipalias"]  # the backup's own VIP, no vhid


def test_carp_status_over_the_wire(pair: Pair) -> None:
    kernel = backup_kernel()
    with agent(pair, backend(pair.backup, kernel)):
        facts = peer(pair).call("hasync.carp_status")
    assert facts["available"] is True and facts["node"] == "fw-b" and facts["backend"] == "freebsd"
    states = {(v["interface"], v["vhid"]): v["status"] for v in facts["vhids"]}
    assert states == {("lan", 1): "BACKUP", ("wan", 2): "BACKUP"}
    assert facts["state_sync"]["configured"] is True and facts["state_sync"]["syncok"] == "yes"
    assert facts["external_demotion"] == 0 and facts["preempt"] is True
    assert "carp-lan-secret" not in json.dumps(facts)


def test_carp_status_without_failover_backend(pair: Pair) -> None:
    with agent(pair):
        facts = peer(pair).call("hasync.carp_status")
    assert facts["available"] is False and "without a failover backend" in facts["reason"]


# --- the canonical form --------------------------------------------------------------------------


def test_normalize_matches_what_the_backup_stores() -> None:
    assert digest.normalize({"advskew": 100, "on": True, "gone": False, "x": None, "e": [], "d": {}, "w": "  "}) == {
        "advskew": "100", "on": "1", "x": "", "e": "", "d": "", "w": ""}
    assert digest.normalize([]) == "" and digest.normalize(["1", 2]) == ["1", "2"]
    # list order is configuration; key order is not
    assert digest.digest({"a": {"x": "1", "y": "2"}}) == digest.digest({"a": {"y": "2", "x": "1"}})
    assert digest.digest({"r": ["1", "2"]}) != digest.digest({"r": ["2", "1"]})


def test_canonical_strips_nosync_where_the_merge_keeps_it_and_keeps_only_vhid_vips() -> None:
    rule_list = [{"descr": "a"}, {"descr": "local", "nosync": "1"}, {"descr": "b", "nosync": "0"}]
    value = {"virtualip": {"vip": [{"vhid": "1", "advskew": 100}, {"mode": "ipalias", "subnet": "10.0.0.9"},
                                   {"vhid": "3", "nosync": "1"}]},
             "OPNsense": {"Firewall": {"Filter": {"rules": {"rule": copy.deepcopy(rule_list)}}}},
             "filter": {"rule": copy.deepcopy(rule_list)}}
    assert digest.canonical(value) == {
        "virtualip": {"vip": [{"vhid": "1", "advskew": "100"}]},
        "OPNsense": {"Firewall": {"Filter": {"rules": {"rule": [{"descr": "a"}, {"descr": "b", "nosync": "0"}]}}}},
        # the merge replaces the legacy ordered rule list wholesale, dropping local nosync rules:
        # such a rule is a difference a sync would remove, so it stays in the form
        "filter": {"rule": [{"descr": "a"}, {"descr": "local", "nosync": "1"}, {"descr": "b", "nosync": "0"}]},
    }


def test_backup_nosync_rule_in_a_legacy_rule_list_differs_until_a_sync_drops_it(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        with edit(pair.backup) as root:
            local = copy.deepcopy(root.find("filter/rule"))
            local.find("descr").text = "fw-b local rule"
            etree.SubElement(local, "nosync").text = "1"
            root.find("filter").append(local)
        assert remote_digests(pair)["rules"] != local_digests(pair)["rules"]
        sync(pair)
        assert remote_digests(pair)["rules"] == local_digests(pair)["rules"]
    assert "fw-b local rule" not in (pair.backup / "config.xml").read_text()
    assert digest.canonical({"virtualip": {"vip": []}}) == digest.canonical({"virtualip": []}) == {"virtualip": ""}


def _config_roots() -> list[tuple[str, Any]]:
    roots = [(path.name, parse_config_bytes(path.read_bytes(), str(path)))
             for path in sorted((FIXTURES / "nodes").glob("*.xml")) + sorted((FIXTURES / "configs").glob("*.xml"))]
    real = SHARED / "fixtures" / "real"
    if real.is_dir():
        for path in sorted(real.glob("*.xml")):
            try:
                roots.append((path.name, parse_config_bytes(path.read_bytes(), str(path))))
            except (OSError, ConfigError):  # a shared sample we cannot read is not our subject
                continue
    return roots


@pytest.mark.parametrize(("name", "root"), _config_roots(), ids=[name for name, _ in _config_roots()])
def test_tree_values_equal_whole_tree_conversion(name: str, root: Any) -> None:
    """The path-aware extraction gives exactly what copying out of `element_to_value(root)` gives."""
    whole = element_to_value(root)
    for item in SyncItemRegistry.load():
        expected: dict[str, Any] = {}
        for section in item.sections:
            copy_section(whole, expected, section)
        assert digest.tree_item_value(root, item.sections) == expected, (name, item.id)


def test_real_carp_pair_in_sync_after_a_merge(shared_dir: Path) -> None:
    """OPNsense's documented CARP example: after merging the master's payload, every digest agrees."""
    base = shared_dir / "fixtures" / "real"
    master = parse_config_bytes((base / "opnsense-docs__Carp_example_master.xml").read_bytes(), "master")
    backup = parse_config_bytes((base / "opnsense-docs__Carp_example_backup.xml").read_bytes(), "backup")
    registry = SyncItemRegistry.load()
    ids = [item.id for item in registry if item.id not in ("dhcpd", "dhcpdv6")]  # needs interface addresses
    primary = digest.item_digests(digest.primary_item_values(master, registry, ids))
    merge_payload(backup, build_payload(master, registry.sections_for(ids)), registry)
    backup_values, unknown = digest.backup_item_values(backup, registry, ids)
    assert unknown == [] and digest.item_digests(backup_values) == primary


# --- the primary's snapshot ----------------------------------------------------------------------


def test_snapshot_after_sync_records_both_sides(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        remote = remote_digests(pair)
    snap = snapshot.load(pair.primary)
    assert snap is not None and snap.target == peer(pair).url
    assert {i: r.digest for i, r in snap.items.items()} == local_digests(pair)
    assert {i: r.backup_digest for i, r in snap.items.items()} == remote
    assert digest.digest(snap.item_value("rules") or {}) == snap.items["rules"].digest
    state = pair.primary / "ha-state"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert all(oct(p.stat().st_mode & 0o777) == "0o600" for p in state.glob("last-sync*"))


def test_snapshot_partial_sync_keeps_other_items_and_a_new_target_starts_over(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
        first = snapshot.load(pair.primary)
        assert first is not None
        with edit(pair.primary) as root:
            root.find("filter/rule/descr").text = "renamed"
        sync(pair, items=["rules"])
    second = snapshot.load(pair.primary)
    assert second is not None and set(second.items) == set(ITEMS)
    assert second.items["rules"].digest != first.items["rules"].digest
    assert second.items["users"] == first.items["users"]
    with agent(pair):  # another port: another target
        sync(pair, items=["nat"])
    third = snapshot.load(pair.primary)
    assert third is not None and set(third.items) == {"nat"}


def test_snapshot_without_extensions_has_no_backup_digests(pair: Pair) -> None:
    with agent(pair, extensions=False):
        sync(pair)
    snap = snapshot.load(pair.primary)
    assert snap is not None and all(r.backup_digest == "" for r in snap.items.values())
    assert all(r.digest for r in snap.items.values())


def test_tampered_snapshot_values_are_refused(pair: Pair) -> None:
    with agent(pair):
        sync(pair)
    (pair.primary / "ha-state" / snapshot.VALUES_FILE).write_bytes(b"\x1f\x8b broken")
    snap = snapshot.load(pair.primary)
    assert snap is not None
    with pytest.raises(Exception, match="does not match"):
        snap.values()


# --- preserving the pre-merge version ------------------------------------------------------------


def history_files(pair: Pair) -> list[Path]:
    return sorted((pair.backup / "backup").glob("config-*.xml"))


def preserved_files(pair: Pair) -> list[Path]:
    return sorted((pair.backup / "ha-state" / "preserved").glob("config-*.xml"))


def test_out_of_band_config_is_kept_before_the_merge(pair: Pair) -> None:
    pre = (pair.backup / "config.xml").read_bytes()  # copied in, never written through the store
    with agent(pair):
        sync(pair)
        assert [f.read_bytes() for f in preserved_files(pair)] == [pre]
        assert len(history_files(pair)) == 1  # OPNsense's history holds only the merge, as ever
        assert oct(preserved_files(pair)[0].stat().st_mode & 0o777) == "0o600"
        with edit(pair.primary) as root:
            root.find("filter/rule/descr").text = "second version"
        sync(pair)  # control: config.xml now is the newest history file, nothing more is kept
    assert len(preserved_files(pair)) == 1 and len(history_files(pair)) == 2


def test_preserving_is_off_without_extensions(pair: Pair) -> None:
    with agent(pair, extensions=False):
        sync(pair)
    assert len(history_files(pair)) == 1 and preserved_files(pair) == []
