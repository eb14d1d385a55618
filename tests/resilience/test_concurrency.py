"""Concurrent writers: our merges interleave with an OPNsense-style writer and with a second sync.

The OPNsense-style writer is a separate process that does what PHP's `Config::save()` does and
nothing of ours: `flock(LOCK_EX)` on config.xml itself, read, modify, then rewrite the same inode
in place (truncate, write, fsync) and copy the result into `backup/config-<time>.xml`. It keeps
a counter in config.xml and checks on every read that it finds the value it wrote last: any
writer that read before it wrote and wrote after it (a lost update) makes the counter go back.

Lost updates of the syncs are caught the same way from the other side: every history file is a
snapshot taken under the lock, so along history (ordered by time) the writer's counter and the
iteration markers of both syncs may only grow. A stale read-modify-write anywhere shows up as a
step back. The control runs the same detector against a writer that skips the lock.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import TransportError
from hasync.payload.build import payload_for_items
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire.client import ClientOptions, PeerClient
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair
from support.reliability import HISTORY_RE, AgentProcess, set_backupcount, set_user_password

#: An OPNsense-style writer (PHP Config::save semantics), standard library only.
WRITER = r'''
import fcntl, json, os, random, re, sys, time
path, count, seed, hold, lock = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
backup = os.path.join(os.path.dirname(path), "backup")
rng = random.Random(seed)
pattern = re.compile(rb"<writercount>(\d+)</writercount>")
lost, last = [], None
for iteration in range(count):
    with open(path, "r+b") as fp:
        if lock == "lock":
            fcntl.flock(fp, fcntl.LOCK_EX)
        data = fp.read()
        match = pattern.search(data)
        if match is None:  # torn by a writer that does not lock
            lost.append({"iteration": iteration, "torn": len(data)})
            continue
        value = int(match.group(1))
        if last is not None and value != last:
            lost.append({"iteration": iteration, "wrote": last, "found": value})
        time.sleep(rng.uniform(0, hold))  # PHP works while it holds the lock
        value += 1
        data = data[:match.start(1)] + str(value).encode() + data[match.end(1):]
        fp.seek(0)
        fp.truncate()
        fp.write(data)
        fp.flush()
        os.fsync(fp.fileno())
        stamp = time.time()
        while os.path.exists(os.path.join(backup, "config-%.4f.xml" % stamp)):
            stamp += 0.0001
        temp = os.path.join(backup, "writer-%d.partial" % os.getpid())
        with open(temp, "wb") as out:
            out.write(data)
        os.rename(temp, os.path.join(backup, "config-%.4f.xml" % stamp))
        last = value
    time.sleep(rng.uniform(0, hold))
print(json.dumps({"writes": count, "lost": lost, "final": last}))
'''

WRITES = 120
SYNCS_EACH = 12
BOUND = 120.0  # seconds: anything slower counts as a deadlock


def start_writer(tmp_path: Path, config: Path, count: int, hold: float, lock: bool = True) -> subprocess.Popen[str]:
    script = tmp_path / "opnsense_writer.py"
    script.write_text(WRITER)
    return subprocess.Popen(
        [sys.executable, str(script), str(config), str(count), "7", str(hold), "lock" if lock else "nolock"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def writer_result(process: subprocess.Popen[str], timeout: float = BOUND) -> dict[str, object]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise AssertionError(f"the OPNsense-style writer did not finish in {timeout}s: deadlock") from None
    assert process.returncode == 0, err
    result: dict[str, object] = json.loads(out)
    return result


def add_counter(conf_dir: Path) -> None:
    with ConfigStore(conf_dir).transaction("test: writer counter") as root:
        etree.SubElement(root, "writercount").text = "0"


def mark(primary: Path, who: str, iteration: int) -> None:
    """Put `<who>-<iteration>` into the primary's section that this syncer owns."""
    with ConfigStore(primary).transaction(f"test: {who} {iteration}") as root:
        if who == "A":
            node = root.find("OPNsense/Firewall/Alias/aliases/alias/description")
        else:
            node = root.find("filter/rule/descr")
        assert node is not None
        node.text = f"marker {who}-{iteration}"


