"""Grafting: the fast path's merge moves the elements a record was decoded from into config.xml
instead of rebuilding them from the dict (`tree.Grafts`, `merge._replace`).

The claim is exactness: a grafted merge writes the very bytes the rebuilding merge writes. It
is checked three ways: every element `_convert` calls exact rebuilds to itself (random shapes,
including everything a dict loses); a merge of a decoded payload with and without its grafts
gives byte-identical configs and equal reports (random configs, the real fixtures and a
generated config); and each hazard `_convert` looks for is shown to break a rebuild, so no
check is there for nothing (the controls). `HASYNC_GRAFT_EXAMPLES=4000` searches longer (the
default 300 found both in-place edits `_convert` and the decoder now rule out).
"""

from __future__ import annotations

import copy
import hashlib
import json
import operator
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from hasync.agent import fastpath
from hasync.agent.server import CallContext, Dispatcher
from hasync.config import tree, vetting
from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import parse_config_bytes, serialize
from hasync.core.errors import HaError
from hasync.payload import digest, merge, validate
from hasync.payload.build import build_payload
from hasync.wire import protocol
from hasync.wire import sections as sectionsmod
from support.bench import bench_module
from support.paths import FIXTURES, SHARED
from support.xmlshapes import SECTION_CHOICES, TEXTS, configs, fingerprint, untidy

REGISTRY = SyncItemRegistry.load()


def as_grafted(element: etree._Element) -> bytes:
    """`element` as a graft moves it: without its own tail (`Grafts.take`), all else as it is
    (`serialize` writes libxml2's formatted output, which keeps whitespace beside elements)."""
    copied = copy.deepcopy(element)
    copied.tail = None
    return etree.tostring(copied)


def rebuilt(element: etree._Element, value: dict[str, Any]) -> bytes:
    return etree.tostring(tree.value_to_elements(str(element.tag), value)[0])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(untidy())
def test_every_element_called_exact_rebuilds_to_itself(node: etree._Element) -> None:
    holder = etree.fromstring(b"<holder>" + etree.tostring(node) + b"</holder>")
    grafts = tree.Grafts()
    assert tree.element_to_grafts(holder, grafts) == tree.element_to_value(holder)  # the same conversion
    for value, element in grafts:
        assert rebuilt(element, value) == as_grafted(element)


HAZARDS = {
    "a comment": b"<r><a>1</a><!-- note --></r>",
    "text beside elements": b"<r>mixed<a>1</a></r>",
    "a tail that is text": b"<r><a>1</a>tail</r>",
    "interleaved tags": b"<r><a>1</a><b>2</b><a>3</a></r>",
    "leaf attributes on a later item": b"<r><a>1</a><a k=\"v\">2</a></r>",
    "an empty first list item followed by more": b"<r><member/><member>2</member></r>",
    "a whitespace-only lone list item": b"<r><member> </member></r>",
    "whitespace beside elements": b"<r>\n  <a>1</a></r>",
    "a whitespace tail": b"<r><a>1</a>\n</r>",
}


@pytest.mark.parametrize("xml", HAZARDS.values(), ids=HAZARDS.keys())
def test_each_hazard_breaks_a_rebuild_and_is_never_grafted(xml: bytes) -> None:
    holder = etree.fromstring(b"<h>" + xml + b"</h>")
    element = holder[0]
    grafts = tree.Grafts()
    value = tree.element_to_grafts(holder, grafts)["r"]
    assert rebuilt(element, value) != as_grafted(element)  # control: the rebuild really differs
    assert grafts.take(value, "r") is None


