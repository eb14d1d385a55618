"""Crash-safe, lock-compatible reading and writing of config.xml.

Compatibility with OPNsense's own PHP writers drives the design:

* PHP locks the inode it opened (``flock`` on config.xml itself) and rewrites the file *in place*.
  Replacing config.xml by rename would leave a PHP writer holding a lock on an orphaned inode,
  and its write would silently vanish. So we lock and rewrite the same inode too.
* Crash safety therefore comes from ordering, not rename: the new version is first written to
  ``backup/config-<time>.xml`` (fsync'd, 0640), then config.xml is rewritten and fsync'd, then
  history is pruned. If we die mid-rewrite, config.xml no longer parses and the next load restores
  the newest valid history file, which is the new version. Either the old or the new config
  survives; never a mix.
* Readers take a shared lock, writers an exclusive one held across read-modify-write, so an
  update by another flock user can never be lost between our read and our write.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, NamedTuple

from lxml import etree

from hasync.core import xmlsafe
from hasync.core.errors import ConfigError
from hasync.core.fileio import COPY_CHUNK, Content, atomic_write, file_key, flock_within
from hasync.core.osiface import Clock, SystemClock

log = logging.getLogger(__name__)

CONFIG_NAME = "config.xml"
BACKUP_DIR_NAME = "backup"
DEFAULT_BACKUP_COUNT = 100
DEFAULT_LOCK_TIMEOUT = 120.0
SYSTEM_USERNAME = "(system)"
_HISTORY_RE = re.compile(r"^config-(\d+(?:\.\d+)?)\.xml$")
_TMP_PREFIX = ".tmp-config-"
HISTORY_MODE = 0o640  # as OPNsense writes /conf/backup


class HistoryEntry(NamedTuple):
    """One history file (`backup/config-<time>.xml`) and the revision it records."""

    path: Path
    time: float
    description: str
    username: str


def parse_config_bytes(data: bytes, source: str) -> etree._Element:
    """Parse config.xml content, turning every failure into a ConfigError naming file, line, cause."""
    try:
        root = xmlsafe.parse_bytes(data, remove_blank_text=True)
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno is not None else "?"
        raise ConfigError(f"{source}: line {line}: {exc.msg}") from None
    except xmlsafe.UnsafeXmlError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    if root.tag != "opnsense":
        raise ConfigError(f"{source}: line {root.sourceline}: root element is <{root.tag}>, expected <opnsense>")
    return root


DECLARATION = b'<?xml version="1.0"?>\n'


def write_config(root: etree._Element, out: IO[bytes]) -> None:
    """Write `root` to `out` in OPNsense's layout: XML declaration, 2-space indent, root <opnsense>.

    libxml2's own formatted output, as OPNsense's `Config::__toString` writes (a DOM parsed without
    blank text, saved with `formatOutput`): elements holding text beside child elements, or
    whitespace under ``xml:space="preserve"``, are written as they are. The tree is not touched:
    it stays as free of indentation as a fresh parse (`parse_config_bytes`), so the agent can keep
    what it wrote and later merge into it (`agent.fastpath.ConfigCache.take`) with the same result
    as into a re-parse of the file.

    Streamed (`etree.xmlfile`): the document never exists whole in memory; serialising a 20 MB
    config as bytes peaks at ~56 MB more.
    """
    out.write(DECLARATION)
    with etree.xmlfile(out, encoding="utf-8") as document:
        document.write(root, pretty_print=True)


def serialize(root: etree._Element) -> bytes:
    """The bytes `write_config` writes (the store itself writes to disk directly)."""
    buffer = io.BytesIO()
    write_config(root, buffer)
    return buffer.getvalue()


class ConfigStore:
    """config.xml plus its history in one directory (`--conf-dir`, default /conf)."""

    def __init__(self, conf_dir: str | os.PathLike[str], clock: Clock | None = None) -> None:
        self.conf_dir = Path(conf_dir)
        self.config_path = self.conf_dir / CONFIG_NAME
        self.backup_dir = self.conf_dir / BACKUP_DIR_NAME
        self.clock: Clock = clock or SystemClock()
        self.restored_from: Path | None = None  # set when a load had to fall back to history
        self.lock_timeout = DEFAULT_LOCK_TIMEOUT
        # called with (tree, sha256 hex of the file) after every write through the store, under
        # its lock (the agent's read cache adopts the tree it just wrote instead of parsing it again)
        self.written: Callable[[etree._Element, str], None] | None = None
        # called by `transaction` under the exclusive lock, with a function giving the locked
        # file's sha256: a parsed tree that is config.xml as it is now, handed over to be changed,
        # or None (the agent's read cache gives up its tree instead of letting it be parsed twice)
        self.take_parsed: Callable[[Callable[[], str]], etree._Element | None] | None = None

    # --- reading ---------------------------------------------------------------------------

    def _open(self, mode: str) -> IO[bytes]:
        try:
            return open(self.config_path, mode)  # the caller holds the lock for the handle's lifetime
        except FileNotFoundError:
            raise ConfigError(f"{self.config_path}: no such file (is --conf-dir {self.conf_dir} right?)") from None
        except PermissionError:
            raise ConfigError(f"{self.config_path}: permission denied (run as root?)") from None

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[IO[bytes]]:
        """config.xml open and flock'ed (shared for reading, exclusive for writing).

        The wait is bounded: a process that hangs while holding the lock (a stuck PHP writer)
        gives a clear error after `lock_timeout` seconds instead of piling up agent threads.
        """
        with self._open("r+b" if exclusive else "rb") as handle:
            self._flock(handle, shared=not exclusive)
            yield handle

    def _flock(self, handle: IO[bytes], *, shared: bool) -> None:
        # Real time, not self.clock: the injected clock dates revisions, this bounds a wait.
        if not flock_within(handle, self.lock_timeout, shared=shared):
            raise ConfigError(
                f"{self.config_path}: locked by another process for more than {self.lock_timeout:g}s "
                "(a hung configd or PHP writer?); nothing was read or written"
            )

    def load(self) -> etree._Element:
        """Parse config.xml under a shared lock; restore from history if it is broken."""
        with self._locked(exclusive=False) as handle:
            data = handle.read()
            try:
                return parse_config_bytes(data, str(self.config_path))
            except ConfigError as broken:
                error = broken
        with self._locked(exclusive=True) as handle:
            return self._read_locked(handle, first_error=error)

    def recover(self) -> etree._Element:
        """Crash recovery for a service start: `load`, but under the exclusive lock.

        `load` only reads, so temp files of a writer that was killed mid-write stay until the
        next write. Holding the exclusive lock proves no live writer owns them; this sweeps them
        and restores config.xml from history when it does not parse.
        """
        return self.recover_entry()[0]

    def recover_entry(self) -> tuple[etree._Element, tuple[int, ...] | None, str]:
        """`recover`, with what identifies the file the tree is (`fileio.file_key`, its sha256),
        taken under the same lock: the agent's read cache keeps the tree instead of parsing again."""
        with self._locked(exclusive=True) as handle:
            root = self._read_locked(handle)
            return root, file_key(self.config_path), _sha256_of(handle)

    def read_bytes(self) -> bytes:
        with self._locked(exclusive=False) as handle:
            return handle.read()

    def content_sha256(self) -> str:
        """sha256 of config.xml's bytes, read a chunk at a time under the shared lock."""
        with self._locked(exclusive=False) as handle:
            return _sha256_of(handle)

    def stamped_past(self, mtime_ns: int, key: Callable[[Path], tuple[int, ...] | None] = file_key) -> bool:
        """Whether a file created beside config.xml now gets a later modification time than
        `mtime_ns` (as `key` reads times): then the file system's clock has left the tick of that
        time, and no later write here can carry it.

        Why: a cache entry of a file written within the last `RACY_WINDOW` is checked by content
        on every use, since a second write in the same tick with the same size has the same
        `file_key`. A writer still holding the lock asks this right after its own write; when the
        answer is yes, only a write it has already seen can carry that time, and the checks are
        not needed (a merge was followed by three of them, ~18 ms each at 20 MB). The probe file
        has the temp prefix the writers sweep, should a crash leave it. Any error: False.
        """
        import tempfile  # as in `atomic_write`: not part of every start

        try:
            fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tick", dir=self.conf_dir)
        except OSError:
            return False
        try:
            probe = key(Path(name))
            return probe is not None and probe[3] > mtime_ns
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(name)

    def read_span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of config.xml, read under the shared lock."""
        with self._locked(exclusive=False) as handle:
            handle.seek(start)
            return handle.read(max(0, end - start))

    def _read_locked(self, handle: IO[bytes], first_error: ConfigError | None = None) -> etree._Element:
        """Parse while holding the exclusive lock; on failure restore the newest valid history file."""
        self._sweep_temp_files()
        handle.seek(0)
        data = handle.read()
        try:
            return parse_config_bytes(data, str(self.config_path))
        except ConfigError as exc:
            error = first_error or exc
        for entry in self._history_files():
            try:
                content = entry.read_bytes()
                root = parse_config_bytes(content, str(entry))
            except (OSError, ConfigError):
                continue
            log.warning("%s; restored the newest valid backup %s", error, entry.name)
            self._rewrite_in_place(handle, [content])
            self.restored_from = entry
            return root
        raise ConfigError(f"{error} (and no valid backup in {self.backup_dir} to restore)")

    # --- writing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def transaction(self, description: str, username: str = SYSTEM_USERNAME) -> Iterator[etree._Element]:
        """Exclusive lock across read-modify-write. Nothing is written if the block raises."""
        with self._locked(exclusive=True) as handle:
            root = self._take_parsed(handle)
            if root is None:
                root = self._read_locked(handle)
            yield root
            self._write_locked(handle, root, description, username)

    def _take_parsed(self, handle: IO[bytes]) -> etree._Element | None:
        if self.take_parsed is None:
            return None
        root = self.take_parsed(lambda: _sha256_of(handle))
        if root is not None:
            self._sweep_temp_files()  # what `_read_locked` does besides parsing
        return root

    def write(self, root: etree._Element, description: str, username: str = SYSTEM_USERNAME) -> None:
        """Replace the config with `root` (a tree obtained from `load`) under an exclusive lock."""
        with self._locked(exclusive=True) as handle:
            self._write_locked(handle, root, description, username)

    def _write_locked(self, handle: IO[bytes], root: etree._Element, description: str, username: str) -> None:
        now = self.clock.time()
        set_revision(root, username=username, description=description, when=now)
        history = self._write_history(lambda out: write_config(root, out), now)
        content = hashlib.sha256()  # config.xml's, for the agent's cache: hashed while it is copied
        with open(history, "rb") as source:
            self._rewrite_in_place(handle, _hashing(iter(lambda: source.read(COPY_CHUNK), b""), content))
        self._prune(backup_count(root))
        if self.written is not None:  # still under the lock: the file's sha256 is `content`
            self.written(root, content.hexdigest())

    @contextlib.contextmanager
    def locked_bytes(self) -> Iterator[LockedConfig]:
        """config.xml's exact bytes under the exclusive lock, for byte-exact restores (rollback).

        Unlike `transaction`, nothing is parsed or re-serialised, and nothing is written unless
        the caller asks with `LockedConfig.replace`; the bytes are read when first used.
        """
        with self._locked(exclusive=True) as handle:
            self._sweep_temp_files()
            yield LockedConfig(self, handle)

    def _rewrite_in_place(self, handle: IO[bytes], chunks: Iterable[bytes]) -> None:
        # Truncate before writing: a writer killed mid-write then leaves a prefix of the new
        # version, which lacks the closing </opnsense> and never parses, so load() restores the
        # history copy. Overwriting the old bytes first could leave new prefix + old tail, which
        # does parse when the cut falls inside repeated records (seen in test_crash_load).
        handle.seek(0)
        handle.truncate()
        for chunk in chunks:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())

    def _write_history(self, data: Content, when: float) -> Path:
        self.backup_dir.mkdir(mode=0o750, exist_ok=True)
        stamp = when
        target = self.backup_dir / f"config-{stamp:.4f}.xml"
        while target.exists():  # two writes within 0.1 ms: keep both
            stamp += 0.0001
            target = self.backup_dir / f"config-{stamp:.4f}.xml"
        atomic_write(target, data, mode=HISTORY_MODE, temp_prefix=_TMP_PREFIX)
        return target

    def _sweep_temp_files(self) -> None:
        """Remove half-written history temp files and `stamped_past` probes left by a crashed
        writer (we hold the lock)."""
        for folder in (self.backup_dir, self.conf_dir):
            for leftover in folder.glob(f"{_TMP_PREFIX}*"):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()

    def history_files(self) -> list[Path]:
        """History files (`backup/config-<time>.xml`), newest first."""
        return self._history_files()

    def _history_files(self) -> list[Path]:
        """History files, newest first."""
        if not self.backup_dir.is_dir():
            return []
        found: list[tuple[float, Path]] = []
        for path in self.backup_dir.iterdir():
            match = _HISTORY_RE.match(path.name)
            if match:
                found.append((float(match.group(1)), path))
        return [path for _, path in sorted(found, reverse=True)]

    def _prune(self, keep: int) -> None:
        for path in self._history_files()[max(keep, 1):]:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def history(self) -> list[HistoryEntry]:
        """Revisions in history, newest first (unparseable files are listed with a note)."""
        entries: list[HistoryEntry] = []
        for path in self._history_files():
            match = _HISTORY_RE.match(path.name)
            stamp = float(match.group(1)) if match else 0.0
            try:
                root = parse_config_bytes(path.read_bytes(), str(path))
            except (OSError, ConfigError) as exc:
                entries.append(HistoryEntry(path, stamp, f"(unreadable: {exc})", ""))
                continue
            entries.append(
                HistoryEntry(
                    path,
                    stamp,
                    root.findtext("revision/description", default="") or "",
                    root.findtext("revision/username", default="") or "",
                )
            )
        return entries


class LockedConfig:
    """config.xml held under the exclusive lock by `ConfigStore.locked_bytes`."""

    def __init__(self, store: ConfigStore, handle: IO[bytes]) -> None:
        self._store = store
        self._handle = handle
        self._data: bytes | None = None

    @property
    def data(self) -> bytes:
        """The file's bytes, read on first use (a caller that only compares files reads none)."""
        if self._data is None:
            self._handle.seek(0)
            self._data = self._handle.read()
        return self._data

    def replace(self, data: bytes) -> Path:
        """Make `data` (a complete, valid config) the current config, crash-safely.

        Same order as every write: history file first, then the in-place rewrite, then pruning.
        Returns the history file written.
        """
        root = parse_config_bytes(data, "replacement config")
        store = self._store
        written = store._write_history(data, store.clock.time())
        store._rewrite_in_place(self._handle, [data])
        store._prune(backup_count(root))
        self._data = data
        return written


def _sha256_of(handle: IO[bytes]) -> str:
    handle.seek(0)
    # (typed IO[bytes], the handle is a buffered file from `open`, which has the readinto needed)
    return hashlib.file_digest(handle, "sha256").hexdigest()  # type: ignore[arg-type]


def _hashing(chunks: Iterable[bytes], content: hashlib._Hash) -> Iterator[bytes]:
    for chunk in chunks:
        content.update(chunk)
        yield chunk


def set_revision(root: etree._Element, *, username: str, description: str, when: float) -> None:
    """Update <revision> the way OPNsense's write_config() does (time with two decimals)."""
    revision = root.find("revision")
    if revision is None:
        revision = etree.SubElement(root, "revision")
    for tag, text in (("username", username), ("description", description), ("time", f"{when:.2f}")):
        node = revision.find(tag)
        if node is None:
            node = etree.SubElement(revision, tag)
        node.text = text


def backup_count(root: etree._Element) -> int:
    text = (root.findtext("system/backupcount") or "").strip()
    try:
        value = int(text)
    except ValueError:
        return DEFAULT_BACKUP_COUNT
    return value if value > 0 else DEFAULT_BACKUP_COUNT