def sync(primary: Path, items: list[str], timeout: float = 30.0) -> SyncResult:
    options = SyncOptions(items=items, client=ClientOptions(connect_timeout=5, total_timeout=timeout, retries=0))
    return SyncRun(ConfigStore(primary), SyncItemRegistry.load(), options).run()


def history_sequence(conf_dir: Path) -> list[tuple[str, tuple[int, int, int]]]:
    """(file, writer counter, last A marker, last B marker) for every history file, oldest first."""
    rows = []
    files = [p for p in (conf_dir / "backup").iterdir() if HISTORY_RE.match(p.name)]
    for path in sorted(files, key=lambda p: float(p.name[7:-4])):
        data = path.read_text()
        counter = re.search(r"<writercount>(\d+)</writercount>", data)
        a = re.search(r"marker A-(\d+)", data)
        b = re.search(r"marker B-(\d+)", data)
        rows.append((path.name, (int(counter.group(1)) if counter else -1,
                                 int(a.group(1)) if a else -1, int(b.group(1)) if b else -1)))
    return rows


def regressions(rows: list[tuple[str, tuple[int, int, int]]]) -> list[str]:
    found = []
    for (old_name, old), (new_name, new) in itertools.pairwise(rows):
        for column, label in enumerate(("writer counter", "sync A", "sync B")):
            if new[column] < old[column]:
                found.append(f"{label} went back from {old[column]} ({old_name}) to {new[column]} ({new_name})")
    return found


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Pair, Path, AgentProcess]]:
    pair = make_pair(tmp_path)
    for node in (pair.primary, pair.backup):
        set_user_password(node, SYNC_USER, SYNC_PASSWORD)
    set_backupcount(pair.backup, 100000)
    add_counter(pair.backup)
    second = tmp_path / "primary-b"
    shutil.copytree(pair.primary, second)
    services = tmp_path / "services-none"
    services.mkdir()
    agent = AgentProcess(pair.backup, tmp_path / "agent-state", services, tmp_path / "agent.log",
                         tls=(pair.cert_file, pair.key_file)).start()
    try:
        for primary in (pair.primary, second):
            with ConfigStore(primary).transaction("test: target") as root:
                target = root.find("hasync/synchronizetoip")
                assert target is not None
                target.text = agent.url
        yield pair, second, agent
    finally:
        agent.stop()


