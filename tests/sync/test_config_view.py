"""The primary's digest cache (`ConfigView`) trusts a file's identity only past the racy window.

A no-op sync reads neither config.xml nor its digests when the cache names the file's identity
(device, inode, size, mtime, ctime) and that identity was recorded more than `RACY_WINDOW` after
the file's mtime: a same-size rewrite within the same tick would otherwise look unchanged. An
entry recorded inside the window is checked by hash on every run, and recorded once more (one
write) by the first run after the window; from then on the file is not even read. The clock is
injected, so which run is inside the window is set by the test, not by the machine's speed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.fileio import RACY_WINDOW, file_key
from hasync.sync.plan import VIEW_CACHE, ConfigView
from support.paths import FIXTURES


class CountingStore(ConfigStore):
    """A store that counts how often config.xml is read whole."""

    reads = 0

    def read_bytes(self) -> bytes:
        self.reads += 1
        return super().read_bytes()


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    shutil.copy(FIXTURES / "nodes" / "primary.xml", tmp_path / "config.xml")
    return CountingStore(tmp_path)


def run_at(store: CountingStore, seconds_after_mtime: float) -> tuple[bool, int, bytes]:
    """One sync's use of the view at that moment: digests from the cache?, reads, cache file after."""
    key = file_key(store.config_path)
    assert key is not None
    registry = SyncItemRegistry.load()
    store.reads = 0
    state = store.conf_dir / "ha-state"
    view = ConfigView(store, state, clock=lambda: key[3] / 1e9 + seconds_after_mtime)
    _, cached = view.digests(registry, registry.ids())
    return cached, store.reads, (state / VIEW_CACHE).read_bytes()


def test_an_entry_recorded_inside_the_window_is_checked_until_one_past_it_is_recorded(store: CountingStore) -> None:
    inside, past = RACY_WINDOW / 4, RACY_WINDOW * 3
    computed, reads, first = run_at(store, inside)
    assert (computed, reads) == (False, 1)  # nothing cached yet: read, digested, stored

    cached, reads, second = run_at(store, inside * 2)
    assert (cached, reads) == (True, 1)  # not trusted yet: read and hashed, but nothing written
    assert second == first

    cached, reads, third = run_at(store, past)
    assert (cached, reads) == (True, 1)  # the first run past the window records the entry again
    assert third != second

    cached, reads, fourth = run_at(store, past * 2)
    assert (cached, reads) == (True, 0)  # trusted: the file is not even read, nothing written
    assert fourth == third


def test_control_an_entry_recorded_past_the_window_is_trusted_at_once(store: CountingStore) -> None:
    past = RACY_WINDOW * 3
    assert run_at(store, past)[:2] == (False, 1)
    assert run_at(store, past)[:2] == (True, 0)


def test_a_changed_file_is_never_answered_from_the_cache(store: CountingStore) -> None:
    past = RACY_WINDOW * 3
    run_at(store, past)
    data = store.config_path.read_bytes()
    store.config_path.write_bytes(data.replace(b"<descr>", b"<descr>changed ", 1))
    cached, reads, _ = run_at(store, past)
    assert (cached, reads) == (False, 1)