@pytest.mark.parametrize(("xml", "inner_edited"), [
    (b"<r><item><nosync>1</nosync><a>1</a></item><item><a>2</a></item></r>", False),  # a nosync record
    (b"<r><item><a nosync=\"1\">1</a></item><item><a>2</a></item></r>", True),  # a leaf's attribute struct
    (b"<r><item nosync=\"1\"><a>1</a></item><item><a>2</a></item></r>", True),  # a record's own attributes
])
def test_a_struct_remove_nosync_edits_is_never_grafted(xml: bytes, inner_edited: bool) -> None:
    """remove_nosync deletes such structs from the dict holding them, in place, after the
    conversion: that dict no longer says what its element says (a nosync record itself is
    dropped whole, so it may stay grafted: it never reaches the merge)."""
    holder = etree.fromstring(b"<h>" + xml + b"</h>")
    grafts = tree.Grafts()
    value = tree.element_to_grafts(holder, grafts)["r"]
    assert grafts.take(value, "r") is None
    assert (grafts.take(value["item"][0], "item") is None) is inner_edited
    assert grafts.take(value["item"][1], "item") is not None  # its clean sibling is


def test_take_refuses_a_different_dict_and_gives_an_element_once() -> None:
    holder = etree.fromstring(b"<h><r><a>1</a></r></h>")
    grafts = tree.Grafts()
    value = tree.element_to_grafts(holder, grafts)["r"]
    assert grafts.take(dict(value), "r") is None  # an equal copy is not the decoded dict
    assert grafts.take(value, "other") is None
    assert grafts.take(value, "r") is holder[0]
    assert grafts.take(value, "r") is None


# --- merges with and without grafts ------------------------------------------------------------------


def merged(backup: etree._Element, payload: Any) -> tuple[bytes, dict[str, Any]] | str:
    root = copy.deepcopy(backup)
    try:
        report = merge.merge_payload(root, payload, REGISTRY, accept_unknown=True)
    except HaError as exc:
        return f"{type(exc).__name__}: {exc}"
    # the report's changed sections, against a plain comparison of each section before and after
    expected = [key for key in report.merged_keys
                if [fingerprint(n) for n in backup if n.tag == key] != [fingerprint(n) for n in root if n.tag == key]]
    assert report.changed_sections == expected
    # and its changed points (what selects the services to restart), each against the same
    # comparison of the nodes at that path
    points = validate.check_payload(validate.normalize_payload(dict(payload)), REGISTRY, accept_unknown=True)
    expected_points = [point for point in points if [fingerprint(n) for n in tree.find_path(backup, point)]
                       != [fingerprint(n) for n in tree.find_path(root, point)]]
    if report.vips_added or report.vips_changed or report.vips_removed:  # a VIP change always counts
        expected_points += [] if "virtualip" in expected_points else ["virtualip"]
    assert report.sections == expected_points
    # the items the merge vouches for read the same afterwards: the agent's cache keeps their
    # digests (`ConfigCache.note_merged`)
    unchanged = set(report.unchanged_points)
    vouched = [item.id for item in REGISTRY.resolve(REGISTRY.ids()) if set(item.sections) <= unchanged]
    assert digest.backup_item_digests(backup, REGISTRY, vouched) == digest.backup_item_digests(root, REGISTRY, vouched)
    if isinstance(payload, tree.GraftedPayload):
        # the post-merge digests reuse the moved records' dicts (agent.fastpath._warm_digests):
        # the same digests as converting the merged tree afresh
        ids = REGISTRY.ids()
        fresh, _ = digest.backup_item_values(root, REGISTRY, ids)
        reused, _ = digest.backup_item_values(root, REGISTRY, ids, payload.grafts.moved)
        assert fresh == reused
        assert digest.item_digests(fresh, REGISTRY) == digest.item_digests(reused, REGISTRY)
        # and item by item, as the agent computes them (one item's values in memory at a time)
        assert digest.backup_item_digests(root, REGISTRY, [*ids, "nope"], payload.grafts.moved) == \
            (digest.item_digests(fresh, REGISTRY), ["nope"])
    return serialize(root), report.public_dict()


