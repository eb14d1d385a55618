"""A merge's digests carry over: items whose sections the merge left reading the same keep the
digest they had (`MergeReport.unchanged_points`, `ConfigCache.note_merged`).

The property itself (every vouched-for item digests the same before and after, on random configs
and payloads) is checked in `test_grafts.merged`; here are the cases that make a point *not*
vouched for, each with the digest difference that shows why, and the cache's side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.agent import fastpath
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.payload import digest as digestmod
from hasync.payload import merge
from hasync.payload.build import build_payload
from hasync.sync.run import SyncOptions, SyncRun
from support.bench import bench_module
from support.nodes import make_pair, running_agent

REGISTRY = SyncItemRegistry.load()


def item_digest(root: etree._Element, item_id: str) -> str:
    return digestmod.backup_item_digests(root, REGISTRY, [item_id])[0][item_id]


def merge_copy(xml: str, payload: dict[str, Any]) -> tuple[etree._Element, etree._Element, merge.MergeReport]:
    before = etree.fromstring(xml)
    after = etree.fromstring(xml)
    return before, after, merge.merge_payload(after, payload, REGISTRY, accept_unknown=True)


@pytest.mark.parametrize(("xml", "payload", "point", "item_id", "vouched"), [
    # untouched: the same records arrive
    ("<opnsense><dhcpd><lan><enable>1</enable></lan></dhcpd></opnsense>",
     {"dhcpd": {"lan": {"enable": "1"}}}, "dhcpd", "dhcpd", True),
    # a section both lack: the primary sends [], the merge writes <crl/>; both read as ''
    ("<opnsense><cert><refid>a</refid></cert></opnsense>", {"crl": []}, "crl", "certs", True),
    # control: a section that arrives with content did change
    ("<opnsense/>", {"crl": {"refid": "x"}}, "crl", "certs", False),
], ids=["same records", "missing both ways", "content arrives"])
def test_a_merge_vouches_for_points_that_read_the_same(xml: str, payload: dict[str, Any], point: str,
                                                       item_id: str, vouched: bool) -> None:
    before, after, report = merge_copy(xml, payload)
    assert (point in report.unchanged_points) is vouched
    assert (item_digest(before, item_id) == item_digest(after, item_id)) is vouched


def test_a_leaf_that_held_a_comment_is_a_change() -> None:
    """toArray reads a leaf holding a comment as a struct: replaced by the same text, it reads
    differently, although its text and tag are the same."""
    xml = "<opnsense><opendns><enable>1<!-- by hand --></enable></opendns></opnsense>"
    before, after, report = merge_copy(xml, {"opendns": {"enable": ["1"]}})
    assert after.find("opendns/enable") is not None and len(after.find("opendns/enable")) == 0  # type: ignore[arg-type]
    assert item_digest(before, "opendns") != item_digest(after, "opendns")
    assert "opendns" not in report.unchanged_points
    assert "opendns" in report.sections  # the report says so too: the value changed


def test_a_point_below_a_replaced_ancestor_is_not_vouched_for() -> None:
    """Two <Firewall> containers read as no container at all; the merge replaces both with one.
    The Alias nodes themselves compare equal, but what a digest reads through them changed."""
    alias = "<Alias><aliases><alias uuid='u1'><name>a</name></alias></aliases></Alias>"
    xml = f"<opnsense><OPNsense><Firewall>{alias}</Firewall><Firewall><x>1</x></Firewall></OPNsense></opnsense>"
    value = {"aliases": {"alias": [{"@attributes": {"uuid": "u1"}, "name": "a"}]}}
    before, after, report = merge_copy(xml, {"OPNsense": {"Firewall": {"Alias": value}}})
    assert len(after.findall("OPNsense/Firewall")) == 1
    assert merge._same_nodes(before.findall("OPNsense/Firewall/Alias"), after.findall("OPNsense/Firewall/Alias"))
    assert item_digest(before, "aliases") != item_digest(after, "aliases")
    assert "OPNsense.Firewall.Alias" not in report.unchanged_points


# --- the cache ---------------------------------------------------------------------------------


def generated_backup(tmp_path: Path) -> tuple[ConfigStore, dict[str, Any]]:
    """A backup some syncs behind (stale records in the rule, alias, IDS and user lists), and the
    primary's payload of every item it syncs."""
    pair = make_pair(tmp_path)
    primary_bytes, backup_bytes = bench_module("generate").generate(0.3, seed=5)
    (pair.backup / "config.xml").write_bytes(backup_bytes)
    primary = parse_config_bytes(primary_bytes, "primary")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    return ConfigStore(pair.backup), build_payload(primary, sections, REGISTRY.declarations())


