"""`system.multicall` results, and the fast path's merge riding in one beside the digests.

A merge the backup refuses must surface exactly as it does from the plain call (same code, same
message: the primary recognises a lock-out refusal by its text), whether or not the digests
travel with it.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from hasync.core.errors import RemoteFault
from hasync.wire import xmlrpc
from hasync.wire.client import ClientOptions, PeerClient
from hasync.wire.sections import METHOD, send_blob
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair, running_agent


def test_an_entry_is_its_value_or_its_fault() -> None:
    assert xmlrpc.multicall_entry([{"a": 1}]) == {"a": 1}
    assert xmlrpc.multicall_entry([[]]) == []
    with pytest.raises(xmlrpc.Fault) as fault:
        xmlrpc.multicall_entry({"faultCode": -32601, "faultString": "no such method"})
    assert (fault.value.code, fault.value.message) == (-32601, "no such method")


@pytest.mark.parametrize("entry", [[], [1, 2], "text", {"faultString": "no code"}, None])
def test_anything_else_is_refused(entry: object) -> None:
    with pytest.raises(xmlrpc.XmlRpcDecodeError):
        xmlrpc.multicall_entry(entry)


def test_a_refused_merge_raises_the_same_fault_with_or_without_the_digests(tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    bogus = SimpleNamespace(param={"format": "not-ours"})  # send_blob reads only the param
    with running_agent(pair) as server:
        peer = PeerClient(f"https://127.0.0.1:{server.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD,
                          ClientOptions(verify_peer=False))
        with pytest.raises(RemoteFault) as plain:
            peer.call(METHOD, [bogus.param])
        with pytest.raises(RemoteFault) as along:
            send_blob(peer, bogus, ["users"])  # type: ignore[arg-type]
        # the control: a good call in the same multicall form returns its value and the digests
        replies = peer.call("system.multicall", [[{"methodName": "opnsense.firmware_version", "params": []},
                                                  {"methodName": "hasync.digest", "params": [["users"]]}]])
    assert (along.value.code, along.value.fault_string) == (plain.value.code, plain.value.fault_string)
    assert plain.value.code == xmlrpc.INVALID_PARAMS
    assert "firmware" in xmlrpc.multicall_entry(replies[0]) and xmlrpc.multicall_entry(replies[1])
