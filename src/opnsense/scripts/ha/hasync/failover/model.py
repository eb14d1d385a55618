"""Read what failover needs (CARP VIPs, pfsync/hasync settings) out of a config.xml tree.

Both backends render from the same declarations, so FreeBSD and Linux agree on what a vhid,
its skew and the state-sync link are.
"""

from __future__ import annotations

from lxml import etree

from hasync.config.items import read_hasync
from hasync.config.vips import VipSpec
from hasync.failover.base import PfsyncConfig

MAINTENANCE_TAG = "virtualip_carp_maintenancemode"


def _text(node: etree._Element | None, tag: str, default: str = "") -> str:
    if node is None:
        return default
    child = node.find(tag)
    if child is None or child.text is None:
        return default
    return child.text.strip()


def interface_device(root: etree._Element, key: str) -> str:
    """The OS device of a config interface key (`lan` -> `vtnet1`); the key itself if unknown."""
    return _text(root.find(f"interfaces/{key}"), "if", key) if key else key


def carp_vips(root: etree._Element) -> list[VipSpec]:
    """Every VIP with a vhid, in document order."""
    vips: list[VipSpec] = []
    for vip in root.iterfind("virtualip/vip"):
        vhid = _text(vip, "vhid")
        if not vhid:
            continue
        interface = _text(vip, "interface")
        vips.append(
            VipSpec(
                interface=interface,
                device=interface_device(root, interface),
                vhid=int(vhid),
                advbase=int(_text(vip, "advbase", "1") or 1),
                advskew=int(_text(vip, "advskew", "0") or 0),
                subnet=_text(vip, "subnet"),
                subnet_bits=int(_text(vip, "subnet_bits", "32") or 32),
                password=_text(vip, "password"),
                peer=_text(vip, "peer"),
                uuid=vip.get("uuid", ""),
                mode=_text(vip, "mode", "carp") or "carp",
                peer6=_text(vip, "peer6"),
            )
        )
    return vips


def pfsync_config(root: etree._Element) -> PfsyncConfig:
    """Desired pfsync settings from `hasync` (new style) or the legacy `pfsyncenabled` form."""
    settings = read_hasync(root)
    iface = settings.pfsync_interface_effective
    return PfsyncConfig(
        syncdev=interface_device(root, iface) if iface else None,
        syncpeer=settings.pfsyncpeerip or None,
        version=settings.pfsyncversion or "1400",
        defer=settings.pfsyncdefer,
    )


def preempt_wanted(root: etree._Element) -> bool:
    return _text(root.find("hasync"), "disablepreempt") not in ("1", "on")


def maintenance_mode(root: etree._Element) -> bool:
    return _text(root, MAINTENANCE_TAG) == "1"
