"""The merge engine: every rule of issue 2 §6, each with a case that fails if the rule breaks."""

from __future__ import annotations

import copy
import gc
import json
import shutil
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.cli.commands import apply_payload as apply_command
from hasync.config.items import SyncItem, SyncItemRegistry, read_hasync
from hasync.config.pernode import declarations_from
from hasync.config.store import ConfigStore, serialize
from hasync.config.tree import element_to_value, find_path
from hasync.core import xmlsafe
from hasync.core.errors import MergeError
from hasync.failover.model import carp_vips
from hasync.node.apply import apply_payload_file, load_payload_bytes
from hasync.payload import merge as merge_module
from hasync.payload.build import REDACTED, build_payload, payload_for_items
from hasync.payload.merge import MergeReport, merge_payload, revision_description
from hasync.payload.validate import normalize_payload
from hasync.wire import xmlrpc
from support.items import run_command
from support.paths import REPO

CONFIGS = REPO / "fixtures" / "configs"
SHARED_REAL = REPO.parent / "shared" / "fixtures" / "real"


def parse(text: str) -> etree._Element:
    return xmlsafe.parse_bytes(text.encode())


def load(name: str) -> etree._Element:
    return xmlsafe.parse_bytes((CONFIGS / name).read_bytes())


def xml(node: etree._Element) -> str:
    return etree.tostring(node, encoding="unicode")


def one(root: etree._Element, path: str) -> etree._Element:
    (node,) = find_path(root, path)
    return node


def texts(root: etree._Element, path: str, tag: str) -> list[str]:
    return [node.findtext(tag) or "" for node in find_path(root, path)]


# A small registry for focused cases: "sec" is a generic section.
SMALL = SyncItemRegistry([
    SyncItem("sec", "Generic", ["sec"]),
    SyncItem("rules", "Rules", ["filter"]),
    SyncItem("nat", "NAT", ["nat"]),
    SyncItem("virtualip", "VIPs", ["virtualip"]),
    SyncItem("users", "Users", ["system.user"]),
])


def merge(root: etree._Element, payload: dict[str, Any], **kwargs: Any) -> MergeReport:
    return merge_payload(root, payload, SMALL, **kwargs)


# --- scalars, lists, uuid items, containers --------------------------------------------------


def test_scalar_overwrites_in_place() -> None:
    root = parse("<opnsense><sec><a>1</a><b>old</b><c>3</c></sec></opnsense>")
    merge(root, {"sec": {"b": "new"}})
    assert xml(root) == "<opnsense><sec><a>1</a><b>new</b><c>3</c></sec></opnsense>"


def test_new_scalar_is_appended_and_types_become_text() -> None:
    root = parse("<opnsense><sec><a>1</a></sec></opnsense>")
    merge(root, {"sec": {"n": 5, "t": True, "e": "", "z": None}})
    assert xml(root) == "<opnsense><sec><a>1</a><n>5</n><t>1</t><e/><z/></sec></opnsense>"


def test_false_removes_the_element_as_php_fromarray_skips_it() -> None:
    root = parse("<opnsense><sec><a>1</a><b>2</b></sec></opnsense>")
    merge(root, {"sec": {"a": False}})
    assert xml(root) == "<opnsense><sec><b>2</b></sec></opnsense>"


def test_scalar_replacing_a_container_drops_its_children_and_attributes() -> None:
    root = parse('<opnsense><sec><x v="1"><y>1</y></x><z/></sec></opnsense>')
    merge(root, {"sec": {"x": "flat"}})
    assert xml(root) == "<opnsense><sec><x>flat</x><z/></sec></opnsense>"


def test_scalar_onto_a_leaf_keeps_the_leaf_attributes() -> None:
    root = parse('<opnsense><sec><x k="v">old</x></sec></opnsense>')
    merge(root, {"sec": {"x": "new"}})
    assert xml(root) == '<opnsense><sec><x k="v">new</x></sec></opnsense>'


def test_lists_are_replaced_in_exactly_the_incoming_order() -> None:
    root = parse("<opnsense><sec><item><n>a</n></item><keep>k</keep><item><n>b</n></item></sec></opnsense>")
    merge(root, {"sec": {"item": [{"n": "c"}, {"n": "a"}, {"n": "b2"}]}})
    assert texts(root, "sec.item", "n") == ["c", "a", "b2"]
    # the new list sits where the old one started; the sibling in between stays
    assert [child.tag for child in one(root, "sec")] == ["item", "item", "item", "keep"]


