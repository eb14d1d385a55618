"""Commit-confirmed sync, the backup's side: the armed rollback a merge arms and a confirm settles.

Backup side (`ArmedRollback`, one per agent, only with the `hasync.*` extensions):

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
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.agent.opnsense_methods import BackupNode
from hasync.agent.server import CallContext, Dispatcher
from hasync.config.store import parse_config_bytes
from hasync.core.errors import ConfigError, HaError, MergeError, MethodFault
from hasync.core.osiface import Clock, SystemClock
from hasync.node import rollback as rollbackmod
from hasync.node.confirm_state import (
    ARMED,
    BEFORE_FILE,
    CONFIRM_ID,
    CONFIRMED,
    ROLLED_BACK,
    iso,
    parse_header,
    public_state,
    read_state,
    write_file,
    write_state,
)
from hasync.wire import xmlrpc

log = logging.getLogger("hasync.confirm")


@dataclass
class ArmedRollback:
    """The backup's armed rollback: armed by a merge, settled by a confirm or the deadline."""

    node: BackupNode
    state_dir: Path
    clock: Clock = field(default_factory=SystemClock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _timer: threading.Timer | None = None

    # called by BackupNode.restore_config_section inside its transaction, after the merge and the
    # lock-out guard, just before the write; `read_before` reads config.xml's bytes under the store lock
    def before_write(self, context: CallContext, read_before: Callable[[], bytes]) -> None:
        with self.lock:
            state = read_state(self.state_dir)
            armed = state["armed"]
            if armed is not None:
                raise MergeError(
                    f"refused: a sync from {armed.get('who', '?')} is awaiting confirmation until "
                    f"{iso(float(armed['deadline']))} (commit-confirmed); it must be confirmed or rolled back first")
            if not context.confirm:
                if state["past"] and state["past"][-1].get("state") == ROLLED_BACK:
                    state["last_merge"] = round(self.clock.time(), 3)  # clears `check`'s warning
                    write_state(self.state_dir, state)
                return
            seconds, ident = parse_header(context.confirm)
            now = self.clock.time()
            before = read_before()
            write_file(self.state_dir / BEFORE_FILE, before)
            state["armed"] = {"id": ident, "state": ARMED, "armed_at": round(now, 3),
                              "deadline": round(now + seconds, 3), "deadline_iso": iso(now + seconds),
                              "seconds": seconds, "who": f"{context.username}@{context.remote_addr}",
                              "before_sha256": hashlib.sha256(before).hexdigest()}
            write_state(self.state_dir, state)
        log.warning("sync from %s@%s is armed: it rolls back at %s unless the primary confirms it",
                    context.username, context.remote_addr, iso(now + seconds))
        self._schedule(now + seconds)

    def resume(self) -> None:
        """At agent start: carry out an armed rollback whose deadline passed, or wait for it."""
        armed = read_state(self.state_dir)["armed"]
        if armed is None:
            return
        deadline = float(armed["deadline"])
        if self.clock.time() >= deadline:
            log.warning("agent start: the sync from %s was not confirmed by %s; rolling it back now",
                        armed.get("who", "?"), iso(deadline))
            try:
                self.settle()
            except (HaError, OSError) as exc:  # the agent must still start; `check` reports it overdue
                log.error("agent start: the armed rollback failed: %s", exc)
        else:
            log.warning("agent start: a sync from %s awaits confirmation until %s", armed.get("who", "?"),
                        iso(deadline))
            self._schedule(deadline)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _schedule(self, deadline: float) -> None:
        self.stop()
        timer = threading.Timer(max(0.0, deadline - self.clock.time()), self._on_deadline)
        timer.daemon = True
        self._timer = timer
        timer.start()

    def _on_deadline(self) -> None:
        try:
            self.settle()
        except Exception:  # a timer thread has no caller to tell: log, the next start retries
            log.exception("the armed rollback failed; it is retried when the agent starts")

    def settle(self, confirm_id: str | None = None) -> dict[str, Any]:
        """Decide the armed sync: confirmed (a confirm before the deadline), rolled back (the
        deadline passed, whoever calls), or still armed (a timer that fired early). Every path into
        an outcome comes through here, under both locks, so there is exactly one."""
        with self.node.merge_lock, self.lock:
            state = read_state(self.state_dir)
            armed = state["armed"]
            if armed is None or (confirm_id is not None and armed.get("id") != confirm_id):
                known = [p for p in state["past"] if confirm_id is not None and p.get("id") == confirm_id]
                return known[-1] if known else {"state": "unknown", "id": confirm_id or ""}
            now = self.clock.time()
            deadline = float(armed["deadline"])
            if now < deadline and confirm_id is None:
                self._schedule(deadline)
                return {**armed}
            if now < deadline:
                outcome = {**armed, "state": CONFIRMED, "settled_at": round(now, 3)}
                state["armed"], state["past"] = None, [*state["past"], outcome]
                write_state(self.state_dir, state)  # the decision
                self._forget_before()
                log.info("sync from %s confirmed (%.1fs before its deadline)", armed.get("who", "?"), deadline - now)
                return outcome
            return self._roll_back(state, armed, now)

    def _roll_back(self, state: dict[str, Any], armed: dict[str, Any], now: float) -> dict[str, Any]:
        store = self.node.store
        try:
            before = (self.state_dir / BEFORE_FILE).read_bytes()
        except OSError as exc:
            raise HaError(f"cannot read the pre-sync config {self.state_dir / BEFORE_FILE}: {exc.strerror or exc}; "
                          "not rolling back, see `opnsense-ha history`") from None
        if hashlib.sha256(before).hexdigest() != armed.get("before_sha256"):
            raise HaError(f"{self.state_dir / BEFORE_FILE} does not hold the pre-sync config (hash mismatch); "
                          "not rolling back, see `opnsense-ha history`")
        with store.locked_bytes() as locked:
            current = locked.data
            if current != before:
                locked.replace(before)  # history first, then config.xml in place (crash-safe)
        outcome = {**armed, "state": ROLLED_BACK, "settled_at": round(now, 3)}
        state["armed"], state["past"] = None, [*state["past"], outcome]
        write_state(self.state_dir, state)  # the decision
        self._forget_before()
        result = rollbackmod.RollbackResult("ok", "commit-confirmed rollback")
        if current != before:
            rollbackmod.reconfigure(result, _parse_or_empty(current), parse_config_bytes(before, "pre-sync config"),
                                    self.node.registry, self.node.services, self.node.failover)
        log.warning("sync from %s was not confirmed by %s: restored the pre-sync config byte for byte "
                    "(sections %s; filter reloaded: %s; services restarted: %s)%s", armed.get("who", "?"),
                    iso(float(armed["deadline"])), ", ".join(result.changed_sections) or "none",
                    "yes" if result.filter_reloaded else "no", ", ".join(result.services_restarted) or "none",
                    "".join(f"; {w}" for w in result.warnings))
        return outcome

    def _forget_before(self) -> None:
        """Settled: no timer, and no copy of the old config (with its secrets) left lying around."""
        self.stop()
        with contextlib.suppress(OSError):
            (self.state_dir / BEFORE_FILE).unlink()

    # --- hasync.* methods ---

    def register(self, dispatcher: Dispatcher) -> None:
        dispatcher.register("hasync.confirm", self.confirm)
        dispatcher.register("hasync.confirm_state", lambda _a, _c: public_state(self.state_dir, self.clock.time()))

    def confirm(self, argument: Any, context: CallContext) -> dict[str, Any]:
        ident = argument.get("id") if isinstance(argument, dict) else argument
        if not isinstance(ident, str) or not CONFIRM_ID.fullmatch(ident):
            raise MethodFault(xmlrpc.INVALID_PARAMS, "hasync.confirm expects {id: the id of the armed sync}")
        outcome = self.settle(ident)
        log.info("hasync.confirm %s from %s@%s: %s", ident, context.username, context.remote_addr, outcome["state"])
        return outcome

def _parse_or_empty(data: bytes) -> etree._Element:
    try:
        return parse_config_bytes(data, "config.xml")
    except ConfigError:
        return etree.Element("opnsense")
