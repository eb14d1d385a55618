"""End to end over real sockets and TLS: primary client -> backup agent, no mocked transport."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hasync.agent.server import AgentServer
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import AuthError, HaError, TransportError
from hasync.core.osiface import SubprocessRunner
from hasync.services.backends import ServicesDirBackend
from hasync.sync.run import SyncOptions, SyncRun, trust_store
from hasync.sync.status import Remote
from hasync.wire import xmlrpc
from hasync.wire.client import ClientOptions, PeerClient, TrustStore, target_url
from support.nodes import ROOT_PASSWORD, SYNC_PASSWORD, SYNC_USER, Pair, make_pair, running_agent


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = make_pair(tmp_path)
    services = ServicesDirBackend(made.services_dir, SubprocessRunner())
    for service in services.list_services():
        if not service.get("nocheck"):
            services.start(service["name"], service.get("id", ""))
    yield made
    for service in services.list_services():
        if service.get("status") and not service.get("nocheck"):
            services.stop(service["name"], service.get("id", ""))


@pytest.fixture
def agent(pair: Pair) -> Iterator[AgentServer]:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        yield server


def sync(pair: Pair, **options: Any) -> Any:
    run = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(**options))
    return run.run()


def pids(pair: Pair) -> dict[str, int]:
    return {p.stem: int(p.read_text().strip()) for p in pair.services_dir.glob("*.pid")}


def test_sync_merges_into_backup(pair: Pair, agent: AgentServer) -> None:
    primary_root = ConfigStore(pair.primary).load()
    result = sync(pair)
    assert result.status == "ok", result.message
    root = ConfigStore(pair.backup).load()
    # rules replaced, in the primary's order
    assert [r.findtext("descr") for r in root.iterfind("filter/rule")] == [
        r.findtext("descr") for r in primary_root.iterfind("filter/rule")
    ]
    # CARP VIPs arrive with +100 skew; the backup's own ipalias VIP is kept
    vips = {v.findtext("vhid") or "": v for v in root.iterfind("virtualip/vip")}
    assert vips["1"].findtext("advskew") == "100" and vips["2"].findtext("advskew") == "100"
    assert vips[""].findtext("subnet") == "10.77.1.53"
    # nosync alias on the backup survives, the primary's aliases arrive
    names = [a.findtext("name") for a in root.iterfind("OPNsense/Firewall/Alias/aliases/alias")]
    assert names[0] == "fw_b_monitoring" and set(names[1:]) == {"web_servers", "admin_nets"}
    # hasync and interfaces of the backup are never touched
    assert root.findtext("hasync/synchronizetoip") == ""
    assert root.findtext("interfaces/lan/ipaddr") == "10.77.1.3"
    desc = root.findtext("revision/description")
    assert desc is not None and desc.startswith("Merged ") and desc.endswith(" config sections from XMLRPC client.")
    assert root.findtext("revision/username") == f"{SYNC_USER}@127.0.0.1"
    assert [s.step for s in result.steps][:4] == [
        "build payload", "firmware_version", "restore_config_section", "filter_configure"]


def test_sync_restart_services_uses_real_ids(pair: Pair, agent: AgentServer) -> None:
    before = pids(pair)
    result = sync(pair, restart_services=True)
    assert result.status == "ok", result.message
    listed = ServicesDirBackend(pair.services_dir, SubprocessRunner()).list_services()
    assert result.services_restarted == len(listed)
    restart_steps = [s for s in result.steps if s.step.startswith("restart ")]
    assert "restart openvpn[1]" in [s.step for s in restart_steps]
    openvpn = next(s for s in restart_steps if s.step == "restart openvpn[1]")
    assert "has been restarted" in openvpn.detail and "openvpn[1]" in openvpn.detail
    after = pids(pair)
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)


def remote(pair: Pair) -> Remote:
    return Remote(ConfigStore(pair.primary), SyncItemRegistry.load())


def test_version_has_my_version(pair: Pair, agent: AgentServer) -> None:
    (pair.primary / "version.json").write_text(json.dumps(
        {p: {"version": "26.7.3"} for p in ("base", "firmware", "kernel")}))
    (pair.backup / "version.json").write_text(json.dumps(
        {p: {"version": "26.7.2"} for p in ("base", "firmware", "kernel")}))
    document = remote(pair).version()
    assert document["response"]["firmware"] == {"version": "26.7.2", "_my_version": "26.7.3"}
    assert set(document["response"]) == {"base", "firmware", "kernel"}


def test_services_list_shape(pair: Pair, agent: AgentServer) -> None:
    listing = remote(pair).services()["response"]
    assert [s["name"] for s in listing] == sorted(s["name"] for s in listing)
    by_name = {s["name"]: s for s in listing}
    assert by_name["unbound"]["status"] is True
    assert by_name["openvpn"]["id"] == "1"
    assert by_name["configd"]["nocheck"] is True


@pytest.mark.parametrize("action", ["stop", "start", "restart"])
def test_service_actions(pair: Pair, agent: AgentServer, action: str) -> None:
    backend = ServicesDirBackend(pair.services_dir, SubprocessRunner())
    if action == "start":
        backend.stop("unbound", "")
    before = pids(pair).get("unbound")
    document = remote(pair).service_action(action, "unbound")
    assert document["status"] == "ok"
    assert "unbound" in document["response"]
    running = {s["name"]: s["status"] for s in backend.list_services()}["unbound"]
    assert running is (action != "stop")
    if action == "restart":
        assert pids(pair)["unbound"] != before
    # every action syncs first
    assert ConfigStore(pair.backup).load().findtext("revision/description", "").startswith("Merged ")


def test_unknown_service_message(pair: Pair, agent: AgentServer) -> None:
    document = remote(pair).service_action("restart", "nosuchd")
    assert document["response"] == "Could not find unknown service `nosuchd'"


def test_restart_all_counts(pair: Pair, agent: AgentServer) -> None:
    document = remote(pair).restart_all()
    listed = ServicesDirBackend(pair.services_dir, SubprocessRunner()).list_services()
    assert document == {"status": "ok", "count": len(listed)}


# --- authentication over the wire ------------------------------------------------------------


def raw_post(server: AgentServer, body: bytes, auth: str | None) -> bytes:
    url = f"https://127.0.0.1:{server.server_address[1]}/xmlrpc.php"
    client = PeerClient(url, "x", "y", ClientOptions(retries=0, total_timeout=20))
    conn = client._connect(time.monotonic() + 20)
    try:
        conn.putrequest("POST", "/xmlrpc.php", skip_accept_encoding=True)
        conn.putheader("Content-Length", str(len(body)))
        if auth is not None:
            conn.putheader("Authorization", auth)
        conn.endheaders()
        conn.send(body)
        return conn.getresponse().read()
    finally:
        conn.close()


def basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


PROBE = xmlrpc.dumps_request("opnsense.firmware_version", [])


def test_auth_failures_get_opnsense_exact_reply(pair: Pair, agent: AgentServer) -> None:
    assert raw_post(agent, PROBE, basic(SYNC_USER, "wrong")) == xmlrpc.AUTH_FAILED_RESPONSE
    assert raw_post(agent, PROBE, None) == xmlrpc.AUTH_FAILED_RESPONSE
    assert raw_post(agent, PROBE, basic("nobody", SYNC_PASSWORD)) == xmlrpc.AUTH_FAILED_RESPONSE
    ok = raw_post(agent, PROBE, basic(SYNC_USER, SYNC_PASSWORD))
    assert isinstance(xmlrpc.loads_response(ok), dict)
    # root has page-all through the admins group
    assert isinstance(xmlrpc.loads_response(raw_post(agent, PROBE, basic("root", ROOT_PASSWORD))), dict)


def test_api_key_over_the_wire(pair: Pair) -> None:
    """An API key works as the user name and its secret as the password (newer `KEY|HASH` form)."""
    from passlib.hash import sha512_crypt

    key, secret = "k" * 80, "the-api-secret-for-e2e"
    with ConfigStore(pair.backup).transaction("test: API key for the sync user") as root:
        user = next(u for u in root.iterfind("system/user") if u.findtext("name") == SYNC_USER)
        from lxml import etree

        etree.SubElement(user, "apikeys").text = f"{key}|{sha512_crypt.using(rounds=5000).hash(secret)}"
    with running_agent(pair) as server:
        reply = raw_post(server, PROBE, basic(key, secret))
        assert isinstance(xmlrpc.loads_response(reply), dict)
        assert raw_post(server, PROBE, basic(key, "wrong-secret")) == xmlrpc.AUTH_FAILED_RESPONSE
        # the revision of a merge done with the key names the key's owner
        body = xmlrpc.dumps_request("opnsense.restore_config_section", [{"nat": {"outbound": {"mode": "hybrid"}}}])
        assert xmlrpc.loads_response(raw_post(server, body, basic(key, secret))) is True
    assert ConfigStore(pair.backup).load().findtext("revision/username") == f"{SYNC_USER}@127.0.0.1"


def test_user_without_privilege_refused(pair: Pair) -> None:
    with ConfigStore(pair.backup).transaction("test: drop privilege") as root:
        group = next(g for g in root.iterfind("system/group") if g.findtext("name") == "hasync")
        priv = group.find("priv")
        assert priv is not None
        priv.text = "page-hasync-status"
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        result = sync(pair)
    assert result.status == "error"
    assert "Authentication failed" in result.message and "page-xmlrpclibrary" in result.message
    assert SYNC_USER in result.message


def test_loop_guard_on_by_default(pair: Pair) -> None:
    with running_agent(pair, allow_loopback=False) as server:
        assert raw_post(server, PROBE, basic(SYNC_USER, SYNC_PASSWORD)) == xmlrpc.AUTH_FAILED_RESPONSE


# --- client behaviour ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "protocol", "port", "expected"),
    [
        ("10.0.0.2", "https", "", "https://10.0.0.2/xmlrpc.php"),
        ("10.0.0.2", "http", "8080", "http://10.0.0.2:8080/xmlrpc.php"),
        ("fd00::2", "https", "4443", "https://[fd00::2]:4443/xmlrpc.php"),
        ("[fd00::2]", "https", "", "https://[fd00::2]/xmlrpc.php"),
        ("https://backup.example.test:4443", "http", "", "https://backup.example.test:4443/xmlrpc.php"),
        ("https://backup.example.test/ha/", "https", "", "https://backup.example.test/ha/xmlrpc.php"),
    ],
)
def test_target_url_forms(target: str, protocol: str, port: str, expected: str) -> None:
    assert target_url(target, protocol, port) == expected


def test_target_url_empty_is_an_error() -> None:
    with pytest.raises(HaError, match="synchronizetoip is empty"):
        target_url("", "https", "")


def test_tofu_pin_then_mismatch_then_reset(pair: Pair) -> None:
    with running_agent(pair) as server:
        port = server.server_address[1]
        pair.point_primary_at(f"https://127.0.0.1:{port}/")
        assert sync(pair).status == "ok"
    pins = trust_store(pair.primary)
    pinned = pins.get(f"127.0.0.1:{port}")
    assert pinned is not None and len(pinned.split(":")) == 32
    # same port, new certificate: refused until the pin is reset
    other = pair.ca.issue_cert("127.0.0.1")
    other.private_key_pem.write_to_path(str(pair.key_file))
    other.cert_chain_pems[0].write_to_path(str(pair.cert_file))
    with running_agent(pair, listen=f"127.0.0.1:{port}") as server:
        failed = sync(pair)
        assert failed.status == "error" and "certificate of 127.0.0.1" in failed.message
        assert "trust --reset" in failed.message
        assert pins.reset() == 1
        assert sync(pair).status == "ok"
    assert pins.get(f"127.0.0.1:{port}") not in (None, pinned)


def test_verifypeer_checks_the_chain(pair: Pair, agent: AgentServer, tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php"
    untrusted = PeerClient(url, SYNC_USER, SYNC_PASSWORD, ClientOptions(verify_peer=True, retries=0))
    with pytest.raises(TransportError, match="TLS handshake"):
        untrusted.call("opnsense.firmware_version")
    ca_file = tmp_path / "ca.pem"
    pair.ca.cert_pem.write_to_path(str(ca_file))
    trusted = PeerClient(url, SYNC_USER, SYNC_PASSWORD,
                         ClientOptions(verify_peer=True, ca_file=str(ca_file), retries=0))
    assert isinstance(trusted.call("opnsense.firmware_version"), dict)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_dead_backup_fails_within_timeout(pair: Pair) -> None:
    pair.point_primary_at(f"https://127.0.0.1:{closed_port()}/")
    started = time.monotonic()
    result = sync(pair, client=ClientOptions(connect_timeout=2, total_timeout=6, retries=2, backoff=0.2))
    elapsed = time.monotonic() - started
    assert result.status == "error"
    assert "remote host down" in result.message and "connection refused" in result.message
    assert "3 attempts" in result.message
    assert elapsed < 6 + 5  # the configured deadline plus process slack, never a hang


def test_stalled_backup_fails_at_deadline(pair: Pair) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_stall() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
                accepted.append(conn)  # never answers, not even the TLS handshake
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_stall, daemon=True)
    thread.start()
    try:
        pair.point_primary_at(f"https://127.0.0.1:{listener.getsockname()[1]}/")
        started = time.monotonic()
        result = sync(pair, client=ClientOptions(connect_timeout=1.5, total_timeout=3, retries=0))
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert result.status == "error"
    assert "timed out" in result.message or "did not answer" in result.message
    assert elapsed < 3 + 5


def test_version_skew(pair: Pair, agent: AgentServer) -> None:
    def versions(node: Path, version: str) -> None:
        document = {part: {"version": version} for part in ("base", "firmware", "kernel")}
        (node / "version.json").write_text(json.dumps(document))

    versions(pair.primary, "26.7.3")
    versions(pair.backup, "26.1.9")
    refused = sync(pair)
    assert refused.status == "error" and "Remote version differs" in refused.message
    assert "26.1.9" in refused.message and "--ignore-version" in refused.message
    assert [s.step for s in refused.steps] == ["build payload", "firmware_version"]
    assert sync(pair, ignore_version=True).status == "ok"
    versions(pair.backup, "26.7.1")
    patch = sync(pair)
    assert patch.status == "ok" and patch.warnings == ["backup runs 26.7.1, this node 26.7.3"]


def test_trust_store_file_is_json(tmp_path: Path) -> None:
    store = TrustStore(tmp_path / "t.json")
    store.pin("a:1", "AA")
    assert json.loads((tmp_path / "t.json").read_text()) == {"a:1": "AA"}


def test_auth_error_names_user_and_privilege(pair: Pair, agent: AgentServer) -> None:
    url = f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php"
    client = PeerClient(url, SYNC_USER, "not-the-password", ClientOptions(retries=0))
    with pytest.raises(AuthError) as info:
        client.call("opnsense.firmware_version")
    assert SYNC_USER in str(info.value) and "page-xmlrpclibrary" in str(info.value)
    assert "not-the-password" not in str(info.value)
