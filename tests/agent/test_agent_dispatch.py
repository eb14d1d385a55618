"""Dispatcher semantics that the wire tests do not reach: multicall isolation, value limits."""

from __future__ import annotations

from typing import Any

import pytest

from hasync.agent.server import CallContext, Dispatcher
from hasync.core.errors import HaError, MergeError, MethodFault
from hasync.wire import xmlrpc

CONTEXT = CallContext("tester", "127.0.0.1")


def dispatcher() -> Dispatcher:
    table = Dispatcher()
    table.register("t.ok", lambda arg, _c: {"echo": arg})
    table.register("t.merge", lambda _a, _c: (_ for _ in ()).throw(MergeError("hasync is never merged")))
    table.register("t.ha", lambda _a, _c: (_ for _ in ()).throw(HaError("backend down")))
    table.register("t.bug", lambda _a, _c: 1 / 0)
    return table


def test_multicall_answers_each_call_on_its_own() -> None:
    calls: list[Any] = [
        {"methodName": "t.ok", "params": ["a"]},
        {"methodName": "t.merge", "params": []},
        {"methodName": "t.nosuch", "params": []},
        {"methodName": "t.ha", "params": []},
        {"methodName": "t.bug", "params": []},
        {"methodName": "system.multicall", "params": [[]]},
        "not a struct",
        {"methodName": "t.ok", "params": ["b"]},
    ]
    results = dispatcher().call("system.multicall", [calls], CONTEXT)
    assert results[0] == [{"echo": "a"}]
    assert results[1] == {"faultCode": xmlrpc.INVALID_PARAMS, "faultString": "hasync is never merged"}
    assert results[2]["faultCode"] == xmlrpc.UNKNOWN_METHOD
    assert results[3] == {"faultCode": xmlrpc.INTERNAL_ERROR, "faultString": "backend down"}
    assert results[4] == {"faultCode": xmlrpc.INTERNAL_ERROR, "faultString": "server error. internal error in t.bug"}
    assert results[5]["faultCode"] == xmlrpc.NOT_METHOD_CALL
    assert results[6]["faultCode"] == xmlrpc.INVALID_PARAMS
    assert results[7] == [{"echo": "b"}]
    # the whole reply still encodes
    assert xmlrpc.loads_response(xmlrpc.dumps_response(results)) == results


def test_single_param_is_passed_as_is_and_several_as_list() -> None:
    table = dispatcher()
    assert table.call("t.ok", ["x"], CONTEXT) == {"echo": "x"}
    assert table.call("t.ok", ["x", "y"], CONTEXT) == {"echo": ["x", "y"]}
    with pytest.raises(MethodFault) as info:
        table.call("t.nosuch", [], CONTEXT)
    assert info.value.message == "server error. requested method t.nosuch does not exist."


@pytest.mark.parametrize("text", ["nan", "inf", "-Infinity", "1_0", "١٢", "1e999", "0x10", ""])
def test_double_must_be_a_finite_ascii_number(text: str) -> None:
    body = (f'<?xml version="1.0"?><methodResponse><params><param><value><double>{text}</double>'
            "</value></param></params></methodResponse>").encode()
    with pytest.raises(xmlrpc.XmlRpcDecodeError):
        xmlrpc.loads_response(body)


@pytest.mark.parametrize(("text", "value"), [("1.5", 1.5), ("-2", -2.0), (".5", 0.5), ("1e3", 1000.0)])
def test_double_accepts_plain_numbers(text: str, value: float) -> None:
    body = (f'<?xml version="1.0"?><methodResponse><params><param><value><double>{text}</double>'
            "</value></param></params></methodResponse>").encode()
    assert xmlrpc.loads_response(body) == value
