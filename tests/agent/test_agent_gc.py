"""A large request (a merge) runs with the cyclic GC paused; a small one (probe, login) never does.

Over real TLS to an in-process agent: a method registered for the test reports what it sees.
"""

from __future__ import annotations

import gc
from pathlib import Path

from hasync.agent.server import DEFAULT_GC_PAUSE_BODY, CallContext
from hasync.wire import xmlrpc
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
