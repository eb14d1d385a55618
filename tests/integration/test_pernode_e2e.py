"""Per-node values through a real sync: a real agent process over TLS, then diff, check and rollback.

Done-when of issue 14: after a sync the backup keeps its own Kea `this_server_name` while the rest
of Kea follows the primary; a unicast CARP VIP's `peer` on the backup is the primary's address
facing it; `diff` right after reports no difference and a second sync writes nothing. The
controls run the same sync with the declarations removed and show each failure they prevent.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hasync.config.items import DEFAULT_ITEMS_DIR, SyncItemRegistry
from hasync.config.pernode import Declarations
from hasync.config.store import ConfigStore
from hasync.health.checks import CheckContext, CheckResult, run_checks
from hasync.health.diff import diff_with_backup
from hasync.health.diff_render import render_json, render_summary
from hasync.node import rollback as rollbackmod
from hasync.payload.build import payload_for_items, shipped_declarations
from hasync.sync.run import SyncOptions, SyncResult, SyncRun
from hasync.wire.client import ClientOptions
from support.nodes import Pair, make_pair, running_agent
from support.paths import SHARED
from support.pernode import PERNODE, SYNC_ITEMS, overlay, text
from support.reliability import AgentProcess, history_files

KEA4 = "OPNsense/Kea/dhcp4"
UNICAST_VIP = "virtualip/vip[vhid='5']"


@dataclass
class World:
    pair: Pair
    registry: SyncItemRegistry
    items_dir: Path | None = None

    def sync(self, **options: Any) -> SyncResult:
        return SyncRun(ConfigStore(self.pair.primary), self.registry, SyncOptions(**options)).run()


def prepare(tmp_path: Path, admin_drop_in: bool = False) -> World:
    tmp_path.mkdir(parents=True, exist_ok=True)
    pair = make_pair(tmp_path)
    overlay(pair.primary, "primary", SYNC_ITEMS)
    overlay(pair.backup, "backup")
    items_dir = None
    if admin_drop_in:
        items_dir = tmp_path / "items.d"
        shutil.copytree(DEFAULT_ITEMS_DIR, items_dir)
        shutil.copy(PERNODE / "keep-firmware-job.json", items_dir)
    return World(pair, SyncItemRegistry.load(items_dir), items_dir)


class ItemsDirAgent(AgentProcess):
    """The agent process with a global ``--items-dir`` (the admin's drop-ins)."""

    items_dir: Path | None = None

    def argv(self) -> list[str]:
        argv = super().argv()
        if self.items_dir is not None:
            at = argv.index("serve")
            argv[at:at] = ["--items-dir", str(self.items_dir)]
        return argv


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[tuple[World, AgentProcess]]:
    world = prepare(tmp_path)
    agent = start_agent(world, tmp_path)
    try:
        yield world, agent
    finally:
        agent.stop()


def start_agent(world: World, tmp_path: Path, *extra: str) -> AgentProcess:
    agent = ItemsDirAgent(world.pair.backup, world.pair.state_dir, world.pair.services_dir, tmp_path / "agent.log",
                          tls=(world.pair.cert_file, world.pair.key_file), extra=list(extra))
    agent.items_dir = world.items_dir
    agent.start()
    world.pair.point_primary_at(agent.url)
    return agent


def drift_check(context: CheckContext) -> CheckResult:
    return next(check for check in run_checks(context, only=["drift"]).checks if check.id == "drift")


def assert_backup_after_sync(pair: Pair) -> None:
    backup = pair.backup
    assert text(backup, f"{KEA4}/ha/this_server_name") == ["fw-b"]  # its own name survives
    assert text(backup, "OPNsense/Kea/dhcp6/ha/this_server_name") == ["fw-b"]
    assert text(backup, f"{KEA4}/ha/enabled") == ["1"]  # the rest of Kea follows the primary
    assert text(backup, f"{KEA4}/ha/max_unacked_clients") == ["2"]
    assert text(backup, f"{KEA4}/general/valid_lifetime") == ["7200"]
    assert text(backup, f"{KEA4}/subnets/subnet4/subnet") == ["10.77.1.0/24"]
    assert text(backup, f"{KEA4}/ha_peers/peer/name") == ["fw-a", "fw-b"]
    assert text(backup, f"{UNICAST_VIP}/peer") == ["10.77.1.2"]  # the primary's LAN address, facing fw-b
    assert text(backup, f"{UNICAST_VIP}/peer6") == ["fd00:77:1::2"]
    assert text(backup, f"{UNICAST_VIP}/advskew") == ["100"]


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "compatible"])
def test_real_sync_keeps_per_node_values_and_settles(agent_process: tuple[World, AgentProcess],
                                                     fast_path: bool) -> None:
    world, _agent = agent_process
    first = world.sync(fast_path=fast_path)
    assert first.status == "ok", first.message
    assert first.transfer == ("fast path" if fast_path else "XML-RPC")
    assert not [w for w in first.warnings if "stock OPNsense" in w]
    assert_backup_after_sync(world.pair)

    report = diff_with_backup(ConfigStore(world.pair.primary), world.registry, ClientOptions())
    assert report.source == "live" and report.exit_code == 0, render_summary(report)
    kea = next(item for item in report.items if item.id == "kea")
    assert [(n.path, n.kind) for n in kea.declared] == [
        ("OPNsense.Kea.dhcp4.ha.this_server_name", "kept on the backup"),
        ("OPNsense.Kea.dhcp6.ha.this_server_name", "kept on the backup")]
    vips = next(item for item in report.items if item.id == "virtualip")
    assert {(n.kind, n.old, n.new) for n in vips.declared} == {
        ("rewritten", "10.77.1.3", "10.77.1.2"), ("rewritten", "fd00:77:1::3", "fd00:77:1::2")}
    summary = render_summary(report)
    assert "OPNsense.Kea.dhcp4.ha.this_server_name: kept on the backup" in summary
    assert "rewritten for the backup: '10.77.1.3' -> '10.77.1.2'" in summary
    document = json.loads(render_json(report))  # schema-checked
    assert document["differences"] == 0

    config = (world.pair.backup / "config.xml").read_bytes()
    history = history_files(world.pair.backup)
    for recorded in (world.pair.primary / "ha-state").glob("last-sync*"):
        recorded.unlink()  # digests alone must match: no "neither side changed since" shortcut
    second = world.sync(fast_path=fast_path)
    assert second.status == "ok", second.message
    assert second.transfer == "none" and sorted(second.items_unchanged) == sorted(SYNC_ITEMS.split(","))
    assert (world.pair.backup / "config.xml").read_bytes() == config  # nothing written
    assert history_files(world.pair.backup) == history

    drift = drift_check(CheckContext(ConfigStore(world.pair.primary), world.registry))
    assert drift.status == "OK", drift.message


