"""The payload builder: every rule of issue 2 §5, each with a case that fails if the rule breaks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.cli.commands import payload as payload_command
from hasync.config.items import SyncItemRegistry
from hasync.config.tree import element_to_value, find_path
from hasync.core import xmlsafe
from hasync.core.errors import ConfigError, SyncItemError
from hasync.core.php import php_empty
from hasync.payload.build import (
    REDACTED,
    build_payload,
    own_address_facing,
    payload_for_items,
    redact,
    remove_nosync,
    selected_item_ids,
)
from hasync.wire import xmlrpc
from support.items import run_command
from support.paths import REPO

CONFIGS = REPO / "fixtures" / "configs"


def load(name: str) -> etree._Element:
    return xmlsafe.parse_bytes((CONFIGS / name).read_bytes())


def parse(text: str) -> etree._Element:
    return xmlsafe.parse_bytes(text.encode())


@pytest.fixture
def primary() -> etree._Element:
    return load("primary.xml")


@pytest.fixture
def registry() -> SyncItemRegistry:
    return SyncItemRegistry.load()


# --- dotted-path copy ------------------------------------------------------------------------


def test_dotted_copy_carries_nothing_else_at_intermediate_levels(primary: etree._Element) -> None:
    payload = build_payload(primary, ["system.user", "system.group"])
    assert list(payload) == ["system"]
    assert list(payload["system"]) == ["user", "group"]  # no hostname, nextuid, webgui, ...
    users = payload["system"]["user"]
    assert [u["name"] for u in users] == ["root", "alice", "syncer"]
    # API keys in both stored forms travel as stored
    # (`key` and `item` are list tags, so they travel as arrays even when single)
    (item,) = users[1]["apikeys"]["item"]
    assert item["secret"] == "$6$salt$hashedsecretalice"
    assert isinstance(item["key"], list) and item["key"][0].startswith("AliceKey")
    assert users[2]["apikeys"].startswith("SyncerKey") and "|$6$" in users[2]["apikeys"]
    assert payload["system"]["group"][0]["member"] == ["0", "2000"]
    assert payload["system"]["group"][1]["priv"] == ["page-xmlrpclibrary"]


def test_copied_subtree_equals_the_toarray_value_of_that_subtree(primary: etree._Element) -> None:
    payload = build_payload(primary, ["OPNsense.Firewall.Alias", "ntpd"])
    (alias,) = find_path(primary, "OPNsense.Firewall")
    assert payload["OPNsense"]["Firewall"]["Alias"] == element_to_value(alias)["Alias"]
    assert payload["OPNsense"]["Firewall"]["Alias"]["@attributes"] == {"version": "1.0.1"}
    assert payload["OPNsense"]["Firewall"]["Alias"]["aliases"]["alias"][0]["@attributes"]["uuid"].startswith("a0")
    assert list(payload["OPNsense"]) == ["Firewall"] and list(payload["OPNsense"]["Firewall"]) == ["Alias"]
    assert payload["ntpd"] == {"prefer": "0.pool.ntp.test"}


def test_keys_keep_the_order_of_the_sections(primary: etree._Element) -> None:
    payload = build_payload(primary, ["ntpd", "system.timeservers", "cert", "system.user"])
    assert list(payload) == ["ntpd", "system", "cert"]
    assert list(payload["system"]) == ["timeservers", "user"]


def test_missing_path_is_sent_as_empty_array_at_its_position(primary: etree._Element) -> None:
    payload = build_payload(primary, ["staticroutes", "OPNsense.Gateways", "system.authserver"])
    assert payload["staticroutes"] == []
    assert payload["OPNsense"] == {"Gateways": []}
    assert payload["system"] == {"authserver": []}


def test_missing_intermediate_level_gives_nested_structs() -> None:
    root = parse("<opnsense><OPNsense><Other/></OPNsense></opnsense>")
    assert build_payload(root, ["OPNsense.HAProxy.general"]) == {"OPNsense": {"HAProxy": {"general": []}}}
    assert build_payload(root, ["nope.deeper"]) == {"nope": {"deeper": []}}


def test_below_a_missing_level_everything_is_missing() -> None:
    # PHP keeps looking at the same source level after a miss, so `a.Bar` would pick up a
    # top-level <Bar>; the intended behaviour sends a.Bar as empty.
    root = parse("<opnsense><Bar><x>1</x></Bar></opnsense>")
    assert build_payload(root, ["a.Bar"]) == {"a": {"Bar": []}}


def test_present_but_empty_element_is_an_empty_string_not_an_array(primary: etree._Element) -> None:
    payload = build_payload(primary, ["schedules"])
    assert payload == {"schedules": ""}
    assert payload["schedules"] != []  # control: differs from the missing case


def test_a_broader_section_is_not_clobbered_by_a_narrower_one(primary: etree._Element) -> None:
    both = build_payload(primary, ["nat", "nat.outbound"])
    assert both == build_payload(primary, ["nat"])


# --- node-specific sections ------------------------------------------------------------------


@pytest.mark.parametrize("section", ["hasync", "interfaces", "interfaces.lan", "revision", "system"])
def test_node_specific_sections_are_refused(primary: etree._Element, section: str) -> None:
    with pytest.raises(SyncItemError, match="refusing to synchronise"):
        build_payload(primary, ["system.user", section])


def test_nothing_node_specific_travels_with_every_item(primary: etree._Element, registry: SyncItemRegistry) -> None:
    payload = payload_for_items(primary, registry, registry.ids())
    text = json.dumps(payload)
    assert "hasync" not in payload and "interfaces" not in payload and "revision" not in payload
    assert "PrimaryToBackupSecret" not in text
    assert "hostname" not in payload["system"] and "fw-a" not in text.replace("fw-a only", "")
    assert set(payload["system"]) == {"user", "group", "authserver", "webgui", "timeservers", "ssh"}


# --- nosync ----------------------------------------------------------------------------------


def test_nosync_records_are_stripped_everywhere(primary: etree._Element) -> None:
    payload = build_payload(primary, ["cert", "filter", "OPNsense.Firewall.Filter.rules", "virtualip"])
    assert [c["descr"] for c in payload["cert"]] == ["Web GUI certificate"]
    assert [r["descr"] for r in payload["filter"]["rule"]] == [
        "rule 1: allow LAN to the firewall",
        "rule 2: block LAN to the management net",
        "rule 3: allow LAN to any",
    ]
    mvc = payload["OPNsense"]["Firewall"]["Filter"]["rules"]["rule"]
    assert [r["description"] for r in mvc] == ["MVC rule 10"]
    assert "carp-secret-7" not in json.dumps(payload)
    assert "nosync" not in json.dumps(payload).replace('"nosync": "0"', "")


def test_nosync_zero_or_empty_is_not_set() -> None:
    # PHP's empty(): "0" and "" do not mark a record; " " does.
    value: dict[str, Any] = {"r": [{"n": "a", "nosync": "0"}, {"n": "b", "nosync": ""}, {"n": "c", "nosync": " "},
                                   {"n": "d", "nosync": "on"}]}
    remove_nosync(value)
    assert [r["n"] for r in value["r"]] == ["a", "b"]
    assert php_empty("0") and php_empty("") and php_empty([]) and not php_empty("00")


def test_nosync_zero_on_a_single_record_keeps_it() -> None:
    value: dict[str, Any] = {"a": {"nosync": "0", "x": "1"}, "b": {"nosync": "", "x": "2"}}
    remove_nosync(value)
    assert value == {"a": {"nosync": "0", "x": "1"}, "b": {"nosync": "", "x": "2"}}


def test_nosync_container_and_nested_records_are_removed() -> None:
    value: dict[str, Any] = {
        "a": {"nosync": "1", "x": "gone"},
        "b": {"deep": {"list": [{"keep": "1"}, {"nosync": "yes"}], "rec": {"nosync": "1"}}},
        "c": "scalar",
    }
    remove_nosync(value)
    assert value == {"b": {"deep": {"list": [{"keep": "1"}]}}, "c": "scalar"}


def test_stripped_list_stays_a_list_on_the_wire() -> None:
    # PHP leaves a hole in the keys and its encoder then sends a struct; we keep an array.
    root = parse("<opnsense><filter><rule><n>1</n><nosync>1</nosync></rule><rule><n>2</n></rule></filter></opnsense>")
    body = xmlrpc.dumps_request("m", [build_payload(root, ["filter"])])
    assert b"<name>rule</name><value><array><data>" in body


# --- virtual IPs -----------------------------------------------------------------------------


def test_only_vhid_vips_travel_with_raised_skew(primary: etree._Element) -> None:
    payload = build_payload(primary, ["virtualip"])
    assert list(payload["virtualip"]) == ["vip"]  # not the model's version attribute
    vips = payload["virtualip"]["vip"]
    assert [v["@attributes"]["uuid"][-1] for v in vips] == ["1", "2", "4", "5"]  # order kept
    # 0+100, 20+100, min(300, 254); the IP alias on vhid 3 has no advskew and gets none
    assert [v.get("advskew") for v in vips] == [100, 120, None, 254]
    assert all(isinstance(v["advskew"], int) for v in vips if "advskew" in v)
    assert vips[0]["password"] == "carp-secret-1" and vips[0]["advbase"] == "1"
    local = primary.find("virtualip/vip")
    assert local is not None and local.findtext("advskew") == "0"  # the local config is untouched


@pytest.mark.parametrize(
    ("xml", "expected"),
    [
        ("<opnsense/>", []),
        ("<opnsense><virtualip/></opnsense>", []),
        ("<opnsense><virtualip><vip><mode>ipalias</mode><vhid/></vip></virtualip></opnsense>", {"vip": []}),
        ("<opnsense><virtualip><vip><mode>carp</mode><vhid>4</vhid><advskew>x</advskew></vip></virtualip></opnsense>",
         {"vip": [{"mode": "carp", "vhid": "4", "advskew": 100}]}),
        ("<opnsense><virtualip><vip><mode>carp</mode><vhid>4</vhid><advskew> 7</advskew></vip></virtualip></opnsense>",
         {"vip": [{"mode": "carp", "vhid": "4", "advskew": 107}]}),
        ("<opnsense><virtualip><vip><mode>ipalias</mode><vhid>4</vhid><advskew/></vip></virtualip></opnsense>",
         {"vip": [{"mode": "ipalias", "vhid": "4", "advskew": ""}]}),
        ("<opnsense><virtualip><vip><mode>ipalias</mode><vhid>4</vhid></vip></virtualip></opnsense>",
         {"vip": [{"mode": "ipalias", "vhid": "4"}]}),
        ("<opnsense><virtualip><vip><vhid>4</vhid><advskew><a>1</a></advskew></vip></virtualip></opnsense>",
         {"vip": [{"vhid": "4", "advskew": 101}]}),  # PHP's intval() of a non-empty array is 1
    ],
)
def test_vip_section_shapes(xml: str, expected: Any) -> None:
    assert build_payload(parse(xml), ["virtualip"]) == {"virtualip": expected}


def test_ip_aliases_stacked_on_a_carp_vhid_keep_their_empty_advskew() -> None:
    """vip-stack.xml: only the CARP VIPs owning vhids 5 and 6 have a skew to raise; the IP aliases
    on those vhids (``<advskew/>`` or none) travel as they are, as get_vip_config_section() sends them."""
    payload = build_payload(load("vip-stack.xml"), ["virtualip"])
    sent = {vip["descr"]: vip for vip in payload["virtualip"]["vip"]}
    assert [vip.get("advskew") for vip in sent.values()] == [100, "", None, 254, ""]
    assert "this node's own LAN alias (no vhid: not sent)" not in sent
    body = xmlrpc.dumps_request("opnsense.restore_config_section", [payload])
    assert body.count(b"<name>advskew</name><value><string></string></value>") == 2
    assert body.count(b"<name>advskew</name><value><int>") == 2


# --- DHCP failover peer ----------------------------------------------------------------------


def test_failover_peer_is_rewritten_to_our_address_facing_it(primary: etree._Element) -> None:
    payload = build_payload(primary, ["dhcpd"])
    assert payload["dhcpd"]["lan"]["failover_peerip"] == "192.168.10.2"  # was the peer's 192.168.10.3
    assert payload["dhcpd"]["opt1"]["failover_peerip"] == ""  # empty stays empty
    assert payload["dhcpd"]["lan"]["staticmap"][0]["hostname"] == "web"


def test_legacy_config_payload(registry: SyncItemRegistry) -> None:
    root = load("legacy.xml")
    payload = payload_for_items(root, registry, selected_item_ids(root))
    assert list(payload) == ["filter", "OPNsense", "aliases", "virtualip", "dhcpd"]
    assert payload["dhcpd"]["lan"]["failover_peerip"] == "172.16.0.2"
    assert payload["virtualip"]["vip"][0]["advskew"] == ""  # an empty advskew is sent empty, as PHP does
    assert payload["aliases"]["alias"][0]["name"] == "legacy_hosts"
    assert payload["OPNsense"]["Firewall"] == {"Filter": {"rules": []}, "Alias": []}


def test_most_specific_subnet_wins_and_ties_prefer_the_dhcp_interface() -> None:
    config = {"interfaces": {
        "wide": {"ipaddr": "10.0.0.1", "subnet": "8"},
        "narrow": {"ipaddr": "10.1.2.1", "subnet": "24"},
        "twin": {"ipaddr": "10.1.2.254", "subnet": "24"},
        "wan": {"ipaddr": "dhcp"},
    }}
    assert own_address_facing(config, "10.1.2.3") == "10.1.2.1"
    assert own_address_facing(config, "10.1.2.3", prefer="twin") == "10.1.2.254"
    assert own_address_facing(config, "10.9.9.9") == "10.0.0.1"


@pytest.mark.parametrize("peer", ["198.51.100.7", "not-an-ip", "10.1.2.1"])
def test_unknown_peer_network_is_an_error(peer: str) -> None:
    config = {"interfaces": {"lan": {"ipaddr": "10.1.2.1", "subnet": "24"}, "wan": {"ipaddr": "dhcp", "subnet": ""}}}
    with pytest.raises(ConfigError, match="failover_peerip"):
        own_address_facing(config, peer)


# --- item selection and the CLI ----------------------------------------------------------------


def test_selected_item_ids(primary: etree._Element) -> None:
    assert selected_item_ids(primary, "nat, users") == ["nat", "users"]
    assert selected_item_ids(primary)[0] == "users"
    with pytest.raises(SyncItemError, match="no sync items selected"):
        selected_item_ids(load("backup.xml"))
    with pytest.raises(SyncItemError, match="--items is empty"):
        selected_item_ids(primary, " , ")


def test_unknown_item_is_an_error(primary: etree._Element, registry: SyncItemRegistry) -> None:
    with pytest.raises(SyncItemError, match="unknown sync item"):
        payload_for_items(primary, registry, ["users", "widgets"])


@pytest.fixture
def conf_dir(tmp_path: Path) -> Path:
    shutil.copy(CONFIGS / "primary.xml", tmp_path / "config.xml")
    return tmp_path


def test_cli_payload_json_defaults_to_hasync_syncitems(
    conf_dir: Path, primary: etree._Element, registry: SyncItemRegistry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_command(payload_command, ["--conf-dir", str(conf_dir), "payload"]) == (0, "")
    printed = json.loads(capsys.readouterr().out)
    assert printed == payload_for_items(primary, registry, selected_item_ids(primary))
    assert printed["virtualip"]["vip"][0]["advskew"] == 100


def test_cli_payload_xmlrpc_is_the_exact_method_call(
    conf_dir: Path, primary: etree._Element, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    code = run_command(payload_command, ["--conf-dir", str(conf_dir), "payload", "--items", "users,nat",
                                         "--format", "xmlrpc"])
    assert code == (0, "")
    body = capsysbinary.readouterr().out
    expected = build_payload(primary, ["system.user", "system.group", "nat", "OPNsense.Firewall.Filter.snatrules",
                                       "OPNsense.Firewall.Filter.npt", "OPNsense.Firewall.Filter.onetoone"])
    assert body == xmlrpc.dumps_request("opnsense.restore_config_section", [expected])
    assert xmlrpc.loads_request(body) == ("opnsense.restore_config_section", [json.loads(json.dumps(expected))])


def test_cli_payload_skips_stored_ids_no_item_defines(
    tmp_path: Path, registry: SyncItemRegistry, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # rc.filter_synchronize only looks up known items: a retired legacy flag is ignored, loudly here
    rules = "<synchronizerules>on</synchronizerules>"
    text = (CONFIGS / "legacy.xml").read_text().replace(rules, "<synchronizewidgets>on</synchronizewidgets>" + rules)
    (tmp_path / "config.xml").write_text(text)
    assert run_command(payload_command, ["--conf-dir", str(tmp_path), "payload"]) == (0, "")
    printed = json.loads(capsys.readouterr().out)
    assert printed == payload_for_items(load("legacy.xml"), registry, ["rules", "aliases", "virtualip", "dhcpd"])
    assert "widgets" in caplog.text
    assert registry.split_known(["widgets", "nat", "x"]) == (["nat"], ["widgets", "x"])


def test_cli_payload_errors(conf_dir: Path) -> None:
    code, message = run_command(payload_command, ["--conf-dir", str(conf_dir), "payload", "--items", "nope"])
    assert code == 2 and "unknown sync item" in message
    code, message = run_command(payload_command, ["--conf-dir", str(conf_dir / "missing"), "payload"])
    assert code == 2 and "no such file" in message


def test_redact_masks_secrets_only(primary: etree._Element, registry: SyncItemRegistry,
                                   conf_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = payload_for_items(primary, registry, ["users", "certs", "virtualip"])
    shown = redact(payload)
    text = json.dumps(shown)
    assert "carp-secret-1" not in text and "hashedsecret" not in text and "$2y$" not in text
    assert "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCg==" not in text  # the private key
    assert shown["system"]["user"][0]["name"] == "root" and shown["cert"][0]["crt"] == payload["cert"][0]["crt"]
    assert shown["virtualip"]["vip"][0]["password"] == REDACTED
    assert run_command(payload_command, ["--conf-dir", str(conf_dir), "payload", "--redact"]) == (0, "")
    assert "carp-secret-1" not in capsys.readouterr().out