def test_a_section_changed_only_around_its_points_is_reported_changed() -> None:
    """Change detection compares a section's own shape around its points too
    (`changes.SectionsBefore`): here the merge changes only the container above an unchanged point."""
    backup = parse_config_bytes((FIXTURES / "nodes" / "backup.xml").read_bytes(), "backup")
    alias = tree.element_to_value(backup)["OPNsense"]["Firewall"]["Alias"]
    outcome = merged(backup, {"OPNsense": {"@attributes": {"version": "9.9"}, "Firewall": {"Alias": alias}}})
    assert not isinstance(outcome, str), outcome
    report = outcome[1]
    assert "OPNsense" in report["changed_sections"] and "OPNsense.Firewall.Alias" not in report["sections"]


def assert_grafting_changes_nothing(primary: etree._Element, backup: etree._Element, sections: list[str]) -> int:
    """Merge the decoded fast-path payload into `backup` with its grafts and without; the number of grafts."""
    try:
        param = sectionsmod.build_blob(primary, sections).param
        grafted = sectionsmod.decode_param(param).payload
    except HaError:
        return 0
    plain = dict(sectionsmod.decode_param(param).payload)  # a plain dict: the merge builds every element
    assert not isinstance(plain, tree.GraftedPayload)
    available = len(grafted.grafts) if isinstance(grafted, tree.GraftedPayload) else 0
    assert merged(backup, grafted) == merged(backup, plain)
    assert_as_sent_is_the_primarys_digest(primary, backup, sections, param)
    return available


def assert_as_sent_is_the_primarys_digest(primary: etree._Element, backup: etree._Element, sections: list[str],
                                          param: dict[str, Any]) -> list[str]:
    """Every item the merge reports written as sent (`MergeReport.as_sent_points`) digests on
    the backup exactly as the primary digests what it sent: the agent answers "as sent" for
    those instead of computing them. The items claimed."""
    payload = sectionsmod.decode_param(param).payload
    root = copy.deepcopy(backup)
    try:
        report = merge.merge_payload(root, payload, REGISTRY, accept_unknown=True)
        sent = build_payload(primary, sections, REGISTRY.declarations())
    except HaError:
        return []
    points = set(report.as_sent_points)
    claimed = [item for item in REGISTRY.resolve(REGISTRY.ids()) if set(item.sections) <= points]
    for item in claimed:
        primary_digest = digest.item_digest(digest.value_item_value(sent, item.sections), REGISTRY)
        assert digest.backup_item_digests(root, REGISTRY, [item.id])[0][item.id] == primary_digest, item.id
    return [item.id for item in claimed]