def digests_asked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The item ids the cache computes digests of from here on."""
    asked: list[str] = []
    compute = digestmod.backup_item_digests

    def recording(root: etree._Element, registry: SyncItemRegistry, item_ids: Any, known: Any = None) -> Any:
        ids = list(item_ids)
        asked.extend(ids)
        return compute(root, registry, ids, known)

    monkeypatch.setattr(digestmod, "backup_item_digests", recording)
    return asked


@pytest.mark.parametrize("noted", [True, False], ids=["noted", "control: not noted"])
def test_the_cache_keeps_the_digests_of_items_a_merge_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 noted: bool) -> None:
    store, payload = generated_backup(tmp_path)
    cache = fastpath.ConfigCache(store, REGISTRY, clock=lambda: 4e9)
    ids = REGISTRY.ids()
    before, _ = cache.digests(ids)  # what the primary's probe asked for before the merge
    with store.transaction(merge.revision_description(payload)) as root:
        report = merge.merge_payload(root, payload, REGISTRY)
        if noted:
            cache.note_merged(root, report)
    compute = digestmod.backup_item_digests
    asked = digests_asked(monkeypatch)
    answer, _ = cache.digests(ids)
    kept = [item_id for item_id in ids if item_id not in asked]
    fresh, _ = compute(parse_config_bytes(store.config_path.read_bytes(), "written"), REGISTRY, ids)
    assert answer == fresh
    changed = [item_id for item_id in ids if before[item_id] != fresh[item_id]]
    assert changed and not set(changed) & set(kept)
    if noted:  # the sections the generator never makes stale were not digested again
        assert {"dhcpd", "captiveportal", "certs"} <= set(kept)
    else:
        assert kept == []


def test_the_cache_keeps_nothing_for_a_tree_the_writer_parsed_itself(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The digests `take` saw belong to the cached tree; a writer that parsed the file itself (the
    file changed behind the cache) merges into another tree, and none of them may carry over."""
    store, payload = generated_backup(tmp_path)
    cache = fastpath.ConfigCache(store, REGISTRY, clock=lambda: 4e9)
    ids = REGISTRY.ids()
    cache.digests(ids)
    with ConfigStore(store.conf_dir).transaction("test: another writer") as other:
        other.find("system/hostname").text = "elsewhere"  # type: ignore[union-attr]
    with store.transaction(merge.revision_description(payload)) as root:
        report = merge.merge_payload(root, payload, REGISTRY)
        cache.note_merged(root, report)
    asked = digests_asked(monkeypatch)
    cache.digests(ids)
    assert sorted(asked) == sorted(ids)


def test_after_a_full_sync_the_agent_digests_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end, the agent as it serves: one alias edited on the primary, then `sync --full`;
    the digests the primary records afterwards cost the agent the aliases item alone."""
    pair = make_pair(tmp_path)
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")

        def sync(full: bool) -> None:
            result = SyncRun(ConfigStore(pair.primary), REGISTRY, SyncOptions(full=full)).run()
            assert result.status == "ok", result.message

        sync(full=False)
        # the digests the merge left to the primary ("as sent") are computed once the agent is
        # quiet: here, before the next sync (a sync straight after would find them not computed)
        assert server.activity.settle(timeout=30)
        with ConfigStore(pair.primary).transaction("test: edit") as root:
            root.find("OPNsense/Firewall/Alias/aliases/alias/description").text = "edited"  # type: ignore[union-attr]
        asked = digests_asked(monkeypatch)
        sync(full=True)
    assert asked == ["aliases"]


def test_a_fresh_agent_digests_at_start_so_its_first_merge_keeps_them(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first `sync --full` into a just-started agent: its probe asks for no digests, yet the
    merge carries over those of the unchanged items, computed when the agent started."""
    pair = make_pair(tmp_path)
    backup_before = parse_config_bytes((pair.backup / "config.xml").read_bytes(), "before")
    compute = digestmod.backup_item_digests
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        asked = digests_asked(monkeypatch)
        result = SyncRun(ConfigStore(pair.primary), REGISTRY, SyncOptions(full=True)).run()
        assert result.status == "ok", result.message
    backup_after = parse_config_bytes((pair.backup / "config.xml").read_bytes(), "after")
    before, _ = compute(backup_before, REGISTRY, result.items)
    after, _ = compute(backup_after, REGISTRY, result.items)
    changed = [item_id for item_id in result.items if before[item_id] != after[item_id]]
    assert changed and len(changed) < len(result.items)
    assert set(changed) <= set(asked) < set(result.items)


def test_an_agent_whose_start_up_digests_fail_still_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The digests at start are an optimisation: failing, they leave a warning, and the agent
    starts and syncs (digesting on request)."""
    pair = make_pair(tmp_path)
    compute = digestmod.backup_item_digests
    failing = [True]

    def digests_once_broken(*args: Any, **kwargs: Any) -> Any:
        if failing[0]:
            failing[0] = False
            raise RuntimeError("a digest bug")
        return compute(*args, **kwargs)

    monkeypatch.setattr(digestmod, "backup_item_digests", digests_once_broken)
    with running_agent(pair) as server:
        assert not failing[0]  # the start-up digests did run, and failed
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = SyncRun(ConfigStore(pair.primary), REGISTRY, SyncOptions(full=True)).run()
    assert result.status == "ok", result.message
    assert "digests at start failed (RuntimeError)" in caplog.text
