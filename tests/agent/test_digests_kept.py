"""A merge's digests carry over: items whose sections the merge left reading the same keep the
digest they had (`MergeReport.unchanged_points`, `ConfigCache.note_merged`).

The property itself (every vouched-for item digests the same before and after, on random configs
and payloads) is checked in `test_grafts.merged`; here are the cases that make a point *not*
vouched for, each with the digest difference that shows why, and the cache's side.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.agent import fastpath
from hasync.agent.server import AgentServer
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.core.fileio import file_key
from hasync.payload import changes, merge
from hasync.payload import digest as digestmod
from hasync.payload.build import build_payload
from hasync.sync import snapshot
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire import sections as sectionsmod
from support.bench import bench_module
from support.nodes import Pair, make_pair, running_agent

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
    assert changes.same_nodes(before.findall("OPNsense/Firewall/Alias"), after.findall("OPNsense/Firewall/Alias"))
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


@contextlib.contextmanager
def full_sync(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AgentServer, SyncResult, list[str]]]:
    """`sync --full` into a running agent: (the agent, the result, the item ids the agent digested
    from the sync's start on), given while the agent still runs."""
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        asked = digests_asked(monkeypatch)
        result = SyncRun(ConfigStore(pair.primary), REGISTRY, SyncOptions(full=True)).run()
        assert result.status == "ok", result.message
        yield server, result, asked


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


@pytest.mark.parametrize("as_sent", [False, True], ids=["digested", "as sent"])
def test_after_a_full_sync_the_agent_digests_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               as_sent: bool) -> None:
    """End to end, the agent as it serves: one alias edited on the primary, then `sync --full`;
    the digests the primary records afterwards cost the agent the aliases item alone, and
    nothing where the agent offers "as sent" (the primary vouches for it). The first case is
    the carry-over's test: with "as sent" an item that lost its carried digest would be claimed
    and vouched for, and the count would not show it."""
    if not as_sent:
        monkeypatch.setattr(fastpath, "AS_SENT_FEATURE", "not-offered")
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
    assert asked == ([] if as_sent else ["aliases"])


def test_a_fresh_agent_digests_at_start_so_its_first_merge_keeps_them(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The first `sync --full` into a just-started agent: its probe asks for no digests, yet the
    merge carries over those of the unchanged items, computed when the agent started. (Of the
    changed ones, those written as sent are the primary's to vouch for: the agent computes the rest.)"""
    pair = make_pair(tmp_path)
    backup_before = parse_config_bytes((pair.backup / "config.xml").read_bytes(), "before")
    compute = digestmod.backup_item_digests
    with full_sync(pair, monkeypatch) as (_server, result, asked):
        pass
    backup_after = parse_config_bytes((pair.backup / "config.xml").read_bytes(), "after")
    before, _ = compute(backup_before, REGISTRY, result.items)
    after, _ = compute(backup_after, REGISTRY, result.items)
    changed = [item_id for item_id in result.items if before[item_id] != after[item_id]]
    assert changed and len(changed) < len(result.items)
    assert asked and set(asked) <= set(changed)


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


# --- "as sent": digests the agent leaves to the primary -----------------------------------------


@pytest.mark.parametrize("offered", [True, False], ids=["as sent", "control: an agent without the feature"])
def test_the_primary_records_the_backup_digests_it_did_not_wait_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    offered: bool) -> None:
    """A fast-path sync into an agent offering `protocol.AS_SENT_FEATURE`: the merge's digest
    reply names items "as sent" (the rules among them, their primary holding a nosync rule the
    payload drops), the primary records its own digests for them and vouches for them with its
    filter reload, and the agent keeps those instead of computing them: it never digests a
    claimed item. Every digest the primary records, and every one the agent answers afterwards,
    is what the backup's written config digests to. Control: an agent without the feature is
    asked plainly and names nothing as sent."""
    if not offered:
        monkeypatch.setattr(fastpath, "AS_SENT_FEATURE", "not-offered")
    pair = make_pair(tmp_path)
    with ConfigStore(pair.primary).transaction("test: a nosync rule") as root:
        rule = copy.deepcopy(root.find("filter/rule"))
        assert rule is not None
        etree.SubElement(rule, "nosync").text = "1"
        root.find("filter").append(rule)  # type: ignore[union-attr]
    claims: list[str] = []
    resolve = digestmod.resolve_as_sent

    def recording(reply: Any, registry: SyncItemRegistry, own: Any) -> Any:
        if isinstance(reply, dict) and isinstance(reply.get("as_sent"), dict):
            claims.extend(reply["as_sent"])
        return resolve(reply, registry, own)

    monkeypatch.setattr(digestmod, "resolve_as_sent", recording)
    compute = digestmod.backup_item_digests
    with full_sync(pair, monkeypatch) as (server, result, asked):
        assert server.activity.settle(timeout=30)
        cache_answer = server.dispatcher.methods["hasync.digest"](list(result.items), None)["items"]
    recorded = snapshot.load(pair.primary)
    assert recorded is not None
    written = parse_config_bytes((pair.backup / "config.xml").read_bytes(), "written")
    fresh, _ = compute(written, REGISTRY, result.items)
    assert {item_id: recorded.items[item_id].backup_digest for item_id in result.items} == fresh
    assert cache_answer == fresh
    assert bool(claims) is offered
    if offered:
        assert "rules" in claims and not set(claims) & set(asked)


def claimed_cache(tmp_path: Path) -> tuple[fastpath.ConfigCache, ConfigStore, str]:
    """A backup's cache right after a fast-path merge of a generated primary: (cache, store, the
    request's token); the merge left items to the primary ("as sent")."""
    pair = make_pair(tmp_path)
    primary_bytes, backup_bytes = bench_module("generate").generate(0.3, seed=2)
    (pair.backup / "config.xml").write_bytes(backup_bytes)
    primary = parse_config_bytes(primary_bytes, "primary")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    param = sectionsmod.build_blob(primary, sections, declarations=REGISTRY.declarations()).param
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, REGISTRY, clock=lambda: 4e9)
    cache.root()
    with store.transaction("test: merge") as root:
        cache.note_merged(root, merge.merge_payload(root, sectionsmod.decode_param(param).payload, REGISTRY))
    return cache, store, str(param["sha256"])


