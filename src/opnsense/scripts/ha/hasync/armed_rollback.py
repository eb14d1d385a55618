"""Commit-confirmed sync, backup side: the rollback a confirmed merge arms (see `confirm`).

Kept apart from `confirm` (the shared state and the primary's side) because it needs the agent,
the rollback and the store: the primary must not load any of them to run a sync.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from . import agent, xmlrpc
from . import rollback as rollbackmod
from .agent import CallContext, MethodFault
from .confirm import (
    ARMED,
    BEFORE_FILE,
    CONFIRM_ID,
    CONFIRMED,
    PAST_KEEP,
    ROLLED_BACK,
    STATE_FILE,
    iso,
    parse_header,
    public_state,
    read_state,
)
from .errors import ConfigError, HaError, MergeError
from .osiface import Clock, SystemClock
from .store import parse_config_bytes

if TYPE_CHECKING:
    from .backup import BackupNode

log = logging.getLogger("hasync.confirm")


def _write(path: Path, data: bytes) -> None:
    from .snapshot import _write_atomic  # late: snapshot -> syncer -> this module

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_atomic(path, data)


def _write_state(state_dir: Path, state: dict[str, Any]) -> None:
    state["past"] = state["past"][-PAST_KEEP:]
    _write(state_dir / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())


# --- backup side ----------------------------------------------------------------------------------


@dataclass
class ArmedRollback:
    """The backup's armed rollback: armed by a merge, settled by a confirm or the deadline."""

    node: BackupNode
    state_dir: Path
    clock: Clock = field(default_factory=SystemClock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _timer: threading.Timer | None = None

    # called by BackupNode.restore_config_section inside its transaction, after the merge and the
    # lock-out guard, just before the write; `before` is config.xml's bytes under the store lock
    def before_write(self, context: CallContext, before: bytes) -> None:
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
                    _write_state(self.state_dir, state)
                return
            seconds, ident = parse_header(context.confirm)
            now = self.clock.time()
            _write(self.state_dir / BEFORE_FILE, before)
            state["armed"] = {"id": ident, "state": ARMED, "armed_at": round(now, 3),
                              "deadline": round(now + seconds, 3), "deadline_iso": iso(now + seconds),
                              "seconds": seconds, "who": f"{context.username}@{context.remote_addr}",
                              "before_sha256": hashlib.sha256(before).hexdigest()}
            _write_state(self.state_dir, state)
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
        with self.node._merge_lock, self.lock:
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
                _write_state(self.state_dir, state)  # the decision
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
        _write_state(self.state_dir, state)  # the decision
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

    def register(self, dispatcher: agent.Dispatcher) -> None:
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


