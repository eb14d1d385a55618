"""What a merge changed: each touched section compared before and after, with libxml2 doing the
walking, and which of its points the backup now holds byte for byte as the primary sent them.

`SectionsBefore` keeps, before the merge, what the comparison needs (each point's nodes as
bytes, each section's shape around its points); after it, `changed_points` and `same_shape` tell
what differs (`merge.MergeReport.sections`, `changed_sections`, `unchanged_points`) and which
points are as sent (`MergeReport.as_sent_points`). Equal here means equal `_fingerprint`s:
structure, attributes and leaf text, which is what toArray reads (`tree.element_to_value`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lxml import etree

from hasync.config.tree import MISSING_SHA256, children, hash_without
from hasync.core import xmlsafe
from hasync.payload.digest import read_through_containers, reads_as_empty


def _head(node: etree._Element) -> tuple[tuple[Any, ...], list[etree._Element]]:
    """A node's own part of its `_fingerprint` (tag, sorted attributes, leaf text, whether it holds
    no node at all), and its element children: what every comparison here reads of one node."""
    kids = [child for child in node if isinstance(child.tag, str)]
    return (node.tag, tuple(sorted(node.attrib.items())), "" if kids else (node.text or ""), len(node) == 0), kids


def _fingerprint(node: etree._Element) -> tuple[Any, ...]:
    """Structure, attributes and leaf text; ignores formatting whitespace and comments, except
    whether a leaf holds any: toArray reads a leaf holding a comment as a struct, not as its text
    (`tree.element_to_value`), so equal fingerprints mean equal values."""
    head, kids = _head(node)
    return (*head, tuple(_fingerprint(k) for k in kids))


def _fingerprint_all(nodes: Iterable[etree._Element]) -> tuple[Any, ...]:
    return tuple(_fingerprint(node) for node in nodes)


# Comparing `_fingerprint`s of whole sections walks every element in Python (seconds for a large
# config); these give the same answer with libxml2 doing the walking.


def serial(node: etree._Element) -> bytes:
    return etree.tostring(node, encoding="utf-8", with_tail=False)


def reparse(data: bytes) -> etree._Element:
    return xmlsafe.parse_bytes(data, remove_blank_text=False)


def _find_below(tops: list[etree._Element], dotted: str) -> list[etree._Element]:
    """`find_path(root, dotted)` for a root whose `dotted.split('.')[0]` children are `tops`."""
    nodes = tops
    for part in dotted.split(".")[1:]:
        nodes = [child for node in nodes for child in node if child.tag == part]
    return nodes


def same_nodes(before: list[etree._Element], after: list[etree._Element], known_different: bool = False) -> bool:
    """``_fingerprint_all(before) == _fingerprint_all(after)``, stopping at the first difference.

    Equal serialisations imply equal fingerprints; only where the bytes differ (a real change, or
    what fingerprints ignore: comments, attribute order, tails) does it look inside.
    """
    if len(before) != len(after):
        return False
    for old, new in zip(before, after, strict=True):
        if not known_different and serial(old) == serial(new):
            continue  # (the caller already compared these bytes when `known_different`)
        (old_head, old_kids), (new_head, new_kids) = _head(old), _head(new)
        if old_head != new_head or not same_nodes(old_kids, new_kids):
            return False
    return True


def _first_difference(old: bytes, new: bytes) -> int:
    """Where `old` and `new` first differ (their shorter length if one begins the other): a binary
    search comparing halves in C, ~2x the bytes in all (a 2.7 MB section: ~0.5 ms)."""
    low, high = 0, min(len(old), len(new))  # old[:low] == new[:low]; they differ at or before high
    while low < high:
        middle = (low + high + 1) // 2
        if old[low:middle] == new[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _simple_head(head: bytes) -> bool:
    """A start tag's name and attributes (`head`, as libxml2 writes them) that name its
    `_fingerprint`'s tag and attributes one for one: at most one attribute (two quotes: a value
    holds no raw one), so their order cannot differ, and no namespace prefix or declaration."""
    return head.count(b'"') <= 2 and b":" not in head and b"xmlns" not in head


def differs_in_value(old: bytes, new: bytes) -> bool:
    """Whether two different serialisations (`serial`) of elements certainly have different
    `_fingerprint`s, judged from where they first differ; False means "look closer" (`same_nodes`
    on the old bytes parsed back), never "the same".

    libxml2 writes `<`, `>` only as markup (text and attribute values hold `&lt;`, `&gt;`, and
    no raw `"` in a value) outside comments, CDATA and PIs (none may come before the difference),
    so the common prefix ends at the same spot of the same tree in both, with the same
    ancestors. Two spots are decided there, the ones a changed value gives:
    * inside the text of a leaf: a start tag (not self-closing) then text up to an end tag in
      both, so each side's element holds one text and nothing else, and the texts differ
      (`<a></a>` against `<a/>` does not qualify: the difference is in the tag);
    * inside a start tag whose name and attributes (`_simple_head`) differ on the two sides.
    Comments, PIs, tails, attribute order and namespace prefixes, which fingerprints ignore,
    never qualify (the tests name each).
    """
    at = _first_difference(old, new)
    if old.find(b"<!", 0, at) >= 0 or old.find(b"<?", 0, at) >= 0:
        return False  # a comment, CDATA or PI before it may hold raw `<` and `>`
    start, end = old.rfind(b"<", 0, at), old.rfind(b">", 0, at)
    if start < 0 or old[start + 1:start + 2] in (b"/", b"!", b"?"):
        return False
    if end > start:  # in the text after the start tag that ends at `end`
        if old[end - 1:end] == b"/":  # (after a self-closing tag: text beside elements)
            return False
        for data in (old, new):
            close = data.find(b"<", at)
            if close < 0 or data[close + 1:close + 2] != b"/":
                return False
        return True
    if new[start + 1:start + 2] in (b"/", b"!", b"?"):  # inside a start tag (in `old`)
        return False
    heads = []
    for data in (old, new):
        stop = data.find(b">", at)
        if stop < 0:
            return False
        head = data[start:stop].removesuffix(b"/")
        if not _simple_head(head):
            return False
        heads.append(head)
    return heads[0] != heads[1]


def _inside(nodes: Sequence[etree._Element], records: Sequence[etree._Element],
            ) -> dict[etree._Element, list[etree._Element]]:
    """`records` by the one of `nodes` each lies in (or is), in document order; those under none
    are left out."""
    tops = set(nodes)
    found: dict[etree._Element, list[etree._Element]] = {}
    for record in records:
        top = next((element for element in (record, *record.iterancestors()) if element in tops), None)
        if top is not None:
            found.setdefault(top, []).append(record)

    def position(record: etree._Element) -> tuple[int, ...]:
        chain = [record, *record.iterancestors()]
        return tuple(node.getparent().index(node) for node in reversed(chain[:-1]))  # type: ignore[union-attr]

    return {top: sorted(inside, key=position) for top, inside in found.items()}


def same_as(before: list[bytes], after: list[etree._Element], digest: Any = None) -> bool:
    """`same_nodes` with the before-state as the nodes' bytes: parsed back only where they differ.
    `digest` (a sha256) is fed every node's bytes, so it goes on past the first difference."""
    same = len(before) == len(after)
    for index, new in enumerate(after):
        if not same and digest is None:
            break
        data = serial(new)
        if digest is not None:
            digest.update(data)
        if same and before[index] != data and (differs_in_value(before[index], data) or not same_nodes(
                [reparse(before[index])], [new], known_different=True)):
            same = False
    return same


