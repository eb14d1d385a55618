"""CARP operations against the fake kernel: maintenance mode ordering and ownership, boot,
disable/enable, preempt, status JSON, pfsync apply, transition hooks and the CLI."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import threading
from pathlib import Path

import pytest

from hasync.cli.commands import boot as boot_command
from hasync.cli.commands import carp as carp_command
from hasync.cli.commands import pfsync as pfsync_command
from hasync.config.store import ConfigStore
from hasync.core.errors import FailoverError, HaError
from hasync.core.xmlsafe import parse_bytes
from hasync.failover import hooks
from hasync.failover.carp import STATE_FILE, CarpOps
from hasync.failover.model import maintenance_mode, preempt_wanted
from support.carp import CARP_PASSWORD, build_kernel, build_ops, sync_pfsync, write_config
from support.fakekernel import FakeKernel


def flag_on_disk(conf_dir: Path) -> bool:
    return maintenance_mode(parse_bytes((conf_dir / "config.xml").read_bytes()))


@pytest.fixture
def node(tmp_path: Path) -> tuple[Path, FakeKernel, CarpOps]:
    conf = tmp_path / "conf"
    write_config(conf)
    kernel = build_kernel()
    sync_pfsync(kernel)
    return conf, kernel, build_ops(conf, kernel)


# --- maintenance mode -----------------------------------------------------------------------


def test_enter_persists_flag_before_the_demotion_write(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    seen: list[tuple[str, int, bool]] = []
    kernel.on_sysctl_write = lambda name, value: seen.append((name, value, flag_on_disk(conf)))
    # control: the observer does see "flag absent" for a demotion written before any persist
    kernel.run(["sysctl", "net.inet.carp.demotion=0"])
    assert seen == [("net.inet.carp.demotion", 0, False)]
    seen.clear()
    assert ops.maintenance_enter() == {"status": "ok", "action": "enter_maintenance"}
    assert seen == [("net.inet.carp.demotion", 240, True)]
    assert kernel.demotion == 240
    assert kernel.advertised_skew("vtnet0", 1) == 240  # the primary now advertises the maximum
    assert ConfigStore(conf).history()[0].description == "Enter CARP maintenance mode"


def test_enter_makes_the_peer_master(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    peer = {1: 100, 3: 0}  # the backup's skews after the advskew transform
    kernel.elect(peer)
    assert kernel.interfaces["vtnet0"].carp[1].state == "MASTER"
    ops.maintenance_enter()
    kernel.elect(peer)
    assert kernel.interfaces["vtnet0"].carp[1].state == "BACKUP"


def test_double_enter_adds_once(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    ops.maintenance_enter()
    history = len(ConfigStore(conf).history())
    ops.maintenance_enter()
    assert kernel.demotion == 240
    assert [c for c in kernel.writes() if c[0] == "sysctl"] == [("sysctl", "net.inet.carp.demotion=240")]
    assert len(ConfigStore(conf).history()) == history  # nothing to write the second time


def test_leave_keeps_external_demotion_regression_10901(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    kernel.run(["sysctl", "net.inet.carp.demotion=100"])  # someone else's demotion
    ops.maintenance_enter()
    assert kernel.demotion == 340
    reply = ops.maintenance_leave()
    assert reply == {"status": "ok", "action": "leave_maintenance"}
    assert kernel.demotion == 100
    assert not flag_on_disk(conf)
    # control: OPNsense's leave (reset to the tunable default) would have wiped those 100
    kernel.demotion = 340
    kernel.run(["sysctl", f"net.inet.carp.demotion={0 - kernel.demotion}"])
    assert kernel.demotion == 0


def test_leave_keeps_demotion_that_arrived_during_maintenance(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    ops.maintenance_enter()
    kernel.set_link("vtnet1", up=False)  # kernel adds 240 for vhid 3 on the dead link
    ops.maintenance_leave()
    assert kernel.demotion == 240
    kernel.set_link("vtnet1", up=True)
    assert kernel.demotion == 0


def test_concurrent_enters_add_once(tmp_path: Path) -> None:
    def race(state_dirs: tuple[Path, Path]) -> int:
        conf = tmp_path / f"conf-{state_dirs[0].name}"
        write_config(conf)
        kernel = build_kernel()
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def worker(state_dir: Path) -> None:
            try:
                ops = build_ops(conf, kernel, state_dir=state_dir)
                barrier.wait()
                ops.maintenance_enter()
            except BaseException as exc:  # pragma: no cover - surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(d,)) for d in state_dirs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        return kernel.demotion

    shared_state = tmp_path / "shared"
    assert race((shared_state, shared_state)) == 240
    # control: two tools that do not share our lock and state double the demotion
    assert race((tmp_path / "a", tmp_path / "b")) == 480


def test_enter_failure_keeps_flag_and_retry_adds_once(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    denied = "sysctl: net.inet.carp.demotion: Operation not permitted"
    kernel.fail_next[("sysctl", "net.inet.carp.demotion=240")] = denied
    with pytest.raises(FailoverError, match="Operation not permitted"):
        ops.maintenance_enter()
    assert flag_on_disk(conf) and kernel.demotion == 0
    assert ops.own_demotion()[0] == 0
    ops.maintenance_enter()
    assert kernel.demotion == 240


def test_leave_without_our_share_removes_only_the_flag(tmp_path: Path) -> None:
    """Maintenance entered by OPNsense's GUI: its +240 is not ours to take."""
    conf = tmp_path / "conf"
    write_config(conf, extra_root="<virtualip_carp_maintenancemode>1</virtualip_carp_maintenancemode>")
    kernel = build_kernel()
    kernel.run(["sysctl", "net.inet.carp.demotion=240"])
    ops = build_ops(conf, kernel)
    causes = ops.status()["hasync"]["external_demotion_causes"]
    assert any("outside opnsense-ha" in c for c in causes)
    reply = ops.maintenance_leave()
    assert kernel.demotion == 240 and not flag_on_disk(conf)
    assert "not ours" in reply["messages"][0]


