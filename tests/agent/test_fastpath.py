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
import hashlib
import json
import math
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.agent import fastpath
from hasync.config import store as storemod
from hasync.config import tree, vetting
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore, parse_config_bytes
from hasync.config.tree import ATTRIBUTES
from hasync.core.errors import HaError, MergeError, MethodFault, RemoteFault
from hasync.payload import changes, merge, validate
from hasync.payload.build import REDACTED, build_payload
from hasync.sync.run import SyncOptions, SyncRun
from hasync.wire import protocol, xmlrpc
from hasync.wire import sections as sectionsmod
from hasync.wire.client import PeerClient
from support.bench import bench_module
from support.nodes import SYNC_PASSWORD, SYNC_USER, Pair, make_pair, running_agent
from support.paths import SHARED
from support.xmlshapes import SECTION_CHOICES, TAGS, TEXTS, configs, edit, elements, fingerprint

# --- reference copies of the code the speedups replaced ------------------------------------------

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_NUMERIC_KEY = re.compile(r"^(0|[1-9][0-9]*)$")
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


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
                    element.set(name, tree.scalar_text(attr))
            elif not key.endswith(ATTRIBUTES):
                element.extend(ref_build_elements(key, item))
        for key, item in value.items():
            if key != ATTRIBUTES and key.endswith(ATTRIBUTES):
                targets = [child for child in element if child.tag == key[: -len(ATTRIBUTES)]]
                if targets:
                    for name, attr in item.items():
                        targets[0].set(name, tree.scalar_text(attr))
    else:
        element.text = tree.scalar_text(value) or None
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
    if depth > validate.MAX_DEPTH:
        raise MergeError(f"{path or 'payload'}: nested deeper than {validate.MAX_DEPTH} levels")
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


# --- the merge speedups ----------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(elements(), st.integers(0, 1000), TEXTS)
def test_change_detection_agrees_with_fingerprints(node: etree._Element, choice: int, text: str) -> None:
    before = etree.fromstring(etree.tostring(node))
    after = copy.deepcopy(before)
    edit(after, choice, text)
    expected = fingerprint(before) == fingerprint(after)
    reparsed = changes.reparse(changes.serial(before))  # what merge_payload compares: the re-parsed snapshot
    assert changes.same_nodes([reparsed], [after]) is expected
    assert changes.same_nodes([before], [after]) is expected
    assert changes.same_nodes([reparsed], [after], known_different=True) is expected


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
    assert [etree.tostring(e) for e in tree.value_to_elements(tag, value)] == expected


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
        got: Any = validate._normalize(payload, "", 0)
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
    assert validate._normalize(payload, "", 0) is payload
    holes = {"sec": {"rule": {"0": {"a": "1"}, "2": {"a": "2"}}}}
    fixed = validate._normalize(holes, "", 0)
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


# --- the fast path rebuilds the compatible payload exactly ------------------------------------------

def compatible_payload(root: etree._Element, sections: list[str]) -> Any:
    """What the backup decodes on the compatible path (through the real IXR codec)."""
    payload = build_payload(root, sections)
    return xmlrpc.loads_request(xmlrpc.dumps_request(protocol.RESTORE_METHOD, [payload]))[1][0]


def assert_same_payload(root: etree._Element, sections: list[str]) -> None:
    try:
        expected = compatible_payload(root, sections)
    except HaError as exc:
        with pytest.raises((HaError, MethodFault)) as info:
            sectionsmod.decode_param(sectionsmod.build_blob(root, sections).param)
        assert str(exc) in str(info.value)
        return
    got = sectionsmod.decode_param(sectionsmod.build_blob(root, sections).param).payload
    assert got == expected
    assert json.dumps(got) == json.dumps(expected)  # key order too: it decides element order on the backup


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), st.lists(st.sampled_from(SECTION_CHOICES), min_size=1, max_size=5, unique=True))
def test_fast_path_payload_equals_the_compatible_one(root: etree._Element, sections: list[str]) -> None:
    root = etree.fromstring(etree.tostring(root))  # as parsed from a file
    assert_same_payload(root, sections)


def test_fast_path_payload_on_real_configs() -> None:
    real = SHARED / "fixtures" / "real"
    if not real.is_dir():
        pytest.skip("../shared is absent (expected in a user's clone)")
    registry = SyncItemRegistry.load()
    sections = registry.sections_for(registry.ids())
    checked = 0
    for path in sorted(real.glob("*.xml")):
        root = parse_config_bytes(path.read_bytes(), str(path))
        assert_same_payload(root, sections)
        checked += 1
    assert checked >= 5


