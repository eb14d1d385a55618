"""`core.xmlsafe`: no tree it returns can hold an entity node, without searching for one.

The argument the module rests on, checked against libxml2 itself: entities need a DTD, the DTD
is refused, and a reference to an undeclared entity does not parse at all.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from hasync.core import xmlsafe

DECLARED = b'<!DOCTYPE a [<!ENTITY e "x">]><a>&e;</a>'


def test_an_entity_reference_without_a_dtd_does_not_parse() -> None:
    with pytest.raises(etree.XMLSyntaxError, match="not defined"):
        xmlsafe.parse_bytes(b"<a>&e;</a>")


def test_a_declared_entity_is_refused_with_its_dtd() -> None:
    with pytest.raises(xmlsafe.UnsafeXmlError, match="DTD"):
        xmlsafe.parse_bytes(DECLARED)


def test_control_the_same_parser_without_the_dtd_check_would_keep_an_entity_node() -> None:
    """What the DTD refusal prevents: libxml2 keeps the (unexpanded) reference as a node."""
    root = etree.fromstring(DECLARED, etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False))
    assert [node.text for node in root.iter(etree.Entity)] == ["&e;"]


def test_character_and_predefined_references_are_plain_text() -> None:
    assert xmlsafe.parse_bytes(b"<a>&amp;&lt;&#65;&#x42;</a>").text == "&<AB"


def test_an_external_dtd_on_a_local_path_is_refused_unread(tmp_path: Path) -> None:
    """Refused by the DTD check, never read: a parser that loads it (lxml does with
    `collect_ids=False`) fails on its content instead (or, for a FIFO, waits forever)."""
    dtd = tmp_path / "x.dtd"
    dtd.write_text("this is not a DTD")
    with pytest.raises(xmlsafe.UnsafeXmlError, match="DTD"):
        xmlsafe.parse_bytes(f'<!DOCTYPE a SYSTEM "{dtd}"><a/>'.encode())
