"""Commit-confirmed sync, the primary's side.

Primary side (`PrimaryConfirm`, driven by `run.SyncRun`): refuse on a backup without
`hasync.confirm` before sending anything (a stock OPNsense backup cannot roll back by itself),
note the running services, send the merge with the header, then check the backup through a new
connection built from the config as it is now (login, `firmware_version`, `list_services`, every
service that ran before still running) and confirm only if all of that holds.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hasync.core.errors import HaError, RemoteFault
from hasync.node.confirm_state import ARMED, CONFIRMED, ROLLED_BACK, iso
from hasync.wire.client import PeerClient
from hasync.wire.protocol import CONFIRM_HEADER

if TYPE_CHECKING:
    from hasync.sync.run import SyncResult

log = logging.getLogger("hasync.confirm")


def fetch_state(peer: PeerClient) -> dict[str, Any] | None:
    """The backup's `hasync.confirm_state`; None when it has none (stock OPNsense, older agent)."""
    try:
        reply = peer.call("hasync.confirm_state")
    except RemoteFault:
        return None
    return reply if isinstance(reply, dict) else None

class PrimaryConfirm:
    """One commit-confirmed sync as the primary drives it (a plain class: see `hasync`)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds
        self.ident = secrets.token_urlsafe(12)
        self.running: list[str] = []
        self.deadline = 0.0  # our estimate, for "the backup will roll back at"; the backup's own governs
        self.merged = False  # the backup acknowledged the merge
        self.state = ARMED

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
