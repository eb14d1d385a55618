"""FreeBSD backend: parsers against recorded real outputs, commands against the fake kernel.

Recorded outputs: our own `fixtures/freebsd/` (FreeBSD 14 formats) and, when present, the
published transcripts in `../shared/fixtures/freebsd/` (skipped cleanly when absent).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from hasync.config.vips import VipSpec
from hasync.core.errors import FailoverError
from hasync.core.osiface import CommandResult
from hasync.core.xmlsafe import parse_bytes
from hasync.failover import factory
from hasync.failover.base import PfsyncConfig
from hasync.failover.freebsd import (
    FreeBsdBackend,
    parse_boottime,
    parse_carp_lines,
    parse_ifconfig,
    parse_pfsync,
    parse_sysctl,
    redact_argv,
)
from support.carp import CARP_PASSWORD, build_kernel, sync_pfsync
from support.fakekernel import FakeKernel
from support.paths import FIXTURES, shared_path

OWN = FIXTURES / "freebsd"


def own(name: str) -> str:
    return (OWN / name).read_text()


def shared(name: str) -> str:
    return shared_path("fixtures", "freebsd", name).read_text()


class RecordedRunner:
    """Answers read commands from recorded files; anything else is a test failure."""

    def __init__(self, outputs: dict[tuple[str, ...], str]) -> None:
        self.outputs = outputs
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0) -> CommandResult:
        key = tuple(argv)
        self.calls.append(key)
        if key not in self.outputs:
            raise AssertionError(f"unexpected command {key}")
        return CommandResult(key, 0, self.outputs[key], "")


ROOT = parse_bytes(b"""<opnsense><interfaces>
  <wan><if>vtnet0</if></wan><lan><if>vtnet1</if><descr>LAN</descr></lan>
  <opt1><if>vtnet2</if></opt1><opt2><if>vtnet3</if></opt2>
