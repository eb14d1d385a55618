"""The agent parses a request body as it arrives (`AgentRequestHandler._body_pieces` feeding
`xmlrpc.loads_request`), so it never holds a large body whole beside what it decodes to; a body
refused before its end is still read to the end, so the client gets the fault, not a reset.
Real agent, real TLS sockets."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hasync.agent.server import AgentRequestHandler
from hasync.wire import xmlrpc
from support.nodes import make_pair, open_request, read_reply, running_agent

WHOLE_FIRST = "control: the body read whole first"


def read_whole_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent as it was: every piece read before the decoder sees one."""
    pieces = AgentRequestHandler._body_pieces

    def whole(self: AgentRequestHandler, length: int) -> Iterator[bytes]:
        return iter([b"".join(pieces(self, length))])

    monkeypatch.setattr(AgentRequestHandler, "_body_pieces", whole)


@pytest.mark.parametrize("streamed", [True, False], ids=["as it arrives", WHOLE_FIRST])
def test_the_decoder_reads_a_body_before_it_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        streamed: bool) -> None:
    if not streamed:
        read_whole_first(monkeypatch)
    first_piece = threading.Event()
    decode = xmlrpc.loads_request

    def watched(body: bytes | Iterable[bytes]) -> tuple[str, list[Any]]:
        def pieces() -> Iterator[bytes]:
            for piece in body:
                first_piece.set()
                yield piece
        return decode(pieces())

    monkeypatch.setattr(xmlrpc, "loads_request", watched)
    body = xmlrpc.dumps_request("opnsense.firmware_version", [{"pad": ["x" * 100] * 20_000}])
    half = len(body) // 2
    with running_agent(make_pair(tmp_path)) as server:
        sock = open_request(server.server_address[1], len(body))
        sock.sendall(body[:half])
        # (the control waits out this bound: the decoder sees nothing until the rest is sent)
        seen_early = first_piece.wait(timeout=10 if streamed else 1)
        sock.sendall(body[half:])
        reply = read_reply(sock)
    assert reply.startswith(b"HTTP/1.0 200")
    assert isinstance(xmlrpc.loads_response(reply.split(b"\r\n\r\n", 1)[1]), dict)
    assert seen_early is streamed


@pytest.mark.parametrize("drained", [True, False], ids=["read to the end", "control: answered at once"])
def test_a_body_refused_early_still_gets_its_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   drained: bool) -> None:
    if not drained:
        def at_once(pieces: Iterator[bytes]) -> tuple[str, list[Any]] | bytes:
            try:
                return xmlrpc.loads_request(pieces)
            except xmlrpc.XmlRpcDecodeError as exc:
                return xmlrpc.dumps_fault(exc.code, str(exc))

        monkeypatch.setattr(AgentRequestHandler, "_decode", staticmethod(at_once))
    # malformed at its first bytes, and larger than the kernel's socket buffers can take unread
    body = b"<methodCall>\0" + b" " * (48 * 1024 * 1024)
    sent = True
    with running_agent(make_pair(tmp_path)) as server:
        sock = open_request(server.server_address[1], len(body))
        try:
            sock.sendall(body)
            reply = read_reply(sock)
        except OSError:
            sent, reply = False, b""
        finally:
            sock.close()
    if drained:
        assert sent and reply.startswith(b"HTTP/1.0 200")
        with pytest.raises(xmlrpc.Fault, match="not well formed"):
            xmlrpc.loads_response(reply.split(b"\r\n\r\n", 1)[1])
    else:
        assert not sent or b"faultCode" not in reply
