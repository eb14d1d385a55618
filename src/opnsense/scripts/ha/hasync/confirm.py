"""Commit-confirmed sync: the backup undoes a sync by itself unless the primary confirms it in time.

Junos `commit confirmed`, VyOS `commit-confirm` and MikroTik safe mode apply a change and roll it
back unless it is confirmed; here the change and the confirmation cross nodes.

Backup side (`armed_rollback.ArmedRollback`, one per agent, only with the `hasync.*` extensions):

* A merge whose request carries `CONFIRM_HEADER: "<seconds> <id>"` is *armed*: just before the
  merged config is written (under config.xml's lock, so nothing else can write in between), the
  exact pre-sync bytes go to `<state>/confirm-before.xml` and the deadline to
  `<state>/confirm-state.json`, both written atomically. Arming before the write means a crash
  at any point leaves either nothing armed and nothing merged, or an armed rollback whose
  "before" is exactly what the merge started from.
* `hasync.confirm {id}` before the deadline settles it as *confirmed*. At the deadline (a timer;
  and at agent start, for a deadline that passed while the agent was down) it is *rolled back*:
  the pre-sync bytes are restored byte for byte through the store (history first, then the
  in-place rewrite, as `rollback` does), then the filter, CARP VIPs and the services of the
  changed sections are reconfigured (`rollback.reconfigure`) and a WARNING goes to syslog.
* Exactly one outcome: the confirm, the timer and the start-up check all go through `_settle`,
  under the node's merge lock and then this object's lock, and the outcome is decided by one
  atomic rewrite of the state file. A confirm that arrives at or after the deadline carries out
  the rollback itself and says so.
* While a rollback is armed, another merge is refused (it would be lost by the rollback, or
  confirm someone else's change).

Primary side (`PrimaryConfirm`, driven by `syncer.SyncRun`): refuse on a backup without
`hasync.confirm` before sending anything (a stock OPNsense backup cannot roll back by itself),
note the running services, send the merge with the header, then check the backup through a new
connection built from the config as it is now (login, `firmware_version`, `list_services`, every
service that ran before still running) and confirm only if all of that holds.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from . import protocol
from .errors import HaError, MergeError, RemoteFault
from .items import PLUGIN_SECTION

if TYPE_CHECKING:
    from .client import PeerClient
    from .syncer import SyncResult

log = logging.getLogger("hasync.confirm")

#: Request header of a merge that is to be confirmed: "<seconds> <id>".
CONFIRM_HEADER = protocol.CONFIRM_HEADER
STATE_FILE = "confirm-state.json"
BEFORE_FILE = "confirm-before.xml"
MIN_SECONDS = 1
MAX_SECONDS = 24 * 3600
PAST_KEEP = 50
FEATURE = "confirm"
METHODS = ("hasync.confirm", "hasync.confirm_state")
#: Config.xml path (on the primary) of the confirm window for syncs without --confirm, e.g. cron's.
SETTING_PATH = f"{PLUGIN_SECTION}/syncconfirm"

CONFIRM_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")

ARMED, CONFIRMED, ROLLED_BACK = "armed", "confirmed", "rolled-back"


def iso(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_header(value: str) -> tuple[int, str]:
    """`"<seconds> <id>"` -> (seconds, id); a clear MergeError for anything else."""
    parts = value.split()
    if len(parts) != 2 or not parts[0].isdigit() or not CONFIRM_ID.fullmatch(parts[1]):
        raise MergeError(f"{CONFIRM_HEADER} must be '<seconds> <id>', got {value[:80]!r}")
    seconds = int(parts[0])
    if not MIN_SECONDS <= seconds <= MAX_SECONDS:
        raise MergeError(f"confirm window {seconds}s out of range ({MIN_SECONDS}..{MAX_SECONDS})")
    return seconds, parts[1]


def setting(root: etree._Element) -> int:
    """The confirm window configured for syncs that do not pass --confirm (0: none)."""
    text = (root.findtext(SETTING_PATH) or "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) > MAX_SECONDS:
        raise HaError(f"{SETTING_PATH} = {text!r}: expected whole seconds 0..{MAX_SECONDS}")
    return int(text)


# --- persisted state ---------------------------------------------------------------------------------


def read_state(state_dir: Path) -> dict[str, Any]:
    """{"armed": entry or None, "past": [entries, oldest first], "last_merge": time of a merge
    without confirm after a rollback}; empty when absent or unreadable."""
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {"armed": None, "past": [], "last_merge": 0.0}
    armed = data.get("armed") if isinstance(data, dict) else None
    past = data.get("past") if isinstance(data, dict) else None
    last_merge = data.get("last_merge") if isinstance(data, dict) else None
    return {"armed": armed if isinstance(armed, dict) else None,
            "past": [p for p in past if isinstance(p, dict)] if isinstance(past, list) else [],
            "last_merge": float(last_merge) if isinstance(last_merge, int | float) else 0.0}


def public_state(state_dir: Path, now: float | None = None) -> dict[str, Any]:
    """For `hasync.confirm_state`, `history`, `status` and `check`: the armed rollback and past outcomes."""
    state = read_state(state_dir)
    armed = state["armed"]
    now = time.time() if now is None else now
    if armed is not None:
        armed = {**armed, "state": ARMED, "remaining": max(0.0, round(float(armed["deadline"]) - now, 1))}
    # never an empty struct: XML-RPC (IXR) sends that as an empty array
    return {"armed": armed or {"state": "none"}, "past": list(reversed(state["past"])),
            "last_merge": state["last_merge"]}


def with_state(document: dict[str, Any], state_dir: Path) -> dict[str, Any]:
    """`history`'s document (local or `hasync.history`) with the commit-confirmed state added."""
    document["confirm"] = public_state(state_dir)
    return document


