"""A virtual IP as config.xml declares it, and the one identity two VIPs are compared by.

The merge pairs incoming VIPs with the backup's, the agent reconfigures the ones a merge touched
and rollback the ones a restore touched; all three must agree on when two records are "the same
VIP", so `vip_key` is the only definition (OPNsense's `get_unique_vip_key()`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


def vip_key(vip: Mapping[str, str]) -> str:
    """get_unique_vip_key(): CARP VIPs by interface and vhid, others also by address."""
    mode, interface, vhid = vip.get("mode", ""), vip.get("interface", ""), vip.get("vhid", "")
    if mode == "carp":
        return f"{mode}_{interface}_vip{vhid}"
    return f"{mode}_{interface}_vip{vhid}_{vip.get('subnet', '')}_{vip.get('subnet_bits', '')}"


@dataclass
class VipSpec:
    """A CARP VIP as declared in config.xml (what to configure)."""

    interface: str
    device: str
    vhid: int
    advbase: int
    advskew: int
    subnet: str
    subnet_bits: int
    password: str = field(default="", repr=False)
    peer: str = ""
    uuid: str = ""
    mode: str = "carp"  # "carp" owns the vhid's parameters; an "ipalias" on a vhid carries none
    peer6: str = ""

    @property
    def key(self) -> str:
        """`vip_key` of this VIP."""
        return vip_key({"mode": self.mode, "interface": self.interface, "vhid": str(self.vhid),
                        "subnet": self.subnet, "subnet_bits": str(self.subnet_bits)})
