"""Network faults between primary and backup, injected by a TCP proxy on loopback (faultproxy.py).

For each fault the sync must fail within the configured deadline (plus a little process slack)
with a message that names the cause, and the backup's config.xml must be either unchanged (the
exact pre-sync bytes) or fully applied, never partial. "Fully applied" is checked against a
reference: the same primary state synced without any fault into an untouched copy of the
backup; the two configs must be equal apart from `<revision>` (time and user differ). After
each fault a direct sync must work (the agent recovered).

The primary carries ~300 KB of incompressible alias text so the merge request is by far the
largest one; the proxy picks it by its size, whatever calls the client makes around it.
"""

from __future__ import annotations

import base64
import dataclasses
import random
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire.client import ClientOptions
from support.faultproxy import FaultProxy
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair, running_agent
from support.reliability import HISTORY_RE, set_user_password

CONNECT_TIMEOUT = 2.0
TOTAL_TIMEOUT = 4.0
SLACK = 3.0  # process and thread scheduling on a loaded 2-core CI machine


def canonical(data: bytes) -> bytes:
    """config.xml without <revision>, in canonical form: what a merge decides."""
    root = parse_config_bytes(data, "config.xml")
    for revision in root.findall("revision"):
        root.remove(revision)
    return etree.tostring(root, method="c14n")


def make_big(primary: Path) -> None:
    rng = random.Random(5)
    with ConfigStore(primary).transaction("test: big incompressible aliases") as root:
        aliases = root.find("OPNsense/Firewall/Alias/aliases")
        assert aliases is not None
        for alias in aliases.findall("alias"):
            description = alias.find("description")
            assert description is not None
            description.text = base64.b64encode(rng.randbytes(110_000)).decode()


def point(primary: Path, url: str) -> None:
    with ConfigStore(primary).transaction("test: sync target") as root:
        node = root.find("hasync/synchronizetoip")
        assert node is not None
        node.text = url


def sync(primary: Path, retries: int = 0) -> SyncResult:
    options = SyncOptions(client=ClientOptions(connect_timeout=CONNECT_TIMEOUT, total_timeout=TOTAL_TIMEOUT,
                                               retries=retries, backoff=0.2))
    return SyncRun(ConfigStore(primary), SyncItemRegistry.load(), options).run()


@dataclass
class Env:
    pair: Pair
    agent_port: int
    pre: bytes
    reference: bytes  # canonical config after a clean sync of the same primary state
    scheme: str