def fetch_state(peer: PeerClient) -> dict[str, Any] | None:
    """The backup's `hasync.confirm_state`; None when it has none (stock OPNsense, older agent)."""
    try:
        reply = peer.call("hasync.confirm_state")
    except RemoteFault:
        return None
    return reply if isinstance(reply, dict) else None


def health(document: dict[str, Any], now: float) -> tuple[bool, str]:
    """(healthy, message) for `check`: a sync that was rolled back for want of a confirm is a
    WARNING until the next sync merges (confirmed or not), so it cannot go unnoticed."""
    armed = document.get("armed") or {}
    past = [p for p in document.get("past") or [] if isinstance(p, dict)]  # newest first
    if armed.get("state") == ARMED:
        deadline = float(armed.get("deadline", 0))
        if now > deadline + 60:
            return False, (f"a commit-confirmed sync from {armed.get('who', '?')} was due to roll back at "
                           f"{iso(deadline)} and still has not: is the agent running?")
        return True, f"a sync from {armed.get('who', '?')} awaits confirmation until {iso(deadline)}"
    if past and past[0].get("state") == ROLLED_BACK:
        last = past[0]
        settled = float(last.get("settled_at", 0))
        if float(document.get("last_merge", 0)) <= settled:
            return False, (f"the sync from {last.get('who', '?')} at {iso(float(last.get('armed_at', 0)))} was not "
                           f"confirmed by {iso(float(last.get('deadline', 0)))} and was rolled back; the backup runs "
                           "its pre-sync config until the next good sync (see `opnsense-ha history --remote`)")
        return True, "the last commit-confirmed sync was rolled back, but a sync has merged since"
    if past:
        return True, f"last commit-confirmed sync {past[0].get('state')} at {iso(float(past[0].get('settled_at', 0)))}"
    return True, "no commit-confirmed sync recorded"


def describe(document: dict[str, Any], limit: int = 5) -> list[str]:
    """Text lines for `status` and `history`: the armed rollback, then the newest outcomes."""
    lines: list[str] = []
    armed = document.get("armed") or {}
    if armed.get("state") == ARMED:
        lines.append(f"commit-confirmed: ARMED, sync from {armed.get('who', '?')} rolls back at "
                     f"{iso(float(armed.get('deadline', 0)))} ({armed.get('remaining', '?')}s left) unless confirmed")
    for entry in (document.get("past") or [])[:limit]:
        lines.append(f"commit-confirmed: sync from {entry.get('who', '?')} at {iso(float(entry.get('armed_at', 0)))} "
                     f"{str(entry.get('state', '?')).upper()} at {iso(float(entry.get('settled_at', 0)))}")
    return lines


# --- primary side ---------------------------------------------------------------------------------


