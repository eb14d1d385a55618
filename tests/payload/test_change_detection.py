"""Change detection's shortcut (`changes.differs_in_value`): two serialisations that differ where a
value changed are called different without parsing the old one back; everything fingerprints
ignore (comments, tails, attribute order, `<a></a>` against `<a/>`, namespace prefixes) is left
to the full comparison. The claim checked: "certainly different" is never said of two trees with
equal fingerprints (`support.xmlshapes.fingerprint`, what the merge counts as a change).
"""

from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.payload import changes
from support.xmlshapes import TEXTS, edit, elements, fingerprint


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elements(), st.integers(0, 10_000), TEXTS)
def test_certainly_different_only_where_fingerprints_differ(node: etree._Element, choice: int, text: str) -> None:
    before = etree.fromstring(etree.tostring(node))
    after = copy.deepcopy(before)
    edit(after, choice, text)
    old, new = changes.serial(before), changes.serial(after)
    expected = fingerprint(before) == fingerprint(after)
    if old != new and changes.differs_in_value(old, new):
        assert not expected
    assert changes.same_as([old], [after]) is expected


# Pairs whose bytes differ and whose fingerprints do not: each would be called different by a
# shortcut missing one of its checks.
SAME_VALUE = {
    "empty text against none": ("<a><b></b></a>", "<a><b/></a>"),
    "none against empty text": ("<a><b/></a>", "<a><b></b></a>"),
    "attribute order": ('<a><b x="1" y="2"/></a>', '<a><b y="2" x="1"/></a>'),
    "namespace prefix": ('<a xmlns:p="u"><p:b/></a>', '<a xmlns:q="u"><q:b/></a>'),
    "prefix of a child": ('<a xmlns:p="u" xmlns:q="u"><p:b/></a>', '<a xmlns:p="u" xmlns:q="u"><q:b/></a>'),
    "redundant declaration": ('<a xmlns="u"><b/></a>', '<a xmlns="u"><b xmlns="u"/></a>'),
    "text beside elements": ("<a>x<b/></a>", "<a>y<b/></a>"),
    "a tail": ("<a><b>1</b>t</a>", "<a><b>1</b>u</a>"),
    "text after a self-closing tag": ("<a><b/>t</a>", "<a><b/>u</a>"),
    "text after a comment holding markup": ("<a><!-- <b> -->x</a>", "<a><!-- <b> -->y</a>"),
    "text after a comment in a leaf": ("<a>x<!--c-->z</a>", "<a>x<!--c-->w</a>"),
    "text after a PI holding markup": ("<a><?p <b>?>x</a>", "<a><?p <b>?>y</a>"),
    "a comment added": ("<a><b>1</b></a>", "<a><b>1</b><!--c--></a>"),
    "a comment before the first child": ("<a><b/></a>", "<a><!--x--><b/></a>"),
}

DIFFERENT_VALUE = {
    "leaf text": ("<a><b>1</b></a>", "<a><b>2</b></a>"),
    "leaf text emptied": ("<a><b>1</b></a>", "<a><b></b></a>"),
    "attribute value": ('<a><b uuid="1">x</b></a>', '<a><b uuid="2">x</b></a>'),
    "attribute added": ("<a><b>x</b></a>", '<a><b v="1">x</b></a>'),
    "tag": ("<a><b>x</b></a>", "<a><c>x</c></a>"),
}


def _pair(old_xml: str, new_xml: str) -> tuple[etree._Element, etree._Element, bytes, bytes]:
    old, new = etree.fromstring(old_xml), etree.fromstring(new_xml)
    if new_xml.endswith("<b></b></a>"):  # libxml2 parses <b></b> as <b/>; the empty text is set
        new[0].text = ""
    if old_xml.endswith("<b></b></a>"):
        old[0].text = ""
    return old, new, changes.serial(old), changes.serial(new)


@pytest.mark.parametrize("name", sorted(SAME_VALUE))
def test_what_fingerprints_ignore_is_never_certainly_different(name: str) -> None:
    old, new, old_bytes, new_bytes = _pair(*SAME_VALUE[name])
    assert old_bytes != new_bytes and fingerprint(old) == fingerprint(new)  # a hazard indeed
    assert not changes.differs_in_value(old_bytes, new_bytes)
    assert changes.same_as([old_bytes], [new])


@pytest.mark.parametrize("name", sorted(DIFFERENT_VALUE))
def test_a_changed_value_is_certainly_different(name: str) -> None:
    old, new, old_bytes, new_bytes = _pair(*DIFFERENT_VALUE[name])
    assert fingerprint(old) != fingerprint(new)
    assert changes.differs_in_value(old_bytes, new_bytes)
    assert not changes.same_as([old_bytes], [new])


def test_a_changed_record_deep_in_a_long_list_is_decided_without_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    old = etree.Element("filter")
    for number in range(3000):
        rule = etree.SubElement(old, "rule", uuid=f"{number:08d}")
        etree.SubElement(rule, "descr").text = f"rule {number}"
    new = copy.deepcopy(old)
    new[2500][0].text = "changed"
    parsed: list[bytes] = []
    monkeypatch.setattr(changes, "reparse", lambda data: parsed.append(data) or etree.fromstring(data))
    assert not changes.same_as([changes.serial(old)], [new])
    assert parsed == []
    new[2500][0].append(etree.Comment("c"))  # control: the leaf holds a comment now: parsed back
    assert not changes.same_as([changes.serial(old)], [new])
    assert len(parsed) == 1
