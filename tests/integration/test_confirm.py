"""Commit-confirmed sync (`sync --confirm SECONDS`): the backup rolls a sync back by itself unless
the primary confirms it in time, also across an agent SIGKILL; exactly one outcome when the
confirm and the deadline race.

Real processes: the agent is `opnsense-ha serve` over TLS, the primary `opnsense-ha sync`. A
fault proxy between them lets the merge through and then holds (the primary is then SIGKILLed)
or resets its reply (the link is cut). Windows are a few seconds; waits only bound from above.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.agent.server import CallContext
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.paths import state_dir
from hasync.node import confirm_state as confirmmod
from hasync.sync.run import Step, SyncOptions, SyncRun
from hasync.wire.client import ClientOptions, PeerClient
from hasync.wire.protocol import CONFIRM_HEADER
from support.agents import cli, env, start_agent, stop
from support.fakekernel import bare_backup_kernel, vhids
from support.faultproxy import FaultProxy
from support.health import agent as inprocess_agent
from support.health import backend
from support.lockout import REFUSALS, edit_primary
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair
from support.polling import wait_for

WINDOW = 3
BOUND = 60.0  # generous upper bound for anything that should happen "within the window plus a few seconds"
BIG = 30_000  # request bytes (TLS included) that only the bulked-up merge reaches


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return make_pair(tmp_path)


class Agent:
    """`opnsense-ha serve` as a real process that a test may SIGKILL and start again."""

    def __init__(self, pair: Pair, *extra: str) -> None:
        self.pair, self.extra = pair, extra
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.logs = ""

    def start(self, port: int | None = None) -> str:
        self.proc, self.url = start_agent(
            self.pair.backup, "--tls-cert", str(self.pair.cert_file), "--tls-key", str(self.pair.key_file),
            "--services-dir", str(self.pair.services_dir), "--state-dir", str(self.pair.state_dir), *self.extra,
            port=port)
        return self.url

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=20)
        self._collect()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            assert stop(self.proc) == 0
            self._collect()

    def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        self.logs += self.proc.stderr.read()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        self.proc = None


@pytest.fixture
def agent(pair: Pair) -> Iterator[Agent]:
    node = Agent(pair)
    node.start()
    pair.point_primary_at(node.url.removesuffix("xmlrpc.php"))
    try:
        yield node
    finally:
        node.stop()


def config(conf_dir: Path) -> bytes:
    return (conf_dir / "config.xml").read_bytes()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def confirm_state(pair: Pair) -> dict[str, Any]:
    return confirmmod.read_state(state_dir(pair.backup))


def wait_rolled_back(pair: Pair, pre: bytes, what: str) -> float:
    """Until config.xml is `pre` again *and* the outcome is recorded: the agent restores first and
    records second (a crash in between repeats the restore at the next start)."""
    started = time.monotonic()
    wait_for(lambda: config(pair.backup) == pre and confirm_state(pair)["armed"] is None, what, BOUND)
    return time.monotonic() - started


def bulk_up(pair: Pair) -> None:
    """Make the merge the one big request (random aliases do not compress), for the fault proxy."""
    def add(root: etree._Element) -> None:
        aliases = root.find("OPNsense/Firewall/Alias/aliases")
        assert aliases is not None
        for index in range(300):
            alias = etree.SubElement(aliases, "alias", uuid=f"00000000-0000-4000-8000-{index:012d}")
            etree.SubElement(alias, "enabled").text = "1"
            etree.SubElement(alias, "name").text = f"bulk{index}"
            etree.SubElement(alias, "type").text = "host"
            etree.SubElement(alias, "content").text = "10.9.0.1"
            etree.SubElement(alias, "description").text = secrets.token_hex(40)

    edit_primary(pair, add)


def add_rule(root: etree._Element) -> None:
    rules = root.find("filter")
    assert rules is not None
    etree.SubElement(etree.SubElement(rules, "rule"), "descr").text = secrets.token_hex(8)


def primary_sync(pair: Pair, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hasync", "--conf-dir", str(pair.primary), "sync", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


# --- confirmed, and the stock backup ------------------------------------------------------------------


def test_a_confirmed_sync_stays(pair: Pair, agent: Agent) -> None:
    pre = config(pair.backup)
    done = cli(pair.primary, "sync", "--confirm", str(WINDOW), "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 0, done.stderr
    assert result["status"] == "ok" and result["confirm"]["state"] == "confirmed"
    steps = [step["step"] for step in result["steps"]]
    assert steps.index("restore_config_section") < steps.index("confirm: check backup") < steps.index("hasync.confirm")
    post = config(pair.backup)
    assert post != pre
    time.sleep(WINDOW + 2)  # past the deadline: nothing happens to a confirmed sync
    assert config(pair.backup) == post
    state = confirm_state(pair)
    assert state["armed"] is None
    assert [(p["id"], p["state"]) for p in state["past"]] == [(result["confirm"]["id"], "confirmed")]


def test_confirm_refuses_clearly_on_a_stock_backup(pair: Pair) -> None:
    node = Agent(pair, "--no-extensions")
    node.start()
    try:
        pair.point_primary_at(node.url.removesuffix("xmlrpc.php"))
        pre = config(pair.backup)
        done = cli(pair.primary, "sync", "--confirm", str(WINDOW), "--json")
        result = json.loads(done.stdout)
        assert done.returncode == 1
        assert "--confirm refused" in result["message"] and "stock OPNsense backup cannot roll back" in \
            result["message"]
        assert config(pair.backup) == pre  # refused before anything was sent
        assert cli(pair.primary, "sync").returncode == 0  # without --confirm it syncs as OPNsense does
    finally:
        node.stop()


def test_the_setting_arms_cron_syncs_and_confirm_0_turns_it_off(pair: Pair, agent: Agent) -> None:
    def set_window(root: etree._Element) -> None:
        node = root
        for tag in confirmmod.SETTING_PATH.split("/"):
            found = node.find(tag)
            node = found if found is not None else etree.SubElement(node, tag)
        node.text = str(WINDOW)

    edit_primary(pair, set_window)
    result = json.loads(cli(pair.primary, "sync", "--json").stdout)
    assert result["confirm"]["state"] == "confirmed" and result["confirm"]["seconds"] == WINDOW
    edit_primary(pair, add_rule)
    result = json.loads(cli(pair.primary, "sync", "--confirm", "0", "--json").stdout)
    assert result["status"] == "ok" and result["confirm"] == {}


# --- not confirmed: the primary killed, the link cut, the agent killed ---------------------------------


@contextmanager
def merge_held(pair: Pair, agent: Agent, window: int) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A `sync --confirm` whose merge reaches the backup while a proxy holds the reply: the merge
    is armed and the primary blocked, so a test can kill it (or the agent) right after the merge.
    Yields the primary process and the armed state; the primary is SIGKILLed on the way out."""
    bulk_up(pair)
    pre = config(pair.backup)
    proxy = FaultProxy(agent.port, "stall_response", big=BIG)
    pair.point_primary_at(proxy.url)
    primary = primary_sync(pair, "--confirm", str(window), "--no-fast-path")
    try:
        wait_for(lambda: confirm_state(pair)["armed"] is not None and config(pair.backup) != pre, "merge armed", BOUND)
        yield primary, confirm_state(pair)["armed"]
    finally:
        primary.kill()
        finish(primary)
        proxy.close()
        pair.point_primary_at(agent.url.removesuffix("xmlrpc.php"))