@settings(max_examples=int(os.environ.get("HASYNC_GRAFT_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(configs(), configs(), st.lists(st.sampled_from(SECTION_CHOICES), min_size=1, max_size=5, unique=True),
       TEXTS)
def test_a_grafted_merge_writes_what_a_built_one_writes(primary: etree._Element, backup: etree._Element,
                                                        sections: list[str], text: str) -> None:
    primary = etree.fromstring(etree.tostring(primary))
    backup = etree.fromstring(etree.tostring(backup), etree.XMLParser(remove_blank_text=True))
    assert_grafting_changes_nothing(primary, backup, sections)


def test_grafting_on_a_generated_pair() -> None:
    generate = bench_module("generate")
    primary_bytes, backup_bytes = generate.generate(0.3, seed=7)
    primary = parse_config_bytes(primary_bytes, "primary")
    backup = parse_config_bytes(backup_bytes, "backup")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    assert assert_grafting_changes_nothing(primary, backup, sections) > 100  # grafts were really used


def test_grafting_on_real_configs() -> None:
    real = SHARED / "fixtures" / "real"
    if not real.is_dir():
        pytest.skip("../shared is absent (expected in a user's clone)")
    roots = [parse_config_bytes(path.read_bytes(), str(path)) for path in sorted(real.glob("*.xml"))]
    assert len(roots) >= 5
    sections = REGISTRY.sections_for(REGISTRY.ids())
    used = sum(assert_grafting_changes_nothing(primary, backup, sections)
               for primary, backup in zip(roots, roots[1:] + roots[:1], strict=True))
    assert used > 0


def test_a_failing_digest_warm_up_never_turns_a_written_merge_into_a_fault() -> None:
    """The warm-up after a fast-path merge is an optimisation: if it raises, the merge (already
    written) still answers True (control: the warm-up really ran and raised)."""
    calls: list[str] = []

    def merge_ok(_payload: Any, _context: CallContext) -> bool:
        calls.append("merge")
        return True

    def broken(_decoded: Any) -> None:
        calls.append("warm-up")
        raise RuntimeError("digest warm-up failed")

    dispatcher = Dispatcher()
    dispatcher.register(protocol.RESTORE_METHOD, merge_ok)
    agent = fastpath.FastPathAgent(dispatcher, after_merge=broken)
    primary = etree.fromstring(b"<opnsense><filter><rule><descr>a</descr></rule></filter></opnsense>")
    param = sectionsmod.build_blob(primary, ["filter"]).param
    assert agent.restore_sections_xml(param, CallContext("u", "127.0.0.1")) is True
    assert calls == ["merge", "warm-up"]


# --- "as sent": the backup's digest is the primary's where the merge wrote its bytes -----------------


def test_a_generated_pair_claims_its_big_items_and_each_claim_holds() -> None:
    """The rule, NAT, user and IDS items of a generated pair come back "as sent" (the rules only
    because the primary hashes its filter without the nosync rules the payload drops,
    `sections._hash_kept`), and each digests on the backup as on the primary."""
    primary_bytes, backup_bytes = bench_module("generate").generate(0.3, seed=2)
    primary = parse_config_bytes(primary_bytes, "primary")
    backup = parse_config_bytes(backup_bytes, "backup")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    assert primary.xpath("boolean(filter/rule[nosync='1'])")  # what the claim on "rules" needs the removal for
    param = sectionsmod.build_blob(primary, sections, declarations=REGISTRY.declarations()).param
    claimed = assert_as_sent_is_the_primarys_digest(primary, backup, sections, param)
    assert {"rules", "nat", "users", "suricata", "aliases"} <= set(claimed)
    # (the aliases only because the backup's own nosync alias is left out on its side too)
    assert backup.xpath("boolean(OPNsense/Firewall/Alias/aliases/alias[nosync='1'])")


PORTAL = ('<opnsense><OPNsense><captiveportal version="1.0.0"><zones>{zones}</zones>{extra}</captiveportal>'
          '</OPNsense></opnsense>')
ZONE = '<zone uuid="{uuid}"><enabled>1</enabled><description>{uuid}</description>{nosync}</zone>'


def portal(zones: list[tuple[str, bool]], extra: str = "") -> etree._Element:
    body = "".join(ZONE.format(uuid=uuid, nosync="<nosync>1</nosync>" if nosync else "") for uuid, nosync in zones)
    return etree.fromstring(PORTAL.format(zones=body, extra=extra))


def portal_merge(primary: etree._Element, backup: etree._Element) -> tuple[dict[str, Any], etree._Element,
                                                                          merge.MergeReport, str, str]:
    """Merge the primary's captive portal into a copy of `backup`: the blob's param, the merged
    tree, the report, and the item's digest on the backup and on the primary."""
    sections = ["OPNsense.captiveportal"]
    param = sectionsmod.build_blob(primary, sections, declarations=REGISTRY.declarations()).param
    root = copy.deepcopy(backup)
    report = merge.merge_payload(root, sectionsmod.decode_param(param).payload, REGISTRY)
    sent = build_payload(primary, sections, REGISTRY.declarations())
    theirs = digest.backup_item_digests(root, REGISTRY, ["captiveportal"])[0]["captiveportal"]
    return param, root, report, theirs, digest.item_digest(digest.value_item_value(sent, sections), REGISTRY)


@pytest.mark.parametrize("extra", ["", "<backuponly>1</backuponly>"], ids=["same bytes", "control: a key of its own"])
def test_a_section_is_as_sent_only_where_the_backup_holds_the_primarys_bytes(extra: str) -> None:
    """A key only the backup has survives the merge (OPNsense's container merge): then the
    backup's digest differs from the primary's, and only the byte comparison keeps it from
    being claimed, since the primary declared a hash either way."""
    primary = portal([("a", False), ("b", False)])
    param, _root, report, theirs, ours = portal_merge(primary, portal([("c", False)], extra))
    assert "OPNsense.captiveportal" in param["section_sha256"]
    claimed = "OPNsense.captiveportal" in report.as_sent_points
    assert claimed is (extra == "")
    assert (theirs == ours) is claimed


def test_a_nosync_record_of_a_tag_that_is_no_list_tag_is_never_hashed_without_it() -> None:
    """Dropping the nosync <zone> leaves one: the payload's list of one, which the backup
    writes as one element and reads back as a struct, no list. Hashing the primary's bytes
    without the record would claim the item (the bytes match) with another digest, so the
    primary declares no hash there. Control: the naive hash matches, and the digests differ."""
    assert "zone" not in tree.LIST_TAGS
    primary = portal([("a", False), ("b", True)])
    param, root, report, theirs, ours = portal_merge(primary, portal([("c", False)]))
    assert "OPNsense.captiveportal" not in param["section_sha256"]
    assert "OPNsense.captiveportal" not in report.as_sent_points
    naive = copy.deepcopy(primary)
    zones = naive.find("OPNsense/captiveportal/zones")
    assert zones is not None
    zones.remove(zones[1])
    def section_bytes(config: etree._Element) -> bytes:
        return b"".join(etree.tostring(n) for n in sectionsmod.locate(config, "OPNsense.captiveportal") or [])
    assert section_bytes(naive) == section_bytes(root)
    assert theirs != ours


# --- the per-node rewrite edits dicts in place: those, and only those, lose their grafts ------------

DHCP_PRIMARY = """<opnsense><interfaces><lan><if>em1</if><ipaddr>10.0.0.1</ipaddr><subnet>24</subnet></lan>
</interfaces><dhcpd><lan><enable>1</enable><failover_peerip>10.0.0.2</failover_peerip>{maps}</lan></dhcpd></opnsense>"""
STATICMAP = "<staticmap><mac>00:00:00:00:00:0{n}</mac><ipaddr>10.0.0.1{n}</ipaddr><descr>host {n}</descr></staticmap>"


def taken(monkeypatch: pytest.MonkeyPatch) -> list[tuple[etree._Element, Any]]:
    """Every (element, dict) `Grafts.take` hands out from now on: what merges move in whole."""
    moves: list[tuple[etree._Element, Any]] = []
    take = tree.Grafts.take

    def spy(self: tree.Grafts, value: Any, tag: str) -> etree._Element | None:
        element = take(self, value, tag)
        if element is not None:
            moves.append((element, value))
        return element

    monkeypatch.setattr(tree.Grafts, "take", spy)
    return moves


@pytest.mark.parametrize("forget", [True, False], ids=["edited dicts forgotten", "control: all kept"])
def test_a_rewritten_dhcp_section_keeps_its_static_mappings_grafted(monkeypatch: pytest.MonkeyPatch,
                                                                    forget: bool) -> None:
    """The DHCP failover peer is rewritten into the primary's own address in the decoded dict
    (`pernode.rewrite_for_backup`); the dicts holding it lose their grafts (`Grafts.forget_along`),
    the static mappings beside it keep theirs: a backup with the section gets them moved in. Into
    a backup without it the whole section is built from its dict. Control: were the edited dicts
    kept as grafts, the merge would move in the section's element, which still names the backup
    itself as its peer."""
    if not forget:
        monkeypatch.setattr(tree.Grafts, "forget_along", lambda _self, _root, _pointer: None)
    primary = etree.fromstring(DHCP_PRIMARY.format(maps="".join(STATICMAP.format(n=n) for n in range(3))),
                               etree.XMLParser(remove_blank_text=True))
    param = sectionsmod.build_blob(primary, ["dhcpd"], declarations=REGISTRY.declarations()).param
    assert param["pernode"]["self_address"]  # the rewrite applies here
    outcome = {}
    moves = taken(monkeypatch)
    for backup_xml in ("<opnsense><dhcpd><lan><enable>0</enable></lan></dhcpd></opnsense>", "<opnsense/>"):
        payload = sectionsmod.decode_param(param).payload
        assert isinstance(payload, tree.GraftedPayload)
        backup = etree.fromstring(backup_xml)
        moves.clear()
        merge.merge_payload(backup, payload, REGISTRY)
        outcome[backup_xml] = (backup.findtext("dhcpd/lan/failover_peerip"),
                               sorted(str(element.tag) for element, _value in moves))
    with_section, without = outcome.values()
    assert with_section == ("10.0.0.1", ["staticmap"] * 3)  # merged key by key: the dict's value either way
    assert without == (("10.0.0.1", []) if forget else ("10.0.0.2", ["dhcpd"]))


def test_the_backups_own_nosync_record_is_left_out_only_where_the_digest_leaves_it_out_so() -> None:
    """The backup keeps its own nosync <zone> and gets the primary's one zone: the merged list is
    [its own, the primary's], which toArray reads as a list, and the digest drops its own from
    that list, leaving a list of one; the primary's one zone is a struct. So their digests differ,
    and since <zone> is no list tag the merge counts the kept record's bytes (not claimed).
    Control: the bytes without it are exactly the primary's, so leaving it out would claim."""
    assert "zone" not in tree.LIST_TAGS
    primary = portal([("a", False)])
    param, root, report, theirs, ours = portal_merge(primary, portal([("c", True)]))
    assert "OPNsense.captiveportal" in param["section_sha256"]
    assert "OPNsense.captiveportal" not in report.as_sent_points
    assert theirs != ours
    own = root.find("OPNsense/captiveportal/zones/zone[nosync='1']")
    assert own is not None
    node = sectionsmod.locate(root, "OPNsense.captiveportal")[0]  # type: ignore[index]
    without_own = hashlib.sha256()
    assert tree.hash_without(without_own, etree.tostring(node), [own])
    assert without_own.hexdigest() == param["section_sha256"]["OPNsense.captiveportal"]


# --- deferred records: a list's record becomes its dict only when read -------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(untidy())
def test_the_record_check_gives_the_conversions_verdict(node: etree._Element) -> None:
    """`vet_record` decides, without building a dict, what `_convert` decides while building it: exact,
    the height validation may skip, and whether a ``nosync`` child is there. Every subtree is
    asked (`vet_record` is called on records only, but its checks hold for any element)."""
    for element in node.iter():
        if not isinstance(element.tag, str) or len(element) == 0:
            continue
        holder = etree.fromstring(b"<h>" + etree.tostring(element, with_tail=False) + b"</h>")
        record = holder[0]
        value, exact, height = tree._convert(record, tree.LIST_TAGS, tree.Grafts(validate.TEXT_RULES), None)
        vetted = vetting.vet_record(record, tree.LIST_TAGS, validate.TEXT_RULES, set())
        if exact:
            assert vetted == (True, height, "nosync" in value)
        else:
            assert vetted[0] is False


RECORD_HAZARDS = {
    **HAZARDS,
    "a nosync attribute on the record": b'<r nosync="1"><a>1</a></r>',
    "a nosync attribute on a leaf": b'<r><a nosync="1">1</a></r>',
    "a record below holding a nosync child": b"<r><item><nosync>1</nosync><a>1</a></item></r>",
    "a record below that is not exact": b"<r><item><a>1</a><b>2</b><a>3</a></item></r>",
    "an empty first list item followed by a record": b"<r><member/><member><a>1</a></member></r>",
}


@pytest.mark.parametrize("xml", RECORD_HAZARDS.values(), ids=RECORD_HAZARDS.keys())
def test_the_record_check_refuses_each_hazard_the_conversion_refuses(xml: bytes) -> None:
    """Each hazard by name, as the random shapes above may not draw them all: `vet_record` and
    `_convert` both call the record not exact. Control: the same record without the hazard's
    difference is exact for both, and `vet_record` reports a nosync child where there is one."""
    record = etree.fromstring(b"<h>" + xml + b"</h>")[0]
    converted = tree._convert(record, tree.LIST_TAGS, tree.Grafts(validate.TEXT_RULES), None)
    assert converted[1] is False
    assert vetting.vet_record(record, tree.LIST_TAGS, validate.TEXT_RULES, set())[0] is False
    clean = etree.fromstring(b"<r><a>1</a><a>2</a><item><b>3</b></item><member>4</member></r>")
    assert vetting.vet_record(clean, tree.LIST_TAGS, validate.TEXT_RULES, set()) == \
        (True, *tree._convert(clean, tree.LIST_TAGS, tree.Grafts(validate.TEXT_RULES), None)[2:], False)
    flagged = etree.fromstring(b"<r><nosync>1</nosync><a>1</a></r>")
    assert vetting.vet_record(flagged, tree.LIST_TAGS, validate.TEXT_RULES, set())[::2] == (True, True)


def deferred_of(xml: bytes) -> tree.DeferredRecord:
    holder = etree.fromstring(b"<h><list>" + xml + b"</list></h>")
    grafts = tree.Grafts(validate.TEXT_RULES)
    record = tree.element_to_grafts(holder, grafts)["list"]["rule"][0]
    assert isinstance(record, tree.DeferredRecord) and not record.filled
    return record


RULE = b'<rule uuid="u1"><descr>a</descr><source><any>1</any></source><tag>x</tag><tag>y</tag></rule>'


def rule_value() -> dict[str, Any]:
    value = tree.element_to_value(etree.fromstring(b"<h>" + RULE + b"</h>"))["rule"][0]
    assert isinstance(value, dict) and not isinstance(value, tree.DeferredRecord)
    return value


def test_a_deferred_record_answers_absent_names_and_its_attributes_without_filling() -> None:
    record = deferred_of(RULE)
    assert record.get("nosync") is None and "nosync" not in record and record.get("nosync", 7) == 7
    assert record.attribute("uuid") == "u1" and tree.record_attribute(record, "uuid") == "u1"
    assert record.attribute("other") is None
    assert not record.filled
    assert "descr" in record  # a name it holds: filled, and from then on the dict
    assert record.filled
    assert dict(record) == rule_value()
    assert record.attribute("uuid") == "u1"


@pytest.mark.parametrize("read", [
    lambda r: r["descr"], lambda r: list(r), lambda r: len(r), lambda r: r.items(), lambda r: r.get("@attributes"),
    lambda r: r.get("descr"), lambda r: dict(r), lambda r: {**r}, lambda r: copy.deepcopy(r), lambda r: copy.copy(r),
    lambda r: repr(r), lambda r: r.setdefault("new", "1"), lambda r: r == {}, lambda r: operator.eq({}, r),
], ids=["getitem", "iter", "len", "items", "get attributes", "get a held name", "dict", "unpack", "deepcopy", "copy",
        "repr", "setdefault", "eq", "reflected eq"])
def test_every_read_of_a_deferred_record_sees_the_converted_dict(read: Any) -> None:
    record = deferred_of(RULE)
    expected = rule_value()
    read(record)
    assert record.filled
    if "new" in record:
        expected["new"] = "1"
    assert dict(record) == expected and record == expected and expected == record
    assert type(copy.deepcopy(record)) is dict and copy.deepcopy(record) == expected


def test_c_code_reading_an_unfilled_record_sees_the_record() -> None:
    """``json.dumps`` (a digest's canonical bytes) asks a dict subclass for its items, which
    fills it, but writes ``{}`` for one whose storage is empty without asking: an unfilled
    record's storage holds a marker item, so that shortcut never sees an empty record. Control:
    the same fill-on-items dict with empty storage dumps as ``{}``."""
    record = deferred_of(RULE)
    assert json.loads(json.dumps(record)) == rule_value()

    class EmptyUnderneath(dict[str, Any]):
        def items(self) -> Any:
            return rule_value().items()

    assert json.dumps(EmptyUnderneath()) == "{}"


def test_a_fast_path_merge_moves_the_records_without_building_their_dicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Of a generated pair, the merge moves hundreds of records in whole and builds the dict of
    none but those holding a nosync child (`remove_nosync` reads those); the merged bytes are
    those of a merge that builds every element (`assert_grafting_changes_nothing`, above). The
    agent keeps only the dicts built (`Grafts.moved`) for its digests: an unfilled one would be
    filled from its element, as converting it does."""
    primary_bytes, backup_bytes = bench_module("generate").generate(0.3, seed=7)
    primary = parse_config_bytes(primary_bytes, "primary")
    backup = parse_config_bytes(backup_bytes, "backup")
    sections = REGISTRY.sections_for(read_hasync(primary).syncitems)
    payload = sectionsmod.decode_param(sectionsmod.build_blob(primary, sections).param).payload
    assert isinstance(payload, tree.GraftedPayload)
    moves = taken(monkeypatch)
    merge.merge_payload(backup, payload, REGISTRY)
    deferred = [value for _element, value in moves if isinstance(value, tree.DeferredRecord)]
    assert len(deferred) > 300
    filled = [value for value in deferred if value.filled]
    assert all("nosync" in value for value in filled)
    kept = payload.grafts.moved
    assert {id(value) for value in kept.values()} == {id(value) for _element, value in moves
                                                      if not isinstance(value, tree.DeferredRecord) or value.filled}


@pytest.mark.parametrize("width", [5, 0], ids=["beside five items", "alone at each level"])
def test_a_record_found_inexact_deep_down_is_not_checked_again_at_every_level(monkeypatch: pytest.MonkeyPatch,
                                                                              width: int) -> None:
    """A record whose check gives up deep down (here a comment at the bottom of 120 nested rules,
    each beside five exact items, or alone with one leaf: then the quick check descends too) is
    converted in full without checking what lies below it again: each check stays within twice
    the element count. Control: were each level's records checked again, a crafted 256-level
    document would cost the depth times the elements (~43,000 checks here)."""
    depth = 120
    items = "".join(f"<item><a>{n}</a></item>" for n in range(width)) or "<a>1</a>"
    xml = "<rule><!-- the bottom --></rule>"
    for _ in range(depth):
        xml = f"<rule>{items}{xml}</rule>"
    primer = "<rule><a>1</a><rule><a>2</a></rule></rule>"  # (its names admitted, the quick check reads on)
    holder = etree.fromstring(f"<h><list>{primer}{xml}</list></h>".encode())
    calls: dict[str, list[int]] = {"vet_record": [], "vet_plain_record": []}
    for name, found in calls.items():
        real = getattr(vetting, name)

        def counted(*args: Any, real: Any = real, found: list[int] = found) -> Any:
            found.append(1)
            return real(*args)

        monkeypatch.setattr(tree, name, counted)
        monkeypatch.setattr(vetting, name, counted)  # (its own calls, level by level)
    value = tree.element_to_grafts(holder, tree.Grafts(validate.TEXT_RULES))
    elements = sum(1 for _ in holder.iter())
    assert all(len(found) <= 2 * elements for found in calls.values())
    assert len(calls["vet_record"]) >= depth  # (the check did run down the chain)
    assert len(calls["vet_plain_record"]) >= (depth if not width else 1)
    monkeypatch.undo()
    assert value == tree.element_to_value(holder)
