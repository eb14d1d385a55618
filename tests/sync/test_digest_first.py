"""Digest-first sync: only items whose digests differ travel; a sync that changes nothing writes nothing.

Proven over real TLS against a real agent:

* a second sync with nothing changed sends no section, merges nothing and leaves the backup's
  config.xml (bytes, inode, mtime) and its history untouched; neither side parses config.xml
  again for it (both answer from caches keyed by the file's bytes or identity);
* a change of one item on the primary sends that item only; a local edit on the backup is
  found and repaired; ``--full`` sends everything; a stock backup (no `hasync.*`) gets everything;
* an item whose backup copy keeps node-local keys (the merge's container rule) is not resent
  forever: the snapshot of the last push settles it, and without that snapshot it is resent;
* the one-pass canonical form equals the copy-and-strip definition it replaced.
"""

from __future__ import annotations

import copy
import gc
import inspect
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hasync.agent import fastpath
from hasync.agent.server import AgentServer
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.core.errors import HaError
from hasync.payload import digest
from hasync.payload.build import VIRTUALIP
from hasync.sync import plan as planmod
from hasync.sync import snapshot
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire import discovery
from hasync.wire.client import ClientOptions, PeerClient
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair, running_agent


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


def sync(pair: Pair, **options: Any) -> SyncResult:
    result = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(**options)).run()
    assert result.status == "ok", result.message
    return result


def state(node: Path) -> tuple[bytes, int, int, list[tuple[str, bytes]]]:
    """config.xml bytes, inode and mtime, and every history file with its bytes."""
    st = os.stat(node / "config.xml")
    history = sorted((p.name, p.read_bytes()) for p in (node / "backup").glob("*"))
    return (node / "config.xml").read_bytes(), st.st_ino, st.st_mtime_ns, history


def edit(node: Path, path: str, text: str) -> None:
    with ConfigStore(node).transaction("test: edit") as root:
        target = root.find(path)
        assert target is not None, path
        target.text = text


def agent_cache(server: AgentServer) -> fastpath.ConfigCache:
    loader = server.authenticate._load_root  # type: ignore[attr-defined]
    cache = loader.__self__
    assert isinstance(cache, fastpath.ConfigCache)
    return cache