def test_claims_belong_to_the_request_that_merged(tmp_path: Path) -> None:
    cache, _store, token = claimed_cache(tmp_path)
    claimed = cache.claims(token, REGISTRY.ids())
    assert "rules" in claimed and claimed["rules"] == tuple(REGISTRY.get("rules").sections)
    assert cache.claims("another request's token", REGISTRY.ids()) == {}  # control


@pytest.mark.parametrize("writer", [False, True], ids=["alone", "control: a write meanwhile"])
def test_claims_are_digested_without_the_lock_and_kept_only_for_their_tree(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           writer: bool) -> None:
    """`fill_claims` reads the tree unlocked: a writer meanwhile gets no tree from `take` (it
    parses the file), logins and other readers get the lock; the digests are kept only if the
    tree is still the entry's. Control: a write meanwhile replaces the entry, and the digests
    computed for the old tree are dropped (the claimed items are digested afresh on request)."""
    cache, store, token = claimed_cache(tmp_path)
    claimed = list(cache.claims(token, REGISTRY.ids()))
    reading, release = threading.Event(), threading.Event()
    compute = digestmod.backup_item_digests

    def slow(*args: Any, **kwargs: Any) -> Any:
        reading.set()
        assert release.wait(30)
        return compute(*args, **kwargs)

    monkeypatch.setattr(digestmod, "backup_item_digests", slow)
    filler = threading.Thread(target=cache.fill_claims)
    filler.start()
    assert reading.wait(30)
    assert cache.lock.acquire(timeout=5)  # not held while digesting
    cache.lock.release()
    assert cache.take(lambda: "") is None  # the tree being read is not handed to a writer
    if writer:
        with store.transaction("test: another write") as root:
            root.find("system/hostname").text = "elsewhere"  # type: ignore[union-attr]
    release.set()
    filler.join(30)
    asked = digests_asked(monkeypatch)
    answer, _ = cache.digests(claimed)
    assert sorted(asked) == (sorted(claimed) if writer else [])
    fresh, _ = compute(parse_config_bytes(store.config_path.read_bytes(), "written"), REGISTRY, claimed)
    assert answer == fresh


@pytest.mark.parametrize("young", [False, True], ids=["published", "control: an entry in its racy window"])
def test_a_login_reads_the_accounts_while_the_cache_is_busy(tmp_path: Path, young: bool) -> None:
    """A login needs the accounts only: once the entry is past its racy window they are read
    without the cache's lock, so a login never waits for digests being computed (a probe's, or
    the "as sent" ones after a merge). A young entry is checked by content, under the lock."""
    store = ConfigStore(make_pair(tmp_path).backup)
    key = file_key(store.config_path)
    assert key is not None
    cache = fastpath.ConfigCache(store, REGISTRY, clock=lambda: key[3] / 1e9 + (0.0 if young else 3600.0))
    first = cache.accounts()
    held, release = threading.Event(), threading.Event()

    def busy() -> None:
        with cache.lock:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=busy)
    holder.start()
    assert held.wait(10)
    read: list[etree._Element] = []
    login = threading.Thread(target=lambda: read.append(cache.accounts()))
    login.start()
    login.join(2.0)
    answered = bool(read)
    release.set()
    holder.join(10)
    login.join(10)
    assert answered is not young
    assert read == [first]


def test_a_primary_vouches_only_for_what_its_own_merge_wrote_as_sent(tmp_path: Path) -> None:
    """`ConfigCache.vouch` keeps a digest only for an item the merge of that very request
    claimed: another request's token, or an item that was not claimed, is refused (controls),
    so a primary cannot set the digest of anything the agent has not seen to be its bytes."""
    cache, _store, token = claimed_cache(tmp_path)
    claimed = cache.claims(token, REGISTRY.ids())
    unclaimed = next(item_id for item_id in REGISTRY.ids() if item_id not in claimed)
    fake = "0" * 64
    assert cache.vouch("another request's token", {"rules": fake}) == []
    assert cache.vouch(token, {unclaimed: fake}) == []
    assert cache.vouch(token, {"rules": "not a digest"}) == []
    assert cache.vouch(token, {"rules": fake}) == ["rules"]
    assert cache.digests(["rules"])[0] == {"rules": fake}  # kept as vouched, until config.xml changes
    assert "rules" not in cache.claims(token, REGISTRY.ids())