def test_fast_path_payload_on_a_generated_config() -> None:
    generate = bench_module("generate")
    primary, _ = generate.generate(0.3, seed=11)
    root = parse_config_bytes(primary, "generated")
    registry = SyncItemRegistry.load()
    assert_same_payload(root, registry.sections_for(read_hasync(root).syncitems))


# --- bounded, checked decoding ----------------------------------------------------------------------


def test_inflate_refuses_a_zip_bomb_without_inflating_it() -> None:
    bomb = zlib.compress(b"\0" * (256 * 1024 * 1024), 9)  # 256 MiB of zeros in ~250 KB
    assert len(bomb) < 1024 * 1024
    with pytest.raises(MethodFault, match="past its declared size"):
        sectionsmod.inflate([bomb], 1024 * 1024)
    with pytest.raises(MethodFault, match="over the"):
        sectionsmod.inflate([bomb], 256 * 1024 * 1024, limit=64 * 1024 * 1024)
    # control: an honest declaration within the limit inflates
    small = zlib.compress(b"\0" * 4096)
    assert sectionsmod.inflate([small[:10], small[10:]], 4096) == b"\0" * 4096


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda p: p.update(format="other-2"), "unknown format"),
        (lambda p: p.update(compression="xz"), "unknown compression"),
        (lambda p: p.update(sha256="0" * 64), "sha256"),
        (lambda p: p.update(sections=["filter", "nat"]), "announced sections"),
        (lambda p: p.update(data=[p["data"][0][:-4]]), "truncated|corrupt"),
        (lambda p: p.update(data=[p["data"][0] + b"junk"]), "trailing"),
        (lambda p: p.update(size=p["size"] - 1), "declared size"),
        (lambda p: p.update(interfaces={"lan": "x"}), "interfaces"),
        (lambda p: p.update(size="12"), "integer"),
    ],
)
def test_bad_fast_path_params_are_refused(mangle: Any, message: str) -> None:
    root = etree.fromstring("<opnsense><filter><rule><descr>a</descr></rule></filter></opnsense>")
    param = sectionsmod.build_blob(root, ["filter"]).param
    param["interfaces"] = {}
    mangle(param)
    with pytest.raises(MethodFault, match=message):
        sectionsmod.decode_param(param)


def param_of(document: bytes, sections: list[str]) -> dict[str, Any]:
    """A well-formed fast-path param carrying `document` as it is (size and sha256 honest)."""
    return {"format": sectionsmod.FORMAT, "compression": "zlib", "size": len(document),
            "sha256": hashlib.sha256(document).hexdigest(), "sections": sections,
            "data": [zlib.compress(document)], "interfaces": {}}


def test_a_section_holding_foreign_elements_is_refused() -> None:
    document = b'<?xml version="1.0"?>\n<sections><section path="filter"><nat/></section></sections>'
    with pytest.raises(MethodFault, match=r"expected <filter> elements only"):
        sectionsmod.decode_param(param_of(document, ["filter"]))
    entity = b'<!DOCTYPE s [<!ENTITY e "x">]><sections><section path="filter"><filter>&e;</filter></section></sections>'
    with pytest.raises(MethodFault, match=r"DTD|not well-formed"):
        sectionsmod.decode_param(param_of(entity, ["filter"]))
    # control: the same param carrying a proper section decodes
    proper = b'<?xml version="1.0"?>\n<sections><section path="filter"><filter><rule/></filter></section></sections>'
    assert "filter" in sectionsmod.decode_param(param_of(proper, ["filter"])).payload


# --- records vetted while they are converted skip validation's walk ------------------------------------

def alias_document(record: str) -> bytes:
    return ('<?xml version="1.0"?>\n<sections><section path="OPNsense.Firewall.Alias"><Alias><aliases>'
            f'<alias uuid="u0"><name>clean</name></alias>{record}</aliases></Alias></section></sections>').encode()


