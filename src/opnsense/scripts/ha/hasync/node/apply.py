"""Offline sync: a payload file (as `opnsense-ha payload` prints it) merged into this node's config.

The file is the nested value as JSON or the exact `opnsense.restore_config_section` methodCall;
it is checked before the lock is taken and merged by the same engine the agent uses, under one
exclusive lock and one new revision (`opnsense-ha apply-payload`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import MergeError
from hasync.payload.merge import METHOD, MergeReport, merge_payload, revision_description
from hasync.payload.validate import MAX_PAYLOAD_BYTES, check_payload, normalize_payload
from hasync.wire import xmlrpc


def load_payload_bytes(data: bytes, source: str = "payload") -> dict[str, Any]:
    """Decode a payload given as JSON (the nested value) or as an XML-RPC methodCall."""
    if len(data) > MAX_PAYLOAD_BYTES:
        raise MergeError(f"{source}: {len(data)} bytes is more than the {MAX_PAYLOAD_BYTES} allowed")
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    value: Any
    if head == b"<":
        try:
            method, params = xmlrpc.loads_request(data)
        except xmlrpc.XmlRpcDecodeError as exc:
            raise MergeError(f"{source}: not a valid XML-RPC methodCall: {exc}") from None
        if method != METHOD:
            raise MergeError(f"{source}: the methodCall is {method}, expected {METHOD}")
        if len(params) != 1:
            raise MergeError(f"{source}: {METHOD} takes exactly one struct, the call has {len(params)} params")
        value = params[0]
    elif head in (b"{", b"["):
        try:
            value = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise MergeError(f"{source}: not UTF-8 text ({exc.reason})") from None
        except json.JSONDecodeError as exc:
            raise MergeError(f"{source}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
        except RecursionError:
            raise MergeError(f"{source}: JSON nested too deeply") from None
    else:
        raise MergeError(f"{source}: neither JSON nor an XML-RPC methodCall")
    try:
        return normalize_payload(value)
    except MergeError as exc:
        raise MergeError(f"{source}: {exc}") from None

def apply_payload_file(
    store: ConfigStore,
    path: str | Path,
    registry: SyncItemRegistry,
    accept_unknown: bool = False,
    username: str | None = None,
) -> MergeReport:
    """Offline sync: merge a payload file into the store's config under one exclusive lock.

    `username` goes into the revision (the store's default, "(system)", when None).
    """
    source = Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise MergeError(f"{source}: cannot read: {exc.strerror or exc}") from None
    payload = load_payload_bytes(data, str(source))
    try:
        check_payload(payload, registry, accept_unknown)  # fail before taking the lock
    except MergeError as exc:
        raise MergeError(f"{source}: {exc}") from None
    description = revision_description(payload)
    transaction = (
        store.transaction(description) if username is None else store.transaction(description, username=username)
    )
    with transaction as root:
        report = merge_payload(root, payload, registry, accept_unknown=accept_unknown)
    return report
