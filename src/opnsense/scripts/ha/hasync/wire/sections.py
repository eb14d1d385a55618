"""The fast path between two opnsense-ha nodes: compressed XML subtrees instead of XML-RPC structs.

Why: the compatible `opnsense.restore_config_section` call carries the payload as nested XML-RPC
structs, about twice the size of the config, and both ends walk every value in Python (PHP's
array form, then IXR markup, then back). Between two agents of ours the primary can send what it
already has, the config's own XML, compressed. Stock OPNsense peers never see this: the client
uses it only when the backup's `hasync.capabilities` lists `protocol.FAST_PATH_FEATURE`.

Wire form (`METHOD`, one struct param):

* ``format`` = `FORMAT`, ``compression`` = ``"zlib"``, ``size`` (inflated bytes) and ``sha256``
  of the inflated document;
* ``sections``: the dotted section paths, in the order the payload would list them;
* ``pernode`` and ``interfaces`` (only when a per-node ``self_address``/``swap`` rule can touch the
  sections, e.g. the DHCP failover peer or a unicast CARP peer): the primary's rules
  (`Declarations.as_json`) and its ``{if: {ipaddr, subnet, ipaddrv6, subnetv6}}``, the
  only inputs of those rewrites that are not in the sections themselves; the agent applies the
  same function the compatible path does (it offers `protocol.PERNODE_FEATURE`);
* ``data``: the zlib stream as ``<base64>`` chunks of at most `CHUNK` bytes (libxml2 refuses text
  nodes over 10 MB without its "huge" mode, which we keep off);
* ``section_sha256`` (optional): the sha256 of each present section's elements as serialised in
  the document, and ``local_rules``: the text of the primary's declared-local rules. With them
  the agent can tell which sections it now holds byte for byte as the primary does, and so
  which items' digests are the primary's own (`protocol.AS_SENT_FEATURE`);
* ``section_sizes`` (optional): the byte length of the document's head (up to and with
  ``<sections>``), then of each ``<section>`` element in turn; the rest is the tail. With it the
  agent parses and merges one section at a time (`streamed`), without holding a second tree as
  large as config.xml's. Left out where a section is a single struct marked nosync (removing it
  from the payload can empty the struct above it, which only the whole payload tells).

The inflated document is ``<sections><section path="a.b">ELEMENTS</section>...</sections>``, the
elements being the primary's subtrees at each path *before* any payload transform, or
``<section path="a.b" missing="1"/>`` for a path the primary's toArray form does not have.

Identical results by construction: the agent rebuilds the very payload the compatible path would
deliver, with the same functions (`tree.element_to_value` on the same elements, payload's VIP,
nosync and DHCP rules, in the same order), applies what the IXR round trip itself does to values
(XML line-end normalisation turns CR into LF; an empty struct travels as an empty array), and
hands the result to the handler registered for `opnsense.restore_config_section`: the same merge
engine, lock, revision text, history write and reconfiguration. `tests/agent/test_fastpath.py` proves
payload equality on random trees and byte-identical merged configs end to end.

Bounded: the inflated size is declared up front, must not exceed `MAX_INFLATED`, and inflation
stops one byte past the declared size (a zip bomb costs at most the declared size); the
document is parsed with `xmlsafe` (no DTD, no entities, depth limit).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from lxml import etree

from hasync.config.pernode import Declarations, from_wire
from hasync.config.tree import (
    LIST_TAGS,
    MISSING_SHA256,
    GraftedPayload,
    Grafts,
    SentSections,
    dropped_list_record,
    element_to_grafts,
    element_to_value,
    hash_without,
)
from hasync.core import xmlsafe
from hasync.core.errors import HaError, MethodFault, RemoteFault, TransportError
from hasync.core.php import php_empty
from hasync.payload import pernode
from hasync.payload.build import VIRTUALIP, check_sections, place_at, remove_nosync, shipped_declarations, vip_section
from hasync.payload.digest import ALGORITHM, CANONICAL_FORM
from hasync.payload.parts import enclosing, payload_order
from hasync.payload.validate import TEXT_RULES
from hasync.wire import xmlrpc
from hasync.wire.deflate import ParallelDeflate
from hasync.wire.protocol import DIGEST_METHOD, VOUCH_METHOD

log = logging.getLogger("hasync.sections")

METHOD = "hasync.restore_sections_xml"

FORMAT = "hasync-sections-1"

COMPRESSION = "zlib"

# raw bytes per <base64> param item (libxml2's limit is 10 MB of base64): small, so an agent decoding
# them holds one small text at a time, and one merging a section at a time frees each once inflated
CHUNK = 1024 * 1024

MAX_INFLATED = 768 * 1024 * 1024

SIZES_KEY = "section_sizes"  # where each section's bytes end (see the wire form)

COMPRESS_LEVEL = 1  # loopback and LAN links are fast; level 1 gets ~3x on configs at ~75 MB/s per core

def locate(root: etree._Element, dotted: str) -> list[etree._Element] | None:
    """The elements whose toArray value sits at `dotted`, or None when the path is missing.

    `build.copy_section` walks PHP's array form: every level above the last must be a dict
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

