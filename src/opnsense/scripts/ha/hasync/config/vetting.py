"""Whether a fast-path record's element is exact, told without building its dict.

The fast path's decoder (`tree.element_to_grafts`) turns a list's record into a `DeferredRecord`
when `value_to_elements` would rebuild its element exactly, and notes how many levels it spans
if every name and text in it passes validation's rules (`TextRules`), so validation can skip it.
Two checks give that verdict here:

* `vet_record` reads every element of the record, and follows `tree._convert`'s checks one for
  one (the tests compare the two verdicts on random shapes, `test_grafts`);
* `vet_plain_record` reads only tags and layout, for records below an element that
  `plain_below` cleared in two libxml2 passes (no refused text, every attribute passes, none is
  ``nosync``). It answers for the common record (every child tag once) and leaves the rest to
  `vet_record`. At 20 MB the records' checks take ~0.38 s instead of ~0.49 s, and a streamed
  decode and merge ~0.78 s instead of ~0.85 s (each the least of 8, alternating in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from lxml import etree


class TextRules(NamedTuple):
    """What payload validation accepts of a name and of a text (`validate.TEXT_RULES` owns the
    rules): handed to `tree.Grafts`, so the decoder's conversion vets each record as it walks it
    and validation need not walk it again (`Grafts.vetted`).

    Of a text only `refused` needs checking there: validation's other rule on text, no character
    XML cannot carry, holds for everything a parser returns (libxml2 enforces XML's `Char`
    production, for character references too).
    """

    name_ok: Callable[[str], bool]  # an element or attribute name
    refused: frozenset[str]  # texts and attribute values validation refuses although XML carries them


UNVETTED = TextRules(name_ok=lambda _name: False, refused=frozenset())  # no rules: nothing is vetted
NO_NAMES: set[str] = set()  # (read only while something is vetted: never with `UNVETTED`)


def vet_record(node: etree._Element, list_tags: frozenset[str], rules: TextRules,
               names_ok: set[str]) -> tuple[bool, int, bool]:
    """``tree._convert(node, list_tags, grafts, None)``'s verdict without building any dict:
    whether the record is exact, its height (-1 with `UNVETTED` rules or where something fails
    them), and whether it holds a ``nosync`` child (its parent's `_convert` reads that from the
    dict). It gives up at the first thing that is not exact (the caller then converts the record
    the full way, which finds the same). `names_ok`: names that passed `rules` (it grows).
    """
    if node.text:
        return False, -1, False
    height = 0 if rules is not UNVETTED else -1
    refused = rules.refused
    attributes = node.attrib
    if attributes:
        if "nosync" in attributes:
            return False, -1, False
        if height >= 0:
            height = 2 if passes(attributes.items(), rules, names_ok) else -1
    seen: set[str] = set()
    previous = None
    empty_first: set[str] | None = None
    for child in node:
        name = child.tag
        if not isinstance(name, str) or child.tail:  # a comment or PI; a tail
            return False, -1, False
        repeated = name == previous
        if not repeated:
            if name in seen:  # interleaved with another tag
                return False, -1, False
            seen.add(name)
            previous = name
        if height >= 0 and name not in names_ok and not admit(name, rules, names_ok):
            height = -1
        if empty_first is not None and name in empty_first:  # more after a list tag's empty first leaf
            return False, -1, False
        if len(child) > 0:
            sub_exact, sub_height, sub_nosync = vet_record(child, list_tags, rules, names_ok)
            if not sub_exact or sub_nosync:
                return False, -1, False
            if sub_height < 0:
                height = -1
            elif sub_height + 2 > height >= 0:
                height = sub_height + 2
            continue
        text = child.text or ""
        if height >= 0:
            if text in refused:
                height = -1
            elif height < 2:
                height = 2
        child_attributes = child.attrib
        if repeated:
            if child_attributes:  # leaf attributes on a later item
                return False, -1, False
        elif name in list_tags and text.strip() == "":
            if text:  # whitespace the rebuilt <tag/> would not have
                return False, -1, False
            if empty_first is None:
                empty_first = set()
            empty_first.add(name)
        if child_attributes:
            if "nosync" in child_attributes:
                return False, -1, False
            if height >= 0 and not passes(child_attributes.items(), rules, names_ok):
                height = -1
    return True, height, "nosync" in seen


def plain_below(node: etree._Element, rules: TextRules, names_ok: set[str]) -> bool:
    """Whether a record's check below `node` may leave texts and attributes unread
    (`vet_plain_record`): `rules` are set, no text below holds a refused one, and every
    attribute below passes them and is no ``nosync``.

    The texts are searched in their concatenation, which can find a refused text that no
    single text is (then the full check runs, which tells): libxml2 writes it and searches it,
    and lists the attributes, where reading each element's would cost ~0.15 s at 20 MB.
    """
    if rules is UNVETTED:
        return False
    if rules.refused:
        texts = etree.tostring(node, method="text", encoding="utf-8", with_tail=False)
        if any(text.encode("utf-8") in texts for text in rules.refused):
            return False
    found = node.xpath("descendant::*/@*")
    attributes = [(getattr(value, "attrname", None), value) for value in (found if isinstance(found, list) else ())]
    return all(isinstance(name, str) and name != "nosync" for name, _value in attributes) and \
        passes(attributes, rules, names_ok)


def vet_plain_record(node: etree._Element, list_tags: frozenset[str],
                     names_ok: set[str]) -> tuple[int, bool] | None:
    """`vet_record`'s height and nosync child for an exact record below a `plain_below`
    element, read from its tags and layout alone; None where that cannot tell, and then
    `vet_record` decides: a tag that comes twice in one element (a list, or interleaved), a
    comment or PI, a name not yet in `names_ok`, text beside elements or a tail, whitespace as
    a list item's text, a ``nosync`` child below the record's own level (not exact there).

    With each child tag once, what `vet_record` checks of repeated tags cannot arise, and
    `plain_below` answered for the texts' refusal and for every attribute.
    """
    if node.text:
        return None
    kids = list(node)
    names = {kid.tag for kid in kids}
    if len(names) != len(kids) or not names <= names_ok:
        return None
    height = 2  # (every element checked has children: a leaf or an attribute struct is 2 levels)
    for kid in kids:
        if kid.tail:
            return None
        if len(kid) > 0:
            below = vet_plain_record(kid, list_tags, names_ok)
            if below is None or below[1]:
                return None
            if below[0] + 2 > height:
                height = below[0] + 2
        elif kid.tag in list_tags:
            text = kid.text
            if text and not text.strip():
                return None
    return height, "nosync" in names


def passes(attributes: Iterable[tuple[Any, Any]], rules: TextRules, names_ok: set[str]) -> bool:
    """Whether every attribute's (name, value) passes `rules` (`names_ok`: names that did)."""
    for name, value in attributes:
        if value in rules.refused or (name not in names_ok and not admit(name, rules, names_ok)):
            return False
    return True


def admit(name: str, rules: TextRules, names_ok: set[str]) -> bool:
    """Whether `name` passes `rules`; if so it joins `names_ok`, which callers look in first (a
    payload repeats a few hundred names half a million times)."""
    if rules.name_ok(name):
        names_ok.add(name)
        return True
    return False
