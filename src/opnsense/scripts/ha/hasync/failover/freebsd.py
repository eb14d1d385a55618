"""CARP and pfsync control on OPNsense/FreeBSD, through `ifconfig` and `sysctl`.

Everything here reads or writes the kernel through the `CommandRunner` it was given, so the
unit tests run the same code against recorded outputs and a fake kernel.

Kernel facts this module is built on (reference §7, §8; FreeBSD `ip_carp.c`, `if_pfsync.c`):

* `sysctl net.inet.carp.demotion=N` *adds* N to a counter shared with the kernel itself
  (interface down, send errors, pfsync bulk sync) and other tools. `add_demotion` therefore only
  ever writes a delta; nothing in this module sets the counter.
* `ifconfig` prints one `carp:` line per vhid on the interface carrying it, in two formats:
  old (FreeBSD <= 13): ``carp: MASTER vhid 1 advbase 1 advskew 0``; current (FreeBSD 14): the same
  line followed by ``peer 224.0.0.18 peer6 ff02::12``. The addresses of a vhid are the inet/inet6
  lines of the same interface ending in ``vhid N``.
* Setting pfsync's syncdev starts a bulk request that demotes CARP by 240 until it completes, so
  `apply_pfsync` touches the kernel only when the desired settings differ from what
  `ifconfig pfsync0` shows (OPNsense issue #10858).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lxml import etree

from hasync.config.vips import VipSpec
from hasync.core.errors import FailoverError
from hasync.core.osiface import CommandResult, CommandRunner
from hasync.failover.base import (
    CarpGlobals,
    FailoverBackend,
    PfsyncConfig,
    PfsyncState,
    VipState,
    check_vip_spec,
    vhid_owner,
)

log = logging.getLogger(__name__)

PFSYNC_IF = "pfsync0"
PFSYNC_GROUP = "224.0.0.240"  # INADDR_PFSYNC_GROUP: "no syncpeer" (multicast)
CARP_STATES = ("INIT", "BACKUP", "MASTER")
REDACTED = "********"

# FreeBSD interface names: IFNAMSIZ 16 (15 chars), letters first; OPNsense adds '_' (igb0_vlan10)
# and FreeBSD '.' (vlan0.111). Anything else must never reach an ifconfig argv.
_DEVICE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]{0,14}$")

_HEADER_RE = re.compile(
    r"^(?P<name>[A-Za-z][A-Za-z0-9_.\-]*): flags=(?P<flags>[0-9a-fA-F]+)(?:<(?P<names>[^>]*)>)?"
    r"(?:.*?\bmtu (?P<mtu>\d+))?"
)
_CARP_RE = re.compile(
    r"^\s*carp: (?P<state>[A-Z]+) vhid (?P<vhid>\d+) advbase (?P<advbase>\d+) advskew (?P<advskew>\d+)"
    r"(?P<rest>.*)$"
)
_PEER_RE = re.compile(r"^\s*peer (?P<peer>\S+) peer6 (?P<peer6>\S+)\s*$")
_INET_RE = re.compile(
    r"^\s*inet (?P<addr>[0-9.]+)(?:/(?P<len>\d+))?(?: netmask (?P<mask>0x[0-9a-fA-F]+))?(?P<rest>.*)$"
)
_INET6_RE = re.compile(
    r"^\s*inet6 (?P<addr>[0-9a-fA-F:.]+)(?:%\S+)?(?:/(?P<len>\d+))?(?: prefixlen (?P<plen>\d+))?(?P<rest>.*)$"
)
_VHID_RE = re.compile(r"\bvhid (\d+)\b")
_SYSCTL_RE = re.compile(r"^\s*(?P<name>[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+): ?(?P<value>.*)$")
_PFSYNC_RE = re.compile(r"^\s*(?:pfsync: )?(?P<body>(?:syncdev: |syncpeer: |maxupd: ).*)$")
_SYNCOK_RE = re.compile(r"^\s*syncok: (?P<ok>[01])\b")
_BOOTTIME_RE = re.compile(r"sec = (\d+), usec = (\d+)")


# --- parsed shapes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CarpVhid:
    """One `carp:` line (plus its `peer` line in the FreeBSD 14 format)."""

    state: str
    vhid: int
    advbase: int
    advskew: int
    peer: str | None = None  # None = the old one-line format did not say
    peer6: str | None = None


@dataclass(frozen=True)
class IfAddress:
    family: str  # "inet" | "inet6"
    address: str
    prefixlen: int
    vhid: int | None


@dataclass
class IfInfo:
    """One interface block of `ifconfig` output."""

    name: str
    flags: frozenset[str]
    mtu: int | None
    addresses: list[IfAddress] = field(default_factory=list)
    carp: list[CarpVhid] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return "UP" in self.flags


# --- parsers (pure functions: tested against recorded real outputs) -----------------------------


def _mask_to_prefixlen(mask: str) -> int:
    value = int(mask, 16)
    bits = bin(value).count("1")
    if value != ((1 << 32) - 1) ^ ((1 << (32 - bits)) - 1):
        raise ValueError(f"non-contiguous netmask {mask}")
    return bits


def _parse_carp_line(line: str) -> CarpVhid | None:
    match = _CARP_RE.match(line)
    if match is None or match.group("state") not in CARP_STATES:
        return None
    return CarpVhid(
        state=match.group("state"),
        vhid=int(match.group("vhid")),
        advbase=int(match.group("advbase")),
        advskew=int(match.group("advskew")),
    )


def parse_carp_lines(text: str) -> list[CarpVhid]:
    """Every `carp:` line in any text (full `ifconfig`, `ifconfig | grep -A 2 carp`, a transcript).

    Lines that are not CARP status are ignored, so shell prompts and other output around a
    recorded transcript do not disturb the result. A `peer ... peer6 ...` line directly after a
    `carp:` line belongs to it (FreeBSD 14 format).
    """
    found: list[CarpVhid] = []
    for line in text.splitlines():
        carp = _parse_carp_line(line)
        if carp is not None:
            found.append(carp)
            continue
        peer = _PEER_RE.match(line)
        if peer and found and found[-1].peer is None:
            last = found[-1]
            found[-1] = CarpVhid(last.state, last.vhid, last.advbase, last.advskew,
                                 peer.group("peer"), peer.group("peer6"))
    return found


def _parse_address(line: str) -> IfAddress | None:
    match = _INET_RE.match(line)
    if match:
        if match.group("len") is not None:
            plen = int(match.group("len"))
        elif match.group("mask") is not None:
            plen = _mask_to_prefixlen(match.group("mask"))
        else:
            plen = 32
        vhid = _VHID_RE.search(match.group("rest"))
        return IfAddress("inet", match.group("addr"), plen, int(vhid.group(1)) if vhid else None)
    match = _INET6_RE.match(line)
    if match:
        length = match.group("len") or match.group("plen") or "128"
        vhid = _VHID_RE.search(match.group("rest"))
        return IfAddress("inet6", match.group("addr"), int(length), int(vhid.group(1)) if vhid else None)
    return None


def parse_ifconfig(text: str) -> dict[str, IfInfo]:
    """Interface blocks of `ifconfig` / `ifconfig <dev>` output, keyed by device, in output order.

    A block starts at a line `<name>: flags=...` in column 0; indented lines belong to it. Lines
    before the first header (prompts) and unindented noise end the current block.
    """
    interfaces: dict[str, IfInfo] = {}
    current: IfInfo | None = None
    for line in text.splitlines():
        header = _HEADER_RE.match(line)
        if header:
            names = header.group("names") or ""
            current = IfInfo(
                name=header.group("name"),
                flags=frozenset(n for n in names.split(",") if n),
                mtu=int(header.group("mtu")) if header.group("mtu") else None,
            )
            interfaces[current.name] = current
            continue
        if current is None:
            continue
        if line and not line[0].isspace():
            current = None  # end of the block (e.g. a following prompt or markdown fence)
            continue
        current.lines.append(line)
        carp = _parse_carp_line(line)
        if carp is not None:
            current.carp.append(carp)
            continue
        peer = _PEER_RE.match(line)
        if peer and current.carp and current.carp[-1].peer is None:
            last = current.carp[-1]
            current.carp[-1] = CarpVhid(last.state, last.vhid, last.advbase, last.advskew,
                                        peer.group("peer"), peer.group("peer6"))
            continue
        address = _parse_address(line)
        if address is not None:
            current.addresses.append(address)
    return interfaces


def parse_sysctl(text: str) -> dict[str, str]:
    """`name: value` lines of `sysctl <node>` output (FreeBSD 11 and 14 forms alike)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        match = _SYSCTL_RE.match(line)
        if match:
            values[match.group("name")] = match.group("value").strip()
    return values


