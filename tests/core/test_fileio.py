"""The one atomic write and the one bounded lock (hasync.core.fileio)."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from hasync.core import fileio
from hasync.core.fileio import atomic_write, flock_within, lock_file
from hasync.wire.client import TrustStore


def test_atomic_write_replaces_keeps_the_mode_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "one\n")
    assert stat.S_IMODE(target.stat().st_mode) == fileio.NEW_FILE_MODE  # a new file is private
    os.chmod(target, 0o640)
    atomic_write(target, b"two\n")
    assert target.read_bytes() == b"two\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file's mode is kept
    atomic_write(target, "three\n", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_fsyncs_the_file_and_then_its_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    atomic_write(tmp_path / "x", "data")
    assert len(synced) == 2
    assert Path(synced[0]).parent == tmp_path and Path(synced[0]).name != "x"  # the temp file, before the rename
    assert synced[1] == str(tmp_path)  # then the directory holding the rename


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x"
    atomic_write(target, "old")

    def failing_replace(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_atomic_write_streams_from_a_writer_and_a_failing_writer_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "config.xml"

    def in_parts(out: Any) -> None:
        for part in range(3):
            out.write(b"part %d\n" % part)

    atomic_write(target, in_parts)
    assert target.read_bytes() == b"part 0\npart 1\npart 2\n"

    def failing(out: Any) -> None:
        out.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"part 0\npart 1\npart 2\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.xml"]


def test_same_content_compares_bytes_chunk_by_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio, "COPY_CHUNK", 4)  # several chunks, a difference in the last one
    first, second = tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"0123456789")
    second.write_bytes(b"0123456789")
    assert fileio.same_content(first, second)
    second.write_bytes(b"0123456788")  # control: same size, last byte differs
    assert not fileio.same_content(first, second)
    second.write_bytes(b"012345678")
    assert not fileio.same_content(first, second)
    assert not fileio.same_content(first, tmp_path / "missing")


def test_concurrent_trust_store_writers_never_collide(tmp_path: Path) -> None:
    """The trust store used a fixed `trust.tmp`: two syncs pinning at once raced on it
    (one's os.replace found the file already moved). Unique temp names cannot collide."""
    store = TrustStore(tmp_path / "state" / "trust.json")
    errors: list[BaseException] = []

    def pin(n: int) -> None:
        try:
            for i in range(40):
                store.pin(f"peer-{n}-{i}", "ab" * 32)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pin, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600  # pins are private, whatever the umask
    assert not [p for p in store.path.parent.iterdir() if p.name != "trust.json"]


def test_the_lock_wait_is_bounded_and_says_who_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "op.lock"
    with lock_file(path, 1.0, lambda: RuntimeError("unexpected")):
        with pytest.raises(RuntimeError, match="busy"), lock_file(path, 0.2, lambda: RuntimeError("busy")):
            pass
        with open(path, "rb") as other:
            assert not flock_within(other, 0.05, shared=True)  # a shared lock waits for the exclusive one too
    with lock_file(path, 0.2, lambda: RuntimeError("busy")):  # control: free again once released
        pass
