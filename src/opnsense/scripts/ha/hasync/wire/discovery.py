"""What a backup offers, found out by the primary: one probe per sync, and which peers are stock.

`probe` asks `opnsense.firmware_version` plus `hasync.capabilities` and/or `hasync.digest` in one
`system.multicall`; `compact_probe` asks our agent's `hasync.sync_probe` for the same in a few
KB; a backup that answered as stock OPNsense is remembered (`PEERS_FILE`) so it is not asked
again every sync. `discover` reads `system.listMethods` for the commands that need `hasync.*`
methods (diff, check, rollback --remote) and `stock_note` says what a stock backup cannot do.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hasync.core.errors import HaError, RemoteFault
from hasync.core.fileio import atomic_write
from hasync.core.paths import state_dir
from hasync.payload import digest as digestmod
from hasync.wire import xmlrpc
from hasync.wire.client import PeerClient
from hasync.wire.protocol import DIGEST_METHOD, FAST_PATH_FEATURE

log = logging.getLogger("hasync.discovery")

PREFIX = "hasync."  # our agent's own methods; OPNsense has none in this namespace


PROBE_METHOD = "hasync.sync_probe"

PROBE_REPLY_LIMIT = 1024 * 1024

class PeerProbe:
    """What one round trip told us about the backup (filled in as the replies are read)."""

    def __init__(self, firmware: Any, capabilities: dict[str, Any] | None = None, digests: Any = None,
                 note: str = "", extensions: bool = False) -> None:
        self.firmware = firmware
        self.capabilities = capabilities  # None: not asked, or no hasync.capabilities (stock)
        self.digests = digests  # the raw hasync.digest reply, when asked for and offered
        self.note = note
        self.extensions = extensions  # the peer answered a hasync.* call: one of our agents

    @property
    def fast_path(self) -> bool:
        return self.offers(FAST_PATH_FEATURE)

    def offers(self, feature: str) -> bool:
        features = (self.capabilities or {}).get("features") or []
        return isinstance(features, list) and feature in features

def _multicall_value(entry: Any) -> tuple[bool, Any]:
    try:
        return True, xmlrpc.multicall_entry(entry)
    except (xmlrpc.Fault, xmlrpc.XmlRpcDecodeError):
        return False, entry

def probe(peer: Any, digest_items: Sequence[str] | None = None, capabilities: bool = True,
          while_waiting: Callable[[], None] | None = None) -> PeerProbe:
    """firmware_version plus hasync.capabilities and/or hasync.digest, in one request.

    One `system.multicall` saves TLS handshakes and logins (a bcrypt verify each) per sync. A
    peer without multicall gets the calls one by one; a peer without `hasync.*` answers those
    with faults, which simply mean "stock backup". A digest-first sync leaves the capabilities
    out (a no-op sync never needs them: fewer bytes) and asks for them only when it sends.
    `while_waiting` goes to the first request (`PeerClient.call`), so it runs once.
    """
    names = ["opnsense.firmware_version"] + (["hasync.capabilities"] if capabilities else [])
    calls: list[dict[str, Any]] = [{"methodName": name, "params": []} for name in names]
    if digest_items is not None:
        calls.append({"methodName": DIGEST_METHOD, "params": [list(digest_items)]})
    try:
        replies = peer.call("system.multicall", [calls], while_waiting=while_waiting)
    except RemoteFault:
        replies = None
    if not isinstance(replies, list) or len(replies) != len(calls):
        return _probe_one_by_one(peer, digest_items, capabilities)
    ok, firmware = _multicall_value(replies[0])
    if not ok:
        firmware = peer.call("opnsense.firmware_version")  # the real error, from the real call
    result = PeerProbe(firmware)
    if capabilities:
        ok, caps = _multicall_value(replies[1])
        result.capabilities = caps if ok and isinstance(caps, dict) else None
        result.extensions = result.capabilities is not None
    if digest_items is not None:
        ok, digests = _multicall_value(replies[-1])
        result.digests = digests if ok else None
        result.extensions = result.extensions or result.digests is not None
    return result

def _probe_one_by_one(peer: Any, digest_items: Sequence[str] | None, capabilities: bool) -> PeerProbe:
    result = PeerProbe(peer.call("opnsense.firmware_version"), note="the backup has no system.multicall")
    try:
        if capabilities:
            caps = peer.call("hasync.capabilities")
            result.capabilities = caps if isinstance(caps, dict) else None
        if digest_items is not None:
            result.digests = peer.call(DIGEST_METHOD, [list(digest_items)])
    except RemoteFault:
        return result
    result.extensions = result.capabilities is not None or result.digests is not None
    return result

PEERS_FILE = "sync-peers.json"

def _peers(conf_dir: Path) -> tuple[Path, dict[str, str]]:
    path = state_dir(conf_dir) / PEERS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    return path, {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

def remember_peer(conf_dir: Path, url: str, stock: bool) -> None:
    """Which probe a backup answers, so a stock one is not asked for `PROBE_METHOD` every sync."""
    path, peers = _peers(conf_dir)
    if (peers.get(url) == "stock") == stock:
        return
    if stock:
        peers[url] = "stock"
    else:
        peers.pop(url, None)
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, json.dumps(peers, indent=1, sort_keys=True) + "\n", mode=0o600)
    except OSError as exc:
        log.info("could not store %s: %s", path, exc)

def compact_probe(peer: Any, item_ids: Sequence[str], conf_dir: Path) -> PeerProbe | None:
    """firmware_version, digests and features in one small request and reply (`PROBE_METHOD`).

    The same digests as `hasync.digest`, in zlib-compressed JSON: a no-op sync then fits in a few
    KB on the wire, TLS handshake included. None when the peer does not offer it.
    """

    if _peers(conf_dir)[1].get(peer.url) == "stock":
        return None
    try:
        reply = peer.call(PROBE_METHOD, [",".join(item_ids)])
    except RemoteFault:
        return None
    try:
        if not isinstance(reply, bytes):
            raise ValueError("not base64")
        inflater = zlib.decompressobj()
        text = inflater.decompress(reply, PROBE_REPLY_LIMIT)
        if inflater.unconsumed_tail or not inflater.eof:
            raise ValueError("too large or truncated")
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ValueError("not a struct")
    except (ValueError, zlib.error) as exc:
        raise HaError(f"{PROBE_METHOD}: malformed reply from {peer.peer_key} ({exc})") from None
    features = document.get("features")
    digests = digestmod.digest_reply(document.get("items") or {}, document.get("unknown") or [])
    digests["canonical"], digests["algorithm"] = document.get("canonical"), document.get("algorithm")
    return PeerProbe(document.get("firmware"), {"features": features if isinstance(features, list) else []},
                     digests, extensions=True)


class PeerFeatures(NamedTuple):
    """What `system.listMethods` said a peer offers."""

    methods: frozenset[str]
    error: str = ""

    def has(self, method: str) -> bool:
        return method in self.methods

    @property
    def extensions(self) -> bool:
        return any(name.startswith(PREFIX) for name in self.methods)

    def as_json(self) -> dict[str, Any]:
        return {"extensions": self.extensions, "methods": sorted(m for m in self.methods if m.startswith(PREFIX)),
                "error": self.error}

def discover(peer: PeerClient) -> PeerFeatures:
    """Ask the peer for its method list. Transport/auth errors propagate; a fault means 'none'."""
    try:
        reply = peer.call("system.listMethods")
    except RemoteFault as exc:
        return PeerFeatures(frozenset(), f"system.listMethods failed: {exc.fault_string}")
    if not isinstance(reply, list):
        return PeerFeatures(frozenset(), f"system.listMethods answered {str(reply)[:80]!r}")
    return PeerFeatures(frozenset(str(name) for name in reply))

def stock_note(peer: PeerClient, what: str) -> str:
    """The plain sentence every fallback prints."""
    return (f"FALLBACK: the backup {peer.peer_key} offers no hasync.* methods (a stock OPNsense backup, or "
            f"opnsense-ha's agent run with --no-extensions); {what}")

def as_struct(value: Any) -> dict[str, Any]:
    """An XML-RPC struct that may have travelled as an empty array (PHP's empty array)."""
    if isinstance(value, dict):
        return value
    if value in ([], "", None):
        return {}
    raise HaError(f"expected a struct, got {str(value)[:80]!r}")