HOSTILE_RECORDS = {
    "clean": '<alias uuid="u1"><name>a</name><descr>tab&#9;and&#10;newline</descr></alias>',
    "non-ASCII tag": '<alias uuid="u1"><näme>a</näme></alias>',
    "namespaced tag": '<alias xmlns:p="urn:x" uuid="u1"><p:name>a</p:name></alias>',
    "non-ASCII attribute": '<alias uuid="u1" é="1"><name>a</name></alias>',
    "namespaced attribute": '<alias xmlns:p="urn:x" uuid="u1" p:x="1"><name>a</name></alias>',
    "redaction marker": f'<alias uuid="u1"><descr>{REDACTED}</descr></alias>',
    "marker as references": '<alias uuid="u1"><descr>&#42;' + REDACTED[1:] + '</descr></alias>',
    "marker in an attribute": f'<alias uuid="u1" x="{REDACTED}"><name>a</name></alias>',
    "too deep": '<alias uuid="u1">' + "<x>" * 70 + "1" + "</x>" * 70 + "</alias>",
    "deep but within": '<alias uuid="u1">' + "<x>" * 20 + "1" + "</x>" * 20 + "</alias>",
}


def decoded_alias(record: str) -> Any:
    """The fast path's payload for an alias section holding `record` after a clean one."""
    return sectionsmod.decode_param(param_of(alias_document(record), ["OPNsense.Firewall.Alias"])).payload


def merge_outcome(payload: Any) -> str | bytes:
    """What merging `payload` into a small backup gives: its error, or the merged config."""
    root = etree.fromstring(b"<opnsense><OPNsense><Firewall><Alias><aliases/></Alias></Firewall></OPNsense></opnsense>")
    try:
        merge.merge_payload(root, payload, SyncItemRegistry.load())
    except MergeError as exc:
        return str(exc)
    return etree.tostring(root)


def vetting_changes_nothing() -> dict[str, bool]:
    """Per hostile record: whether the fast path's payload (records vetted while converted) merges
    exactly as the same payload with plain dicts, which validation walks in full."""
    same = {}
    for name, record in HOSTILE_RECORDS.items():
        decoded = decoded_alias(record)
        plain = json.loads(json.dumps(decoded))  # the same value, nothing recorded for it
        same[name] = merge_outcome(decoded) == merge_outcome(plain)
    return same


def test_vetted_records_merge_or_are_refused_exactly_as_walked_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    assert all(vetting_changes_nothing().values())
    outcomes = {name: merge_outcome(json.loads(json.dumps(decoded_alias(record))))
                for name, record in HOSTILE_RECORDS.items()}
    refused = {name for name, outcome in outcomes.items() if isinstance(outcome, str)}
    assert refused == set(HOSTILE_RECORDS) - {"clean", "deep but within"}  # the records really are hostile
    # control: rules that vet every name and text let the hostile records through the fast path
    monkeypatch.setattr(sectionsmod, "TEXT_RULES", vetting.TextRules(name_ok=lambda _name: True, refused=frozenset()))
    slipped = {name for name, same in vetting_changes_nothing().items() if not same}
    assert slipped == refused - {"too deep"}  # (depth is counted, not taken from the rules)


def test_validation_skips_a_vetted_record_only_where_it_has_room() -> None:
    bad = {"bad key": "1"}  # what validation refuses when it walks it
    payload = {"filter": {"rule": [bad]}}  # `bad` sits 3 levels down
    grafts = tree.Grafts(validate.TEXT_RULES)
    grafts.add(bad, etree.Element("rule"), height=validate.MAX_DEPTH - 3)
    assert validate.normalize_payload(payload, grafts.vetted) is payload  # not walked
    with pytest.raises(MergeError, match="bad key"):
        validate.normalize_payload(payload)  # control: walked
    grafts.add(bad, etree.Element("rule"), height=validate.MAX_DEPTH - 2)  # one level too many
    with pytest.raises(MergeError, match="bad key"):
        validate.normalize_payload(payload, grafts.vetted)
    grafts.add(bad, etree.Element("rule"))  # converted, but something in it failed the rules
    with pytest.raises(MergeError, match="bad key"):
        validate.normalize_payload(payload, grafts.vetted)


@pytest.mark.parametrize("code", [*range(0x20), 0xFFFE, 0xFFFF])
def test_parsed_text_never_holds_a_character_validation_refuses(code: int) -> None:
    """Why vetting checks no characters (`vetting.TextRules`): the parser refuses them first."""
    char = chr(code)
    refused = bool(validate._XML_INVALID.search(char))
    for text in (f"&#{code};", char):
        record = f'<alias uuid="u1"><descr>a{text}b</descr></alias>'.replace("\r", "&#13;")
        if refused:
            with pytest.raises(MethodFault, match="not well-formed"):
                decoded_alias(record)
        else:  # control: the characters validation accepts (tab, LF, CR) parse and arrive
            descr = decoded_alias(record)["OPNsense"]["Firewall"]["Alias"]["aliases"]["alias"][1]["descr"]
            assert descr.startswith("a") and descr.endswith("b") and len(descr) == 3


