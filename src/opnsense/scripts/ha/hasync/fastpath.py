"""The fast path between two opnsense-ha nodes: compressed XML subtrees instead of XML-RPC structs.

Why: the compatible `opnsense.restore_config_section` call carries the payload as nested XML-RPC
structs, about twice the size of the config, and both ends walk every value in Python (PHP's
array form, then IXR markup, then back). Between two agents of ours the primary can send what it
already has, the config's own XML, compressed. Stock OPNsense peers never see this: the client
uses it only when the backup's `hasync.capabilities` lists the feature `FEATURE`.

Wire form (`METHOD`, one struct param):

* ``format`` = `FORMAT`, ``compression`` = ``"zlib"``, ``size`` (inflated bytes) and ``sha256``
  of the inflated document;
* ``sections``: the dotted section paths, in the order the payload would list them;
* ``pernode`` and ``interfaces`` (only when a per-node ``self_address``/``swap`` rule can touch the
  sections, e.g. the DHCP failover peer or a unicast CARP peer): the primary's rules
  (`pernode.Declarations.as_json`) and its ``{if: {ipaddr, subnet, ipaddrv6, subnetv6}}``, the
  only inputs of those rewrites that are not in the sections themselves; the agent applies the
  same function the compatible path does (it offers the feature `PERNODE_FEATURE`);
* ``data``: the zlib stream as ``<base64>`` chunks of at most `CHUNK` bytes (libxml2 refuses text
  nodes over 10 MB without its "huge" mode, which we keep off).

The inflated document is ``<sections><section path="a.b">ELEMENTS</section>...</sections>``, the
elements being the primary's subtrees at each path *before* any payload transform, or
``<section path="a.b" missing="1"/>`` for a path the primary's toArray form does not have.

Identical results by construction: the agent rebuilds the very payload the compatible path would
deliver, with the same functions (`tree.element_to_value` on the same elements, payload's VIP,
nosync and DHCP rules, in the same order), applies what the IXR round trip itself does to values
(XML line-end normalisation turns CR into LF; an empty struct travels as an empty array), and
hands the result to the handler registered for `opnsense.restore_config_section`: the same merge
engine, lock, revision text, history write and reconfiguration. `tests/test_fastpath.py` proves
payload equality on random trees and byte-identical merged configs end to end.

Bounded: the inflated size is declared up front, must not exceed `MAX_INFLATED`, and inflation
stops one byte past the declared size (a zip bomb costs at most the declared size); the
document is parsed with `xmlsafe` (no DTD, no entities, depth limit).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from . import pernode, xmlrpc, xmlsafe
from .errors import ConfigError, HaError, MethodFault, RemoteFault
from .items import SyncItemRegistry
from .payload import (
    VIRTUALIP,
    _vip_section,
    check_sections,
    payload_for_items,
    place_at,
    remove_nosync,
    shipped_declarations,
)
from .store import ConfigStore, parse_config_bytes
from .tree import LIST_TAGS, element_to_value

if TYPE_CHECKING:  # the agent's server is the backup's; a primary building a payload does not load it
    from .agent import CallContext, Dispatcher

log = logging.getLogger("hasync.fastpath")

METHOD = "hasync.restore_sections_xml"
FEATURE = "restore_sections_xml"
PERNODE_FEATURE = "pernode-1"  # the agent applies the primary's self_address/swap rules sent along
FORMAT = "hasync-sections-1"
COMPRESSION = "zlib"
CHUNK = 6 * 1024 * 1024  # raw bytes per <base64> param item: 8 MiB of base64, under libxml2's 10 MB
MAX_INFLATED = 768 * 1024 * 1024
COMPRESS_LEVEL = 1  # loopback and LAN links are fast; level 1 gets ~4x on configs at ~100 MB/s
RESTORE_METHOD = "opnsense.restore_config_section"


# --- the primary: sections as XML --------------------------------------------------------------


def locate(root: etree._Element, dotted: str) -> list[etree._Element] | None:
    """The elements whose toArray value sits at `dotted`, or None when the path is missing.

    `payload._copy_section` walks PHP's array form: every level above the last must be a dict
    there, which toArray makes only of a single element with children whose tag is not a list
    tag; the last level is the whole group of children with that tag.
    """
    parts = dotted.split(".")
    node = root
    for part in parts[:-1]:
        if part in LIST_TAGS:
            return None
        group = [child for child in node if child.tag == part]
        if len(group) != 1 or len(group[0]) == 0:
            return None
        node = group[0]
    group = [child for child in node if child.tag == parts[-1]]
    return group or None


@dataclass
class SectionsBlob:
    """What the primary sends: the struct for `METHOD` plus numbers for the report."""

    param: dict[str, Any]
    sections: list[str]
    size: int
    compressed: int

    @property
    def ratio(self) -> float:
        return self.compressed / self.size if self.size else 1.0


def _interfaces_for_rewrite(root: etree._Element) -> dict[str, dict[str, str]]:
    """The primary's `interfaces` reduced to what `pernode.address_facing` reads."""
    holder = etree.Element("holder")
    for node in root:
        if node.tag == "interfaces":
            holder.append(copy.deepcopy(node))
    return pernode.interfaces_for_rewrite(element_to_value(holder).get("interfaces"))


