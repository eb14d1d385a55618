"""`opnsense-ha check`: every check OK and failing, against a real backup agent over TLS.

The primary's CARP state comes from a fake FreeBSD kernel through the real FreeBSD backend; the
backup's comes from a second fake kernel behind the backup agent, fetched with
`hasync.carp_status`, exactly as the check does it between two firewalls.
"""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core import schemas
from hasync.failover.carp import CarpOps
from hasync.failover.factory import NullBackend
from hasync.failover.freebsd import FreeBsdBackend
from hasync.health import checks
from hasync.health.checks import CheckContext, CheckReport, run_checks
from hasync.wire.client import ClientOptions
from support.fakekernel import FakeKernel
from support.health import (
    agent,
    assert_no_secret,
    backend,
    backup_kernel,
    edit,
    fresh_pair,
    primary_kernel,
    run_cli,
    set_state,
    sync,
)
from support.nodes import Pair


@dataclass
class World:
    pair: Pair
    primary: FakeKernel
    backup: FakeKernel
    primary_backend: FreeBsdBackend
    backup_backend: FreeBsdBackend

    def context(self, **overrides: Any) -> CheckContext:
        values: dict[str, Any] = {
            "store": ConfigStore(self.pair.primary), "registry": SyncItemRegistry.load(),
            "failover": self.primary_backend,
            "client_options": ClientOptions(connect_timeout=3, total_timeout=10, retries=0),
        }
        values.update(overrides)
        return CheckContext(**values)

    def run(self, **overrides: Any) -> CheckReport:
        report = run_checks(self.context(**overrides))
        schemas.validate("check-result", report.as_json())
        return report

    def backup_ops(self) -> CarpOps:
        return CarpOps(ConfigStore(self.pair.backup), self.backup_backend)


def result(report: CheckReport, check_id: str) -> checks.CheckResult:
    return next(c for c in report.checks if c.id == check_id)


def statuses(report: CheckReport) -> dict[str, str]:
    return {c.id: c.status for c in report.checks}


def make_world(pair: Pair) -> World:
    kernel_a, kernel_b = primary_kernel(), backup_kernel()
    return World(pair, kernel_a, kernel_b, backend(pair.primary, kernel_a), backend(pair.backup, kernel_b))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    made = make_world(fresh_pair(tmp_path))
    with agent(made.pair, made.backup_backend):
        sync(made.pair)
        yield made


ALL_OK = dict.fromkeys(checks.CHECK_IDS, "OK")


def test_a_healthy_pair_is_all_ok(world: World) -> None:
    report = world.run()
    assert statuses(report) == ALL_OK, report.summary()
    assert report.status == "OK" and report.exit_code == 0 and report.role == "primary"
    assert "one MASTER for each of 2 vhid(s)" in result(report, "carp.master").message
    assert result(report, "peer").data["extensions"] is True


# --- peer and version ------------------------------------------------------------------------------


def test_wrong_password_is_critical_and_names_the_privilege(world: World) -> None:
    with edit(world.pair.primary) as root:
        root.find("hasync/password").text = "not-the-password"
    report = world.run()
    peer = result(report, "peer")
    assert peer.status == "CRITICAL" and "Authentication failed" in peer.message
    assert "page-xmlrpclibrary" in peer.message and "not-the-password" not in json.dumps(report.as_json())
    # nothing else is asked of a peer that refused us
    assert {statuses(report)[c] for c in ("version", "drift", "sync_loop")} == {"UNKNOWN"}
    assert report.status == "CRITICAL" and report.exit_code == 2


def test_unreachable_peer_is_critical(tmp_path: Path) -> None:
    made = make_world(fresh_pair(tmp_path))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    made.pair.point_primary_at(f"https://127.0.0.1:{port}/")
    report = made.run()
    assert result(report, "peer").status == "CRITICAL"
    assert "remote host down" in result(report, "peer").message
    assert result(report, "carp.master").status == "UNKNOWN"
    assert "backup's CARP state is unknown" in result(report, "carp.master").message


def versions(conf_dir: Path, version: str) -> None:
    document = {part: {"version": version} for part in ("base", "firmware", "kernel")}
    (conf_dir / "version.json").write_text(json.dumps(document))