def test_a_sync_that_changes_nothing_writes_nothing(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        first = sync(pair)
        assert first.transfer == "fast path" and len(first.items_unchanged) < len(first.items)
        before = state(pair.backup)
        sync(pair)  # warms both caches (the primary's digests of this config version)
        assert state(pair.backup) == before
        parses: list[str] = []
        original = parse_config_bytes
        monkeypatch.setattr(fastpath, "parse_config_bytes", lambda data, source: parses.append(source) or
                            original(data, source))
        loads = agent_cache(server).loads
        again = sync(pair)
        assert agent_cache(server).loads == loads  # the agent answered from its cache
    assert parses == []  # the primary did not parse its config.xml either
    assert again.transfer == "none" and sorted(again.items_unchanged) == sorted(again.items)
    assert [s.step for s in again.steps] == ["build payload", "firmware_version", "nothing to sync"]
    assert state(pair.backup) == before  # bytes, inode, mtime and history untouched


def test_only_the_changed_item_travels(pair: Pair) -> None:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        edit(pair.primary, "OPNsense/Firewall/Alias/aliases/alias/description", "changed on the primary")
        before = state(pair.backup)
        changed = sync(pair)
    assert changed.transfer == "fast path"
    assert "aliases" not in changed.items_unchanged
    assert set(changed.items) - set(changed.items_unchanged) == {"aliases"}
    root = ConfigStore(pair.backup).load()
    assert root.findtext("revision/description") == "Merged aliases, OPNsense config sections from XMLRPC client."
    assert "changed on the primary" in [a.findtext("description")
                                        for a in root.iterfind("OPNsense/Firewall/Alias/aliases/alias")]
    assert state(pair.backup) != before


def test_a_local_edit_on_the_backup_is_found_and_repaired(pair: Pair) -> None:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        edit(pair.backup, "filter/rule/descr", "edited on the backup")
        repaired = sync(pair)
    assert set(repaired.items) - set(repaired.items_unchanged) == {"rules"}
    primary_first = ConfigStore(pair.primary).load().findtext("filter/rule/descr")
    assert ConfigStore(pair.backup).load().findtext("filter/rule/descr") == primary_first


def test_full_sends_everything(pair: Pair) -> None:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        history = len(ConfigStore(pair.backup).history())
        forced = sync(pair, full=True)
    assert forced.transfer == "fast path" and forced.items_unchanged == []
    assert len(ConfigStore(pair.backup).history()) == history + 1


def test_a_stock_backup_gets_everything_every_time(pair: Pair) -> None:
    with running_agent(pair, extensions=False) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        history = len(ConfigStore(pair.backup).history())
        again = sync(pair)
    assert again.transfer == "XML-RPC" and again.items_unchanged == []
    assert "no hasync.digest" in again.steps[1].detail
    assert len(ConfigStore(pair.backup).history()) == history + 1


def add_node_local_key(node: Path) -> None:
    """A key only the backup has, inside a container the merge merges key by key (so it stays)."""
    with ConfigStore(node).transaction("test: node-local key") as root:
        alias = root.find("OPNsense/Firewall/Alias")
        assert alias is not None
        geoip = alias.find("geoip")
        assert geoip is not None
        geoip.append(geoip.makeelement("backup_only", {}))
        geoip[-1].text = "kept by the merge"


def test_node_local_keys_do_not_make_an_item_differ_forever(pair: Pair) -> None:
    add_node_local_key(pair.backup)
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        assert ConfigStore(pair.backup).load().findtext("OPNsense/Firewall/Alias/geoip/backup_only")
        settled = sync(pair)
        # control: the digests themselves still differ; only the snapshot of the last push says
        # that neither side changed since. Without it, the item is sent again.
        for name in (snapshot.META_FILE, snapshot.VALUES_FILE):
            (pair.primary / "ha-state" / name).unlink()
        resent = sync(pair)
    assert settled.transfer == "none"
    assert resent.transfer == "fast path" and set(resent.items) - set(resent.items_unchanged) == {"aliases"}


def test_a_first_sync_into_a_matching_backup_still_records_the_snapshot(pair: Pair) -> None:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        for name in (snapshot.META_FILE, snapshot.VALUES_FILE):
            (pair.primary / "ha-state" / name).unlink()
        quiet = sync(pair)
    assert quiet.transfer == "none"
    recorded = snapshot.load(pair.primary)
    assert recorded is not None and set(recorded.items) == set(quiet.items)
    assert all(r.backup_digest for r in recorded.items.values())


# --- the canonical form, computed in one pass --------------------------------------------------------


def reference_canonical(value: Any) -> Any:
    """The definition: a deep copy, nosync records stripped, the VIP rule, then `normalize`."""
    work = copy.deepcopy(dict(value))
    digest.strip_nosync(work)
    if VIRTUALIP in work:
        work[VIRTUALIP] = digest._vip_canonical(work[VIRTUALIP])
    return digest.normalize(work)


KEYS = ["filter", "rule", "nat", "outbound", "virtualip", "vip", "vhid", "nosync", "a", "system", "@attributes",
        "a@attributes"]
scalars = st.one_of(st.sampled_from(["", " ", "0", "1", "x", "100"]), st.integers(0, 300), st.booleans(),
                    st.none(), st.just(2.0))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)),
    max_leaves=25,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), values, max_size=4))
def test_one_pass_canonical_form_equals_the_definition(value: dict[str, Any]) -> None:
    original = copy.deepcopy(value)
    assert digest.canonical(value) == reference_canonical(value)
    assert value == original  # not modified


def test_canonical_form_examples() -> None:
    value = {"filter": {"rule": [{"descr": "a", "nosync": "1"}, {"descr": "b"}]},
             "nat": {"x": [{"nosync": "1"}, {"y": "1"}]},
             "virtualip": {"vip": [{"vhid": "1", "advskew": 100}, {"vhid": "", "subnet": "10.0.0.1"}]}}
    assert digest.canonical(value) == {
        "filter": {"rule": [{"descr": "a", "nosync": "1"}, {"descr": "b"}]},  # rule lists keep nosync records
        "nat": {"x": [{"y": "1"}]},
        "virtualip": {"vip": [{"vhid": "1", "advskew": "100"}]},
    }


def test_the_compact_probe_carries_the_same_digests_and_a_stock_backup_is_remembered(pair: Pair) -> None:
    from hasync.wire.client import PeerClient

    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        ids = ["users", "aliases", "nope"]
        client = PeerClient(server.url, "hasync", "demo-sync-password")
        compact = discovery.compact_probe(client, ids, pair.primary)
        assert compact is not None and compact.fast_path
        assert compact.digests["items"] == client.call("hasync.digest", [ids])["items"]
        assert compact.digests["unknown"] == ["nope"]
        assert compact.firmware == client.call("opnsense.firmware_version")
        quiet = sync(pair)
    assert quiet.transfer == "none" and quiet.bytes_sent + quiet.bytes_received < 2500  # bodies, both ways
    peers = pair.primary / "ha-state" / discovery.PEERS_FILE
    assert not peers.exists() or server.url not in peers.read_text()
    with running_agent(pair, extensions=False) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        assert '"stock"' in peers.read_text()  # remembered: the next sync asks the compatible way at once
        client = PeerClient(server.url, "hasync", "demo-sync-password")
        assert discovery.compact_probe(client, ["users"], pair.primary) is None