def test_leave_never_drives_the_counter_negative(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    ops.maintenance_enter()
    kernel.run(["sysctl", "net.inet.carp.demotion=-200"])  # something else already took most of it
    reply = ops.maintenance_leave()
    assert kernel.demotion == 0
    assert "removed only 40" in reply["messages"][0]


# --- boot ---------------------------------------------------------------------------------


def test_boot_reapplies_maintenance_once_and_leave_stays_exact(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    kernel.run(["sysctl", "net.inet.carp.demotion=100"])
    ops.maintenance_enter()
    kernel.reboot()
    assert kernel.demotion == 0
    reply = ops.boot()
    assert (reply["maintenancemode"], reply["demotion_added"]) == (True, 240)
    assert kernel.demotion == 240
    assert ops.boot()["demotion_added"] == 0  # idempotent within a boot
    assert kernel.demotion == 240
    kernel.run(["sysctl", "net.inet.carp.demotion=30"])  # a post-boot demotion by someone else
    ops.maintenance_leave()
    assert kernel.demotion == 30


def test_leave_after_reboot_without_boot_hook_takes_nothing(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    ops.maintenance_enter()
    kernel.reboot()
    kernel.set_link("vtnet1", up=False)  # +240 by the kernel in the new boot
    ops.maintenance_leave()
    assert kernel.demotion == 240  # our pre-reboot 240 is gone with the old kernel; theirs stays


def test_boot_without_maintenance_and_preempt(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    write_config(conf)
    kernel = build_kernel()
    reply = build_ops(conf, kernel).boot()
    assert (reply["maintenancemode"], reply["demotion_added"], reply["preempt"]) == (False, 0, True)
    assert kernel.demotion == 0 and kernel.preempt == 1

    conf2 = tmp_path / "conf2"
    write_config(conf2, extra_hasync="<disablepreempt>1</disablepreempt>")
    kernel2 = build_kernel()
    kernel2.preempt = 1
    assert build_ops(conf2, kernel2).boot()["preempt"] is False
    assert kernel2.preempt == 0


def test_boot_finishes_an_interrupted_leave(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    ops.maintenance_enter()
    # leave died after persisting the cleared flag, before touching the kernel
    with ConfigStore(conf).transaction("Leave CARP maintenance mode") as root:
        root.remove(root.find("virtualip_carp_maintenancemode"))
    assert kernel.demotion == 240
    assert ops.boot()["demotion_added"] == -240
    assert kernel.demotion == 0


# --- disable / enable / preempt / set_status --------------------------------------------------


def test_disable_and_enable(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    assert ops.disable() == {"status": "ok", "action": "disable"}
    status = ops.status()
    assert status["carp"]["allow"] == "0"
    assert {row["status"] for row in status["rows"]} == {"DISABLED"}
    assert all(a.vhid is None for i in kernel.interfaces.values() for a in i.addrs)
    reply = ops.enable()
    assert (reply["status"], reply["action"]) == ("ok", "enable")
    assert reply["messages"] == ["VIP 198.51.100.1 (vhid 9): interface 'opt9' is not assigned"]
    assert kernel.allow == 1
    addresses = {(a.address, a.vhid) for a in kernel.interfaces["vtnet1"].addrs}
    assert {("10.77.1.1", 3), ("10.77.1.10", 3)} <= addresses
    assert kernel.interfaces["vtnet1"].carp[3].advskew == 100  # from the CARP record, not the alias
    assert kernel.demotion == 0  # pfsync was already as configured: not re-applied
    assert not any(c[:3] == ("ifconfig", "pfsync0", "syncdev") for c in kernel.writes())


def test_preempt_persisted_and_applied(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    assert ops.set_preempt(False) == {"status": "ok", "action": "preempt_off"}
    assert kernel.preempt == 0 and not preempt_wanted(ConfigStore(conf).load())
    kernel.reboot()
    kernel.preempt = 1
    ops.boot()
    assert kernel.preempt == 0
    ops.set_preempt(True)
    assert kernel.preempt == 1 and preempt_wanted(ConfigStore(conf).load())


def test_preempt_off_keeps_recovered_node_backup(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    ops.set_preempt(False)
    kernel.interfaces["vtnet0"].carp[1].state = "BACKUP"  # after a failover
    kernel.elect({1: 100})
    assert kernel.interfaces["vtnet0"].carp[1].state == "BACKUP"
    ops.set_preempt(True)  # control: with preempt the better node takes over
    kernel.elect({1: 100})
    assert kernel.interfaces["vtnet0"].carp[1].state == "MASTER"


def test_set_status_like_opnsense(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    conf, kernel, ops = node
    assert ops.set_status("maintenance")["action"] == "enter_maintenance"
    assert ops.set_status("maintenance")["action"] == "leave_maintenance"
    assert kernel.demotion == 0 and not flag_on_disk(conf)
    assert ops.set_status("reboot") == {"status": "failed"}


# --- status -------------------------------------------------------------------------------


def test_status_shapes_and_no_secret(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, _, ops = node
    status = ops.status()
    text = json.dumps(status)
    assert CARP_PASSWORD not in text
    rows = {(r["vhid"], r["subnet"]): r for r in status["rows"]}
    assert rows[("1", "203.0.113.1")] == {
        "interface": "wan", "vhid": "1", "advbase": "1", "advskew": "0", "subnet": "203.0.113.1",
        "status": "MASTER", "mode": "carp", "status_txt": "MASTER", "vhid_txt": "1 (freq. 1/0)",
    }
    assert rows[("3", "10.77.1.1")]["interface"] == "LAN"
    assert rows[("3", "10.77.1.10")]["mode"] == "ipalias" and rows[("3", "10.77.1.10")]["vhid_txt"] == "3"
    assert rows[("9", "198.51.100.1")]["status"] == "DISABLED"
    assert rows[("9", "198.51.100.1")]["interface"] == "OPT9"
    assert status["carp"] == {"demotion": "0", "allow": "1", "maintenancemode": False, "status_msg": ""}
    assert (status["total"], status["rowCount"], status["current"]) == (len(rows), len(rows), 1)


def test_status_explains_demotion_that_is_not_ours(node: tuple[Path, FakeKernel, CarpOps]) -> None:
    _, kernel, ops = node
    ops.maintenance_enter()
    kernel.set_link("vtnet1", up=False)
    kernel.run(["sysctl", f"net.inet.carp.demotion={1 << 20}"])
    status = ops.status()
    facts = status["hasync"]
    assert status["carp"]["maintenancemode"] is True and status["carp"]["status_msg"] == ""
    assert facts["maintenance_demotion"] == 240
    assert facts["external_demotion"] == 240 + (1 << 20)
    causes = " | ".join(facts["external_demotion_causes"])
    assert "service checks" in causes and "3@vtnet1" in causes and "unknown" not in causes
    ops.maintenance_leave()
    assert "demoted to BACKUP" in ops.status()["carp"]["status_msg"]


# --- pfsync -------------------------------------------------------------------------------


def test_pfsync_apply_unchanged_no_command_no_demotion_regression_10858(
    node: tuple[Path, FakeKernel, CarpOps],
) -> None:
    conf, kernel, ops = node
    reply = ops.pfsync_apply()
    assert reply["changed"] is False
    assert kernel.writes() == [] and kernel.demotion == 0
    assert ops.pfsync_status()["differences"] == []
    # control: a changed peer does reconfigure, and the kernel demotes for the bulk update
    with ConfigStore(conf).transaction("new peer") as root:
        root.find("hasync/pfsyncpeerip").text = "10.0.0.3"
    assert ops.pfsync_status()["differences"] == ["syncpeer 10.0.0.2 != 10.0.0.3"]
    assert ops.pfsync_apply()["changed"] is True
    assert kernel.demotion == 240 and ops.pfsync_status()["pfsync"]["syncok"] is False


# --- hooks --------------------------------------------------------------------------------


def _script(directory: Path, name: str, body: str, mode: int = 0o755) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


@pytest.fixture
def hook_dir(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "carp"
    directory.mkdir()
    record = tmp_path / "record.txt"
    for name in ("20-openvpn", "10-dhcrelay", "30-wireguard"):
        _script(directory, name, f'echo "{name} $# $1 $2" >> {record}\n')
    _script(directory, "05-disabled", f"echo disabled >> {record}\n", mode=0o644)
    _script(directory, ".10-hidden", f"echo hidden >> {record}\n")
    _script(directory, "15-group-writable", f"echo writable >> {record}\n", mode=0o775)
    (directory / "40-fails").write_text("#!/bin/sh\nexit 3\n")
    (directory / "40-fails").chmod(0o755)
    return directory, record


def test_hooks_run_in_name_order_with_validated_args(hook_dir: tuple[Path, Path]) -> None:
    directory, record = hook_dir
    results = hooks.run_carp_hooks("3@vtnet1", "MASTER", hook_dir=directory)
    assert [(r.script, r.returncode) for r in results] == [
        ("10-dhcrelay", 0), ("20-openvpn", 0), ("30-wireguard", 0), ("40-fails", 3)]
    assert record.read_text().splitlines() == [
        "10-dhcrelay 2 3@vtnet1 MASTER", "20-openvpn 2 3@vtnet1 MASTER", "30-wireguard 2 3@vtnet1 MASTER"]


@pytest.mark.parametrize(
    ("subsystem", "state"),
    [
        ("0@vtnet1", "MASTER"), ("256@vtnet1", "MASTER"), ("01@vtnet1", "MASTER"), ("3@", "MASTER"),
        ("3@vtnet1;reboot", "MASTER"), ("3@vtnet1 x", "MASTER"), ("3@$(id)", "BACKUP"), ("vtnet1", "INIT"),
        ("3@averyveryverylongname", "MASTER"), ("3@vtnet1", "master"), ("3@vtnet1", "UP"),
        ("3@vtnet1", "MASTER\n"), ("3@vtnet1", ""),
    ],
)
def test_hooks_reject_bad_arguments_before_running_anything(
    hook_dir: tuple[Path, Path], subsystem: str, state: str
) -> None:
    directory, record = hook_dir
    with pytest.raises(hooks.HookArgumentError):
        hooks.run_carp_hooks(subsystem, state, hook_dir=directory)
    assert not record.exists()


def test_hook_time_limit_and_the_next_script_still_runs(tmp_path: Path) -> None:
    directory = tmp_path / "carp"
    directory.mkdir()
    record = tmp_path / "record.txt"
    _script(directory, "10-hangs", "exec sleep 30\n")
    _script(directory, "20-after", f"echo after >> {record}\n")
    results = hooks.run_carp_hooks("1@vtnet0", "BACKUP", hook_dir=directory, timeout=0.5)
    assert [(r.script, r.returncode) for r in results] == [("10-hangs", 124), ("20-after", 0)]
    assert record.read_text() == "after\n"


def test_hook_dir_missing_runs_nothing(tmp_path: Path) -> None:
    assert hooks.run_carp_hooks("1@vtnet0", "INIT", hook_dir=tmp_path / "absent") == []


# --- CLI ----------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> int:
    """`opnsense-ha` with only our subcommands registered (as hasync.cli discovers them), so these
    tests do not depend on other command modules; HaError -> exit 2 as in hasync.cli.main."""
    parser = argparse.ArgumentParser(prog="opnsense-ha")
    parser.add_argument("--conf-dir", default="/conf")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (boot_command, carp_command, pfsync_command):
        module.register(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HaError as exc:
        print(f"opnsense-ha: error: {exc}", file=sys.stderr)
        return 2


def test_cli_status_json_and_event(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], hook_dir: tuple[Path, Path]) -> None:
    conf = tmp_path / "conf"
    write_config(conf)
    monkeypatch.setenv("OPNSENSE_HA_FAILOVER", "none")
    assert run_cli(["--conf-dir", str(conf), "carp", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["hasync"]["backend"] == "none"
    assert {row["status"] for row in status["rows"]} == {"DISABLED"}
    assert CARP_PASSWORD not in json.dumps(status)

    assert run_cli(["--conf-dir", str(conf), "carp", "maintenance", "enter"]) == 0
    assert json.loads(capsys.readouterr().out) == {"status": "ok", "action": "enter_maintenance"}
    assert flag_on_disk(conf)
    assert json.loads((conf / STATE_FILE).read_text())["maintenance_demotion"] == 240
    assert stat.S_IMODE(os.stat(conf / STATE_FILE).st_mode) & 0o022 == 0

    directory, record = hook_dir
    assert run_cli(["--conf-dir", str(conf), "carp", "event", "1@vtnet0", "MASTER", "--hook-dir", str(directory)]) == 1
    assert "40-fails failed (exit 3)" in capsys.readouterr().err
    assert len(record.read_text().splitlines()) == 3
    assert run_cli(["--conf-dir", str(conf), "carp", "event", "1@vtnet0;x", "MASTER",
                     "--hook-dir", str(directory)]) == 2
    assert "is not <vhid>@<interface>" in capsys.readouterr().err
    assert run_cli(["--conf-dir", str(conf), "carp", "set-status", "reboot"]) == 0  # OPNsense: exit 0
    assert json.loads(capsys.readouterr().out) == {"status": "failed"}


def test_cli_pfsync_and_boot(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "conf"
    write_config(conf)
    monkeypatch.setenv("OPNSENSE_HA_FAILOVER", "none")
    assert run_cli(["--conf-dir", str(conf), "pfsync", "status", "--json"]) == 0  # differences are in the JSON
    reply = json.loads(capsys.readouterr().out)
    assert reply["differences"][:2] == ["state sync is off but configured on", "syncdev - != vtnet2"]
    assert run_cli(["--conf-dir", str(conf), "pfsync", "apply"]) == 0
    assert "nothing changed" in capsys.readouterr().out
    assert run_cli(["--conf-dir", str(conf), "boot", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "status": "ok", "action": "boot", "maintenancemode": False, "preempt": True, "demotion_added": 0}