# --- end to end over TLS: negotiation and byte-identical results --------------------------------------


def revision_time_masked(path: Path) -> bytes:
    data = path.read_bytes()
    return re.sub(rb"(<revision>.*?<time>)[^<]*(</time>)", rb"\1T\2", data, count=1, flags=re.S)


def new_pair(tmp_path: Path, name: str) -> Pair:
    (tmp_path / name).mkdir()
    return make_pair(tmp_path / name)


def make_generated_pair(tmp_path: Path, name: str, size_mb: float = 0.3) -> Pair:
    pair = new_pair(tmp_path, name)
    primary, backup = bench_module("generate").generate(size_mb, seed=5)
    (pair.primary / "config.xml").write_bytes(primary)
    (pair.backup / "config.xml").write_bytes(backup)
    return pair


def sync(pair: Pair, **options: Any) -> Any:
    return SyncRun(ConfigStore(pair.primary), SyncItemRegistry.load(), SyncOptions(**options)).run()


@pytest.mark.parametrize("kind", ["fixtures", "generated"])
def test_fast_and_compatible_paths_leave_byte_identical_backups(tmp_path: Path, kind: str) -> None:
    pairs = {}
    for name in ("compatible", "fast"):
        pairs[name] = make_generated_pair(tmp_path, name) if kind == "generated" else new_pair(tmp_path, name)
    results = {}
    for name, pair in pairs.items():
        with running_agent(pair) as server:
            pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
            results[name] = sync(pair, full=True, fast_path=(name == "fast"))
    assert results["compatible"].status == "ok", results["compatible"].message
    assert results["fast"].status == "ok", results["fast"].message
    assert results["compatible"].transfer == "XML-RPC" and results["fast"].transfer == "fast path"
    compatible = revision_time_masked(pairs["compatible"].backup / "config.xml")
    fast = revision_time_masked(pairs["fast"].backup / "config.xml")
    assert compatible == fast
    # control: the sync really changed the backup (the comparison is not between two untouched files)
    original = make_generated_pair(tmp_path, "original") if kind == "generated" else new_pair(tmp_path, "original")
    assert revision_time_masked(original.backup / "config.xml") != fast
    # and the fast path sent much less than the compatible call
    assert results["fast"].bytes_sent < results["compatible"].bytes_sent


def test_fast_path_only_with_an_agent_that_offers_it(tmp_path: Path) -> None:
    pair = new_pair(tmp_path, "n")
    with running_agent(pair, extensions=False) as server:  # stands in for a stock OPNsense backup
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        methods = PeerClient(server.url, "hasync", "demo-sync-password").call("system.listMethods")
        assert sectionsmod.METHOD not in methods
        stock = sync(pair, full=True)
    assert stock.status == "ok" and stock.transfer == "XML-RPC"
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        caps = PeerClient(server.url, "hasync", "demo-sync-password").call("hasync.capabilities")
        assert protocol.FAST_PATH_FEATURE in caps["features"]
        ours = sync(pair, full=True)
        forced = sync(pair, full=True, fast_path=False)
    assert ours.transfer == "fast path" and "fast path offered" in ours.steps[1].detail
    assert forced.transfer == "XML-RPC"


def test_the_agent_refuses_a_zip_bomb_over_the_wire(tmp_path: Path) -> None:
    pair = new_pair(tmp_path, "n")
    bomb = zlib.compress(b"<" * (64 * 1024 * 1024), 9)
    param = {"format": sectionsmod.FORMAT, "compression": "zlib", "size": 1000, "sha256": "0" * 64,
             "sections": ["filter"], "data": [bomb]}
    before = (pair.backup / "config.xml").read_bytes()
    with running_agent(pair) as server:
        client = PeerClient(server.url, "hasync", "demo-sync-password")
        with pytest.raises(RemoteFault, match="declared size"):
            client.call(sectionsmod.METHOD, [param])
        assert isinstance(client.call("opnsense.firmware_version"), dict)  # the agent is fine
    assert (pair.backup / "config.xml").read_bytes() == before


# --- the agent's config cache -------------------------------------------------------------------------