def test_a_replaced_lists_old_records_are_gone_before_the_new_ones_are_built(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """So the new records can take the memory the old ones had: no old record is left in the
    tree, or in any list of the merge's, when the first new one is built (the backup's own
    nosync records are kept aside and put back first, as before)."""
    root = parse(NOSYNC_LIST)
    built: list[list[str]] = []
    build = merge_module.value_to_elements

    def watched(key: str, value: Any) -> list[etree._Element]:
        held = [node.findtext("n") or "" for node in gc.get_objects() if isinstance(node, etree._Element)
                and node.tag == "item"]  # (an element without a Python object for it is freed)
        built.append([node.findtext("n") or "" for node in root.iter("item")] + sorted(set(held) & {"a", "zero"}))
        return build(key, value)

    monkeypatch.setattr(merge_module, "value_to_elements", watched)
    merge(root, {"sec": {"item": [{"n": "b"}, {"n": "c"}]}})
    assert built == [[], []]  # (built after the splice: "a", "local", "zero" and "a", "zero" each time)
    assert texts(root, "sec.item", "n") == ["local", "b", "c"]


AT_POINTS = merge_module._at_points


def merged_both_ways(root: etree._Element, payload: dict[str, Any], registry: SyncItemRegistry,
                     monkeypatch: pytest.MonkeyPatch) -> tuple[str, str, bool]:
    """`root` merged with `payload` as it is, and a top-level key at a time (never a point at a
    time), and whether the first went a point at a time."""
    took: list[bool] = []

    def watched(*args: Any) -> Any:
        found = AT_POINTS(*args)
        took.append(found is not None)
        return found

    monkeypatch.setattr(merge_module, "_at_points", watched)
    first = copy.deepcopy(root)
    merge_payload(first, copy.deepcopy(payload), registry)
    monkeypatch.setattr(merge_module, "_at_points", lambda *args: None)
    second = copy.deepcopy(root)
    merge_payload(second, copy.deepcopy(payload), registry)
    return xml(first), xml(second), any(took)


def test_a_level_without_a_point_in_it_merges_a_key_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A payload is merged a point at a time only where it holds its points alone: an empty level
    above them (here `system`, above `system.user`) is merged as the whole merge does (a backup
    without it gets it empty), which a point at a time would not."""
    root = parse("<opnsense><sec><a>1</a></sec></opnsense>")
    points_only, by_keys, took = merged_both_ways(root, {"sec": {"a": "2"}}, SMALL, monkeypatch)
    assert points_only == by_keys and took  # (control: a payload of its points alone)
    with_level, by_keys, took = merged_both_ways(root, {"system": {}, "sec": {"a": "2"}}, SMALL, monkeypatch)
    assert with_level == by_keys == "<opnsense><sec><a>2</a></sec><system/></opnsense>" and not took


def test_a_point_its_local_rule_took_away_merges_a_key_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A section declared local as a whole, which the backup lacks, leaves the payload without
    that point (`keep_local`): the payload then no longer holds all its points, and is merged a
    key at a time (the other point of its level, `system.group`, merged as before)."""
    local = declarations_from({"local": ["system.user"]}, ["system.user"], "test: ")
    registry = SyncItemRegistry([SyncItem("sec", "Generic", ["sec"]),
                                 SyncItem("users", "Users", ["system.user"], declarations=local),
                                 SyncItem("groups", "Groups", ["system.group"])])
    root = parse("<opnsense><sec><a>1</a></sec><system><group><name>g</name></group></system></opnsense>")
    payload = {"system": {"user": [{"name": "u"}], "group": [{"name": "h"}]}, "sec": {"a": "2"}}
    kept, by_keys, took = merged_both_ways(root, payload, registry, monkeypatch)
    assert kept == by_keys == ("<opnsense><sec><a>2</a></sec><system><group><name>h</name></group></system>"
                               "</opnsense>") and not took
    root.find("system").insert(0, etree.fromstring("<user><name>mine</name></user>"))
    kept, by_keys, took = merged_both_ways(root, payload, registry, monkeypatch)  # control: it has one
    assert kept == by_keys and "<name>mine</name>" in kept and took


class Held(dict[str, Any]):
    """A record whose life a test can watch (a plain dict cannot be weakly referenced)."""


@pytest.mark.parametrize("consume", [True, False], ids=["consumed", "control: not consumed"])
@pytest.mark.parametrize("at_points", [True, False], ids=["a point at a time", "a key at a time"])
def test_a_consumed_payload_lets_go_of_each_point_once_merged(monkeypatch: pytest.MonkeyPatch, consume: bool,
                                                              at_points: bool) -> None:
    """`consume=True` (the agent's merge of a request it decoded): the caller's payload is emptied
    and each point's records are freed once merged, before the next point merges; the merged tree
    and the report stay the same. Control: without it, every record lives until the merge ends."""
    took: list[bool] = []

    def split(*args: Any) -> Any:
        found = AT_POINTS(*args) if at_points else None
        took.append(found is not None)
        return found

    monkeypatch.setattr(merge_module, "_at_points", split)
    root = parse("<opnsense><sec><a>1</a></sec><system><user><name>old</name></user></system></opnsense>")

    def payload() -> dict[str, Any]:
        return {"filter": {"rule": [Held(descr="r1"), Held(descr="r2")]},
                "nat": {"outbound": {"rule": [Held(descr="n1")]}},
                "system": {"user": [Held(name="u1")]}, "sec": {"a": "2"}}

    given = payload()
    records = {record["descr" if "descr" in record else "name"]: weakref.ref(record)
               for record in (*given["filter"]["rule"], *given["nat"]["outbound"]["rule"], *given["system"]["user"])}
    alive_at: list[tuple[str, list[str]]] = []
    merge_data = merge_module._merge_data

    def watched(data: Mapping[str, Any], ctx: Any) -> None:
        alive_at.append((next(iter(data)), sorted(name for name, ref in records.items() if ref() is not None)))
        merge_data(data, ctx)

    monkeypatch.setattr(merge_module, "_merge_data", watched)
    expected_tree = copy.deepcopy(root)
    expected = merge_payload(expected_tree, payload(), SMALL)
    report = merge_payload(root, given, SMALL, consume=consume)
    assert xml(root) == xml(expected_tree) and report == expected
    assert took == [at_points, at_points]  # (the way each merge went)
    everything = ["n1", "r1", "r2", "u1"]
    if consume:
        assert given == {}
        assert alive_at[-4:] == [("filter", everything), ("nat", ["n1", "u1"]), ("system", ["u1"]), ("sec", [])]
    else:
        assert given == payload()
        assert alive_at[-4:] == [(key, everything) for key in ("filter", "nat", "system", "sec")]


def test_single_list_tag_element_counts_as_a_list() -> None:
    # <rule> is a list tag: one rule is a list of one, so it is replaced, not merged
    root = parse("<opnsense><sec><rule><descr>old</descr><extra>x</extra></rule></sec></opnsense>")
    merge(root, {"sec": {"rule": [{"descr": "new"}]}})
    assert xml(root) == "<opnsense><sec><rule><descr>new</descr></rule></sec></opnsense>"


def test_uuid_item_is_replaced_but_a_container_is_merged() -> None:
    root = parse('<opnsense><sec><m uuid="1"><a>1</a><local>x</local></m></sec></opnsense>')
    merge(root, {"sec": {"m": {"@attributes": {"uuid": "2"}, "a": "2"}}})
    assert xml(root) == '<opnsense><sec><m uuid="2"><a>2</a></m></sec></opnsense>'
    # control: the same element without a uuid is a container, its backup-only key survives
    root = parse("<opnsense><sec><m><a>1</a><local>x</local></m></sec></opnsense>")
    merge(root, {"sec": {"m": {"a": "2"}}})
    assert xml(root) == "<opnsense><sec><m><a>2</a><local>x</local></m></sec></opnsense>"


def test_container_attributes_merge() -> None:
    root = parse('<opnsense><sec version="1" local="x"><a>1</a></sec></opnsense>')
    merge(root, {"sec": {"@attributes": {"version": "2"}, "a": "1"}})
    assert one(root, "sec").attrib == {"version": "2", "local": "x"}


def test_leaf_attributes_travel_as_sibling_keys() -> None:
    root = parse('<opnsense><sec><leaf old="1">x</leaf></sec></opnsense>')
    merge(root, {"sec": {"leaf": "y", "leaf@attributes": {"k": "v"}}})
    assert xml(root) == '<opnsense><sec><leaf old="1" k="v">y</leaf></sec></opnsense>'


def test_empty_incoming_list_empties_a_list_as_an_empty_element() -> None:
    root = parse("<opnsense><sec><rule><n>1</n></rule><rule><n>2</n></rule></sec></opnsense>")
    merge(root, {"sec": {"rule": []}})
    assert xml(root) == "<opnsense><sec><rule/></sec></opnsense>"
    assert element_to_value(root)["sec"] == {"rule": []}  # reads back as PHP's empty list


def test_empty_incoming_list_onto_a_container_is_kept_with_a_warning() -> None:
    root = parse('<opnsense><sec><Model version="1"><items><i>1</i></items></Model></sec></opnsense>')
    before = xml(root)
    report = merge(root, {"sec": {"Model": []}})
    assert xml(root) == before
    assert any("sec.Model" in w and "container" in w for w in report.warnings)


def test_non_empty_list_onto_a_container_replaces_it() -> None:
    root = parse("<opnsense><sec><x><a>1</a></x></sec></opnsense>")
    merge(root, {"sec": {"x": [{"a": "2"}, {"a": "3"}]}})
    assert xml(root) == "<opnsense><sec><x><a>2</a></x><x><a>3</a></x></sec></opnsense>"


def test_php_list_with_holes_arrives_as_numeric_struct_and_is_read_as_a_list() -> None:
    root = parse("<opnsense><filter><rule><n>old</n></rule></filter></opnsense>")
    merge(root, {"filter": {"rule": {"0": {"n": "first"}, "2": {"n": "third"}}}})
    assert texts(root, "filter.rule", "n") == ["first", "third"]


def test_missing_sections_are_created() -> None:
    root = parse("<opnsense><other/></opnsense>")
    merge(root, {"sec": {"a": {"b": "1"}, "l": []}})
    assert xml(root) == "<opnsense><other/><sec><a><b>1</b></a><l/></sec></opnsense>"


# --- nosync records --------------------------------------------------------------------------

NOSYNC_LIST = (
    "<opnsense><sec><item><n>a</n></item><item><n>local</n><nosync>1</nosync></item>"
    "<item><n>zero</n><nosync>0</nosync></item></sec></opnsense>"
)


def test_backup_nosync_records_are_kept_and_put_first() -> None:
    root = parse(NOSYNC_LIST)
    merge(root, {"sec": {"item": [{"n": "b"}, {"n": "c"}]}})
    # nosync=0 is not set (PHP empty()), so "zero" goes like "a"
    assert texts(root, "sec.item", "n") == ["local", "b", "c"]


def test_lone_mvc_item_marked_nosync_is_kept_like_a_list_member() -> None:
    root = parse('<opnsense><sec><m uuid="1"><n>mine</n><nosync>1</nosync></m></sec></opnsense>')
    merge(root, {"sec": {"m": {"@attributes": {"uuid": "2"}, "n": "theirs"}}})
    assert texts(root, "sec.m", "n") == ["mine", "theirs"]


def test_kept_nosync_record_wins_over_an_incoming_one_with_the_same_uuid() -> None:
    root = parse('<opnsense><sec><item uuid="u1"><n>mine</n><nosync>1</nosync></item></sec></opnsense>')
    report = merge(root, {"sec": {"item": [{"@attributes": {"uuid": "u1"}, "n": "theirs"}, {"n": "other"}]}})
    assert texts(root, "sec.item", "n") == ["mine", "other"]
    assert any("u1" in w for w in report.warnings)


@pytest.mark.parametrize("path", ["filter.rule", "nat.rule", "nat.outbound.rule"])
def test_rule_lists_are_replaced_wholesale_and_dropped_rules_are_reported(path: str) -> None:
    first, *rest = path.split(".")
    inner = "".join(f"<{p}>" for p in rest[:-1])
    close = "".join(f"</{p}>" for p in reversed(rest[:-1]))
    root = parse(
        f"<opnsense><{first}>{inner}<rule><descr>old</descr></rule>"
        f"<rule><descr>my local rule</descr><nosync>1</nosync></rule>{close}</{first}></opnsense>"
    )
    payload: dict[str, Any] = {"rule": [{"descr": "p1"}, {"descr": "p2"}]}
    for part in reversed(rest[:-1]):
        payload = {part: payload}
    report = merge(root, {first: payload})
    assert texts(root, path, "descr") == ["p1", "p2"]
    assert [w for w in report.warnings if path in w and "'my local rule'" in w]


def test_rule_list_exception_holds_for_later_keys_too() -> None:
    # PHP's accumulating $path checks nat.rule as "filter.nat.rule" when filter comes first,
    # so the backup's nosync port forward would be kept and moved to the front.
    root = parse(
        "<opnsense><filter><rule><descr>f</descr></rule></filter>"
        "<nat><outbound><rule><descr>local out</descr><nosync>1</nosync></rule></outbound>"
        "<rule><descr>local pf</descr><nosync>1</nosync></rule><rule><descr>old</descr></rule></nat>"
        "<sec><item><n>local</n><nosync>1</nosync></item></sec></opnsense>"
    )
    report = merge(root, {
        "filter": {"rule": [{"descr": "p-f"}]},
        "nat": {"outbound": {"rule": [{"descr": "p-out"}]}, "rule": [{"descr": "p-pf"}]},
        "sec": {"item": [{"n": "p"}]},
    })
    assert texts(root, "nat.rule", "descr") == ["p-pf"]
    assert texts(root, "nat.outbound.rule", "descr") == ["p-out"]
    assert len([w for w in report.warnings if "dropped" in w]) == 2
    # control: a later generic list still keeps its nosync record first
    assert texts(root, "sec.item", "n") == ["local", "p"]


def test_rule_exception_is_for_the_exact_paths_only() -> None:
    root = parse("<opnsense><sec><nat><rule><d>local</d><nosync>1</nosync></rule></nat></sec></opnsense>")
    merge(root, {"sec": {"nat": {"rule": [{"d": "p"}]}}})
    assert texts(root, "sec.nat.rule", "d") == ["local", "p"]


# --- virtual IPs -----------------------------------------------------------------------------


@pytest.fixture
def registry() -> SyncItemRegistry:
    return SyncItemRegistry.load()


@pytest.fixture
def synced(registry: SyncItemRegistry) -> tuple[etree._Element, etree._Element, MergeReport]:
    primary, backup = load("primary.xml"), load("backup.xml")
    payload = payload_for_items(primary, registry, read_hasync(primary).syncitems)
    return primary, backup, merge_payload(backup, payload, registry)


def test_vhid_vips_replaced_own_vips_kept_first_in_order(synced: tuple[Any, Any, MergeReport]) -> None:
    _, backup, _ = synced
    assert texts(backup, "virtualip.vip", "descr") == [
        "fw-b management alias (no vhid)",   # kept: no vhid
        "fw-b proxy ARP",                    # kept: no vhid
        "fw-b only CARP (nosync)",           # kept: nosync
        "WAN CARP", "LAN CARP", "alias on the LAN CARP vhid", "high skew CARP",  # the primary's set
    ]
    assert "stale CARP, gone from the primary" not in xml(backup)
    assert one(backup, "virtualip").get("version") == "1.0.1"


def test_vip_report(synced: tuple[Any, Any, MergeReport]) -> None:
    _, _, report = synced
    assert [(v.key, v.spec.vhid) for v in report.vips_added] == [("ipalias_lan_vip3_192.168.10.60_32", 3),
                                                          ("carp_wan_vip9", 9)]
    assert [(v.key, v.changed_fields) for v in report.vips_changed] == [("carp_wan_vip1", ("password",))]
    assert [(v.key, v.spec.device) for v in report.vips_removed] == [("carp_wan_vip5", "vtnet0")]
    spec = report.vips_changed[0].spec
    assert (spec.device, spec.vhid, spec.advskew, spec.password) == ("vtnet0", 1, 100, "carp-secret-1")
    # the whole spec, mode and peer6 included, is what the failover layer reads from the merged tree
    _, backup, _ = synced
    reported = sorted((vip.spec for vip in report.vips_added + report.vips_changed if vip.spec.mode == "carp"),
                      key=lambda spec: spec.vhid)
    assert reported == [read for read in sorted(carp_vips(backup), key=lambda spec: spec.vhid)
                        if read.vhid in {1, 9} and read.mode == "carp"]
    assert "carp-secret-1" not in repr(report)
    assert "carp-secret-1" not in json.dumps(report.public_dict())


@pytest.mark.parametrize(
    ("field", "value"), [("advskew", "150"), ("advbase", "2"), ("subnet_bits", "25"), ("password", "x")]
)
def test_vip_change_detection_per_field(field: str, value: str) -> None:
    vip = {"mode": "carp", "interface": "wan", "vhid": "1", "advskew": "100", "advbase": "1",
           "subnet": "192.0.2.1", "subnet_bits": "24", "password": "p", "descr": "old"}
    body = "".join(f"<{k}>{v}</{k}>" for k, v in vip.items())
    root = parse(f"<opnsense><virtualip><vip>{body}</vip></virtualip></opnsense>")
    report = merge(root, {"virtualip": {"vip": [dict(vip, descr="new")]}})
    assert report.vips_changed == [] and report.vips_added == [] and report.vips_removed == []
    assert report.changed_sections == ["virtualip"]  # descr changed, no reconfiguration needed
    report = merge(root, {"virtualip": {"vip": [dict(vip, **{field: value})]}})
    assert [v.changed_fields for v in report.vips_changed] == [(field,)]
    # numeric fields compare like PHP's ==: the int the primary computes equals the stored text
    again: dict[str, Any] = dict(vip, **{field: value})
    again["advskew"] = int(again["advskew"])
    report = merge(root, {"virtualip": {"vip": [again]}})
    assert report.vips_changed == []


def test_empty_vip_set_removes_stale_carp_vips_but_keeps_own() -> None:
    root = parse(
        "<opnsense><virtualip><vip><mode>carp</mode><interface>wan</interface><vhid>5</vhid></vip>"
        "<vip><mode>ipalias</mode><interface>lan</interface><subnet>10.0.0.9</subnet></vip>"
        "</virtualip></opnsense>"
    )
    report = merge(root, {"virtualip": []})
    assert texts(root, "virtualip.vip", "mode") == ["ipalias"]
    assert [v.spec.vhid for v in report.vips_removed] == [5]


def test_kept_vips_keep_their_original_order() -> None:
    # PHP re-adds them with array_unshift in a loop and so reverses them
    root = parse(
        "<opnsense><virtualip><vip><mode>ipalias</mode><descr>B</descr></vip>"
        "<vip><mode>proxyarp</mode><descr>A</descr></vip></virtualip></opnsense>"
    )
    merge(root, {"virtualip": {"vip": [{"mode": "carp", "interface": "wan", "vhid": "1", "descr": "C"}]}})
    assert texts(root, "virtualip.vip", "descr") == ["B", "A", "C"]


def test_incoming_vip_colliding_with_a_local_nosync_vip_is_skipped() -> None:
    root = parse(
        "<opnsense><virtualip><vip><mode>carp</mode><interface>wan</interface><vhid>4</vhid>"
        "<descr>mine</descr><nosync>1</nosync></vip></virtualip></opnsense>"
    )
    report = merge(root, {"virtualip": {"vip": [{"mode": "carp", "interface": "wan", "vhid": "4", "descr": "x"}]}})
    assert texts(root, "virtualip.vip", "descr") == ["mine"]
    assert report.vips_added == [] and any("carp_wan_vip4" in w for w in report.warnings)


def test_vips_into_a_backup_without_virtualip() -> None:
    root = parse("<opnsense><interfaces><wan><if>em0</if></wan></interfaces></opnsense>")
    report = merge(root, {"virtualip": {"vip": [{"mode": "carp", "interface": "wan", "vhid": "2"}]}})
    assert texts(root, "virtualip.vip", "vhid") == ["2"]
    assert [(v.key, v.spec.device) for v in report.vips_added] == [("carp_wan_vip2", "em0")]


# --- protected and unknown sections ----------------------------------------------------------


@pytest.mark.parametrize("key", ["hasync", "interfaces", "revision"])
def test_protected_sections_are_refused_even_with_accept_unknown(key: str) -> None:
    root = load("backup.xml")
    before = xml(root)
    with pytest.raises(MergeError, match=f"own {key}"):
        merge_payload(root, {"sec": {"a": "1"}, key: {"x": "y"}}, SMALL, accept_unknown=True)
    assert xml(root) == before


def test_system_as_a_whole_is_refused() -> None:
    with pytest.raises(MergeError, match="whole system"):
        merge(parse("<opnsense/>"), {"system": ""}, accept_unknown=True)


def test_uncovered_sections_are_refused_by_name(registry: SyncItemRegistry) -> None:
    root = load("backup.xml")
    before = xml(root)
    payload = {"system": {"user": [], "hostname": "evil"}, "OPNsense": {"Mystery": {"a": "1"}}, "nat": {}}
    with pytest.raises(MergeError) as caught:
        merge_payload(root, payload, registry)
    assert "system.hostname" in str(caught.value) and "OPNsense.Mystery" in str(caught.value)
    assert "nat" not in str(caught.value).split("refusing section(s)")[1].split(":")[0]
    assert xml(root) == before
    report = merge_payload(root, payload, registry, accept_unknown=True)
    assert root.findtext("system/hostname") == "evil"
    assert [w for w in report.warnings if "OPNsense.Mystery" in w]


def test_nextuid_from_older_primaries_is_accepted_with_users(registry: SyncItemRegistry) -> None:
    root = load("backup.xml")
    merge_payload(root, {"system": {"user": [], "nextuid": "2002", "nextgid": "2001"}}, registry)
    assert root.findtext("system/nextuid") == "2002"


# --- description and report ------------------------------------------------------------------


def test_revision_description_is_phps() -> None:
    assert revision_description({"system": 1, "OPNsense": 2, "nat": 3}) == (
        "Merged system, OPNsense, nat config sections from XMLRPC client."
    )


def test_report_for_the_fixture_pair(synced: tuple[Any, Any, MergeReport], registry: SyncItemRegistry) -> None:
    _, _, report = synced
    assert report.description == revision_description({key: None for key in report.merged_keys})
    assert report.merged_keys[:5] == ["system", "cert", "ca", "crl", "virtualip"]
    assert "virtualip" in report.changed_sections and "ntpd" in report.changed_sections
    assert "staticroutes" not in report.changed_sections  # an empty list onto a container: kept
    assert "system.user" in report.sections and "OPNsense.Kea" in report.sections
    assert set(registry.services_for_sections(report.sections)) >= {"login", "kea", "ntpd"}


def test_merge_is_idempotent(synced: tuple[Any, Any, MergeReport], registry: SyncItemRegistry) -> None:
    primary, backup, _ = synced
    payload = payload_for_items(primary, registry, read_hasync(primary).syncitems)
    again = merge_payload(backup, payload, registry)
    assert again.changed_sections == [] and again.sections == []
    assert not (again.vips_added or again.vips_changed or again.vips_removed)


def test_synced_sections_now_match_the_primary(synced: tuple[Any, Any, MergeReport]) -> None:
    primary, backup, _ = synced
    for section in ("system.user", "system.group", "nat", "filter.rule", "OPNsense.Kea.dhcp4.subnets"):
        assert build_payload(backup, [section]) == build_payload(primary, [section]), section


def test_everything_untouched_keeps_its_exact_form(synced: tuple[Any, Any, MergeReport]) -> None:
    _, backup, report = synced
    original = load("backup.xml")
    for node in original:
        if node.tag not in report.merged_keys:
            (after,) = [n for n in backup if n.tag == node.tag]
            assert xml(after) == xml(node), node.tag
    # interleaved siblings in an untouched section survive (a dict round trip would regroup them)
    assert [c.tag for c in one(backup, "unbound")] == ["enable", "hosts", "domainoverrides", "hosts"]
    # backup-only keys inside merged containers survive
    assert backup.findtext("system/hostname") == "fw-b"
    assert backup.findtext("system/dnsserver") == "192.0.2.53"
    assert backup.findtext("filter/localkey") == "kept by the container merge"
    assert backup.findtext("ntpd/orphan") == "12"
    assert backup.findtext("OPNsense/Kea/dhcp4/general/local_only") == "fw-b"
    # node-specific sections untouched
    assert backup.findtext("hasync/pfsyncpeerip") == "10.99.0.1"
    assert backup.findtext("interfaces/lan/ipaddr") == "192.168.10.3"


def test_rule_order_survives_a_merge_and_a_write(synced: tuple[Any, Any, MergeReport]) -> None:
    _, backup, _ = synced
    reread = xmlsafe.parse_bytes(serialize(backup))
    assert texts(reread, "filter.rule", "descr") == [
        "rule 1: allow LAN to the firewall",
        "rule 2: block LAN to the management net",
        "rule 3: allow LAN to any",
    ]
    assert texts(reread, "nat.outbound.rule", "descr")[0].startswith("outbound 1")


def test_fixture_nosync_records(synced: tuple[Any, Any, MergeReport]) -> None:
    _, backup, report = synced
    assert texts(backup, "cert", "descr") == ["fw-b only certificate", "Web GUI certificate"]
    aliases = texts(backup, "OPNsense.Firewall.Alias.aliases.alias", "name")
    assert aliases == ["fwb_local", "webservers", "mgmt_nets"]
    rules = texts(backup, "OPNsense.Firewall.Filter.rules.rule", "description")
    assert rules == ["fw-b local MVC rule", "MVC rule 10"]
    dropped = [w for w in report.warnings if "dropped" in w]
    assert len(dropped) == 3 and all("nosync" in w for w in dropped)


def test_real_carp_pair_from_the_opnsense_docs(registry: SyncItemRegistry) -> None:
    """The docs' backup is what PHP's merge made of the master's payload: merging it again
    changes none of the synced legacy sections (OPNsense.* MVC paths did not exist then)."""
    master_path = SHARED_REAL / "opnsense-docs__Carp_example_master.xml"
    backup_path = SHARED_REAL / "opnsense-docs__Carp_example_backup.xml"
    if not master_path.exists() or not backup_path.exists():
        pytest.skip("../shared is absent")
    master = xmlsafe.parse_bytes(master_path.read_bytes())
    backup = xmlsafe.parse_bytes(backup_path.read_bytes())
    ids = [i for i in read_hasync(master).syncitems if i in registry]
    report = merge_payload(backup, payload_for_items(master, registry, ids), registry)
    assert report.changed_sections == ["OPNsense"]
    assert not (report.vips_added or report.vips_changed or report.vips_removed)


# --- payload validation ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([], "must be a struct"),
        ({}, "empty"),
        ({"sec": {"bad name": "1"}}, "element name"),
        ({"sec": {"a": b"bytes"}}, "cannot be bytes"),
        ({"sec": {"a": "ctrl\x01"}}, "XML cannot carry"),
        ({"sec": {"@attributes": "x"}}, "attributes must be a struct"),
        ({"sec": {"@attributes": {"1bad": "x"}}}, "attribute name"),
        ({"sec": {"password": REDACTED}}, "--redact"),
        ({"0": {"a": "1"}, "1": {"b": "2"}}, "got an array"),
        ({"sec": {"a": float("nan")}}, "not a config value"),
        ({"virtualip": {"vip": ["not a struct"]}}, "every VIP must be a struct"),
    ],
)
def test_bad_payloads_are_refused(payload: Any, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        normalize_payload(payload)


def test_a_refused_payload_leaves_the_tree_untouched() -> None:
    root = parse("<opnsense><sec><a>1</a></sec><virtualip><vip><vhid>1</vhid></vip></virtualip></opnsense>")
    before = xml(root)
    with pytest.raises(MergeError):
        merge(root, {"sec": {"a": "2"}, "virtualip": {"vip": [{"vhid": "1"}, "junk"]}})
    assert xml(root) == before


def test_root_attributes_merge_as_attributes_when_accepted() -> None:
    root = parse('<opnsense a="1"><sec/></opnsense>')
    with pytest.raises(MergeError, match="@attributes"):
        merge(root, {"@attributes": {"b": "2"}})
    merge(root, {"@attributes": {"b": "2"}}, accept_unknown=True)
    assert root.attrib == {"a": "1", "b": "2"}


def test_deep_nesting_is_refused() -> None:
    deep: dict[str, Any] = {"a": "x"}
    for _ in range(100):
        deep = {"a": deep}
    with pytest.raises(MergeError, match="deeper"):
        normalize_payload({"sec": deep})


# --- payload files and apply-payload -----------------------------------------------------------


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "conf"
    directory.mkdir()
    shutil.copy(CONFIGS / "backup.xml", directory / "config.xml")
    return directory


@pytest.fixture
def primary_payload(registry: SyncItemRegistry) -> dict[str, Any]:
    primary = load("primary.xml")
    return payload_for_items(primary, registry, read_hasync(primary).syncitems)


def test_json_and_xmlrpc_files_decode_to_the_same_payload(primary_payload: dict[str, Any]) -> None:
    from_json = load_payload_bytes(json.dumps(primary_payload).encode())
    from_xmlrpc = load_payload_bytes(xmlrpc.dumps_request("opnsense.restore_config_section", [primary_payload]))
    assert from_json == from_xmlrpc == json.loads(json.dumps(primary_payload))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"hello", "neither JSON nor"),
        (b"{oops", "invalid JSON"),
        (xmlrpc.dumps_request("opnsense.test", ["x"]), "expected opnsense.restore_config_section"),
        (xmlrpc.dumps_request("opnsense.restore_config_section", [{"a": "1"}, {"b": "2"}]), "exactly one"),
        (b"<methodCall><methodName>x</methodName><params><param><value><struct>", "not a valid XML-RPC"),
        (b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]><methodCall/>', "not a valid XML-RPC"),
    ],
)
def test_bad_payload_files(data: bytes, message: str) -> None:
    with pytest.raises(MergeError, match=message):
        load_payload_bytes(data, "f")


