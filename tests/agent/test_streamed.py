"""A fast-path request merged a section at a time (`wire.streamed`, `payload.parts`).

What is proven here:

* on random configs and section lists, and on a generated pair, merging the request a section
  at a time leaves the very tree, report (changed points and sections, warnings, kept fields,
  points kept as sent) and moved records that decoding it whole and merging that gives, or fails
  with the same message; the random cases really do take the streamed way (counted);
* the merge takes in each section before the next is parsed (the order of parses and merges
  is recorded; control: the whole decode parses everything first);
* which section lists can be taken a section at a time (`parts.streamable`), and that the primary
  sends its sections in the order that allows it (`parts.payload_order`);
* a request whose sizes, head, tail or sha256 lie is refused with a clear fault, and over the
  wire then leaves config.xml as it was (control: the honest request merges).
"""

from __future__ import annotations

import copy
import hashlib
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore, parse_config_bytes, serialize
from hasync.config.tree import GraftedPayload
from hasync.core.errors import HaError, MethodFault, RemoteFault
from hasync.payload import changes, digest, merge, parts
from hasync.payload.build import build_payload
from hasync.payload.validate import check_payload, normalize_payload
from hasync.wire import sections as sectionsmod
from hasync.wire import streamed
from hasync.wire.client import PeerClient
from support.bench import bench_module
from support.nodes import SYNC_PASSWORD, SYNC_USER, make_pair, running_agent
from support.xmlshapes import SECTION_CHOICES, configs

REGISTRY = SyncItemRegistry.load()


def outcome(backup: etree._Element, payload: Any) -> Any:
    """What merging `payload` into a copy of `backup` gives: the tree's bytes, the whole report
    and the digests of every item read through the moved records; or the failure."""
    root = copy.deepcopy(backup)
    try:
        report = merge.merge_payload(root, payload, REGISTRY, accept_unknown=True)
    except (HaError, MethodFault) as exc:
        return f"{type(exc).__name__}: {exc}"
    if isinstance(payload, parts.PayloadParts):
        moved = payload.moved
    else:
        moved = payload.grafts.moved if isinstance(payload, GraftedPayload) else {}
    digests = digest.backup_item_digests(root, REGISTRY, REGISTRY.ids(), moved)
    assert digests == digest.backup_item_digests(root, REGISTRY, REGISTRY.ids())  # the moved dicts are the tree's
    return (serialize(root), report.public_dict(), report.unchanged_points, report.as_sent_points,
            report.as_sent_token, len(moved))


def both_ways(primary: etree._Element, backup: etree._Element, sections: list[str]) -> tuple[Any, Any, bool]:
    """The outcomes of the whole decode and of the streamed one, and whether the latter streamed."""
    try:
        param = sectionsmod.build_blob(primary, sections).param
    except HaError:
        return None, None, False
    try:
        whole: Any = outcome(backup, sectionsmod.decode_param(param).payload)
    except MethodFault as exc:
        whole = f"MethodFault: {exc}"
    payload = streamed.decode_streamed(param, sectionsmod.MAX_INFLATED).payload
    if not isinstance(payload, streamed.StreamedSections):  # the primary said not to (a nosync section)
        assert sectionsmod.SIZES_KEY not in param
        return whole, outcome(backup, payload), False
    took: list[str] = []
    whole_of = payload.whole
    payload.whole = lambda: took.append("whole") or whole_of()  # type: ignore[method-assign]
    return whole, outcome(backup, payload), not took


counted = {"streamed": 0, "whole": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), configs(), st.lists(st.sampled_from(SECTION_CHOICES), min_size=1, max_size=5, unique=True))
def test_a_section_at_a_time_merges_as_the_whole_does(primary: etree._Element, backup: etree._Element,
                                                     sections: list[str]) -> None:
    primary = etree.fromstring(etree.tostring(primary))
    backup = etree.fromstring(etree.tostring(backup), etree.XMLParser(remove_blank_text=True))
    whole, one_by_one, took_parts = both_ways(primary, backup, sections)
    assert one_by_one == whole
    counted["streamed" if took_parts else "whole"] += 1