class SectionsBefore:
    """The touched top-level sections as they were before the merge, kept apart in what change
    detection compares: each point's nodes as bytes, and each section's shape around its points.

    The shape (`_outline`) is a section's `_fingerprint` down to its points, with a point's node
    standing as its tag (its content is the point's) and a subtree that holds no point standing as
    its bytes. Equal shapes and equal nodes at every point are equal sections, so each byte of a
    section is serialised once before the merge and at most once after it, and parsed back only
    where it differs. (Comparing whole sections first, then every point of a changed one against
    the section parsed back, serialised a changed section three times and parsed it once: ~10% of
    a merge request.)
    """

    def __init__(self, root: etree._Element, keys: Iterable[str], points: Sequence[str]) -> None:
        self.all_points = list(points)
        self.points: dict[str, list[str]] = {}
        self.nodes: dict[str, list[bytes]] = {}
        self.empty: dict[str, bool] = {}  # the point read as a missing one (`digest.reads_as_empty`)
        self.shapes: dict[str, list[Any]] = {}
        for key in keys:
            self.add(root, key)

    def add(self, root: etree._Element, key: str, with_points: bool = True) -> None:
        """Keep top-level section `key`'s shape as it is now, and its points' nodes unless told
        not to (a merge taking a section at a time keeps each point just before its first part
        merges, `add_point`: the others do not touch it, and only one point's bytes are held)."""
        group = self.points[key] = [p for p in self.all_points if p.split(".")[0] == key]
        tops = children(root, key)
        if with_points:
            for point in group:
                self.add_point(root, point, tops)
        self.shapes[key] = [self._outline(node, key, key) for node in tops]

    def add_point(self, root: etree._Element, point: str, tops: list[etree._Element] | None = None) -> None:
        """Keep `point`'s nodes as they are now (`tops`: its top-level section's nodes, if at hand)."""
        found = _find_below(children(root, point.split(".")[0]) if tops is None else tops, point)
        self.nodes[point] = [serial(node) for node in found]
        self.empty[point] = reads_as_empty(found)

    def forget(self, key: str) -> None:
        """Let go of what `key` was (its points' bytes and its shape), once it has been compared."""
        for point in self.points.get(key, ()):
            self.nodes.pop(point, None)
        self.shapes.pop(key, None)

    def _kind(self, key: str, path: str) -> str:
        group = self.points[key]
        if path in group:
            return "point"
        return "around" if any(point.startswith(path + ".") for point in group) else "apart"

    def _outline(self, node: etree._Element, key: str, path: str) -> Any:
        kind = self._kind(key, path)
        if kind == "point":
            return str(node.tag)
        if kind == "apart":
            return serial(node)
        head, kids = _head(node)
        return (*head, tuple(self._outline(kid, key, f"{path}.{kid.tag}") for kid in kids))

    def _same_outline(self, outline: Any, node: etree._Element, key: str, path: str) -> bool:
        kind = self._kind(key, path)
        if kind == "point":  # its content is compared with its point's
            return isinstance(outline, str) and outline == node.tag
        if kind == "apart":
            return isinstance(outline, bytes) and same_as([outline], [node])
        if not isinstance(outline, tuple):
            return False
        head, kids = _head(node)
        parts = outline[-1]
        if outline[:-1] != head or len(kids) != len(parts):
            return False
        return all(self._same_outline(part, kid, key, f"{path}.{kid.tag}")
                   for part, kid in zip(parts, kids, strict=True))

    def changed_at(self, point: str, after: list[etree._Element], sent: Mapping[str, str] | None = None,
                   as_sent: list[str] | None = None, root: etree._Element | None = None,
                   kept_own: Sequence[etree._Element] = ()) -> list[etree._Element] | None:
        """`point`'s nodes if they now differ, else None; `after`: its top-level section's nodes now.

        `sent`: the sha256 a primary declared of its nodes at some points (`tree.SentSections`);
        if this point's nodes now have the same bytes, read as a digest reads them below `root`
        (`digest.read_through_containers`: then they are the nodes `_find_below` found), it goes
        to `as_sent` (each node is serialised once for both comparisons, and not kept). The bytes
        of `kept_own` records (the backup's own nosync records the merge kept) are not counted:
        the primary's are not either (`wire.sections`), and the digests leave both out."""
        nodes = _find_below(after, point)
        declared = sent.get(point) if sent and as_sent is not None and root is not None else None
        own = _inside(nodes, kept_own) if declared is not None and kept_own else {}
        digest = hashlib.sha256() if declared is not None and not own else None
        changed = not same_as(self.nodes[point], nodes, digest)
        if own:  # (rare: the backup has nosync records of its own here) serialised again, less those
            digest = hashlib.sha256()
            for node in nodes:
                inside = own.get(node, [])
                if node in inside:
                    continue  # one of the backup's own records itself: left out whole
                if not hash_without(digest, serial(node), inside):
                    digest = None
                    break
        if digest is not None and as_sent is not None and root is not None and read_through_containers(root, point):
            if declared == MISSING_SHA256:  # the primary lacks it: sent as [], which reads as empty
                if reads_as_empty(nodes):
                    as_sent.append(point)
            elif digest.hexdigest() == declared:
                as_sent.append(point)
        return nodes if changed else None

    def same_shape(self, key: str, after: list[etree._Element]) -> bool:
        """Whether the section around its points reads as before (`after`: its nodes now)."""
        shapes = self.shapes[key]
        return len(shapes) == len(after) and all(
            self._same_outline(shape, node, key, key) for shape, node in zip(shapes, after, strict=True))