</interfaces></opnsense>""")


# --- parsers: our recorded FreeBSD 14 outputs ---------------------------------------------------


def test_ifconfig_fbsd14_blocks_carp_and_vip_addresses() -> None:
    interfaces = parse_ifconfig(own("ifconfig_fbsd14_carp_master-backup-init.txt"))
    assert list(interfaces) == ["vtnet0", "vtnet1", "vtnet2", "vtnet3", "enc0", "lo0", "pflog0", "pfsync0"]
    lan = interfaces["vtnet1"]
    assert [(c.state, c.vhid, c.advbase, c.advskew, c.peer) for c in lan.carp] == [
        ("BACKUP", 3, 1, 100, "224.0.0.18"),
        ("MASTER", 5, 2, 20, "10.77.1.3"),
    ]
    assert [(a.address, a.prefixlen, a.vhid) for a in lan.addresses if a.vhid] == [
        ("10.77.1.1", 24, 3), ("10.77.1.254", 32, 5), ("fd00:77:1::1", 64, 3),
    ]
    assert interfaces["vtnet3"].carp[0].state == "INIT" and not interfaces["vtnet3"].up
    assert interfaces["vtnet2"].mtu == 9000 and interfaces["vtnet2"].carp == []


def test_vip_states_map_devices_to_interface_keys() -> None:
    runner = RecordedRunner({("ifconfig",): own("ifconfig_fbsd14_carp_master-backup-init.txt")})
    states = FreeBsdBackend(runner, lambda: ROOT).vip_states()
    assert [(s.interface, s.device, s.vhid, s.subnet, s.status) for s in states] == [
        ("wan", "vtnet0", 1, "203.0.113.1/24", "MASTER"),
        ("lan", "vtnet1", 3, "10.77.1.1/24", "BACKUP"),
        ("lan", "vtnet1", 5, "10.77.1.254/32", "MASTER"),
        ("lan", "vtnet1", 3, "fd00:77:1::1/64", "BACKUP"),
        ("opt2", "vtnet3", 7, "192.0.2.1/24", "INIT"),
    ]
    # without a config the device is all we can name
    assert FreeBsdBackend(runner, lambda: None).vip_states()[0].interface == "vtnet0"


def test_sysctl_fbsd14_globals() -> None:
    runner = RecordedRunner({("sysctl", "net.inet.carp"): own("sysctl_net.inet.carp_fbsd14.txt")})
    glob = FreeBsdBackend(runner).carp_globals()
    assert (glob.demotion, glob.allow, glob.preempt) == (240, True, True)


def test_pfsync_recorded_states() -> None:
    enabled = parse_pfsync(own("ifconfig_pfsync0_enabled_fbsd14.txt"))
    assert (enabled.state.enabled, enabled.state.syncdev, enabled.state.syncpeer, enabled.state.version,
            enabled.state.defer, enabled.state.syncok, enabled.mtu) == (True, "vtnet2", "10.0.0.2", "1400",
                                                                         False, True, 9000)
    bulk = parse_pfsync(own("ifconfig_pfsync0_syncok0_fbsd14.txt"))
    assert (bulk.state.syncdev, bulk.state.syncpeer, bulk.state.defer, bulk.state.syncok) == (
        "vtnet2", None, True, False)
    assert "bulk update" in bulk.state.detail
    disabled = parse_pfsync(own("ifconfig_pfsync0_disabled_fbsd14.txt"))
    assert (disabled.state.enabled, disabled.state.syncdev, disabled.up) == (False, None, False)


def test_pfsync_pre_fbsd14_format() -> None:
    # FreeBSD 11-13 `ifpfsync.c`: "pfsync: syncdev: ..." without version, syncok on its own line
    text = ("pfsync0: flags=41<UP,RUNNING> metric 0 mtu 1500\n"
            "\tpfsync: syncdev: em2 syncpeer: 192.168.50.2 maxupd: 128 defer: on\n"
            "\tsyncok: 1\n\tgroups: pfsync\n")
    state = parse_pfsync(text).state
    assert (state.syncdev, state.syncpeer, state.defer, state.version, state.syncok) == (
        "em2", "192.168.50.2", True, None, True)


def test_boottime_and_redaction() -> None:
    assert parse_boottime(own("sysctl_kern.boottime_fbsd14.txt")) == "1732572160.416386"
    assert parse_boottime("garbage") == ""
    assert redact_argv(["ifconfig", "vtnet0", "vhid", "1", "pass", "hunter2"])[-1] == "********"


# --- parsers: published real transcripts (../shared) -------------------------------------------


def test_shared_fbsd11_one_line_carp_after_media() -> None:
    interfaces = parse_ifconfig(shared("opnsense-core-issue1549__ifconfig-vtnet0_carp-master_fbsd11.txt"))
    vtnet0 = interfaces["vtnet0"]
    assert [(c.state, c.vhid, c.advskew, c.peer) for c in vtnet0.carp] == [("MASTER", 1, 0, None)]
    assert [(a.address, a.prefixlen, a.vhid) for a in vtnet0.addresses if a.vhid] == [("10.0.0.230", 32, 1)]


def test_shared_two_line_carp_with_ipv6_vip() -> None:
    text = shared("freebsd-haproxy-carp-blog__ifconfig-vnet0_host1-backup_host2-master_peer-line.txt")
    host1, host2 = text.split("**Host 2**")
    first, second = parse_ifconfig(host1)["vnet0"], parse_ifconfig(host2)["vnet0"]
    assert [(c.state, c.advskew, c.peer, c.peer6) for c in first.carp] == [("BACKUP", 0, "224.0.0.18", "ff02::12")]
    assert [(c.state, c.advskew) for c in second.carp] == [("MASTER", 100)]
    assert [(a.address, a.prefixlen) for a in first.addresses if a.vhid == 1] == [
        ("10.1.60.200", 32), ("fd5e:d1c2:c9de:60::200", 128)]


def test_shared_grep_output_13_vhids_and_sysctl_with_dscp() -> None:
    text = shared("opnsense-core-issue1100__13vhid_ifconfig-grep-carp_sysctl-net.inet.carp.txt")
    lines = parse_carp_lines(text)
    assert len(lines) == 13 and {c.state for c in lines} == {"MASTER"}
    assert sorted(c.vhid for c in lines) == [1, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]
    values = parse_sysctl(text)
    assert values["net.inet.carp.dscp"] == "56" and values["net.inet.carp.demotion"] == "0"


def test_shared_fbsd11_sysctl_form_per_node() -> None:
    text = shared("opnsense-core-issue3671__fw1-fw2_ifconfig-grep-carp_sysctl-net.inet.carp.txt")
    initial = text.split("Test 1:")[0]
    fw1, fw2 = initial.split("fw2:\n~~~~")
    assert [(c.state, c.vhid, c.advskew) for c in parse_carp_lines(fw1)] == [("MASTER", 3, 0), ("MASTER", 1, 0)]
    assert {(c.state, c.advskew) for c in parse_carp_lines(fw2)} == {("BACKUP", 100)}
    for node in (fw1, fw2):
        values = parse_sysctl(node)
        assert "net.inet.carp.dscp" not in values  # the FreeBSD 11 form
        runner = RecordedRunner({("sysctl", "net.inet.carp"): node})
        glob = FreeBsdBackend(runner).carp_globals()
        assert (glob.demotion, glob.allow, glob.preempt) == (0, True, True)


def test_shared_pfsync_v1400_and_grep_two_line_carp() -> None:
    text = shared("opnsense-ha-poc-fr__ifconfig-carp_ifconfig-pfsync0-v1400_pfctl-s-info-partial.txt")
    state = parse_pfsync(text.split("ifconfig pfsync0")[1]).state
    assert (state.enabled, state.syncdev, state.syncpeer, state.version, state.defer, state.syncok) == (
        True, "vmx2", "10.0.0.2", "1400", False, True)
    lines = parse_carp_lines(text)
    assert [(c.state, c.vhid, c.advskew, c.peer) for c in lines] == [
        ("MASTER", 11, 0, "224.0.0.18"), ("MASTER", 33, 0, "224.0.0.18"), ("BACKUP", 11, 100, "224.0.0.18")]


# --- writes against the fake kernel ----------------------------------------------------------


def test_demotion_writes_add() -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    backend.add_demotion(240)
    backend.add_demotion(-100)
    backend.add_demotion(0)  # no write at all
    assert kernel.writes() == [("sysctl", "net.inet.carp.demotion=240"), ("sysctl", "net.inet.carp.demotion=-100")]
    assert backend.carp_globals().demotion == 140
    assert kernel.advertised_skew("vtnet1", 3) == 240  # 100 + 140, clamped to CARP_MAXSKEW
    assert kernel.advertised_skew("vtnet0", 1) == 140


def test_allow_and_preempt() -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    backend.set_preempt(True)
    backend.set_allow(False)
    glob = backend.carp_globals()
    assert (glob.allow, glob.preempt) == (False, True)
    assert {s.status for s in backend.vip_states()} == {"INIT"}


PFSYNC_ON = PfsyncConfig(syncdev="vtnet2", syncpeer="10.0.0.2", version="1400", defer=False)


def test_pfsync_apply_exact_command_then_mtu_and_bulk_demotion() -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    assert backend.apply_pfsync(PFSYNC_ON) is True
    assert kernel.writes() == [
        ("ifconfig", "pfsync0", "syncdev", "vtnet2", "syncpeer", "10.0.0.2", "version", "1400", "-defer", "up"),
        ("ifconfig", "pfsync0", "mtu", "9000"),
    ]
    state = backend.pfsync_state()
    assert (state.enabled, state.syncok) == (True, False)
    assert backend.carp_globals().demotion == 240  # bulk update running
    kernel.complete_bulk()
    assert backend.pfsync_state().syncok is True and backend.carp_globals().demotion == 0


def test_pfsync_reapply_unchanged_does_nothing_regression_10858() -> None:
    kernel = build_kernel()
    sync_pfsync(kernel)
    backend = FreeBsdBackend(kernel)
    assert backend.apply_pfsync(PFSYNC_ON) is False
    assert kernel.writes() == []
    assert backend.carp_globals().demotion == 0
    # control: blindly re-running OPNsense's command on the same config does demote by 240
    kernel.run(["ifconfig", "pfsync0", "syncdev", "vtnet2", "syncpeer", "10.0.0.2", "version", "1400",
                "-defer", "up"])
    assert backend.carp_globals().demotion == 240


@pytest.mark.parametrize(
    ("desired", "expected"),
    [
        (PfsyncConfig("vtnet2", "10.0.0.2", "1400", True), ("defer", "up")),
        (PfsyncConfig("vtnet2", None, "1400", False), ("-syncpeer", "version")),
        (PfsyncConfig("vtnet2", "10.0.0.2", "1301", False), ("version", "1301")),
    ],
)
def test_pfsync_each_difference_reapplies(desired: PfsyncConfig, expected: tuple[str, str]) -> None:
    kernel = build_kernel()
    sync_pfsync(kernel)
    assert FreeBsdBackend(kernel).apply_pfsync(desired) is True
    (command,) = kernel.writes()
    joined = " ".join(command)
    assert " ".join(expected) in joined and command[:4] == ("ifconfig", "pfsync0", "syncdev", "vtnet2")


def test_pfsync_mtu_only_difference_sets_mtu_without_bulk() -> None:
    kernel = build_kernel()
    sync_pfsync(kernel)
    kernel.interfaces["vtnet2"].mtu = 1500
    assert FreeBsdBackend(kernel).apply_pfsync(PFSYNC_ON) is True
    assert kernel.writes() == [("ifconfig", "pfsync0", "mtu", "1500")]
    assert kernel.demotion == 0


def test_pfsync_disable_then_idempotent() -> None:
    kernel = build_kernel()
    sync_pfsync(kernel)
    backend = FreeBsdBackend(kernel)
    off = PfsyncConfig(syncdev=None, syncpeer=None)
    assert backend.apply_pfsync(off) is True
    assert kernel.writes() == [("ifconfig", "pfsync0", "-syncdev", "-syncpeer", "down")]
    assert backend.apply_pfsync(off) is False
    assert len(kernel.writes()) == 1


def test_pfsync_bad_settings_refused_before_any_write() -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    for bad in (PfsyncConfig("vtnet2;reboot", None), PfsyncConfig("vtnet2", "10.0.0.256"),
                PfsyncConfig("vtnet2", "fe80::1")):
        with pytest.raises(FailoverError):
            backend.apply_pfsync(bad)
    assert kernel.writes() == []


def _spec(**kw: object) -> VipSpec:
    base: dict[str, object] = dict(interface="lan", device="vtnet1", vhid=4, advbase=1, advskew=50,
                                   subnet="10.77.1.4", subnet_bits=24, password=CARP_PASSWORD)
    base.update(kw)
    return VipSpec(**base)  # type: ignore[arg-type]


def test_configure_vips_commands_and_no_password_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    v6 = _spec(subnet="fd00:77:1::4", subnet_bits=64)
    with caplog.at_level(logging.DEBUG):
        backend.configure_vips([_spec(), v6], [])
    assert kernel.writes() == [
        ("ifconfig", "vtnet1", "vhid", "4", "advskew", "50", "advbase", "1", "pass", CARP_PASSWORD),
        ("ifconfig", "vtnet1", "vhid", "4", "mcast"),
        ("ifconfig", "vtnet1", "10.77.1.4/24", "alias", "vhid", "4"),
        ("ifconfig", "vtnet1", "inet6", "fd00:77:1::4", "prefixlen", "64", "alias", "vhid", "4"),
    ]
    assert CARP_PASSWORD not in caplog.text and "vhid 4" in caplog.text
    states = {(s.vhid, s.subnet) for s in backend.vip_states()}
    assert {(4, "10.77.1.4/24"), (4, "fd00:77:1::4/64")} <= states
    # again: parameters re-set, addresses already there are not re-added
    kernel.commands.clear()
    backend.configure_vips([_spec(peer="10.77.1.3")], [])
    assert [c for c in kernel.writes() if "alias" in c] == []
    assert ("ifconfig", "vtnet1", "vhid", "4", "peer", "10.77.1.3") in kernel.writes()


def test_configure_vips_failure_message_has_no_password() -> None:
    kernel = build_kernel()
    kernel.fail_next[("ifconfig", "vtnet1", "vhid")] = "ifconfig: SIOCSVH: Operation not permitted"
    with pytest.raises(FailoverError) as info:
        FreeBsdBackend(kernel).configure_vips([_spec()], [])
    assert CARP_PASSWORD not in str(info.value)
    assert "********" in str(info.value) and "Operation not permitted" in str(info.value)


def test_ipalias_on_a_vhid_does_not_override_carp_parameters() -> None:
    kernel = build_kernel()
    carp = _spec(vhid=6, advskew=100)
    alias = _spec(vhid=6, advskew=0, password="", subnet="10.77.1.6", subnet_bits=32)
    alias.mode = "ipalias"  # type: ignore[attr-defined]
    FreeBsdBackend(kernel).configure_vips([alias, carp], [])
    assert kernel.interfaces["vtnet1"].carp[6].advskew == 100
    assert sum(1 for c in kernel.writes() if "advskew" in c) == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"device": "vtnet1 ; reboot"}, {"vhid": 0}, {"vhid": 256}, {"advskew": 255}, {"advbase": 0},
        {"subnet": "10.77.1"}, {"subnet_bits": 33}, {"peer": "not-an-ip"}, {"password": "a\nb"},
    ],
)
def test_configure_vips_rejects_bad_specs_before_any_command(bad: dict[str, object]) -> None:
    kernel = build_kernel()
    with pytest.raises(FailoverError):
        FreeBsdBackend(kernel).configure_vips([_spec(), _spec(**bad)], [])
    assert kernel.writes() == []


def test_remove_vips() -> None:
    kernel = build_kernel()
    backend = FreeBsdBackend(kernel)
    gone = _spec(vhid=1, device="vtnet0", subnet="203.0.113.1")
    absent = _spec(vhid=9, device="vtnet0", subnet="198.51.100.1")
    backend.configure_vips([], [gone, absent])
    assert kernel.writes() == [("ifconfig", "vtnet0", "inet", "203.0.113.1", "-alias")]
    assert all(s.vhid != 1 for s in backend.vip_states())


# --- factory -------------------------------------------------------------------------------


def test_factory_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert factory.choose(env="", system="FreeBSD") == "freebsd"
    assert factory.choose(env="", system="Linux") == "keepalived"
    assert factory.choose(env="None", system="FreeBSD") == "none"
    with pytest.raises(FailoverError, match="OPNSENSE_HA_FAILOVER"):
        factory.choose(env="vrrp")
    monkeypatch.setenv(factory.ENV_VAR, "none")
    assert isinstance(factory.get_backend(tmp_path), factory.NullBackend)
    monkeypatch.setenv(factory.ENV_VAR, "freebsd")
    kernel = build_kernel()
    backend = factory.get_backend(tmp_path, kernel)  # no config.xml: devices stay unnamed
    assert isinstance(backend, FreeBsdBackend)
    assert backend.vip_states()[0].interface == "vtnet0"


def test_fake_kernel_renders_what_the_parsers_read(tmp_path: Path) -> None:
    """The fake's output and the recorded fixture parse to the same kind of structure."""
    kernel = FakeKernel()
    kernel.add_interface("vtnet1", address="10.77.1.2/24")
    kernel.add_vip("vtnet1", 3, "10.77.1.1/24", advskew=100, state="BACKUP")
    text = kernel.run(["ifconfig", "vtnet1"]).stdout
    assert re.search(r"^\tcarp: BACKUP vhid 3 advbase 1 advskew 100\n\t      peer 224\.0\.0\.18 peer6 ff02::12$",
                     text, re.M)
    assert "\tinet 10.77.1.1 netmask 0xffffff00 broadcast 10.77.1.255 vhid 3\n" in text


def test_null_backend_keeps_kernel_semantics_across_instances(tmp_path: Path) -> None:
    state = tmp_path / factory.NULL_STATE_FILE
    first = factory.NullBackend(state)
    first.add_demotion(240)
    first.add_demotion(-40)
    first.set_preempt(True)
    again = factory.NullBackend(state)  # e.g. the next CLI invocation
    assert (again.carp_globals().demotion, again.carp_globals().preempt) == (200, True)
    assert factory.NullBackend().carp_globals().demotion == 0  # without a file: memory only
    assert again.apply_pfsync(PFSYNC_ON) is False and again.vip_states() == []