def test_config_cache_parses_once_per_version_of_the_file(tmp_path: Path) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 4e9)  # every file looks old
    first = cache.root()
    assert cache.root() is first and cache.loads == 1
    digests, unknown = cache.digests(["users", "nope"])
    assert unknown == ["nope"] and cache.digests(["users"])[0] == digests and cache.loads == 1
    with ConfigStore(pair.backup).transaction("test: change") as root:  # another writer
        root.find("system/hostname").text = "renamed"  # type: ignore[union-attr]
    assert cache.root().findtext("system/hostname") == "renamed" and cache.loads == 2


def test_config_cache_checks_content_while_the_file_is_young(tmp_path: Path, monkeypatch: Any) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    # a file system whose timestamps cannot tell two writes apart: identity is size only
    monkeypatch.setattr(fastpath, "file_key", lambda path: (0, 0, path.stat().st_size, 0, 0))
    now = [0.5]
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: now[0])
    assert cache.root().findtext("system/hostname") == "fw-b"
    data = store.config_path.read_bytes()
    store.config_path.write_bytes(data.replace(b"<hostname>fw-b<", b"<hostname>fw-c<"))  # same size
    assert cache.root().findtext("system/hostname") == "fw-c"  # seen through the content hash
    now[0] = 10.0  # old enough now: identity alone is trusted after one more content check
    cache.root()
    store.config_path.write_bytes(data)
    assert cache.root().findtext("system/hostname") == "fw-c"  # control: without the check it is not seen