split_counted = {"points": 0, "keys": 0}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), configs(), st.lists(st.sampled_from(SECTION_CHOICES), min_size=1, max_size=5, unique=True))
def test_a_whole_payload_merges_point_by_point_as_key_by_key(primary: etree._Element, backup: etree._Element,
                                                             sections: list[str]) -> None:
    """A stock primary's payload (plain structs) merged a point at a time, where it is made of its
    points alone, gives what merging it a top-level key at a time gives."""
    primary = etree.fromstring(etree.tostring(primary))
    backup = etree.fromstring(etree.tostring(backup), etree.XMLParser(remove_blank_text=True))
    try:
        payload = build_payload(primary, sections)
    except HaError:
        return
    split = merge._at_points
    took: list[bool] = []

    def watched(data: Any, points: list[str]) -> Any:
        found = split(data, points)
        took.append(found is not None)
        return found

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(merge, "_at_points", watched)
        by_points = outcome(backup, copy.deepcopy(payload))
        patch.setattr(merge, "_at_points", lambda data, points: None)
        by_keys = outcome(backup, copy.deepcopy(payload))
    assert by_points == by_keys
    split_counted["points" if any(took) else "keys"] += 1


def test_the_random_whole_payloads_took_both_ways() -> None:
    """(runs after the property test above) both ways were exercised, a point at a time often."""
    if not split_counted["points"] + split_counted["keys"]:
        pytest.skip("the property test did not run first")
    assert split_counted["points"] >= 100 and split_counted["keys"] >= 10, split_counted


def test_the_random_cases_took_both_ways() -> None:
    """(runs after the property test in this module) both ways were exercised, the streamed one often."""
    if not counted["streamed"] + counted["whole"]:
        pytest.skip("the property test did not run first")
    assert counted["streamed"] >= 50 and counted["whole"] >= 20, counted


def generated_pair(seed: int = 7) -> tuple[etree._Element, etree._Element, list[str]]:
    primary_bytes, backup_bytes = bench_module("generate").generate(0.3, seed=seed)
    primary = parse_config_bytes(primary_bytes, "primary")
    return primary, parse_config_bytes(backup_bytes, "backup"), REGISTRY.sections_for(read_hasync(primary).syncitems)


def test_a_generated_pair_merges_a_section_at_a_time_as_whole() -> None:
    primary, backup, sections = generated_pair()
    whole, one_by_one, took_parts = both_ways(primary, backup, sections)
    assert took_parts
    assert isinstance(whole, tuple) and one_by_one == whole
    # the comparison has teeth: sections changed, some were written as sent, dicts were moved
    assert whole[1]["sections"] and whole[3] and whole[5]


def test_each_section_is_merged_before_the_next_is_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    primary, backup, sections = generated_pair()
    param = sectionsmod.build_blob(primary, sections).param
    events: list[str] = []
    parse, merge_data = streamed.parse_document, merge._merge_data
    monkeypatch.setattr(streamed, "parse_document", lambda data: events.append("parse") or parse(data))
    monkeypatch.setattr(merge, "_merge_data", lambda data, ctx: events.append("merge") or merge_data(data, ctx))
    own = dict(param, data=list(param["data"]))  # (the streamed reading lets go of the chunks it inflated)
    merge.merge_payload(copy.deepcopy(backup), streamed.decode_streamed(own, sectionsmod.MAX_INFLATED).payload,
                        REGISTRY)
    assert own["data"] == [] and param["data"]
    assert events == ["parse", "merge"] * len(sections) + ["parse"]  # the last: the head and tail
    # control: decoded whole, every section is converted before the merges (one per point)
    events.clear()
    decoded = sectionsmod.decode_param(param).payload
    merge.merge_payload(copy.deepcopy(backup), decoded, REGISTRY)
    assert events == ["merge"] * len(sections)


@pytest.mark.parametrize("unknown", [False, True], ids=["its points alone", "an uncovered section beside them"])
def test_a_whole_payload_keeps_one_points_before_state_at_a_time(monkeypatch: pytest.MonkeyPatch,
                                                                  unknown: bool) -> None:
    """A payload merged whole (a stock primary's) keeps the bytes change detection compares for
    one point at a time where it is made of its points alone, else for one top-level key at a
    time; never for all of them at once."""
    primary, backup, sections = generated_pair()
    payload = build_payload(primary, sections)
    if unknown:
        payload["uncovered"] = {"a": "1"}
    held: list[int] = []
    add_point = changes.SectionsBefore.add_point

    def watched(self: changes.SectionsBefore, *args: Any, **kwargs: Any) -> None:
        add_point(self, *args, **kwargs)
        held.append(sum(len(data) for nodes in self.nodes.values() for data in nodes))

    def most_held(keys: list[str], points: list[str]) -> int:
        held.clear()
        changes.SectionsBefore(backup, keys, points)
        return max(held, default=0)

    monkeypatch.setattr(changes.SectionsBefore, "add_point", watched)
    merge.merge_payload(copy.deepcopy(backup), payload, REGISTRY, accept_unknown=unknown)
    most = max(held)
    data = normalize_payload(dict(payload))
    points = check_payload(data, REGISTRY, accept_unknown=unknown)
    per_point = max(most_held([point.split(".")[0]], [point]) for point in points)
    per_key = max(most_held([key], points) for key in data)
    everything = most_held(list(data), points)  # (control: all at once)
    assert per_point < per_key < everything
    assert most == (per_key if unknown else per_point)


