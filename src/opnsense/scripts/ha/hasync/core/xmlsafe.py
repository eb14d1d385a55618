"""One place that builds lxml parsers which never expand entities or touch the network.

config.xml, payload files and XML-RPC bodies are all parsed through here: a DTD is refused
outright (neither format uses one), so billion-laughs, quadratic-blowup and external-entity
documents fail fast with a clear message instead of consuming memory. Without a DTD no entity
can be declared, and a reference to an undeclared one is a well-formedness error of libxml2's
(there is no recover mode here): so no tree that comes back holds an entity node, and none is
searched for (a walk of every node, ~16 ms of a 20 MB config). libxml2's default depth limit
(256) bounds nesting.
"""

from __future__ import annotations

from typing import TypedDict

from lxml import etree


class UnsafeXmlError(ValueError):
    """The document is well-formed but uses features we refuse (DTD, entities)."""


def _parser(remove_blank_text: bool) -> etree.XMLParser:
    return etree.XMLParser(remove_blank_text=remove_blank_text, **_OPTIONS)


class _Options(TypedDict):
    resolve_entities: bool
    no_network: bool
    load_dtd: bool
    dtd_validation: bool
    huge_tree: bool
    remove_comments: bool


# What every parser here is built with (`_parser`, `pull_parser`).
_OPTIONS: _Options = {
    "resolve_entities": False,
    "no_network": True,
    "load_dtd": False,
    "dtd_validation": False,
    "huge_tree": False,
    "remove_comments": False,
    # collect_ids stays on: off, lxml lets libxml2 try to load an external DTD (refused by
    # no_network for a URL, but a local path would be read)
}


def parse_bytes(data: bytes, *, remove_blank_text: bool = True) -> etree._Element:
    """Parse a whole document, refusing DTDs. Raises etree.XMLSyntaxError or UnsafeXmlError."""
    root = etree.fromstring(data, _parser(remove_blank_text))
    refuse_dtd(root)
    return root


def pull_parser(root_tag: str, *, remove_blank_text: bool = True) -> etree.XMLPullParser:
    """A parser fed a piece at a time (`feed`, then `close` for the root), with `parse_bytes`'s
    options, for a caller that reads the tree while it grows. It reports only the start of
    `root_tag` elements (`read_events`): an event per element would cost more than the parse.
    The caller checks the root with `refuse_dtd` once closed."""
    return etree.XMLPullParser(events=("start",), tag=root_tag, remove_blank_text=remove_blank_text, **_OPTIONS)


def refuse_dtd(root: etree._Element) -> None:
    """Raise UnsafeXmlError if `root`'s document has a document type declaration."""
    doc = root.getroottree()
    if getattr(doc.docinfo, "doctype", "") or doc.docinfo.internalDTD is not None:
        raise UnsafeXmlError("document type declarations (DTD) are not allowed")
