"""The agent's reading of a fast-path request a section at a time (`payload.parts`).

Why: `sections.decode_param` inflates the whole document, parses it and converts it before the
merge begins, so the agent holds a second tree as large as config.xml's beside it (at 20 MB
~100 MB more, the larger part of its peak). A primary of ours says where each section's bytes
end (`sections.SIZES_KEY`); the agent then inflates the document in pieces, and parses and
converts each ``<section>`` with the very code `decode_param` uses (`sections.payload_from_holders`,
one holder at a time) only when the merge asks for it; the merge moves its records into
config.xml's tree and the rest of it is freed before the next section is read.

The checks are `decode_param`'s: the header before anything is read (`sections.read_param`,
the declared size), the rest as the document goes by: bounded inflation; each section parsed as
one ``<section>`` element (with `xmlsafe`, so no DTD and no entity) carrying the next announced
path; after the last one the stream's end and size, the document around the sections (head and
tail: ``<sections>`` in UTF-8 and nothing else) and the whole document's sha256. A request that
fails any of them raises from the merge's loop, and the merge then writes nothing.

A request without the sizes (a primary of an earlier version) is decoded whole, as before; so is
one the merge cannot take a section at a time (`parts.streamable`): `whole` is `decode_param`'s
own result.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from lxml import etree

from hasync.config.pernode import Declarations
from hasync.config.tree import GraftedPayload
from hasync.core.errors import HaError
from hasync.payload.parts import PayloadParts
from hasync.wire.sections import (
    MARKS,
    SIZES_KEY,
    Decoded,
    check_declared,
    decode_param,
    fault,
    inflated,
    parse_document,
    payload_from_holders,
    read_param,
    read_sent,
)

PIECE = 256 * 1024  # inflated bytes at a time

_ANNOUNCED = "the sections document does not list the announced sections"


class _Reader:
    """Exact byte counts from the inflated pieces, hashing all it hands out."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._buffer = bytearray()
        self.digest = hashlib.sha256()

    def read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            piece = next(self._pieces, None)  # (the last raises if the stream is short or bad)
            if piece is None:
                break
            self._buffer += piece
        with memoryview(self._buffer) as view:
            data = bytes(view[:count])  # (one copy: a slice of the bytearray would be another)
        del self._buffer[:count]
        self.digest.update(data)
        return data

    def rest(self) -> bytes:
        for piece in self._pieces:
            self._buffer += piece
        return self.read(len(self._buffer))


class StreamedSections(PayloadParts):
    """A fast-path request whose sections the merge takes one at a time (see module docstring)."""

    def __init__(self, argument: Mapping[str, Any], limit: int, sizes: list[int]) -> None:
        sections, chunks, size, sha, interfaces, rules = read_param(argument)
        sent, local_rules = read_sent(argument, sections)
        check_declared(size, limit)
        if len(sizes) != len(sections) + 1 or sum(sizes) > size:
            raise fault(f"'{SIZES_KEY}' must give the head's length and each section's, within 'size'")
        super().__init__(sections)
        self.size = size
        self.local_rules = local_rules
        self.token = sha.lower()
        self._argument, self._limit, self._sizes = argument, limit, sizes
        self._chunks: list[bytes] = chunks
        self._interfaces: dict[str, Any] | None = interfaces
        self._rules: Declarations | None = rules
        self._sent = sent
        self._used = False

    def _use(self) -> None:
        if self._used:
            raise RuntimeError("a streamed request is read once")
        self._used = True

    def whole(self) -> dict[str, Any]:
        self._use()
        payload = decode_param(self._argument, self._limit).payload
        if isinstance(payload, GraftedPayload):
            self.moved = payload.grafts.moved
            if not self.as_sent:
                payload.sent = None
        return payload

    def parts(self) -> Iterator[tuple[str, dict[str, Any]]]:
        self._use()
        reader = _Reader(inflated(_consumed(self._chunks), self.size, self._limit, PIECE))
        head = reader.read(self._sizes[0])
        for dotted, count in zip(self.sections, self._sizes[1:], strict=True):
            data = reader.read(count)
            if not data.startswith(b"<section"):  # (nothing before it: no declaration, no DTD)
                raise fault(_ANNOUNCED)
            holder = parse_document(data)
            if holder.tag != "section" or holder.get("path") != dotted:
                raise fault(_ANNOUNCED)
            # `decode_param` looks for marks in the whole document; a section without any
            # converts the same either way (`sections.payload_from_holders`)
            marked = any(data.find(mark) >= 0 for mark in MARKS)
            del data
            yield dotted, self._convert(holder, dotted, marked)
            holder.clear()  # what the merge did not move into config.xml's tree
        envelope = parse_document(head + reader.rest())
        if envelope.tag != "sections" or any(isinstance(node.tag, str) for node in envelope) \
                or str(envelope.getroottree().docinfo.encoding).upper() != "UTF-8":
            raise fault(_ANNOUNCED)
        if reader.digest.hexdigest() != self.token:
            raise fault("the inflated document does not match its sha256")

    def _convert(self, holder: etree._Element, dotted: str, marked: bool) -> dict[str, Any]:
        try:
            part = payload_from_holders([holder], marked, [dotted], self._interfaces, self._rules,
                                        self._sent if self.as_sent else None, self.token, self.moved)
        except HaError as exc:  # e.g. the DHCP failover rewrite finds no interface facing the peer
            raise fault(str(exc)) from None
        node: Any = part
        for key in dotted.split("."):  # a primary leaves the sizes out where nosync drops a section
            if not isinstance(node, dict) or key not in node:
                raise fault(f"section {dotted} is marked nosync as a whole: it cannot be merged apart "
                             f"('{SIZES_KEY}' must be left out)")
            node = node[key]
        return part


def _consumed(chunks: list[bytes]) -> Iterator[bytes]:
    """The request's compressed chunks, each let go of (taken out of its list, the request's
    own) once inflated: the merge that follows never holds the compressed document whole."""
    while chunks:
        chunk = chunks[0]
        yield chunk
        del chunks[0], chunk


def decode_streamed(argument: Any, limit: int) -> Decoded:
    """A `METHOD` call's header checked and its sections left to the merge to read one at a time,
    when the primary said where they end; else `decode_param`."""
    sizes = argument.get(SIZES_KEY) if isinstance(argument, dict) else None
    if sizes is None:
        return decode_param(argument, limit)
    if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                              for n in sizes):
        raise fault(f"'{SIZES_KEY}' must be an array of byte counts")
    payload = StreamedSections(argument, limit, sizes)
    return Decoded(payload, payload.sections, payload.size, payload.local_rules)
