"""Crash safety under load: 200 syncs into a real agent process that is SIGKILLed at random moments.

What "version" means here. Every write rewrites `<revision>` (time, user, description), so the
post-sync bytes cannot be computed by the test in advance. They do not need to be: the store
writes the exact bytes of the new config.xml to `backup/config-<time>.xml` *before* it touches
config.xml. So for each sync the test knows two byte strings:

* pre  = config.xml as read from disk right before the sync started (the agent is idle then);
* post = the history file that appeared during this sync (at most one may appear), which holds
  the bytes the merge produced.

After each kill and the agent's restart (the restart is the recovery: it loads config.xml and
restores from history when it does not parse), the test requires:

1. config.xml parses as it is on disk (the restart restored it if the kill left it torn);
2. sha256(config.xml) is sha256(pre) or sha256(post): never a mix, never a third state;
3. if the primary saw `restore_config_section` succeed, it is post (acknowledged means durable);
4. no temporary file is left in the conf dir or backup/;
5. every history file of every write that took effect (each acknowledged sync, each kill that
   left post) is still present with the same hash (backupcount is raised so pruning keeps all).

Kills are drawn from a seeded RNG in four modes, so they land across the whole request *and*
inside the short write window, which a uniformly random delay would almost never hit:
`none` (control: the sync must succeed), `anytime` (uniform over a sync's duration), `history`
(a few ms after the history temp file is created), `rewrite` (a few ms after the history file is
renamed into place, i.e. while config.xml is being rewritten). inotify tells the test when.
"""

from __future__ import annotations

import collections
import os
import random
import threading
import time
from pathlib import Path

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.core.errors import ConfigError
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire.client import ClientOptions
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair
from support.reliability import (
    IN_CREATE,
    IN_MOVED_TO,
    AgentProcess,
    DirWatch,
    history_files,
    leftovers,
    set_backupcount,
    set_user_password,
    sha256,
)

SEED = int(os.environ.get("OPNSENSE_HA_CRASH_SEED", "20260607"))
SYNCS = int(os.environ.get("OPNSENSE_HA_CRASH_SYNCS", "200"))
#: Size of an unsynced section on the backup so each write takes long enough to be hit by a kill.
BALLAST_RECORDS = 5000
MODES = ("none", "anytime", "history", "rewrite")
WEIGHTS = (4, 2, 3, 3)


def add_ballast(conf_dir: Path, records: int) -> None:
    """A large section no sync item covers: the merge keeps it, every write re-serialises it."""
    with ConfigStore(conf_dir).transaction("test: ballast") as root:
        section = etree.SubElement(root, "ballast")
        for n in range(records):
            item = etree.SubElement(section, "item")
            etree.SubElement(item, "id").text = str(n)
            etree.SubElement(item, "text").text = f"static record {n} " + "x" * 120


def change_primary(primary: Path, iteration: int, rng: random.Random) -> None:
    """New alias content and a description of random length (writes grow and shrink)."""
    with ConfigStore(primary).transaction(f"test: change {iteration}") as root:
        alias = root.find("OPNsense/Firewall/Alias/aliases/alias")
        assert alias is not None
        content, description = alias.find("content"), alias.find("description")
        assert content is not None and description is not None
        content.text = "\n".join(f"10.77.{iteration % 250}.{n}" for n in range(1 + rng.randrange(40)))
        description.text = f"iteration {iteration} " + "d" * rng.randrange(0, 60000)


class Killer(threading.Thread):
    """SIGKILLs the agent according to one mode; `fired` tells whether it did."""

    def __init__(self, agent: AgentProcess, mode: str, rng: random.Random, span: float, watch: DirWatch) -> None:
        super().__init__(daemon=True)
        self.pid = agent.pid
        self.mode = mode
        self.watch = watch
        self.delay = {
            "anytime": rng.uniform(0.0, span),
            "history": rng.uniform(0.0, 0.012),
            "rewrite": rng.uniform(0.0, 0.006),
        }.get(mode, 0.0)
        self.done = threading.Event()
        self.fired = False

    def run(self) -> None:
        if self.mode == "none":
            return
        if self.mode != "anytime":
            wanted = (IN_CREATE, ".tmp-config-") if self.mode == "history" else (IN_MOVED_TO, "config-")
            if not self._wait_for(*wanted):
                return
        if self.delay:
            time.sleep(self.delay)
        os.kill(self.pid, 9)
        self.fired = True

    def _wait_for(self, mask: int, prefix: str) -> bool:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for event_mask, name in self.watch.wait(0.05):
                if event_mask & mask and name.startswith(prefix):
                    return True
            if self.done.is_set():
                return False
        return False


def split_new(before: dict[str, str], after: dict[str, str], pre: bytes) -> tuple[list[str], list[str]]:
    """History files that appeared during one sync: (copies of pre, the merge's own).

    Before merging, the agent copies config.xml into history when its bytes are not the newest
    history file (so a sync can be rolled back); that copy holds exactly pre. Anything else new
    is what the merge wrote.
    """
    new = sorted(set(after) - set(before))
    pre_hash = sha256(pre)
    return [n for n in new if after[n] == pre_hash], [n for n in new if after[n] != pre_hash]


