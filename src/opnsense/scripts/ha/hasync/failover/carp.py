"""CARP operations over any failover backend: status, maintenance mode, disable/enable, preempt,
pfsync, and the boot-time re-apply. Replies use OPNsense's JSON shapes.

What this module fixes compared with OPNsense (reference §7, issues #10901, #1100, #10858):

* **Persist first.** `maintenance_enter` writes `<virtualip_carp_maintenancemode>1</…>` to
  config.xml (in a `ConfigStore.transaction`) *before* it adds anything to the demotion counter.
  A failure after the write leaves a node that is in maintenance on paper and gets demoted at the
  next `boot`/`enter`; never a demotion nobody knows about.
* **Our share only.** The kernel counter is shared (interface down, pfsync bulk sync, service
  checks, other tools). We record what *we* added in a small state file next to config.xml
  (`hasync-carp.json`: amount + the kernel boot it was added in) and `maintenance_leave`
  subtracts exactly that, never resetting the counter.
* **Exact across reboots.** A reboot resets the kernel counter; the boot id (FreeBSD
  `kern.boottime`, Linux `boot_id`) tells us our recorded share is gone, so `boot()` re-applies
  +240 once, and a second `boot` or `enter` adds nothing.
* **When in doubt, stay demoted.** Where a crash between the kernel write and the state-file
  write could leave the two disagreeing, the order is chosen so the error is a leftover demotion
  (visible: `status` reports it as "external", `check` warns) rather than subtracting someone
  else's demotion and making a broken node MASTER. A subtraction is also never larger than the
  counter, so it cannot go negative and cancel future demotions.

All operations run under one lock file in the conf dir, so two concurrent invocations cannot
both add the +240.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.config.store import ConfigStore
from hasync.core.errors import FailoverError
from hasync.core.fileio import atomic_write, lock_file
from hasync.core.osiface import CommandRunner
from hasync.failover.base import FailoverBackend, PfsyncConfig, PfsyncState, VipState
from hasync.failover.factory import get_backend
from hasync.failover.model import MAINTENANCE_TAG, carp_vips, maintenance_mode, pfsync_config, preempt_wanted

log = logging.getLogger(__name__)

MAINTENANCE_DEMOTION = 240
SERVICE_CHECK_DEMOTION = 1 << 20  # what OPNsense's rc.carp_service_status.d checks add
STATE_FILE_MODE = 0o644  # no secret in it; `carp status` reads it as any user
STATE_FILE = "hasync-carp.json"
LOCK_FILE = "hasync-carp.lock"
USERNAME = "root@opnsense-ha"
LINUX_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")

STATUS_MSG_DEMOTED = (
    "CARP has detected a problem and this unit has been demoted to BACKUP status."
    "<br />Check link status on all interfaces with configured CARP VIPs."
)
STATUS_MSG_NO_CARP = "Could not locate any defined CARP interfaces."


class _Unchanged(Exception):
    """Raised inside a store transaction to leave config.xml untouched (nothing to write)."""


def default_boot_id(backend: FailoverBackend) -> str:
    """The current kernel boot's id: the backend's if it has one, else Linux's, else ""."""
    value = backend.boot_id()
    if value:
        return value
    try:
        return LINUX_BOOT_ID.read_text().strip()
    except OSError:
        return ""