def test_primary_killed_right_after_the_merge_is_rolled_back_byte_for_byte(pair: Pair, agent: Agent) -> None:
    pre = config(pair.backup)
    with merge_held(pair, agent, WINDOW) as (primary, armed):
        primary.kill()  # the primary dies with the merge's reply in flight: it never confirms
        took = wait_rolled_back(pair, pre, "rolled back")
    print(f"rolled back {took:.2f}s after the primary was killed (window {WINDOW}s)")
    assert took < WINDOW + BOUND
    state = confirm_state(pair)
    assert state["armed"] is None and [(p["id"], p["state"]) for p in state["past"]] == [(armed["id"], "rolled-back")]
    agent.stop()
    assert "was not confirmed by" in agent.logs and "restored the pre-sync config byte for byte" in agent.logs
    assert "filter reloaded: yes" in agent.logs  # reconfigured what the sync changed


def test_link_cut_after_the_merge_reports_unconfirmed_and_rolls_back(pair: Pair, agent: Agent) -> None:
    bulk_up(pair)
    pre = config(pair.backup)
    proxy = FaultProxy(agent.port, "reset_response", big=BIG)
    try:
        pair.point_primary_at(proxy.url)
        # a longer window: the second sync below must land while it is still armed
        code, out, err = finish(primary_sync(pair, "--confirm", str(4 * WINDOW), "--no-fast-path", "--json"))
    finally:
        proxy.close()
    result = json.loads(out)
    assert code == 5, err
    assert result["status"] == "unconfirmed" and result["confirm"]["state"] == "unconfirmed"
    assert result["message"].startswith("not confirmed: the backup will roll back at ")
    assert config(pair.backup) != pre  # merged, armed ...
    # ... and while armed, another sync is refused rather than lost in the rollback
    pair.point_primary_at(agent.url.removesuffix("xmlrpc.php"))
    edit_primary(pair, add_rule)
    again = json.loads(cli(pair.primary, "sync", "--json").stdout)
    assert again["status"] == "error" and "is awaiting confirmation until" in again["message"]
    wait_rolled_back(pair, pre, "rolled back")
    assert [p["state"] for p in confirm_state(pair)["past"]] == ["rolled-back"]


