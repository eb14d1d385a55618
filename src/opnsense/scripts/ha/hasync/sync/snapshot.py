"""The primary's record of what it last pushed: the fallback for backups without `hasync.*`.

A stock OPNsense backup cannot tell a primary what it holds. What the primary *can* know is what
it sent: after every successful `restore_config_section` it keeps, per sync item,

* the item's payload-form value as sent (`last-sync-items.json.gz`),
* the canonical digest of that value (`digest.digest`, the same form the backup's
  `hasync.digest` uses),
* when the peer has `hasync.digest`: the digest the backup itself reported right after the
  merge. The drift check compares the backup's later digests with *that*, so node-local content
  the merge keeps (container keys only the backup has) never shows up as drift,

in `<conf-dir>/ha-state/` (mode 0700/0600: the values contain the same secrets config.xml does).
`diff` and `check` use it when the backup has no `hasync.*` methods, and say so plainly: it
shows what changed *here* since the last push, never what someone changed on the backup.

A partial sync (`sync --items a`) updates only those items' records; a sync to another target
starts a new record. Writing the snapshot never fails a sync: problems become warnings.
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hasync.config.items import SyncItemRegistry
from hasync.core.errors import HaError
from hasync.core.fileio import atomic_write
from hasync.core.paths import state_dir
from hasync.payload import digest as digestmod
from hasync.wire.discovery import discover
from hasync.wire.protocol import DIGEST_METHOD

if TYPE_CHECKING:
    from hasync.sync.run import SyncResult
    from hasync.wire.client import PeerClient

log = logging.getLogger("hasync.snapshot")

META_FILE = "last-sync.json"
VALUES_FILE = "last-sync-items.json.gz"
FORMAT = 1


class ItemRecord(NamedTuple):
    """One item as last pushed: our digest and the backup's, so drift on either side shows.

    A NamedTuple (see `hasync`): `PreparedRecord.commit` replaces it with the backup's digest.
    """

    id: str
    sections: list[str]
    time: float
    digest: str
    backup_digest: str = ""  # "" = the backup could not tell (stock OPNsense)

    def as_json(self) -> dict[str, Any]:
        return {"sections": self.sections, "time": self.time, "digest": self.digest,
                "backup_digest": self.backup_digest}


class Snapshot:
    """The last push to one backup, per item, with the values sent (read lazily: they are large)."""

    def __init__(self, directory: Path, target: str, items: dict[str, ItemRecord], values_sha256: str,
                 values: dict[str, dict[str, Any]] | None = None) -> None:
        self.directory = directory
        self.target = target
        self.items = items
        self.values_sha256 = values_sha256
        self._values = values

    @property
    def time(self) -> float:
        return max((record.time for record in self.items.values()), default=0.0)

    @property
    def time_iso(self) -> str:
        return iso(self.time)

    def values(self) -> dict[str, dict[str, Any]]:
        """Per-item values as pushed (read lazily; a file that does not match its digest is refused)."""
        if self._values is None:
            path = self.directory / VALUES_FILE
            try:
                raw = path.read_bytes()
            except FileNotFoundError:
                raw = b""
            except OSError as exc:
                raise HaError(f"{path}: cannot read the sync snapshot: {exc.strerror or exc}") from None
            if hashlib.sha256(raw).hexdigest() != self.values_sha256:
                raise HaError(f"{path} does not match {META_FILE} (interrupted write or edited by hand); "
                              "run `opnsense-ha sync` to record a fresh snapshot")
            try:
                data = json.loads(gzip.decompress(raw).decode("utf-8")) if raw else {}
            except (OSError, ValueError) as exc:
                raise HaError(f"{path}: unreadable sync snapshot ({exc}); run `opnsense-ha sync`") from None
            self._values = data if isinstance(data, dict) else {}
        return self._values

    def item_value(self, item_id: str) -> dict[str, Any] | None:
        value = self.values().get(item_id)
        return value if isinstance(value, dict) else None


def iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if stamp else "never"


def _write_atomic(path: Path, data: bytes) -> None:
    atomic_write(path, data, mode=0o600)


def load(conf_dir: str | os.PathLike[str]) -> Snapshot | None:
    """The snapshot of this node's last sync, or None when there is none (or another canonical form)."""
    directory = state_dir(Path(conf_dir))
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HaError(f"{path}: unreadable sync snapshot ({exc}); delete it and run `opnsense-ha sync`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("canonical") != digestmod.CANONICAL_FORM:
        log.info("%s was written by another opnsense-ha version; ignored until the next sync", path)
        return None
    items: dict[str, ItemRecord] = {}
    for item_id, record in (meta.get("items") or {}).items():
        if isinstance(record, dict):
            items[str(item_id)] = ItemRecord(
                str(item_id), [str(s) for s in record.get("sections", [])], float(record.get("time", 0.0)),
                str(record.get("digest", "")), str(record.get("backup_digest", "")))
    return Snapshot(directory, str(meta.get("target", "")), items, str(meta.get("values_sha256", "")))


def record(
    conf_dir: str | os.PathLike[str],
    registry: SyncItemRegistry,
    item_ids: list[str],
    payload: dict[str, Any],
    target: str,
    backup_digests: dict[str, str] | None = None,
    now: float | None = None,
    digests: dict[str, str] | None = None,
) -> Snapshot:
    """Store what was pushed for `item_ids` (keeping other items' records for the same target).

    `digests`: this node's digests of those items when the caller already has them (a sync
    compares them with the backup's first), so they are not computed twice.
    """
    return prepare(conf_dir, registry, item_ids, payload, target, now, digests).commit(backup_digests)


class PreparedRecord(NamedTuple):
    """A snapshot record with everything computed but the backup's digests, nothing written yet.

    A sync prepares it while the backup merges (the JSON and gzip of a large config take
    seconds) and commits it once the backup has told its digests.
    """

    directory: Path
    target: str
    item_ids: list[str]
    records: dict[str, ItemRecord]
    values: dict[str, Any]
    blob: bytes

    def commit(self, backup_digests: dict[str, str] | None = None) -> Snapshot:
        for item_id in self.item_ids:
            if item_id in self.records:
                self.records[item_id] = self.records[item_id]._replace(
                    backup_digest=(backup_digests or {}).get(item_id, ""))
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_atomic(self.directory / VALUES_FILE, self.blob)  # values first: the metadata names their digest
        values_sha256 = hashlib.sha256(self.blob).hexdigest()
        meta = {
            "format": FORMAT,
            "canonical": digestmod.CANONICAL_FORM,
            "algorithm": digestmod.ALGORITHM,
            "target": self.target,
            "values_sha256": values_sha256,
            "items": {item_id: rec.as_json() for item_id, rec in sorted(self.records.items())},
        }
        _write_atomic(self.directory / META_FILE, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
        return Snapshot(self.directory, self.target, self.records, values_sha256, self.values)


def prepare(
    conf_dir: str | os.PathLike[str],
    registry: SyncItemRegistry,
    item_ids: list[str],
    payload: dict[str, Any],
    target: str,
    now: float | None = None,
    digests: dict[str, str] | None = None,
) -> PreparedRecord:
    """The record `record` writes, computed; nothing is written (`PreparedRecord.commit` does).

    The values' gzip runs in a thread of its own while this one computes the items' digests:
    zlib leaves the interpreter lock while it compresses, and both take ~0.2-0.4 s at 20 MB
    (level 1: this is local state read back by this program; level 9 costs seconds).
    """
    now = time.time() if now is None else now
    directory = state_dir(Path(conf_dir))
    items = registry.resolve(item_ids)
    try:
        previous = load(conf_dir)
        records = dict(previous.items) if previous is not None and previous.target == target else {}
        # earlier values are read only when some of them are kept (a full sync replaces them all)
        keep = set(records) - {item.id for item in items}
        values = previous.values() if previous is not None and keep else {}
    except HaError:
        records, values = {}, {}
    values = {k: v for k, v in values.items() if k in records}
    for item in items:
        values[item.id] = digestmod.value_item_value(payload, item.sections, copy_values=False)  # only read
    data = json.dumps(values, sort_keys=True, separators=(",", ":")).encode("utf-8")
    compressed: list[bytes] = []
    worker = threading.Thread(target=lambda: compressed.append(gzip.compress(data, compresslevel=1, mtime=0)),
                              name="snapshot-gzip", daemon=True)
    worker.start()
    try:
        for item in items:
            known = (digests or {}).get(item.id)
            records[item.id] = ItemRecord(item.id, list(item.sections), round(now, 3),
                                          known or digestmod.item_digest(values[item.id], registry), "")
    finally:
        worker.join()
    blob = compressed[0] if compressed else gzip.compress(data, compresslevel=1, mtime=0)
    return PreparedRecord(directory, target, [item.id for item in items], records, values, blob)


def record_after_sync(
    conf_dir: str | os.PathLike[str],
    registry: SyncItemRegistry,
    result: SyncResult,
    payload: dict[str, Any],
    peer: PeerClient,
    item_ids: list[str] | None = None,
    digests: dict[str, str] | None = None,
    prepared: PreparedRecord | None = None,
    *,
    extensions: bool | None = None,
    asked: bool = False,
    backup_reply: Any = None,
) -> None:
    """Called by `SyncRun` right after the backup confirmed the merge. Never raises.

    `item_ids`: the items that were sent (default: all of `result.items`). The backup's digests
    of them as they are now: `backup_reply` when the merge request `asked` for them already (the
    fast path's multicall), else asked for here, of a backup whose probe showed our `extensions`
    (False: a stock backup, not asked; None: unknown, its method list tells).
    """
    ids = list(result.items) if item_ids is None else list(item_ids)
    backup_digests: dict[str, str] = {}
    try:
        if not asked and extensions is not False and (extensions or discover(peer).has(DIGEST_METHOD)):
            backup_reply = peer.call(DIGEST_METHOD, [ids])
        if backup_reply is not None:
            backup_digests, _unknown = digestmod.parse_digest_reply(backup_reply)
    except HaError as exc:
        log.info("no digests from the backup after the sync: %s", exc)
    try:
        if prepared is not None and prepared.target == peer.url and prepared.item_ids == ids:
            prepared.commit(backup_digests)
        else:
            record(conf_dir, registry, ids, payload, peer.url, backup_digests, digests=digests)
    except (HaError, OSError) as exc:
        note = f"the snapshot of this sync was not recorded ({exc}); diff/check against a stock backup will be stale"
        result.warnings.append(note)
        log.warning("%s", note)