class CarpOps:
    """The CARP/pfsync operations of one node (conf dir + failover backend)."""

    def __init__(
        self,
        store: ConfigStore,
        backend: FailoverBackend,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        boot_id: Callable[[], str] | None = None,
        lock_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.backend = backend
        state_root = Path(state_dir) if state_dir is not None else store.conf_dir
        self.state_path = state_root / STATE_FILE
        self.lock_path = state_root / LOCK_FILE
        self._boot_id = boot_id or (lambda: default_boot_id(backend))
        self.lock_timeout = lock_timeout

    # --- our share of the demotion counter ---------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize our operations (bounded wait: a stuck holder gives a clear error, not a hang)."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        busy = FailoverError(f"another opnsense-ha CARP operation holds {self.lock_path} "
                             f"(waited {self.lock_timeout:g}s); retry when it has finished")
        with lock_file(self.lock_path, self.lock_timeout, lambda: busy):
            yield

    def _read_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("%s is unreadable (%s); assuming no maintenance demotion of ours", self.state_path, exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write_state(self, demotion: int, boot_id: str) -> None:
        """Atomically record what we added (temp file, fsync, rename, fsync dir)."""
        payload = json.dumps({"version": 1, "maintenance_demotion": demotion, "boot_id": boot_id,
                              "updated": round(time.time(), 2)}, sort_keys=True)
        atomic_write(self.state_path, payload + "\n", mode=STATE_FILE_MODE)

    def own_demotion(self) -> tuple[int, str, bool]:
        """(our share now in the kernel counter, current boot id, whether the kernel was reset).

        A share recorded under another boot id is gone: the counter restarted at boot. Without
        any boot id (a backend that cannot tell) the share is believed unless the counter is
        below it, which can only mean a reset.
        """
        state = self._read_state()
        recorded = state.get("maintenance_demotion", 0)
        recorded = recorded if isinstance(recorded, int) and recorded > 0 else 0
        current_boot = self._boot_id()
        recorded_boot = str(state.get("boot_id", ""))
        if current_boot and recorded_boot:
            reset = current_boot != recorded_boot
        elif recorded:
            reset = self.backend.carp_globals().demotion < recorded
        else:
            reset = False
        return (0 if reset else recorded), current_boot, reset

    def _subtract_own(self, share: int, boot_id: str) -> tuple[int, list[str]]:
        """Remove our `share`, never more than the counter holds. Record first (stay-demoted bias)."""
        messages: list[str] = []
        current = self.backend.carp_globals().demotion
        take = min(share, max(current, 0))
        if take < share:
            messages.append(
                f"the demotion counter ({current}) was below our maintenance share ({share}); "
                f"removed only {take} (something else already subtracted it)"
            )
        self._write_state(0, boot_id)
        self.backend.add_demotion(-take)
        return take, messages

    # --- maintenance mode ----------------------------------------------------------------------

    def _set_flag(self, on: bool, description: str) -> bool:
        """Persist the maintenance flag; True if config.xml changed."""
        try:
            with self.store.transaction(description, username=USERNAME) as root:
                node = root.find(MAINTENANCE_TAG)
                if on:
                    if node is not None and (node.text or "").strip() == "1":
                        raise _Unchanged
                    if node is None:
                        node = etree.SubElement(root, MAINTENANCE_TAG)
                    node.text = "1"
                else:
                    if node is None:
                        raise _Unchanged
                    root.remove(node)
        except _Unchanged:
            return False
        return True

    def maintenance_enter(self) -> dict[str, Any]:
        """Persist the flag, then add our +240 once (a second enter adds nothing)."""
        with self._locked():
            self._set_flag(True, "Enter CARP maintenance mode")
            share, boot_id, _ = self.own_demotion()
            if share < MAINTENANCE_DEMOTION:
                self.backend.add_demotion(MAINTENANCE_DEMOTION - share)
                self._write_state(MAINTENANCE_DEMOTION, boot_id)
            log.info("entered CARP maintenance mode (our demotion %d)", MAINTENANCE_DEMOTION)
        return {"status": "ok", "action": "enter_maintenance"}

    def maintenance_leave(self) -> dict[str, Any]:
        """Clear the flag, then subtract exactly our share; other demotion stays."""
        reply: dict[str, Any] = {"status": "ok", "action": "leave_maintenance"}
        with self._locked():
            was_set = self._set_flag(False, "Leave CARP maintenance mode")
            share, boot_id, _ = self.own_demotion()
            messages: list[str] = []
            if share > 0:
                _, messages = self._subtract_own(share, boot_id)
            elif was_set:
                messages.append(
                    "maintenance mode was entered outside opnsense-ha (e.g. the OPNsense GUI); its +240 "
                    "is not ours to remove. Remove it with `sysctl net.inet.carp.demotion=-240` if wanted"
                )
            if messages:
                reply["messages"] = messages
            log.info("left CARP maintenance mode")
        return reply

    def boot(self) -> dict[str, Any]:
        """At boot (before OPNsense's early/90-carp): re-apply maintenance mode and preempt.

        Idempotent: running it twice in one boot adds nothing the second time. It also finishes
        a `leave` that was interrupted after clearing the flag.
        """
        reply: dict[str, Any] = {"status": "ok", "action": "boot"}
        self.backend.start()  # Linux: keepalived/conntrackd; FreeBSD: the kernel is already there
        with self._locked():
            root = self.store.load()
            flag = maintenance_mode(root)
            share, boot_id, reset = self.own_demotion()
            added = 0
            if flag and share < MAINTENANCE_DEMOTION:
                added = MAINTENANCE_DEMOTION - share
                self.backend.add_demotion(added)
                self._write_state(MAINTENANCE_DEMOTION, boot_id)
            elif not flag and share > 0:
                taken, messages = self._subtract_own(share, boot_id)
                added = -taken
                if messages:
                    reply["messages"] = messages
            elif reset:
                self._write_state(share, boot_id)
            preempt = preempt_wanted(root)
            self.backend.set_preempt(preempt)
        reply.update({"maintenancemode": flag, "preempt": preempt, "demotion_added": added})
        return reply

    # --- carp_set_status equivalents -----------------------------------------------------------

    def disable(self) -> dict[str, Any]:
        """Temporarily disable CARP: allow=0 and every vhid VIP address removed (not persisted)."""
        root = self.store.load()
        self.backend.set_allow(False)
        self.backend.configure_vips([], carp_vips(root))
        return {"status": "ok", "action": "disable"}

    def enable(self) -> dict[str, Any]:
        """Undo `disable`: pfsync (only if it differs), allow=1, VIPs configured again.

        VIPs on an interface key that config.xml does not assign are skipped and named in the
        reply (OPNsense silently fails on them).
        """
        root = self.store.load()
        assigned = {node.tag for node in root.iterfind("interfaces/*") if isinstance(node.tag, str)}
        vips = carp_vips(root)
        usable = [spec for spec in vips if spec.interface in assigned]
        self.backend.apply_pfsync(pfsync_config(root))
        self.backend.set_allow(True)
        self.backend.configure_vips(usable, [])
        reply: dict[str, Any] = {"status": "ok", "action": "enable"}
        skipped = [f"VIP {spec.subnet} (vhid {spec.vhid}): interface {spec.interface!r} is not assigned"
                   for spec in vips if spec.interface not in assigned]
        if skipped:
            reply["messages"] = skipped
        return reply

    def set_status(self, action: str) -> dict[str, Any]:
        """OPNsense's `interface carp_set_status <maintenance|disable|enable>` (maintenance toggles)."""
        action = action.strip().lower()
        if action == "maintenance":
            if maintenance_mode(self.store.load()):
                return self.maintenance_leave()
            return self.maintenance_enter()
        if action == "disable":
            return self.disable()
        if action == "enable":
            return self.enable()
        return {"status": "failed"}

    def set_preempt(self, on: bool) -> dict[str, Any]:
        """Persist `hasync.disablepreempt` (so boot keeps it), then apply net.inet.carp.preempt."""
        wanted = "0" if on else "1"
        try:
            with self.store.transaction(f"CARP preempt {'on' if on else 'off'}", username=USERNAME) as root:
                if preempt_wanted(root) == on:
                    raise _Unchanged
                hasync = root.find("hasync")
                if hasync is None:
                    hasync = etree.SubElement(root, "hasync")
                node = hasync.find("disablepreempt")
                if node is None:
                    node = etree.SubElement(hasync, "disablepreempt")
                node.text = wanted
        except _Unchanged:
            pass
        self.backend.set_preempt(on)
        return {"status": "ok", "action": "preempt_on" if on else "preempt_off"}

    # --- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """get_vip_status's shape (`rows` + `carp`), plus our own facts under `hasync`."""
        root = self.store.load()
        states = self.backend.vip_states()
        glob = self.backend.carp_globals()
        pfsync = self.backend.pfsync_state()
        flag = maintenance_mode(root)
        share, _, _ = self.own_demotion()
        rows = status_rows(root, states)
        has_carp = any(_text(vip, "mode") == "carp" for vip in root.iterfind("virtualip/vip"))
        if not flag and glob.demotion != 0:
            status_msg = STATUS_MSG_DEMOTED
        elif not has_carp:
            status_msg = STATUS_MSG_NO_CARP
        else:
            status_msg = ""
        external = glob.demotion - share
        return {
            "total": len(rows),
            "rowCount": len(rows),
            "current": 1,
            "rows": rows,
            "carp": {
                "demotion": str(glob.demotion),
                "allow": "1" if glob.allow else "0",
                "maintenancemode": flag,
                "status_msg": status_msg,
            },
            "hasync": {
                "backend": self.backend.name,
                "preempt": glob.preempt,
                "preempt_configured": preempt_wanted(root),
                "maintenance_demotion": share,
                "external_demotion": external,
                "external_demotion_causes": explain_demotion(external, states, pfsync, flag and share == 0),
                "pfsync": dataclasses.asdict(pfsync),
                "vips": [dataclasses.asdict(state) for state in states],
            },
        }

    # --- pfsync ------------------------------------------------------------------------------

    def pfsync_status(self) -> dict[str, Any]:
        desired = pfsync_config(self.store.load())
        state = self.backend.pfsync_state()
        return {
            "status": "ok",
            "pfsync": dataclasses.asdict(state),
            "desired": dataclasses.asdict(desired),
            "differences": pfsync_differences(desired, state),
        }

    def pfsync_apply(self) -> dict[str, Any]:
        """Apply hasync's pfsync settings; the backend touches the OS only if they differ."""
        desired = pfsync_config(self.store.load())
        changed = self.backend.apply_pfsync(desired)
        return {
            "status": "ok",
            "action": "pfsync_apply",
            "changed": changed,
            "pfsync": dataclasses.asdict(self.backend.pfsync_state()),
        }


# --- pure helpers (also used by the pair checks) ------------------------------------------------


def _text(node: etree._Element, tag: str) -> str:
    return (node.findtext(tag) or "").strip()


def _address_key(address: str) -> str:
    """inet_pton-equivalent key, so `fd00::1` and `fd00:0::1` match (OPNsense does the same)."""
    try:
        return ipaddress.ip_address(address.split("/")[0]).packed.hex()
    except ValueError:
        return address


def _interface_names(root: etree._Element) -> tuple[dict[str, str], dict[str, str]]:
    """(device -> description, key -> description), description = descr or key (OPNsense)."""
    by_device: dict[str, str] = {}
    by_key: dict[str, str] = {}
    interfaces = root.find("interfaces")
    if interfaces is not None:
        for node in interfaces:
            if not isinstance(node.tag, str):
                continue
            name = _text(node, "descr") or node.tag
            by_key[node.tag] = name
            device = _text(node, "if")
            if device:
                by_device[device] = name
    return by_device, by_key


def status_rows(root: etree._Element, states: list[VipState]) -> list[dict[str, Any]]:
    """Rows as OPNsense's getVipStatusAction builds them (strings, status_txt, vhid_txt)."""
    modes: dict[str, str] = {}
    for vip in root.iterfind("virtualip/vip"):
        if _text(vip, "vhid"):
            modes[_address_key(_text(vip, "subnet"))] = _text(vip, "mode")
    by_device, by_key = _interface_names(root)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for state in states:
        seen.add(str(state.vhid))
        if not state.subnet:
            continue
        address = state.subnet.split("/")[0]
        rows.append({
            "interface": by_device.get(state.device),
            "vhid": str(state.vhid),
            "advbase": str(state.advbase),
            "advskew": str(state.advskew),
            "subnet": address,
            "status": state.status,
            "mode": modes.get(_address_key(address)) or "ipalias",
        })
    for vip in root.iterfind("virtualip/vip"):
        vhid = _text(vip, "vhid")
        if not vhid or vhid in seen:
            continue
        key = _text(vip, "interface")
        rows.append({
            "vhid": vhid,
            "advbase": _text(vip, "advbase"),
            "advskew": _text(vip, "advskew"),
            "subnet": _text(vip, "subnet"),
            "mode": _text(vip, "mode"),
            "interface": by_key.get(key) if _has_descr(root, key) else key.upper(),
            "status": "DISABLED",
        })
    for row in rows:
        row["status_txt"] = row["status"] if row["status"] in ("MASTER", "BACKUP", "INIT") else "DISABLED"
        row["vhid_txt"] = (f"{row['vhid']} (freq. {row['advbase']}/{row['advskew']})"
                           if row["mode"] == "carp" else row["vhid"])
    return rows


def _has_descr(root: etree._Element, key: str) -> bool:
    node = root.find(f"interfaces/{key}") if key and key.replace("_", "").isalnum() else None
    return node is not None and bool(_text(node, "descr"))


def explain_demotion(external: int, states: list[VipState], pfsync: PfsyncState,
                     foreign_maintenance: bool = False) -> list[str]:
    """Likely causes of demotion that is not ours, from the kernel's known contributions."""
    causes: list[str] = []
    remaining = external
    if remaining < 0:
        return [f"the counter is {-remaining} below our maintenance share: something subtracted it "
                "(OPNsense's own 'leave maintenance' resets the counter)"]
    if remaining >= SERVICE_CHECK_DEMOTION:
        count = remaining // SERVICE_CHECK_DEMOTION
        causes.append(f"OPNsense CARP service checks failing ({count} x {SERVICE_CHECK_DEMOTION}, "
                      "rc.carp_service_status.d)")
        remaining -= count * SERVICE_CHECK_DEMOTION
    down = sorted({(s.vhid, s.device) for s in states if s.status == "INIT"})
    if down and remaining >= MAINTENANCE_DEMOTION:
        count = min(len(down), remaining // MAINTENANCE_DEMOTION)
        names = ", ".join(f"{vhid}@{device}" for vhid, device in down[:count])
        causes.append(f"interface down: {names} (240 per vhid on a down link)")
        remaining -= count * MAINTENANCE_DEMOTION
    if pfsync.syncok is False and remaining >= MAINTENANCE_DEMOTION:
        causes.append("pfsync bulk update in progress (240 until the peer's bulk update completes)")
        remaining -= MAINTENANCE_DEMOTION
    if foreign_maintenance and remaining >= MAINTENANCE_DEMOTION:
        causes.append("maintenance mode entered outside opnsense-ha (e.g. the OPNsense GUI), 240")
        remaining -= MAINTENANCE_DEMOTION
    if remaining > 0:
        causes.append(f"{remaining} from an unknown source (a tunable, a script or another tool "
                      "wrote net.inet.carp.demotion)")
    return causes


def pfsync_differences(desired: PfsyncConfig, state: PfsyncState) -> list[str]:
    """What differs between the configured and the running state sync ([] = in sync)."""
    diffs: list[str] = []
    if desired.syncdev is None:
        return ["state sync is on but configured off"] if state.enabled else []
    if not state.enabled:
        diffs.append("state sync is off but configured on")
    if state.syncdev != desired.syncdev:
        diffs.append(f"syncdev {state.syncdev or '-'} != {desired.syncdev}")
    if (state.syncpeer or None) != (desired.syncpeer or None):
        diffs.append(f"syncpeer {state.syncpeer or '-'} != {desired.syncpeer or '-'}")
    if state.version is not None and state.version != str(desired.version):
        diffs.append(f"version {state.version} != {desired.version}")
    if state.defer is not None and state.defer != desired.defer:
        diffs.append(f"defer {'on' if state.defer else 'off'} != {'on' if desired.defer else 'off'}")
    return diffs


def open_ops(conf_dir: str | os.PathLike[str], runner: CommandRunner | None = None) -> CarpOps:
    """CarpOps for the node whose config lives in `conf_dir`, with the backend the factory picks."""
    return CarpOps(ConfigStore(conf_dir), get_backend(conf_dir, runner))
