"""The snapshot's record is prepared with its gzip beside the digests (`snapshot.prepare`).

zlib leaves the interpreter lock while it compresses, so the values' gzip runs in a thread of
its own while the sync's thread computes the items' digests: at 20 MB each takes ~0.2-0.4 s, on
the primary's path while the backup merges. What it writes is what a sequential record writes.
"""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import parse_config_bytes
from hasync.core.paths import state_dir
from hasync.payload import digest
from hasync.payload.build import payload_for_items
from hasync.sync import snapshot
from support.paths import FIXTURES

REGISTRY = SyncItemRegistry.load()


def primary_payload() -> tuple[list[str], dict[str, Any]]:
    root = parse_config_bytes((FIXTURES / "nodes" / "primary.xml").read_bytes(), "primary")
    ids = [item.id for item in REGISTRY.resolve(read_hasync(root).syncitems)]
    return ids, payload_for_items(root, REGISTRY, ids)


def test_the_gzip_runs_while_the_digests_are_computed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The gzip waits (up to 10 s) for a digest computed while it runs: were the two in
    sequence, no digest could be computed during it, and the test would fail after the wait.
    Nothing is left running, and the record is the sequential one."""
    ids, payload = primary_payload()
    digest_during_gzip = threading.Event()
    gzip_running = threading.Event()
    real_compress, real_digest = gzip.compress, digest.item_digest
    compressing: list[tuple[str, bool]] = []

    def compress(data: bytes, *args: Any, **kwargs: Any) -> bytes:
        gzip_running.set()
        compressing.append((threading.current_thread().name, digest_during_gzip.wait(10)))
        gzip_running.clear()
        return real_compress(data, *args, **kwargs)

    def item_digest(*args: Any, **kwargs: Any) -> str:
        if gzip_running.is_set():
            digest_during_gzip.set()
        return real_digest(*args, **kwargs)

    monkeypatch.setattr(snapshot.gzip, "compress", compress)
    monkeypatch.setattr(snapshot.digestmod, "item_digest", item_digest)
    before = threading.active_count()
    prepared = snapshot.prepare(tmp_path, REGISTRY, ids, payload, "https://backup/", now=1.0)
    [(thread, overlapped)] = compressing
    assert overlapped and thread != threading.main_thread().name
    assert threading.active_count() == before

    monkeypatch.undo()
    values = {item.id: digest.value_item_value(payload, item.sections) for item in REGISTRY.resolve(ids)}
    assert json.loads(gzip.decompress(prepared.blob)) == json.loads(json.dumps(values))
    assert {i: r.digest for i, r in prepared.records.items()} == \
        {item.id: digest.item_digest(values[item.id], REGISTRY) for item in REGISTRY.resolve(ids)}
    assert not state_dir(tmp_path).exists()  # prepared, nothing written
    prepared.commit({})
    assert set(snapshot.load(tmp_path).items) == set(ids)  # type: ignore[union-attr]