def test_the_primary_sends_its_sections_in_the_payloads_order() -> None:
    primary, _, sections = generated_pair()
    assert parts.payload_order(sections) != sections  # (the items list them otherwise)
    blob = sectionsmod.build_blob(primary, sections)
    assert blob.param["sections"] == parts.payload_order(sections)
    points = parts.streamable(blob.param["sections"], REGISTRY)
    assert points == check_payload(normalize_payload(build_payload(primary, sections)), REGISTRY)
    assert parts.streamable(sections, REGISTRY) is None  # control: in the items' order it is not


@pytest.mark.parametrize(("sections", "why"), [
    (["filter", "OPNsense.Firewall.Alias", "OPNsense.Firewall.Filter.rules"], None),
    (["OPNsense.Firewall.Alias", "filter", "OPNsense.IDS"], "out of the payload's order"),
    (["OPNsense.IDS", "OPNsense.IDS.rules"], "one inside another"),
    (["filter", "filter"], "twice"),
    (["filter", "x.a"], "not covered"),
    (["system"], "the whole system section"),
    (["interfaces"], "node-specific"),
])
def test_which_section_lists_merge_a_section_at_a_time(sections: list[str], why: str | None) -> None:
    points = parts.streamable(sections, REGISTRY)
    assert (points is None) == (why is not None), why
    if points is not None:
        assert points == sections


# --- a request that lies is refused, and nothing is written ---------------------------------


def filter_pair_param() -> dict[str, Any]:
    root = etree.fromstring("<opnsense><filter><rule><descr>a</descr></rule></filter>"
                            "<nat><rule><descr>b</descr></rule></nat></opnsense>")
    return sectionsmod.build_blob(root, ["filter", "nat"]).param


def with_document(param: dict[str, Any], document: bytes, sizes: list[int] | None = None) -> dict[str, Any]:
    """`param` carrying `document` with an honest size and sha256 (and `sizes`, if given)."""
    changed = dict(param, size=len(document), sha256=hashlib.sha256(document).hexdigest(),
                   data=[zlib.compress(document)])
    if sizes is not None:
        changed[sectionsmod.SIZES_KEY] = sizes
    return changed


def document_of(param: dict[str, Any]) -> bytes:
    return sectionsmod.inflate(param["data"], param["size"])


def relaid(param: dict[str, Any], head: bytes, sections: list[bytes], tail: bytes) -> dict[str, Any]:
    return with_document(param, head + b"".join(sections) + tail, [len(head), *map(len, sections)])


def pieces(param: dict[str, Any]) -> tuple[bytes, list[bytes], bytes]:
    document, sizes = document_of(param), param[sectionsmod.SIZES_KEY]
    head, at, sections = document[: sizes[0]], sizes[0], []
    for size in sizes[1:]:
        sections.append(document[at : at + size])
        at += size
    return head, sections, document[at:]


def merged_streamed(param: dict[str, Any]) -> str:
    root = etree.fromstring("<opnsense><filter/><nat/></opnsense>")
    param = dict(param, data=list(param["data"]))  # (the streamed reading lets go of the chunks it inflated)
    payload = streamed.decode_streamed(param, sectionsmod.MAX_INFLATED).payload
    assert isinstance(payload, streamed.StreamedSections)
    merge.merge_payload(root, payload, REGISTRY)
    return etree.tostring(root).decode()


LIES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "a size one byte short": lambda p: dict(p, section_sizes=[*p["section_sizes"][:1], p["section_sizes"][1] - 1,
                                                              p["section_sizes"][2] + 1]),
    "sizes past the document": lambda p: dict(p, section_sizes=[*p["section_sizes"][:2], p["size"]]),
    "one size too few": lambda p: dict(p, section_sizes=p["section_sizes"][:2]),
    "not byte counts": lambda p: dict(p, section_sizes=["1", 2, 3]),
    "a declaration before a section": lambda p: relaid(p, pieces(p)[0], [b'<?xml version="1.0"?>' + pieces(p)[1][0],
                                                                        pieces(p)[1][1]], pieces(p)[2]),
    "an element in the tail": lambda p: relaid(p, pieces(p)[0], pieces(p)[1], b"<filter/></sections>"),
    "another encoding": lambda p: relaid(p, pieces(p)[0].replace(b"UTF-8", b"ISO-8859-1"), pieces(p)[1],
                                         pieces(p)[2]),
    "a DTD in the head": lambda p: relaid(p, b'<!DOCTYPE sections [<!ENTITY e "x">]><sections>', pieces(p)[1],
                                          pieces(p)[2]),
    "sections swapped": lambda p: relaid(p, pieces(p)[0], pieces(p)[1][::-1], pieces(p)[2]),
    "a wrong sha256": lambda p: dict(p, sha256="0" * 64),
}