def build_blob(root: etree._Element, sections: Sequence[str], level: int = COMPRESS_LEVEL,
               declarations: pernode.Declarations | None = None) -> SectionsBlob:
    """Serialise and compress the subtrees at `sections` of the primary's config tree.

    Section paths are checked exactly as for the compatible payload (node-specific ones are
    refused). The document is compressed as it is produced, so the primary never holds the
    inflated document and the compressed one at once.
    """
    from xml.sax.saxutils import quoteattr  # here: it pulls in urllib, and a no-op sync builds no blob

    wanted = check_sections(sections)
    compressor = zlib.compressobj(level)
    digest = hashlib.sha256()
    out: list[bytes] = []
    size = 0

    def put(data: bytes) -> None:
        nonlocal size
        digest.update(data)
        size += len(data)
        piece = compressor.compress(data)
        if piece:
            out.append(piece)

    put(b'<?xml version="1.0" encoding="UTF-8"?>\n<sections>')
    for dotted in wanted:
        group = locate(root, dotted)
        if group is None:
            put(f"<section path={quoteattr(dotted)} missing=\"1\"/>".encode())
            continue
        put(f"<section path={quoteattr(dotted)}>".encode())
        for node in group:
            put(etree.tostring(node, encoding="utf-8", with_tail=False))
        put(b"</section>")
    put(b"</sections>")
    out.append(compressor.flush())
    stream = b"".join(out)
    param: dict[str, Any] = {
        "format": FORMAT,
        "compression": COMPRESSION,
        "size": size,
        "sha256": digest.hexdigest(),
        "sections": list(wanted),
        "data": [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)] or [b""],
    }
    rules = (shipped_declarations() if declarations is None else declarations).rewriting(wanted)
    if rules:
        param["pernode"] = rules.as_json()
        param["interfaces"] = _interfaces_for_rewrite(root)
    return SectionsBlob(param, list(wanted), size, len(stream))


# --- the backup: from the blob back to the payload ---------------------------------------------


def inflate(chunks: Iterable[bytes], declared: int, limit: int = MAX_INFLATED) -> bytes:
    """Inflate a zlib stream, never producing more than `declared` (≤ `limit`) bytes."""
    if declared < 0 or declared > limit:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: declared size {declared} is over the {limit} allowed")
    inflater = zlib.decompressobj()
    pieces: list[bytes] = []
    total = 0
    try:
        for chunk in chunks:
            data = chunk
            while data:
                piece = inflater.decompress(data, declared - total + 1)
                total += len(piece)
                if total > declared:
                    raise MethodFault(xmlrpc.INVALID_PARAMS,
                                      f"{METHOD}: the data inflates past its declared size of {declared} bytes")
                pieces.append(piece)
                data = inflater.unconsumed_tail
                if inflater.eof:
                    break
            if inflater.eof and (data or inflater.unused_data):
                raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: trailing data after the compressed stream")
        if not inflater.eof:
            raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: the compressed stream is truncated")
    except zlib.error as exc:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: corrupt compressed data ({exc})") from None
    if total != declared:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: inflated to {total} bytes, {declared} declared")
    return b"".join(pieces)


def _ixr_roundtrip_fix(value: Any) -> Any:
    """What the IXR round trip does to a toArray value beyond line ends: an empty struct
    (from an element holding only comments) travels as an empty array."""
    if isinstance(value, dict):
        if not value:
            return []
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = _ixr_roundtrip_fix(item)
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                value[index] = _ixr_roundtrip_fix(item)
    return value


def _fault(text: str) -> MethodFault:
    return MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: {text}")