@pytest.mark.parametrize("restart", ["after the deadline", "before the deadline"])
def test_agent_sigkilled_while_armed_still_rolls_back(pair: Pair, agent: Agent, restart: str) -> None:
    pre = config(pair.backup)
    # restarting before the deadline needs room for the restart itself, even on a loaded machine
    window = WINDOW if restart == "after the deadline" else 5 * WINDOW
    with merge_held(pair, agent, window) as (_primary, armed):
        agent.kill()  # SIGKILL: no cleanup, the armed rollback only exists on disk
    assert confirm_state(pair)["armed"] == armed and config(pair.backup) != pre
    if restart == "after the deadline":
        wait_for(lambda: time.time() > float(armed["deadline"]) + 0.5, "deadline passed", BOUND)
        agent.start(agent.port)
        assert config(pair.backup) == pre  # carried out at start, before the agent listens
    else:
        agent.start(agent.port)
        assert config(pair.backup) != pre
        wait_rolled_back(pair, pre, "rolled back by the restarted agent")
    state = confirm_state(pair)
    assert state["armed"] is None and [(p["id"], p["state"]) for p in state["past"]] == [(armed["id"], "rolled-back")]


def test_lockout_allowed_under_confirm_heals_itself(pair: Pair, agent: Agent) -> None:
    """--allow-lockout --confirm: the check after the merge cannot log in, so it is not confirmed
    and the backup rolls back to the config that still lets the primary in."""
    change, _message = REFUSALS["group"]
    edit_primary(pair, change)
    pre = config(pair.backup)
    done = cli(pair.primary, "sync", "--allow-lockout", "--confirm", str(WINDOW), "--json")
    result = json.loads(done.stdout)
    assert done.returncode == 5, done.stderr
    assert "not confirmed: the backup will roll back at" in result["message"]
    assert "Authentication failed" in result["message"]
    wait_rolled_back(pair, pre, "rolled back")
    status = cli(pair.primary, "history", "--remote", "--json")
    assert status.returncode == 0, status.stderr  # the primary can log in again


# --- exactly one outcome when the confirm and the deadline race -----------------------------------------


def _arm_and_race(pair: Pair, peer: PeerClient, payload: dict[str, Any], window: int, jitter: float) -> None:
    pre = config(pair.backup)
    ident = secrets.token_urlsafe(9)
    peer.extra_headers[CONFIRM_HEADER] = f"{window} {ident}"
    try:
        assert peer.call("opnsense.restore_config_section", [payload]) is True
    finally:
        peer.extra_headers.clear()
    post = config(pair.backup)
    deadline = float(peer.call("hasync.confirm_state")["armed"]["deadline"])
    time.sleep(max(0.0, deadline - time.time() + jitter))
    reply = peer.call("hasync.confirm", [{"id": ident}])
    wait_for(lambda: confirm_state(pair)["armed"] is None, "settled", BOUND)
    outcomes = [p for p in confirm_state(pair)["past"] if p["id"] == ident]
    assert len(outcomes) == 1, outcomes
    assert reply["state"] == outcomes[0]["state"], (reply, outcomes)
    current = config(pair.backup)
    if reply["state"] == "confirmed":
        assert current == post
    else:
        assert reply["state"] == "rolled-back" and current == pre