# what each lie is refused for (the first check it fails)
REFUSED = {
    "a size one byte short": "not well-formed",
    "sizes past the document": "must give the head's length",
    "one size too few": "must give the head's length",
    "not byte counts": "array of byte counts",
    "a declaration before a section": "does not list the announced sections",
    "an element in the tail": "does not list the announced sections",
    "another encoding": "does not list the announced sections",
    "a DTD in the head": "DTD",
    "sections swapped": "does not list the announced sections",
    "a wrong sha256": "does not match its sha256",
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_request_that_lies_about_its_layout_is_refused(lie: str) -> None:
    param = filter_pair_param()
    assert "<descr>a</descr>" in merged_streamed(param)  # control: the honest request merges
    with pytest.raises(MethodFault, match=r"hasync\.restore_sections_xml: .*" + re.escape(REFUSED[lie])):
        merged_streamed(LIES[lie](param))


def test_a_lying_request_leaves_config_xml_as_it_was(tmp_path: Path) -> None:
    pair = make_pair(tmp_path)
    config = pair.backup / "config.xml"
    root = parse_config_bytes((pair.primary / "config.xml").read_bytes(), "primary")
    honest = sectionsmod.build_blob(root, REGISTRY.sections_for(read_hasync(root).syncitems)).param
    head, sections, tail = pieces(honest)
    # the last section's bytes altered after the others merged: caught only by the final sha256
    lying = dict(relaid(honest, head, [*sections[:-1], sections[-1].replace(b"</section>", b" </section>")], tail),
                 sha256=honest["sha256"])
    before = config.read_bytes()
    with running_agent(pair) as agent:
        client = PeerClient(f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD)
        with pytest.raises(RemoteFault, match="sha256"):
            client.call(sectionsmod.METHOD, [lying])
        assert config.read_bytes() == before
        assert client.call(sectionsmod.METHOD, [honest]) is True  # control: the honest one merges
    assert config.read_bytes() != before
    assert ConfigStore(pair.backup).load() is not None


def test_a_section_that_nosync_drops_whole_goes_whole() -> None:
    """remove_nosync drops a section that is one struct marked nosync from the payload, which can
    empty the struct above it: the primary sends no sizes then, and the agent refuses sizes there."""
    root = etree.fromstring("<opnsense><OPNsense><Firewall><Alias><nosync>1</nosync><x>1</x></Alias>"
                            "<Filter><rules><rule><descr>a</descr></rule></rules></Filter></Firewall></OPNsense>"
                            "</opnsense>")
    sections = ["OPNsense.Firewall.Alias", "OPNsense.Firewall.Filter.rules"]
    param = sectionsmod.build_blob(root, sections).param
    assert sectionsmod.SIZES_KEY not in param
    backup = etree.fromstring("<opnsense><OPNsense><Firewall><Alias><x>2</x></Alias></Firewall></OPNsense></opnsense>")
    whole = outcome(backup, streamed.decode_streamed(param, sectionsmod.MAX_INFLATED).payload)
    assert isinstance(whole, tuple) and b"<x>2</x>" in whole[0] and b"<descr>a</descr>" in whole[0]
    document = document_of(param)
    starts = [document.index(b"<section "), document.index(b'<section path="OPNsense.Firewall.Filter.rules"'),
              document.index(b"</sections>")]
    sized = dict(param, section_sizes=[starts[0], starts[1] - starts[0], starts[2] - starts[1]])
    assert outcome(backup, streamed.decode_streamed(sized, sectionsmod.MAX_INFLATED).payload) == \
        "MethodFault: hasync.restore_sections_xml: section OPNsense.Firewall.Alias is marked nosync as a whole: " \
        "it cannot be merged apart ('section_sizes' must be left out)"
    # control: without its nosync flag the same request merges a section at a time, as whole
    flag = root.find("OPNsense/Firewall/Alias/nosync")
    assert flag is not None
    flag.getparent().remove(flag)
    whole_of, one_by_one, took_parts = both_ways(root, backup, sections)
    assert took_parts and one_by_one == whole_of