class SectionsBlob(NamedTuple):
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
               declarations: Declarations | None = None) -> SectionsBlob:
    """Serialise and compress the subtrees at `sections` of the primary's config tree.

    Section paths are checked exactly as for the compatible payload (node-specific ones are
    refused). The document is compressed as it is produced, in blocks on two threads
    (`deflate.ParallelDeflate`), so the primary never holds the inflated document and the
    compressed one at once.
    """
    wanted = payload_order(check_sections(sections))  # (so the agent can merge a section at a time)
    declared = shipped_declarations() if declarations is None else declarations
    compressor = ParallelDeflate(level)
    digest = hashlib.sha256()
    size = 0

    def put(data: bytes) -> None:
        nonlocal size
        digest.update(data)
        size += len(data)
        compressor.write(data)

    try:
        section_sha256, spans = _write_sections(root, wanted, put)
    except BaseException:
        compressor.close()
        raise
    stream = b"".join(compressor.finish())
    param: dict[str, Any] = {
        "format": FORMAT,
        "compression": COMPRESSION,
        "size": size,
        "sha256": digest.hexdigest(),
        "sections": list(wanted),
        "data": [stream[i : i + CHUNK] for i in range(0, len(stream), CHUNK)] or [b""],
        "section_sha256": section_sha256,
        "local_rules": [rule.text for rule in declared.local],
    }
    if spans is not None:
        param[SIZES_KEY] = spans
    rules = declared.rewriting(wanted)
    if rules:
        param["pernode"] = rules.as_json()
        param["interfaces"] = _interfaces_for_rewrite(root)
    return SectionsBlob(param, list(wanted), size, len(stream))

def _write_sections(root: etree._Element, wanted: Sequence[str],
                    put: Callable[[bytes], None]) -> tuple[dict[str, str], list[int] | None]:
    """The sections document, piece by piece into `put`; returns each section's sha256 as sent
    (see `tree.SentSections`), where it can be told, and the document's `SIZES_KEY` spans
    (None: its sections are not to be merged apart)."""
    from xml.sax.saxutils import quoteattr  # here: it pulls in urllib, and a no-op sync builds no blob

    section_sha256: dict[str, str] = {}
    spans: list[int] = []
    written = 0

    def emit(data: bytes) -> None:
        nonlocal written
        written += len(data)
        put(data)

    emit(b'<?xml version="1.0" encoding="UTF-8"?>\n<sections>')
    apart = True  # whether each section can be merged apart from the others (`SIZES_KEY`)
    for dotted in wanted:
        spans.append(written)
        written = 0
        group = locate(root, dotted)
        if group is None:
            emit(f"<section path={quoteattr(dotted)} missing=\"1\"/>".encode())
            section_sha256[dotted] = MISSING_SHA256
            continue
        # A section that is one struct marked nosync leaves the payload whole (remove_nosync),
        # which can empty the struct above it: merged alone, that empty one would be merged too.
        if len(group) == 1 and group[0].tag not in LIST_TAGS and _nosync_record(group[0]) is not False:
            apart = False
        emit(f"<section path={quoteattr(dotted)}>".encode())
        section: Any = hashlib.sha256()
        for node in group:
            data = etree.tostring(node, encoding="utf-8", with_tail=False)
            emit(data)
            if section is not None:
                if b"nosync" not in data:
                    section.update(data)
                elif not _hash_kept(section, data, node, group):
                    section = None
        if section is not None:
            section_sha256[dotted] = section.hexdigest()
        emit(b"</section>")
    spans.append(written)
    put(b"</sections>")
    return section_sha256, spans if apart else None

def _nosync_record(node: etree._Element) -> bool | None:
    """Whether toArray's dict of `node` has a non-empty ``nosync`` (what `build.remove_nosync`
    drops); None when that is not plain to read (several ``nosync`` children)."""
    flags = [child for child in node if child.tag == "nosync"]
    if len(flags) > 1:
        return None
    return bool(flags) and (len(flags[0]) > 0 or not php_empty(flags[0].text or ""))


