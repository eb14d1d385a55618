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

from lxml import etree


class UnsafeXmlError(ValueError):
    """The document is well-formed but uses features we refuse (DTD, entities)."""


def _parser(remove_blank_text: bool) -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=remove_blank_text,
        remove_comments=False,
        # collect_ids stays on: off, lxml lets libxml2 try to load an external DTD (refused by
        # no_network for a URL, but a local path would be read)
    )


def parse_bytes(data: bytes, *, remove_blank_text: bool = True) -> etree._Element:
    """Parse a whole document, refusing DTDs. Raises etree.XMLSyntaxError or UnsafeXmlError."""
    doc = etree.fromstring(data, _parser(remove_blank_text)).getroottree()
    if getattr(doc.docinfo, "doctype", "") or doc.docinfo.internalDTD is not None:
        raise UnsafeXmlError("document type declarations (DTD) are not allowed")
    return doc.getroot()