@pytest.fixture(params=["tls", "plain"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    pair = make_pair(tmp_path)
    for node in (pair.primary, pair.backup):
        set_user_password(node, SYNC_USER, SYNC_PASSWORD)
    services = tmp_path / "services-none"
    services.mkdir()
    make_big(pair.primary)
    plain = request.param == "plain"
    overrides: dict[str, object] = {"services_dir": services}
    if plain:
        overrides.update(plain_http=True, tls_cert=None, tls_key=None)
    scheme = "http" if plain else "https"
    reference_dir = tmp_path / "reference-backup"
    shutil.copytree(pair.backup, reference_dir)
    reference_pair = dataclasses.replace(pair, backup=reference_dir, state_dir=tmp_path / "reference-state")
    with running_agent(reference_pair, **overrides) as reference_agent:
        point(pair.primary, f"{scheme}://127.0.0.1:{reference_agent.server_address[1]}/")
        clean = sync(pair.primary)
        assert clean.status == "ok", clean.message
    reference = canonical((reference_dir / "config.xml").read_bytes())
    with running_agent(pair, **overrides) as agent:
        yield Env(pair, int(agent.server_address[1]), (pair.backup / "config.xml").read_bytes(), reference, scheme)


def outcome(env: Env) -> str:
    """'unchanged' or 'applied'; fails on anything else (a partial merge)."""
    data = (env.pair.backup / "config.xml").read_bytes()
    if data == env.pre:
        return "unchanged"
    assert canonical(data) == env.reference, "the backup's config is neither the old one nor the full merge"
    history = [p for p in (env.pair.backup / "backup").iterdir() if HISTORY_RE.match(p.name)]
    newest = max(history, key=lambda p: float(p.name[7:-4]))
    assert newest.read_bytes() == data
    return "applied"


def settle(env: Env, expected: str, timeout: float = 10.0) -> str:
    """The agent may still be finishing a merge whose reply the client never saw: wait for it."""
    deadline = time.monotonic() + timeout
    state = outcome(env)
    while state != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        state = outcome(env)
    return state


def recovered(env: Env, scheme: str) -> None:
    point(env.pair.primary, f"{scheme}://127.0.0.1:{env.agent_port}/")
    result = sync(env.pair.primary)
    assert result.status == "ok", f"the sync after the fault failed: {result.message}"
    assert outcome(env) == "applied"


CASES = {
    # mode: (what the message must name, the backup's state afterwards, the fault the proxy must log)
    "down": (r"remote host down\? .*connection refused", "unchanged", None),
    "stall": (r"timed out|did not (answer|complete)", "unchanged", "stalled after accept"),
    "reset_request": (r"reset", "unchanged", "reset after"),
    "reset_response": (r"reset|broke", "applied", "reset_response after"),
    "stall_response": (r"did not answer .* within 4s \(peer stalled or too slow\)", "applied", "stall_response after"),
    "trickle": (r"within 4s|timed out", "unchanged", None),
    # TLS: the handshake is what trickles, bounded by the connect timeout ("timed out")
    "trickle_reply": (r"within 4s \(peer stalled or too slow\)|remote host down\? .*timed out", "unchanged", None),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_sync_through_a_faulty_network(env: Env, mode: str) -> None:
    pattern, expected, event = CASES[mode]
    scheme = env.scheme
    proxy = FaultProxy(env.agent_port, "pass" if mode == "down" else mode)
    try:
        if mode == "down":
            proxy.down()
        point(env.pair.primary, f"{scheme}://127.0.0.1:{proxy.port}/")
        started = time.monotonic()
        result = sync(env.pair.primary, retries=2 if mode == "down" else 0)
        elapsed = time.monotonic() - started
    finally:
        proxy.close()
    assert result.status == "error", f"{mode}: the sync succeeded through the fault"
    assert re.search(pattern, result.message), f"{mode}: message does not name the cause: {result.message}"
    assert elapsed < TOTAL_TIMEOUT + SLACK, f"{mode}: took {elapsed:.1f}s with a {TOTAL_TIMEOUT}s deadline"
    if event is not None:
        assert any(e.startswith(event) for e in proxy.events), f"{mode}: the fault was never applied {proxy.events}"
    assert settle(env, expected) == expected
    recovered(env, scheme)


def test_slow_but_in_time_reply_is_not_a_failure(env: Env) -> None:
    """A backup that needs longer than the connect timeout to answer the merge (a long filter
    reload does that) but stays within the total deadline: the sync must succeed."""
    proxy = FaultProxy(env.agent_port, "delay_reply", delay=CONNECT_TIMEOUT + 1.0)
    try:
        point(env.pair.primary, f"{env.scheme}://127.0.0.1:{proxy.port}/")
        result = sync(env.pair.primary)
    finally:
        proxy.close()
    assert any(e.startswith("delay_reply") for e in proxy.events)
    assert result.status == "ok", result.message
    assert outcome(env) == "applied"


def test_control_the_proxy_relays_cleanly(env: Env) -> None:
    """Control: in pass mode the same sync through the proxy succeeds and applies everything."""
    scheme = env.scheme
    proxy = FaultProxy(env.agent_port, "pass")
    try:
        point(env.pair.primary, f"{scheme}://127.0.0.1:{proxy.port}/")
        result = sync(env.pair.primary)
    finally:
        proxy.close()
    assert result.status == "ok", result.message
    assert proxy.connections >= 2 and not proxy.events
    assert outcome(env) == "applied"
