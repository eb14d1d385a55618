"""Conversion between config.xml elements and the nested value OPNsense's PHP builds.

`element_to_value` follows `Config::toArray()` and `value_to_elements` follows `Config::fromArray()`
(reference §10). The nested value is what travels over XML-RPC, so its shape must match the PHP
side exactly:

* attributes of an element with children live under the key ``@attributes``;
* attributes of a leaf element live under a sibling key ``<tag>@attributes``;
* an element with children becomes a dict, a leaf becomes its text (``''`` when empty);
* a tag repeated among siblings becomes a list in document order;
* tags in `LIST_TAGS` are lists even when single; a lone *empty* leaf of such a tag becomes ``[]``.

What a dict cannot keep (documented in the README as well):

* the relative order of *different* sibling tags that interleave (``<a/><b/><a/>`` comes back as
  ``<a/><a/><b/>``): the merge engine therefore works on the XML tree, never on a dict round trip;
* text of an element that also has child elements (mixed content), comments and processing
  instructions;
* attributes of the second and later items of a repeated *leaf* tag (PHP keeps only one
  ``<tag>@attributes`` key, and puts it back on the first item).
* a blank first item of a repeated list tag: ``<member/><member>2</member>`` reads as ``["2"]``
  (the lone-empty-list-tag rule makes the first one ``[]`` before the second arrives; PHP too).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from sys import intern
from typing import Any, NamedTuple, TypeAlias

from lxml import etree

from hasync.config.vetting import (
    NO_NAMES,
    UNVETTED,
    TextRules,
    admit,
    passes,
    plain_below,
    vet_plain_record,
    vet_record,
)

# `listtags()` of src/etc/inc/config.inc (reference §10).
LIST_TAGS: frozenset[str] = frozenset(
    """acls alias aliasurl allowedip allowedhostname authserver bridged build_port_path ca cacert
    cert crl clone config container columnitem dhcp_ranges disk dnsserver dnsupdate domainoverrides
    element encryption-algorithm-option field fieldname gateway_item gateway_group gif gre group
    hash-algorithm-option hosts ifgroupentry igmpentry interface_array item key lagg lbpool member
    menu mobilekey monitor_type mount npt ntpserver onetoone openvpn-server openvpn-client
    openvpn-csc option package passthrumac phase1 phase2 ppp pppoe priv proxyarpnet pool pages pipe
    radnsserver roll route row rrddatafile rule schedule service servernat servers
    serversdisabled staticmap subqueue tab timerange tunnel user vip virtual_server vlan winsserver
    wolentry widget""".split()
)

ATTRIBUTES = "@attributes"

Value: TypeAlias = "str | list[Any] | dict[str, Any]"


def _is_sequential(value: object) -> bool:
    """PHP's isArraySequential(): a list (our dicts are never sequential)."""
    return isinstance(value, list)


