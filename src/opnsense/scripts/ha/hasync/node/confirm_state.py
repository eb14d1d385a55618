"""Commit-confirmed sync: the backup undoes a sync by itself unless the primary confirms it in time.

Junos `commit confirmed`, VyOS `commit-confirm` and MikroTik safe mode apply a change and roll it
back unless it is confirmed; here the change and the confirmation cross nodes.

Here: the persisted state of a backup's armed rollback (`<state>/confirm-state.json` and the
pre-sync copy), read by the agent, `status`, `history` and `check`. The backup side is
`agent.confirm.ArmedRollback`, the primary's steps `sync.confirm.PrimaryConfirm`.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from lxml import etree

from hasync.config.items import PLUGIN_SECTION
from hasync.core.errors import HaError, MergeError
from hasync.core.fileio import atomic_write
from hasync.wire.protocol import CONFIRM_HEADER

log = logging.getLogger("hasync.confirm")

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


def write_file(path: Path, data: bytes) -> None:
    """The state and the pre-sync copy: private files, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, data, mode=0o600)


def write_state(state_dir: Path, state: dict[str, Any]) -> None:
    state["past"] = state["past"][-PAST_KEEP:]
    write_file(state_dir / STATE_FILE, (json.dumps(state, indent=1) + "\n").encode())


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


# --- backup side ----------------------------------------------------------------------------------


# --- primary side ---------------------------------------------------------------------------------