def _hash_kept(section: Any, data: bytes, node: etree._Element, group: Sequence[etree._Element]) -> bool:
    """Feed `section` (a sha256) the bytes `node` (one of `group`, a section's nodes, serialised
    as `data`) leaves once the payload's nosync records are gone: those the backup writes when it
    merges them as they come. False when that cannot be told (the section is then not declared,
    and the backup digests it itself).

    Only where dropping elements is what `remove_nosync` does to the array form
    (`tree.dropped_list_record`), and with no ``nosync`` attribute (an attribute struct
    remove_nosync would drop). The dropped records' own bytes are cut out of `data`
    (`tree.hash_without`), so the large rule list is neither copied nor serialised again.
    """
    checked: dict[tuple[Any, str], bool] = {}  # (one scan per list: 28 nosync rules share one)

    def plain_list(record: etree._Element, siblings: Any) -> bool:
        key = (siblings, str(record.tag))
        if key not in checked:
            checked[key] = dropped_list_record(record, siblings)
        return checked[key]

    marked = _nosync_record(node)
    if marked is None or b' nosync="' in data:  # (lxml writes every attribute in double quotes)
        return False
    if marked:
        return plain_list(node, tuple(group))  # the whole node goes: nothing of it is hashed
    dropped: list[etree._Element] = []
    gone: set[etree._Element] = set()
    for flag in node.iter("nosync"):
        record = flag.getparent()
        parent = record.getparent() if record is not None and record is not node else None
        if record is None or parent is None:
            continue
        verdict = _nosync_record(record)
        if verdict is None or (verdict and not plain_list(record, parent)):
            return False
        if verdict and not any(ancestor in gone for ancestor in record.iterancestors()):
            dropped.append(record)
            gone.add(record)
    return hash_without(section, data, dropped)


def inflate(chunks: Iterable[bytes], declared: int, limit: int = MAX_INFLATED) -> bytes:
    """Inflate a zlib stream, never producing more than `declared` (≤ `limit`) bytes."""
    return b"".join(inflated(chunks, declared, limit))


def check_declared(declared: int, limit: int) -> None:
    """Refuse an inflated size over `limit` before anything is inflated."""
    if declared < 0 or declared > limit:
        raise MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: declared size {declared} is over the {limit} allowed")


def inflated(chunks: Iterable[bytes], declared: int, limit: int, piece_size: int | None = None) -> Iterator[bytes]:
    """`inflate`'s bytes in pieces (of at most `piece_size`), checked as they come: the size
    first, the stream's end and its declared size after the last piece."""
    check_declared(declared, limit)
    inflater = zlib.decompressobj()
    total = 0
    try:
        for chunk in chunks:
            data = chunk
            while data:
                room = declared - total + 1
                piece = inflater.decompress(data, room if piece_size is None else min(room, piece_size))
                total += len(piece)
                if total > declared:
                    raise MethodFault(xmlrpc.INVALID_PARAMS,
                                      f"{METHOD}: the data inflates past its declared size of {declared} bytes")
                if piece:
                    yield piece
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

def _ixr_roundtrip_fix(value: Any, clean: Callable[[Any], bool]) -> Any:
    """What the IXR round trip does to a toArray value beyond line ends: an empty struct
    (from an element holding only comments) travels as an empty array. `clean` dicts (no
    comment, no nosync struct below: `tree.Grafts.holds`) hold no empty struct and are skipped."""
    if isinstance(value, dict):
        if clean(value):  # (before the emptiness test: that would fill a `tree.DeferredRecord`)
            return value
        if not value:
            return []
        for key, item in value.items():
            if isinstance(item, (dict, list)):
                value[key] = _ixr_roundtrip_fix(item, clean)
        return value
    if isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, (dict, list)):
                value[index] = _ixr_roundtrip_fix(item, clean)
    return value

def fault(text: str) -> MethodFault:
    return MethodFault(xmlrpc.INVALID_PARAMS, f"{METHOD}: {text}")

