"""Both ends of an exchange send each write at once (`protocol.no_delay`, ``TCP_NODELAY``).

An HTTP head and its body go out as two writes; under Nagle's algorithm the body waits for the
peer's acknowledgement of the head, which a peer with nothing to send delays by 40 ms on Linux:
each merge's reply reached the primary that much late (a fifth of a 2 MB sync). The delay itself
is the benchmark's to show; here, that the option is set on the very sockets a call uses.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hasync.agent import server as servermod
from hasync.wire import client as clientmod
from hasync.wire.client import PeerClient
from hasync.wire.protocol import no_delay
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair, running_agent


def delays(sock: socket.socket) -> bool:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0


def test_no_delay_sets_the_option_and_leaves_other_sockets_alone() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        assert delays(tcp)  # control: a socket waits for acknowledgements by default
        no_delay(tcp)
        assert not delays(tcp)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as local:
        no_delay(local)  # no TCP, no such option: nothing raised


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[bool]]]:
    """Whether each socket the agent accepted or the client opened still delays its writes,
    read right after `no_delay` ran on it."""
    found: dict[str, list[bool]] = {"agent": [], "client": []}
    for side, module in (("agent", servermod), ("client", clientmod)):
        def recording(sock: Any, side: str = side) -> None:
            no_delay(sock)
            found[side].append(delays(sock))

        monkeypatch.setattr(module, "no_delay", recording)
    yield found


def test_a_call_sends_its_writes_at_once_on_both_ends(tmp_path: Path, seen: dict[str, list[bool]]) -> None:
    pair = make_pair(tmp_path)
    with running_agent(pair) as agent:
        client = PeerClient(f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD)
        assert client.call("opnsense.firmware_version")
    assert seen["agent"] == [False] and seen["client"] == [False]
