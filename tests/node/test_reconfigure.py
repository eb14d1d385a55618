"""The one VIP identity and the one reconfigure path (hasync.config.vips, hasync.node.reconfigure)."""

from __future__ import annotations

from dataclasses import replace

from hasync.config.vips import VipSpec, vip_key
from hasync.node.reconfigure import vip_changes

LAN = VipSpec(interface="lan", device="em1", vhid=1, advbase=1, advskew=0, subnet="192.0.2.1", subnet_bits=24)
WAN = VipSpec(interface="wan", device="em0", vhid=2, advbase=1, advskew=0, subnet="198.51.100.1", subnet_bits=24)


def test_a_vip_is_identified_as_opnsense_does() -> None:
    assert LAN.key == vip_key({"mode": "carp", "interface": "lan", "vhid": "1", "subnet": "x"}) == "carp_lan_vip1"
    alias = replace(LAN, mode="ipalias")
    assert alias.key == "ipalias_lan_vip1_192.0.2.1_24"  # not CARP: the address is part of the identity


def test_vip_changes_pairs_by_identity() -> None:
    assert vip_changes([LAN, WAN], [LAN, WAN]) == ([], [])
    skewed = replace(LAN, advskew=100)
    assert vip_changes([LAN, WAN], [skewed, WAN]) == ([skewed], [])  # same VIP changed: touched only
    assert vip_changes([LAN, WAN], [WAN]) == ([], [LAN])
    moved = replace(LAN, subnet="192.0.2.9")
    assert vip_changes([LAN], [moved]) == ([moved], [LAN])  # the old address must leave the interface
