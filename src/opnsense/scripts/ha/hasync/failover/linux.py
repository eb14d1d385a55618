"""Linux failover: keepalived (VRRPv3) + conntrackd (FTFW) + an nftables commit gate.

What is rendered (keepalived.conf, conntrackd.conf, notify.sh, the gate) and why is in
`linux_render`; the readers of daemon output are in `linux_parse`. This module runs it.

The race. keepalived adds the VIPs and sends gratuitous ARPs *before* its notify script runs, and
does not wait for it. Until ``conntrackd -c`` has committed the synced states, a packet of a
synced connection that reaches the new master finds no conntrack entry: a lenient ruleset lets
the local stack answer it with a RST (the server's segments are addressed to the SNAT VIP, which
is now local), or the packet creates a fresh conntrack entry that the commit then has to fight.
The gate is a prerouting chain at priority -150 (after conntrack lookup at -200, before NAT and
the filter): while closed it drops, on the VIP interfaces, every packet that is not part of a
connection the kernel already tracks, except VRRP and traffic to the node's own (non-VIP)
addresses. Dropped before NAT and before conntrack confirmation, such a packet leaves no state
behind and provokes no answer; TCP simply retransmits. The notify script opens the gate only
after ``conntrackd -c`` has returned (the client waits until the daemon closed the commit), and
closes it again on any transition away from MASTER. Established flows are let through a closed
gate on purpose: a demoted master keeps forwarding the connections it already tracks for the
clients whose ARP caches still point at it (the drain), so a planned handover loses nothing.

The demotion counter ("our sysctl") lives in a file that only ever gets deltas added, exactly as
FreeBSD's ``net.inet.carp.demotion``. keepalived tracks a second file holding the counter clamped
to +-253 (keepalived turns anything beyond -253 into FAULT; CARP just saturates the skew).
keepalived follows RFC 5798, where a backup ignores a lower-priority advertisement and waits the
full master-down interval (~3 s), whereas a CARP backup with preempt takes over at the first
worse advertisement. To keep CARP's "maintenance hands over in well under a second",
`add_demotion` makes a MASTER whose demotion reaches 240 (the skew at which CARP saturates, so any
healthy peer is better) resign: a one-shot FAULT through a weight-0 ``track_file``, which sends a
priority-0 advertisement; the peer takes over after its skew time (~0.4 s at priority 150).
One difference stays: a MASTER with no live peer that enters maintenance is without its VIPs for
about 3 x advbase until it takes them back, where CARP keeps them. VRRP backups are silent, so the
master cannot know whether anyone listens (conntrackd's heartbeat would tell, but only after a
second of sampling, too late for a sub-second handover).

Runtime files live in ``<conf dir>/linux-ha/`` (so several nodes share a machine in the lab):
the rendered configs, pid/lock/socket files, one state file per instance written by notify.sh,
the counter (reset to 0 when /proc/sys/kernel/random/boot_id changes, like the sysctl at boot)
and ``options.json`` (binaries, gate, log mode), which every process opening the node reads. A
node with a single vhid runs without a sync group (keepalived drops a group of one); its INSTANCE
event then does the GROUP work. CARP hooks start once the GROUP work is done, so their Python
start-up never competes with the commit.

All commands go through the `CommandRunner`; the renderers are pure functions.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.config.store import ConfigStore
from hasync.config.vips import VipSpec
from hasync.core.errors import ConfigError, FailoverError
from hasync.core.fileio import atomic_write, lock_file
from hasync.core.osiface import Clock, CommandResult, CommandRunner, SystemClock
from hasync.failover.base import CarpGlobals, FailoverBackend, PfsyncConfig, PfsyncState, VipState
from hasync.failover.linux_parse import carp_status, parse_conntrackd_links, parse_ip_json_addresses, parse_vrrp_state
from hasync.failover.linux_render import (
    RESIGN_DEMOTION,
    RUNTIME_FILE_MODE,
    LinuxOptions,
    LinuxPaths,
    SyncLink,
    VrrpInstance,
    build_instances,
    checked_device,
    clamp_track,
    render_conntrackd_conf,
    render_gate,
    render_keepalived_conf,
    render_notify_script,
    validate_vip,
)
from hasync.failover.model import carp_vips, pfsync_config, preempt_wanted

log = logging.getLogger(__name__)

# --- small file helpers ---------------------------------------------------------------------------


def _write(path: Path, text: str, mode: int = RUNTIME_FILE_MODE) -> None:
    atomic_write(path, text, mode=mode)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


# --- the backend ----------------------------------------------------------------------------------


class KeepalivedBackend(FailoverBackend):
    """`FailoverBackend` over keepalived + conntrackd + nftables, for one node's conf dir."""

    name = "keepalived"

    def __init__(
        self,
        conf_dir: str | os.PathLike[str],
        runner: CommandRunner,
        *,
        paths: LinuxPaths | None = None,
        options: LinuxOptions | None = None,
        clock: Clock | None = None,
        timeout: float = 30.0,
        kernel_boot_id: Path = Path("/proc/sys/kernel/random/boot_id"),
    ) -> None:
        self.conf_dir = Path(conf_dir)
        self.kernel_boot_id = kernel_boot_id
        self.runner = runner
        self.paths = paths or LinuxPaths.for_conf_dir(self.conf_dir)
        self.options = (options or LinuxOptions.load(self.paths.options_json)).resolved()
        self.clock: Clock = clock or SystemClock()
        self.timeout = timeout

    @classmethod
    def from_conf_dir(cls, conf_dir: str | os.PathLike[str], runner: CommandRunner) -> KeepalivedBackend:
        """The backend of the node whose config.xml lives in `conf_dir` (options as saved there)."""
        return cls(conf_dir, runner)

    # --- plumbing ---

    def _run(self, argv: Sequence[str], *, check: bool = True, timeout: float | None = None,
             input_text: str | None = None) -> CommandResult:
        result = self.runner.run(list(argv), input_text=input_text, timeout=timeout or self.timeout)
        if check and not result.ok:
            detail = (result.stderr or result.stdout).strip().replace("\n", " ")[:400]
            raise FailoverError(f"`{' '.join(argv)}` failed (exit {result.returncode}): {detail or 'no output'}")
        return result

    def _prepare(self) -> None:
        try:
            self._prepare_files()
        except PermissionError as exc:
            raise FailoverError(f"{self.paths.run_dir}: {exc.strerror} (run as root)") from None

    def _prepare_files(self) -> None:
        self.paths.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.paths.run_dir, 0o755)  # keepalived's script security refuses writable dirs
        self.paths.state_dir.mkdir(exist_ok=True)
        with self._flock(self.paths.demotion.with_name("demotion.lock")):
            kernel = self._kernel_boot()
            parts = (_read(self.paths.epoch) or "").split()
            fresh = not parts or not self.paths.demotion.exists()
            rebooted = bool(kernel) and (len(parts) < 2 or parts[1] != kernel)
            if fresh or rebooted:
                # like the kernel's sysctl, the counter starts at 0 with every boot of the machine
                if rebooted and not fresh:
                    log.info("the machine rebooted since the demotion counter started; resetting it to 0")
                _write(self.paths.demotion, "0\n")
                _write(self.paths.track_file, "0\n")
                _write(self.paths.epoch, f"{uuid.uuid4().hex} {kernel}".strip() + "\n")
            if not self.paths.track_file.exists():
                _write(self.paths.track_file, f"{clamp_track(self.demotion())}\n")

    def _kernel_boot(self) -> str:
        try:
            return self.kernel_boot_id.read_text().strip()
        except OSError:
            return ""

    @contextlib.contextmanager
    def _flock(self, target: Path) -> Iterator[None]:
        """An exclusive flock on `target` with a bounded wait (a stuck holder is an error, not a hang)."""
        busy = FailoverError(f"{target} is held by another opnsense-ha process "
                             f"(waited {self.timeout:g}s); retry when it has finished")
        with lock_file(target, self.timeout, lambda: busy, clock=self.clock):
            yield

    @contextlib.contextmanager
    def _locked(self, path: Path | None = None) -> Iterator[None]:
        self._prepare()
        with self._flock(path or self.paths.lock):
            yield

    def _load_root(self) -> etree._Element:
        return ConfigStore(self.conf_dir).load()

    def _signal(self, pid: int, name: str, *, check: bool = True) -> CommandResult:
        """`kill -NAME pid` through the shell's builtin (the kill binary is procps', not always there)."""
        return self._run(["sh", "-c", f'kill -{name} "$1"', "kill", str(pid)], check=check)

    def _pid_alive(self, pidfile: Path, comm: str) -> int | None:
        text = _read(pidfile)
        if not text or not text.strip().isdigit():
            return None
        pid = text.strip()
        result = self._run(["cat", f"/proc/{pid}/comm"], check=False)
        return int(pid) if result.ok and result.stdout.strip() == comm else None

    # --- reading ---

    def applied_instances(self) -> list[VrrpInstance]:
        text = _read(self.paths.instances_json)
        if not text:
            return []
        try:
            data = json.loads(text)
            return [VrrpInstance.from_json(item) for item in data["instances"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise FailoverError(f"{self.paths.instances_json}: unreadable ({exc}); re-apply the VIPs") from None

    def keepalived_pid(self) -> int | None:
        return self._pid_alive(self.paths.keepalived_pid, "keepalived")

    def vrrp_states(self) -> dict[str, str | None]:
        """keepalived's own state per instance name (None = nothing recorded)."""
        return {inst.name: parse_vrrp_state(_read(self.paths.state_dir / inst.name) or "")
                for inst in self.applied_instances()}

    def vip_states(self) -> list[VipState]:
        allowed = self._allowed()
        instances = self.applied_instances()
        if not allowed and not instances:
            # `carp disable` took the VIPs down; like OPNsense, still list the configured ones
            try:
                instances = build_instances(carp_vips(self._load_root()))
            except (ConfigError, FailoverError):
                instances = []
        if not instances:
            return []
        running = self.keepalived_pid() is not None
        states = self.vrrp_states()
        rows: list[VipState] = []
        for inst in instances:
            if not allowed:
                status = "DISABLED"
            elif not running:
                status = "INIT"
            else:
                status = carp_status(states.get(inst.name))
            for address in inst.addresses:
                rows.append(VipState(interface=inst.interface, device=inst.device, vhid=inst.vhid,
                                     advbase=inst.advbase, advskew=inst.advskew, subnet=address, status=status))
        return rows

    def _allowed(self) -> bool:
        return (_read(self.paths.allow) or "1").strip() != "0"

    def _preempt(self) -> bool | None:
        text = _read(self.paths.preempt)
        return None if text is None else text.strip() == "1"

    def _effective_preempt(self) -> tuple[bool, bool]:
        """(preempt, whether it came from config.xml because `set_preempt` never ran)."""
        preempt = self._preempt()
        if preempt is not None:
            return preempt, False
        try:
            return preempt_wanted(self._load_root()), True
        except ConfigError:
            return True, True

    def demotion(self) -> int:
        text = (_read(self.paths.demotion) or "0").strip()
        try:
            return int(text)
        except ValueError:
            raise FailoverError(f"{self.paths.demotion}: {text!r} is not a number") from None

    def carp_globals(self) -> CarpGlobals:
        self._prepare()  # a reboot since the last write resets the counter first
        preempt, _ = self._effective_preempt()
        return CarpGlobals(demotion=self.demotion(), allow=self._allowed(), preempt=preempt)

    def boot_id(self) -> str:
        """Changes whenever the demotion counter starts afresh: a reboot, or a new run dir."""
        self._prepare()
        parts = (_read(self.paths.epoch) or "").split()
        return parts[0] if parts else ""

    def _applied_pfsync(self) -> dict[str, Any] | None:
        text = _read(self.paths.pfsync_json)
        if not text:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def conntrackd_running(self) -> bool:
        if not self.paths.conntrackd_conf.exists():
            return False
        return self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-s", "link"],
                         check=False, timeout=5).ok

    def pfsync_state(self) -> PfsyncState:
        applied = self._applied_pfsync()
        if not applied:
            return PfsyncState(enabled=False, syncdev=None, syncpeer=None, version=None, defer=None,
                               syncok=None, running=False,
                               detail="state sync off (hasync.pfsyncinterface is empty)")
        result = self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-s", "link"],
                           check=False, timeout=5)
        device = applied.get("syncdev")
        peer = applied.get("syncpeer") or None
        if not result.ok:
            return PfsyncState(enabled=True, syncdev=device, syncpeer=peer, version=None, defer=None,
                               syncok=False, running=False,
                               detail=f"conntrackd is not running ({(result.stderr or result.stdout).strip()[:200]})")
        links = parse_conntrackd_links(result.stdout)
        status = links.get(str(device), "missing")
        return PfsyncState(enabled=True, syncdev=device, syncpeer=peer, version=None, defer=None,
                           syncok=status == "RUNNING", running=True,
                           detail=f"conntrackd FTFW over {device} ({'unicast ' + peer if peer else 'multicast'}), "
                                  f"link {status}")

    # --- writing: demotion, allow, preempt ---

    def add_demotion(self, delta: int) -> None:
        """Add `delta` to the counter (never set it); resign mastership when it reaches 240."""
        if delta == 0:
            return
        with self._locked(self.paths.demotion.with_name("demotion.lock")):
            before = self.demotion()
            after = before + int(delta)
            _write(self.paths.demotion, f"{after}\n")
            _write(self.paths.track_file, f"{clamp_track(after)}\n")
            log.info("demotion %d %+d = %d", before, delta, after)
        if before < RESIGN_DEMOTION <= after:
            self.resign()

    def resign(self, timeout: float = 2.0) -> bool:
        """Make a MASTER hand over now (CARP's immediate preemption at a worse advertisement).

        A weight-0 track file set to 1 faults every instance: keepalived sends a priority-0
        advertisement and removes the VIPs, and the peer becomes master after its skew time. We
        clear the fault as soon as keepalived has left MASTER, so the node is an ordinary BACKUP
        again and still takes over if the peer is gone. True if it was MASTER.
        """
        if self.keepalived_pid() is None:
            return False
        if not any(state == "MASTER" for state in self.vrrp_states().values()):
            return False
        log.info("resigning VRRP mastership (demotion reached %d)", RESIGN_DEMOTION)
        _write(self.paths.resign_file, "1\n")
        try:
            deadline = self.clock.monotonic() + timeout
            while self.clock.monotonic() < deadline:
                if not any(state == "MASTER" for state in self.vrrp_states().values()):
                    break
                self.clock.sleep(0.01)
        finally:
            _write(self.paths.resign_file, "0\n")
        return True

    def set_allow(self, allow: bool) -> None:
        """CARP allow=0: keepalived stops (VIPs removed, priority 0 sent); allow=1 starts it again."""
        with self._locked():
            _write(self.paths.allow, "1\n" if allow else "0\n")
            if not allow:
                self._stop_keepalived()
            elif self.applied_instances():
                self._ensure_keepalived()

    def set_preempt(self, preempt: bool) -> None:
        with self._locked():
            _write(self.paths.preempt, "1\n" if preempt else "0\n")
            self._render_vrrp(self.applied_instances())

    # --- writing: VIPs ---

    def configure_vips(self, vips: list[VipSpec], removed: list[VipSpec]) -> None:
        """VIPs now = config.xml's CARP VIPs, minus `removed`, with `vips` added or replacing.

        keepalived takes the whole instance list at once, so this re-renders everything; a
        SIGHUP reload keeps the states of unchanged instances.
        """
        for spec in [*vips, *removed]:
            validate_vip(spec)
        try:
            current = carp_vips(self._load_root())
        except ConfigError:
            current = []

        def key(spec: VipSpec) -> tuple[str, int, str]:
            return (spec.device, spec.vhid, str(ipaddress.ip_address(spec.subnet)))

        gone = {key(spec) for spec in removed}
        merged: dict[tuple[str, int, str], VipSpec] = {key(s): s for s in current if key(s) not in gone}
        for spec in vips:
            merged[key(spec)] = spec
        instances = build_instances(list(merged.values()))
        with self._locked():
            self._render_vrrp(instances)

    def _render_vrrp(self, instances: list[VrrpInstance]) -> bool:
        """Write keepalived.conf, notify.sh and the gate for `instances`; reload or start keepalived."""
        self._prepare()
        preempt, from_config = self._effective_preempt()
        if from_config:
            _write(self.paths.preempt, "1\n" if preempt else "0\n")
        conf = render_keepalived_conf(instances, self.paths, preempt=preempt, router_id=self.options.router_id)
        self._write_notify(instances)
        self._apply_gate(instances)
        _write(self.paths.instances_json,
                      json.dumps({"instances": [asdict(i) for i in instances]}, indent=1) + "\n")
        old = _read(self.paths.keepalived_conf)
        changed = old != conf
        if changed:
            _write(self.paths.keepalived_conf, conf)
        pid = self.keepalived_pid()
        if not instances:
            if pid is not None:
                self._stop_keepalived()
            return changed
        if not self._allowed():
            return changed
        if pid is None:
            self._ensure_keepalived()
        elif changed:
            self._check_keepalived_conf()
            log.info("reloading keepalived (configuration changed)")
            self._signal(pid, "HUP")
        return changed

    def _write_notify(self, instances: Sequence[VrrpInstance]) -> None:
        package_parent = str(Path(__file__).resolve().parents[2])
        options = self.options
        if options.hooks and importlib.util.find_spec("hasync.failover.hooks") is None:
            options = LinuxOptions(**{**asdict(options), "hooks": False})
        script = render_notify_script(instances, self.paths, options, conf_dir=str(self.conf_dir),
                                      sync=self._applied_pfsync() is not None, pythonpath=package_parent)
        if _read(self.paths.notify_script) != script:
            _write(self.paths.notify_script, script, mode=0o755)

    def _apply_gate(self, instances: Sequence[VrrpInstance]) -> None:
        """Re-create the gate, open only on a committed MASTER. Under notify.sh's lock, so a
        transition cannot open the old table while we replace it with a closed one."""
        with self._flock(self.paths.run_dir / "notify.lock"):
            if not self.options.gate:
                rules = render_gate([], open_=False)
            else:
                is_master = (_read(self.paths.group_state) or "").strip() == "MASTER"
                rules = render_gate(instances, open_=is_master and self.keepalived_pid() is not None)
            _write(self.paths.gate_rules, rules)
            self._run([self.options.nft, "-f", str(self.paths.gate_rules)])

    def _check_keepalived_conf(self) -> None:
        result = self._run([self.options.keepalived, "-t", "-f", str(self.paths.keepalived_conf)], check=False)
        if not result.ok:
            detail = (result.stderr or result.stdout).strip().replace("\n", "; ")[:600]
            raise FailoverError(f"keepalived rejects {self.paths.keepalived_conf}: {detail}")

    def _ensure_keepalived(self) -> None:
        if self.keepalived_pid() is not None:
            return
        if not self.paths.keepalived_conf.exists():
            raise FailoverError("no keepalived.conf rendered yet; configure the VIPs first")
        self._check_keepalived_conf()
        for stale in [*self.paths.state_dir.iterdir(), self.paths.group_state,
                      self.paths.run_dir / "group.wanted"]:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # left by an earlier run: keepalived reports afresh
        _write(self.paths.resign_file, "0\n")
        argv = [self.options.keepalived, "-P", "-D", "-f", str(self.paths.keepalived_conf),
                "-p", str(self.paths.keepalived_pid), "-r", str(self.paths.vrrp_pid)]
        if self.options.foreground_logs:
            argv = ["sh", "-c", 'exec setsid "$@" -n -l -G </dev/null >>"$0" 2>&1 &',
                    str(self.paths.keepalived_log), *argv]
        log.info("starting keepalived")
        self._run(argv)
        deadline = self.clock.monotonic() + 5.0
        while self.keepalived_pid() is None:
            if self.clock.monotonic() >= deadline:
                raise FailoverError(f"keepalived did not start (see {self.paths.keepalived_log} or syslog)")
            self.clock.sleep(0.05)

    def _stop_keepalived(self) -> None:
        pid = self.keepalived_pid()
        if pid is None:
            return
        log.info("stopping keepalived (pid %d)", pid)
        self._signal(pid, "TERM", check=False)
        deadline = self.clock.monotonic() + 5.0
        while self.keepalived_pid() is not None:
            if self.clock.monotonic() >= deadline:
                self._signal(pid, "KILL", check=False)
                break
            self.clock.sleep(0.05)

    # --- writing: state sync ---

    def _addresses(self, device: str | None = None) -> dict[str, list[tuple[str, int]]]:
        argv = ["ip", "-j", "addr", "show"] + (["dev", device] if device else [])
        return parse_ip_json_addresses(self._run(argv).stdout)

    def _sync_link(self, desired: PfsyncConfig) -> SyncLink:
        device = checked_device(str(desired.syncdev), "pfsync (state sync)")
        peer: str | None = None
        if desired.syncpeer:
            try:
                peer = str(ipaddress.IPv4Address(desired.syncpeer.strip()))
            except ValueError:
                raise FailoverError(f"pfsync peer {desired.syncpeer!r} is not an IPv4 address "
                                    "(hasync.pfsyncpeerip)") from None
        ipv4 = [a for a, _ in self._addresses(device).get(device, []) if ipaddress.ip_address(a).version == 4]
        if not ipv4:
            raise FailoverError(f"state sync device {device} has no IPv4 address; conntrackd needs one "
                                "to send from (configure the pfsync interface's address)")
        return SyncLink(device=device, local=ipv4[0], peer=peer)

    def apply_pfsync(self, desired: PfsyncConfig) -> bool:
        """Bring conntrackd to `desired`; only touches it when something differs.

        Restarting conntrackd empties its external cache (the peer's states), so, like pfsync's
        #10858, re-applying an unchanged configuration must do nothing. Compared are the settings
        (device, peer, our address), not the rendered text. `version` and `defer` have no
        conntrackd equivalent and are ignored.
        """
        with self._locked():
            applied = self._applied_pfsync()
            if desired.syncdev is None:
                if applied is None and not self.conntrackd_running():
                    return False
                self._stop_conntrackd()
                with contextlib.suppress(FileNotFoundError):
                    self.paths.pfsync_json.unlink()
                self._write_notify(self.applied_instances())
                log.info("state sync (conntrackd) off")
                return True
            link = self._sync_link(desired)
            wanted = {"syncdev": link.device, "syncpeer": link.peer or "", "local": link.local}
            running = self.conntrackd_running()
            if applied == wanted and running:
                return False
            own = [address for entries in self._addresses().values() for address, _ in entries]
            vips = [a.split("/")[0] for inst in self.applied_instances() for a in inst.addresses]
            conf = render_conntrackd_conf(link, self.paths, ignore=[*own, *vips],
                                          purge_timeout=self.options.purge_timeout)
            self._stop_conntrackd()
            _write(self.paths.conntrackd_conf, conf)
            self._start_conntrackd()
            _write(self.paths.pfsync_json, json.dumps(wanted, sort_keys=True) + "\n")
            self._write_notify(self.applied_instances())
            if (_read(self.paths.group_state) or "").strip() == "MASTER":
                self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-B"], check=False)
            log.info("state sync (conntrackd) on over %s%s", link.device,
                     f" to {link.peer}" if link.peer else " (multicast)")
            return True

    def _start_conntrackd(self) -> None:
        for stale in (self.paths.conntrackd_lock, self.paths.conntrackd_sock):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()  # only reached when no daemon answers on the socket
        self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-d"])
        deadline = self.clock.monotonic() + 5.0
        while not self.conntrackd_running():
            if self.clock.monotonic() >= deadline:
                raise FailoverError(f"conntrackd did not start (see {self.paths.conntrackd_log})")
            self.clock.sleep(0.05)

    def _stop_conntrackd(self) -> None:
        if not self.conntrackd_running():
            return
        self._run([self.options.conntrackd, "-C", str(self.paths.conntrackd_conf), "-k"], check=False)
        deadline = self.clock.monotonic() + 5.0
        while self.conntrackd_running() and self.clock.monotonic() < deadline:
            self.clock.sleep(0.05)

    # --- whole-node lifecycle (boot / lab) ---

    def start(self) -> None:
        """Bring the node up from config.xml: state sync, VIPs, gate, keepalived."""
        self._prepare()
        if not self.paths.options_json.exists():
            self.options.save(self.paths.options_json)
        root = self._load_root()
        if self._preempt() is None:
            _write(self.paths.preempt, "1\n" if preempt_wanted(root) else "0\n")
        instances = build_instances(carp_vips(root))
        with self._locked():
            _write(self.paths.instances_json,
                          json.dumps({"instances": [asdict(i) for i in instances]}, indent=1) + "\n")
        self.apply_pfsync(pfsync_config(root))
        with self._locked():
            self._render_vrrp(instances)

    def stop(self) -> None:
        """Stop keepalived and conntrackd and remove the gate (VIPs go with keepalived)."""
        with self._locked():
            self._stop_keepalived()
            self._stop_conntrackd()
            _write(self.paths.gate_rules, render_gate([], open_=False))
            self._run([self.options.nft, "-f", str(self.paths.gate_rules)], check=False)

    def events(self) -> list[tuple[float, str]]:
        """notify.sh's transition log: (unix time, message)."""
        rows: list[tuple[float, str]] = []
        for line in (_read(self.paths.events) or "").splitlines():
            stamp, _, message = line.partition(" ")
            with contextlib.suppress(ValueError):
                rows.append((float(stamp), message))
        return rows
