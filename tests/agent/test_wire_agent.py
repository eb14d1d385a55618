"""Wire compatibility with OPNsense's PHP peers, using bytes the real IXR library produced.

Skips cleanly when ../shared is absent (a user's clone).
"""

from __future__ import annotations

import base64
import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from hasync.agent.server import AgentServer
from hasync.config.store import ConfigStore
from hasync.core.errors import AuthError, RemoteFault
from hasync.core.osiface import SubprocessRunner
from hasync.services.backends import ServicesDirBackend
from hasync.wire import xmlrpc
from hasync.wire.client import ClientOptions, PeerClient
from hasync.wire.protocol import ALLOW_LOCKOUT_HEADER
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair, running_agent
from support.paths import SHARED

WIRE = SHARED / "fixtures" / "wire"

# request fixture -> response fixture of the same method
PAIRS = [
    ("request-firmware_version.xml", "response-firmware_version.xml"),
    ("request-list_services.xml", "response-list_services.xml"),
    ("request-restart_service.xml", "response-restart_service.xml"),
    ("request-restore_config_section-sample.xml", "response-restore_config_section.xml"),  # last: replaces users
]


def wire(name: str) -> bytes:
    path = WIRE / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared not available)")
    return path.read_bytes()


def shape(value: Any) -> Any:
    """The XML-RPC type structure of a decoded value (what must match, not the example data)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, list):
        return ["list", *sorted({repr(shape(item)) for item in value})[:1]]
    return type(value).__name__


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    made = make_pair(tmp_path)
    backend = ServicesDirBackend(made.services_dir, SubprocessRunner())
    backend.start("openvpn", "1")
    yield made
    for service in backend.list_services():
        if service.get("status") and not service.get("nocheck"):
            backend.stop(service["name"], service.get("id", ""))


def post(server: AgentServer, body: bytes, user: str = SYNC_USER, password: str = SYNC_PASSWORD,
         extra: dict[str, str] | None = None) -> bytes:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", server.server_address[1], context=context, timeout=30)
    try:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        conn.request("POST", "/xmlrpc.php", body=body,
                     headers={"Authorization": f"Basic {auth}", "Content-Type": "text/xml", "User-Agent": "XML_RPC",
                              **(extra or {})})
        response = conn.getresponse()
        assert response.status == 200
        return response.read()
    finally:
        conn.close()


def test_agent_answers_php_requests_with_php_shapes(pair: Pair) -> None:
    with running_agent(pair) as server:
        for request_name, response_name in PAIRS:
            extra = {}
            if "restore_config_section" in request_name:
                # PHP's sample replaces the users with root alone: as sent by a stock primary, the
                # lock-out guard refuses it (the sync user 'hasync' would be gone) and writes nothing
                before = (pair.backup / "config.xml").read_bytes()
                with pytest.raises(xmlrpc.Fault, match="user 'hasync' would no longer exist; the primary would"):
                    xmlrpc.loads_response(post(server, wire(request_name)))
                assert (pair.backup / "config.xml").read_bytes() == before
                extra = {ALLOW_LOCKOUT_HEADER: "1"}  # as `sync --allow-lockout` sends it
            ours = xmlrpc.loads_response(post(server, wire(request_name), extra=extra))
            theirs = xmlrpc.loads_response(wire(response_name))
            if request_name == "request-list_services.xml":
                assert isinstance(ours, list) and ours
                reference = {k: shape(v) for record in theirs for k, v in record.items()}
                for record in ours:
                    assert {"name", "description", "status"} <= set(record)
                    for key, value in record.items():
                        if key in reference:
                            assert shape(value) == reference[key], key
            else:
                assert shape(ours) == shape(theirs), request_name
            if request_name == "request-restart_service.xml":
                # the same service and id as the PHP sample: the same text, byte for byte on the wire
                assert ours == theirs
    root = ConfigStore(pair.backup).load()
    assert [u.findtext("name") for u in root.iterfind("system/user")] == ["root"]
    assert root.findtext("revision/description") == (
        "Merged system, OPNsense, nat config sections from XMLRPC client.")


def test_agent_fault_for_unknown_method_matches_ixr(pair: Pair) -> None:
    expected = wire("response-fault-unknown_method.xml")
    with running_agent(pair) as server:
        reply = post(server, xmlrpc.dumps_request("opnsense.nosuch", []))
    assert reply == expected


def test_agent_auth_failure_is_byte_exact(pair: Pair) -> None:
    expected = wire("response-authentication_failed.xml")
    with running_agent(pair) as server:
        assert post(server, wire("request-firmware_version.xml"), password="wrong") == expected


class _Replay(BaseHTTPRequestHandler):
    body = b""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: Any) -> None:
        pass


def replay(body: bytes) -> Any:
    """Run our client against a server that answers with the PHP bytes."""
    handler = type("Handler", (_Replay,), {"body": body})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = PeerClient(f"http://127.0.0.1:{server.server_address[1]}/xmlrpc.php", "root", "pw",
                            ClientOptions(retries=0, total_timeout=20))
        return client.call("opnsense.test")
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", [
    "response-firmware_version.xml", "response-list_services.xml",
    "response-restart_service.xml", "response-restore_config_section.xml",
])
def test_client_decodes_php_responses(name: str) -> None:
    body = wire(name)
    assert replay(body) == xmlrpc.loads_response(body)


def test_client_decoded_values() -> None:
    assert replay(wire("response-restore_config_section.xml")) is True
    versions = replay(wire("response-firmware_version.xml"))
    assert versions["firmware"]["version"] == "26.7.3"
    services = replay(wire("response-list_services.xml"))
    assert [s["name"] for s in services] == ["configd", "openvpn", "unbound"]
    assert services[1]["configd"]["restart"] == ["openvpn restart 1"] and services[1]["status"] is False
    assert replay(wire("response-restart_service.xml")) == "Service `openvpn[1]' has been restarted."


def test_client_recognises_php_auth_failure() -> None:
    with pytest.raises(AuthError, match="Authentication failed"):
        replay(wire("response-authentication_failed.xml"))


def test_client_reports_php_fault() -> None:
    with pytest.raises(RemoteFault) as info:
        replay(wire("response-fault-unknown_method.xml"))
    assert info.value.code == -32601
    assert info.value.fault_string == "server error. requested method opnsense.nosuch does not exist."
