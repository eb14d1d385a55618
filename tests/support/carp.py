"""Shared builders for the CARP tests: a node's config.xml and a matching fake kernel."""

from __future__ import annotations

from pathlib import Path

from hasync.config.store import ConfigStore
from hasync.failover.carp import CarpOps
from hasync.failover.freebsd import FreeBsdBackend
from support.fakekernel import FakeKernel

CARP_PASSWORD = "Kx9-carp-pw-7731"

CONFIG = """<?xml version="1.0"?>
<opnsense>
  <system>
    <hostname>fw1</hostname>
  </system>
  <interfaces>
    <wan>
      <if>vtnet0</if>
      <ipaddr>203.0.113.2</ipaddr>
      <subnet>24</subnet>
    </wan>
    <lan>
      <if>vtnet1</if>
      <descr>LAN</descr>
      <ipaddr>10.77.1.2</ipaddr>
      <subnet>24</subnet>
    </lan>
    <opt1>
      <if>vtnet2</if>
      <descr>SYNC</descr>
      <ipaddr>10.0.0.1</ipaddr>
      <subnet>30</subnet>
    </opt1>
  </interfaces>
  <virtualip>
    <vip uuid="0b6c4b5e-7a4f-4c1e-9a36-5b0e0f3d7a01">
      <interface>wan</interface>
      <mode>carp</mode>
      <subnet>203.0.113.1</subnet>
      <subnet_bits>24</subnet_bits>
      <vhid>1</vhid>
      <advbase>1</advbase>
      <advskew>0</advskew>
      <password>{password}</password>
      <descr>WAN VIP</descr>
    </vip>
    <vip uuid="0b6c4b5e-7a4f-4c1e-9a36-5b0e0f3d7a03">
      <interface>lan</interface>
      <mode>carp</mode>
      <subnet>10.77.1.1</subnet>
      <subnet_bits>24</subnet_bits>
      <vhid>3</vhid>
      <advbase>1</advbase>
      <advskew>100</advskew>
      <password>{password}</password>
      <descr>LAN VIP</descr>
    </vip>
    <vip uuid="0b6c4b5e-7a4f-4c1e-9a36-5b0e0f3d7a04">
      <interface>lan</interface>
      <mode>ipalias</mode>
      <subnet>10.77.1.10</subnet>
      <subnet_bits>32</subnet_bits>
      <vhid>3</vhid>
      <descr>alias on the LAN vhid</descr>
    </vip>
    <vip uuid="0b6c4b5e-7a4f-4c1e-9a36-5b0e0f3d7a09">
      <interface>opt9</interface>
      <mode>carp</mode>
      <subnet>198.51.100.1</subnet>
      <subnet_bits>24</subnet_bits>
      <vhid>9</vhid>
      <advbase>1</advbase>
      <advskew>0</advskew>
      <password>{password}</password>
      <descr>VIP on an unassigned interface (never configured)</descr>
    </vip>
  </virtualip>
  <hasync>
    <pfsyncinterface>opt1</pfsyncinterface>
    <pfsyncpeerip>10.0.0.2</pfsyncpeerip>
    <pfsyncversion>1400</pfsyncversion>
    <pfsyncdefer>0</pfsyncdefer>
    {extra_hasync}
  </hasync>
  {extra_root}
</opnsense>
"""


def write_config(conf_dir: Path, *, extra_hasync: str = "", extra_root: str = "") -> Path:
    conf_dir.mkdir(parents=True, exist_ok=True)
    path = conf_dir / "config.xml"
    path.write_text(CONFIG.format(password=CARP_PASSWORD, extra_hasync=extra_hasync, extra_root=extra_root))
    return path


def build_kernel() -> FakeKernel:
    """The kernel of a node whose VIPs (vhid 1 on wan, vhid 3 on lan) are up; vhid 9 is not."""
    kernel = FakeKernel()
    kernel.add_interface("vtnet0", address="203.0.113.2/24", descr="WAN (wan)")
    kernel.add_interface("vtnet1", address="10.77.1.2/24", descr="LAN (lan)")
    kernel.add_interface("vtnet2", address="10.0.0.1/30", descr="SYNC (opt1)", mtu=9000)
    kernel.add_vip("vtnet0", 1, "203.0.113.1/24", advskew=0, state="MASTER", key=CARP_PASSWORD)
    kernel.add_vip("vtnet1", 3, "10.77.1.1/24", advskew=100, state="BACKUP", key=CARP_PASSWORD)
    kernel.add_vip("vtnet1", 3, "10.77.1.10/32")
    return kernel


def sync_pfsync(kernel: FakeKernel) -> None:
    """Put pfsync0 where the config wants it, bulk update finished (the steady state)."""
    kernel.run(["ifconfig", "pfsync0", "syncdev", "vtnet2", "syncpeer", "10.0.0.2", "version", "1400",
                "-defer", "up"])
    kernel.run(["ifconfig", "pfsync0", "mtu", "9000"])
    kernel.complete_bulk()
    kernel.commands.clear()


def build_ops(conf_dir: Path, kernel: FakeKernel, **kwargs: object) -> CarpOps:
    store = ConfigStore(conf_dir)
    return CarpOps(store, FreeBsdBackend(kernel, store.load), **kwargs)  # type: ignore[arg-type]
