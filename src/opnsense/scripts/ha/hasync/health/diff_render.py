"""How a diff is shown: the per-record summary, a unified diff of XML, and JSON; secrets never.

The model and the comparison are `health.diff`; this module only renders a `DiffReport`.
A secret field shows as a stable token (`SecretTokens`: the same value gives the same token,
a changed one a new token), so an admin sees *that* a password changed, never the value.
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Callable
from typing import Any

from hasync.config.tree import ATTRIBUTES
from hasync.core import schemas
from hasync.core.secrets import is_secret_name, is_secret_path
from hasync.health.diff import MISSING, DiffReport, FieldChange, RecordChange, join_path
from hasync.payload import pernode

# --- rendering --------------------------------------------------------------------------------

COLOURS = {"added": "\033[32m", "removed": "\033[31m", "changed": "\033[33m", "moved": "\033[36m",
           "header": "\033[1m", "note": "\033[35m"}
RESET = "\033[0m"
MARKS = {"added": "+", "removed": "-", "changed": "~", "moved": ">"}


def _paint(enabled: bool) -> Callable[[str, str], str]:
    def paint(text: str, kind: str) -> str:
        return f"{COLOURS[kind]}{text}{RESET}" if enabled and kind in COLOURS else text

    return paint


def show_value(value: Any, limit: int = 160) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, (list, tuple)):
        text = "[" + ", ".join(show_value(v, 40) for v in value) + "]"
    else:
        text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _declared_line(note: pernode.Note) -> str:
    if note.kind == pernode.KEPT:
        return f"{note.path}: {note.kind} (declared local)"
    if is_secret_path(note.path):
        return f"{note.path}: {note.kind} for the backup (secret)"
    return f"{note.path}: {note.kind} for the backup: {show_value(note.old)} -> {show_value(note.new)}"


def _field_line(change: FieldChange) -> str:
    if change.secret:
        return f"{change.field}: (secret) {change.change}"
    return f"{change.field}: {show_value(change.old)} -> {show_value(change.new)}"


def _position(change: RecordChange) -> str:
    if change.kind == "added":
        return f" (at #{change.new_position})"
    if change.kind == "removed":
        return f" (was #{change.old_position})"
    if change.moved:
        return f" moved #{change.old_position} -> #{change.new_position}"
    return ""


def render_summary(report: DiffReport, colour: bool = False, verbose_added: bool = False) -> str:
    paint = _paint(colour)
    lines: list[str] = []
    source = "live, from the backup's hasync.* methods" if report.source == "live" else "FALLBACK: snapshot"
    lines.append(paint(f"opnsense-ha diff: this node -> backup {report.target} ({source})", "header"))
    if report.note:
        lines.append(paint(report.note, "note"))
    for item in report.items:
        counts = item.counts()
        declared = [f"  = {_declared_line(note)}" for note in item.declared]
        if item.status == "same":
            lines.append(f"{item.id}: no differences" + (f" ({item.note})" if item.note else ""))
            lines.extend(declared)
            continue
        if item.status == "unknown":
            lines.append(paint(f"{item.id}: unknown: {item.note}", "changed"))
            continue
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        lines.append(paint(f"{item.id} ({item.description}): {summary}", "header"))
        for change in item.changes:
            kind = "moved" if change.kind == "moved" else change.kind
            # a named record is known by its name; the others by their label and matching key
            name = change.label if change.name or change.label == change.key or not change.key \
                else f"{change.label} [{change.key}]"
            lines.append(paint(f"  {MARKS[kind]} {change.path} {name}{_position(change)}", kind))
            if change.kind == "changed" or (verbose_added and change.kind in ("added", "removed")):
                lines.extend(f"      {_field_line(f)}" for f in change.fields)
        lines.extend(paint(f"  ! {warning}", "note") for warning in item.warnings)
        lines.extend(declared)
        if item.lockout:
            lines.append(paint(f"  LOCK-OUT: the backup would refuse this sync: {item.lockout} "
                               "(sync --allow-lockout forces it)", "removed"))
    total = report.differences
    lines.append(f"{total} of {len(report.items)} item(s) differ" if total else "no differences")
    return "\n".join(lines)


class SecretTokens:
    """Per-run tokens for secret values: equal values, equal tokens; no key survives the run."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    def token(self, value: str) -> str:
        if value == "":
            return ""
        return "(secret " + hmac.new(self._key, value.encode(), hashlib.sha256).hexdigest()[:8] + ")"


def _xml_lines(value: Any, tag: str, path: str, indent: int, tokens: SecretTokens) -> list[str]:
    pad = "  " * indent
    if isinstance(value, list):
        return [line for item in value for line in _xml_lines(item, tag, path, indent, tokens)]
    if isinstance(value, dict):
        found = value.get(ATTRIBUTES)
        attrs: dict[str, Any] = found if isinstance(found, dict) else {}
        attr_text = "".join(f' {k}="{tokens.token(str(v)) if is_secret_name(k) else v}"' for k, v in attrs.items())
        children = [(k, v) for k, v in value.items() if not k.endswith(ATTRIBUTES)]
        if not children:
            return [f"{pad}<{tag}{attr_text}/>"]
        lines = [f"{pad}<{tag}{attr_text}>"]
        for key, item in children:
            lines.extend(_xml_lines(item, key, join_path(path, key), indent + 1, tokens))
        lines.append(f"{pad}</{tag}>")
        return lines
    text = str(value)
    if is_secret_path(path):
        text = tokens.token(text)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace("\n", "&#10;")
    return [f"{pad}<{tag}>{text}</{tag}>" if text else f"{pad}<{tag}/>"]


def render_xml(value: Any, tokens: SecretTokens) -> list[str]:
    if not isinstance(value, dict):
        return []
    return [line for key, item in value.items() for line in _xml_lines(item, key, key, 0, tokens)]


def render_unified(report: DiffReport, colour: bool = False) -> str:
    paint = _paint(colour)
    tokens = SecretTokens()
    lines: list[str] = []
    if report.note:
        lines.append(paint(report.note, "note"))
    for item in report.items:
        if item.status == "unknown":
            lines.append(f"# {item.id}: unknown: {item.note}")
            continue
        if not item.changes:
            continue
        old = render_xml(item.before, tokens)
        new = render_xml(item.after, tokens)
        label = "snapshot of the last push" if report.fallback else "backup has"
        for line in difflib.unified_diff(old, new, f"{item.id} ({label})", f"{item.id} (after sync)", lineterm=""):
            if line.startswith(("+++", "---")):
                lines.append(paint(line, "header"))
            elif line.startswith("+"):
                lines.append(paint(line, "added"))
            elif line.startswith("-"):
                lines.append(paint(line, "removed"))
            elif line.startswith("@@"):
                lines.append(paint(line, "moved"))
            else:
                lines.append(line)
        lines.extend(f"# {item.id}: {warning}" for warning in item.warnings)
        if item.lockout:
            lines.append(paint(f"# {item.id}: LOCK-OUT: the backup would refuse this sync: {item.lockout}", "removed"))
    return "\n".join(lines)


def render_json(report: DiffReport) -> str:
    document = report.as_json()
    schemas.validate("diff-result", document)
    return json.dumps(document, indent=2)


def colour_wanted(mode: str, stream: Any) -> bool:
    """`auto`: colour only on a terminal and only without NO_COLOR (https://no-color.org)."""
    if mode == "always":
        return True
    if mode == "never":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"
