"""The record check's quick path (`vetting.vet_plain_record`, for records below an element that
`vetting.plain_below` cleared): it answers only what the full check (`vet_record`) answers, the
decoder's conversion grafts exactly what it grafted without it, and it answers for the common
record (the reason it is there). The full check itself is compared with the conversion in
`tests/agent/test_grafts.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.config import tree, vetting
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import parse_config_bytes
from hasync.payload.build import REDACTED
from hasync.payload.validate import MAX_DEPTH, TEXT_RULES
from hasync.wire import sections as sectionsmod
from support.bench import bench_module
from support.xmlshapes import untidy

REGISTRY = SyncItemRegistry.load()


@st.composite
def sprinkled(draw: st.DrawFn) -> etree._Element:
    """`untidy()` shapes with what only `plain_below` reads sprinkled in: the redaction marker as
    a text or an attribute value, an attribute name validation refuses."""
    node = draw(untidy())
    for target in node.iter():
        if not isinstance(target.tag, str):
            continue
        roll = draw(st.integers(0, 40))
        if roll == 0 and len(target) == 0:
            target.text = REDACTED
        elif roll == 1:
            target.set("x", REDACTED)
        elif roll == 2:
            target.set("{urn:example}x", "1")  # (a namespaced name: not a config name)
    return node


def held(node: etree._Element) -> etree._Element:
    """`node` inside a holder, as the decoder sees a section (parsed again: what comes off the wire)."""
    return etree.fromstring(b"<h>" + etree.tostring(node) + b"</h>")


def checked(holder: etree._Element) -> Iterator[etree._Element]:
    """Every element the checks could be asked about (they are asked about records only, but
    their answers must hold for any element with children)."""
    return (element for element in holder.iter() if isinstance(element.tag, str) and len(element) > 0)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sprinkled())
def test_the_quick_check_answers_only_what_the_full_check_answers(node: etree._Element) -> None:
    holder = held(node)
    names_ok: set[str] = set()
    if not vetting.plain_below(holder, TEXT_RULES, names_ok):
        return
    for element in checked(holder):
        full = vetting.vet_record(element, tree.LIST_TAGS, TEXT_RULES, names_ok)  # (admits the names)
        quick = vetting.vet_plain_record(element, tree.LIST_TAGS, names_ok)
        if quick is not None:
            assert full == (True, *quick)


def grafted(holder: etree._Element, quick: bool) -> tuple[dict[str, Any], list[tuple[str, bool, int]]]:
    """The conversion of a copy of `holder`, and for each dict it grafted: where its element is,
    whether it is a deferred record, and the least room validation needs to skip it (-1: none)."""
    holder = copy.deepcopy(holder)
    with pytest.MonkeyPatch.context() as patch:
        if not quick:
            patch.setattr(tree, "plain_below", lambda *_args: False)
        grafts = tree.Grafts(TEXT_RULES)
        value = tree.element_to_grafts(holder, grafts)
    document = holder.getroottree()
    verdicts = sorted(
        (document.getpath(element), isinstance(record, tree.DeferredRecord),
         next((room for room in range(MAX_DEPTH + 1) if grafts.vetted(record, room)), -1))
        for record, element in grafts
    )
    return value, verdicts


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sprinkled())
def test_the_conversion_grafts_the_same_with_and_without_the_quick_check(node: etree._Element) -> None:
    holder = held(node)
    assert grafted(holder, quick=True) == grafted(holder, quick=False)


QUICK_CANNOT_TELL = {
    "the marker as a text": f"<r><a>{REDACTED}</a></r>",
    "the marker as an attribute value": f'<r><a x="{REDACTED}">1</a></r>',
    "a nosync attribute on the record": '<r nosync="1"><a>1</a></r>',
    "a nosync attribute on a leaf": '<r><a nosync="1">1</a></r>',
    "an attribute name that is no config name": '<r xmlns:e="urn:example"><a e:x="1">1</a></r>',
    # no text is the marker here, but their concatenation holds it: told by the full check
    "the marker across two texts": f"<r><a>{REDACTED[:5]}</a><b>{REDACTED[5:]}</b></r>",
}


@pytest.mark.parametrize("xml", QUICK_CANNOT_TELL.values(), ids=QUICK_CANNOT_TELL.keys())
def test_texts_and_attributes_the_quick_check_leaves_unread_keep_it_off(xml: str) -> None:
    """Control: the same holder without them is cleared, and without rules nothing is."""
    assert not vetting.plain_below(etree.fromstring(f"<h>{xml}</h>"), TEXT_RULES, set())
    clean = etree.fromstring('<h><r uuid="u1"><a k="v">1</a><b>2</b></r></h>')
    assert vetting.plain_below(clean, TEXT_RULES, set())
    assert not vetting.plain_below(etree.fromstring("<h><r><a>1</a></r></h>"), vetting.UNVETTED, set())


QUICK_HANDS_OVER = {
    "a tag twice": "<r><a>1</a><a>2</a></r>",
    "a comment": "<r><a>1</a><!-- note --></r>",
    "text beside elements": "<r>mixed<a>1</a></r>",
    "a tail": "<r><a>1</a>tail</r>",
    "whitespace as a list item": "<r><member> </member></r>",
    "a nosync child below the record": "<r><item><nosync>1</nosync><a>1</a></item></r>",
}


@pytest.mark.parametrize("xml", QUICK_HANDS_OVER.values(), ids=QUICK_HANDS_OVER.keys())
def test_what_the_quick_check_cannot_read_from_tags_goes_to_the_full_check(xml: str) -> None:
    """Control: a name the full check has not admitted yet also goes there, and once admitted
    a plain record is answered, its own nosync child reported."""
    record = etree.fromstring(xml)
    assert vetting.vet_plain_record(record, tree.LIST_TAGS, {"a", "member", "item", "nosync", "r"}) is None
    plain = etree.fromstring("<r><nosync>1</nosync><a>1</a><item><b>2</b></item></r>")
    names_ok: set[str] = set()
    assert vetting.vet_plain_record(plain, tree.LIST_TAGS, names_ok) is None
    full = vetting.vet_record(plain, tree.LIST_TAGS, TEXT_RULES, names_ok)
    assert full == (True, *(vetting.vet_plain_record(plain, tree.LIST_TAGS, names_ok) or ()))
    assert full[2] is True


def test_on_a_generated_config_the_quick_check_answers_for_nearly_every_record(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sections of a generated config as a primary sends them: the conversion grafts what
    it grafts without the quick check, and asks the full check about under 5% of the records.
    Control: without the quick check the full check is asked about every record."""
    primary = parse_config_bytes(bench_module("generate").generate(0.5, seed=3)[0], "primary")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    param = sectionsmod.build_blob(primary, sections, declarations=REGISTRY.declarations()).param
    _sections, chunks, size, *_rest = sectionsmod.read_param(param)
    holders = list(etree.fromstring(sectionsmod.inflate(chunks, size)))
    asked: list[str] = []
    real = tree.vet_record

    def counted(record: etree._Element, *args: Any) -> tuple[bool, int, bool]:
        asked.append(str(record.tag))
        return real(record, *args)

    monkeypatch.setattr(tree, "vet_record", counted)
    outcomes = []
    for quick in (True, False):
        asked.clear()
        outcomes.append([grafted(holder, quick) for holder in holders])
        records = sum(deferred for _value, verdicts in outcomes[-1] for _path, deferred, _room in verdicts)
        if quick:
            assert len(asked) < 0.05 * records
        else:
            assert len(asked) >= records > 500
    assert outcomes[0] == outcomes[1]