def test_control_without_declarations_the_backup_loses_its_values(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same sync, same real TLS agent (in this process, so the patch reaches it): without the
    declarations the backup takes the primary's Kea name and points its CARP peer at itself."""
    world = prepare(tmp_path)
    monkeypatch.setattr(SyncItemRegistry, "declarations", lambda self: Declarations())
    shipped_declarations.cache_clear()
    try:
        with running_agent(world.pair) as server:
            world.pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
            assert world.sync().status == "ok"
    finally:
        shipped_declarations.cache_clear()  # it cached the patched (empty) declarations
    assert text(world.pair.backup, f"{KEA4}/ha/this_server_name") == ["fw-a"]  # #9801, #7354
    assert text(world.pair.backup, f"{UNICAST_VIP}/peer") == ["10.77.1.3"]  # its own address: #8120


def test_drift_ignores_the_backups_local_value_but_not_the_rest(agent_process: tuple[World, AgentProcess]) -> None:
    world, _agent = agent_process
    assert world.sync().status == "ok"
    with ConfigStore(world.pair.backup).transaction("test: admin renames the Kea HA node") as root:
        root.find(f"{KEA4}/ha/this_server_name").text = "fw-b-renamed"
    context = CheckContext(ConfigStore(world.pair.primary), world.registry)
    drift = drift_check(context)
    assert drift.status == "OK", drift.message
    report = diff_with_backup(ConfigStore(world.pair.primary), world.registry, ClientOptions())
    assert report.exit_code == 0
    with ConfigStore(world.pair.backup).transaction("test: admin edits Kea on the backup") as root:
        root.find(f"{KEA4}/ha/max_unacked_clients").text = "7"
    drift = drift_check(context)
    assert drift.status == "WARNING" and "kea" in drift.data["drifted"]  # control: real drift is seen


def test_rollback_restores_the_pre_sync_config_with_its_own_values(agent_process: tuple[World, AgentProcess]) -> None:
    world, _agent = agent_process
    before = (world.pair.backup / "config.xml").read_bytes()
    assert world.sync().status == "ok"
    assert text(world.pair.backup, f"{KEA4}/ha/enabled") == ["1"]
    result = rollbackmod.rollback(ConfigStore(world.pair.backup), world.registry, state_dir=world.pair.state_dir,
                                  reconfigure_services=False)
    assert result.status == "ok", result.message
    assert (world.pair.backup / "config.xml").read_bytes() == before
    assert text(world.pair.backup, f"{KEA4}/ha/this_server_name") == ["fw-b"]
    assert text(world.pair.backup, f"{KEA4}/ha/enabled") == ["0"]  # the primary's Kea is undone


def test_admin_drop_in_keeps_one_cron_job_per_node(tmp_path: Path) -> None:
    world = prepare(tmp_path, admin_drop_in=True)
    agent = start_agent(world, tmp_path)
    try:
        assert world.sync().status == "ok"
        jobs = dict(zip(text(world.pair.backup, "OPNsense/cron/jobs/job/description"),
                        text(world.pair.backup, "OPNsense/cron/jobs/job/hours"), strict=True))
        assert jobs == {"Firmware update (each node at its own hour)": "4", "Remote backup": "*"}
        config = (world.pair.backup / "config.xml").read_bytes()
        assert world.sync().transfer == "none"
        assert (world.pair.backup / "config.xml").read_bytes() == config
    finally:
        agent.stop()
    # control: without the drop-in the primary's 03:00 job replaces the backup's 04:00 one
    control = prepare(tmp_path / "control")
    agent = start_agent(control, tmp_path / "control")
    try:
        assert control.sync().status == "ok"
        assert text(control.pair.backup, "OPNsense/cron/jobs/job/hours") == ["3", "*"]
    finally:
        agent.stop()


# --- a stock OPNsense backup -------------------------------------------------------------------------


def test_stock_backup_is_told_once_which_local_fields_it_overwrites(tmp_path: Path) -> None:
    world = prepare(tmp_path)
    agent = start_agent(world, tmp_path, "--no-extensions")
    try:
        result = world.sync()
        assert result.status == "ok", result.message
        notes = [w for w in result.warnings if "stock OPNsense" in w]
        assert len(notes) == 1
        assert notes[0].endswith("OPNsense.Kea.dhcp4.ha.this_server_name, OPNsense.Kea.dhcp6.ha.this_server_name")
        assert text(world.pair.backup, f"{UNICAST_VIP}/peer") == ["10.77.1.2"]  # self_address still works
        report = diff_with_backup(ConfigStore(world.pair.primary), world.registry, ClientOptions())
        assert report.source == "snapshot" and report.exit_code == 0
        assert report.note.endswith("a sync overwrites them: OPNsense.Kea.dhcp4.ha.this_server_name, "
                                    "OPNsense.Kea.dhcp6.ha.this_server_name")
        assert not [n for item in report.items for n in item.declared if n.kind == "kept on the backup"]
    finally:
        agent.stop()
    control = prepare(tmp_path / "control")
    control.registry = SyncItemRegistry(
        item if item.id != "kea" else item._replace(declarations=Declarations())
        for item in control.registry)
    agent = start_agent(control, tmp_path / "control", "--no-extensions")
    try:
        assert not [w for w in control.sync().warnings if "stock OPNsense" in w]
    finally:
        agent.stop()


def test_stock_php_merge_takes_rewritten_fields_but_cannot_keep_local(tmp_path: Path) -> None:
    """OPNsense's own merge (the PHP oracle) on the payload we send: self_address arrives
    rewritten; the declared-local Kea name is overwritten, which is why the sync warns."""
    oracle = SHARED / "anchors" / "php-oracle"
    if not oracle.exists() or shutil.which("php") is None:
        pytest.skip("../shared/anchors or php is absent")
    world = prepare(tmp_path)
    primary = ConfigStore(world.pair.primary).load()
    payload = payload_for_items(primary, world.registry, ["virtualip", "kea"])
    payload_file = tmp_path / "payload.json"
    payload_file.write_text(json.dumps(payload))
    done = subprocess.run([str(oracle), "merge", str(world.pair.backup / "config.xml"), str(payload_file)],
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    merged = json.loads(done.stdout)  # the backup's config after OPNsense's merge_config_attributes, as toArray
    vip = next(v for v in merged["virtualip"]["vip"] if v.get("vhid") == "5")
    assert (vip["peer"], vip["peer6"]) == ("10.77.1.2", "fd00:77:1::2")
    assert merged["OPNsense"]["Kea"]["dhcp4"]["ha"]["this_server_name"] == "fw-a"
