"""What the merge accepts: a payload checked and normalised before anything is locked or written.

A payload arrives from a stock OPNsense primary (IXR structs), from ours, or from a file. Before
the merge takes config.xml's lock, `normalize_payload` turns PHP's array shapes into the forms
the merge reads (lists with holes, numeric keys, attributes) and refuses what no config.xml can
hold (bad names, control characters, too deep, too big); `check_payload` refuses sections no
registered sync item covers and the node's own sections (`hasync`, `interfaces`, `revision`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from hasync.config.items import SyncItemRegistry
from hasync.config.tree import ATTRIBUTES
from hasync.config.vetting import TextRules
from hasync.core.errors import MergeError
from hasync.payload.build import REDACTED

# Sections of the backup that a payload may never overwrite (reference §2, §3).
PROTECTED_KEYS: tuple[str, ...] = ("hasync", "interfaces", "revision")
# Paths older PHP primaries send along with users (`nextuid`/`nextgid`); accepted whenever the
# section they accompany is covered by a registered item.
COMPANION_PATHS: Mapping[str, str] = {"system.nextuid": "system.user", "system.nextgid": "system.user"}
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

MAX_PAYLOAD_BYTES = 64 * 1024 * 1024

MAX_DEPTH = 64

_NUMERIC_KEY = re.compile(r"^(0|[1-9][0-9]*)$")

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")

def normalize_payload(payload: Any, vetted: Callable[[Any, int], bool] | None = None) -> dict[str, Any]:
    """Check the shape of an incoming payload and return it with PHP list-holes turned into lists.

    The payload comes from the network or a file: names must be usable as XML tags, values must
    be strings, numbers, booleans, lists or structs, text must be XML-safe, nesting is bounded.
    `vetted(value, room)` names the dicts already checked against these very rules, spanning at
    most `room` levels (`tree.Grafts.vetted`: the fast path's decoder vets as it converts); they
    are not walked again (a 20 MB payload's walk takes ~0.13 s).
    """
    if not isinstance(payload, dict):
        raise MergeError(
            f"a payload must be a struct of config sections, got {_type_name(payload)}"
        )
    if not payload:
        raise MergeError("the payload is empty: it names no config section")
    result = _normalize(payload, "", 0, vetted)
    if not isinstance(result, dict):
        raise MergeError("a payload must be a struct of config sections, got an array (numeric keys)")
    vips = result.get("virtualip")
    if isinstance(vips, dict):
        items = vips.get("vip", [])
        items = [items] if isinstance(items, dict) else items
        if not isinstance(items, list) or not all(isinstance(vip, dict) for vip in items):
            raise MergeError("virtualip.vip: every VIP must be a struct")
    return result

def _type_name(value: Any) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a struct"
    return type(value).__name__

# Key kinds, cached: a payload repeats the same few hundred tag names a million times.
_ELEMENT_KEY, _ATTRIBUTES_KEY, _BAD_KEY = 1, 2, 0

_KEY_KINDS: dict[str, int] = {}

def _key_kind(key: str) -> int:
    kind = _KEY_KINDS.get(key)
    if kind is None:
        if key == ATTRIBUTES or (key.endswith(ATTRIBUTES) and NAME_RE.match(key[: -len(ATTRIBUTES)])):
            kind = _ATTRIBUTES_KEY
        else:
            kind = _ELEMENT_KEY if NAME_RE.match(key) else _BAD_KEY
        if len(_KEY_KINDS) < 65536:
            _KEY_KINDS[key] = kind
    return kind

def _normalize(value: Any, path: str, depth: int, vetted: Callable[[Any, int], bool] | None = None) -> Any:
    """Validate `value`; copy-on-write: containers come back as the same object unless a PHP
    list-hole struct inside them had to become a list (a 50 MB payload is not copied)."""
    if depth > MAX_DEPTH:
        raise MergeError(f"{path or 'payload'}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        if vetted is not None and vetted(value, MAX_DEPTH - depth):
            return value
        if value:
            first = next(iter(value))
            if isinstance(first, str) and _NUMERIC_KEY.match(first) and \
                    all(isinstance(k, str) and _NUMERIC_KEY.match(k) for k in value):
                return [_normalize(item, f"{path}[{k}]", depth + 1, vetted) for k, item in value.items()]
        out: dict[str, Any] | None = None
        shortcut = depth < MAX_DEPTH  # a scalar one level down is within the limit
        for key, item in value.items():
            if not isinstance(key, str):
                raise MergeError(f"{path}.{key}: keys must be strings" if path else f"{key}: keys must be strings")
            kind = _key_kind(key)
            if kind == _ELEMENT_KEY:
                if isinstance(item, (dict, list)) or not shortcut:
                    new = _normalize(item, f"{path}.{key}" if path else key, depth + 1, vetted)
                elif isinstance(item, str) and item.isprintable() and item != REDACTED:
                    continue  # the common case, checked inline: printable text has no XML-invalid character
                else:
                    new = _check_scalar(item, f"{path}.{key}" if path else key)
            elif kind == _ATTRIBUTES_KEY:
                new = _normalize_attributes(item, f"{path}.{key}" if path else key)
            else:
                where = f"{path}.{key}" if path else key
                raise MergeError(f"{where}: {key!r} cannot be a config.xml element name")
            if new is not item:
                if out is None:
                    out = dict(value)
                out[key] = new
        return value if out is None else out
    if isinstance(value, list):
        copied: list[Any] | None = None
        shortcut = depth < MAX_DEPTH
        for index, item in enumerate(value):
            if shortcut and isinstance(item, str) and item.isprintable() and item != REDACTED:
                continue
            new = _normalize(item, f"{path}[{index}]", depth + 1, vetted)
            if new is not item:
                if copied is None:
                    copied = list(value)
                copied[index] = new
        return value if copied is None else copied
    return _check_scalar(value, path)

def _check_scalar(value: Any, path: str) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        raise MergeError(f"{path}: {value} is not a config value")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if not _carries_xml(value):
            raise MergeError(f"{path}: text contains characters XML cannot carry")
        if value == REDACTED:
            raise MergeError(
                f"{path}: this payload was printed with --redact; merging it would store the "
                "redaction marker as a secret. Produce it again without --redact"
            )
        return value
    raise MergeError(f"{path}: a config value cannot be {type(value).__name__}")

def _carries_xml(text: str) -> bool:
    """No character XML cannot carry (printable text has none: checked first, it is cheaper)."""
    return text.isprintable() or not _XML_INVALID.search(text)


def _name_ok(name: str) -> bool:
    """An element or attribute name validation accepts."""
    return _key_kind(name) == _ELEMENT_KEY


# The rules above, for the fast path's decoder to vet records as it converts them (`tree.Grafts`).
TEXT_RULES = TextRules(name_ok=_name_ok, refused=frozenset({REDACTED}))


def _normalize_attributes(value: Any, path: str) -> Any:
    if isinstance(value, list) and not value:
        return {}
    if not isinstance(value, dict):
        raise MergeError(f"{path}: attributes must be a struct of names to strings")
    for name, item in value.items():
        if not isinstance(name, str) or not _name_ok(name):
            raise MergeError(f"{path}: {name!r} cannot be an attribute name")
        if isinstance(item, (dict, list)):
            raise MergeError(f"{path}.{name}: an attribute value must be a string")
        _check_scalar(item, f"{path}.{name}")
    return value

def check_payload(payload: Mapping[str, Any], registry: SyncItemRegistry, accept_unknown: bool = False) -> list[str]:
    """Refuse protected and uncovered sections; return the section paths the payload touches.

    A path is covered when a registered item's section equals it or lies above it. The walk goes
    down only through levels that are a strict prefix of some registered section (the
    intermediate levels of a dotted copy), so `system: {user: ...}` is fine while
    `system: {hostname: ...}` is refused.
    """
    protected = [key for key in payload if key in PROTECTED_KEYS]
    if protected:
        raise MergeError(
            f"refusing to overwrite this node's own {', '.join(protected)}: these sections are "
            "node-specific and never synchronised"
        )
    if "system" in payload and not isinstance(payload["system"], dict):
        raise MergeError("refusing to replace the whole system section; only sub-paths such as system.user merge")
    sections = registry.covering_sections()
    sections += [path for path, anchor in COMPANION_PATHS.items() if registry.is_covered(anchor)]
    points: list[str] = []
    unknown: list[str] = []

    def walk(value: Mapping[str, Any], prefix: str) -> None:
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            if any(path == s or path.startswith(s + ".") for s in sections):
                points.append(path)
            elif isinstance(item, dict) and key != ATTRIBUTES and any(s.startswith(path + ".") for s in sections):
                walk(item, path)
            else:
                unknown.append(path)

    walk(payload, "")
    if unknown and not accept_unknown:
        raise MergeError(
            f"refusing section(s) {', '.join(unknown)}: no registered sync item covers them "
            "(install the plugin's item file in the items directory, or pass --accept-unknown-sections)"
        )
    return points + unknown
