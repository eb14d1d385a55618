"""`opnsense-ha rollback` / `history`: undo the last sync, byte for byte, crash-safe, refusing
after later edits; on the backup and from the primary through the agent."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from lxml import etree

from hasync.config import store as storemod
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.osiface import SubprocessRunner
from hasync.core.paths import state_dir
from hasync.node import confirm_state as confirmmod
from hasync.node import rollback as rollbackmod
from hasync.services.backends import ServicesDirBackend
from support.fakekernel import bare_backup_kernel, vhids
from support.health import agent, backend, edit, fresh_pair, run_cli, sync
from support.nodes import Pair


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return fresh_pair(tmp_path)


def config_bytes(conf_dir: Path) -> bytes:
    return (conf_dir / "config.xml").read_bytes()


# --- the round trip -------------------------------------------------------------------------------


def test_sync_then_remote_rollback_restores_the_exact_bytes(pair: Pair, capsys: Any) -> None:
    pre = config_bytes(pair.backup)
    kernel = bare_backup_kernel()
    with agent(pair, backend(pair.backup, kernel)):
        sync(pair)
        assert config_bytes(pair.backup) != pre
        assert vhids(kernel) == {"eth0": [2], "eth1": [1]}  # the sync brought the CARP VIPs up
        code, out, err = run_cli(capsys, pair.primary, "rollback", "--remote")
    assert code == 0, err
    assert config_bytes(pair.backup) == pre
    assert "rollback ok: restored" in out and "initial setup of fw-b" in out
    assert "VIPs reconfigured: 0, removed: 2" in out
    assert vhids(kernel) == {}  # ... and the rollback took them down again
    # the store's own view agrees, and nothing was restored from history to get there
    store = ConfigStore(pair.backup)
    assert store.load().findtext("revision/description") == "initial setup of fw-b"
    assert store.restored_from is None


def test_local_rollback_on_the_backup(pair: Pair, capsys: Any, monkeypatch: Any) -> None:
    pre = config_bytes(pair.backup)
    with agent(pair):
        sync(pair)
    monkeypatch.setenv("OPNSENSE_HA_FAILOVER", "none")
    code, out, err = run_cli(capsys, pair.backup, "rollback", "--services-dir", str(pair.services_dir), "--json")
    document = json.loads(out)
    assert code == 0, err
    assert config_bytes(pair.backup) == pre
    assert document["status"] == "ok" and document["filter_reloaded"] is True
    assert set(document["changed_sections"]) == {"virtualip", "filter", "OPNsense.Firewall.Alias", "nat"}
    assert document["undone"]["description"].startswith("Merged ")
    assert document["restored"]["description"] == "initial setup of fw-b"


def test_rollback_after_a_local_edit_refuses_unless_forced(pair: Pair, capsys: Any) -> None:
    pre = config_bytes(pair.backup)
    with agent(pair):
        sync(pair)
        with edit(pair.backup, "local change on fw-b") as root:
            root.find("system/timezone").text = "Europe/Berlin"
        edited = config_bytes(pair.backup)
        code, _, err = run_cli(capsys, pair.primary, "rollback", "--remote")
        assert code == 1 and "refusing to roll back: config.xml changed after the last sync" in err
        assert "--force" in err
        assert config_bytes(pair.backup) == edited  # untouched
        code, out, err = run_cli(capsys, pair.primary, "rollback", "--remote", "--force", "--json")
    assert code == 0, err
    assert json.loads(out)["forced"] is True
    assert config_bytes(pair.backup) == pre


def test_a_second_rollback_has_nothing_to_do(pair: Pair, capsys: Any) -> None:
    with agent(pair):
        sync(pair)
        assert run_cli(capsys, pair.primary, "rollback", "--remote")[0] == 0
        restored = config_bytes(pair.backup)
        code, out, _ = run_cli(capsys, pair.primary, "rollback", "--remote")
    assert code == 0 and "rollback noop: nothing to do" in out
    assert config_bytes(pair.backup) == restored


def test_two_syncs_roll_back_to_between_them(pair: Pair, capsys: Any) -> None:
    with agent(pair):
        sync(pair)
        middle = config_bytes(pair.backup)
        with edit(pair.primary) as root:
            root.find("filter/rule/descr").text = "second version"
        sync(pair)
        assert run_cli(capsys, pair.primary, "rollback", "--remote")[0] == 0
    assert config_bytes(pair.backup) == middle


# --- history --------------------------------------------------------------------------------------


def test_history_marks_the_sync_and_the_target(pair: Pair, capsys: Any) -> None:
    with agent(pair):
        sync(pair)
        code, out, _ = run_cli(capsys, pair.primary, "history", "--remote", "--json")
        assert code == 0
        remote = json.loads(out)
        code, text, _ = run_cli(capsys, pair.primary, "history", "--remote")
    local = rollbackmod.history_document(ConfigStore(pair.backup), state_dir(pair.backup))
    assert remote == confirmmod.with_state(local, state_dir(pair.backup))
    entries = remote["entries"]
    assert [e["sync"] for e in entries] == [True, False]
    assert [e["current"] for e in entries] == [True, False]
    assert [e["rollback_target"] for e in entries] == [False, True]
    # the fixture's config.xml was copied in, never written with history: the agent kept it
    # before the merge, outside OPNsense's backup/ directory
    assert [e["preserved"] for e in entries] == [False, True]
    assert len(ConfigStore(pair.backup).history()) == 1
    assert remote["rollback"]["possible"] is True and remote["node"] == "fw-b"
    assert "[current, sync]" in text and "[kept by opnsense-ha before a merge, not in backup/, rollback target]" in text
    assert "rollback: rollback would restore" in text


def test_preserving_compares_files_and_reads_config_xml_only_to_keep_it(
        pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before every merge the agent checks that config.xml is in history; for the usual config
    (written with history) that is a chunked file comparison, without reading it whole."""
    reads: list[int] = []
    original = storemod.LockedConfig.data

    def recording(self: storemod.LockedConfig) -> bytes:
        data = original.fget(self)  # type: ignore[attr-defined]
        reads.append(len(data))
        return data

    monkeypatch.setattr(storemod.LockedConfig, "data", property(recording))
    store, states = ConfigStore(pair.backup), state_dir(pair.backup)
    with store.transaction("test: written with history"):
        pass
    assert rollbackmod.preserve_current(store, states) is None and reads == []
    # control: a config written some other way is read and kept
    store.config_path.write_bytes(store.config_path.read_bytes().replace(b"fw-b", b"fw-x"))
    kept = rollbackmod.preserve_current(store, states)
    assert kept is not None and kept.read_bytes() == store.config_path.read_bytes()
    assert reads == [len(kept.read_bytes())]