@pytest.mark.parametrize("form", ["json", "xmlrpc"])
def test_apply_payload_file_merges_under_one_revision(
    conf_dir: Path, tmp_path: Path, primary_payload: dict[str, Any], registry: SyncItemRegistry, form: str
) -> None:
    path = tmp_path / f"payload.{form}"
    if form == "json":
        path.write_text(json.dumps(primary_payload))
    else:
        path.write_bytes(xmlrpc.dumps_request("opnsense.restore_config_section", [primary_payload]))
    store = ConfigStore(conf_dir)
    report = apply_payload_file(store, path, registry)
    root = store.load()
    assert root.findtext("revision/description") == revision_description(primary_payload) == report.description
    assert texts(root, "filter.rule", "descr")[0] == "rule 1: allow LAN to the firewall"
    assert root.findtext("system/hostname") == "fw-b"
    assert [entry.description for entry in store.history()] == [report.description]


def test_apply_payload_refusal_writes_nothing(conf_dir: Path, tmp_path: Path, registry: SyncItemRegistry) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"nat": {"outbound": {"mode": "advanced"}}, "OPNsense": {"Mystery": {"a": "1"}}}))
    store = ConfigStore(conf_dir)
    before = store.config_path.read_bytes()
    with pytest.raises(MergeError, match=r"p\.json: refusing section\(s\) OPNsense\.Mystery"):
        apply_payload_file(store, path, registry)
    assert store.config_path.read_bytes() == before and store.history() == []
    report = apply_payload_file(store, path, registry, accept_unknown=True)
    assert store.load().findtext("nat/outbound/mode") == "advanced"
    assert report.changed_sections == ["nat", "OPNsense"]


def test_cli_apply_payload(conf_dir: Path, tmp_path: Path, primary_payload: dict[str, Any],
                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps(primary_payload))
    assert run_command(apply_command, ["--conf-dir", str(conf_dir), "apply-payload", str(path)]) == (0, "")
    out = capsys.readouterr().out
    printed = json.loads(out)
    assert printed["description"].startswith("Merged system, cert")
    assert [v["key"] for v in printed["vips_removed"]] == ["carp_wan_vip5"]
    assert "carp-secret" not in out and "$2y$" not in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"hasync": {"synchronizetoip": "x"}}))
    code, message = run_command(apply_command, ["--conf-dir", str(conf_dir), "apply-payload", str(bad)])
    assert code == 2 and "own hasync" in message