@dataclass
class PrimaryConfirm:
    """One commit-confirmed sync as the primary drives it."""

    seconds: int
    ident: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    running: list[str] = field(default_factory=list)
    deadline: float = 0.0  # our estimate, for "the backup will roll back at"; the backup's own governs
    merged: bool = False  # the backup acknowledged the merge
    state: str = ARMED

    def prepare(self, peer: PeerClient) -> str:
        """Before the merge: the backup must be able to roll back; note the services running now."""
        try:
            methods = peer.call("system.listMethods")
        except HaError as exc:
            raise HaError(f"--confirm: cannot ask {peer.peer_key} which methods it offers: {exc}") from None
        if not isinstance(methods, list) or "hasync.confirm" not in methods:
            raise HaError(f"--confirm refused: {peer.url} is not an opnsense-ha agent with commit-confirmed "
                          "sync (no hasync.confirm); a stock OPNsense backup cannot roll back by itself. Sync "
                          "without --confirm, or install opnsense-ha on the backup")
        self.running = running_services(peer.call("opnsense.list_services", [[]]))
        return f"{len(self.running)} services running; window {self.seconds}s"

    def arm(self, peer: PeerClient) -> None:
        self.deadline = time.time() + self.seconds
        peer.extra_headers[CONFIRM_HEADER] = f"{self.seconds} {self.ident}"

    def disarm_header(self, peer: PeerClient) -> None:
        peer.extra_headers.pop(CONFIRM_HEADER, None)

    def verify(self, fresh_peer: Callable[[], PeerClient]) -> tuple[PeerClient | None, str]:
        """(the new connection, '') if the backup passes every check, else (it or None, why not)."""
        try:
            peer = fresh_peer()
            peer.call("opnsense.firmware_version")  # the login with the new config's credentials
            now_running = set(running_services(peer.call("opnsense.list_services", [[]])))
        except HaError as exc:
            return None, f"the backup failed the check after the merge: {exc}"
        stopped = [name for name in self.running if name not in now_running]
        if stopped:
            return peer, f"services that ran before the sync are not running now: {', '.join(stopped)}"
        return peer, ""

    def confirm(self, peer: PeerClient) -> dict[str, Any]:
        reply = peer.call("hasync.confirm", [{"id": self.ident}])
        return reply if isinstance(reply, dict) else {"state": "unknown"}

    def pending_message(self, why: str) -> str:
        return f"not confirmed: the backup will roll back at {iso(self.deadline)} ({why})"

    def as_json(self) -> dict[str, Any]:
        """`confirm` of the sync result (schema sync-result)."""
        return {"id": self.ident, "seconds": self.seconds, "state": self.state, "deadline": iso(self.deadline)}

    def failed(self, result: SyncResult, exc: Exception) -> None:
        """The run broke after the armed merge was sent: the backup will roll back (if it merged)."""
        self._unconfirmed(result, str(exc) if self.merged else f"if it merged; {exc}")

    def _unconfirmed(self, result: SyncResult, why: str) -> None:
        self.state = result.status = "unconfirmed"
        result.message = self.pending_message(why)
        result.confirm = self.as_json()
        log.error("%s", result.message)

    def finish(self, step: Callable[[str, Callable[[], str]], None], fresh_peer: Callable[[], PeerClient],
               result: SyncResult) -> None:
        """After the merge (and filter_configure): check the backup, confirm if it holds, record the outcome."""
        checked: list[tuple[PeerClient | None, str]] = []

        def check() -> str:
            checked.append(self.verify(fresh_peer))
            return checked[0][1] or "login, firmware_version, list_services ok; services that ran still run"

        step("confirm: check backup", check)
        peer, why = checked[0]
        if why or peer is None:
            self._unconfirmed(result, why)
            return
        replies: list[dict[str, Any]] = []

        def send_confirm() -> str:
            replies.append(self.confirm(peer))
            return str(replies[0].get("state", "unknown"))

        step("hasync.confirm", send_confirm)
        self.state = str(replies[0].get("state", "unknown"))
        result.confirm = self.as_json()
        if self.state == CONFIRMED:
            return
        if self.state == ROLLED_BACK:
            result.status = ROLLED_BACK
            result.message = (f"rolled back: the confirm reached the backup after its deadline "
                              f"({replies[0].get('deadline_iso', '?')}); it restored its pre-sync config")
            log.error("%s", result.message)
        else:
            self._unconfirmed(result, f"the backup answered hasync.confirm with {self.state!r}")


def running_services(listing: Any) -> list[str]:
    """'name[id]' of every running service in an `opnsense.list_services` reply."""
    out: list[str] = []
    for service in listing if isinstance(listing, list) else []:
        if isinstance(service, dict) and service.get("status") in (True, 1, "1", "true"):
            name, ident = str(service.get("name", "")), str(service.get("id", "") or "")
            out.append(f"{name}[{ident}]" if ident else name)
    return out
