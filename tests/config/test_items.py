"""Sync items: the core table, drop-in plugin files, the registry, the hasync section, `items` CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hasync.cli.commands import items as items_command
from hasync.config.items import (
    CORE_ITEMS,
    DEFAULT_ITEMS_DIR,
    HasyncSettings,
    SyncItem,
    SyncItemRegistry,
    load_item_file,
    read_hasync,
)
from hasync.core import xmlsafe
from hasync.core.errors import SyncItemError
from support.items import run_command
from support.paths import REPO

CONFIGS = REPO / "fixtures" / "configs"

# Reference §3, typed in from the table: the spec the code is checked against.
REFERENCE_CORE = {
    "users": "system.user,system.group",
    "authservers": "system.authserver",
    "certs": "cert,ca,crl",
    "virtualip": "virtualip",
    "staticroutes": "staticroutes,gateways,OPNsense.Gateways",
    "syslog-ng": "syslog,OPNsense.Syslog",
    "cron": "OPNsense.cron",
    "sysctl": "sysctl",
    "webgui": "system.webgui",
    "dhcrelay": "dhcrelay,dhcrelay6,OPNsense.DHCRelay",
    "dnsforwarder": "dnsmasq",
    "hostwatch": "OPNsense.Hostwatch",
    "shaper": "OPNsense.TrafficShaper",
    "captiveportal": "OPNsense.captiveportal",
    "ipsec": "ipsec,OPNsense.IPsec,OPNsense.Swanctl",
    "kea": "OPNsense.Kea",
    "monit": "OPNsense.monit",
    "syslog": "OPNsense.Netflow",
    "ntpd": "ntpd,system.timeservers",
    "opendns": "opendns",
    "ssh": "system.ssh",
    "openvpn": "openvpn,OPNsense.OpenVPN",
    "ifgroups": "ifgroups.ifgroupentry",
    "rules": "filter,OPNsense.Firewall.Filter.rules",
    "schedules": "schedules",
    "categories": "OPNsense.Firewall.Category",
    "lvtemplate": "OPNsense.Firewall.Lvtemplate",
    "aliases": "aliases,OPNsense.Firewall.Alias",
    "nat": "nat,OPNsense.Firewall.Filter.snatrules,OPNsense.Firewall.Filter.npt,OPNsense.Firewall.Filter.onetoone",
    "radvd": "OPNsense.radvd",
    "suricata": "OPNsense.IDS",
    "dnsresolver": "unbound,OPNsense.unboundplus",
    "wireguard": "OPNsense.wireguard",
}

REFERENCE_PLUGINS = {
    "haproxy": "OPNsense.HAProxy",
    "dhcpd": "dhcpd",
    "dhcpdv6": "dhcpdv6",
    "bind": "OPNsense.bind",
    "frr": "OPNsense.quagga",
    "nginx": "OPNsense.Nginx",
    "squid": "OPNsense.proxy",
}


def write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data, encoding="utf-8")
    return path


# --- core and shipped items ----------------------------------------------------------------


def test_core_items_match_reference_table() -> None:
    assert len(CORE_ITEMS) == 33
    assert {item.id: ",".join(item.sections) for item in CORE_ITEMS} == REFERENCE_CORE
    for item in CORE_ITEMS:
        assert item.description.strip(), item.id
        assert item.source == "core"


def test_shipped_plugin_items_load_and_match_reference() -> None:
    registry = SyncItemRegistry.load()
    assert len(registry) == 33 + len(list(DEFAULT_ITEMS_DIR.glob("*.json")))
    for item_id, section in REFERENCE_PLUGINS.items():
        item = registry.get(item_id)
        assert ",".join(item.sections) == section
        assert item.source.endswith(f"{item_id}.json")


def test_items_dir_override_replaces_the_default_directory(tmp_path: Path) -> None:
    write(tmp_path / "acme.json", {"id": "acme", "description": "ACME client", "sections": ["OPNsense.AcmeClient"]})
    registry = SyncItemRegistry.load(tmp_path)
    assert "acme" in registry
    assert "haproxy" not in registry  # the default drop-ins are not read when overridden
    assert len(registry) == 34


def test_missing_items_dir_named_by_the_user_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SyncItemError, match="does not exist"):
        SyncItemRegistry.load(tmp_path / "nope")


def test_a_file_may_hold_an_array_of_items(tmp_path: Path) -> None:
    path = write(tmp_path / "multi.json", [
        {"id": "one", "description": "One", "sections": ["OPNsense.One"], "services": ["one"]},
        {"id": "two", "description": "Two", "sections": ["OPNsense.Two", "two"], "help": "h"},
    ])
    items = load_item_file(path)
    assert [(i.id, i.sections, i.services, i.help) for i in items] == [
        ("one", ["OPNsense.One"], ["one"], ""),
        ("two", ["OPNsense.Two", "two"], [], "h"),
    ]


# --- bad drop-in files: the error names the file and the field --------------------------------


@pytest.mark.parametrize(
    ("content", "field"),
    [
        ({"description": "x", "sections": ["a"]}, "(top level)"),  # id missing
        ({"id": "x", "description": "", "sections": ["a"]}, "description"),
        ({"id": "x", "description": "d", "sections": "a,b"}, "sections"),
        ({"id": "x", "description": "d", "sections": ["ok", "bad path!"]}, "sections[1]"),
        ({"id": "X Y", "description": "d", "sections": ["a"]}, "id"),
        ({"id": "x", "description": "d", "sections": ["a"], "services": [3]}, "services[0]"),
        ({"id": "x", "description": "d", "sections": ["a"], "colour": "red"}, "(top level)"),
        ([{"id": "x", "description": "d", "sections": ["a"]}, {"id": "y", "sections": ["b"]}], "[1]"),
    ],
)
def test_schema_errors_name_file_and_field(tmp_path: Path, content: object, field: str) -> None:
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(SyncItemError) as caught:
        load_item_file(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"field {field}" in message


@pytest.mark.parametrize("section", ["hasync", "interfaces.lan", "revision", "system"])
def test_items_naming_node_specific_sections_are_refused(tmp_path: Path, section: str) -> None:
    path = write(tmp_path / "evil.json", {"id": "evil", "description": "d", "sections": ["ok", section]})
    with pytest.raises(SyncItemError, match=r"evil\.json: field sections\[1\]"):
        load_item_file(path)


def test_system_sub_paths_are_allowed(tmp_path: Path) -> None:
    path = write(tmp_path / "ok.json", {"id": "ok", "description": "d", "sections": ["system.dnsserver"]})
    assert load_item_file(path)[0].sections == ["system.dnsserver"]


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.json", '{\n  "id": "x",\n  oops\n}')
    with pytest.raises(SyncItemError, match=r"broken\.json: line 3: invalid JSON"):
        load_item_file(path)


def test_duplicate_id_names_both_sources(tmp_path: Path) -> None:
    write(tmp_path / "dup.json", {"id": "users", "description": "d", "sections": ["x"]})
    with pytest.raises(SyncItemError, match=r"dup\.json: field id: sync item 'users' is already defined by core"):
        SyncItemRegistry.load(tmp_path)


# --- registry lookups ------------------------------------------------------------------------


@pytest.fixture
def registry() -> SyncItemRegistry:
    return SyncItemRegistry.load()


def test_resolve_keeps_order_and_rejects_unknown(registry: SyncItemRegistry) -> None:
    assert [i.id for i in registry.resolve(["nat", "users", "nat"])] == ["nat", "users"]
    with pytest.raises(SyncItemError, match=r"unknown sync item.*widgets"):
        registry.resolve(["users", "widgets"])


def test_sections_for_is_ordered_and_unique() -> None:
    registry = SyncItemRegistry([
        SyncItem("a", "A", ["x", "y"]),
        SyncItem("b", "B", ["y", "z"]),
    ])
    assert registry.sections_for(["b", "a"]) == ["y", "z", "x"]


def test_coverage_is_by_section_or_below_it(registry: SyncItemRegistry) -> None:
    assert "system.user" in registry.covering_sections()
    assert registry.is_covered("system.user")
    assert registry.is_covered("OPNsense.Firewall.Alias.aliases")  # below a section
    assert not registry.is_covered("system")  # above sections: not covered as a whole
    assert not registry.is_covered("system.hostname")
    assert not registry.is_covered("OPNsense.Firewall")
    assert [i.id for i in registry.items_covering("nat")] == ["nat"]


def test_services_for_sections(registry: SyncItemRegistry) -> None:
    assert registry.services_for_sections(["OPNsense.HAProxy"]) == ["haproxy"]
    assert registry.services_for_sections(["system.user"]) == ["login"]
    # a changed path below an item's section selects it as well
    assert registry.services_for_sections(["OPNsense.Kea.dhcp4"]) == ["kea"]
    assert registry.services_for_sections(["filter"]) == []


# --- hasync section --------------------------------------------------------------------------


def test_current_form() -> None:
    root = xmlsafe.parse_bytes((CONFIGS / "primary.xml").read_bytes())
    settings = read_hasync(root)
    assert settings.form == "current"
    assert settings.syncitems[:3] == ["users", "certs", "virtualip"]
    assert settings.pfsyncinterface == "opt1" and settings.pfsyncdefer and settings.verifypeer
    assert settings.synchronizetoip == "10.99.0.2" and settings.is_primary
    assert settings.username == "hasync" and settings.password == "PrimaryToBackupSecret"
    assert settings.pfsyncenabled is None and settings.pfsync_interface_effective == "opt1"


def test_legacy_form() -> None:
    root = xmlsafe.parse_bytes((CONFIGS / "legacy.xml").read_bytes())
    settings = read_hasync(root)
    assert settings.form == "legacy"
    # synchronizetoip is the target, not an item
    assert settings.syncitems == ["rules", "aliases", "virtualip", "dhcpd"]
    assert settings.pfsyncenabled is True and settings.pfsync_interface_effective == "opt1"
    assert settings.pfsyncversion == "1400"  # default when absent


def test_legacy_form_without_pfsyncenabled_means_pfsync_off() -> None:
    root = xmlsafe.parse_bytes(
        b"<opnsense><hasync><synchronizenat>on</synchronizenat><pfsyncinterface>opt1</pfsyncinterface>"
        b"</hasync></opnsense>"
    )
    settings = read_hasync(root)
    assert settings.form == "legacy" and settings.syncitems == ["nat"]
    assert settings.pfsync_interface_effective == ""


def test_empty_syncitems_and_absent_section() -> None:
    backup = xmlsafe.parse_bytes((CONFIGS / "backup.xml").read_bytes())
    settings = read_hasync(backup)
    assert settings.form == "current" and settings.syncitems == [] and not settings.is_primary
    assert settings.effective_username == "root"
    assert read_hasync(xmlsafe.parse_bytes(b"<opnsense/>")) == HasyncSettings()


def test_password_never_in_repr_or_public_dict() -> None:
    root = xmlsafe.parse_bytes((CONFIGS / "primary.xml").read_bytes())
    settings = read_hasync(root)
    assert "PrimaryToBackupSecret" not in repr(settings)
    assert "PrimaryToBackupSecret" not in str(settings)
    assert "PrimaryToBackupSecret" not in json.dumps(settings.public_dict())
    assert settings.public_dict()["password"] == "********"
    assert settings.public_dict()["username"] == "hasync"
    assert settings.password == "PrimaryToBackupSecret"  # the control: the password is there to leak


def test_settings_hand_their_password_to_no_generic_walk() -> None:
    """Not a tuple (unlike the other records a sync imports): nothing iterates, indexes or
    JSON-encodes the settings with their password by accident."""
    settings = read_hasync(xmlsafe.parse_bytes((CONFIGS / "primary.xml").read_bytes()))
    with pytest.raises(TypeError):
        iter(settings)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        json.dumps(settings)
    assert read_hasync(xmlsafe.parse_bytes((CONFIGS / "primary.xml").read_bytes())) == settings
    assert settings != read_hasync(xmlsafe.parse_bytes((CONFIGS / "backup.xml").read_bytes()))


# --- CLI -------------------------------------------------------------------------------------


def test_cli_items_prints_id_to_description(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(items_command, ["items"]) == (0, "")
    data = json.loads(capsys.readouterr().out)
    assert data == SyncItemRegistry.load().options()
    assert data["users"] == "Users and Groups"
    assert list(data)[:2] == ["users", "authservers"]


def test_cli_items_verbose_and_items_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "acme.json", {"id": "acme", "description": "ACME", "sections": ["OPNsense.AcmeClient"],
                                   "services": ["acme"]})
    assert run_command(items_command, ["--items-dir", str(tmp_path), "items", "--verbose"]) == (0, "")
    data = json.loads(capsys.readouterr().out)
    assert data["acme"]["section"] == "OPNsense.AcmeClient"
    assert data["acme"]["services"] == ["acme"]
    assert data["nat"]["sections"][0] == "nat"
    assert "haproxy" not in data


def test_cli_items_bad_file_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path / "bad.json", {"id": "bad", "sections": ["x"]})
    code, err = run_command(items_command, ["--items-dir", str(tmp_path), "items"])
    assert code == 2
    assert "bad.json" in err and "field (top level)" in err and "description" in err
    assert capsys.readouterr().out == ""


# --- the shipped drop-ins skip the validator at run time, as the tests validated them ----------


def test_shipped_sums_list_exactly_the_shipped_files_and_each_is_valid() -> None:
    import hashlib

    import jsonschema

    from hasync.config.items import SCHEMA_PATH, VALIDATED_SUMS

    schema = json.loads(SCHEMA_PATH.read_text())
    listed = {line.split()[1]: line.split()[0] for line in VALIDATED_SUMS.read_text().splitlines() if line.strip()}
    shipped = {path.name: path for path in DEFAULT_ITEMS_DIR.glob("*.json")}
    assert set(listed) == set(shipped), "regenerate with: cd hasync/items.d && sha256sum *.json > SHA256SUMS"
    for name, path in shipped.items():
        raw = path.read_bytes()
        assert hashlib.sha256(raw).hexdigest() == listed[name], f"{name} changed: regenerate SHA256SUMS"
        jsonschema.Draft202012Validator(schema).validate(json.loads(raw))


def test_a_file_not_in_the_sums_is_still_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sums only vouch for exact bytes: a copy of a shipped file with one field broken is refused,
    and the shipped file itself loads without the validator (control: with the sums emptied, the
    same good bytes go through the validator, which is what the sums save)."""
    from hasync.config import items as items_module

    good = (DEFAULT_ITEMS_DIR / "dhcpd.json").read_bytes()
    copy = tmp_path / "dhcpd.json"
    copy.write_bytes(good.replace(b'"sections": ["dhcpd"]', b'"sections": ["dhcpd", 7]'))
    with pytest.raises(SyncItemError, match=r"dhcpd\.json: field sections\[1\]"):
        load_item_file(copy)

    checked: list[Path] = []
    original = items_module._check_schema
    monkeypatch.setattr(items_module, "_check_schema",
                        lambda path, data, schema: (checked.append(path), original(path, data, schema)))
    load_item_file(DEFAULT_ITEMS_DIR / "dhcpd.json")
    assert checked == []
    monkeypatch.setattr(items_module, "validated_digests", lambda: frozenset())
    load_item_file(DEFAULT_ITEMS_DIR / "dhcpd.json")
    assert checked == [DEFAULT_ITEMS_DIR / "dhcpd.json"]