@dataclass(frozen=True)
class PfsyncInfo:
    """`ifconfig pfsync0` as parsed: the public `PfsyncState` plus flags and MTU."""

    state: PfsyncState
    up: bool
    mtu: int | None


def parse_pfsync(text: str) -> PfsyncInfo:
    """Parse `ifconfig pfsync0`: the settings line, `syncok:` and the header's flags/MTU.

    Formats: FreeBSD 14 ``syncdev: vmx2 syncpeer: 10.0.0.2 maxupd: 128 defer: off version: 1400``
    then ``syncok: 1``; older ``pfsync: syncdev: X syncpeer: Y maxupd: 128 defer: off``. A disabled
    pfsync0 prints only ``maxupd: 128 defer: off version: 1400`` (no syncdev).
    """
    block = parse_ifconfig(text).get(PFSYNC_IF)
    lines = block.lines if block is not None else text.splitlines()
    fields: dict[str, str] = {}
    syncok: bool | None = None
    for line in lines:
        settings = _PFSYNC_RE.match(line)
        if settings:
            tokens = settings.group("body").split()
            for key, value in zip(tokens[0::2], tokens[1::2], strict=False):
                fields[key.rstrip(":")] = value
            continue
        ok = _SYNCOK_RE.match(line)
        if ok:
            syncok = ok.group("ok") == "1"
    syncdev = fields.get("syncdev") or None
    syncpeer = fields.get("syncpeer") or None
    if syncpeer == PFSYNC_GROUP:
        syncpeer = None
    defer = {"on": True, "off": False}.get(fields.get("defer", ""))
    up = block.up if block is not None else False
    enabled = syncdev is not None and up
    if syncok is False:
        detail = "bulk update in progress (syncok 0): CARP is demoted by 240 until it completes"
    elif syncdev is None:
        detail = "state sync off (no syncdev)"
    elif not up:
        detail = f"{PFSYNC_IF} is down"
    else:
        detail = ""
    state = PfsyncState(
        enabled=enabled,
        syncdev=syncdev,
        syncpeer=syncpeer,
        version=fields.get("version"),
        defer=defer,
        syncok=syncok,
        detail=detail,
    )
    return PfsyncInfo(state=state, up=up, mtu=block.mtu if block is not None else None)


