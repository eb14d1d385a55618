"""`opnsense-ha diff` against a real backup agent over TLS (live and the stock-backup fallback)."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core import schemas
from hasync.core.secrets import is_secret_path
from hasync.health.diff import DiffReport, ItemDiff, RecordChange, diff_values, diff_with_backup
from hasync.health.diff_render import colour_wanted
from hasync.wire.client import ClientOptions
from support.health import agent, assert_no_secret, edit, fresh_pair, run_cli, sync
from support.nodes import Pair


@pytest.fixture
def pair(tmp_path: Path) -> Pair:
    return fresh_pair(tmp_path)


@pytest.fixture
def synced(pair: Pair) -> Iterator[Pair]:
    with agent(pair):
        sync(pair)
        yield pair


def report_of(pair: Pair, items: list[str] | None = None) -> DiffReport:
    return diff_with_backup(ConfigStore(pair.primary), SyncItemRegistry.load(),
                            ClientOptions(retries=0, total_timeout=20), items)


def item(report: DiffReport, item_id: str) -> ItemDiff:
    return next(i for i in report.items if i.id == item_id)


def only(changes: list[RecordChange], kind: str) -> list[RecordChange]:
    return [c for c in changes if c.kind == kind]


def fields(change: RecordChange) -> dict[str, tuple[Any, Any]]:
    return {f.field: (f.old, f.new) for f in change.fields}


def rules(root: Any) -> etree._Element:
    node = root.find("filter")
    assert node is not None
    return node


def rule(root: Any, descr: str) -> etree._Element:
    return next(r for r in rules(root).iterfind("rule") if r.findtext("descr") == descr)


# --- in sync / before the first sync ------------------------------------------------------------


def test_in_sync_pair_has_no_differences(synced: Pair, capsys: Any) -> None:
    report = report_of(synced)
    assert report.source == "live" and report.exit_code == 0
    assert all(i.status == "same" and i.primary_digest == i.backup_digest for i in report.items)
    code, out, _ = run_cli(capsys, synced.primary, "diff")
    assert code == 0 and out.rstrip().endswith("no differences")
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--json")
    document = json.loads(out)
    schemas.validate("diff-result", document)
    assert code == 0 and document["differences"] == 0 and document["fallback"] is False


def test_before_the_first_sync(pair: Pair, capsys: Any) -> None:
    with agent(pair):
        report = report_of(pair)
        code, out, _ = run_cli(capsys, pair.primary, "diff")
    assert code == 1 and report.exit_code == 1
    assert item(report, "users").status == "same"
    changes = item(report, "rules").changes
    assert [c.label for c in only(changes, "removed")] == ["'Old rule that the primary no longer has'"]
    assert [c.label for c in only(changes, "added")] == [
        "'Allow LAN to any'", "'Block bogus sources'", "'Allow pfsync on the sync link'"]
    nat = item(report, "nat").changes
    assert [fields(c) for c in nat if c.label == "(settings)"] == [{"mode": ("automatic", "hybrid")}]
    # the backup keeps its nosync alias and its own IP alias VIP: neither shows as removed
    assert only(item(report, "aliases").changes, "removed") == []
    assert only(item(report, "virtualip").changes, "removed") == []
    assert "rules (Firewall Rules): 3 added, 1 removed" in out


# --- rules: changed, added, removed, moved ------------------------------------------------------


def test_changed_added_and_removed_rules(synced: Pair, capsys: Any) -> None:
    with edit(synced.primary) as root:
        rule(root, "Allow LAN to any").find("source/network").text = "opt1"
        rules(root).remove(rule(root, "Block bogus sources"))
        dns = copy.deepcopy(rule(root, "Allow LAN to any"))
        dns.find("descr").text = "Allow DNS to the resolver"
        etree.SubElement(dns, "protocol").text = "udp"
        dns.find("destination").clear()
        etree.SubElement(dns.find("destination"), "port").text = "53"
        rules(root).append(dns)
    report = report_of(synced)
    changes = item(report, "rules").changes
    assert {c.kind for c in changes} == {"changed", "removed", "added"}
    (changed,) = only(changes, "changed")
    assert changed.label == "'Allow LAN to any'" and fields(changed) == {"source.network": ("lan", "opt1")}
    assert not changed.moved
    (removed,) = only(changes, "removed")
    assert removed.label == "'Block bogus sources'" and removed.old_position == 2
    (added,) = only(changes, "added")
    assert added.label == "'Allow DNS to the resolver'" and added.new_position == 3
    assert not any(c.moved for c in changes)  # the pfsync rule moved up only because one was removed
    assert item(report, "rules").counts() == {"added": 1, "removed": 1, "changed": 1, "moved": 0}
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--items", "rules")
    assert code == 1
    assert "source.network: 'lan' -> 'opt1'" in out and "- filter.rule 'Block bogus sources'" in out


def test_reordered_rules_are_reported_as_moves(synced: Pair, capsys: Any) -> None:
    with edit(synced.primary) as root:
        last = rule(root, "Allow pfsync on the sync link")
        rules(root).remove(last)
        rules(root).insert(0, last)
    changes = item(report_of(synced), "rules").changes
    assert [(c.kind, c.label, c.old_position, c.new_position, c.moved) for c in changes] == [
        ("moved", "'Allow pfsync on the sync link'", 3, 1, True)]
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--items", "rules")
    assert code == 1 and "moved #3 -> #1" in out


def test_a_moved_and_edited_rule_is_one_change(synced: Pair) -> None:
    with edit(synced.primary) as root:
        first = rule(root, "Allow LAN to any")
        rules(root).remove(first)
        rules(root).append(first)
        first.find("ipprotocol").text = "inet46"
    changes = item(report_of(synced), "rules").changes
    assert len(changes) == 1
    assert changes[0].kind == "changed" and changes[0].moved
    assert (changes[0].old_position, changes[0].new_position) == (1, 3)
    assert fields(changes[0]) == {"ipprotocol": ("inet", "inet46")}


# --- MVC records by uuid, legacy records by stable key ------------------------------------------


def test_mvc_aliases_are_keyed_by_uuid(synced: Pair) -> None:
    with edit(synced.primary) as root:
        aliases = root.find("OPNsense/Firewall/Alias/aliases")
        admin = aliases.find("alias[@uuid='0d6a3b3c-1111-4c5e-8d2f-000000000002']")
        admin.find("content").text = "10.77.1.0/27"
        web = aliases.find("alias[@uuid='0d6a3b3c-1111-4c5e-8d2f-000000000001']")
        aliases.remove(web)
        dns = copy.deepcopy(admin)
        dns.set("uuid", "0d6a3b3c-1111-4c5e-8d2f-000000000003")
        dns.find("name").text = "dns_servers"
        dns.find("description").text = "Resolvers"
        aliases.append(dns)
    changes = item(report_of(synced), "aliases").changes
    by_kind = {c.kind: c for c in changes}
    assert set(by_kind) == {"changed", "removed", "added"} and len(changes) == 3
    assert by_kind["changed"].key == "uuid 0d6a3b3c-1111-4c5e-8d2f-000000000002"
    assert fields(by_kind["changed"]) == {"content": ("10.77.1.0/28", "10.77.1.0/27")}
    assert by_kind["removed"].key == "uuid 0d6a3b3c-1111-4c5e-8d2f-000000000001"
    assert by_kind["added"].key == "uuid 0d6a3b3c-1111-4c5e-8d2f-000000000003"
    assert all("fw_b_monitoring" not in c.label for c in changes)  # the backup's nosync alias stays


def test_records_are_named_as_admins_know_them(synced: Pair, capsys: Any) -> None:
    """Issue 15: a record with a `name` is shown by it, then its description; in text and --json."""
    with edit(synced.primary) as root:
        aliases = root.find("OPNsense/Firewall/Alias/aliases")
        mail = copy.deepcopy(aliases[0])
        mail.set("uuid", "0d6a3b3c-1111-4c5e-8d2f-000000000004")
        mail.find("name").text = "mail_servers"
        mail.find("description").text = "Mail relays"
        aliases.append(mail)
        user = next(u for u in root.iterfind("system/user") if u.findtext("name") == "hasync")
        user.find("descr").text = "XMLRPC sync user (fw-a)"
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--items", "aliases,users")
    assert code == 1
    assert "+ OPNsense.Firewall.Alias.aliases.alias mail_servers ('Mail relays')" in out
    assert "~ system.user hasync ('XMLRPC sync user (fw-a)')" in out
    assert "[uuid" not in out and "[name" not in out  # the name says it; the key stays in --json
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--items", "aliases,users", "--json")
    document = json.loads(out)
    schemas.validate("diff-result", document)
    changes = [change for entry in document["items"] for change in entry["changes"]]
    assert [(c["name"], c["label"], c["key"]) for c in changes] == [
        ("mail_servers", "mail_servers ('Mail relays')", "uuid 0d6a3b3c-1111-4c5e-8d2f-000000000004"),
        ("hasync", "hasync ('XMLRPC sync user (fw-a)')", "name hasync"),
    ]


@pytest.mark.parametrize(
    ("record", "label", "name"),
    [
        ({"name": "wan_gw", "descr": "Uplink"}, "wan_gw ('Uplink')", "wan_gw"),
        ({"name": "peer1", "url": "http://192.0.2.1:8000/"}, "peer1", "peer1"),
        ({"name": "WAN_DHCP", "descr": "WAN_DHCP"}, "WAN_DHCP", "WAN_DHCP"),
        ({"descr": "Allow DNS", "interface": "lan"}, "'Allow DNS'", None),
        ({"interface": "lan", "protocol": "tcp"}, "#2", None),
    ],
)
def test_record_naming_rule(record: dict[str, str], label: str, name: str | None) -> None:
    before = {"gateway_item": [{"name": "other", "interface": "opt9"}]}
    (change,) = [c for c in diff_values(before, {"gateway_item": [before["gateway_item"][0], record]})
                 if c.kind == "added"]
    assert (change.label, change.name) == (label, name)


def test_a_new_uuid_is_a_new_record_even_with_the_same_name(synced: Pair) -> None:
    with edit(synced.primary) as root:
        root.find("OPNsense/Firewall/Alias/aliases/alias[@uuid='0d6a3b3c-1111-4c5e-8d2f-000000000002']").set(
            "uuid", "0d6a3b3c-1111-4c5e-8d2f-0000000000ff")
    kinds = sorted(c.kind for c in item(report_of(synced), "aliases").changes)
    assert kinds == ["added", "removed"]


def test_legacy_users_and_groups_by_name(synced: Pair) -> None:
    with edit(synced.primary) as root:
        user = next(u for u in root.iterfind("system/user") if u.findtext("name") == "hasync")
        user.find("descr").text = "XMLRPC sync user (fw-a)"
        group = next(g for g in root.iterfind("system/group") if g.findtext("name") == "hasync")
        etree.SubElement(group, "priv").text = "page-hasync-status"
    changes = item(report_of(synced), "users").changes
    assert {(c.path, c.key) for c in changes} == {("system.user", "name hasync"), ("system.group", "name hasync")}
    group_change = next(c for c in changes if c.path == "system.group")
    assert fields(group_change) == {"priv": (["page-xmlrpclibrary"], ["page-xmlrpclibrary", "page-hasync-status"])}


# --- nosync and the VIP transform ---------------------------------------------------------------


def test_nosync_on_both_sides(synced: Pair) -> None:
    with edit(synced.primary) as root:  # primary: a nosync alias is never sent
        aliases = root.find("OPNsense/Firewall/Alias/aliases")
        local = copy.deepcopy(aliases[0])
        local.set("uuid", "0d6a3b3c-1111-4c5e-8d2f-0000000000aa")
        local.find("name").text = "fw_a_only"
        etree.SubElement(local, "nosync").text = "1"
        aliases.append(local)
    with edit(synced.backup) as root:  # backup: a local nosync rule in the ordered rule list
        local_rule = copy.deepcopy(rules(root)[0])
        local_rule.find("descr").text = "fw-b local rule"
        etree.SubElement(local_rule, "nosync").text = "1"
        rules(root).append(local_rule)
    report = report_of(synced, ["aliases", "rules"])
    assert item(report, "aliases").status == "same"  # neither node's nosync alias counts
    rules_item = item(report, "rules")
    # OPNsense replaces the ordered rule lists wholesale: the backup's nosync rule would go, and
    # the diff says so instead of hiding it
    assert [(c.kind, c.label) for c in rules_item.changes] == [("removed", "'fw-b local rule'")]
    assert any("dropped this node's local (nosync) rule 'fw-b local rule'" in w for w in rules_item.warnings)


def test_advskew_transform_is_not_a_difference(synced: Pair) -> None:
    report = report_of(synced, ["virtualip"])
    assert item(report, "virtualip").status == "same"  # backup 100 vs primary 0: the +100 transform
    with edit(synced.primary) as root:
        vips = {v.findtext("vhid"): v for v in root.iterfind("virtualip/vip")}
        vips["1"].find("advskew").text = "20"
        vips["2"].find("advskew").text = "200"
    changes = item(report_of(synced, ["virtualip"]), "virtualip").changes
    assert sorted((c.key, fields(c)["advskew"]) for c in changes) == [
        ("uuid 6f3c1a2e-0001-4a1b-9c2d-000000000001", ("100", "120")),
        ("uuid 6f3c1a2e-0001-4a1b-9c2d-000000000002", ("100", "254")),
    ]


# --- secrets ---------------------------------------------------------------------------------------

NEW_HASH = "$2y$10$3zNhTDfy0uQ7Gk3f5GZ0.O2Uq5ysvq4fYq2m5e3vYh8b1ZkD6s7Yy"
NEW_CARP = "new-carp-secret-8817"
API_SECRET = "$6$rounds=5000$apikeysalt$Zk3q7nP0u4gKx7Y2bq1eVt9hWm5rLs3oDc8aFj6pQn"
PRIVATE_KEY = "LS0tLS1CRUdJTiBQUklWQVRFIEtFWS0tLS0tCk1JSUV2Z0lCQURBTkJna3Fo"


def test_secrets_are_never_printed(synced: Pair, capsys: Any) -> None:
    with edit(synced.primary) as root:
        admin = next(u for u in root.iterfind("system/user") if u.findtext("name") == "root")
        admin.find("password").text = NEW_HASH
        etree.SubElement(admin, "apikeys").text = f"k3yId0123456789|{API_SECRET}"
        next(v for v in root.iterfind("virtualip/vip") if v.findtext("vhid") == "1").find("password").text = NEW_CARP
        cert = etree.SubElement(root, "cert", uuid="5b2e8f3a-0000-4000-8000-000000000001")
        for tag, text in (("refid", "65a1b2c3d4e5f"), ("descr", "web GUI"), ("crt", "Y2VydA=="),
                          ("prv", PRIVATE_KEY)):
            etree.SubElement(cert, tag).text = text
        hasync = root.find("hasync/syncitems")
        hasync.text += ",certs"
    outputs = [run_cli(capsys, synced.primary, "diff", *extra) for extra in
               ([], ["-v"], ["--format", "unified"], ["--json"], ["--format", "unified", "--color", "always"])]
    assert all(code == 1 for code, _, _ in outputs)
    everything = "\n".join(out + err for _, out, err in outputs)
    assert_no_secret(everything, (NEW_HASH, NEW_CARP, API_SECRET, PRIVATE_KEY))
    summary = outputs[0][1]
    assert "password: (secret) changed" in summary  # root's hash and the CARP password
    assert "apikeys: (secret) set" in summary
    verbose = outputs[1][1]
    assert "prv: (secret) set" in verbose and "crt: (absent) -> 'Y2VydA=='" in verbose  # public part shown
    document = json.loads(outputs[3][1])
    secret_fields = [f for i in document["items"] for c in i["changes"] for f in c["fields"] if f["secret"]]
    assert secret_fields and all("old" not in f and "new" not in f for f in secret_fields)
    # the unified format marks a changed secret by a token that differs between the two sides
    unified = outputs[2][1]
    minus = [line for line in unified.splitlines() if line.startswith("-") and "<password>" in line]
    plus = [line for line in unified.splitlines() if line.startswith("+") and "<password>" in line]
    assert minus and plus and set(minus).isdisjoint({"-" + p[1:] for p in plus})


def test_secret_paths() -> None:
    assert is_secret_path("system.user[0].apikeys.item[1].key")
    assert is_secret_path("virtualip.vip.password") and is_secret_path("cert.prv")
    assert is_secret_path("OPNsense.wireguard.server.servers.server.privkey")
    assert is_secret_path("ipsec.phase1.pre-shared-key") and is_secret_path("system.user.otp_seed")
    assert not is_secret_path("filter.rule.descr") and not is_secret_path("cert.crt")
    assert not is_secret_path("system.user.name")
    assert is_secret_path("OPNsense.Kea.dhcp4.ddns.tsig-key") and is_secret_path("openvpn.server.tls_key")
    assert not is_secret_path("OPNsense.wireguard.client.clients.client.pubkey")
    assert not is_secret_path("OPNsense.IPsec.remotes.remote.public_key")


# --- output ----------------------------------------------------------------------------------------


def test_colour_only_on_a_terminal_or_when_asked(synced: Pair, capsys: Any, monkeypatch: Any) -> None:
    with edit(synced.primary) as root:
        rule(root, "Allow LAN to any").find("descr").text = "Allow LAN"
    _, plain, _ = run_cli(capsys, synced.primary, "diff")
    assert "\033[" not in plain and "'Allow LAN'" in plain
    _, coloured, _ = run_cli(capsys, synced.primary, "diff", "--color", "always")
    assert "\033[33m" in coloured

    class Tty:
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert colour_wanted("auto", Tty()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert colour_wanted("auto", Tty()) is False and colour_wanted("always", Tty()) is True


def test_json_output_validates_and_carries_the_changes(synced: Pair, capsys: Any) -> None:
    with edit(synced.primary) as root:
        rule(root, "Allow LAN to any").find("source/network").text = "opt1"
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--json")
    document = json.loads(out)
    schemas.validate("diff-result", document)
    rules_item = next(i for i in document["items"] if i["id"] == "rules")
    assert code == 1 and document["differences"] == 1 and rules_item["status"] == "differs"
    assert rules_item["changes"][0]["fields"] == [
        {"field": "source.network", "secret": False, "change": "changed", "old": "lan", "new": "opt1"}]


def test_items_option_and_errors(synced: Pair, capsys: Any) -> None:
    code, out, _ = run_cli(capsys, synced.primary, "diff", "--items", "rules,nat", "--json")
    assert code == 0 and [i["id"] for i in json.loads(out)["items"]] == ["rules", "nat"]
    code, out, err = run_cli(capsys, synced.primary, "diff", "--items", "rules,bogus")
    assert code == 2 and "unknown sync item(s) bogus" in err


def test_unreachable_backup_is_exit_2(pair: Pair, capsys: Any) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pair.point_primary_at(f"https://127.0.0.1:{port}/")
    code, out, err = run_cli(capsys, pair.primary, "diff", "--retries", "0", "--json")
    document = json.loads(out)
    assert code == 2 and document["status"] == "error" and "remote host down" in document["message"]
    schemas.validate("diff-result", document)
    assert "remote host down" in err


# --- the fallback against a stock backup -----------------------------------------------------------


def test_fallback_against_a_backup_without_extensions(pair: Pair, capsys: Any) -> None:
    with agent(pair, extensions=False):
        sync(pair)
        code, out, _ = run_cli(capsys, pair.primary, "diff")
        assert code == 0 and "FALLBACK" in out and "snapshot of what this node last pushed" in out
        with edit(pair.primary) as root:
            rule(root, "Allow LAN to any").find("source/network").text = "opt1"
        report = report_of(pair)
        assert report.source == "snapshot" and report.fallback and report.exit_code == 1
        assert [fields(c) for c in item(report, "rules").changes] == [{"source.network": ("lan", "opt1")}]
        code, out, _ = run_cli(capsys, pair.primary, "diff", "--json")
        document = json.loads(out)
        schemas.validate("diff-result", document)
        assert code == 1 and document["fallback"] is True and "NOT visible" in document["note"]
        # what the fallback cannot see, and says it cannot: an edit made on the backup itself
        with edit(pair.backup) as root:
            rules(root).remove(rules(root)[0])
        code, out, _ = run_cli(capsys, pair.primary, "diff", "--items", "nat")
        assert code == 0 and "changes made on the backup itself are NOT visible" in out
    with agent(pair):  # control: the live diff does see the backup's edit
        report = report_of(pair, ["rules"])
        assert report.source == "live"
        assert [c.kind for c in item(report, "rules").changes] == ["added"]


def test_fallback_without_a_snapshot_is_exit_2(pair: Pair, capsys: Any) -> None:
    with agent(pair, extensions=False):
        code, out, err = run_cli(capsys, pair.primary, "diff")
    assert code == 2 and out == ""
    assert "offers no hasync.* methods" in err and "no snapshot" in err


# --- the engine on its own --------------------------------------------------------------------------


def test_moves_are_the_records_outside_the_longest_kept_order() -> None:
    def rule_list(names: list[str]) -> dict[str, Any]:
        return {"filter": {"rule": [{"descr": n, "type": "pass", "interface": "lan"} for n in names]}}

    changes = diff_values(rule_list(["a", "b", "c", "d", "e"]), rule_list(["a", "d", "b", "c", "e"]))
    assert [(c.label, c.old_position, c.new_position) for c in changes] == [("'d'", 4, 2)]
    changes = diff_values(rule_list(["a", "b", "c"]), rule_list(["c", "b", "a"]))
    assert len(changes) == 2 and all(c.kind == "moved" for c in changes)


def test_similar_keyless_records_pair_up_and_dissimilar_ones_do_not() -> None:
    old = {"nat": {"rule": [{"interface": "wan", "target": "1.2.3.4", "descr": "x", "source": {"network": "lan"}}]}}
    similar = {"nat": {"rule": [{"interface": "wan", "target": "1.2.3.5", "descr": "y", "source": {"network": "lan"}}]}}
    other = {"nat": {"rule": [{"interface": "opt1", "target": "9.9.9.9", "descr": "z", "source": {"network": "any"}}]}}
    assert [c.kind for c in diff_values(old, similar)] == ["changed"]
    assert sorted(c.kind for c in diff_values(old, other)) == ["added", "removed"]