def sync(primary: Path) -> SyncResult:
    options = SyncOptions(client=ClientOptions(connect_timeout=5, total_timeout=30, retries=0))
    return SyncRun(ConfigStore(primary), SyncItemRegistry.load(), options).run()


def restore_acknowledged(result: SyncResult) -> bool:
    return any(step.step == "restore_config_section" and step.ok for step in result.steps)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_tears_config(tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    services = tmp_path / "services-none"  # no services: a killed agent leaves no orphan daemons
    services.mkdir()
    set_backupcount(pair.backup, 100000)
    # bcrypt cost 4 instead of 10 on both nodes (users sync): three logins per sync stay cheap
    for node in (pair.primary, pair.backup):
        set_user_password(node, SYNC_USER, SYNC_PASSWORD)
    add_ballast(pair.backup, BALLAST_RECORDS)
    agent = AgentProcess(pair.backup, tmp_path / "agent-state", services, tmp_path / "agent.log",
                         tls=(pair.cert_file, pair.key_file))
    agent.start()
    rng = random.Random(SEED)
    committed: dict[str, str] = {}  # history file -> hash, for every write that took effect
    outcomes: collections.Counter[str] = collections.Counter()
    span = 0.4
    durations: list[float] = []
    watch = DirWatch(pair.backup / "backup", IN_CREATE | IN_MOVED_TO)
    try:
        pair.point_primary_at(agent.url)
        for iteration in range(SYNCS):
            change_primary(pair.primary, iteration, rng)
            config = pair.backup / "config.xml"
            pre = config.read_bytes()
            before = history_files(pair.backup)
            mode = rng.choices(MODES, WEIGHTS)[0]
            watch.wait(0)  # drop events of the previous round
            killer = Killer(agent, mode, rng, span, watch)
            killer.start()
            started = time.monotonic()
            result = sync(pair.primary)
            elapsed = time.monotonic() - started
            killer.done.set()
            killer.join(timeout=35)
            assert not killer.is_alive()
            if not killer.fired:
                # the control: an undisturbed sync works and leaves exactly post behind
                assert result.status == "ok", f"iteration {iteration} ({mode}): {result.message}"
                after = history_files(pair.backup)
                preserved, written = split_new(before, after, pre)
                assert len(written) == 1, f"iteration {iteration}: expected one new history file, got {written}"
                post = after[written[0]]
                assert sha256(config.read_bytes()) == post
                committed.update({name: after[name] for name in (*preserved, *written)})
                durations.append(elapsed)
                span = max(0.05, sorted(durations)[len(durations) // 2])
                outcomes[f"{mode}: not killed"] += 1
            else:
                assert agent.process is not None
                agent.process.wait(timeout=10)
                agent.kill()
                torn = config.read_bytes()
                after = history_files(pair.backup)
                preserved, new = split_new(before, after, pre)
                assert len(new) <= 1, f"iteration {iteration}: one sync wrote {new}"
                post_hash = after[new[0]] if new else None
                committed.update({name: after[name] for name in preserved})
                try:
                    parse_config_bytes(torn, "config.xml")
                    torn_state = "parses"
                except ConfigError:
                    torn_state = "torn"
                agent.start()  # recovery: startup loads config.xml, restoring it when torn
                pair.point_primary_at(agent.url)
                assert leftovers(pair.backup) == [], f"iteration {iteration} ({mode}): temp files left"
                data = config.read_bytes()
                parse_config_bytes(data, "config.xml")  # loads as it is on disk
                state = {sha256(pre): "pre", post_hash: "post"}.get(sha256(data))
                if state is None:
                    debug = tmp_path / f"neither-{iteration}"
                    debug.mkdir()
                    (debug / "pre.xml").write_bytes(pre)
                    (debug / "torn.xml").write_bytes(torn)
                    (debug / "now.xml").write_bytes(data)
                    if new:
                        (debug / "post.xml").write_bytes((pair.backup / "backup" / new[0]).read_bytes())
                assert state is not None, (
                    f"iteration {iteration} ({mode}): config.xml is neither the pre-sync nor the post-sync "
                    f"version (was {torn_state} after the kill; bytes kept in {debug})"
                )
                if restore_acknowledged(result):
                    assert state == "post", f"iteration {iteration}: acknowledged merge was lost"
                if state == "post":
                    assert new
                    committed[new[0]] = after[new[0]]
                orphan = " +orphan history" if new and state == "pre" else ""
                outcomes[f"{mode}: killed, {torn_state} -> {state}{orphan}"] += 1
            now = history_files(pair.backup)
            lost = {name for name, digest in committed.items() if now.get(name) != digest}
            assert not lost, f"iteration {iteration}: history lost {sorted(lost)}"
    finally:
        watch.close()
        agent.stop()
    report = ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items()))
    print(f"\n{SYNCS} syncs, seed {SEED}, {agent.starts - 1} kills; {report}")
    assert sum(outcomes.values()) == SYNCS
    kills = agent.starts - 1
    assert kills >= SYNCS // 3, f"only {kills} kills: the test did not exercise crashes"
    # The kills must have hit the write itself, not only the idle parts of a request.
    assert any("post" in key or "orphan" in key or "torn" in key
               for key in outcomes if "killed" in key), report
    assert len(committed) <= 100000
