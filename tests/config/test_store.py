"""Config store: locking, crash safety by write order, history, revision, safe parsing."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from lxml import etree

from hasync.config.store import ConfigStore, parse_config_bytes, serialize
from hasync.core.errors import ConfigError
from support.paths import PACKAGE_ROOT

BASE = b"""<?xml version="1.0"?>
<opnsense>
  <system>
    <hostname>fw</hostname>
    <backupcount>5</backupcount>
  </system>
  <counter>0</counter>
  <revision>
    <username>root</username>
    <description>initial</description>
    <time>1.00</time>
  </revision>
</opnsense>
"""


class FixedClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        self.now += 1.0
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    (tmp_path / "config.xml").write_bytes(BASE)
    return tmp_path


def bump(store: ConfigStore, description: str = "bump") -> None:
    with store.transaction(description) as root:
        node = root.find("counter")
        assert node is not None
        node.text = str(int(node.text or "0") + 1)


def test_write_updates_revision_and_history(conf: Path) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    bump(store, "first change")
    root = store.load()
    assert root.findtext("revision/description") == "first change"
    assert root.findtext("revision/username") == "(system)"
    assert root.findtext("revision/time") == "1700000001.00"
    history = list((conf / "backup").iterdir())
    assert [p.name for p in history] == ["config-1700000001.0000.xml"]
    assert history[0].read_bytes() == (conf / "config.xml").read_bytes()
    assert history[0].stat().st_mode & 0o777 == 0o640


def test_output_layout_matches_opnsense(conf: Path) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    bump(store)
    data = (conf / "config.xml").read_bytes()
    assert data.startswith(b'<?xml version="1.0"?>\n<opnsense>\n  <system>\n    <hostname>fw</hostname>')
    assert b"\n  <counter>1</counter>\n" in data


def test_in_place_rewrite_keeps_inode(conf: Path) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    inode = (conf / "config.xml").stat().st_ino
    bump(store)
    assert (conf / "config.xml").stat().st_ino == inode


def test_history_pruned_to_backupcount(conf: Path) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    for _ in range(8):
        bump(store)
    names = sorted(p.name for p in (conf / "backup").iterdir())
    assert len(names) == 5
    assert names[-1] == "config-1700000008.0000.xml"
    assert [e.description for e in store.history()][:1] == ["bump"]


def test_failed_transaction_writes_nothing(conf: Path) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    with pytest.raises(RuntimeError), store.transaction("never") as root:
        root.find("counter").text = "99"  # type: ignore[union-attr]
        raise RuntimeError("boom")
    assert (conf / "config.xml").read_bytes() == BASE
    assert not (conf / "backup").exists()


def test_broken_config_restores_newest_valid_backup(conf: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ConfigStore(conf, clock=FixedClock())
    bump(store)
    bump(store)
    good = (conf / "config.xml").read_bytes()
    newest = sorted((conf / "backup").iterdir())[-1]
    # a newer but corrupt history file must be skipped
    (conf / "backup" / "config-1800000000.0000.xml").write_bytes(b"<opnsense><broken")
    (conf / "config.xml").write_bytes(good[:40])
    root = store.load()
    assert root.findtext("counter") == "2"
    assert (conf / "config.xml").read_bytes() == newest.read_bytes()
    assert "restored the newest valid backup" in caplog.text


def test_malformed_without_history_names_file_and_line(conf: Path) -> None:
    (conf / "config.xml").write_bytes(b'<?xml version="1.0"?>\n<opnsense>\n  <a>\n</opnsense>\n')
    with pytest.raises(ConfigError, match=r"config\.xml: line \d+: .*"):
        ConfigStore(conf).load()
    assert not (conf / "backup").exists()


@pytest.mark.parametrize(
    "payload",
    [
        b'<?xml version="1.0"?><!DOCTYPE opnsense [<!ENTITY a "aaaa">]><opnsense>&a;</opnsense>',
        b'<?xml version="1.0"?><!DOCTYPE opnsense SYSTEM "http://127.0.0.1:9/x.dtd"><opnsense/>',
        b'<?xml version="1.0"?><!DOCTYPE o [<!ENTITY x SYSTEM "file:///etc/passwd">]><opnsense>&x;</opnsense>',
    ],
)
def test_parse_refuses_dtd_and_entities(payload: bytes) -> None:
    with pytest.raises(ConfigError, match="not allowed"):
        parse_config_bytes(payload, "x.xml")


def test_wrong_root_refused() -> None:
    with pytest.raises(ConfigError, match="expected <opnsense>"):
        parse_config_bytes(b"<pfsense/>", "x.xml")


def test_serialize_roundtrip_is_stable(conf: Path) -> None:
    root = parse_config_bytes(BASE, "x")
    once = serialize(root)
    assert serialize(parse_config_bytes(once, "y")) == once


def test_serialize_leaves_the_tree_as_parsed() -> None:
    """The agent keeps the tree it wrote and merges into it later (`ConfigCache.take`): writing
    must not add indentation a parse of the file would not have."""
    root = parse_config_bytes(BASE, "x")
    before = etree.tostring(root)
    written = serialize(root)
    assert etree.tostring(root) == before
    assert etree.tostring(parse_config_bytes(written, "y")) == before
    etree.indent(root)  # control: indenting in place, as the store did, changes the tree
    assert etree.tostring(root) != before


def test_a_write_streams_what_serialize_gives_and_reports_its_sha256(conf: Path) -> None:
    store = ConfigStore(conf)
    seen: list[tuple[etree._Element, str]] = []
    store.written = lambda root, content: seen.append((root, content))
    with store.transaction("test: write") as root:
        root.find("counter").text = "7"  # type: ignore[union-attr]
    data = (conf / "config.xml").read_bytes()
    assert data == serialize(root) == store.history_files()[0].read_bytes()
    assert seen == [(root, hashlib.sha256(data).hexdigest())]


def test_serialize_formats_as_libxml2_does_for_opnsense() -> None:
    """OPNsense writes config.xml with libxml2's formatted output (`Config::__toString`): two
    spaces per level, and an element holding text beside its children is written as it is (so is
    whitespace kept with xml:space="preserve")."""
    source = (b'<opnsense><a><b>1</b></a><mixed>text<b>1</b></mixed>'
              b'<kept xml:space="preserve"> <b>1</b> </kept></opnsense>')
    assert serialize(parse_config_bytes(source, "x")) == (
        b'<?xml version="1.0"?>\n<opnsense>\n  <a>\n    <b>1</b>\n  </a>\n  <mixed>text<b>1</b></mixed>\n'
        b'  <kept xml:space="preserve"> <b>1</b> </kept>\n</opnsense>\n')


# --- crash safety: SIGKILL at the two dangerous points --------------------------------------

CRASH_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {pkg!r})
    from hasync.config import store as store_mod
    point = sys.argv[2]
    real = store_mod.ConfigStore._rewrite_in_place
    def crashing(self, handle, chunks):
        data = b"".join(chunks)
        if point == "before-rewrite":
            os.kill(os.getpid(), signal.SIGKILL)
        handle.seek(0)
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    store_mod.ConfigStore._rewrite_in_place = crashing
    st = store_mod.ConfigStore(sys.argv[1])
    with st.transaction("crash test") as root:
        root.find("counter").text = "42"
    """
)


