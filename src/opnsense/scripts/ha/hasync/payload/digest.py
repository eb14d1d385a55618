"""Per-item values and digests of config sections, in one canonical form on both nodes.

A digest answers "does the backup hold what the primary would send for this sync item?" without
moving the data. That only works if both sides reduce their config to the same form, so the
canonical form is defined as *the payload-form value of the item's sections after the transforms
the primary applies*, computed with the same function on both nodes:

* the value of each dotted section path, in the nested shape `Config::toArray()` gives and the
  payload carries (a path missing on a node is ``[]``, exactly as the primary sends it);
* every record with a non-empty ``nosync`` removed, at any depth, except in the ordered rule
  lists `filter.rule`, `nat.rule` and `nat.outbound.rule`. The primary never sends its nosync
  records, and the merge keeps the backup's own: both are node-local, so neither may count as a
  difference. In those three rule lists, though, the merge replaces the list wholesale and drops
  the backup's nosync rules (`build.RULE_LISTS`), so there they stay in the form: a backup with
  local nosync rules differs, exactly as a sync would change it;
* for `virtualip`, only the VIPs that have a vhid. The backup's plain IP aliases and proxy-ARP
  VIPs are its own and stay. The ``advskew + 100`` transform needs no special case: the primary
  digests the transformed payload, and the backup stores (and digests) the transformed value;
* scalars as the text the backup stores (``100`` and ``"100"`` agree, ``True`` is ``"1"``,
  ``None``/``False`` are gone), whitespace-only text and empty lists/structs as ``""``;
* keys sorted, list order kept (rule order is configuration);
* the items' declared ``local`` paths left out (`pernode.prune_local`): each node keeps its own
  value there, so a difference in them is no difference.

The digest is SHA-256 over the compact JSON of that value (`canonical_bytes`). The name of the
form, `CANONICAL_FORM`, travels with every digest so a future change of the rules can never make
two different forms look equal.

Known limit, by OPNsense's merge semantics: keys that exist only on the backup *inside* a merged
container (the merge never deletes them) make the backup's digest differ from the primary's for
that item even right after a sync. The drift check therefore compares the backup with the digest
the backup itself reported right after our last sync (see `snapshot`), and `diff` simulates the
merge instead of comparing digests alone.

Values are computed from the lxml tree path by path (`tree_item_value`), converting only the
subtrees an item names, so a digest of one item of a 50 MB config does not convert the rest.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.tree import ATTRIBUTES, LIST_TAGS, element_to_value
from hasync.core.errors import TransportError
from hasync.core.php import php_empty
from hasync.payload import pernode
from hasync.payload.build import RULE_LISTS, VIRTUALIP, build_payload, copy_section, place_at

CANONICAL_FORM = "hasync-canonical-2"  # 2: declared-local paths are left out
ALGORITHM = "sha256"


# --- section values ---------------------------------------------------------------------------


def _tag_value(node: etree._Element, tag: str,
               known: Mapping[etree._Element, dict[str, Any]] | None = None) -> tuple[bool, Any]:
    """`element_to_value(node)[tag]` without converting the other children of `node`.

    The accumulation mirrors `tree.element_to_value` exactly (including its treatment of an empty
    first leaf of a list tag), restricted to the children named `tag`.
    """
    found = False
    value: Any = None
    for child in node:
        if child.tag != tag:
            continue
        if len(child) > 0:
            sub = element_to_value(child, known=known)
            if found:
                if not isinstance(value, list):
                    value = [value]
                value.append(sub)
            elif tag in LIST_TAGS:
                value = [sub]
            else:
                value = sub
        else:
            text = child.text or ""
            if found:
                if not isinstance(value, list):
                    value = [value]
                value.append(text)
            elif tag in LIST_TAGS:
                value = [text] if text.strip() != "" else []
            else:
                value = text
        found = True
    return found, value


def _single_container(node: etree._Element, tag: str) -> etree._Element | None:
    """The child `tag` if toArray would make it a dict (one element with children, not a list tag)."""
    if tag in LIST_TAGS:
        return None
    matches = [child for child in node if child.tag == tag]
    if len(matches) == 1 and len(matches[0]) > 0:
        return matches[0]
    return None


def read_through_containers(root: etree._Element, dotted: str) -> bool:
    """Whether `tree_item_value` reads `dotted` through one container at every level above the
    last (else it reads ``[]`` there, whatever the nodes at the path are)."""
    node: etree._Element | None = root
    for part in dotted.split(".")[:-1]:
        node = _single_container(node, part) if node is not None else None
    return node is not None


def tree_item_value(root: etree._Element, sections: Iterable[str],
                    known: Mapping[etree._Element, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The raw payload-form value of `sections` of a config tree (nosync records included).

    Equal to copying each section out of `element_to_value(root)` as the primary does (a path
    missing at any level is ``[]``), but converts only the subtrees named (and of those, not
    the ones `known` already holds the conversion of: see `element_to_value`).
    """
    out: dict[str, Any] = {}
    for dotted in sections:
        parts = dotted.split(".")
        node: etree._Element | None = root
        for part in parts[:-1]:
            node = _single_container(node, part) if node is not None else None
        value: Any = []
        if node is not None:
            found, found_value = _tag_value(node, parts[-1], known)
            if found:
                value = found_value
        place_at(out, parts, value)
    return out