def test_the_agent_parses_config_xml_once_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash recovery at start parses config.xml, and the read cache keeps that tree: a start
    and the first login parse once (each parse of a 20 MB config leaves heap behind). Control:
    recovering without handing the tree over parses twice."""
    pair = new_pair(tmp_path, "n")
    parses = []
    parse = storemod.parse_config_bytes

    def counted(data: bytes, source: str) -> Any:
        parses.append(source)
        return parse(data, source)

    monkeypatch.setattr(storemod, "parse_config_bytes", counted)
    monkeypatch.setattr(fastpath, "parse_config_bytes", counted)
    for handed_over in (True, False):
        if not handed_over:
            monkeypatch.setattr(fastpath.ConfigCache, "recover", lambda cache: cache.store.recover())
        parses.clear()
        with running_agent(pair) as agent:
            client = PeerClient(f"https://127.0.0.1:{agent.server_address[1]}/xmlrpc.php", SYNC_USER, SYNC_PASSWORD)
            assert client.call("opnsense.firmware_version", [])
        assert len(parses) == (1 if handed_over else 2), parses


def test_the_tree_kept_at_start_is_checked_by_content_while_the_file_is_young(tmp_path: Path,
                                                                               monkeypatch: Any) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    identity = lambda path: (0, 0, path.stat().st_size, 0, 0)  # noqa: E731 (timestamps that tell nothing)
    monkeypatch.setattr(fastpath, "file_key", identity)
    monkeypatch.setattr(storemod, "file_key", identity)
    for now in (0.5, 10.0):  # young, then (control) old enough to be trusted by identity
        cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda now=now: now)
        cache.recover()
        data = store.config_path.read_bytes()
        store.config_path.write_bytes(data.replace(b"<hostname>fw-b<", b"<hostname>fw-c<"))  # same size
        assert cache.root().findtext("system/hostname") == ("fw-c" if now < 1 else "fw-b")
        assert cache.loads == (2 if now < 1 else 1)
        store.config_path.write_bytes(data)


def test_logins_remember_verified_passwords_never_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    import bcrypt

    from hasync.agent import auth

    calls: list[str] = []
    original = auth._verify_hash
    monkeypatch.setattr(auth, "_verify_hash", lambda password, stored: calls.append(password) or
                        original(password, stored))
    monkeypatch.setattr(auth, "_VERIFIED", {})
    stored = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()
    assert auth.verify_hash("right", stored) and auth.verify_hash("right", stored)
    assert calls == ["right"]  # the second login did not pay for bcrypt
    assert not auth.verify_hash("wrong", stored) and not auth.verify_hash("wrong", stored)
    assert calls == ["right", "wrong", "wrong"]  # a guess always pays the full cost
    changed = bcrypt.hashpw(b"right", bcrypt.gensalt(4)).decode()  # the password was set again
    assert auth.verify_hash("right", changed) and calls[-1] == "right" and len(calls) == 4
    monkeypatch.setattr(auth, "VERIFIED_TTL", 0.0)
    assert auth.verify_hash("right", stored) and len(calls) == 5  # expired


# --- the IXR codec speedups -----------------------------------------------------------------------


def ref_escape(text: str) -> str:
    if _XML_INVALID.search(text):
        raise ValueError("string contains characters that XML 1.0 cannot carry")
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("'", "&#039;"))


def ref_encode(value: Any) -> str:
    if isinstance(value, bool):
        return f"<boolean>{1 if value else 0}</boolean>"
    if isinstance(value, int):
        return f"<int>{value}</int>"
    if isinstance(value, float):
        return f"<double>{value!r}</double>"
    if isinstance(value, str):
        return f"<string>{ref_escape(value)}</string>"
    if isinstance(value, bytes):
        import base64

        return f"<base64>{base64.b64encode(value).decode('ascii')}</base64>"
    if isinstance(value, dict) and value:
        return "<struct>\n" + "".join(f"  <member><name>{ref_escape(str(k))}</name><value>{ref_encode(v)}"
                                      "</value></member>\n" for k, v in value.items()) + "</struct>"
    if isinstance(value, (list, tuple, dict)):
        return "<array><data>\n" + "".join(f"  <value>{ref_encode(v)}</value>\n" for v in value) + "</data></array>"
    return "<string></string>"


wire_values = st.recursive(
    st.one_of(st.text(max_size=8), st.integers(-(2**63), 2**63 - 1), st.booleans(), st.none(),
              st.floats(allow_nan=False, allow_infinity=False), st.binary(max_size=6)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.tuples(inner),
                            st.dictionaries(st.one_of(st.text(max_size=5), st.integers(0, 3)), inner, max_size=3)),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(wire_values)
def test_encoder_output_is_byte_identical_to_the_straightforward_one(value: Any) -> None:
    try:
        expected: Any = ref_encode(value)
    except ValueError as exc:
        expected = exc
    try:
        got: Any = xmlrpc.encode_value(value)
    except ValueError as exc:
        got = exc
    if isinstance(expected, ValueError):
        assert isinstance(got, ValueError) and str(got) == str(expected)
    else:
        assert got == expected


def ref_decode(body: bytes) -> Any:
    """The general decoder alone (the fast shapes switched off)."""
    root = xmlrpc._parse(body)
    node = root.find("params/param/value")
    assert node is not None
    return xmlrpc._decode_value_general(node)


MESSY = [
    b"<struct><member><value><string>v</string></value><name>reversed</name></member></struct>",
    b"<struct><!--c--><member><name>a</name><!--c--><value>x</value></member></struct>",
    b"<struct><member><name>a</name><value><string>1</string></value><name>b</name></member></struct>",
    b"<struct><bogus/></struct>",
    b"<array><!--c--><data><value><string>a</string></value><!--c--><value/></data></array>",
    b"<array><data/><data/></array>",
    b"<array><data><nope/></data></array>",
    b"<string>a<!--c-->b</string>",
    b"<string><b/></string>",
    b"<!--c--><string>x</string>",
    b"<string>x</string><string>y</string>",
    b"  text  ",
    b"<struct><member><name>n</name><value>   </value></member></struct>",
    b"<array><data><value><int>7</int></value><value><boolean>1</boolean></value></data></array>",
]


@pytest.mark.parametrize("inner", MESSY)
def test_decoder_fast_shapes_agree_with_the_general_decoder(inner: bytes) -> None:
    body = b"<?xml version=\"1.0\"?><methodResponse><params><param><value>" + inner + \
        b"</value></param></params></methodResponse>"
    try:
        expected: Any = ref_decode(body)
    except xmlrpc.XmlRpcDecodeError as exc:
        expected = exc
    node = xmlrpc._parse(body).find("params/param/value")
    assert node is not None
    try:
        got: Any = xmlrpc._decode_value(node)
    except xmlrpc.XmlRpcDecodeError as exc:
        got = exc
    if isinstance(expected, Exception):
        assert isinstance(got, xmlrpc.XmlRpcDecodeError) and str(got) == str(expected)
    else:
        assert got == expected


@settings(max_examples=300, deadline=None)
@given(wire_values)
def test_decoder_round_trip_agrees_with_the_general_decoder(value: Any) -> None:
    try:
        body = xmlrpc.dumps_response(value)
    except ValueError:
        return
    assert xmlrpc.loads_response(body) == ref_decode(body)


def test_config_cache_adopts_what_the_store_writes(tmp_path: Path) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 4e9)
    cache.root()
    with store.transaction("test: change") as root:
        root.find("system/hostname").text = "written"  # type: ignore[union-attr]
    assert cache.root() is root and cache.loads == 1  # the written tree, not a re-parse
    assert cache.root().findtext("system/hostname") == "written"
    # control: a write that does not go through this store is seen by its file identity
    other = ConfigStore(pair.backup)
    with other.transaction("test: elsewhere") as root2:
        root2.find("system/hostname").text = "elsewhere"  # type: ignore[union-attr]
    assert cache.root().findtext("system/hostname") == "elsewhere" and cache.loads == 2


def first_user_password(root: etree._Element) -> str:
    return root.findtext("system/user/password") or ""


def test_a_writer_takes_the_cached_tree_and_logins_keep_their_copy(tmp_path: Path) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 4e9)
    login_view = cache.accounts()  # what a login running beside the merge holds
    cached = cache.root()
    hostname, password = cached.findtext("system/hostname"), first_user_password(cached)
    with pytest.raises(RuntimeError), store.transaction("test: failing merge") as root:
        assert root is cached and cache.loads == 1  # taken over, not parsed again
        root.find("system/hostname").text = "half-merged"  # type: ignore[union-attr]
        root.find("system/user/password").text = "changed"  # type: ignore[union-attr]
        raise RuntimeError("merge failed half way")
    # the half-merged tree is gone: the next reader parses the untouched file
    assert cache.root() is not cached and cache.root().findtext("system/hostname") == hostname
    assert cache.loads == 2
    assert first_user_password(login_view) == password  # a login's copy was never touched
    cached = cache.root()
    with store.transaction("test: merge") as root:
        assert root is cached and cache.loads == 2
        root.find("system/user/password").text = "changed"  # type: ignore[union-attr]
    assert cache.root() is root and cache.loads == 2  # what was written becomes the cache
    assert first_user_password(cache.accounts()) == "changed"  # a new copy for later logins
    assert first_user_password(login_view) == password


def test_a_writer_never_waits_for_a_reader_of_the_cache(tmp_path: Path) -> None:
    """A digest request holds the cache and then reads config.xml, so it waits for a writer's
    exclusive lock: a writer that waited for the cache in turn would wait forever."""
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    store.lock_timeout = 5.0  # bounds the reader's wait should the writer ever block it
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 4e9)
    cached = cache.root()
    reading = threading.Event()

    def reader() -> None:
        with cache.lock:
            reading.set()
            store.read_bytes()

    take = store.take_parsed
    assert take is not None

    def take_beside_a_reader(locked_sha256: Any) -> etree._Element | None:
        threading.Thread(target=reader, daemon=True).start()
        assert reading.wait(5)
        return take(locked_sha256)

    store.take_parsed = take_beside_a_reader
    written: list[etree._Element] = []

    def writer() -> None:
        with store.transaction("test: merge beside a reader") as root:
            root.find("system/hostname").text = "merged"  # type: ignore[union-attr]
        written.append(root)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    thread.join(10)
    assert written, "the writer waited for the cache a reader holds while it waits for the file"
    assert written[0] is not cached  # it parsed its own; the reader kept the cached tree
    assert cached.findtext("system/hostname") != "merged"


def merged_twice(tmp_path: Path, name: str, monkeypatch: Any, reindenting: bool) -> tuple[bytes, bytes]:
    """Merge the primary's VIPs into a backup whose agent cache adopts what it writes, then an empty
    VIP set into that same tree, and the empty set into a fresh parse of the file between the two."""
    if reindenting:  # control: the store as it wrote before, re-indenting the tree it was given
        def old_write(root: etree._Element, out: Any) -> None:
            etree.indent(root, space="  ")
            out.write(b'<?xml version="1.0"?>\n' + etree.tostring(root, encoding="utf-8") + b"\n")
        monkeypatch.setattr(storemod, "write_config", old_write)
    pair = new_pair(tmp_path, name)
    registry = SyncItemRegistry.load()
    vips = {"virtualip": tree.element_to_value(ConfigStore(pair.primary).load())["virtualip"]}
    store = ConfigStore(pair.backup)
    with store.transaction("test: a backup without VIPs of its own") as root:
        root.find("virtualip").clear()  # type: ignore[union-attr]
    cache = fastpath.ConfigCache(store, registry, clock=lambda: 4e9)
    for payload in (vips, {"virtualip": []}):
        if payload is not vips:
            fresh = tmp_path / f"{name}-fresh"
            fresh.mkdir()
            (fresh / "config.xml").write_bytes(store.config_path.read_bytes())
        held = cache.root()
        with store.transaction(merge.revision_description(payload)) as root:
            assert root is held  # taken over from the cache: parsed once at the start, then adopted
            merge.merge_payload(root, payload, registry)
    with ConfigStore(fresh).transaction(merge.revision_description({"virtualip": []})) as root:
        merge.merge_payload(root, {"virtualip": []}, registry)
    return revision_time_masked(store.config_path), revision_time_masked(fresh / "config.xml")


def test_merging_into_the_tree_the_agent_wrote_equals_merging_into_a_parse(tmp_path: Path,
                                                                         monkeypatch: Any) -> None:
    kept, fresh = merged_twice(tmp_path, "now", monkeypatch, reindenting=False)
    assert kept == fresh and b"<virtualip/>" in fresh
    # control: a store that re-indents the tree it writes leaves whitespace in it that a parse does
    # not have, and a section the merge empties is written differently
    kept, fresh = merged_twice(tmp_path, "before", monkeypatch, reindenting=True)
    assert kept != fresh


def test_a_writer_parses_when_the_cached_tree_is_not_the_file(tmp_path: Path, monkeypatch: Any) -> None:
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 4e9)
    cached = cache.root()
    with ConfigStore(pair.backup).transaction("test: elsewhere") as other:  # another writer
        other.find("system/hostname").text = "elsewhere"  # type: ignore[union-attr]
    with store.transaction("test: merge") as root:
        assert root is not cached and root.findtext("system/hostname") == "elsewhere"
    # a young entry: a same-size write in the same timestamp tick is caught by content, read
    # through the writer's own locked handle (a second lock on the file would wait forever)
    monkeypatch.setattr(fastpath, "file_key", lambda path: (0, 0, path.stat().st_size, 0, 0))
    young = fastpath.ConfigCache(ConfigStore(pair.backup), SyncItemRegistry.load(), clock=lambda: 0.5)
    cached = young.root()
    data = young.store.config_path.read_bytes()
    young.store.config_path.write_bytes(data.replace(b"<hostname>elsewhere<", b"<hostname>elsewherX<"))
    with young.store.transaction("test: merge") as root:
        assert root is not cached and root.findtext("system/hostname") == "elsewherX"
    cached = young.root()
    with young.store.transaction("test: merge") as root:  # control: unchanged, young or not
        assert root is cached


@pytest.mark.parametrize("moved_on", [True, False], ids=["clock moved on", "control: same tick"])
def test_after_its_own_write_the_cache_checks_content_only_while_it_must(tmp_path: Path, monkeypatch: Any,
                                                                        moved_on: bool) -> None:
    """A tree the cache adopts from a write is checked by content on use only while a later write
    could carry the same timestamp (`ConfigStore.stamped_past`); each check hashes the whole file,
    and a merge used to be followed by three."""
    pair = new_pair(tmp_path, "n")
    store = ConfigStore(pair.backup)
    cache = fastpath.ConfigCache(store, SyncItemRegistry.load(), clock=lambda: 0.0)  # every write looks young
    monkeypatch.setattr(store, "stamped_past", lambda mtime_ns, key: moved_on)
    hashed: list[str] = []
    original = ConfigStore.content_sha256

    def hashing(self: ConfigStore) -> str:
        hashed.append("config.xml")
        return original(self)

    monkeypatch.setattr(ConfigStore, "content_sha256", hashing)
    held = cache.root()
    with store.transaction("test: merge") as root:
        assert root is held
        root.find("system/hostname").text = "merged"  # type: ignore[union-attr]
    for _ in range(3):
        assert cache.root() is root
    assert len(hashed) == (0 if moved_on else 3)
    # either way a later write is seen: by its timestamp, or (same tick) by content
    data, merged_key = store.config_path.read_bytes(), fastpath.file_key(store.config_path)
    if moved_on:
        time.sleep(0.05)  # as claimed: the file system's clock has left the merge's tick
    store.config_path.write_bytes(data.replace(b"<hostname>merged<", b"<hostname>merges<"))  # same size
    if not moved_on:  # a file system that cannot tell this write from the merge's by time
        monkeypatch.setattr(fastpath, "file_key", lambda path: merged_key)
    assert cache.root().findtext("system/hostname") == "merges"