def _check_param(argument: Any) -> tuple[list[str], list[bytes], int, str, dict[str, Any] | None,
                                         pernode.Declarations | None]:
    if not isinstance(argument, dict):
        raise _fault("expects one struct")
    if argument.get("format") != FORMAT:
        raise _fault(f"unknown format {str(argument.get('format'))[:40]!r}, this agent reads {FORMAT!r}")
    if argument.get("compression") != COMPRESSION:
        raise _fault(f"unknown compression {str(argument.get('compression'))[:20]!r}")
    sections = argument.get("sections")
    if not isinstance(sections, list) or not sections or not all(isinstance(s, str) for s in sections):
        raise _fault("'sections' must be a non-empty array of dotted paths")
    data = argument.get("data")
    if isinstance(data, bytes):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(chunk, bytes) for chunk in data):
        raise _fault("'data' must be an array of base64 chunks")
    size = argument.get("size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise _fault("'size' must be an integer")
    sha = argument.get("sha256")
    if not isinstance(sha, str):
        raise _fault("'sha256' must be a hex string")
    interfaces = argument.get("interfaces")
    if interfaces is not None:
        interfaces = interfaces if interfaces != [] else {}
        if not isinstance(interfaces, dict) or not all(
            isinstance(conf, dict) and all(isinstance(text, str) for text in conf.values())
            for conf in interfaces.values()
        ):
            raise _fault("'interfaces' must map interface names to {ipaddr, subnet, ipaddrv6, subnetv6}")
    rules = None
    if "pernode" in argument:
        try:
            rules = pernode.from_wire(argument["pernode"])
        except (ValueError, TypeError) as exc:
            raise _fault(f"'pernode': {exc}") from None
    return sections, data, size, sha, interfaces, rules


def payload_from_document(
    document: bytes, sections: Sequence[str], interfaces: dict[str, Any] | None,
    rules: pernode.Declarations | None = None,
) -> dict[str, Any]:
    """Rebuild the compatible payload from the inflated sections document (see module docstring)."""
    # XML-RPC carries CR raw and the receiving parser turns CR LF and lone CR into LF; lxml wrote
    # every CR of a value as a character reference (a LF too, inside attribute values), which is
    # the only way one can be in here. LF goes back as a reference: raw, an attribute would
    # read it as a space.
    if b"&#13;" in document:
        document = (document.replace(b"&#13;&#10;", b"&#10;").replace(b"&#13;\n", b"\n")
                    .replace(b"&#13;", b"&#10;"))
    try:
        top = xmlsafe.parse_bytes(document, remove_blank_text=False)
    except etree.XMLSyntaxError as exc:
        raise _fault(f"the sections document is not well-formed ({exc})") from None
    except xmlsafe.UnsafeXmlError as exc:
        raise _fault(str(exc)) from None
    holders = [node for node in top if isinstance(node.tag, str)]
    if top.tag != "sections" or [h.get("path") for h in holders] != list(sections) or \
            any(h.tag != "section" for h in holders):
        raise _fault("the sections document does not list the announced sections")
    payload: dict[str, Any] = {}
    for holder in holders:
        dotted = str(holder.get("path"))
        last = dotted.split(".")[-1]
        missing = holder.get("missing") == "1"
        if not missing and (len(holder) == 0 or any(isinstance(c.tag, str) and c.tag != last for c in holder)):
            raise _fault(f"section {dotted}: expected <{last}> elements only")
        holder.attrib.clear()  # the holder's own attributes are not part of the value
        value = None if missing else element_to_value(holder).get(last)
        if dotted == VIRTUALIP:
            payload[VIRTUALIP] = _vip_section({} if missing else {VIRTUALIP: value})
        else:
            place_at(payload, dotted.split("."), [] if missing else value)
        holder.clear()  # free the subtree as soon as it is converted
    remove_nosync(payload)
    # the primary's rules; a primary that sent none gets the rules this package ships
    rewriting = (shipped_declarations() if rules is None else rules).rewriting(sections)
    pernode.rewrite_for_backup(payload, {"interfaces": interfaces or {}}, rewriting)
    # toArray makes an empty struct only of an element holding nothing but comments or PIs, and
    # remove_nosync can empty one; IXR sends an empty struct as an empty array. Walk only then.
    start = document.find(b"?>") + 2
    if any(document.find(mark, start) >= 0 for mark in (b"nosync", b"<!--", b"<?")):
        fixed: Any = _ixr_roundtrip_fix(payload)
        return fixed
    return payload


@dataclass
class FastPathAgent:
    """The backup side of the fast path: decode, rebuild the payload, hand it to the merge."""

    dispatcher: Dispatcher
    max_inflated: int = MAX_INFLATED
    features: set[str] = field(default_factory=lambda: {FEATURE})

    def register(self) -> None:
        self.dispatcher.register(METHOD, self.restore_sections_xml)

    def restore_sections_xml(self, argument: Any, context: CallContext) -> Any:
        sections, chunks, size, sha, interfaces, rules = _check_param(argument)
        document = inflate(chunks, size, self.max_inflated)
        if hashlib.sha256(document).hexdigest() != sha.lower():
            raise _fault("the inflated document does not match its sha256")
        try:
            payload = payload_from_document(document, sections, interfaces, rules)
        except HaError as exc:  # e.g. the DHCP failover rewrite finds no interface facing the peer
            raise _fault(str(exc)) from None
        del document
        merge = self.dispatcher.methods.get(RESTORE_METHOD)
        if merge is None:
            raise _fault(f"this agent has no {RESTORE_METHOD}")
        log.debug("fast path: %d sections, %d bytes inflated, from %s@%s", len(sections), size,
                  context.username, context.remote_addr)
        return merge(payload, context)


# --- the primary: talking to a peer -------------------------------------------------------------


@dataclass
class PeerProbe:
    """What one round trip told us about the backup."""

    firmware: Any
    capabilities: dict[str, Any] | None = None  # None: not asked, or no hasync.capabilities (stock)
    digests: Any = None  # the raw hasync.digest reply, when asked for and offered
    note: str = ""
    extensions: bool = False  # the peer answered a hasync.* call: one of our agents

    @property
    def fast_path(self) -> bool:
        return self.offers(FEATURE)

    def offers(self, feature: str) -> bool:
        features = (self.capabilities or {}).get("features") or []
        return isinstance(features, list) and feature in features


def _multicall_value(entry: Any) -> tuple[bool, Any]:
    if isinstance(entry, list) and len(entry) == 1:
        return True, entry[0]
    return False, entry


def probe(peer: Any, digest_items: Sequence[str] | None = None, capabilities: bool = True) -> PeerProbe:
    """firmware_version plus hasync.capabilities and/or hasync.digest, in one request.

    One `system.multicall` saves TLS handshakes and logins (a bcrypt verify each) per sync. A
    peer without multicall gets the calls one by one; a peer without `hasync.*` answers those
    with faults, which simply mean "stock backup". A digest-first sync leaves the capabilities
    out (a no-op sync never needs them: fewer bytes) and asks for them only when it sends.
    """
    names = ["opnsense.firmware_version"] + (["hasync.capabilities"] if capabilities else [])
    calls: list[dict[str, Any]] = [{"methodName": name, "params": []} for name in names]
    if digest_items is not None:
        calls.append({"methodName": "hasync.digest", "params": [list(digest_items)]})
    try:
        replies = peer.call("system.multicall", [calls])
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
            result.digests = peer.call("hasync.digest", [list(digest_items)])
    except RemoteFault:
        return result
    result.extensions = result.capabilities is not None or result.digests is not None
    return result


PEERS_FILE = "sync-peers.json"


def _peers(conf_dir: Path) -> tuple[Path, dict[str, str]]:
    from .syncer import state_dir

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
        path.write_text(json.dumps(peers, indent=1, sort_keys=True) + "\n")
    except OSError as exc:
        log.info("could not store %s: %s", path, exc)


def compact_probe(peer: Any, item_ids: Sequence[str], conf_dir: Path) -> PeerProbe | None:
    """firmware_version, digests and features in one small request and reply (`PROBE_METHOD`).

    The same digests as `hasync.digest`, in zlib-compressed JSON: a no-op sync then fits in a few
    KB on the wire, TLS handshake included. None when the peer does not offer it.
    """
    from . import digest as digestmod

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


def send_blob(peer: Any, blob: SectionsBlob) -> Any:
    return peer.call(METHOD, [blob.param])


Describe = Callable[[SectionsBlob], str]


def describe(blob: SectionsBlob) -> str:
    return (f"fast path: {len(blob.sections)} sections, {blob.size} bytes of XML sent as {blob.compressed} "
            f"({blob.ratio:.0%})")


def decode_param_for_tests(param: dict[str, Any]) -> dict[str, Any]:
    """The payload the agent would merge for `param` (no merge): used by the equivalence tests."""
    sections, chunks, size, sha, interfaces, rules = _check_param(param)
    document = inflate(chunks, size)
    if hashlib.sha256(document).hexdigest() != sha:
        raise _fault("sha256 mismatch")
    return payload_from_document(document, sections, interfaces, rules)




# --- derived data of config.xml, valid while the file is unchanged -------------------------------

RACY_WINDOW = 1.0  # seconds: a file modified this recently is also checked by content


def file_key(path: Path) -> tuple[int, ...] | None:
    """The identity of one version of a file: device, inode, size, mtime and ctime (ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class ConfigCache:
    """The agent's parsed config.xml and per-item digests, for read-only use between writes.

    Why: every request authenticates against config.xml, and `hasync.digest`/`capabilities`
    read it too. Parsing a 50 MB config costs ~0.6 s and digesting it seconds, which would make
    every no-op sync as slow as a full one. An entry is valid while the file's identity (device,
    inode, size, mtime, ctime) is unchanged; an entry taken while the file was younger than
    `RACY_WINDOW` is also checked by content hash until the file is older (two writes in one
    timestamp tick with the same size would look unchanged otherwise; git's "racily clean").
    Callers must not modify the tree `root()` returns. It is never handed to a writer either:
    logins read it outside the cache's lock, so a merge always works on its own parse.
    """

    def __init__(self, store: ConfigStore, registry: SyncItemRegistry,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.registry = registry
        self.clock = clock
        self._lock = threading.RLock()
        self._key: tuple[int, ...] | None = None
        self._content: str | None = None  # sha256 of the bytes, while the entry is racy
        self._root: etree._Element | None = None
        self._digests: dict[str, str] = {}
        self._capabilities: dict[str, Any] | None = None
        self.loads = 0  # how often config.xml was parsed (tests use it)
        store.written = self.adopt

    def _valid(self) -> bool:
        key = file_key(self.store.config_path)
        if key is None or key != self._key:
            return False
        if self._content is not None:
            if hashlib.sha256(self.store.read_bytes()).hexdigest() != self._content:
                return False
            if self.clock() - key[3] / 1e9 > RACY_WINDOW:
                self._content = None  # any later write gets a later mtime
        return True

    def _refresh(self) -> None:
        """Parse the current file into a new entry (the file is read once, under its lock)."""
        self.drop()
        before = file_key(self.store.config_path)
        data = self.store.read_bytes()
        try:
            root = parse_config_bytes(data, str(self.store.config_path))
        except ConfigError:
            # broken: the store's own load restores from history; nothing is cached then
            self._root = self.store.load()
            self.loads += 1
            return
        self.loads += 1
        after = file_key(self.store.config_path)
        self._root = root
        if before is not None and before == after:
            self._key = before
            young = self.clock() - before[3] / 1e9 <= RACY_WINDOW
            self._content = hashlib.sha256(data).hexdigest() if young else None

    def adopt(self, root: etree._Element, data: bytes) -> None:
        """The store just wrote `root` as `data` (its lock is held): keep that tree, no re-parse.

        Never waits for the cache: a reader holding it may be waiting for the file lock the
        writer holds, and both would wait forever. A busy cache simply stays stale (its key no
        longer matches) and re-reads later.
        """
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._key, self._content, self._root = None, None, None
            self._digests, self._capabilities = {}, None
            key = file_key(self.store.config_path)
            if key is None:
                return
            self._root, self._key = root, key
            young = self.clock() - key[3] / 1e9 <= RACY_WINDOW
            self._content = hashlib.sha256(data).hexdigest() if young else None
        finally:
            self._lock.release()

    def drop(self) -> None:
        with self._lock:
            self._key, self._content, self._root = None, None, None
            self._digests, self._capabilities = {}, None

    def root(self) -> etree._Element:
        """The config tree as of now (for reading only)."""
        with self._lock:
            if self._root is None or not self._valid():
                self._refresh()
            assert self._root is not None
            return self._root

    def digests(self, item_ids: Sequence[str]) -> tuple[dict[str, str], list[str]]:
        """Per-item canonical digests (`digest.digest` of `digest.backup_item_values`) and unknown ids."""
        from . import digest as digestmod

        with self._lock:
            root = self.root()
            wanted = [i for i in item_ids if i in self.registry and i not in self._digests]
            if wanted:
                values, _ = digestmod.backup_item_values(root, self.registry, wanted)
                fresh = digestmod.item_digests(values, self.registry)
                if self._key is not None:
                    self._digests.update(fresh)
            else:
                fresh = {}
            unknown = list(dict.fromkeys(i for i in item_ids if i not in self.registry))
            known = {i: self._digests.get(i) or fresh[i] for i in dict.fromkeys(item_ids) if i in self.registry}
            return known, unknown

    def capabilities(self, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        with self._lock:
            self.root()  # validates the entry
            if self._capabilities is None or self._key is None:
                reply = compute()
                if self._key is None:
                    return reply
                self._capabilities = reply
            return self._capabilities


PROBE_METHOD = "hasync.sync_probe"
PROBE_REPLY_LIMIT = 1024 * 1024


def _probe_ids(argument: Any) -> list[str]:
    """The item ids of a probe: one comma-separated string (the shortest form on the wire)."""
    if not isinstance(argument, str) or len(argument) > 64 * 1024:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{PROBE_METHOD} expects the item ids as one comma-separated string")
    ids = [part.strip() for part in argument.split(",") if part.strip()]
    if not ids:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{PROBE_METHOD}: no item ids")
    return list(dict.fromkeys(ids))


def _dropping_cache(cache: ConfigCache, merge: Callable[[Any, CallContext], Any]) -> Callable[[Any, CallContext], Any]:
    """`merge`, after letting go of the cached tree: the merge parses its own and the tree it
    writes becomes the cache, so holding the old one only adds a whole parsed config to the peak."""
    def handler(argument: Any, context: CallContext) -> Any:
        cache.drop()
        return merge(argument, context)

    return handler


def register(dispatcher: Dispatcher, features: set[str] | None = None,
             cache: ConfigCache | None = None) -> FastPathAgent:
    """Add `METHOD` to an agent's dispatcher; `features` (the capabilities set) gets `FEATURE`.

    With a `cache`, `hasync.digest` and `hasync.capabilities` answer from it (same functions,
    same replies, no re-parse and no re-digest while config.xml is unchanged); a merge drops the
    cached tree and parses its own, and the tree it writes becomes the cache.
    """
    agent = FastPathAgent(dispatcher)
    agent.register()
    if features is not None:
        features.update((FEATURE, PERNODE_FEATURE))
    if cache is not None:
        from .extensions import _item_ids

        for name in (RESTORE_METHOD, METHOD):
            if name in dispatcher.methods:
                dispatcher.register(name, _dropping_cache(cache, dispatcher.methods[name]))

        if "hasync.digest" in dispatcher.methods:
            def digest(argument: Any, _context: CallContext) -> dict[str, Any]:
                from . import digest as digestmod

                ids = _item_ids(argument, "hasync.digest") or cache.registry.ids()
                known, unknown = cache.digests(ids)
                return digestmod.digest_reply(known, unknown)

            dispatcher.register("hasync.digest", digest)
            def sync_probe(argument: Any, context: CallContext) -> bytes:
                from . import digest as digestmod

                ids = _probe_ids(argument)
                firmware = dispatcher.methods["opnsense.firmware_version"]([], context)
                known, unknown = cache.digests(ids)
                document = {"firmware": firmware, "canonical": digestmod.CANONICAL_FORM,
                            "algorithm": digestmod.ALGORITHM, "items": known, "unknown": unknown,
                            "features": sorted(features or ())}
                return zlib.compress(json.dumps(document, separators=(",", ":")).encode(), 9)

            dispatcher.register(PROBE_METHOD, sync_probe)
        original_caps = dispatcher.methods.get("hasync.capabilities")
        if original_caps is not None:
            def capabilities(argument: Any, context: CallContext) -> Any:
                return cache.capabilities(lambda: original_caps(argument, context))

            dispatcher.register("hasync.capabilities", capabilities)
    return agent


# --- the primary: what to send ------------------------------------------------------------------

VIEW_CACHE = "sync-digests.json"
VIEW_FORMAT = 1


class ConfigView:
    """The primary's config.xml for one sync, parsed only when something must be sent.

    A no-op sync needs the sync settings and this node's per-item digests, both functions of the
    file's content. Both are kept in `<conf-dir>/ha-state/sync-digests.json` for one version of
    the file, named by its SHA-256 and its identity (device, inode, size, mtime, ctime): when the
    identity is unchanged and the entry was verified after the racy window, the file is not
    even read; otherwise it is hashed (~30 ms for 50 MB) and compared. No secret is stored: the
    `hasync` section, which holds the sync password, is re-read from its recorded byte range of
    that very version. Parsing 50 MB takes ~600 ms and digesting it seconds.
    """

    def __init__(self, store: ConfigStore, state: Path, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.path = state / VIEW_CACHE
        self.clock = clock
        self.key = file_key(store.config_path)
        self._data: bytes | None = None
        self._root: etree._Element | None = None
        self.parsed = False
        self._cache = self._read_cache()
        if not self._cache.get("trusted"):
            self._cache = self._verified(self._cache)

    @property
    def data(self) -> bytes:
        if self._data is None:
            self._data = self.store.read_bytes()
        return self._data

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def _read_cache(self) -> dict[str, Any]:
        try:
            cached = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(cached, dict) or cached.get("format") != VIEW_FORMAT:
            return {}
        key, verified = cached.get("file_key"), cached.get("verified_at")
        cached["trusted"] = (self.key is not None and isinstance(key, list) and tuple(key) == self.key
                             and isinstance(verified, (int, float)) and verified - self.key[3] / 1e9 > RACY_WINDOW)
        return cached

    def _verified(self, cached: dict[str, Any]) -> dict[str, Any]:
        """The entry if it describes the file's current bytes (checked by hash), else nothing."""
        if not cached or cached.get("sha256") != self.sha256:
            return {}
        if self.key is not None and self.clock() - self.key[3] / 1e9 > RACY_WINDOW:
            cached["file_key"], cached["verified_at"] = list(self.key), self.clock()
            self._write(cached)  # the next run can trust the file's identity
        return cached

    @property
    def root(self) -> etree._Element:
        if self._root is None:
            self._root = parse_config_bytes(self.data, str(self.store.config_path))
            self.parsed = True
        return self._root

    def _span(self, start: int, end: int) -> bytes:
        """Bytes [start, end) of config.xml, read under its shared lock."""
        if self._data is not None:
            return self._data[start:end]
        return self.store.read_span(start, end)

    def light_root(self) -> etree._Element:
        """A tree that answers `read_hasync` and the web GUI protocol/port like the real one."""
        span = self._cache.get("hasync_span")
        webgui = self._cache.get("webgui")
        if isinstance(span, list) and len(span) == 2 and isinstance(webgui, list) and len(webgui) == 2:
            try:
                hasync = xmlsafe.parse_bytes(self._span(int(span[0]), int(span[1])), remove_blank_text=True)
            except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError):
                hasync = None
            if hasync is not None and hasync.tag == "hasync":
                light = etree.Element("opnsense")
                gui = etree.SubElement(etree.SubElement(light, "system"), "webgui")
                for tag, text in zip(("protocol", "port"), webgui, strict=True):
                    if text is not None:
                        etree.SubElement(gui, tag).text = text
                light.append(hasync)
                return light
        return self.root

    def _locate_hasync(self) -> list[int] | None:
        """The byte range of the first top-level <hasync>, verified against the parsed tree."""
        node = self.root.find("hasync")
        if node is None:
            return None
        expected = etree.tostring(node, with_tail=False)
        start = self.data.find(b"<hasync")
        while start >= 0:
            end = self.data.find(b"</hasync>", start)
            if end < 0:
                return None
            end += len(b"</hasync>")
            try:
                fragment = xmlsafe.parse_bytes(self.data[start:end], remove_blank_text=True)
            except (etree.XMLSyntaxError, xmlsafe.UnsafeXmlError):
                fragment = None
            if fragment is not None and etree.tostring(fragment) == expected:
                return [start, end]
            start = self.data.find(b"<hasync", start + 1)
        return None

    def digests(self, registry: SyncItemRegistry, item_ids: Sequence[str]) -> tuple[dict[str, str], bool]:
        """This node's digest of what it would send, per item; and whether they came from the cache."""
        from . import __version__
        from . import digest as digestmod

        signature = hashlib.sha256(json.dumps(
            [__version__, digestmod.CANONICAL_FORM, [(i, registry.get(i).sections) for i in item_ids]],
        ).encode()).hexdigest()
        cached = self._cache.get("digests", {}).get(signature)
        if isinstance(cached, dict) and set(cached) == set(item_ids):
            return {str(k): str(v) for k, v in cached.items()}, True
        values = digestmod.primary_item_values(self.root, registry, item_ids)
        digests = digestmod.item_digests(values, registry)
        self._store(signature, digests)
        return digests, False

    def _store(self, signature: str, digests: dict[str, str]) -> None:
        root = self.root
        entry: dict[str, Any] = dict(self._cache) if self._cache else {"format": VIEW_FORMAT, "sha256": self.sha256}
        entry.setdefault("digests", {})
        entry["digests"] = {**entry["digests"], signature: digests}
        entry["webgui"] = [root.findtext("system/webgui/protocol"), root.findtext("system/webgui/port")]
        span = self._locate_hasync()
        if span is not None:
            entry["hasync_span"] = span
        # the identity is recorded only for the bytes just read and hashed, and only once the
        # file is older than the racy window (a same-size rewrite in the same tick looks alike)
        if self.key is not None and file_key(self.store.config_path) == self.key:
            entry["file_key"], entry["verified_at"] = list(self.key), self.clock()
        self._cache = entry
        self._write(entry)

    def _write(self, entry: dict[str, Any]) -> None:
        entry = {k: v for k, v in entry.items() if k != "trusted"}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            temp.write_text(json.dumps(entry))
            os.chmod(temp, 0o600)
            os.replace(temp, self.path)
        except OSError as exc:  # a cache: never fail a sync over it
            log.info("could not store %s: %s", self.path, exc)