def test_confirm_and_deadline_race_gives_exactly_one_outcome(pair: Pair, agent: Agent) -> None:
    runs = int(os.environ.get("HASYNC_RACE_RUNS", "16"))
    peer = PeerClient(agent.url, SYNC_USER, SYNC_PASSWORD, ClientOptions(retries=0, total_timeout=30))
    rng = random.Random(13)
    seen: dict[str, int] = {}
    for run in range(runs):
        payload = {"filter": {"rule": [{"descr": f"race {run}", "type": "pass", "interface": "lan"}]}}
        _arm_and_race(pair, peer, payload, 1, rng.uniform(-0.03, 0.03))
        state = confirm_state(pair)["past"][-1]["state"]
        seen[state] = seen.get(state, 0) + 1
    print(f"race outcomes over {runs} runs: {seen}")
    assert sum(seen.values()) == runs


def test_settle_is_exclusive_under_threads(pair: Pair) -> None:
    """In-process, many runs: the timer's settle and a confirm released together never both win."""
    from hasync.agent.serve import ServeOptions, build_server

    server = build_server(ServeOptions(conf_dir=pair.backup, listen="127.0.0.1:0", tls_cert=pair.cert_file,
                                       tls_key=pair.key_file, allow_loopback=True,
                                       services_dir=pair.services_dir, state_dir=pair.state_dir))
    try:
        merge = server.dispatcher.methods["opnsense.restore_config_section"]
        armed = server.dispatcher.methods["hasync.confirm"].__self__  # type: ignore[attr-defined]
        runs = int(os.environ.get("HASYNC_RACE_RUNS_THREADS", "200"))
        rng = random.Random(7)
        seen: dict[str, int] = {}
        for run in range(runs):
            pre = config(pair.backup)
            ident = f"run-{run:04d}-{secrets.token_hex(4)}"
            context = CallContext(SYNC_USER, "127.0.0.1", None, False, f"1 {ident}")
            merge({"filter": {"rule": [{"descr": f"threads {run}"}]}}, context)
            armed.stop()  # no timer: the two racers below are the only settlers
            post = config(pair.backup)
            # bring the deadline to a few milliseconds from now, so the racers straddle it
            state = confirm_state(pair)
            state["armed"]["deadline"] = time.time() + rng.uniform(0.0, 0.012)
            (state_dir(pair.backup) / confirmmod.STATE_FILE).write_text(json.dumps(state))
            barrier = threading.Barrier(2)
            replies: dict[str, dict[str, Any]] = {}

            def racer(confirm_id: str | None, barrier: threading.Barrier = barrier,
                      replies: dict[str, dict[str, Any]] = replies) -> None:
                barrier.wait()
                replies["confirm" if confirm_id else "deadline"] = armed.settle(confirm_id)

            threads = [threading.Thread(target=racer, args=(ident,)), threading.Thread(target=racer, args=(None,))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=30)
            outcomes = [p for p in confirm_state(pair)["past"] if p["id"] == ident]
            if not outcomes:  # both ran before the deadline: the timer's early settle left it armed
                replies["confirm"] = armed.settle(ident)
                outcomes = [p for p in confirm_state(pair)["past"] if p["id"] == ident]
            assert len(outcomes) == 1
            assert config(pair.backup) == (post if outcomes[0]["state"] == "confirmed" else pre)
            assert replies["confirm"]["state"] == outcomes[0]["state"]  # the primary is told what happened
            seen[outcomes[0]["state"]] = seen.get(outcomes[0]["state"], 0) + 1
        print(f"in-process race outcomes over {runs} runs: {seen}")
        assert len(seen) == 2  # both sides won sometimes: the race was real
    finally:
        server.server_close()


# --- status, history and check show it ------------------------------------------------------------------


def check_confirm(conf_dir: Path) -> dict[str, Any]:
    done = cli(conf_dir, "check", "--only", "confirm", "--json", "--no-syslog")
    document = json.loads(done.stdout)
    [result] = document["checks"]
    return result