@pytest.mark.parametrize("point", ["before-rewrite", "mid-rewrite"])
def test_sigkill_leaves_old_or_new(conf: Path, point: str) -> None:
    old = (conf / "config.xml").read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_WRITER.format(pkg=str(PACKAGE_ROOT)), str(conf), point],
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr
    history = sorted((conf / "backup").glob("config-*.xml"))
    assert len(history) == 1
    new = history[0].read_bytes()
    root = ConfigStore(conf).load()
    after = (conf / "config.xml").read_bytes()
    assert after in (old, new)
    if point == "before-rewrite":
        assert after == old and root.findtext("counter") == "0"
    else:
        assert after == new and root.findtext("counter") == "42"
    assert not list((conf / "backup").glob(".tmp-*"))


# --- a concurrent OPNsense-style writer: flock on config.xml + in-place rewrite ---------------

PHP_STYLE_WRITER = textwrap.dedent(
    """
    import fcntl, re, sys, time
    path, rounds = sys.argv[1], int(sys.argv[2])
    for _ in range(rounds):
        with open(path, "r+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            data = fh.read()
            n = int(re.search(rb"<phpcount>(\\d+)</phpcount>", data).group(1))
            data = re.sub(rb"<phpcount>\\d+</phpcount>", b"<phpcount>%d</phpcount>" % (n + 1), data)
            time.sleep(0.001)
            fh.seek(0); fh.write(data); fh.truncate(); fh.flush()
    """
)


