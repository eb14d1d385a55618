"""Undo the last sync on a backup: restore the config from before it, byte for byte, then reconfigure.

Definitions (all on the backup's own config history, `<conf-dir>/backup/config-<time>.xml`):

* **the last sync** is the newest history entry whose revision description is the merge's
  ``Merged <sections> config sections from XMLRPC client.`` (OPNsense's wording, which our agent
  writes too);
* **the version before it** is the history entry just older than that one. History files hold
  the exact bytes config.xml had after each write, so restoring it is a byte copy: no parse and
  re-serialise, no new revision stamp. (The store stamps `<revision>` on every write, which is
  why a rollback must not go through `ConfigStore.write`.);
* **changed since that sync** means config.xml's bytes differ from that sync's history file:
  any later write (GUI, CLI, another sync) changes the revision, so nothing slips through.
  Rollback then refuses unless forced.

Crash safety is the store's: under config.xml's exclusive flock, the restored bytes are first
written as the newest history file (fsync'd), then config.xml is rewritten in place. A crash in
between leaves config.xml unparseable or old; the next load restores the newest valid history
file, which is the restored version. Either the old or the restored config survives, never a mix.

For the version before the *first* sync to exist at all, a config.xml that no history-keeping
writer produced (copied in, edited by hand) is preserved just before a merge (`preserve_current`,
called by the agent's extension wrapper around `opnsense.restore_config_section`). The copy goes
to `<conf-dir>/ha-state/preserved/`, not into `backup/`: OPNsense's history, its pruning and
anything that counts revisions stay exactly as they were. Rollback sees the history files and the
preserved copies as one timeline, ordered by time.

A small journal (`<conf-dir>/ha-state/rollback-journal.json`) records which history file a
rollback wrote and what it restored, so `history` can say so: the restored file's own revision
text is, by design, that of the version it restores.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.core.errors import ConfigError, HaError
from hasync.core.fileio import atomic_write, same_content
from hasync.failover import model
from hasync.failover.base import FailoverBackend
from hasync.node.reconfigure import reconfigure_vips, restart_item_services, vip_changes
from hasync.payload import digest as digestmod
from hasync.services.backends import ServiceBackend

log = logging.getLogger("hasync.rollback")

SYNC_DESCRIPTION_RE = re.compile(r"^Merged .* config sections from XMLRPC client\.$", re.DOTALL)
JOURNAL_FILE = "rollback-journal.json"
JOURNAL_KEEP = 50
PRESERVED_DIR = "preserved"
PRESERVED_KEEP = 5


class RollbackError(HaError):
    """Rollback cannot run at all (no sync in history, the earlier version is gone, ...)."""


# --- history ------------------------------------------------------------------------------------


@dataclass
class Revision:
    path: Path
    time: float
    description: str
    username: str
    size: int
    readable: bool = True
    preserved: bool = False  # a pre-merge copy in ha-state/preserved, not an OPNsense history file

    @property
    def is_sync(self) -> bool:
        return self.readable and bool(SYNC_DESCRIPTION_RE.match(self.description))


def _revision(path: Path, data: bytes, stamp: float) -> Revision:
    try:
        root = parse_config_bytes(data, str(path))
    except ConfigError as exc:
        return Revision(path, stamp, f"(unreadable: {exc})", "", len(data), readable=False)
    return Revision(
        path, stamp,
        (root.findtext("revision/description") or "").strip(),
        (root.findtext("revision/username") or "").strip(),
        len(data),
    )


def _stamp(path: Path) -> float:
    try:
        return float(path.name[len("config-"):-len(".xml")])
    except ValueError:
        return 0.0


def _preserved_files(state_dir: Path | None) -> list[Path]:
    if state_dir is None or not (state_dir / PRESERVED_DIR).is_dir():
        return []
    return sorted((state_dir / PRESERVED_DIR).glob("config-*.xml"), key=_stamp, reverse=True)


def revisions(store: ConfigStore, state_dir: Path | None = None) -> list[tuple[Revision, bytes]]:
    """Every history file (and preserved pre-merge copy) with its bytes, newest first."""
    out: list[tuple[Revision, bytes]] = []
    paths = [(path, False) for path in store.history_files()]
    paths += [(path, True) for path in _preserved_files(state_dir)]
    for path, preserved in paths:
        try:
            data = path.read_bytes()
        except OSError:
            continue  # pruned between listing and reading
        revision = _revision(path, data, _stamp(path))
        revision.preserved = preserved
        out.append((revision, data))
    out.sort(key=lambda entry: entry[0].time, reverse=True)
    return out


@dataclass
class Plan:
    """What a rollback would do, computed from history and the current bytes."""

    sync: Revision | None = None
    target: Revision | None = None
    target_bytes: bytes = b""
    changed_since_sync: bool = False
    already_restored: bool = False
    reason: str = ""

    @property
    def possible(self) -> bool:
        return self.sync is not None and self.target is not None


def make_plan(history: list[tuple[Revision, bytes]], current: bytes) -> Plan:
    for index, (revision, data) in enumerate(history):
        if not revision.is_sync:
            continue
        if index + 1 >= len(history):
            return Plan(sync=revision, reason=(
                f"the version before the last sync ({revision.path.name}) is not in history: it was pruned "
                "(system.backupcount) or never written; nothing to roll back to"))
        target, target_bytes = history[index + 1]
        if not target.readable:
            return Plan(sync=revision, reason=f"the version before the last sync, {target.path.name}, "
                                              f"is unreadable: {target.description}")
        return Plan(sync=revision, target=target, target_bytes=target_bytes,
                    changed_since_sync=current != data, already_restored=current == target_bytes)
    return Plan(reason="no sync into this node is in its config history (no revision 'Merged ... config "
                       "sections from XMLRPC client.'); on the primary use `rollback --remote`")


# --- journal -----------------------------------------------------------------------------------


def read_journal(state_dir: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads((state_dir / JOURNAL_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []


def _append_journal(state_dir: Path, entry: dict[str, Any]) -> None:
    entries = [*read_journal(state_dir), entry][-JOURNAL_KEEP:]
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(state_dir / JOURNAL_FILE, json.dumps(entries, indent=1) + "\n")


def _iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def history_document(store: ConfigStore, state_dir: Path) -> dict[str, Any]:
    """`opnsense-ha history --json` / `hasync.history`: revisions newest first with markers."""
    history = revisions(store, state_dir)
    current = store.read_bytes()
    plan = make_plan(history, current)
    journal = {str(entry.get("file")): entry for entry in read_journal(state_dir)}
    entries: list[dict[str, Any]] = []
    for revision, data in history:
        rolled = journal.get(revision.path.name)
        entries.append({
            "file": revision.path.name,
            "time": revision.time,
            "time_iso": _iso(revision.time),
            "description": revision.description,
            "username": revision.username,
            "size": revision.size,
            "current": data == current,
            "sync": revision.is_sync,
            "preserved": revision.preserved,
            "rollback_target": plan.target is not None and revision.path == plan.target.path,
            "restored_from": str(rolled.get("restored_from", "")) if rolled else "",
        })
    return {
        "node": _hostname(current),
        "entries": entries,
        "rollback": {
            "possible": plan.possible and not plan.already_restored,
            "undoes": plan.sync.path.name if plan.sync else "",
            "target": plan.target.path.name if plan.target else "",
            "changed_since_sync": plan.changed_since_sync,
            "reason": _plan_reason(plan),
        },
    }


def _plan_reason(plan: Plan) -> str:
    if not plan.possible:
        return plan.reason
    assert plan.sync is not None and plan.target is not None
    if plan.already_restored:
        return f"config.xml already is the version before the last sync ({plan.target.path.name})"
    if plan.changed_since_sync:
        return (f"config.xml changed after the last sync ({plan.sync.path.name}); rollback refuses unless "
                "--force (the later changes would be lost)")
    return f"rollback would restore {plan.target.path.name} ({plan.target.description or 'no description'})"


def _hostname(data: bytes) -> str:
    try:
        return (parse_config_bytes(data, "config.xml").findtext("system/hostname") or "").strip()
    except ConfigError:
        return ""


# --- preserving the pre-merge version ----------------------------------------------------------


def preserve_current(store: ConfigStore, state_dir: Path) -> Path | None:
    """Keep a copy of config.xml if its exact bytes are neither the newest history file nor kept yet.

    Every history-keeping writer (ours, OPNsense's PHP) leaves its result as the newest history
    file, so this only copies configs written some other way; without it the first sync into such
    a node could never be rolled back. The copy is written under config.xml's exclusive lock (so
    it is the version the merge starts from), fsync'd and renamed into place; the newest
    `PRESERVED_KEEP` copies are kept. A config that does not parse is left alone (the store
    restores history on load anyway). Returns the file written, if any.
    """
    directory = state_dir / PRESERVED_DIR
    with store.locked_bytes() as locked:
        files = store.history_files()
        if files and same_content(files[0], store.config_path):
            return None
        kept = _preserved_files(state_dir)
        if kept and same_content(kept[0], store.config_path):
            return None
        data = locked.data  # read only now: the usual merge finds its config in history and reads none
        try:
            parse_config_bytes(data, str(store.config_path))
        except ConfigError:
            return None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = store.clock.time()
        target = directory / f"config-{stamp:.4f}.xml"
        while target.exists():
            stamp += 0.0001
            target = directory / f"config-{stamp:.4f}.xml"
        atomic_write(target, data, mode=0o600)
    for old in _preserved_files(state_dir)[PRESERVED_KEEP:]:
        with contextlib.suppress(OSError):
            old.unlink()
    log.info("kept config.xml as %s before a merge (it was not in the config history)", target)
    return target


# --- rollback ------------------------------------------------------------------------------------


@dataclass
class RollbackResult:
    status: str  # ok | noop | refused | error
    message: str
    node: str = ""
    undone: Revision | None = None
    restored: Revision | None = None
    history_file: str = ""
    forced: bool = False
    changed_sections: list[str] = field(default_factory=list)
    vips_reconfigured: int = 0
    vips_removed: int = 0
    services_restarted: list[str] = field(default_factory=list)
    filter_reloaded: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"ok": 0, "noop": 0, "refused": 1}.get(self.status, 2)

    def as_json(self) -> dict[str, Any]:
        def rev(revision: Revision | None) -> dict[str, Any]:
            if revision is None:
                return {}
            return {"file": revision.path.name, "time": revision.time, "time_iso": _iso(revision.time),
                    "description": revision.description, "username": revision.username}

        return {
            "status": self.status,
            "message": self.message,
            "node": self.node,
            "undone": rev(self.undone),
            "restored": rev(self.restored),
            "history_file": self.history_file,
            "forced": self.forced,
            "changed_sections": self.changed_sections,
            "vips_reconfigured": self.vips_reconfigured,
            "vips_removed": self.vips_removed,
            "services_restarted": self.services_restarted,
            "filter_reloaded": self.filter_reloaded,
            "warnings": self.warnings,
        }


def rollback(
    store: ConfigStore,
    registry: SyncItemRegistry,
    *,
    state_dir: Path,
    services: ServiceBackend | None = None,
    failover: FailoverBackend | None = None,
    force: bool = False,
    username: str = "root@opnsense-ha",
    reconfigure_services: bool = True,
) -> RollbackResult:
    """Restore the version before the last sync (see the module docstring), then reconfigure.

    `services`/`failover` None: that part of the reconfiguration is skipped and named in the
    warnings (the config is restored either way).
    """
    with store.locked_bytes() as locked:
        current = locked.data
        plan = make_plan(revisions(store, state_dir), current)
        node = _hostname(current)
        if not plan.possible:
            raise RollbackError(plan.reason)
        assert plan.sync is not None and plan.target is not None
        if plan.already_restored:
            return RollbackResult("noop", f"nothing to do: config.xml already is the version before the last sync "
                                          f"({plan.target.path.name})", node, plan.sync, plan.target)
        if plan.changed_since_sync and not force:
            return RollbackResult(
                "refused",
                f"refusing to roll back: config.xml changed after the last sync ({plan.sync.path.name}, "
                f"{_iso(plan.sync.time)}); those later changes would be lost. Check `opnsense-ha history`, "
                "then use --force to roll back anyway",
                node, plan.sync, plan.target)
        target_root = parse_config_bytes(plan.target_bytes, str(plan.target.path))
        written = locked.replace(plan.target_bytes)  # history first, then config.xml in place
    result = RollbackResult(
        "ok",
        f"restored {plan.target.path.name} ({plan.target.description or 'no description'}), the version before "
        f"the sync of {_iso(plan.sync.time)}",
        node, plan.sync, plan.target, written.name, forced=force and plan.changed_since_sync,
    )
    log.info("rollback by %s: %s%s", username, result.message, " (forced)" if result.forced else "")
    try:
        _append_journal(state_dir, {
            "time": round(time.time(), 4), "file": written.name, "restored_from": plan.target.path.name,
            "undone": plan.sync.path.name, "username": username, "forced": result.forced,
        })
    except OSError as exc:
        result.warnings.append(f"rollback journal not written: {exc}")
    try:
        before_root = parse_config_bytes(current, str(store.config_path))
    except ConfigError:
        before_root = etree.Element("opnsense")
    reconfigure(result, before_root, target_root, registry, services, failover, reconfigure_services)
    return result


def changed_sections(before: etree._Element, after: etree._Element, registry: SyncItemRegistry) -> list[str]:
    """Section paths of any registered sync item whose content differs between two trees."""
    changed: list[str] = []
    for section in registry.covering_sections():
        old = digestmod.tree_item_value(before, [section])
        new = digestmod.tree_item_value(after, [section])
        if digestmod.normalize(old) != digestmod.normalize(new):
            changed.append(section)
    return changed


def reconfigure(
    result: RollbackResult,
    before: etree._Element,
    after: etree._Element,
    registry: SyncItemRegistry,
    services: ServiceBackend | None,
    failover: FailoverBackend | None,
    restart_services: bool = True,
) -> None:
    """Apply what the restore changed: CARP VIPs and pfsync, the filter, the affected services."""
    result.changed_sections = changed_sections(before, after, registry)
    touched, removed = vip_changes(model.carp_vips(before), model.carp_vips(after))
    if touched or removed:
        if failover is None:
            result.warnings.append("CARP VIPs changed but no failover backend is available: not reconfigured")
        else:
            try:
                reconfigure_vips(failover, after, touched, removed)
                result.vips_reconfigured, result.vips_removed = len(touched), len(removed)
            except HaError as exc:
                result.warnings.append(f"reconfiguring CARP failed: {exc}")
    if not result.changed_sections:
        return
    if services is None:
        result.warnings.append("no service backend: the filter and services were not reloaded "
                               "(pass --services-dir, or run on OPNsense)")
        return
    try:
        services.filter_configure()
        result.filter_reloaded = True
    except HaError as exc:
        result.warnings.append(f"filter reload failed: {exc}")
    if not restart_services:
        return
    restarted, failed = restart_item_services(services, registry, result.changed_sections)
    result.services_restarted.extend(restarted)
    result.warnings.extend(f"not restarting {name}: {exc}" for name, exc in failed)
