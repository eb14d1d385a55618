"""The one interface the rest of opnsense-ha uses to control failover.

Callers (agent, CLI, checks) never ask which OS they run on: they get a `FailoverBackend` from
the factory and use these calls. Each implementation talks to the OS only through the
`CommandRunner` it was given, so tests substitute recorded outputs or a fake kernel.

Demotion semantics follow FreeBSD's `net.inet.carp.demotion`: it is one counter shared by the
kernel and every tool on the box, and writing N *adds* N. `add_demotion` therefore takes a delta;
nobody ever "sets" the counter.
"""

from __future__ import annotations

import ipaddress
from abc import ABC, abstractmethod
from dataclasses import dataclass

from hasync.config.vips import VipSpec
from hasync.core.errors import FailoverError


@dataclass(frozen=True)
class VipState:
    """One CARP vhid as the OS reports it (a row of OPNsense's get_vip_status)."""

    interface: str  # config interface key, e.g. "lan" (or the device when unknown)
    device: str  # OS device, e.g. "vtnet1" / "eth0"
    vhid: int
    advbase: int
    advskew: int
    subnet: str  # "10.0.0.1/24"
    status: str  # MASTER | BACKUP | INIT | DISABLED


@dataclass(frozen=True)
class CarpGlobals:
    demotion: int
    allow: bool
    preempt: bool


@dataclass(frozen=True)
class PfsyncConfig:
    """Desired state-sync settings, derived from the hasync section."""

    syncdev: str | None  # None = state sync off
    syncpeer: str | None  # None = multicast
    version: str = "1400"
    defer: bool = False


@dataclass(frozen=True)
class PfsyncState:
    """What the OS reports about state sync."""

    enabled: bool
    syncdev: str | None
    syncpeer: str | None
    version: str | None
    defer: bool | None
    syncok: bool | None  # None = unknown (not reported)
    running: bool = True  # conntrackd process alive (always True for the kernel pfsync)
    detail: str = ""


def check_vip_spec(spec: VipSpec) -> str:
    """Refuse a malformed CARP VIP before any command runs, so nothing is configured half.

    Shared by every backend; returns the "where" text for backend-specific follow-up errors.
    """
    where = f"VIP {spec.uuid or spec.subnet} (vhid {spec.vhid} on {spec.interface or spec.device})"
    if not 1 <= spec.vhid <= 255:
        raise FailoverError(f"{where}: vhid must be 1..255")
    if not 1 <= spec.advbase <= 254:
        raise FailoverError(f"{where}: advbase must be 1..254")
    if not 0 <= spec.advskew <= 254:
        raise FailoverError(f"{where}: advskew must be 0..254")
    try:
        address = ipaddress.ip_address(spec.subnet)
    except ValueError:
        raise FailoverError(f"{where}: {spec.subnet!r} is not an IP address") from None
    if not 0 <= spec.subnet_bits <= address.max_prefixlen:
        raise FailoverError(f"{where}: subnet_bits {spec.subnet_bits} out of range")
    return where


def vhid_owner(specs: list[VipSpec]) -> VipSpec:
    """The record that owns a vhid's parameters: the CARP one (IP aliases on a vhid carry none);
    among several CARP records, one with a password."""
    carp = [spec for spec in specs if spec.mode == "carp"]
    return next((spec for spec in carp if spec.password), carp[0] if carp else specs[0])


class FailoverBackend(ABC):
    """Control of the OS's failover machinery."""

    name: str = "abstract"

    @abstractmethod
    def vip_states(self) -> list[VipState]:
        """Current state of every vhid on this node."""

    @abstractmethod
    def carp_globals(self) -> CarpGlobals:
        """The demotion counter, CARP allow and preempt."""

    @abstractmethod
    def add_demotion(self, delta: int) -> None:
        """Add `delta` (may be negative) to the shared demotion counter."""

    @abstractmethod
    def set_allow(self, allow: bool) -> None:
        """Enable/disable CARP on this node (temporary, not persisted)."""

    @abstractmethod
    def set_preempt(self, preempt: bool) -> None:
        """Switch preemption on or off."""

    @abstractmethod
    def pfsync_state(self) -> PfsyncState:
        """Current state-sync status."""

    @abstractmethod
    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        """Bring state sync to `desired`; only touches the OS when it differs. True if changed."""

    @abstractmethod
    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        """(Re)configure changed CARP VIPs and bring removed ones down."""

    def boot_id(self) -> str:
        """An id of the running kernel boot ("" if unknown): demotion counters reset at reboot."""
        return ""

    def start(self) -> None:
        """Bring the failover machinery up at boot; a kernel implementation needs nothing here."""
        return None