def test_version_skew(world: World) -> None:
    versions(world.pair.primary, "26.7.3")
    versions(world.pair.backup, "26.7.3")
    assert result(world.run(), "version").status == "OK"
    versions(world.pair.backup, "26.7.1")
    patch = result(world.run(), "version")
    assert patch.status == "WARNING" and "26.7.1" in patch.message
    versions(world.pair.backup, "26.1.9")
    major = result(world.run(), "version")
    assert major.status == "CRITICAL" and "sync refuses" in major.message


# --- drift -------------------------------------------------------------------------------------------


def test_drift_on_the_backup_names_the_item(world: World) -> None:
    with edit(world.pair.backup) as root:
        alias = root.find("OPNsense/Firewall/Alias/aliases/alias[@uuid='0d6a3b3c-1111-4c5e-8d2f-000000000002']")
        alias.find("content").text = "0.0.0.0/0"
    drift = result(world.run(), "drift")
    assert drift.status == "WARNING" and drift.data["drifted"] == ["aliases"]
    assert "changed on the backup since the last sync" in drift.message and "aliases" in drift.message


def test_unsynced_change_on_the_primary(world: World) -> None:
    with edit(world.pair.primary) as root:
        root.find("filter/rule/descr").text = "renamed on fw-a"
    drift = result(world.run(), "drift")
    assert drift.status == "WARNING" and drift.data["pending"] == ["rules"] and drift.data["drifted"] == []
    assert "changed on this node" in drift.message
    sync(world.pair)
    assert result(world.run(), "drift").status == "OK"


def test_backup_nosync_records_are_not_drift(world: World) -> None:
    with edit(world.pair.backup) as root:
        alias = root.find("OPNsense/Firewall/Alias/aliases/alias[@uuid='0d6a3b3c-2222-4c5e-8d2f-000000000009']")
        alias.find("content").text = "10.77.1.201"  # the backup's own nosync alias
    assert result(world.run(), "drift").status == "OK"


def test_drift_fallback_against_a_stock_backup(tmp_path: Path) -> None:
    made = make_world(fresh_pair(tmp_path))
    with agent(made.pair, made.backup_backend, extensions=False):
        sync(made.pair)
        report = made.run()
        drift = result(report, "drift")
        assert drift.status == "OK" and drift.data["fallback"] is True and "FALLBACK" in drift.message
        assert report.fallback is True
        for check_id in ("carp.master", "carp.demotion", "carp.maintenance", "carp.preempt", "statesync"):
            assert result(report, check_id).status == "UNKNOWN"
            assert "no hasync.carp_status" in result(report, check_id).message
        assert result(report, "sync_loop").status == "UNKNOWN"
        with edit(made.pair.primary) as root:
            root.find("filter/rule/descr").text = "renamed on fw-a"
        pending = result(made.run(), "drift")
        assert pending.status == "WARNING" and "rules" in pending.message and "FALLBACK" in pending.message


# --- CARP across the pair -----------------------------------------------------------------------


def test_split_brain_is_critical(world: World) -> None:
    set_state(world.backup, 1, "MASTER")
    report = world.run()
    master = result(report, "carp.master")
    assert master.status == "CRITICAL" and report.exit_code == 2
    assert "split brain: vhid 1 (lan) is MASTER on fw-a and fw-b" in master.message
    assert [row["masters"] for row in master.data["vhids"]] == [2, 1]
    set_state(world.backup, 1, "BACKUP")
    assert result(world.run(), "carp.master").status == "OK"


def test_no_master_is_critical(world: World) -> None:
    set_state(world.primary, 2, "BACKUP")
    master = result(world.run(), "carp.master")
    assert master.status == "CRITICAL"
    assert master.message == "no MASTER for vhid 2 (wan): fw-a BACKUP, fw-b BACKUP"


def test_foreign_demotion_is_a_warning_with_its_cause(world: World) -> None:
    world.backup.set_link("eth1", False)  # the kernel adds 240 for a vhid on a down link
    report = world.run()
    demotion = result(report, "carp.demotion")
    assert demotion.status == "WARNING"
    assert "fw-b: demotion 240 not added by opnsense-ha" in demotion.message
    assert "interface down: 1@eth1" in demotion.message
    assert result(report, "carp.maintenance").status == "OK"
    world.backup.set_link("eth1", True)
    assert result(world.run(), "carp.demotion").status == "OK"