@pytest.mark.slow
def test_two_syncs_and_an_opnsense_writer_lose_nothing(setup: tuple[Pair, Path, AgentProcess], tmp_path: Path) -> None:
    pair, second, agent = setup
    results: dict[str, list[tuple[int, SyncResult]]] = {"A": [], "B": []}
    started = time.monotonic()
    try:
        writer = start_writer(tmp_path, pair.backup / "config.xml", WRITES, hold=0.004)

        def syncer(who: str, primary: Path, items: list[str]) -> None:
            rng = random.Random(who)
            for iteration in range(SYNCS_EACH):
                mark(primary, who, iteration)
                results[who].append((iteration, sync(primary, items)))
                time.sleep(rng.uniform(0, 0.05))

        threads = [threading.Thread(target=syncer, args=("A", pair.primary, ["aliases"]), daemon=True),
                   threading.Thread(target=syncer, args=("B", second, ["rules"]), daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=BOUND)
            assert not thread.is_alive(), f"a sync did not finish within {BOUND}s: deadlock"
        outcome = writer_result(writer)
    finally:
        agent.stop()
    elapsed = time.monotonic() - started
    assert outcome["lost"] == [], f"the OPNsense-style writer lost updates: {outcome['lost']}"
    for who, runs in results.items():
        failed = [(i, r.message) for i, r in runs if r.status != "ok"]
        assert not failed, f"sync {who} failed: {failed}"
    final = (pair.backup / "config.xml").read_text()
    assert f"<writercount>{WRITES}</writercount>" in final
    assert f"marker A-{SYNCS_EACH - 1}<" in final and f"marker B-{SYNCS_EACH - 1}<" in final
    rows = history_sequence(pair.backup)
    assert regressions(rows) == []
    # every acknowledged sync is somewhere in history: none was overwritten before it landed
    for who, column in (("A", 1), ("B", 2)):
        seen = {values[column] for _name, values in rows}
        assert set(range(SYNCS_EACH)) <= seen, f"sync {who} iterations missing from history"
    # interleaving really happened: writer snapshots sit between sync snapshots
    counters = [values[0] for _name, values in rows]
    assert len(set(counters)) > SYNCS_EACH, "the writer and the syncs did not interleave"
    print(f"\n{WRITES} writer updates, 2x{SYNCS_EACH} syncs, {len(rows)} history files, {elapsed:.1f}s")


def test_detector_catches_a_writer_that_skips_the_lock(tmp_path: Path) -> None:
    """Control: the same checks flag lost updates when one writer does not take the flock."""
    conf = tmp_path / "conf"
    (conf / "backup").mkdir(parents=True)
    (conf / "config.xml").write_text('<?xml version="1.0"?>\n<opnsense>\n  <writercount>0</writercount>\n</opnsense>\n')
    writer = start_writer(tmp_path, conf / "config.xml", 60, hold=0.003)
    deadline = time.monotonic() + 30
    while writer.poll() is None and time.monotonic() < deadline:
        data = (conf / "config.xml").read_bytes()  # no lock: a naive read-modify-write
        match = re.search(rb"<writercount>(\d+)</writercount>", data)
        if match:
            time.sleep(0.004)
            stale = data[:match.start(1)] + b"0" + data[match.end(1):]
            with open(conf / "config.xml", "r+b") as handle:
                handle.seek(0)
                handle.truncate()
                handle.write(stale)
        time.sleep(0.002)
    outcome = writer_result(writer, timeout=30)
    assert outcome["lost"], "the detector missed updates lost to an unlocked writer"


def test_lock_held_past_the_client_deadline(setup: tuple[Pair, Path, AgentProcess], tmp_path: Path) -> None:
    """A PHP process sits on the lock longer than the primary waits: the sync fails in time, names
    the cause, the agent's waiting merge then completes whole, and the next sync works."""
    pair, _second, agent = setup
    config = pair.backup / "config.xml"
    try:
        holder = subprocess.Popen(
            [sys.executable, "-c",
             "import fcntl,sys,time\nf=open(sys.argv[1],'r+b')\nfcntl.flock(f,fcntl.LOCK_EX)\n"
             "print('locked',flush=True)\ntime.sleep(float(sys.argv[2]))", str(config), "4"],
            stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        pre = config.read_bytes()
        mark(pair.primary, "A", 100)
        payload = payload_for_items(ConfigStore(pair.primary).load(), SyncItemRegistry.load(), ["aliases"])
        client = PeerClient(agent.url + "xmlrpc.php", SYNC_USER, SYNC_PASSWORD,
                            ClientOptions(connect_timeout=2, total_timeout=1.5, retries=0))
        started = time.monotonic()
        with pytest.raises(TransportError, match=r"did not answer opnsense.restore_config_section within 1.5s"):
            client.call("opnsense.restore_config_section", [payload])
        assert time.monotonic() - started < 1.5 + 2.0
        assert config.read_bytes() == pre  # nothing written while the other writer holds the lock
        holder.wait(timeout=10)
        # the agent's thread was waiting on the lock; it now merges the whole payload or nothing
        deadline = time.monotonic() + 20
        while b"marker A-100<" not in config.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
        data = config.read_bytes()
        assert b"marker A-100<" in data, "the waiting merge never completed"
        newest = max((p for p in (pair.backup / "backup").iterdir() if HISTORY_RE.match(p.name)),
                     key=lambda p: float(p.name[7:-4]))
        assert newest.read_bytes() == data
        mark(pair.primary, "A", 101)
        result = sync(pair.primary, ["aliases"])
        assert result.status == "ok", result.message
        assert b"marker A-101<" in config.read_bytes()
    finally:
        agent.stop()