def element_to_value(node: etree._Element, list_tags: frozenset[str] = LIST_TAGS,
                     known: Mapping[etree._Element, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Convert the children (and attributes) of `node` into a dict, as `Config::toArray()` does.

    `known` maps elements to their conversion where it is at hand already (`Grafts.moved`):
    those subtrees are not walked again, and their dicts are shared, not copied.
    """
    return _convert(node, list_tags, None, known)[0]


_PLAIN_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_FILLING = threading.Lock()


class _Unfilled:
    """What an unfilled `DeferredRecord` holds underneath, so C code that reads a dict's storage
    directly never finds an empty one there: ``json.dumps`` writes ``{}`` for an empty dict
    without asking a subclass for its items (and asks, which fills it, otherwise)."""

    def __repr__(self) -> str:
        return "<a deferred record read without being filled>"


_UNFILLED = _Unfilled()


class DeferredRecord(dict[str, Any]):
    """A record of a fast-path payload that becomes its dict only when something reads it.

    Why: the merge moves a grafted record's element into config.xml whole (`Grafts.take`) and
    reads nothing of its dict but, at most, its uuid. At 20 MB a payload holds ~35,000 records
    of list tags, whose dicts were 42 MB of the agent's peak (332 -> 291 MB) for nothing; the
    check that a record is exact (`vetting`) costs about what building it did, so time is
    unchanged. `_convert` makes one for a record it found exact, from its element.

    Every dict method fills it first (``element_to_value`` of its element: the dict `_convert`
    would have built), and from then on it is that dict, with its dicts as the record's values.
    Two reads answer without filling, as the filled dict would: `get` and ``in`` of a plain
    name no child element carries (``remove_nosync`` asks every record for ``nosync``), and
    `attribute`. Copies and pickles are plain dicts. Underneath, an unfilled one holds a single
    marker item (`_Unfilled`), never an empty dict that C code could read as the record.
    """

    __slots__ = ("_list_tags", "_source")

    def __init__(self, source: etree._Element, list_tags: frozenset[str]) -> None:
        super().__init__({"": _UNFILLED})
        self._source: etree._Element | None = source
        self._list_tags = list_tags

    def fill(self) -> DeferredRecord:
        """Build the dict now (once; a request's payload is read by one thread at a time, the
        lock only keeps a second reader from replacing dicts the first one handed out)."""
        if self._source is not None:
            with _FILLING:
                source = self._source
                if source is not None:
                    value = element_to_value(source, self._list_tags)
                    dict.clear(self)
                    dict.update(self, value)
                    self._source = None
        return self

    @property
    def filled(self) -> bool:
        return self._source is None

    def _lacks(self, key: object) -> bool:
        """Unfilled, and the key is a plain name no child element carries."""
        source = self._source
        return (source is not None and isinstance(key, str) and _PLAIN_NAME.fullmatch(key) is not None
                and next(source.iterchildren(key), None) is None)

    def get(self, key: Any, default: Any = None) -> Any:
        if self._lacks(key):
            return default
        return dict.get(self.fill(), key, default)

    def __contains__(self, key: object) -> bool:
        if self._lacks(key):
            return False
        return dict.__contains__(self.fill(), key)

    def attribute(self, name: str) -> Any:
        """``self[ATTRIBUTES][name]`` (None if absent), read from the element while unfilled."""
        if self._source is not None:
            return self._source.get(name)
        attributes = dict.get(self, ATTRIBUTES)
        return attributes.get(name) if isinstance(attributes, dict) else None

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DeferredRecord):
            other.fill()  # (dict's comparison reads the other side's storage directly)
        return dict.__eq__(self.fill(), other)

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = None  # (as dict's)

    def __reduce_ex__(self, protocol: Any) -> Any:
        return dict, (dict(self.fill()),)


def _filling(name: str) -> Callable[..., Any]:
    method = getattr(dict, name)

    def filled_first(self: DeferredRecord, *args: Any, **kwargs: Any) -> Any:
        return method(self.fill(), *args, **kwargs)

    filled_first.__name__ = name
    return filled_first


for _name in ("__getitem__", "__iter__", "__len__", "__reversed__", "__repr__", "__or__", "__ror__", "__ior__",
              "__setitem__", "__delitem__", "keys", "values", "items", "copy", "pop", "popitem", "setdefault",
              "update", "clear"):
    setattr(DeferredRecord, _name, _filling(_name))


def record_attribute(value: Any, name: str) -> Any:
    """``value[ATTRIBUTES][name]`` of a record (None if absent), without filling a `DeferredRecord`."""
    if isinstance(value, DeferredRecord):
        return value.attribute(name)
    attributes = value.get(ATTRIBUTES) if isinstance(value, dict) else None
    return attributes.get(name) if isinstance(attributes, dict) else None


class Grafts:
    """The elements that dicts of a payload were converted from, where converting back would
    give the very same element: the merge moves such an element into config.xml instead of
    building a copy from the dict (`value_to_elements` is the largest cost of a big merge).

    A dict qualifies when `fill_element` would rebuild its element exactly, which `_convert`
    checks while converting (see `_convert`), and only for as long as nobody changed it: an
    entry holds the dict itself, so `take` can tell the same object from a new one that happens
    to reuse a freed dict's id. Nothing may edit a recorded dict in place: the decoder converts
    the sections it edits (per-node rewrites, nested sections) without grafts, and later steps
    copy on write (`normalize_payload`, `keep_local`).

    With `rules`, the conversion also vets every recorded dict: each name and text below it
    passes them, and how many levels it spans is noted, so validation can skip it (`vetted`).
    """

    def __init__(self, rules: TextRules | None = None,
                 moved: dict[etree._Element, dict[str, Any]] | None = None) -> None:
        self.rules = rules
        self.names_ok: set[str] = set()  # names that passed `rules.name_ok`
        # id -> (the dict, its element, its height if vetted else -1)
        self._entries: dict[int, tuple[dict[str, Any], etree._Element, int]] = {}
        # what `take` handed out that is a dict already, element -> its dict: still
        # `element_to_value(element)` once merged (nothing edits a moved record, and writing it
        # leaves the tree as it is); the parts of one request share one (`payload.parts`)
        self.moved: dict[etree._Element, dict[str, Any]] = {} if moved is None else moved

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[tuple[dict[str, Any], etree._Element]]:
        return iter([(value, element) for value, element, _height in self._entries.values()])

    def add(self, value: dict[str, Any], element: etree._Element, height: int = -1) -> None:
        self._entries[id(value)] = (value, element, height)

    def _entry(self, value: Any) -> tuple[dict[str, Any], etree._Element, int] | None:
        """The entry recorded for this very dict (not one that reuses a freed dict's id)."""
        entry = self._entries.get(id(value))
        return entry if entry is not None and entry[0] is value else None

    def holds(self, value: Any) -> bool:
        """Whether `value` is a recorded dict: then no comment, PI or nosync struct lies below
        it (`_convert` calls none of those exact), so walks looking for them can skip it."""
        return self._entry(value) is not None

    def vetted(self, value: Any, room: int) -> bool:
        """Whether `value` is a recorded dict that every name and text below passed `rules`,
        spanning at most `room` levels: validation would accept it as it is."""
        entry = self._entry(value)
        return entry is not None and 0 <= entry[2] <= room

    def forget_along(self, root: Any, pointer: tuple[Any, ...]) -> None:
        """Drop the records of every dict from `root` down `pointer` (keys and list indexes),
        that one included: it was edited in place, and each of its ancestors holds it."""
        node = root
        for key in (None, *pointer):
            if key is not None:
                try:
                    node = node[key]
                except (KeyError, IndexError, TypeError):
                    return
            entry = self._entry(node)
            if entry is not None:
                del self._entries[id(node)]

    def take(self, value: Any, tag: str) -> etree._Element | None:
        """The element `value` came from, once (it is about to be moved), or None."""
        entry = self._entry(value)
        if entry is None or entry[1].tag != tag:
            return None
        element = entry[1]
        del self._entries[id(value)]
        element.tail = None
        if not (isinstance(value, DeferredRecord) and not value.filled):
            # (an unfilled one would be filled from the element, as converting it does; kept,
            # the 35,000 records of a 20 MB config cost the agent's peak ~12 MB)
            self.moved[element] = value
        return element


def hash_without(digest: Any, data: bytes, inside: Sequence[etree._Element]) -> bool:
    """Feed `digest` the serialisation `data` of an element less the bytes of `inside`, elements
    below it in document order, none inside another: each is found as serialised alone (a config
    has no namespaces, so its bytes are the same there). False if one is not found, and then
    `digest` was fed part of it: a caller drops it."""
    view, position = memoryview(data), 0
    for element in inside:
        piece = etree.tostring(element, encoding="utf-8", with_tail=False)
        start = data.find(piece, position)
        if start < 0:
            return False
        digest.update(view[position:start])
        position = start + len(piece)
    digest.update(view[position:])
    return True


def dropped_list_record(record: etree._Element, siblings: etree._Element | Iterable[etree._Element]) -> bool:
    """Whether dropping `record` from its `siblings` (its parent, or a section's nodes) is what
    dropping its dict does to toArray's form: a record (an element with children) of a list tag
    whose same-tag siblings are all records too, so the rest is a list in both forms."""
    tag = record.tag
    if not (isinstance(tag, str) and tag in LIST_TAGS and len(record) > 0):
        return False
    if isinstance(siblings, etree._Element):  # libxml2 scans (a rule list's parent has 20,000 children)
        return not siblings.xpath(f"boolean({tag}[not(*)])")  # (a list tag is a plain name)
    return all(len(other) > 0 for other in siblings if other.tag == tag)


# `SentSections.sha256` of a path the primary lacks (it sends ``[]`` there): the sha256 of no bytes.
MISSING_SHA256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


class SentSections(NamedTuple):
    """What a primary declared it sent by the fast path: the sha256 of each section's bytes as
    it serialised them (only sections the decoder changes nothing in), and `token`, the sha256
    of the whole sections document, which names this one request.

    The merge compares them with the bytes it wrote (`MergeReport.as_sent_points`): where they
    are equal, the backup holds at that path exactly what the primary holds, so its digest there
    is the primary's, and the agent need not compute it before answering.
    """

    token: str
    sha256: Mapping[str, str]


class GraftedPayload(dict[str, Any]):
    """A payload decoded from XML (the fast path), carrying the `Grafts` of that XML and, when
    the primary declared them, its `SentSections`."""

    def __init__(self, value: dict[str, Any], grafts: Grafts, sent: SentSections | None = None) -> None:
        super().__init__(value)
        self.grafts = grafts
        self.sent = sent


def element_to_grafts(node: etree._Element, grafts: Grafts,
                      list_tags: frozenset[str] = LIST_TAGS) -> dict[str, Any]:
    """`element_to_value`, also recording in `grafts` every dict that `value_to_elements` would
    turn back into exactly its element (the elements stay in `node`'s document until moved)."""
    plain = grafts.rules is not None and plain_below(node, grafts.rules, grafts.names_ok)
    return _convert(node, list_tags, grafts, None, True, plain)[0]


def _convert(node: etree._Element, list_tags: frozenset[str], grafts: Grafts | None,
             known: Mapping[etree._Element, dict[str, Any]] | None,
             defer: bool = True, plain: bool = False) -> tuple[dict[str, Any], bool, int]:
    """`element_to_value`; whether `fill_element` would rebuild `node`'s children exactly; and,
    with `grafts.rules`, the value's height if every name and text in it passes them, else -1.
    With `grafts` and `defer`, a record of a list tag that `vet_record` finds exact becomes a
    `DeferredRecord` instead of a dict; with `plain` (`vetting.plain_below` of an element above),
    `vet_plain_record` answers first where it can.

    What a dict loses (module docstring) makes a rebuild differ: a comment or PI, text beside
    child elements (mixed content), a tail, a tag that comes back after another (interleaved
    groups come back grouped), leaf attributes anywhere but on the first element of its group,
    a list tag's empty first leaf followed by more (or holding whitespace). A child record or an
    attribute struct holding ``nosync`` counts as a difference too: the decoder's
    `remove_nosync` deletes such structs from the dict in place. Whitespace between elements
    counts as well: the store writes libxml2's formatted output, which keeps the layout of an
    element holding any text beside its children (`store.serialize`).

    The height counts the levels validation descends below the dict (`validate.MAX_DEPTH`),
    every child taken as a list item (two levels): counting too many only sends a dict through
    validation's own walk.
    """
    if known is not None:
        done = known.get(node)
        if done is not None:
            if isinstance(done, DeferredRecord):
                done.fill()  # (shared into another value: its readers get a plain dict's contents)
            return done, False, -1
    result: dict[str, Any] = {}
    exact = grafts is not None and not node.text
    rules = grafts.rules if grafts is not None and grafts.rules is not None else UNVETTED
    # stays -1 once anything fails the rules; counted only while `exact` (else nothing reads it)
    height = 0 if exact and rules is not UNVETTED else -1
    names_ok = grafts.names_ok if grafts is not None else NO_NAMES
    refused = rules.refused
    if node.attrib:
        attributes = {intern(str(k)): str(v) for k, v in node.attrib.items()}
        result[ATTRIBUTES] = attributes
        if "nosync" in node.attrib:
            exact = False  # remove_nosync drops an attribute struct with a non-empty nosync
        if height >= 0:  # (only with `exact`)
            height = 2 if passes(attributes.items(), rules, names_ok) else -1
    previous = None
    empty_first: set[str] | None = None
    for child in node:
        name = child.tag
        if not isinstance(name, str):  # comments, processing instructions
            exact = False
            continue
        # lxml makes a new string for every tag it is asked for, and each dict would keep its own
        # copy of "descr", "interface", ...: 440,000 of them (24 MiB) for a 20 MB config
        name = intern(name)
        if exact:
            if name != previous and name in result:
                exact = False  # interleaved with another tag
            elif child.tail:
                exact = False
            previous = name
            if height >= 0 and name not in names_ok and not admit(name, rules, names_ok):
                height = -1
        if len(child) > 0:
            sub: dict[str, Any] | None = None
            below = defer
            if grafts is not None and defer and name in list_tags:  # a list's record: the merge moves it whole
                verdict = vet_plain_record(child, list_tags, names_ok) if plain else None
                if verdict is not None:
                    sub_exact, (sub_height, sub_nosync) = True, verdict
                else:
                    sub_exact, sub_height, sub_nosync = vet_record(child, list_tags, rules, names_ok)
                if sub_exact:
                    sub = DeferredRecord(child, list_tags)
                # Not exact: converted in full, and nothing below it is checked again. (A check
                # that gives up deep down would otherwise be repeated at every level above the
                # spot: quadratic in the depth, ~depth/2 times the elements for a crafted document.)
                below = False
            if sub is None:
                sub, sub_exact, sub_height = _convert(child, list_tags, grafts, known, below, plain)
                sub_nosync = "nosync" in sub
            if sub_exact and grafts is not None:
                grafts.add(sub, child, sub_height)
            if exact:
                if not sub_exact or sub_nosync or (empty_first is not None and name in empty_first):
                    exact = False
                elif sub_height < 0:
                    height = -1
                elif sub_height + 2 > height >= 0:
                    height = sub_height + 2
            if name in result:
                old = result[name]
                if not _is_sequential(old):
                    result[name] = [old]
                result[name].append(sub)
            elif name in list_tags:
                result[name] = [sub]
            else:
                result[name] = sub
        else:
            text = child.text or ""
            if exact and height >= 0:
                if text in refused:
                    height = -1
                elif height < 2:
                    height = 2
            if name in result:
                if exact and (child.attrib or (empty_first is not None and name in empty_first)):
                    exact = False
                if not isinstance(result[name], list):
                    result[name] = [result[name]]
                result[name].append(text)
            elif name in list_tags:
                if text.strip() != "":
                    result[name] = [text]
                else:
                    result[name] = []
                    if text:
                        exact = False  # whitespace the rebuilt <tag/> would not have
                    if empty_first is None:
                        empty_first = set()
                    empty_first.add(name)
            else:
                result[name] = text
            if child.attrib:
                attributes = {intern(str(k)): str(v) for k, v in child.attrib.items()}
                result[intern(name + ATTRIBUTES)] = attributes
                if "nosync" in child.attrib:
                    exact = False
                if exact and height >= 0 and not passes(attributes.items(), rules, names_ok):
                    height = -1
    return result, exact, height


def value_to_elements(tag: str, value: Any) -> list[etree._Element]:
    """`Config::fromArray()` for one key: a list yields one element per item, each named `tag`;
    an empty array gives an empty ``<tag/>`` as PHP writes it (so a later toArray sees the same
    shape); ``False`` yields nothing (PHP skips false values); ``True`` becomes ``"1"``."""
    if value is False:
        return []
    if isinstance(value, list):
        if not value:
            return [etree.Element(tag)]
        out: list[etree._Element] = []
        for item in value:
            out.extend(value_to_elements(tag, item))
        return out
    element = etree.Element(tag)
    if isinstance(value, dict):
        fill_element(element, value)
    else:
        element.text = scalar_text(value) or None
    return [element]


def fill_element(element: etree._Element, value: Mapping[str, Any]) -> None:
    """Append the children described by dict `value` to `element`, in the dict's order."""
    leaf_attributes = False
    for key, item in value.items():
        if key == ATTRIBUTES:
            for name, attr in item.items():
                element.set(name, scalar_text(attr))
        elif key.endswith(ATTRIBUTES):
            leaf_attributes = True
        else:
            _append(element, key, item)
    if not leaf_attributes:
        return
    for key, item in value.items():
        if key != ATTRIBUTES and key.endswith(ATTRIBUTES):
            target = next(element.iterchildren(key[: -len(ATTRIBUTES)]), None)
            if target is not None:
                for name, attr in item.items():
                    target.set(name, scalar_text(attr))


def _append(parent: etree._Element, tag: str, value: Any) -> None:
    """``parent.extend(value_to_elements(tag, value))``, but built in place: a standalone element
    is a document of its own in lxml, and moving it into the tree walks it again."""
    if value is False:
        return
    if isinstance(value, list):
        if not value:
            etree.SubElement(parent, tag)
        for item in value:
            _append(parent, tag, item)
        return
    child = etree.SubElement(parent, tag)
    if isinstance(value, dict):
        fill_element(child, value)
    else:
        text = scalar_text(value)
        if text:
            child.text = text


def scalar_text(value: Any) -> str:
    """A config value as element text, the way PHP casts it when writing XML."""
    if value is True:
        return "1"
    if value is None or value is False:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)




def get_path(root_value: dict[str, Any], dotted: str) -> Any:
    """Follow a dotted path through a nested value; None when any level is missing."""
    node: Any = root_value
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def children(parent: etree._Element, tag: str) -> list[etree._Element]:
    """The children named `tag` (libxml2 filters: a rule list's parent has 20 000 other children).

    `tag` is a validated config name (`validate.NAME_RE`), never lxml's ``*`` or ``{ns}`` syntax."""
    return list(parent.iterchildren(tag))


def find_path(root: etree._Element, dotted: str) -> list[etree._Element]:
    """All elements at a dotted path below `root` (several when the last tag repeats)."""
    nodes = [root]
    for part in dotted.split("."):
        nodes = [child for node in nodes for child in node if child.tag == part]
        if not nodes:
            return []
    return nodes
