"""The agent's memory: concurrent request bodies share one budget on a real agent (TLS, real
sockets), and a decoded request is not kept while it merges."""

from __future__ import annotations

from pathlib import Path

from hasync.agent.server import AgentLimits, BodyBudget, CallContext
from hasync.wire import xmlrpc
from support.nodes import SYNC_USER, make_pair, open_request, read_reply, running_agent
from support.polling import wait_for


def test_budget_lets_one_request_use_max_body_but_shares_the_rest() -> None:
    budget = BodyBudget(1000)
    assert budget.reserve(5000)  # alone: always allowed (max_body bounds it)
    assert not budget.reserve(1)
    budget.release(5000)
    assert budget.reserve(600) and budget.reserve(400)
    assert not budget.reserve(1)
    budget.release(600)
    budget.release(400)
    assert budget.used == 0


def test_a_second_large_body_waits_for_the_budget(tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    probe = xmlrpc.dumps_request("opnsense.firmware_version", [])
    big = probe + b" " * (3000 - len(probe))  # trailing white space is allowed after the root
    with running_agent(pair, limits=AgentLimits(max_inflight=4000)) as server:
        port = server.server_address[1]
        first = open_request(port, len(big))
        first.sendall(big[:100])  # the first body is in flight, holding 3000 bytes of budget
        wait_for(lambda: server.body_budget.used == len(big), "its handler to reserve the body", interval=0.01)
        second = open_request(port, len(big))
        refused = read_reply(second)
        assert refused.startswith(b"HTTP/1.0 503") and b"retry later" in refused
        first.sendall(big[100:])
        reply = read_reply(first)
        assert reply.startswith(b"HTTP/1.0 200")
        assert isinstance(xmlrpc.loads_response(reply.split(b"\r\n\r\n", 1)[1]), dict)
        # the budget is free again
        third = open_request(port, len(big))
        third.sendall(big)
        assert read_reply(third).startswith(b"HTTP/1.0 200")
        assert server.body_budget.used == 0


def test_the_agent_does_not_keep_a_request_it_merges(tmp_path: Path) -> None:
    """`opnsense.restore_config_section` hands the payload it decoded to the merge to consume
    (`merge_payload(consume=True)`): it is empty once merged, and the merge is written. (That the
    merge lets go of each point as it goes: tests/payload/test_merge.py.)"""
    pair = make_pair(tmp_path)
    payload = {"filter": {"rule": [{"descr": "handed over", "type": "pass", "interface": "lan"}]}}
    with running_agent(pair) as server:
        merge = server.dispatcher.methods["opnsense.restore_config_section"]
        assert merge(payload, CallContext(SYNC_USER, "127.0.0.1")) is True
    assert payload == {}
    assert b"<descr>handed over</descr>" in (pair.backup / "config.xml").read_bytes()
