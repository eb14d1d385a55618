"""The one way this package replaces a file and the one way it waits for a lock.

Why one of each: a firewall's state files (maintenance share, trust pins, rollback journal,
rendered keepalived config, history) must never be read half-written, two concurrent processes
must never trample each other's temp file, and a lock held by a hung process must give a clear
error instead of a hang. Every copy that grew its own variant had other guarantees (no fsync of
the directory, a fixed temp name two syncs raced on, the default umask); these two do not.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from hasync.core.osiface import Clock, SystemClock

NEW_FILE_MODE = 0o600  # state files hold pins, hashes and shares: private unless asked otherwise


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable (the entry lives in the directory)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


COPY_CHUNK = 1024 * 1024

# what `atomic_write` writes: the bytes, text (UTF-8), or a function writing into the open file
# (a large document streamed to disk is never held in memory whole)
Content = bytes | str | Callable[[IO[bytes]], None]


def atomic_write(path: Path, data: Content, *, mode: int | None = None, temp_prefix: str | None = None) -> None:
    """Replace `path` by `data`: readers see the old file or the new one, never a part of either.

    The data goes to a temp file with a unique name in the same directory (two writers cannot
    share it), is fsync'd, gets its mode, is renamed over `path`, and the directory is fsync'd so
    the rename survives a power cut. The mode is `mode` when given, else the replaced file's,
    else `NEW_FILE_MODE`. `temp_prefix` names the temp file for cleaners that look for it.
    """
    path = Path(path)
    if mode is None:
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            mode = NEW_FILE_MODE
    import tempfile  # here: with shutil, bz2 and lzma it costs ~4 ms of every start, and a no-op sync writes nothing

    fd, temp_name = tempfile.mkstemp(prefix=temp_prefix or f".{path.name}.", suffix=".tmp", dir=path.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if callable(data):
                data(out)
            else:
                out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_dir(path.parent)


def same_content(first: Path, second: Path) -> bool:
    """Whether two files hold the same bytes, read a chunk at a time (two 20 MB configs are
    compared without holding either whole); an unreadable file is not the same."""
    try:
        if first.stat().st_size != second.stat().st_size:
            return False
        with open(first, "rb") as one, open(second, "rb") as other:
            while True:
                chunk = one.read(COPY_CHUNK)
                if chunk != other.read(COPY_CHUNK):
                    return False
                if not chunk:
                    return True
    except OSError:
        return False


def flock_within(handle: IO[bytes] | int, timeout: float, *, shared: bool = False, clock: Clock | None = None) -> bool:
    """Take a flock on an open file, waiting at most `timeout` seconds; False when it stayed held.

    Polls with a non-blocking flock (1 ms doubling to 20 ms) so the wait is bounded without
    signals or threads; `clock` is injectable so tests can run the wait on a fake clock.
    """
    clock = clock or SystemClock()
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    deadline = clock.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(handle, mode)
            return True
        except BlockingIOError:
            if clock.monotonic() >= deadline:
                return False
            clock.sleep(delay)
            delay = min(delay * 2, 0.02)


@contextlib.contextmanager
def lock_file(
    path: Path, timeout: float, error: Callable[[], Exception], *, clock: Clock | None = None
) -> Iterator[None]:
    """Hold an exclusive flock on the lock file `path` (created 0600) for the `with` block.

    When another process holds it for longer than `timeout` seconds, `error()` is raised: each
    caller says in its own words what is busy and what to do.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not flock_within(fd, timeout, clock=clock):
            raise error()
        yield
    finally:
        os.close(fd)


RACY_WINDOW = 1.0  # seconds: a file modified this recently is also checked by content

def file_key(path: Path) -> tuple[int, ...] | None:
    """The identity of one version of a file: device, inode, size, mtime and ctime (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