def parse_boottime(text: str) -> str:
    """`sysctl -n kern.boottime` (``{ sec = 1700000000, usec = 416386 } Tue Nov ...``) -> "sec.usec"."""
    match = _BOOTTIME_RE.search(text)
    return f"{match.group(1)}.{match.group(2)}" if match else ""


def redact_argv(argv: Sequence[str]) -> list[str]:
    """A copy of argv safe for logs and error messages: the word after `pass` is masked."""
    out = list(argv)
    for index, word in enumerate(out[:-1]):
        if word == "pass":
            out[index + 1] = REDACTED
    return out


def interface_keys(root: etree._Element | None) -> dict[str, str]:
    """Device -> config interface key (`vtnet1` -> `lan`), from `interfaces.<key>.if`."""
    mapping: dict[str, str] = {}
    if root is None:
        return mapping
    interfaces = root.find("interfaces")
    if interfaces is None:
        return mapping
    for node in interfaces:
        if not isinstance(node.tag, str):
            continue
        device = (node.findtext("if") or "").strip()
        if device and device not in mapping:
            mapping[device] = node.tag
    return mapping


# --- the backend ------------------------------------------------------------------------------


RootProvider = Callable[[], "etree._Element | None"]


class FreeBsdBackend(FailoverBackend):
    """`FailoverBackend` over FreeBSD's carp(4) and pfsync(4)."""

    name = "freebsd"

    def __init__(self, runner: CommandRunner, root_provider: RootProvider | None = None,
                 *, timeout: float = 30.0) -> None:
        self.runner = runner
        self.root_provider = root_provider or (lambda: None)
        self.timeout = timeout

    # --- plumbing ---

    def _run(self, argv: Sequence[str], *, check: bool = True) -> CommandResult:
        result = self.runner.run(list(argv), timeout=self.timeout)
        if check and not result.ok:
            shown = " ".join(redact_argv(argv))
            detail = (result.stderr or result.stdout).strip().replace("\n", " ")
            raise FailoverError(f"`{shown}` failed (exit {result.returncode}): {detail or 'no output'}")
        return result

    def _sysctl_write(self, name: str, value: int) -> None:
        self._run(["sysctl", f"{name}={value}"])

    def ifconfig(self, device: str | None = None) -> dict[str, IfInfo]:
        argv = ["ifconfig"] if device is None else ["ifconfig", _checked_device(device)]
        return parse_ifconfig(self._run(argv).stdout)

    # --- reading ---

    def vip_states(self) -> list[VipState]:
        keys = interface_keys(self.root_provider())
        states: list[VipState] = []
        for info in self.ifconfig().values():
            if not info.carp:
                continue
            by_vhid = {carp.vhid: carp for carp in info.carp}
            seen: set[int] = set()
            for address in info.addresses:
                if address.vhid is None or address.vhid not in by_vhid:
                    continue
                carp = by_vhid[address.vhid]
                seen.add(carp.vhid)
                states.append(VipState(
                    interface=keys.get(info.name, info.name), device=info.name, vhid=carp.vhid,
                    advbase=carp.advbase, advskew=carp.advskew,
                    subnet=f"{address.address}/{address.prefixlen}", status=carp.state,
                ))
            for carp in info.carp:  # a vhid without addresses still has a state worth reporting
                if carp.vhid not in seen:
                    states.append(VipState(
                        interface=keys.get(info.name, info.name), device=info.name, vhid=carp.vhid,
                        advbase=carp.advbase, advskew=carp.advskew, subnet="", status=carp.state,
                    ))
        return states

    def carp_sysctls(self) -> dict[str, str]:
        return parse_sysctl(self._run(["sysctl", "net.inet.carp"]).stdout)

    def carp_globals(self) -> CarpGlobals:
        values = self.carp_sysctls()
        try:
            return CarpGlobals(
                demotion=int(values["net.inet.carp.demotion"]),
                allow=values["net.inet.carp.allow"] == "1",
                preempt=values["net.inet.carp.preempt"] == "1",
            )
        except (KeyError, ValueError) as exc:
            raise FailoverError(
                f"`sysctl net.inet.carp` gave no usable {exc} (is carp(4) loaded? `kldload carp`)"
            ) from None

    def boot_id(self) -> str:
        """Identifies this kernel boot (kern.boottime), so callers can tell the counter was reset."""
        result = self._run(["sysctl", "-n", "kern.boottime"], check=False)
        return parse_boottime(result.stdout) if result.ok else ""

    def pfsync_info(self) -> PfsyncInfo:
        result = self._run(["ifconfig", PFSYNC_IF], check=False)
        if not result.ok:
            return PfsyncInfo(
                PfsyncState(enabled=False, syncdev=None, syncpeer=None, version=None, defer=None,
                            syncok=None, detail=f"{PFSYNC_IF} does not exist (pfsync(4) not loaded?)"),
                up=False, mtu=None,
            )
        return parse_pfsync(result.stdout)

    def pfsync_state(self) -> PfsyncState:
        return self.pfsync_info().state

    # --- writing ---

    def add_demotion(self, delta: int) -> None:
        """Add `delta` to net.inet.carp.demotion (the kernel adds; it never sets)."""
        if delta == 0:
            return
        log.info("adding %+d to net.inet.carp.demotion", delta)
        self._sysctl_write("net.inet.carp.demotion", int(delta))

    def set_allow(self, allow: bool) -> None:
        self._sysctl_write("net.inet.carp.allow", 1 if allow else 0)

    def set_preempt(self, preempt: bool) -> None:
        self._sysctl_write("net.inet.carp.preempt", 1 if preempt else 0)

    def pfsync_differs(self, desired: PfsyncConfig, info: PfsyncInfo | None = None) -> list[str]:
        """What differs between `desired` and what `ifconfig pfsync0` shows ([] = nothing).

        A version or defer flag the running ifconfig does not report (older FreeBSD) is not
        counted as a difference: it could never match, and re-applying would demote the node on
        every call.
        """
        info = info or self.pfsync_info()
        state = info.state
        if desired.syncdev is None:
            return ["enabled"] if (state.syncdev is not None or info.up) else []
        wanted_peer = _normal_peer(desired.syncpeer)
        diffs: list[str] = []
        if state.syncdev != desired.syncdev:
            diffs.append(f"syncdev {state.syncdev or '-'} -> {desired.syncdev}")
        if _normal_peer(state.syncpeer) != wanted_peer:
            diffs.append(f"syncpeer {state.syncpeer or '-'} -> {wanted_peer or '-'}")
        if state.version is not None and state.version != str(desired.version):
            diffs.append(f"version {state.version} -> {desired.version}")
        if state.defer is not None and state.defer != desired.defer:
            diffs.append(f"defer {state.defer} -> {desired.defer}")
        if not info.up:
            diffs.append(f"{PFSYNC_IF} down -> up")
        return diffs

    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        """Bring pfsync0 to `desired` with reference §8's command, only when something differs.

        Setting syncdev starts a bulk update that demotes CARP by 240 until it completes, so an
        unchanged configuration must never be re-applied (OPNsense #10858). The MTU follows the
        syncdev's; changing only the MTU does not start a bulk update.
        """
        info = self.pfsync_info()
        diffs = self.pfsync_differs(desired, info)
        changed = False
        if desired.syncdev is None:
            if diffs:
                log.info("disabling pfsync")
                self._run(["ifconfig", PFSYNC_IF, "-syncdev", "-syncpeer", "down"])
                changed = True
            return changed
        device = _checked_device(desired.syncdev)
        peer = _normal_peer(desired.syncpeer)
        version = str(desired.version)
        if not version.isdigit():
            raise FailoverError(f"pfsync version {version!r} is not a number (hasync.pfsyncversion: 1301 or 1400)")
        if diffs:
            argv = ["ifconfig", PFSYNC_IF, "syncdev", device]
            argv += ["syncpeer", peer] if peer else ["-syncpeer"]
            argv += ["version", version, "defer" if desired.defer else "-defer", "up"]
            log.info("configuring pfsync (%s)", "; ".join(diffs))
            self._run(argv)
            changed = True
        syncdev_info = self.ifconfig(device).get(device)
        if syncdev_info is None or syncdev_info.mtu is None:
            raise FailoverError(f"cannot read the MTU of pfsync's syncdev {device} from `ifconfig {device}`")
        current_mtu = info.mtu if not changed else self.pfsync_info().mtu
        if current_mtu != syncdev_info.mtu:
            self._run(["ifconfig", PFSYNC_IF, "mtu", str(syncdev_info.mtu)])
            changed = True
        return changed

    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        """Remove `removed` VIP addresses, then (re)configure the vhids and addresses of `vips`.

        Every spec is validated before the first command; VIPs on a device the OS does not have
        are skipped with a warning rather than failing the others half-way.

        FreeBSD's ifconfig only takes the CARP password on argv (`pass <p>`); there is no stdin
        or file form, so OPNsense passes it the same way and it is briefly visible in the process
        table to local users. That is unavoidable here. What we control: the password never
        appears in our logs, error messages or JSON (see `redact_argv`).
        """
        for spec in [*removed, *vips]:
            _validate_spec(spec)
        current = self.ifconfig()
        for spec in removed:
            if _has_address(current.get(spec.device), spec.subnet, None):
                family = "inet6" if _is_v6(spec.subnet) else "inet"
                log.info("removing VIP %s from %s", spec.subnet, spec.device)
                self._run(["ifconfig", spec.device, family, spec.subnet, "-alias"])
        groups: dict[tuple[str, int], list[VipSpec]] = {}
        missing = sorted({spec.device for spec in vips if spec.device not in current})
        if missing:
            # checked up front so one bad interface never leaves the others half configured
            log.warning("skipping VIPs on %s: no such device (check interfaces.<key>.if)", ", ".join(missing))
        for spec in vips:
            if spec.device in missing:
                continue
            groups.setdefault((spec.device, spec.vhid), []).append(spec)
        for (device, vhid), specs in groups.items():
            carp = vhid_owner(specs)
            argv = ["ifconfig", device, "vhid", str(vhid), "advskew", str(carp.advskew),
                    "advbase", str(carp.advbase)]
            if carp.password:
                argv += ["pass", carp.password]
            log.info("configuring vhid %d on %s: %s", vhid, device, " ".join(redact_argv(argv[2:])))
            self._run(argv)
            self._run(["ifconfig", device, "vhid", str(vhid)]
                      + (["peer", carp.peer] if carp.peer else ["mcast"]))
            for spec in specs:
                if _has_address(current.get(device), spec.subnet, vhid):
                    continue
                if _is_v6(spec.subnet):
                    argv = ["ifconfig", device, "inet6", spec.subnet, "prefixlen", str(spec.subnet_bits),
                            "alias", "vhid", str(vhid)]
                else:
                    argv = ["ifconfig", device, f"{spec.subnet}/{spec.subnet_bits}", "alias", "vhid", str(vhid)]
                log.info("adding VIP %s/%d to %s vhid %d", spec.subnet, spec.subnet_bits, device, vhid)
                self._run(argv)


