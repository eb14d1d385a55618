"""CARP transition hooks: run the scripts of a hook directory on every CARP state change.

OPNsense: devd sees `carp: <vhid>@<if>: BACKUP -> MASTER`, runs `configctl interface carp
<vhid>@<if> <STATE>`, which runs every script in `/usr/local/etc/rc.syshook.d/carp/` in name order
with those two arguments. We do the same, for devd on OPNsense and keepalived's notify on Linux,
with three guarantees OPNsense leaves to each script:

* the arguments are validated strictly before anything runs (they come from an event line, and
  every script would otherwise have to defend itself): `<1..255>@<ifname> <MASTER|BACKUP|INIT>`;
* scripts run as argv, never through a shell, each with a time limit, so a hung script cannot
  block the transitions that follow;
* scripts that others could modify (group/world-writable) are refused, since they run as root.

Logging follows OPNsense's wording (configd's "Carp event on subsystem %s for type %s" and
rc.syshook's ">>> Invoking/Error in carp script") and goes to syslog when /dev/log exists.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from hasync.core.errors import HaError
from hasync.core.osiface import CommandRunner, SubprocessRunner

DEFAULT_HOOK_DIR = Path("/usr/local/etc/rc.syshook.d/carp")
DEFAULT_TIMEOUT = 60.0
STATES = ("MASTER", "BACKUP", "INIT")

log = logging.getLogger("hasync.hooks")

_SUBSYSTEM_RE = re.compile(r"^(?P<vhid>[1-9][0-9]{0,2})@(?P<ifname>[A-Za-z][A-Za-z0-9_.\-]{0,14})$")


class HookArgumentError(HaError):
    """The event arguments are not `<vhid>@<if> <MASTER|BACKUP|INIT>`."""


@dataclass(frozen=True)
class HookResult:
    script: str
    returncode: int
    output: str


def validate_event(subsystem: str, state: str) -> tuple[int, str, str]:
    """(vhid, interface, state) of a CARP event, or HookArgumentError saying what is wrong."""
    match = _SUBSYSTEM_RE.match(subsystem)
    if match is None:
        raise HookArgumentError(
            f"CARP event source {subsystem[:64]!r} is not <vhid>@<interface> "
            "(vhid 1..255, interface name of letters, digits, '_', '.', '-', at most 15 chars)"
        )
    vhid = int(match.group("vhid"))
    if not 1 <= vhid <= 255:
        raise HookArgumentError(f"CARP event source {subsystem!r}: vhid {vhid} is not in 1..255")
    if state not in STATES:
        raise HookArgumentError(f"CARP event type {state[:32]!r} is not one of {', '.join(STATES)}")
    return vhid, match.group("ifname"), state


def hook_scripts(hook_dir: Path) -> list[Path]:
    """Executable regular files of `hook_dir` in name order (bytewise, like `find -s`)."""
    if not hook_dir.is_dir():
        return []
    scripts: list[Path] = []
    for entry in sorted(hook_dir.iterdir(), key=lambda p: os.fsencode(p.name)):
        if entry.name.startswith("."):
            continue
        try:
            info = entry.stat()
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        if not info.st_mode & stat.S_IXUSR:
            log.debug("skipping non-executable hook %s", entry)
            continue
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            log.error(">>> Refusing carp script '%s': writable by group/others (chmod go-w)", entry.name)
            continue
        scripts.append(entry)
    return scripts


def run_carp_hooks(
    subsystem: str,
    state: str,
    *,
    hook_dir: str | os.PathLike[str] = DEFAULT_HOOK_DIR,
    runner: CommandRunner | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[HookResult]:
    """Validate the event, then run every hook in name order with `<vhid>@<if> <STATE>`.

    A failing or timed-out script is logged and the next one still runs (OPNsense's behaviour);
    the caller gets every script's return code.
    """
    vhid, ifname, state = validate_event(subsystem, state)
    argv_tail = [f"{vhid}@{ifname}", state]
    runner = runner or SubprocessRunner()
    log.info("Carp event on subsystem %s for type %s", argv_tail[0], state)
    results: list[HookResult] = []
    for script in hook_scripts(Path(hook_dir)):
        log.info(">>> Invoking carp script '%s'", script.name)
        outcome = runner.run([str(script), *argv_tail], timeout=timeout)
        output = (outcome.stdout + outcome.stderr).strip()
        if not outcome.ok:
            log.error(">>> Error in carp script '%s' (exit %d)%s", script.name, outcome.returncode,
                      f": {output[:500]}" if output else "")
        results.append(HookResult(script.name, outcome.returncode, output))
    return results