class SyncPlan:
    """One sync's decisions: which items differ (digests first), and how to send them.

    * `prepare` (the "build payload" step): this node's per-item digests, from `ConfigView`'s
      cache when config.xml is unchanged; nothing with ``--full``.
    * `probe` (the "firmware_version" step): one request for the backup's firmware version,
      capabilities and digests; then `send_ids` are the items whose digests differ. An item also
      counts as unchanged when neither side changed since our last push, which the snapshot
      tells (the backup may keep node-local keys inside merged containers, so its digest of such
      an item never equals ours even right after a sync).
    * `send` (the "restore_config_section" step): the fast path when the backup offers it, else
      the compatible call, with only the sections of `send_ids`.
    """

    def __init__(self, view: ConfigView, registry: SyncItemRegistry, item_ids: Sequence[str], *,
                 full: bool = False, fast: bool = True) -> None:
        self.view = view
        self.registry = registry
        self.item_ids = list(item_ids)
        self.full = full
        self.fast = fast
        self.ours: dict[str, str] | None = None
        self.peer_probe: PeerProbe | None = None
        self.send_ids: list[str] = list(item_ids)
        self.unchanged: list[str] = []
        self.transfer = ""  # "fast path" or "XML-RPC" once sent
        self.note = ""
        self.theirs: dict[str, str] = {}
        self.stale: list[str] = []
        self._payload: dict[str, Any] | None = None
        self._record_payload: dict[str, Any] | None = None
        self.record_digests: dict[str, str] | None = None
        self.prepared: Any = None  # snapshot.PreparedRecord
        self.blob: SectionsBlob | None = None

    def prepare(self) -> str:
        if self.full:
            return f"{len(self.item_ids)} items, all sent (--full)"
        self.ours, cached = self.view.digests(self.registry, self.item_ids)
        return f"{len(self.item_ids)} items, digests {'unchanged since the last run' if cached else 'computed'}"

    def probe(self, peer: Any) -> Any:
        """The backup's firmware_version reply; decides `send_ids` on the way."""
        digest_first = self.ours is not None
        found = compact_probe(peer, self.item_ids, self.view.store.conf_dir) if digest_first else None
        self.peer_probe = found or probe(peer, self.item_ids if digest_first else None, capabilities=not digest_first)
        if digest_first and found is None:
            remember_peer(self.view.store.conf_dir, peer.url, stock=not self.peer_probe.extensions)
        self._decide(peer)
        return self.peer_probe.firmware

    def _learn_capabilities(self, peer: Any) -> None:
        """Digest-first left them out of the probe; ask now that something is to be sent."""
        found = self.peer_probe
        if found is None or found.capabilities is not None or not found.extensions or not self.fast:
            return
        try:
            caps = peer.call("hasync.capabilities")
        except RemoteFault:
            return
        found.capabilities = caps if isinstance(caps, dict) else None

    def _decide(self, peer: Any) -> None:
        from . import digest as digestmod
        from . import snapshot

        assert self.peer_probe is not None
        if self.ours is None:
            return
        if self.peer_probe.digests is None:
            self.note = "the backup offers no hasync.digest: every item is sent"
            return
        try:
            theirs, _unknown = digestmod.parse_digest_reply(self.peer_probe.digests)
        except HaError as exc:
            self.note = f"every item is sent: {exc}"
            return
        try:
            last = snapshot.load(self.view.store.conf_dir)
        except HaError:
            last = None
        pushed = last.items if last is not None and last.target == peer.url else {}
        send, same = [], []
        self.theirs = theirs
        for item_id in self.item_ids:
            ours, current = self.ours.get(item_id), theirs.get(item_id)
            record = pushed.get(item_id)
            if ours is not None and (current == ours or (
                    record is not None and record.digest == ours and record.backup_digest
                    and record.backup_digest == current)):
                same.append(item_id)
            else:
                send.append(item_id)
        self.send_ids, self.unchanged = send, same
        # unchanged items the snapshot does not describe yet (first sync, another target, older
        # opnsense-ha): recorded along with this sync so diff/check have a basis for them too
        self.stale = [i for i in same if i not in pushed or pushed[i].digest != self.ours.get(i)]

    def probe_note(self) -> str:
        parts = []
        if self.peer_probe is not None and self.peer_probe.capabilities is not None:
            parts.append("fast path offered" if self.peer_probe.fast_path else "no fast path (compatible XML-RPC)")
        elif self.peer_probe is not None and not self.peer_probe.extensions:
            parts.append("stock backup (no hasync.* methods): compatible XML-RPC")
        if self.ours is not None and self.peer_probe is not None and self.peer_probe.digests is not None:
            parts.append(f"{len(self.send_ids)} of {len(self.item_ids)} items differ")
        if self.note:
            parts.append(self.note)
        return "; ".join(parts)

    @property
    def sections(self) -> list[str]:
        return self.registry.sections_for(self.send_ids)

    @property
    def uses_fast_path(self) -> bool:
        if not (self.fast and self.peer_probe is not None and self.peer_probe.fast_path):
            return False
        # an agent that cannot apply our self_address/swap rules gets the compatible payload instead
        return self.peer_probe.offers(PERNODE_FEATURE) or not self.registry.declarations().rewriting(self.sections)

    def payload(self) -> dict[str, Any]:
        """The compatible payload of `send_ids` (sent on the compatible path; kept in the snapshot)."""
        if self._payload is None:
            self._payload = payload_for_items(self.view.root, self.registry, self.send_ids)
        return self._payload

    @property
    def record_ids(self) -> list[str]:
        """The items the snapshot records after this sync: those sent and the stale unchanged ones."""
        return [i for i in self.item_ids if i in self.send_ids or i in self.stale]

    def record_payload(self) -> dict[str, Any]:
        if not self.stale:
            return self.payload()
        if self._record_payload is None:
            self._record_payload = payload_for_items(self.view.root, self.registry, self.record_ids)
        return self._record_payload

    def record_unchanged(self, peer: Any, warnings: list[str]) -> None:
        """Nothing was sent: still describe stale items in the snapshot (no request needed)."""
        from . import snapshot

        if not self.stale:
            return
        try:
            snapshot.record(self.view.store.conf_dir, self.registry, self.stale, self.record_payload(), peer.url,
                            {i: self.theirs[i] for i in self.stale if i in self.theirs}, digests=self.ours)
        except (HaError, OSError) as exc:
            warnings.append(f"the snapshot of this sync was not recorded ({exc})")

    def top_keys(self) -> list[str]:
        if self._payload is not None:
            return list(self._payload)
        return list(dict.fromkeys(section.split(".")[0] for section in check_sections(self.sections)))

    def dry_run(self, peer: Any) -> str:
        self._learn_capabilities(peer)
        if self.uses_fast_path:
            blob = build_blob(self.view.root, self.sections, declarations=self.registry.declarations())
            return (f"would send {len(self.send_ids)} items by the fast path, {blob.compressed} bytes "
                    f"({blob.size} inflated); nothing sent")
        size = len(xmlrpc.dumps_request(RESTORE_METHOD, [self.payload()]))
        return f"would send {size} bytes; nothing sent"

    def _prepare_record(self, target: str) -> None:
        """What the snapshot records: payload form, digests and the compressed values, all
        computed while the backup merges; written once the merge is confirmed."""
        from . import digest as digestmod
        from . import snapshot

        payload = self.record_payload()
        if self.ours is None or any(i not in self.ours for i in self.record_ids):
            self.record_digests = {
                item.id: digestmod.item_digest(digestmod.value_item_value(payload, item.sections, copy_values=False),
                                               self.registry)
                for item in self.registry.resolve(self.record_ids)
            }
        else:
            self.record_digests = {i: self.ours[i] for i in self.record_ids}
        try:
            self.prepared = snapshot.prepare(self.view.store.conf_dir, self.registry, self.record_ids, payload,
                                             target, digests=self.record_digests)
        except (HaError, OSError) as exc:  # recorded the plain way afterwards, which reports it
            log.info("snapshot not prepared during the merge: %s", exc)

    def send(self, peer: Any) -> str:
        self._learn_capabilities(peer)
        if self.uses_fast_path:
            blob = self.blob = build_blob(self.view.root, self.sections, declarations=self.registry.declarations())
            request: Callable[[], Any] = lambda: send_blob(peer, blob)  # noqa: E731
            self.transfer = "fast path"
        else:
            payload = self.payload()
            request = lambda: peer.call(RESTORE_METHOD, [payload])  # noqa: E731
            self.transfer = "XML-RPC"
        # the snapshot's share of the work runs on this node's other core while the backup merges
        worker = threading.Thread(target=self._prepare_record, args=(peer.url,), name="snapshot-prepare",
                                  daemon=True)
        worker.start()
        try:
            reply = request()
        finally:
            worker.join()
        detail = describe(self.blob) if self.blob is not None else "merged"
        if reply is not True:
            raise HaError(f"backup did not confirm the merge (answered {str(reply)[:100]!r})")
        return detail

    def nothing(self) -> str:
        return (f"all {len(self.item_ids)} items match the backup's digests: nothing sent, the backup's config "
                "is not touched")