def test_status_history_and_check_show_armed_and_rolled_back(pair: Pair, agent: Agent) -> None:
    assert check_confirm(pair.primary)["status"] == "OK"
    pre = config(pair.backup)
    with merge_held(pair, agent, 4 * WINDOW) as (_primary, armed):  # long enough to look at it while armed
        status = json.loads(cli(pair.primary, "status", "--json").stdout)  # small requests pass the proxy
        assert status["confirm"]["armed"]["state"] == "armed"
        assert status["confirm"]["armed"]["deadline_iso"] == confirmmod.iso(armed["deadline"])
        text = cli(pair.primary, "history", "--remote").stdout
        deadline = confirmmod.iso(armed["deadline"])
        assert f"commit-confirmed: ARMED, sync from hasync@127.0.0.1 rolls back at {deadline}" in text
        assert check_confirm(pair.primary)["status"] == "OK"  # armed and not overdue: nothing wrong yet
    wait_rolled_back(pair, pre, "rolled back")
    on_primary, on_backup = check_confirm(pair.primary), check_confirm(pair.backup)
    for result in (on_primary, on_backup):
        assert result["status"] == "WARNING", result
        assert "was not confirmed by" in result["message"] and "was rolled back" in result["message"]
    text = cli(pair.primary, "history", "--remote").stdout
    assert "commit-confirmed: sync from hasync@127.0.0.1 at" in text and "ROLLED-BACK" in text
    local = json.loads(cli(pair.backup, "history", "--json").stdout)
    assert [p["state"] for p in local["confirm"]["past"]] == ["rolled-back"]
    # the next good sync clears the warning
    assert cli(pair.primary, "sync").returncode == 0
    assert check_confirm(pair.primary)["status"] == "OK"
    assert check_confirm(pair.backup)["status"] == "OK"


def test_a_damaged_pre_sync_copy_never_keeps_the_agent_down(pair: Pair) -> None:
    """The copy to restore does not match its recorded hash: no rollback (it would restore the wrong
    bytes), the agent still starts, and `check` on the backup says the rollback is overdue."""
    directory = state_dir(pair.backup)
    directory.mkdir(parents=True)
    (directory / confirmmod.BEFORE_FILE).write_bytes(b"<opnsense>not the pre-sync config</opnsense>")
    deadline = time.time() - 120
    (directory / confirmmod.STATE_FILE).write_text(json.dumps({"armed": {
        "id": "damaged-copy", "state": "armed", "armed_at": deadline - 5, "deadline": deadline, "seconds": 5,
        "who": "hasync@127.0.0.1", "before_sha256": "0" * 64}, "past": []}))
    current = config(pair.backup)
    node = Agent(pair)
    node.start()
    try:
        assert config(pair.backup) == current
        result = check_confirm(pair.backup)
        assert result["status"] == "WARNING" and "was due to roll back at" in result["message"]
    finally:
        node.stop()
    assert "the armed rollback failed" in node.logs and "hash mismatch" in node.logs


class PrimaryDied(Exception):
    """Raised from the primary's progress callback: the primary stops right after the merge."""


def test_rollback_takes_down_the_carp_vips_the_sync_brought_up(pair: Pair) -> None:
    """Reconfiguration through the real FreeBSD backend over the fake kernel (as test_rollback):
    the unconfirmed sync's CARP VIPs go away again with the rollback."""
    def die_after_merge(step: Step) -> None:
        if step.step == "restore_config_section":
            raise PrimaryDied

    pre = config(pair.backup)
    kernel = bare_backup_kernel()
    with inprocess_agent(pair, backend(pair.backup, kernel)):
        run = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(confirm=2),
                      progress=die_after_merge)
        with pytest.raises(PrimaryDied):
            run.run()
        assert vhids(kernel) == {"eth0": [2], "eth1": [1]}  # the merge brought the CARP VIPs up
        wait_rolled_back(pair, pre, "rolled back")
        wait_for(lambda: vhids(kernel) == {}, "VIPs taken down", BOUND)  # reconfiguration follows the restore
    assert [p["state"] for p in confirm_state(pair)["past"]] == ["rolled-back"]