def reads_as_empty(nodes: Sequence[etree._Element]) -> bool:
    """Whether a section path holding exactly `nodes` has the canonical form of a missing one.

    True for no node, and for one bare element (no attribute, no child node, whitespace-only
    text): the primary sends a path its config lacks as ``[]``, the merge writes that as
    ``<tag/>``, and `normalize` reads ``[]`` and ``""`` alike.
    """
    if not nodes:
        return True
    if len(nodes) > 1:
        return False
    node = nodes[0]
    return len(node) == 0 and not node.attrib and not (node.text or "").strip()


def value_item_value(value: Mapping[str, Any], sections: Iterable[str], copy_values: bool = True) -> dict[str, Any]:
    """The part of a payload-form value (a whole payload, a snapshot) that `sections` cover.

    `copy_values=False` shares the subtrees with `value` (for read-only use: digests, JSON).
    """
    out: dict[str, Any] = {}
    for dotted in sections:
        copy_section(dict(value), out, dotted, copy_value=copy_values)
    return out


def primary_item_values(
    root: etree._Element, registry: SyncItemRegistry, item_ids: Iterable[str],
    notes: list[pernode.Note] | None = None,
) -> dict[str, dict[str, Any]]:
    """What the primary would send, per item: one payload build, then each item's share of it.

    `notes` receives what the per-node declarations rewrote."""
    items = registry.resolve(item_ids)
    sections: dict[str, None] = {}
    for item in items:
        for section in item.sections:
            sections.setdefault(section, None)
    payload = build_payload(root, list(sections), registry.declarations(), notes)
    return {item.id: value_item_value(payload, item.sections, copy_values=False) for item in items}


