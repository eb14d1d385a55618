"""A request is decoded while it is parsed (`xmlrpc.loads_request`): the tree never holds much
more than a piece of the body, where parsing a stock primary's request whole took ~20x the
config in tree. What it decodes to is compared with the whole tree's decode on hostile bodies in
`tests/resilience/test_hostile.py::test_request_decoder_in_pieces_gives_the_whole_trees_outcome`.
"""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import parse_config_bytes
from hasync.payload.build import build_payload
from hasync.wire import xmlrpc
from support.bench import bench_module

REGISTRY = SyncItemRegistry.load()
FEED = 64 * 1024


@pytest.fixture(scope="module")
def body() -> bytes:
    """What a stock primary sends for a generated 1 MB config: restore_config_section's struct."""
    root = parse_config_bytes(bench_module("generate").generate(1.0, seed=5)[0], "primary")
    payload = build_payload(root, REGISTRY.sections_for(read_hasync(root).syncitems), REGISTRY.declarations())
    return xmlrpc.dumps_request("opnsense.restore_config_section", [payload])


def largest_tree(body: bytes, collapse: bool) -> tuple[int, tuple[str, list[Any]]]:
    """The most elements the tree held at any look while `body` was parsed, and the decode."""
    sizes: list[int] = []
    real = xmlrpc._collapse

    def measured(node: etree._Element, decoded: dict[etree._Element, Any]) -> None:
        sizes.append(sum(1 for _ in node.iter()))
        if collapse:
            real(node, decoded)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(xmlrpc, "FEED", FEED)
        patch.setattr(xmlrpc, "_collapse", measured)
        decoded = xmlrpc.loads_request(body)
    assert len(sizes) >= len(body) // FEED
    return max(sizes), decoded


@pytest.mark.parametrize("collapse", [True, False], ids=["in pieces", "control: nothing collapsed"])
def test_the_tree_never_holds_much_more_than_a_piece(body: bytes, collapse: bool) -> None:
    elements = sum(1 for _ in xmlrpc._parse(body).iter())
    per_piece = elements * FEED / len(body)
    largest, decoded = largest_tree(body, collapse)
    assert decoded == xmlrpc._request_of(xmlrpc._parse(body))
    if collapse:
        assert largest < 3 * per_piece < elements / 10
    else:
        assert largest > 0.9 * elements


def member_names(value: Any) -> list[str]:
    """Every struct member name in a decoded value, one entry per member."""
    if isinstance(value, dict):
        return [*value, *(name for item in value.values() for name in member_names(item))]
    if isinstance(value, list):
        return [name for item in value for name in member_names(item)]
    return []


@pytest.mark.parametrize("shared", [True, False], ids=["interned", "control: a string per member"])
def test_member_names_are_one_string_per_name(body: bytes, shared: bool) -> None:
    with pytest.MonkeyPatch.context() as patch:
        if not shared:
            patch.setattr(xmlrpc, "intern", lambda name: name)
        _method, params = xmlrpc.loads_request(body)
    check_objects_per_text(member_names(params), shared, repeats=100)


def check_objects_per_text(texts: list[str], shared: bool, repeats: int) -> None:
    """`texts` (each repeated `repeats` times on average at least) are one object per distinct
    text when `shared`, else mostly one object each."""
    distinct = len(set(texts))
    objects = len({id(text) for text in texts})  # (all alive at once: ids are unique)
    assert len(texts) > repeats * distinct
    if shared:
        assert objects == distinct
    else:
        assert objects > len(texts) / 2


def short_values(value: Any, limit: int) -> list[str]:
    """Every string value of 2 to `limit` characters in a decoded value, one per place (a
    single character is one of Python's own shared strings anyway)."""
    if isinstance(value, dict):
        return [text for item in value.values() for text in short_values(item, limit)]
    if isinstance(value, list):
        return [text for item in value for text in short_values(item, limit)]
    return [value] if isinstance(value, str) and 1 < len(value) <= limit else []


@pytest.mark.parametrize("shared", [True, False], ids=["kept once", "control: a string per value"])
def test_short_values_are_one_string_per_text(body: bytes, shared: bool) -> None:
    with pytest.MonkeyPatch.context() as patch:
        if not shared:
            patch.setattr(xmlrpc, "SHORT", 0)
        _method, params = xmlrpc.loads_request(body)
    check_objects_per_text(short_values(params, xmlrpc.SHORT), shared, repeats=2)
