"""A large request (a merge) runs with the cyclic GC paused; a small one (probe, login) never does;
and what a handler is done with but kept is freed after the reply.

Over real TLS to an in-process agent: a method registered for the test reports what it sees.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest

from hasync.agent import fastpath, server
from hasync.agent.server import DEFAULT_GC_PAUSE_BODY, CallContext
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.sync.run import SyncOptions, SyncRun
from hasync.wire import sections, streamed, xmlrpc
from hasync.wire.client import PeerClient
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair, running_agent


def test_only_a_large_request_runs_with_the_collector_paused(tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    seen: list[bool] = []

    def report(_argument: object, _context: CallContext) -> bool:
        seen.append(gc.isenabled())
        return True

    assert gc.isenabled()
    with running_agent(pair) as server:
        server.dispatcher.register("test.gc_state", report)
        client = PeerClient(f"https://127.0.0.1:{server.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD)
        small = "x" * 100
        large = "x" * DEFAULT_GC_PAUSE_BODY
        assert len(xmlrpc.dumps_request("test.gc_state", [small])) < DEFAULT_GC_PAUSE_BODY
        assert client.call("test.gc_state", [small]) is True
        assert client.call("test.gc_state", [large]) is True
        assert client.call("test.gc_state", [small]) is True
    assert seen == [True, False, True]  # the small ones are the control
    assert gc.isenabled()  # and the pause ended with the request


def replies_noted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list the agent appends "sent" to whenever it sends a reply; tests add their own events."""
    events: list[str] = []
    send = server.AgentRequestHandler._send

    def sending(self: server.AgentRequestHandler, *args: Any, **kwargs: Any) -> None:
        events.append("sent")
        send(self, *args, **kwargs)

    monkeypatch.setattr(server.AgentRequestHandler, "_send", sending)
    return events


def test_what_a_handler_keeps_is_freed_after_the_reply_with_the_collector_still_paused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Freeing a large merge's decoded payload takes the time of a million objects: the agent
    does it after sending the reply (`CallContext.kept_until_sent`), and before the collector
    is back on, which would otherwise walk all of it once more."""
    pair = make_pair(tmp_path)
    events = replies_noted(monkeypatch)

    class Held:
        pass

    def handler(argument: str, context: CallContext) -> bool:
        kept, dropped = Held(), Held()
        weakref.finalize(kept, lambda: events.append(f"kept freed, collector {'on' if gc.isenabled() else 'paused'}"))
        weakref.finalize(dropped, lambda: events.append("dropped freed"))
        context.kept_until_sent.append(kept)
        return True  # `dropped` (the control) goes with this frame, before the reply

    with running_agent(pair) as agent:
        agent.dispatcher.register("test.keep", handler)
        client = PeerClient(f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD)
        assert client.call("test.keep", ["x" * DEFAULT_GC_PAUSE_BODY]) is True
    assert events == ["dropped freed", "sent", "kept freed, collector paused"]


def test_the_fast_path_keeps_its_decoded_payload_until_the_reply_is_sent(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pair = make_pair(tmp_path)
    events = replies_noted(monkeypatch)

    def decoding(argument: Any, *args: Any) -> sections.Decoded:
        decoded = decode(argument, *args)
        weakref.finalize(decoded, lambda: events.append("decoded freed"))
        return decoded

    decode = streamed.decode_streamed
    monkeypatch.setattr(fastpath, "decode_streamed", decoding)
    with running_agent(pair) as agent:
        pair.point_primary_at(f"https://127.0.0.1:{agent.server_address[1]}/")
        events.clear()
        result = SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(full=True)).run()
    assert result.status == "ok" and result.transfer == "fast path"
    # the probe's reply, the merge's, and then its payload (control: freed before the merge's reply)
    assert events[:3] == ["sent", "sent", "decoded freed"]