def backup_item_values(
    root: etree._Element, registry: SyncItemRegistry, item_ids: Iterable[str],
    known: Mapping[etree._Element, dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The raw sections this node holds per item, and the ids its registry does not know."""
    values: dict[str, dict[str, Any]] = {}
    unknown: list[str] = []
    for item_id in item_ids:
        if item_id not in registry:
            if item_id not in unknown:
                unknown.append(item_id)
            continue
        values[item_id] = tree_item_value(root, registry.get(item_id).sections, known)
    return values, unknown


# --- the canonical form -----------------------------------------------------------------------


def scalar_text(value: Any) -> str:
    """The text a scalar becomes in config.xml (merge.fromArray rules), whitespace-only as ''."""
    if value is True:
        text = "1"
    elif value is None or value is False:
        text = ""
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))
    elif isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    else:
        text = str(value)
    return "" if text.strip() == "" else text


def normalize(value: Any) -> Any:
    """Scalars as stored text, empties as '', False members dropped; structure and order kept.

    This is the form `diff` displays (the backup's nosync records are still there: a merge keeps
    them, so they are not a change).
    """
    if type(value) is str:  # by far the most common value: scalar_text's answer, inline
        return value if value.strip() else ""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if item is False:
                continue  # fromArray skips false values: the element does not exist
            if key == ATTRIBUTES or key.endswith(ATTRIBUTES):
                if isinstance(item, dict) and item:
                    out[key] = {str(k): scalar_text(v) for k, v in item.items()}
                continue
            out[str(key)] = normalize(item)
        return out if out else ""
    if isinstance(value, (list, tuple)):
        items = [normalize(item) for item in value if item is not False]
        return items if items else ""
    return scalar_text(value)


def _vip_canonical(section: Any) -> Any:
    vips = section.get("vip") if isinstance(section, dict) else None
    if isinstance(vips, dict):
        vips = [vips]
    if not isinstance(vips, list):
        return ""
    kept = [vip for vip in vips if isinstance(vip, dict) and not php_empty(vip.get("vhid"))]
    return {"vip": kept} if kept else ""


def _is_nosync(value: Any) -> bool:
    return isinstance(value, dict) and not php_empty(value.get("nosync"))


def strip_nosync(value: Any, path: str = "") -> None:
    """`build.remove_nosync`, except where the merge drops the backup's nosync records anyway."""
    if isinstance(value, dict):
        for key in list(value):
            item = value[key]
            where = f"{path}.{key}" if path else key
            if where in RULE_LISTS:
                continue
            if _is_nosync(item):
                del value[key]
            else:
                strip_nosync(item, where)
    elif isinstance(value, list):
        value[:] = [item for item in value if not _is_nosync(item)]
        for item in value:
            strip_nosync(item, path)


# Every path at or above a rule list: only below these can a rule list still lie, so only there
# does the walk need to know where it is.
_RULE_PREFIXES: frozenset[str] = frozenset(
    ".".join(parts[:end]) for parts in (path.split(".") for path in RULE_LISTS) for end in range(1, len(parts) + 1)
)


def canonical(value: Mapping[str, Any]) -> Any:
    """The canonical form of one item's payload-form value (see the module docstring).

    Equal to ``normalize`` of a deep copy after `strip_nosync` and the VIP rule, computed in one
    pass that builds the result directly: the input is neither copied nor modified (a deep copy
    of a large config's values takes seconds).
    """
    out: dict[str, Any] = {}
    for key, item in value.items():
        if key in RULE_LISTS:
            _canonical_member(out, key, item, None)
        elif _is_nosync(item):
            continue
        elif key == VIRTUALIP:
            section = copy.deepcopy(item)  # small; the VIP rule works on the stripped copy
            strip_nosync(section, key)
            _canonical_member(out, key, _vip_canonical(section), None)
        else:
            _canonical_member(out, key, item, key)
    return out if out else ""


def _canonical_member(out: dict[str, Any], key: Any, item: Any, path: str | None) -> None:
    """One member of `normalize`'s dict loop; `path` None: `strip_nosync` leaves `item` alone."""
    if item is False:
        return
    if key == ATTRIBUTES or key.endswith(ATTRIBUTES):
        if path is not None and isinstance(item, dict) and any(isinstance(v, (dict, list)) for v in item.values()):
            item = copy.deepcopy(item)  # never from XML (attributes are text); strip as the definition does
            strip_nosync(item, path)
        if isinstance(item, dict) and item:
            out[key] = {str(k): scalar_text(v) for k, v in item.items()}
        return
    if path is None:
        out[str(key)] = normalize(item)
    elif path in _RULE_PREFIXES:
        out[str(key)] = _canonical_value(item, path)
    else:
        out[str(key)] = _canonical_stripped(item, path)


def _canonical_value(value: Any, path: str) -> Any:
    """``normalize`` of `value` after ``strip_nosync(value, path)``, without modifying `value`."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            where = f"{path}.{key}" if path else key
            if where in RULE_LISTS:
                _canonical_member(out, key, item, None)
            elif not _is_nosync(item):
                _canonical_member(out, key, item, where)
        return out if out else ""
    return _canonical_rest(value, path, _canonical_value)


def _canonical_stripped(value: Any, path: str) -> Any:
    """`_canonical_value` below a path no rule list lies under (not in `_RULE_PREFIXES`): every
    nosync record goes, so the walk no longer tracks where it is. `path` only reaches the
    rare attribute struct with nested values (`_canonical_member`)."""
    if type(value) is str:
        return value if value.strip() else ""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if type(item) is str:
                if key == ATTRIBUTES or key.endswith(ATTRIBUTES):
                    continue  # not a struct: `_canonical_member` keeps attributes only as one
                out[str(key)] = item if item.strip() else ""
            elif not _is_nosync(item):
                _canonical_member(out, key, item, path)
        return out if out else ""
    return _canonical_rest(value, path, _canonical_stripped)


def _canonical_rest(value: Any, path: str, walk: Callable[[Any, str], Any]) -> Any:
    """What is not a dict, for both walks: a list goes on with `walk`, a tuple and a scalar as
    `normalize` has them (strip_nosync does not look inside tuples)."""
    if isinstance(value, list):
        items = [walk(item, path) for item in value if item is not False and not _is_nosync(item)]
        return items if items else ""
    if isinstance(value, tuple):
        return normalize(value)
    return scalar_text(value)


def canonical_bytes(value: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON of the canonical form: the bytes that are hashed."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def digest(value: Mapping[str, Any]) -> str:
    """Hex SHA-256 of `canonical_bytes(value)`."""
    return hashlib.sha256(canonical_bytes(value)).hexdigest()


def item_digest(value: Mapping[str, Any], registry: SyncItemRegistry | None = None) -> str:
    """`digest` of one item's value without the registry's declared-local paths."""
    return digest(value if registry is None else pernode.prune_local(value, registry.declarations()))


def item_digests(values: Mapping[str, Mapping[str, Any]], registry: SyncItemRegistry | None = None) -> dict[str, str]:
    """Per-item digests; pass the registry so declared-local paths are left out (always, outside tests)."""
    return {item_id: item_digest(value, registry) for item_id, value in values.items()}


def backup_item_digests(
    root: etree._Element, registry: SyncItemRegistry, item_ids: Iterable[str],
    known: Mapping[etree._Element, dict[str, Any]] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """`item_digests(backup_item_values(...))` and the unknown ids, one item at a time: only one
    item's values are ever in memory (the agent digests a 20 MB config right after a merge,
    beside both its trees; all values at once would add ~20 MB more at that peak)."""
    digests: dict[str, str] = {}
    unknown: list[str] = []
    for item_id in item_ids:
        values, missing = backup_item_values(root, registry, [item_id], known)
        unknown.extend(i for i in missing if i not in unknown)
        digests.update(item_digests(values, registry))
    return digests, unknown


def digest_reply(digests: Mapping[str, str], unknown: Sequence[str],
                 as_sent: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """The `hasync.digest` reply shape (also what the snapshot stores); `as_sent`: the items whose
    digest is the asking primary's own, with the sections the agent digests them by (only ever
    sent to a primary that asked for it: `protocol.AS_SENT_FEATURE`)."""
    reply = {"algorithm": ALGORITHM, "canonical": CANONICAL_FORM, "items": dict(digests), "unknown": list(unknown)}
    if as_sent:
        reply["as_sent"] = {item_id: list(sections) for item_id, sections in as_sent.items()}
    return reply


def resolve_as_sent(reply: Any, registry: SyncItemRegistry, own: Callable[[str], str]) -> Any:
    """A `digest_reply` with its ``as_sent`` items given this node's digests (`own(item_id)`), for
    the items the agent digests by the very sections this node does; the others stay out of
    ``items`` (the caller asks for them). Any other reply comes back as it is."""
    if not isinstance(reply, dict) or not isinstance(reply.get("as_sent"), dict):
        return reply
    items = dict(reply.get("items") or {})
    for item_id, sections in reply["as_sent"].items():
        if item_id in registry and isinstance(sections, list) and \
                [str(s) for s in sections] == list(registry.get(item_id).sections):
            items[item_id] = own(item_id)
    return {key: value for key, value in reply.items() if key != "as_sent"} | {"items": items}


def parse_digest_reply(reply: Any) -> tuple[dict[str, str], list[str]]:
    """(digests, unknown ids) from a `hasync.digest` reply; refuses another canonical form.

    An empty struct travels as an empty XML-RPC array, so ``[]`` is read as no digests.
    """
    if not isinstance(reply, dict):
        raise TransportError(f"hasync.digest: unexpected reply {str(reply)[:120]!r}")
    if reply.get("canonical") != CANONICAL_FORM or reply.get("algorithm") != ALGORITHM:
        raise TransportError(
            f"hasync.digest: the backup uses canonical form {reply.get('canonical')!r}/{reply.get('algorithm')!r}, "
            f"this node {CANONICAL_FORM!r}/{ALGORITHM!r}; update both nodes to the same opnsense-ha version"
        )
    items = reply.get("items") or {}
    unknown = reply.get("unknown") or []
    if not isinstance(items, dict) or not isinstance(unknown, list):
        raise TransportError("hasync.digest: malformed reply (items must be a struct, unknown an array)")
    return {str(k): str(v) for k, v in items.items()}, [str(u) for u in unknown]