def test_maintenance_mode_is_a_warning_and_not_a_foreign_demotion(world: World) -> None:
    world.backup_ops().maintenance_enter()
    report = world.run()
    assert result(report, "carp.maintenance").status == "WARNING"
    assert "maintenance mode is on on fw-b" in result(report, "carp.maintenance").message
    assert result(report, "carp.demotion").status == "OK"  # the +240 is ours
    world.backup_ops().maintenance_leave()
    assert result(world.run(), "carp.maintenance").status == "OK"


def test_preempt_that_differs_is_a_warning(world: World) -> None:
    world.backup.preempt = 0
    preempt = result(world.run(), "carp.preempt")
    assert preempt.status == "WARNING"
    assert "preempt differs between the nodes: fw-a on, fw-b off" in preempt.message
    assert "fw-b: preempt is off but configured on" in preempt.message


def test_state_sync_broken_is_critical(world: World) -> None:
    world.backup.run(["ifconfig", "pfsync0", "syncdev", "eth2"])  # starts a bulk update: syncok 0
    report = world.run()
    assert result(report, "statesync").status == "CRITICAL"
    assert "fw-b: state sync is not in sync" in result(report, "statesync").message
    world.backup.complete_bulk()
    assert result(world.run(), "statesync").status == "OK"
    world.primary.run(["ifconfig", "pfsync0", "-syncdev", "-syncpeer", "down"])
    down = result(world.run(), "statesync")
    assert down.status == "CRITICAL" and "fw-a: state sync is configured but not running" in down.message


def test_state_sync_on_a_node_without_failover_backend_is_unknown(world: World) -> None:
    statesync = result(world.run(failover=NullBackend()), "statesync")
    assert statesync.status == "UNKNOWN" and "fw-a: state sync is configured but this node has no failover" in (
        statesync.message)


def test_backup_with_a_sync_target_is_a_sync_loop_risk(world: World) -> None:
    with edit(world.pair.backup) as root:
        root.find("hasync/synchronizetoip").text = "10.77.3.1"
    loop = result(world.run(), "sync_loop")
    assert loop.status == "WARNING" and "sync-loop risk" in loop.message


# --- the agent's certificate -----------------------------------------------------------------------


def reissue(pair: Pair, not_before: dt.datetime, not_after: dt.datetime) -> None:
    cert = pair.ca.issue_cert("127.0.0.1", not_before=not_before, not_after=not_after)
    cert.private_key_pem.write_to_path(str(pair.key_file))
    cert.cert_chain_pems[0].write_to_path(str(pair.cert_file))


@pytest.mark.parametrize(("days_left", "expected"), [(400, "OK"), (10, "WARNING"), (-2, "CRITICAL")])
def test_certificate_expiry(tmp_path: Path, days_left: int, expected: str) -> None:
    made = make_world(fresh_pair(tmp_path))
    now = dt.datetime.now(dt.UTC)
    reissue(made.pair, now - dt.timedelta(days=30), now + dt.timedelta(days=days_left))
    with agent(made.pair, made.backup_backend):
        tls = result(made.run(), "tls_expiry")
    assert tls.status == expected, tls.message
    assert abs(tls.data["days_left"] - days_left) < 1


# --- a node without a sync target -----------------------------------------------------------------


def test_on_the_backup_the_pair_checks_are_local(world: World) -> None:
    context = world.context(store=ConfigStore(world.pair.backup), failover=world.backup_backend)
    report = run_checks(context)
    schemas.validate("check-result", report.as_json())
    assert report.role == "backup" and report.status == "OK", report.summary()
    assert "pair checks run on the primary" in result(report, "peer").message
    assert result(report, "carp.master").data["local_only"] is True
    world.backup_ops().maintenance_enter()
    assert result(run_checks(context), "carp.maintenance").status == "WARNING"


# --- the command line: exit codes, JSON, monit, syslog ------------------------------------------------


@pytest.fixture
def cli_world(world: World, monkeypatch: Any) -> World:
    monkeypatch.setattr("hasync.cli.commands.check.failover_backend", lambda _conf_dir: world.primary_backend)
    return world


def syslog_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    return sock


