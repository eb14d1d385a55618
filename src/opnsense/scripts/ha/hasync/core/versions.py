"""Firmware versions of this node, in the shape of `opnsense.firmware_version`.

On OPNsense the truth is `opnsense-version`; elsewhere (demo, lab, tests) it is this package's
version unless `<conf-dir>/version.json` overrides it, which lets a test stage a version skew
between two nodes on one machine without touching the code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from hasync import __version__
from hasync.core.errors import HaError
from hasync.core.osiface import CommandRunner, SubprocessRunner

VERSION_OVERRIDE = "version.json"

#: Where OPNsense installs the tool (opnsense/core `src/sbin`). Looked for here rather than on
#: PATH: the PATH configd and cron give a script is not ours to rely on.
OPNSENSE_VERSION_TOOL = Path("/usr/local/sbin/opnsense-version")


def local_versions(conf_dir: str | Path, runner: CommandRunner | None = None,
                   tool: Path = OPNSENSE_VERSION_TOOL) -> dict[str, dict[str, str]]:
    override = Path(conf_dir) / VERSION_OVERRIDE
    if override.is_file():
        data: Any = json.loads(override.read_text())
        return {part: {"version": str(data[part]["version"])} for part in ("base", "firmware", "kernel")}
    if os.access(tool, os.X_OK):
        runner = runner or SubprocessRunner()
        out = {}
        for part, flag in (("base", "-v base"), ("firmware", "-v"), ("kernel", "-v kernel")):
            result = runner.run([str(tool), *flag.split()], timeout=10)
            out[part] = {"version": result.stdout.strip() if result.ok else ""}
        return out
    return {part: {"version": __version__} for part in ("base", "firmware", "kernel")}


def parse_version(text: str) -> tuple[int, ...]:
    """'26.7.3_2' -> (26, 7, 3); missing parts are 0."""
    core = text.strip().split("_")[0].split("-")[0]
    parts = []
    for piece in core.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    while len(parts) < 3:
        parts.append(0)
    return tuple(parts)


def compare(local: str, remote: str) -> str:
    """'equal', 'patch' (warn) or 'major' (major or minor differ: refuse)."""
    mine, theirs = parse_version(local), parse_version(remote)
    if mine == theirs:
        return "equal"
    if mine[:2] != theirs[:2]:
        return "major"
    return "patch"


def firmware_version_of(reply: Any) -> str:
    try:
        return str(reply["firmware"]["version"])
    except (KeyError, TypeError):
        raise HaError(f"backup sent an unexpected firmware_version reply: {str(reply)[:200]}") from None
