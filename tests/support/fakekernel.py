"""A fake FreeBSD kernel behind `ifconfig` and `sysctl`, implementing `CommandRunner`.

It keeps the semantics that matter for failover control, taken from FreeBSD's `ip_carp.c` and
`if_pfsync.c`, and renders its state in FreeBSD 14's exact output formats (the same formats as
`fixtures/freebsd/`):

* `sysctl net.inet.carp.demotion=N` ADDS N (it never sets); the counter may go negative.
* A vhid's advertised skew is `advskew + demotion`, clamped to 0..240 (`DEMOTE_ADVSKEW`).
* A link going down demotes by `ifdown_demotion_factor` (240) per vhid on it; up undoes it.
* `ifconfig pfsync0 syncdev X ...` starts a bulk update: if syncok was 1, demotion += 240 and
  syncok becomes 0, until `complete_bulk()` (the peer's bulk end) removes the 240 again.
* Adding an address with `vhid N` needs the vhid configured first (ENOENT otherwise); removing
  the last address of a vhid destroys it.
* `net.inet.carp.allow=0` puts every vhid into INIT.

Every command is recorded in `commands`; `on_sysctl_write` lets a test observe the world (e.g.
config.xml) at the exact moment a demotion write reaches the kernel.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from hasync.core.osiface import CommandResult

CARP_MAXSKEW = 240
PFSYNC_CARP_ADJ = 240
CARP_GROUP = "224.0.0.18"
CARP_GROUP6 = "ff02::12"


@dataclass
class FakeCarp:
    vhid: int
    advbase: int = 1
    advskew: int = 0
    state: str = "INIT"
    key: str = ""
    peer: str = CARP_GROUP
    peer6: str = CARP_GROUP6
    demoted: bool = False  # CARP_DEMOTED: this vhid's ifdown demotion is in the counter


@dataclass
class FakeAddr:
    family: str
    address: str
    prefixlen: int
    vhid: int | None = None


@dataclass
class FakeIf:
    name: str
    mtu: int = 1500
    descr: str = ""
    up: bool = True
    carrier: bool = True
    ether: str = "52:54:00:00:00:00"
    addrs: list[FakeAddr] = field(default_factory=list)
    carp: dict[int, FakeCarp] = field(default_factory=dict)


@dataclass
class FakePfsync:
    syncdev: str | None = None
    syncpeer: str | None = None
    maxupd: int = 128
    defer: bool = False
    version: int = 1400
    up: bool = False
    ok: bool = True  # PFSYNCF_OK: set at clone create
    mtu: int = 1500


def _ok(argv: Sequence[str], stdout: str = "") -> CommandResult:
    return CommandResult(tuple(argv), 0, stdout, "")


def _err(argv: Sequence[str], message: str, rc: int = 1) -> CommandResult:
    return CommandResult(tuple(argv), rc, "", message + "\n")


class FakeKernel:
    """CommandRunner answering `ifconfig` and `sysctl` from in-memory kernel state."""

    def __init__(self) -> None:
        self.interfaces: dict[str, FakeIf] = {}
        self.demotion = 0
        self.allow = 1
        self.preempt = 0
        self.log = 1
        self.dscp = 56
        self.ifdown_factor = 240
        self.senderr_factor = 240
        self.boottime = (1732572160, 416386)
        self.pfsync = FakePfsync()
        self.commands: list[tuple[str, ...]] = []
        self.on_sysctl_write: Callable[[str, int], None] | None = None
        self.fail_next: dict[tuple[str, ...], str] = {}  # argv prefix -> stderr of an injected failure

    # --- test helpers -------------------------------------------------------------------------

    def add_interface(self, name: str, *, mtu: int = 1500, descr: str = "", up: bool = True,
                      address: str | None = None) -> FakeIf:
        index = len(self.interfaces) + 1
        iface = FakeIf(name=name, mtu=mtu, descr=descr, up=up, ether=f"52:54:00:4e:a1:{index:02x}")
        if address:
            net = ipaddress.ip_interface(address)
            family = "inet6" if net.version == 6 else "inet"
            iface.addrs.append(FakeAddr(family, str(net.ip), net.network.prefixlen))
        self.interfaces[name] = iface
        return iface

    def add_vip(self, device: str, vhid: int, address: str, *, advbase: int = 1, advskew: int = 0,
                state: str = "BACKUP", key: str = "secret") -> None:
        iface = self.interfaces[device]
        carp = iface.carp.setdefault(vhid, FakeCarp(vhid=vhid, advbase=advbase, advskew=advskew, key=key))
        carp.state = state
        net = ipaddress.ip_interface(address)
        iface.addrs.append(FakeAddr("inet6" if net.version == 6 else "inet", str(net.ip),
                                    net.network.prefixlen, vhid))

    def advertised_skew(self, device: str, vhid: int) -> int:
        """What this node puts in its CARP advertisements (DEMOTE_ADVSKEW)."""
        skew = self.interfaces[device].carp[vhid].advskew + self.demotion
        return max(0, min(skew, CARP_MAXSKEW))

    def elect(self, peer_skew: dict[int, int]) -> None:
        """One election round against a peer advertising `peer_skew[vhid]` (absent = no peer)."""
        for iface in self.interfaces.values():
            for carp in iface.carp.values():
                if not self.allow or not (iface.up and iface.carrier):
                    carp.state = "INIT"
                    continue
                mine = self.advertised_skew(iface.name, carp.vhid)
                theirs = peer_skew.get(carp.vhid)
                if theirs is None or (mine < theirs and (self.preempt or carp.state == "MASTER")):
                    carp.state = "MASTER"
                elif (theirs is not None and mine > theirs) or carp.state == "INIT":
                    carp.state = "BACKUP"

    def set_link(self, device: str, up: bool) -> None:
        """Carrier change: the kernel demotes by ifdown_demotion_factor per vhid while down."""
        iface = self.interfaces[device]
        iface.carrier = up
        for carp in iface.carp.values():
            if not up and not carp.demoted:
                carp.demoted = True
                self.demotion += self.ifdown_factor
                carp.state = "INIT"
            elif up and carp.demoted:
                carp.demoted = False
                self.demotion -= self.ifdown_factor
                carp.state = "BACKUP"

    def complete_bulk(self) -> None:
        """The peer's bulk update ended: syncok 1 and the bulk-start demotion is removed."""
        if not self.pfsync.ok:
            self.demotion -= PFSYNC_CARP_ADJ
        self.pfsync.ok = True

    def reboot(self) -> None:
        """A new kernel: counters back to defaults, CARP state INIT, pfsync unconfigured."""
        self.demotion = 0
        self.allow = 1
        self.preempt = 0
        self.boottime = (self.boottime[0] + 3600, (self.boottime[1] + 7919) % 1_000_000)
        self.pfsync = FakePfsync()
        for iface in self.interfaces.values():
            for carp in iface.carp.values():
                carp.state = "INIT"
                carp.demoted = False

    def writes(self) -> list[tuple[str, ...]]:
        """Recorded commands that change kernel state (reads filtered out)."""
        return [argv for argv in self.commands if _is_write(argv)]

    # --- CommandRunner ------------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0) -> CommandResult:
        argv = [str(a) for a in argv]
        self.commands.append(tuple(argv))
        for prefix, message in list(self.fail_next.items()):
            if tuple(argv[: len(prefix)]) == prefix:
                del self.fail_next[prefix]
                return _err(argv, message)
        if not argv:
            return _err(argv, "empty command", 127)
        if argv[0] == "sysctl":
            return self._sysctl(argv)
        if argv[0] == "ifconfig":
            return self._ifconfig(argv)
        return _err(argv, f"{argv[0]}: not found", 127)

    # --- sysctl -------------------------------------------------------------------------------

    def _carp_values(self) -> list[tuple[str, int]]:
        # kernel registration order, printed as FreeBSD 14's `sysctl net.inet.carp` does
        return [
            ("net.inet.carp.ifdown_demotion_factor", self.ifdown_factor),
            ("net.inet.carp.senderr_demotion_factor", self.senderr_factor),
            ("net.inet.carp.demotion", self.demotion),
            ("net.inet.carp.log", self.log),
            ("net.inet.carp.preempt", self.preempt),
            ("net.inet.carp.dscp", self.dscp),
            ("net.inet.carp.allow", self.allow),
        ]

    def _sysctl(self, argv: list[str]) -> CommandResult:
        args = argv[1:]
        value_only = False
        if args and args[0] == "-n":
            value_only = True
            args = args[1:]
        if len(args) != 1:
            return _err(argv, "usage: sysctl [-n] name[=value]")
        name, sep, raw = args[0].partition("=")
        if name == "kern.boottime" and not sep:
            sec, usec = self.boottime
            text = f"{{ sec = {sec}, usec = {usec} }} Mon Nov 25 22:02:40 2024"
            return _ok(argv, text + "\n" if value_only else f"kern.boottime: {text}\n")
        values = dict(self._carp_values())
        if name == "net.inet.carp" and not sep:
            lines = [f"{value}" if value_only else f"{key}: {value}" for key, value in self._carp_values()]
            return _ok(argv, "\n".join(lines) + "\n")
        if name not in values:
            return _err(argv, f"sysctl: unknown oid '{name}'")
        if not sep:
            return _ok(argv, f"{values[name]}\n" if value_only else f"{name}: {values[name]}\n")
        try:
            number = int(raw, 10)
        except ValueError:
            return _err(argv, f"sysctl: invalid integer '{raw}'")
        old = values[name]
        if self.on_sysctl_write is not None:
            self.on_sysctl_write(name, number)
        if name == "net.inet.carp.demotion":
            self.demotion += number  # carp_demote_adj(): the kernel adds
        elif name == "net.inet.carp.allow":
            self.allow = 1 if number else 0
            if not self.allow:
                for iface in self.interfaces.values():
                    for carp in iface.carp.values():
                        carp.state = "INIT"
        elif name == "net.inet.carp.preempt":
            self.preempt = number
        elif name == "net.inet.carp.log":
            self.log = number
        elif name == "net.inet.carp.dscp":
            if not 0 <= number <= 63:
                return _err(argv, f"sysctl: {name}={raw}: Invalid argument")
            self.dscp = number
        elif name == "net.inet.carp.ifdown_demotion_factor":
            self.ifdown_factor = number
        else:
            self.senderr_factor = number
        new = dict(self._carp_values())[name]
        return _ok(argv, f"{old}\n" if value_only else f"{name}: {old} -> {new}\n")

    # --- ifconfig -----------------------------------------------------------------------------

    def _ifconfig(self, argv: list[str]) -> CommandResult:
        if len(argv) == 1:
            return _ok(argv, "".join(self._render(i) for i in self.interfaces.values()) + self._render_pfsync())
        name, rest = argv[1], argv[2:]
        if name == "pfsync0":
            return self._ifconfig_pfsync(argv, rest)
        iface = self.interfaces.get(name)
        if iface is None:
            return _err(argv, f"ifconfig: interface {name} does not exist")
        if not rest:
            return _ok(argv, self._render(iface))
        return self._ifconfig_set(argv, iface, rest)

    def _ifconfig_set(self, argv: list[str], iface: FakeIf, rest: list[str]) -> CommandResult:
        words = list(rest)
        family = None
        if words and words[0] in ("inet", "inet6"):
            family = words.pop(0)
        if words and words[0] in ("up", "down") and len(words) == 1:
            iface.up = words[0] == "up"
            return _ok(argv)
        address: str | None = None
        prefixlen: int | None = None
        if words and words[0] not in ("vhid",) and not words[0].startswith("-"):
            address = words.pop(0)
        remove = False
        opts: dict[str, str] = {}
        flags: set[str] = set()
        while words:
            word = words.pop(0)
            if word in ("alias", "add"):
                continue  # adding is the default for an address argument
            if word == "-alias":
                remove = True
            elif word in ("mcast", "mcast6"):
                flags.add(word)
            elif word in ("vhid", "advskew", "advbase", "pass", "peer", "peer6", "prefixlen", "state", "netmask"):
                if not words:
                    return _err(argv, f"ifconfig: '{word}' requires argument")
                opts[word] = words.pop(0)
            else:
                return _err(argv, f"ifconfig: {word}: bad value")
        vhid: int | None = None
        if "vhid" in opts:
            try:
                vhid = int(opts["vhid"])
            except ValueError:
                vhid = -1
            if not 0 < vhid <= 255:
                return _err(argv, "ifconfig: vhid must be greater than 0 and less than 255")
        for needs in ("advskew", "advbase", "pass", "state"):
            if needs in opts and vhid is None:
                return _err(argv, f"ifconfig: {needs} requires vhid")
        if address is not None:
            if "/" in address:
                address, _, plen = address.partition("/")
                prefixlen = int(plen)
            elif "prefixlen" in opts:
                prefixlen = int(opts["prefixlen"])
            try:
                parsed = ipaddress.ip_address(address)
            except ValueError:
                return _err(argv, f"ifconfig: {address}: bad value")
            family = family or ("inet6" if parsed.version == 6 else "inet")
            if remove:
                for item in iface.addrs:
                    if ipaddress.ip_address(item.address) == parsed:
                        iface.addrs.remove(item)
                        if item.vhid is not None and not any(a.vhid == item.vhid for a in iface.addrs):
                            iface.carp.pop(item.vhid, None)  # last address gone: vhid destroyed
                        return _ok(argv)
                return _err(argv, "ifconfig: ioctl (SIOCDIFADDR): Can't assign requested address")
            if vhid is not None and vhid not in iface.carp:
                return _err(argv, "ifconfig: ioctl (SIOCAIFADDR): No such file or directory")
            if prefixlen is None:
                prefixlen = 128 if parsed.version == 6 else 32
            iface.addrs = [a for a in iface.addrs if ipaddress.ip_address(a.address) != parsed]
            iface.addrs.append(FakeAddr(family, str(parsed), prefixlen, vhid))
            if vhid is not None:
                carp = iface.carp[vhid]
                if carp.state == "INIT" and iface.up and iface.carrier and self.allow:
                    carp.state = "BACKUP"
            return _ok(argv)
        if vhid is None:
            return _err(argv, "ifconfig: nothing to do")
        carp = iface.carp.setdefault(vhid, FakeCarp(vhid=vhid))
        if "advskew" in opts:
            skew = int(opts["advskew"])
            if not 0 <= skew <= 254:
                return _err(argv, "ifconfig: SIOCSVH: Invalid argument")
            carp.advskew = skew
        if "advbase" in opts:
            base = int(opts["advbase"])
            if not 1 <= base <= 255:
                return _err(argv, "ifconfig: SIOCSVH: Invalid argument")
            carp.advbase = base
        if "pass" in opts:
            carp.key = opts["pass"][:19]
        if "peer" in opts:
            carp.peer = opts["peer"]
        if "mcast" in flags:
            carp.peer = CARP_GROUP
        if "peer6" in opts:
            carp.peer6 = opts["peer6"]
        if "mcast6" in flags:
            carp.peer6 = CARP_GROUP6
        if "state" in opts:
            carp.state = opts["state"].upper()
        return _ok(argv)

    def _ifconfig_pfsync(self, argv: list[str], rest: list[str]) -> CommandResult:
        if not rest:
            return _ok(argv, self._render_pfsync())
        sync = self.pfsync
        words = list(rest)
        while words:
            word = words.pop(0)
            touches_sync = True
            if word in ("syncdev", "syncif"):
                if not words:
                    return _err(argv, f"ifconfig: '{word}' requires argument")
                device = words.pop(0)
                if device not in self.interfaces:
                    return _err(argv, "ifconfig: SIOCSETPFSYNCNV: Invalid argument")
                sync.syncdev = device
            elif word in ("-syncdev", "-syncif"):
                sync.syncdev = None
            elif word == "syncpeer":
                if not words:
                    return _err(argv, "ifconfig: 'syncpeer' requires argument")
                peer = words.pop(0)
                try:
                    ipaddress.IPv4Address(peer)
                except ValueError:
                    return _err(argv, f"ifconfig: error in parsing address string: {peer}")
                sync.syncpeer = None if peer == "224.0.0.240" else peer
            elif word == "-syncpeer":
                sync.syncpeer = None
            elif word == "maxupd":
                sync.maxupd = int(words.pop(0))
            elif word == "defer":
                sync.defer = True
            elif word == "-defer":
                sync.defer = False
            elif word == "version":
                value = int(words.pop(0))
                if value not in (1301, 1400):
                    return _err(argv, "ifconfig: SIOCSETPFSYNCNV: Invalid argument")
                sync.version = value
            elif word in ("up", "down"):
                sync.up = word == "up"
                touches_sync = False
            elif word == "mtu":
                sync.mtu = int(words.pop(0))
                touches_sync = False
            else:
                return _err(argv, f"ifconfig: {word}: bad value")
            if touches_sync and sync.syncdev is not None and sync.ok:
                # pfsync_kstatus_to_softc(): "pfsync bulk start" demotes once until bulk end
                sync.ok = False
                self.demotion += PFSYNC_CARP_ADJ
        return _ok(argv)

    # --- rendering (FreeBSD 14 formats) -------------------------------------------------------

    def _render(self, iface: FakeIf) -> str:
        running = iface.up and iface.carrier
        if iface.up:
            head = "1008843<UP,BROADCAST,RUNNING,SIMPLEX,MULTICAST,LOWER_UP>" if running else \
                "1008803<UP,BROADCAST,SIMPLEX,MULTICAST,LOWER_UP>"
        else:
            head = "1008802<BROADCAST,SIMPLEX,MULTICAST,LOWER_UP>"
        out = [f"{iface.name}: flags={head} metric 0 mtu {iface.mtu}"]
        if iface.descr:
            out.append(f"\tdescription: {iface.descr}")
        out.append("\toptions=800a8<VLAN_MTU,JUMBO_MTU,VLAN_HWCSUM,LINKSTATE>")
        out.append(f"\tether {iface.ether}")
        for addr in [a for a in iface.addrs if a.family == "inet"]:
            net = ipaddress.IPv4Network(f"{addr.address}/{addr.prefixlen}", strict=False)
            mask = f"0x{int(net.netmask):08x}"
            broadcast = addr.address if addr.prefixlen == 32 else str(net.broadcast_address)
            line = f"\tinet {addr.address} netmask {mask} broadcast {broadcast}"
            out.append(line + (f" vhid {addr.vhid}" if addr.vhid is not None else ""))
        for addr in [a for a in iface.addrs if a.family == "inet6"]:
            line = f"\tinet6 {addr.address} prefixlen {addr.prefixlen}"
            out.append(line + (f" vhid {addr.vhid}" if addr.vhid is not None else ""))
        for carp in iface.carp.values():
            out.append(f"\tcarp: {carp.state} vhid {carp.vhid} advbase {carp.advbase} advskew {carp.advskew}")
            out.append(f"\t      peer {carp.peer} peer6 {carp.peer6}")
        out.append("\tmedia: Ethernet autoselect (10Gbase-T <full-duplex>)" if iface.carrier
                   else "\tmedia: Ethernet autoselect")
        out.append("\tstatus: active" if iface.carrier else "\tstatus: no carrier")
        out.append("\tnd6 options=21<PERFORMNUD,AUTO_LINKLOCAL>")
        return "\n".join(out) + "\n"

    def _render_pfsync(self) -> str:
        sync = self.pfsync
        head = "flags=1000041<UP,RUNNING,LOWER_UP>" if sync.up else "flags=0<>"
        settings = ""
        if sync.syncdev:
            settings += f"syncdev: {sync.syncdev} "
        if sync.syncpeer:
            settings += f"syncpeer: {sync.syncpeer} "
        settings += f"maxupd: {sync.maxupd} defer: {'on' if sync.defer else 'off'} version: {sync.version}"
        return (f"pfsync0: {head} metric 0 mtu {sync.mtu}\n\t{settings}\n"
                f"\tsyncok: {1 if sync.ok else 0}\n\tgroups: pfsync\n")


def _is_write(argv: tuple[str, ...]) -> bool:
    if not argv:
        return False
    if argv[0] == "sysctl":
        return any("=" in a for a in argv[1:])
    if argv[0] == "ifconfig":
        return len(argv) > 2
    return True


def bare_backup_kernel() -> FakeKernel:
    """The backup before its first sync: interfaces and pfsync, no CARP vhid yet."""
    kernel = FakeKernel()
    kernel.add_interface("eth0", address="198.51.100.3/24")
    kernel.add_interface("eth1", address="10.77.1.3/24")
    kernel.add_interface("eth2", address="10.77.3.2/30")
    kernel.run(["ifconfig", "pfsync0", "syncdev", "eth2", "syncpeer", "10.77.3.1", "version", "1400", "-defer", "up"])
    kernel.complete_bulk()
    return kernel


def vhids(kernel: FakeKernel) -> dict[str, list[int]]:
    return {name: sorted(iface.carp) for name, iface in kernel.interfaces.items() if iface.carp}