def read_param(argument: Any) -> tuple[list[str], list[bytes], int, str, dict[str, Any] | None,
                                         Declarations | None]:
    if not isinstance(argument, dict):
        raise fault("expects one struct")
    if argument.get("format") != FORMAT:
        raise fault(f"unknown format {str(argument.get('format'))[:40]!r}, this agent reads {FORMAT!r}")
    if argument.get("compression") != COMPRESSION:
        raise fault(f"unknown compression {str(argument.get('compression'))[:20]!r}")
    sections = argument.get("sections")
    if not isinstance(sections, list) or not sections or not all(isinstance(s, str) for s in sections):
        raise fault("'sections' must be a non-empty array of dotted paths")
    data = argument.get("data")
    if isinstance(data, bytes):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(chunk, bytes) for chunk in data):
        raise fault("'data' must be an array of base64 chunks")
    size = argument.get("size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise fault("'size' must be an integer")
    sha = argument.get("sha256")
    if not isinstance(sha, str):
        raise fault("'sha256' must be a hex string")
    interfaces = argument.get("interfaces")
    if interfaces is not None:
        interfaces = interfaces if interfaces != [] else {}
        if not isinstance(interfaces, dict) or not all(
            isinstance(conf, dict) and all(isinstance(text, str) for text in conf.values())
            for conf in interfaces.values()
        ):
            raise fault("'interfaces' must map interface names to {ipaddr, subnet, ipaddrv6, subnetv6}")
    rules = None
    if "pernode" in argument:
        try:
            rules = from_wire(argument["pernode"])
        except (ValueError, TypeError) as exc:
            raise fault(f"'pernode': {exc}") from None
    return sections, data, size, sha, interfaces, rules

MARKS = (b"nosync", b"<!--", b"<?")  # what `payload_from_tree` must look for when a document holds one


def _has_marks(document: bytes) -> bool:
    """Whether the document holds a `nosync`, a comment or a PI (see `payload_from_tree`)."""
    start = document.find(b"?>") + 2
    return any(document.find(mark, start) >= 0 for mark in MARKS)


def carriage_returns(document: bytes) -> bytes:
    """What the IXR round trip does to CRs: XML-RPC carries CR raw and the receiving parser turns
    CR LF and lone CR into LF; lxml wrote every CR of a value as a character reference (a LF too,
    inside attribute values), which is the only way one can be in here. LF goes back as a
    reference: raw, an attribute would read it as a space. (A character reference lies inside
    an element's text: a section's bytes can be done apart from the rest, `streamed`.)"""
    if b"&#13;" not in document:
        return document
    return (document.replace(b"&#13;&#10;", b"&#10;").replace(b"&#13;\n", b"\n")
            .replace(b"&#13;", b"&#10;"))


def parse_document(document: bytes) -> etree._Element:
    try:
        return xmlsafe.parse_bytes(carriage_returns(document), remove_blank_text=False)
    except etree.XMLSyntaxError as exc:
        raise fault(f"the sections document is not well-formed ({exc})") from None
    except xmlsafe.UnsafeXmlError as exc:
        raise fault(str(exc)) from None


def payload_from_tree(
    top: etree._Element, marked: bool, sections: Sequence[str], interfaces: dict[str, Any] | None,
    rules: Declarations | None = None, sent: Mapping[str, str] | None = None, token: str = "",
) -> dict[str, Any]:
    """Rebuild the compatible payload from the parsed sections document (see module docstring);
    `marked`: `_has_marks` of its bytes. `sent`: the primary's `section_sha256`; those of the
    sections converted with grafts (nothing edits them here) go on as `GraftedPayload.sent`."""
    holders = [node for node in top if isinstance(node.tag, str)]
    if top.tag != "sections" or [h.get("path") for h in holders] != list(sections) or \
            any(h.tag != "section" for h in holders):
        raise fault("the sections document does not list the announced sections")
    return payload_from_holders(holders, marked, sections, interfaces, rules, sent, token)


def payload_from_holders(
    holders: Sequence[etree._Element], marked: bool, sections: Sequence[str], interfaces: dict[str, Any] | None,
    rules: Declarations | None, sent: Mapping[str, str] | None, token: str,
    moved: dict[etree._Element, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """`payload_from_tree` of `holders`, the ``<section>`` elements of `sections` (all of them,
    or one: a part of `streamed.StreamedSections`); `moved` goes to its `Grafts`."""
    # the primary's rules; a primary that sent none gets the rules this package ships
    rewriting = (shipped_declarations() if rules is None else rules).rewriting(sections)
    # Paths whose values others edit in place: a section inside another one (place_at puts `x.a`
    # into the dict `x` became), and the per-node rewrite's. The first are converted without
    # grafts; of the second, only the dicts the rewrite edits lose theirs, after it ran (a DHCP
    # section's hundreds of static mappings stay grafted around its rewritten failover peer).
    split = [section.split(".") for section in sections]
    nested = enclosing(split)
    rewritten = [rule.literal_prefix for rule in (*rewriting.self_address, *(pair[0] for pair in rewriting.swap))]

    def under(parts: list[str], prefixes: list[list[str]]) -> bool:
        return any(prefix[: len(parts)] == parts or parts[: len(prefix)] == prefix for prefix in prefixes)

    payload: dict[str, Any] = {}
    grafts = Grafts(TEXT_RULES, moved)  # records are vetted as they are converted: validation skips them
    unedited: dict[str, str] = {}
    for holder, dotted in zip(holders, sections, strict=True):
        parts = dotted.split(".")
        last = parts[-1]
        missing = holder.get("missing") == "1"
        if not missing and (len(holder) == 0 or any(isinstance(c.tag, str) and c.tag != last for c in holder)):
            raise fault(f"section {dotted}: expected <{last}> elements only")
        holder.attrib.clear()  # the holder's own attributes are not part of the value
        # Nested sections, and the VIPs (rebuilt by vip_section), are converted without grafts:
        # their dicts will not be what their elements say.
        graftable = dotted != VIRTUALIP and not under(parts, nested)
        if missing:
            value = None
        elif graftable:
            value = element_to_grafts(holder, grafts).get(last)
        else:
            value = element_to_value(holder).get(last)
        if graftable and sent and dotted in sent and not under(parts, rewritten):
            unedited[dotted] = sent[dotted]
        if dotted == VIRTUALIP:
            payload[VIRTUALIP] = vip_section({} if missing else {VIRTUALIP: value})
        else:
            place_at(payload, parts, [] if missing else value)
        if not graftable:
            holder.clear()  # free the subtree as soon as it is converted
    remove_nosync(payload, grafts.holds)
    edits: list[tuple[Any, ...]] = []
    pernode.rewrite_for_backup(payload, {"interfaces": interfaces or {}}, rewriting, edits)
    for pointer in edits:
        grafts.forget_along(payload, pointer)
    # toArray makes an empty struct only of an element holding nothing but comments or PIs, and
    # remove_nosync can empty one; IXR sends an empty struct as an empty array. Walk only then.
    if marked:
        payload = _ixr_roundtrip_fix(payload, grafts.holds)
    # (an empty struct became an empty array above: that one stays what the compatible path gets)
    sent_sections = SentSections(token, unedited) if unedited and token else None
    if not ((len(grafts) or sent_sections) and isinstance(payload, dict)):
        return payload
    return GraftedPayload(payload, grafts, sent_sections)

def send_blob(peer: Any, blob: SectionsBlob, digest_items: Sequence[str],
              while_waiting: Callable[[], None] | None = None, as_sent: bool = False) -> tuple[Any, Any]:
    """Send `blob`: the merge's reply, and the backup's `DIGEST_METHOD` reply for `digest_items`
    as they are after the merge (None if that call failed).

    The digests come in the same request, a `system.multicall` that the agent runs in order:
    what the primary's snapshot records, without two more requests (a TLS handshake and a login
    each). A merge that fails raises `RemoteFault` as the plain call would, with its code and message.
    `as_sent` (the agent offers `protocol.AS_SENT_FEATURE`): the reply may name items as sent
    instead of digesting them (`digest.resolve_as_sent`).
    """
    items: Any = list(digest_items)
    if as_sent:
        items = {"items": items, "as_sent": blob.param["sha256"]}
    calls = [{"methodName": METHOD, "params": [blob.param]},
             {"methodName": DIGEST_METHOD, "params": [items]}]
    replies = _multicall(peer, calls, "the merge's", while_waiting)
    merged = _required(peer, replies[0], "the merge")
    try:
        digests = xmlrpc.multicall_entry(replies[1])
    except (xmlrpc.Fault, xmlrpc.XmlRpcDecodeError) as exc:
        log.info("no digests from %s with the merge: %s", peer.peer_key, exc)
        digests = None
    return merged, digests

def filter_configure_vouching(peer: Any, token: str, digests: Mapping[str, str],
                              while_waiting: Callable[[], None] | None = None) -> Any:
    """`opnsense.filter_configure`, in one `system.multicall` after `VOUCH_METHOD` with our
    digests of the items the merge of request `token` wrote as sent: the agent keeps them instead
    of computing them, at no request of its own. A failed vouch is logged (the agent computes
    them); a failed reload raises as the plain call would."""
    param = {"as_sent": token, "canonical": CANONICAL_FORM, "algorithm": ALGORITHM, "items": dict(digests)}
    calls = [{"methodName": VOUCH_METHOD, "params": [param]},
             {"methodName": "opnsense.filter_configure", "params": []}]
    replies = _multicall(peer, calls, "the reload's", while_waiting)
    try:
        xmlrpc.multicall_entry(replies[0])
    except (xmlrpc.Fault, xmlrpc.XmlRpcDecodeError) as exc:
        log.info("%s did not keep our digests of what it holds as sent: %s", peer.peer_key, exc)
    return _required(peer, replies[1], "filter_configure")


def _multicall(peer: Any, calls: list[Any], whose: str,
               while_waiting: Callable[[], None] | None) -> list[Any]:
    """`calls` in one `system.multicall`: one reply per call, else `TransportError`."""
    replies = peer.call("system.multicall", [calls], while_waiting=while_waiting)
    if not isinstance(replies, list) or len(replies) != len(calls):
        raise TransportError(f"{peer.peer_key} answered {whose} system.multicall with {str(replies)[:100]!r}")
    return replies


def _required(peer: Any, reply: Any, what: str) -> Any:
    """A multicall entry the caller cannot do without: a fault raises `RemoteFault` as the plain
    call would, with its code and message; anything else unreadable, `TransportError`."""
    try:
        return xmlrpc.multicall_entry(reply)
    except xmlrpc.Fault as fault:
        raise RemoteFault(fault.code, fault.message) from None
    except xmlrpc.XmlRpcDecodeError as exc:
        raise TransportError(f"{peer.peer_key} answered {what} with {exc}") from None

Describe = Callable[[SectionsBlob], str]

def describe(blob: SectionsBlob) -> str:
    return (f"fast path: {len(blob.sections)} sections, {blob.size} bytes of XML sent as {blob.compressed} "
            f"({blob.ratio:.0%})")


class Decoded:
    """A fast-path request turned back into the compatible payload.

    A plain class (see `hasync`), not a NamedTuple: the agent lets go of the payload it holds as
    soon as the reply is sent, which a test watches through a weak reference.
    """

    def __init__(self, payload: dict[str, Any], sections: list[str], size: int,
                 local_rules: frozenset[str] | None = None) -> None:
        self.payload = payload
        self.sections = sections
        self.size = size  # inflated bytes
        self.local_rules = local_rules  # the primary's declared-local rules, if it said


def read_sent(argument: Mapping[str, Any], sections: Sequence[str]) -> tuple[dict[str, str], frozenset[str] | None]:
    """The optional ``section_sha256`` (for announced sections only) and ``local_rules``; absent
    (a primary of an earlier version) they are empty and None: nothing is then taken as sent."""
    hashes = argument.get("section_sha256", {})
    hashes = {} if hashes == [] else hashes  # an empty struct travels as an empty array
    if not isinstance(hashes, dict) or not all(
            isinstance(key, str) and isinstance(value, str) and len(value) == 64 for key, value in hashes.items()):
        raise fault("'section_sha256' must map section paths to sha256 hex strings")
    local = argument.get("local_rules")
    if local is not None and (not isinstance(local, list) or not all(isinstance(text, str) for text in local)):
        raise fault("'local_rules' must be an array of strings")
    announced = set(sections)
    return ({key: value.lower() for key, value in hashes.items() if key in announced},
            frozenset(local) if local is not None else None)


def decode_param(argument: Any, limit: int = MAX_INFLATED) -> Decoded:
    """Check, inflate (at most `limit` bytes), verify and rebuild the payload of one `METHOD` call.

    Everything the agent does before the merge, as one function: the agent calls it for a
    request without section sizes, or one its merge cannot take a section at a time
    (`streamed.decode_streamed`, `StreamedSections.whole`), and the equivalence tests call the
    same code instead of a test-only copy.
    """
    sections, chunks, size, sha, interfaces, rules = read_param(argument)
    sent, local_rules = read_sent(argument, sections)
    document = inflate(chunks, size, limit)
    if hashlib.sha256(document).hexdigest() != sha.lower():
        raise fault("the inflated document does not match its sha256")
    marked, top = _has_marks(document), parse_document(document)
    del document  # (15 MB at 20 MB) not kept beside the arrays the conversion builds
    try:
        payload = payload_from_tree(top, marked, sections, interfaces, rules, sent, sha.lower())
    except HaError as exc:  # e.g. the DHCP failover rewrite finds no interface facing the peer
        raise fault(str(exc)) from None
    return Decoded(payload, sections, size, local_rules)