def drain(sock: socket.socket) -> list[str]:
    lines = []
    while True:
        try:
            lines.append(sock.recv(65536).decode())
        except BlockingIOError:
            return lines


def test_cli_exit_codes_json_and_monit(cli_world: World, capsys: Any, tmp_path: Path) -> None:
    primary = cli_world.pair.primary
    code, out, _ = run_cli(capsys, primary, "check", "--no-syslog")
    assert code == 0 and out.startswith(f"OPNSENSE-HA OK - all {len(checks.CHECK_IDS)} checks OK |")
    set_state(cli_world.backup, 1, "MASTER")
    code, out, _ = run_cli(capsys, primary, "check", "--json", "--no-syslog")
    document = json.loads(out)
    schemas.validate("check-result", document)
    assert code == 2 and document["status"] == "CRITICAL" and document["exit_code"] == 2
    assert {c["id"]: c["status"] for c in document["checks"]}["carp.master"] == "CRITICAL"
    cli_world.backup_ops().maintenance_enter()
    code, out, _ = run_cli(capsys, primary, "check", "--monit", "--no-syslog")
    assert code == 2 and out.count("\n") == 1 and len(out.encode()) <= 513
    assert out.startswith("CRITICAL carp.master: split brain") and "WARNING carp.maintenance" in out
    code, out, _ = run_cli(capsys, primary, "check", "--only", "carp.maintenance", "--no-syslog")
    assert code == 1 and out.startswith("OPNSENSE-HA WARNING") and out.count("\n") == 2


def test_cli_unknown_when_the_check_cannot_run(tmp_path: Path, capsys: Any) -> None:
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.xml").write_text("<opnsense><broken></opnsense>")
    code, out, _ = run_cli(capsys, conf, "check", "--json", "--no-syslog")
    document = json.loads(out)
    schemas.validate("check-result", document)
    assert code == 3 and document["status"] == "UNKNOWN" and "config.xml" in document["summary"]
    code, out, _ = run_cli(capsys, conf, "check", "--only", "nonsense", "--no-syslog")
    assert code == 3 and "unknown check(s) nonsense" in out


def test_one_syslog_line_per_non_ok_check(cli_world: World, capsys: Any, tmp_path: Path) -> None:
    log = syslog_socket(tmp_path / "log")
    try:
        code, _, _ = run_cli(capsys, cli_world.pair.primary, "check", "--syslog-socket", str(tmp_path / "log"))
        assert code == 0 and drain(log) == []  # control: nothing is logged when all is well
        set_state(cli_world.backup, 1, "MASTER")
        cli_world.backup_ops().maintenance_enter()
        code, out, _ = run_cli(capsys, cli_world.pair.primary, "check", "--json", "--syslog-socket",
                               str(tmp_path / "log"))
        lines = drain(log)
    finally:
        log.close()
    problems = [c for c in json.loads(out)["checks"] if c["status"] != "OK"]
    assert code == 2 and len(lines) == len(problems) == 2
    assert lines[0].startswith("<10>opnsense-ha[") and "check CRITICAL carp.master: split brain" in lines[0]
    assert lines[1].startswith("<12>opnsense-ha[") and "check WARNING carp.maintenance" in lines[1]


def test_no_secret_in_any_check_output(cli_world: World, capsys: Any, tmp_path: Path) -> None:
    set_state(cli_world.backup, 2, "MASTER")
    cli_world.backup.set_link("eth1", False)
    with edit(cli_world.pair.backup) as root:
        root.find("hasync/synchronizetoip").text = "https://admin:hunter2-sync@10.77.3.1/"
        root.find("hasync/password").text = "backup-side-password-51"
    log = syslog_socket(tmp_path / "log")
    try:
        outputs = [run_cli(capsys, cli_world.pair.primary, "check", *extra, "--syslog-socket", str(tmp_path / "log"))
                   for extra in ([], ["--json"], ["--monit"])]
        lines = drain(log)
    finally:
        log.close()
    assert all(code == 2 for code, _, _ in outputs) and lines
    everything = "\n".join([*(out + err for _, out, err in outputs), *lines])
    assert_no_secret(everything, ("hunter2-sync", "backup-side-password-51"))
    assert "split brain" in everything  # control: the output is about the broken pair