def test_interleaves_with_opnsense_style_writer_without_lost_updates(conf: Path) -> None:
    with_php_counter = BASE.replace(b"<counter>0</counter>", b"<counter>0</counter><phpcount>0</phpcount>")
    (conf / "config.xml").write_bytes(with_php_counter)
    store = ConfigStore(conf)
    rounds = 60
    writer = subprocess.Popen([sys.executable, "-c", PHP_STYLE_WRITER, str(conf / "config.xml"), str(rounds)])
    try:
        for _ in range(rounds):
            bump(store)
    finally:
        assert writer.wait(timeout=120) == 0
    root = store.load()
    assert root.findtext("counter") == str(rounds)
    assert root.findtext("phpcount") == str(rounds)


def test_reader_waits_for_writer_lock(conf: Path) -> None:
    store = ConfigStore(conf)
    with open(conf / "config.xml", "r+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        probe = subprocess.Popen(
            [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(PACKAGE_ROOT)!r});"
             " from hasync.config.store import ConfigStore;"
             "print('ready', flush=True);"
             f"print(ConfigStore({str(conf)!r}).load().findtext('counter'))"],
            stdout=subprocess.PIPE,
        )
        assert probe.stdout is not None
        assert probe.stdout.readline().strip() == b"ready"
        time.sleep(0.3)
        assert probe.poll() is None  # blocked on our exclusive lock
        fh.seek(0)
        fh.write(BASE.replace(b"<counter>0</counter>", b"<counter>7</counter>"))
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())
    out, _ = probe.communicate(timeout=30)
    assert out.strip() == b"7"
    assert etree.iselement(store.load())


def test_a_hung_lock_holder_gives_a_clear_error_in_bounded_time(conf: Path) -> None:
    store = ConfigStore(conf)
    store.lock_timeout = 0.5
    before = (conf / "config.xml").read_bytes()
    with open(conf / "config.xml", "r+b") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(ConfigError, match=r"locked by another process for more than 0\.5s"):
            store.load()
        with pytest.raises(ConfigError, match="locked by another process"), store.transaction("never"):
            pytest.fail("the transaction body must not run without the lock")
    assert (conf / "config.xml").read_bytes() == before
    assert not (conf / "backup").exists()
    bump(store)  # the lock is free again: works
    assert store.load().findtext("counter") == "1"


def test_stamped_past_tells_whether_a_later_write_gets_a_later_time(conf: Path) -> None:
    """After its own write, a writer asks whether the file system's clock has left that write's
    timestamp tick (`ConfigStore.stamped_past`, by creating a file beside config.xml)."""
    store = ConfigStore(conf)
    bump(store)
    mtime = store.config_path.stat().st_mtime_ns
    before = sorted(conf.iterdir())
    time.sleep(0.05)  # longer than any timestamp tick of a file system with sub-second times
    assert store.stamped_past(mtime)
    # control: a file system whose times cannot tell the two apart (here: every file's time is 0)
    assert not store.stamped_past(0, key=lambda path: (0, 0, 0, 0, 0))
    assert sorted(conf.iterdir()) == before  # the probe file is gone either way


def test_a_writer_sweeps_a_probe_file_a_crash_left(conf: Path) -> None:
    leftover = conf / ".tmp-config-abc.tick"
    leftover.write_bytes(b"")
    bump(ConfigStore(conf))
    assert not leftover.exists()
