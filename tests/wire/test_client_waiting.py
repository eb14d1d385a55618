"""`PeerClient.call(..., while_waiting=...)`: work overlapped with the peer's, in the caller's thread.

The sync uses it to build the fast-path blob during the probe (the backup's bcrypt login) and
the snapshot record during the merge. These tests pin down when the callback runs: after the
peer has the whole request, before the reply is read, once; and that the reply still arrives.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from hasync.core.errors import TransportError
from hasync.wire import xmlrpc
from hasync.wire.client import ClientOptions, PeerClient


@dataclass
class Peer:
    """A peer that, once it has a whole request, waits for the client to say so (`released`)."""

    url: str
    received: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    wait_for_release: float = 5.0


def _handler(peer: Peer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            peer.received.set()
            released = peer.released.wait(peer.wait_for_release)
            body = xmlrpc.dumps_response(released)
            self.send_response(200)
            self.send_header("Content-Type", "text/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def peer() -> Iterator[Peer]:
    made = Peer("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(made))
    server.daemon_threads = True
    made.url = f"http://127.0.0.1:{server.server_address[1]}/xmlrpc.php"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield made
    finally:
        made.released.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def client(url: str, total_timeout: float = 20) -> PeerClient:
    return PeerClient(url, "root", "pw", ClientOptions(retries=0, total_timeout=total_timeout))


def test_runs_once_the_peer_has_the_request_and_before_the_reply(peer: Peer) -> None:
    seen: list[tuple[bool, str]] = []

    def overlap() -> None:
        seen.append((peer.received.wait(5), threading.current_thread().name))
        peer.released.set()

    assert client(peer.url).call("hasync.anything", while_waiting=overlap) is True
    # the peer had the whole request when the callback ran (a callback run before sending would
    # wait 5 s for nothing), and the peer's reply was sent after it (True: it saw the release)
    assert seen == [(True, threading.current_thread().name)]


def test_control_without_the_callback_the_peer_sees_no_release(peer: Peer) -> None:
    peer.wait_for_release = 0.3
    assert client(peer.url).call("hasync.anything") is False


def test_a_callback_that_outlasts_the_deadline_ends_as_a_stalled_peer(peer: Peer) -> None:
    """The deadline covers the callback too: the request is cut, not waited on forever."""
    peer.wait_for_release = 0.1
    with pytest.raises(TransportError, match="did not answer"):
        client(peer.url, total_timeout=0.5).call("hasync.anything",
                                                 while_waiting=lambda: threading.Event().wait(1.0))
