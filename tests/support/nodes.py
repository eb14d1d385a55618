"""Two real nodes on this machine for end-to-end tests: conf dirs, a TLS agent, a primary.

The agent runs in a thread of the test process but on a real socket with real TLS (trustme
certificates), so the client, the HTTP layer and the wire codec are all exercised for real.
"""

from __future__ import annotations

import base64
import shutil
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

from hasync.agent.serve import ServeOptions, build_server
from hasync.agent.server import AgentServer
from hasync.config.store import ConfigStore
from support.paths import FIXTURES

SYNC_USER = "hasync"
SYNC_PASSWORD = "demo-sync-password"
ROOT_PASSWORD = "demo-root-password"


@dataclass
class Pair:
    primary: Path
    backup: Path
    services_dir: Path
    state_dir: Path
    ca: trustme.CA
    cert_file: Path
    key_file: Path

    def point_primary_at(self, url: str) -> None:
        with ConfigStore(self.primary).transaction("test: set sync target") as root:
            node = root.find("hasync/synchronizetoip")
            assert node is not None
            node.text = url


def make_pair(tmp_path: Path) -> Pair:
    primary, backup = tmp_path / "primary", tmp_path / "backup"
    primary.mkdir()
    backup.mkdir()
    shutil.copy(FIXTURES / "nodes" / "primary.xml", primary / "config.xml")
    shutil.copy(FIXTURES / "nodes" / "backup.xml", backup / "config.xml")
    services = backup / "services.d"
    shutil.copytree(FIXTURES / "nodes" / "services.d", services)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "agent.crt", tmp_path / "agent.key"
    cert.private_key_pem.write_to_path(str(key_file))
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    return Pair(primary, backup, services, tmp_path / "agent-state", ca, cert_file, key_file)


@contextmanager
def running_agent(pair: Pair, **overrides: object) -> Iterator[AgentServer]:
    options = ServeOptions(
        conf_dir=pair.backup,
        listen="127.0.0.1:0",
        tls_cert=pair.cert_file,
        tls_key=pair.key_file,
        allow_loopback=True,
        services_dir=pair.services_dir,
        state_dir=pair.state_dir,
    )
    for key, value in overrides.items():
        setattr(options, key, value)
    server = build_server(options)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def open_request(port: int, body_length: int) -> ssl.SSLSocket:
    """A TLS connection to an agent with a sync login's POST head sent; the body is the caller's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20))
    auth = base64.b64encode(f"{SYNC_USER}:{SYNC_PASSWORD}".encode()).decode()
    head = (f"POST /xmlrpc.php HTTP/1.0\r\nHost: 127.0.0.1\r\nAuthorization: Basic {auth}\r\n"
            f"Content-Type: text/xml\r\nContent-Length: {body_length}\r\n\r\n")
    sock.sendall(head.encode())
    return sock


def read_reply(sock: ssl.SSLSocket) -> bytes:
    """All the agent answers until it closes, then the socket closed."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)