def test_a_full_sync_parses_the_backups_config_once_and_merges_into_the_cached_tree(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: the probe's capabilities come from the agent's cached tree (no second parse of
    config.xml), the merge changes that very tree instead of parsing its own, and the tree the
    merge writes is the new cache (so the drift digests right after need no parse either).
    Control: without the cache the capabilities load config.xml through the store."""
    from hasync.config.store import ConfigStore as Store

    loads: list[str] = []
    original = Store.load
    monkeypatch.setattr(Store, "load", lambda self: loads.append("load") or original(self))
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        cache = agent_cache(server)
        held = cache.root()  # as after any earlier request
        take = cache.store.take_parsed
        assert take is not None
        taken: list[Any] = []

        def recording_take(locked_sha256: Any) -> Any:
            taken.append(take(locked_sha256))
            return taken[-1]

        monkeypatch.setattr(cache.store, "take_parsed", recording_take)
        before = cache.loads
        result = sync(pair, full=True)
        assert result.transfer == "fast path"
        assert loads == []  # neither the capabilities nor the digests loaded config.xml themselves
        assert taken == [held]  # the merge changed the cached tree: no parse of its own beside it
        assert cache.loads == before  # the merged tree was adopted, nothing re-parsed
        assert cache.root() is held
        assert held.findtext("revision/description", "").startswith("Merged ")

    extensions_module = __import__("hasync.agent.hasync_methods", fromlist=["Extensions"])
    node = server.dispatcher.methods["hasync.history"].__self__.node  # type: ignore[attr-defined]
    plain = extensions_module.Extensions(node)  # no cache given: the control
    plain.capabilities(None, None)
    assert loads == ["load"]


def test_the_agent_parses_config_xml_before_it_listens(pair: Pair) -> None:
    """The first login of the first sync reads a tree parsed at start-up, not one parsed on
    its own time (control: without the warm-up the probe's login parses, and `loads` grows)."""
    with running_agent(pair) as server:
        cache = agent_cache(server)
        assert cache.loads == 1  # parsed once while the agent was built
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair)
        assert cache.loads == 1  # the login, probe and digests read that tree; the merge's tree was adopted


def _inside_exchange() -> str | None:
    """The XML-RPC method whose exchange (`PeerClient._exchange`) is on the caller's stack, if any."""
    for frame in inspect.stack():
        if frame.function == "_exchange" and "method" in frame.frame.f_locals:
            return str(frame.frame.f_locals["method"])
    return None


def where_called(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[tuple[str, str | None]]:
    """Patch `owner.name` to note, per call, its thread and the exchange it runs inside."""
    calls: list[tuple[str, str | None]] = []
    original = getattr(owner, name)

    def recording(*args: Any, **kwargs: Any) -> Any:
        calls.append((threading.current_thread().name, _inside_exchange()))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recording)
    return calls


@pytest.mark.parametrize(("full", "dry_run"), [(True, False), (True, True), (False, False)])
def test_a_full_sync_builds_its_blob_while_the_backup_answers_the_probe(pair: Pair, full: bool, dry_run: bool,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With --full the items are known before the probe, so the blob is built once, inside the
    probe's exchange (sent, reply not yet read) and in the sync's own thread: no second thread
    contends for the GIL with the requests (a dry run reports on that same blob). A digest-first
    sync (the control) builds it after the probe, as it must (the probe decides what is sent)."""
    builders = where_called(monkeypatch, planmod, "build_blob")
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = sync(pair, full=full, dry_run=dry_run)
    assert result.transfer == ("" if dry_run else "fast path")
    assert builders == [(threading.main_thread().name, "system.multicall" if full else None)]


def test_the_snapshot_record_is_prepared_while_the_backup_merges(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot's share of the work runs inside the merge request's exchange, in the sync's
    own thread, and its result is what the snapshot commits (nothing computed twice)."""
    prepared = where_called(monkeypatch, snapshot, "prepare")  # `record` would call it a second time
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = sync(pair, full=True)
    assert result.transfer == "fast path"
    assert prepared == [(threading.main_thread().name, "system.multicall")]  # the merge's request
    assert set(snapshot.load(pair.primary).items) == set(result.items)


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_backups_digests_after_the_merge_come_with_the_merge(pair: Pair, fast_path: bool) -> None:
    """The fast path asks for the backup's digests in the merge's own request (one multicall,
    run in order: the merge, then the digests), and the probe already told that the backup is
    one of our agents: no `system.listMethods`, no request of its own. The snapshot records
    exactly what the backup answers for its items afterwards. The control is the compatible
    path, which asks in a request of its own (still without the method list)."""
    calls: list[str] = []
    with running_agent(pair) as server:
        original = server.dispatcher.call

        def recording(method: str, params: list[Any], context: Any) -> Any:
            calls.append(method)
            return original(method, params, context)

        server.dispatcher.call = recording  # type: ignore[method-assign]
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = sync(pair, full=True, fast_path=fast_path)
        server.dispatcher.call = original  # type: ignore[method-assign]
        recorded = {item_id: record.backup_digest for item_id, record in snapshot.load(pair.primary).items.items()}
        client = PeerClient(f"https://127.0.0.1:{server.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD,
                            ClientOptions(verify_peer=False))
        answered, _unknown = digest.parse_digest_reply(client.call("hasync.digest", [sorted(recorded)]))
    assert result.transfer == ("fast path" if fast_path else "XML-RPC")
    assert "system.listMethods" not in calls and calls.count("hasync.digest") == 1
    merge = calls.index("hasync.restore_sections_xml" if fast_path else "opnsense.restore_config_section")
    assert calls[merge + 1] == "hasync.digest"
    assert (calls[merge - 1] == "system.multicall") == fast_path  # the merge travelled inside a multicall
    assert recorded == answered and all(recorded.values())


def test_an_error_building_the_early_blob_fails_the_send_not_the_probe(pair: Pair,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The blob is built inside the probe's request; its error is kept and raised where the blob
    is used, so the probe's reply is still read, the failed step is the send, and nothing merges.
    The control: the same sync without the fault merges."""
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise HaError("cannot build the blob (injected)")

    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        before = state(pair.backup)
        with monkeypatch.context() as patch:
            patch.setattr(planmod, "build_blob", broken)
            failed = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(full=True)).run()
        assert failed.status == "error" and "injected" in failed.message
        assert [(step.step, step.ok) for step in failed.steps][-2:] == [("firmware_version", True),
                                                                        ("restore_config_section", False)]
        assert state(pair.backup) == before
        sync(pair, full=True)  # the control
        assert state(pair.backup) != before


def test_a_sync_runs_with_the_cyclic_collector_paused_and_restores_it(pair: Pair) -> None:
    """`SyncRun.run` (what the CLI, configd and the bench call) pauses the collector for its whole
    run; the progress callback sees it off, and it is on again afterwards (the control)."""
    seen: list[bool] = []
    assert gc.isenabled()
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(full=True),
                         progress=lambda step: seen.append(gc.isenabled())).run()
    assert result.status == "ok", result.message
    assert seen and not any(seen)
    assert gc.isenabled()


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "control: compatible path"])
def test_the_fast_path_writes_its_snapshot_while_the_backup_reloads_its_filter(
        pair: Pair, monkeypatch: pytest.MonkeyPatch, fast: bool) -> None:
    """The fast path has the backup's digests with the merge's reply, so the snapshot needs no
    request: it is written while filter_configure is on its way (`PeerClient.call`'s
    while_waiting). The compatible path may still have to ask for them, so it records first."""
    started = threading.Event()
    seen: list[bool] = []
    original = snapshot.record_after_sync

    def recording(*args: Any, **kwargs: Any) -> None:
        seen.append(started.wait(1.0))  # did the backup have the filter request by now?
        original(*args, **kwargs)

    monkeypatch.setattr(snapshot, "record_after_sync", recording)
    with running_agent(pair) as server:
        reload = server.dispatcher.methods["opnsense.filter_configure"]

        def filter_configure(argument: Any, context: Any) -> Any:
            started.set()
            return reload(argument, context)

        server.dispatcher.register("opnsense.filter_configure", filter_configure)
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        sync(pair, full=True, fast_path=fast)
    assert seen == [fast]
    assert snapshot.load(pair.primary) is not None


def test_a_snapshot_is_written_when_the_filter_request_never_left(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    connect = PeerClient._connect
    made: list[str] = []

    def connecting(self: PeerClient, deadline: float) -> Any:
        made.append("x")
        if len(made) == 3:  # probe, merge, then filter_configure: the backup went away
            raise ConnectionRefusedError("refused")
        return connect(self, deadline)

    monkeypatch.setattr(PeerClient, "_connect", connecting)
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(),
                         SyncOptions(full=True, client=ClientOptions(retries=0))).run()
    assert result.status == "error" and "filter_configure" in [step.step for step in result.steps]
    assert result.transfer == "fast path"
    recorded = snapshot.load(pair.primary)
    assert recorded is not None and all(record.backup_digest for record in recorded.items.values())