def test_history_notes_what_a_rollback_restored(pair: Pair, capsys: Any) -> None:
    with agent(pair):
        sync(pair)
        run_cli(capsys, pair.primary, "rollback", "--remote")
    document = rollbackmod.history_document(ConfigStore(pair.backup), state_dir(pair.backup))
    newest = document["entries"][0]
    assert newest["current"] and newest["restored_from"] == document["entries"][2]["file"]
    assert document["rollback"]["possible"] is False
    assert "already is the version before the last sync" in document["rollback"]["reason"]


# --- crash safety ---------------------------------------------------------------------------------


def test_a_crash_while_rewriting_leaves_the_restored_version(pair: Pair, monkeypatch: Any) -> None:
    pre = config_bytes(pair.backup)
    with agent(pair):
        sync(pair)
    synced = config_bytes(pair.backup)

    def crash_half_way(self: ConfigStore, handle: IO[bytes], chunks: Iterable[bytes]) -> None:
        data = b"".join(chunks)
        handle.seek(0)
        handle.truncate()
        handle.write(data[: len(data) // 2])
        handle.flush()
        raise OSError("simulated power loss")

    monkeypatch.setattr(ConfigStore, "_rewrite_in_place", crash_half_way)
    with pytest.raises(OSError, match="simulated power loss"):
        rollbackmod.rollback(ConfigStore(pair.backup), SyncItemRegistry.load(), state_dir=state_dir(pair.backup))
    broken = config_bytes(pair.backup)
    assert broken not in (pre, synced) and pre.startswith(broken)  # control: really half written
    monkeypatch.undo()
    store = ConfigStore(pair.backup)
    store.load()  # the next reader finds config.xml broken and restores the newest history file
    assert store.restored_from is not None
    assert config_bytes(pair.backup) == pre


# --- what cannot be rolled back -----------------------------------------------------------------


def test_stock_backup_cannot_roll_back_remotely(pair: Pair, capsys: Any) -> None:
    with agent(pair, extensions=False):
        sync(pair)
        code, _, err = run_cli(capsys, pair.primary, "rollback", "--remote")
        history_code, _, history_err = run_cli(capsys, pair.primary, "history", "--remote")
    assert code == 2 and "offers no hasync.rollback" in err and "System > Configuration > History" in err
    assert history_code == 2 and "offers no hasync.rollback" in history_err


def test_no_sync_in_history(pair: Pair, capsys: Any) -> None:
    with edit(pair.backup, "local only") as root:
        root.find("system/timezone").text = "Europe/Paris"
    code, _, err = run_cli(capsys, pair.backup, "rollback")
    assert code == 2 and "no sync into this node is in its config history" in err


def test_pruned_pre_sync_version(pair: Pair, capsys: Any) -> None:
    with edit(pair.backup, "keep one revision") as root:
        root.find("system/backupcount").text = "1"
    with agent(pair):
        sync(pair)
        code, _, err = run_cli(capsys, pair.primary, "rollback", "--remote")
    assert code == 2 and "is not in history" in err and "system.backupcount" in err


# --- services -------------------------------------------------------------------------------------


@pytest.fixture
def services(pair: Pair) -> Iterator[ServicesDirBackend]:
    backend_ = ServicesDirBackend(pair.services_dir, SubprocessRunner())
    backend_.start("unbound", "")
    yield backend_
    for service in backend_.list_services():
        if service.get("status") and not service.get("nocheck"):
            backend_.stop(service["name"], service.get("id", ""))


def unbound_pid(pair: Pair) -> int:
    return int((pair.services_dir / "unbound.pid").read_text().strip())


def test_rollback_restarts_the_services_of_changed_sections(pair: Pair, services: ServicesDirBackend,
                                                           capsys: Any) -> None:
    with edit(pair.primary) as root:
        unbound = etree.SubElement(root, "unbound")
        etree.SubElement(unbound, "enable").text = "1"
        root.find("hasync/syncitems").text += ",dnsresolver"
    with agent(pair):
        sync(pair)
        before = unbound_pid(pair)
        code, out, err = run_cli(capsys, pair.primary, "rollback", "--remote", "--json")
    document = json.loads(out)
    assert code == 0, err
    assert "unbound" in document["changed_sections"] and document["services_restarted"] == ["unbound"]
    assert unbound_pid(pair) != before
    assert {s["name"]: s["status"] for s in services.list_services()}["unbound"] is True
