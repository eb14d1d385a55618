"""Readers of what keepalived, conntrackd, iproute2 and the notify script leave behind (pure)."""

from __future__ import annotations

import json
import re

from hasync.core.errors import FailoverError

VRRP_STATES = ("MASTER", "BACKUP", "FAULT", "STOP")
_LINK_RE = re.compile(r"device=(?P<device>\S+)\s+status=(?P<status>[A-Z][A-Z_-]*)")


def parse_conntrackd_links(text: str) -> dict[str, str]:
    """`conntrackd -s link`: {device: status} (RUNNING, DOWN, ...)."""
    return {m.group("device"): m.group("status") for m in _LINK_RE.finditer(text)}


def parse_vrrp_state(text: str) -> str | None:
    """A state file written by notify.sh: "MASTER 1795653209.90" -> "MASTER"."""
    word = text.split()[0] if text.split() else ""
    return word if word in VRRP_STATES else None


def carp_status(vrrp_state: str | None) -> str:
    """keepalived's state as CARP's: FAULT/STOP/unknown are INIT (no link, not running)."""
    return vrrp_state if vrrp_state in ("MASTER", "BACKUP") else "INIT"


def parse_ip_json_addresses(text: str) -> dict[str, list[tuple[str, int]]]:
    """`ip -j addr show`: {device: [(address, prefixlen), ...]}."""
    try:
        data = json.loads(text or "[]")
    except ValueError:
        raise FailoverError("`ip -j addr show` did not print JSON (iproute2 too old?)") from None
    result: dict[str, list[tuple[str, int]]] = {}
    for link in data if isinstance(data, list) else []:
        name = str(link.get("ifname", ""))
        for info in link.get("addr_info", []) or []:
            local = info.get("local")
            if local:
                result.setdefault(name, []).append((str(local), int(info.get("prefixlen", 0))))
    return result