# --- helpers ------------------------------------------------------------------------------------


def _checked_device(device: str) -> str:
    if not _DEVICE_RE.match(device or ""):
        raise FailoverError(f"{device!r} is not a valid interface device name (check interfaces.<key>.if)")
    return device


def _normal_peer(peer: str | None) -> str | None:
    if not peer:
        return None
    try:
        address = ipaddress.IPv4Address(peer.strip())
    except ValueError:
        raise FailoverError(f"pfsync peer {peer!r} is not an IPv4 address (hasync.pfsyncpeerip)") from None
    return None if str(address) == PFSYNC_GROUP else str(address)


def _is_v6(address: str) -> bool:
    return ":" in address


def _same_address(left: str, right: str) -> bool:
    try:
        return ipaddress.ip_address(left) == ipaddress.ip_address(right)
    except ValueError:
        return False


def _has_address(info: IfInfo | None, address: str, vhid: int | None) -> bool:
    if info is None:
        return False
    return any(
        _same_address(item.address, address) and (vhid is None or item.vhid == vhid)
        for item in info.addresses
    )


def _validate_spec(spec: VipSpec) -> None:
    """Refuse anything that is not a well-formed CARP VIP before any ifconfig runs (never half)."""
    _checked_device(spec.device)
    where = check_vip_spec(spec)
    if spec.peer:
        try:
            ipaddress.IPv4Address(spec.peer)
        except ValueError:
            raise FailoverError(f"{where}: peer {spec.peer!r} is not an IPv4 address") from None
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in spec.password):
        raise FailoverError(f"{where}: the password contains control characters")
