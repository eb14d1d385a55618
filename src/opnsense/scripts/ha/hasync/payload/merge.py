"""Merge a `restore_config_section` payload into config.xml, with OPNsense's semantics.

OPNsense's `restore_config_section_xmlrpc()` / `merge_config_attributes()` (reference §2) merge
the incoming nested value into PHP's array form of the config. We apply the same rules directly
to the lxml tree, so everything the payload does not touch keeps its exact position (a dict
round trip would regroup interleaved sibling tags, and rule order is load-bearing), and every
replaced list gets exactly the incoming order:

* a scalar overwrites in place;
* a list, or a single MVC item (an element with a ``uuid`` attribute), is replaced wholesale;
  so is anything missing or a plain leaf;
* a container (an element with children and no uuid) is merged key by key, so keys that exist
  only on the backup inside a container survive (an OPNsense *quirk* we keep on purpose: it is
  what keeps a backup's node-local settings alive);
* when a list is replaced, the backup's own records with a non-empty ``nosync`` are kept and put
  first, except in the ordered rule lists `filter.rule`, `nat.rule` and `nat.outbound.rule`;
* CARP: VIPs with a vhid are replaced by the incoming set, the backup's VIPs without a vhid (and
  its nosync VIPs) are kept;
* the backup's `hasync` and `interfaces` are never overwritten;
* the paths the sync items declare ``local`` (`pernode`) keep the backup's own value: the payload
  is given the backup's value (or its absence) there before merging, so those fields are neither
  overwritten, removed, nor reported as changed.

Decisions where we deliberately differ from the PHP code (bugs, not behaviour anyone relies on):

1. *Accumulating path.* PHP builds the dotted path used for the rule-list exception by appending
   every key of a loop to the same variable, so for the second and later keys the path is wrong
   (after `filter`, `nat.rule` is checked as ``filter.nat.rule``) and the exception misfires:
   nosync port forwards get kept and moved to the front. We compute the path per key.
2. *Rule lists.* Keeping a backup's nosync rules and putting them first would change rule
   evaluation order, which is why OPNsense excludes the three legacy rule lists. They are
   replaced wholesale; every backup nosync rule dropped this way is named in the report's
   warnings, so nothing is dropped silently. (MVC rules in ``OPNsense.Firewall.Filter.rules``
   are ordered by their ``sequence`` field, so keeping nosync ones first is harmless there.)
3. *Kept nosync records vs. incoming ones.* A backup nosync record and an incoming record with
   the same uuid (or, for VIPs, the same VIP key) would give a duplicate; the backup's own
   record wins and the incoming one is skipped with a warning. A lone MVC item (uuid element
   that is not a list tag) counts as a list of one for the nosync rule, so whether a record
   survives never depends on how many siblings it has.
4. *VIP order.* PHP re-adds the kept VIPs with ``array_unshift`` in a loop, which reverses their
   order; we keep them in their original order.
5. *An empty VIP set.* A primary without any VIP sends ``virtualip: []``; PHP then skips the VIP
   handling and leaves stale CARP VIPs on the backup. We treat it as the empty incoming set.
6. *A non-empty list onto a container.* PHP would merge list indexes into the container and
   write garbage elements; we replace the container with the list.
7. *Holes in lists.* PHP's `remove_nosync()` leaves holes in list keys, so a PHP primary can send
   a list as a struct with keys "0", "2", ...; such a struct (all keys decimal, which no XML tag
   can be) is read as the list it was.
8. An empty incoming list onto a container is a no-op in PHP (the container is not reset); we
   keep that, and say so in a warning, because the primary meant "this is gone".
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.pernode import Declarations
from hasync.config.tree import (
    ATTRIBUTES,
    LIST_TAGS,
    GraftedPayload,
    Grafts,
    children,
    dropped_list_record,
    record_attribute,
    scalar_text,
    value_to_elements,
)
from hasync.config.vips import VipSpec, vip_key
from hasync.core.errors import MergeError
from hasync.core.php import php_empty, php_intval
from hasync.payload.build import RULE_LISTS, place_at
from hasync.payload.changes import SectionsBefore
from hasync.payload.digest import reads_as_empty
from hasync.payload.kept import keep_local
from hasync.payload.parts import PayloadParts, streamable
from hasync.payload.validate import COMPANION_PATHS, NAME_RE, check_payload, normalize_payload

METHOD = "opnsense.restore_config_section"


# peer/peer6: a unicast CARP peer the sync corrects (pernode self_address) must reach the kernel too
VIP_FIELDS: tuple[str, ...] = ("password", "advskew", "subnet", "subnet_bits", "advbase", "peer", "peer6")


# --- report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class VipChange:
    """A CARP/IP-alias VIP that the merge added, changed or removed: its `spec` after the merge
    (before it, for a removed VIP), its `vip_key`, and in `changed_fields` which of the fields
    that need a reconfiguration (`VIP_FIELDS`) differ."""

    key: str
    spec: VipSpec
    changed_fields: tuple[str, ...] = ()

    def public_dict(self) -> dict[str, Any]:
        """For JSON output: everything but the password value."""
        spec = self.spec
        return {
            "key": self.key, "mode": spec.mode, "interface": spec.interface, "vhid": spec.vhid,
            "subnet": spec.subnet, "subnet_bits": spec.subnet_bits, "advbase": spec.advbase,
            "advskew": spec.advskew, "uuid": spec.uuid, "changed_fields": list(self.changed_fields),
        }


@dataclass
class MergeReport:
    """What a merge did, so reconfiguration can be selective.

    `sections` are the changed section paths at sync-item granularity (``system.user``,
    ``OPNsense.Firewall.Alias``; a top-level key for accepted unknown sections): feed them to
    `SyncItemRegistry.services_for_sections`. `changed_sections` are the changed top-level
    sections. `merged_keys` are the payload's top-level keys, as named in `description`.
    """

    description: str
    merged_keys: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    changed_sections: list[str] = field(default_factory=list)
    vips_added: list[VipChange] = field(default_factory=list)
    vips_changed: list[VipChange] = field(default_factory=list)
    vips_removed: list[VipChange] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    kept_local: list[str] = field(default_factory=list)  # concrete declared-local paths the payload carried
    # the payload's section paths whose toArray value, as `digest.tree_item_value` reads it, the
    # merge left as it was: an item whose sections are all here keeps its digest
    # (`ConfigCache.note_merged`); not part of `public_dict`, an engine detail
    unchanged_points: list[str] = field(default_factory=list)
    # the payload's section paths whose nodes the merge left byte for byte as the primary declared
    # it sent them (`tree.SentSections`, named by `as_sent_token`), read through one container per
    # level as a digest reads them: there the backup's digest is the primary's. An engine detail too.
    as_sent_points: list[str] = field(default_factory=list)
    as_sent_token: str = ""

    @property
    def changed(self) -> bool:
        return bool(self.changed_sections)

    def public_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "merged_keys": self.merged_keys,
            "sections": self.sections,
            "changed_sections": self.changed_sections,
            "vips_added": [vip.public_dict() for vip in self.vips_added],
            "vips_changed": [vip.public_dict() for vip in self.vips_changed],
            "vips_removed": [vip.public_dict() for vip in self.vips_removed],
            "warnings": self.warnings,
            "kept_local": self.kept_local,
        }


def revision_description(payload: Iterable[Any]) -> str:
    """The revision text OPNsense writes: ``implode(', ', array_keys($sections))``."""
    return f"Merged {', '.join(str(key) for key in payload)} config sections from XMLRPC client."


# --- the merge ----------------------------------------------------------------------------


@dataclass
class _Context:
    root: etree._Element
    grafts: Grafts | None = None  # a decoded payload's source elements (`tree.Grafts`)
    warnings: list[str] = field(default_factory=list)
    vips_added: list[VipChange] = field(default_factory=list)
    vips_changed: list[VipChange] = field(default_factory=list)
    vips_removed: list[VipChange] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)  # the paths whose element group `_replace` swapped
    # the backup's own nosync records `_replace` kept where a digest leaves them out as dropping
    # the element would (`tree.dropped_list_record`): not part of what counts as sent
    kept_own: list[etree._Element] = field(default_factory=list)


def merge_payload(
    root: etree._Element,
    payload: Mapping[str, Any],
    registry: SyncItemRegistry,
    accept_unknown: bool = False,
    *,
    consume: bool = False,
) -> MergeReport:
    """Merge `payload` into the config tree `root` in place and report what changed.

    Pure: no I/O, no lock. Call it inside ``store.transaction(revision_description(payload))``;
    if it raises, the tree may be half-merged, which is why the transaction then writes nothing.
    A `parts.PayloadParts` is merged a section at a time where that is the same merge
    (`parts.streamable`), else as the whole payload it stands for; a whole payload is checked
    whole and then merged a point at a time where it is made of its points alone (`_at_points`).

    `consume`: the caller hands a whole payload over and never reads it again (the agent: a
    decoded request serves nothing else). It is emptied once checked, and each point's values
    are let go of once merged, so their memory is free again while the merge builds new records
    (the agent's peak in a compatible 20 MB sync: 199 -> 193 MB; the decoded payload is ~25 MB).
    """
    if isinstance(payload, PayloadParts):
        points = streamable(payload.sections, registry)
        if points is not None:
            return _merge_parts(root, payload, points, registry, accept_unknown)
        payload = payload.whole()
    grafts = payload.grafts if isinstance(payload, GraftedPayload) else None
    sent = payload.sent if isinstance(payload, GraftedPayload) else None
    sha256 = sent.sha256 if sent is not None else None
    data = normalize_payload(dict(payload), grafts.vetted if grafts is not None else None)
    points = check_payload(data, registry, accept_unknown)
    data, kept = keep_local(root, data, registry.declarations())
    ctx = _Context(root, grafts)
    _warn_unknown(points, registry, ctx)
    keys = list(data)
    if consume and isinstance(payload, dict):
        payload.clear()  # its values live on in `data` (shared, not copied) until merged
    split = _at_points(data, points) if streamable(points, registry) is not None else None
    if split is not None:
        if consume:
            data.clear()  # the points hold the values now
        changes = _merge_points(_taken(split) if consume else split, points, ctx, sha256)
    else:
        # Key by key: each top-level key's merge changes only its own section (`_merge_data`),
        # so its before-state is kept just before it merges and let go of once told.
        before = SectionsBefore(root, (), points)
        changes = _Changes()
        for key in keys:
            value = data.pop(key) if consume else data[key]
            before.add(root, key)
            _merge_data({key: value}, ctx)
            changes.tell(key, before, ctx, sha256)
    return _report(ctx, keys, points, changes, sent.token if sent is not None else "",
                   [note.path for note in kept])


def _taken(parts: list[tuple[str, dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """`parts` in order, each let go of by the list as it is handed out."""
    parts.reverse()
    while parts:
        yield parts.pop()


def _at_points(data: Mapping[str, Any], points: list[str]) -> list[tuple[str, dict[str, Any]]] | None:
    """`data` as one payload per point, in order, when it holds its points and nothing else: each
    level above them a struct of keys that lead to points, and every point there (`check_payload`
    found `points` in it, but a level can also hold none, or have lost one to `keep_local`); else
    None. Merged one after another these are the whole merge (`parts.streamable`), and change
    detection keeps one point's bytes at a time instead of every section's (~20 MB at 20 MB)."""
    wanted = set(points)
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(level: Mapping[str, Any], prefix: str) -> bool:
        for key, value in level.items():
            path = f"{prefix}.{key}" if prefix else key
            if path in wanted:
                part: dict[str, Any] = {}
                place_at(part, path.split("."), value)
                found.append((path, part))
            elif not (isinstance(value, dict) and any(p.startswith(path + ".") for p in wanted)
                      and walk(value, path)):
                return False
        return True

    return found if walk(data, "") and [path for path, _ in found] == points else None


def _merge_parts(root: etree._Element, payload: PayloadParts, points: list[str], registry: SyncItemRegistry,
                 accept_unknown: bool) -> MergeReport:
    """`merge_payload` a section at a time: each part is checked, given the backup's local values
    and merged before the next is read, and let go of then (what it did not move into `root`)."""
    declarations = registry.declarations()
    ctx = _Context(root)
    _warn_unknown(points, registry, ctx)
    sent: dict[str, str] = {}
    kept_paths: list[str] = []

    def checked() -> Iterator[tuple[str, Mapping[str, Any]]]:
        for section, part in payload.parts():
            grafts = part.grafts if isinstance(part, GraftedPayload) else None
            if isinstance(part, GraftedPayload) and part.sent is not None:
                sent.update(part.sent.sha256)
            data = normalize_payload(dict(part), grafts.vetted if grafts is not None else None)
            check_payload(data, registry, accept_unknown)
            data, kept = keep_local(root, data, _declared_in(declarations, section))
            kept_paths.extend(note.path for note in kept)
            ctx.grafts = grafts
            yield section, data
            ctx.grafts = None
            del part, data, grafts  # (not held while the next section is read)

    changes = _merge_points(checked(), points, ctx, sent)
    return _report(ctx, list(payload), points, changes, payload.token if sent else "", kept_paths)


def _merge_points(sections: Iterable[tuple[str, Mapping[str, Any]]], points: list[str], ctx: _Context,
                  sent: Mapping[str, str] | None) -> _Changes:
    """Merge `sections` (each a payload of one section at or below one of `points`, checked) one
    after another, telling `_Changes` about each point after its last section and each top-level
    key after its last point."""
    before = SectionsBefore(ctx.root, (), points)
    changes = _Changes()
    # The sections come point by point and key by key (`streamable`: the whole payload's order),
    # and each changes only what lies at its own point: so each point is kept just before its
    # first section merges and told after its last, each key likewise.
    key = point = ""
    for section, data in sections:
        at = next(p for p in points if section == p or section.startswith(p + "."))
        if at != point:
            if point:
                changes.tell(key, before, ctx, sent, [point])
            if at.split(".")[0] != key:
                if key:
                    changes.tell_shape(key, before, ctx)
                key = at.split(".")[0]
                before.add(ctx.root, key, with_points=False)
            point = at
            before.add_point(ctx.root, point)
        _merge_data(data, ctx)
        del data  # (not held while the next section is read)
    if point:
        changes.tell(key, before, ctx, sent, [point])
        changes.tell_shape(key, before, ctx)
    return changes


def _declared_in(declarations: Declarations, section: str) -> Declarations:
    """The `local` declarations that can reach into `section` (a rule's path lies under its
    literal prefix): a part's merge reads the backup's values only for those."""
    parts = section.split(".")
    return Declarations(tuple(rule for rule in declarations.local
                              if rule.literal_prefix[: len(parts)] == parts[: len(rule.literal_prefix)]), (), ())


def _warn_unknown(points: list[str], registry: SyncItemRegistry, ctx: _Context) -> None:
    for path in points:
        if not registry.is_covered(path) and path not in COMPANION_PATHS:
            ctx.warnings.append(
                f"{path}: merged although no registered sync item covers it (--accept-unknown-sections)")


def _merge_data(data: Mapping[str, Any], ctx: _Context) -> None:
    for key, value in data.items():
        if key == "virtualip":
            _merge_vips(ctx.root, value, ctx)
        else:  # through the container merge, so a root-level "@attributes" is handled as such
            _merge_container(ctx.root, {key: value}, "", ctx)


class _Changes:
    """What the merge changed, told once merged: point by point, then each top-level key's own
    shape (a merge taking a section at a time tells each point after its last part, and each key
    after its last point, and the `SectionsBefore` lets go of what it kept of them)."""

    def __init__(self) -> None:
        self.top: list[str] = []  # the changed top-level sections, in order
        self.points: set[str] = set()
        self.empty_both: set[str] = set()  # changed, but missing or bare before and after: one digest
        self.as_sent: list[str] = []

    def tell(self, key: str, before: SectionsBefore, ctx: _Context, sent: Mapping[str, str] | None,
             points: Sequence[str] | None = None) -> None:
        """Compare `points` of top-level `key` (None: all, and then its shape) with `before`, by
        `_fingerprint` equality: each point against its bytes from before the merge."""
        after = children(ctx.root, key)
        for point in before.points[key] if points is None else points:
            nodes = before.changed_at(point, after, sent, self.as_sent, ctx.root, ctx.kept_own)
            if nodes is not None:
                self.points.add(point)
                if before.empty[point] and reads_as_empty(nodes):
                    self.empty_both.add(point)
            before.nodes.pop(point)
        if points is None:
            self.tell_shape(key, before, ctx)

    def tell_shape(self, key: str, before: SectionsBefore, ctx: _Context) -> None:
        """Whether top-level `key` changed: a point of it did, or else its own shape (a point that
        changed changes its section: equal fingerprints have equal descendants at every tag path)."""
        if any(point in self.points for point in before.points[key]) or \
                not before.same_shape(key, children(ctx.root, key)):
            self.top.append(key)
        before.forget(key)


def _report(ctx: _Context, keys: list[str], points: list[str], changes: _Changes, token: str,
            kept_paths: list[str]) -> MergeReport:
    """What the merge of top-level `keys` did, every key told to `changes`."""
    changed_points = [p for p in points if p in changes.points]
    vips_touched = ctx.vips_added or ctx.vips_changed or ctx.vips_removed
    if "virtualip" in keys and vips_touched and "virtualip" not in changed_points:
        changed_points.append("virtualip")
    # Equal nodes at a point read as the same value, and so do a missing section and the bare
    # <tag/> the merge writes for it; but a digest reads the nodes through their ancestors (one
    # container per level, `digest.tree_item_value`), and a replaced ancestor (two containers
    # made one) can change what it reads there: such a point is not vouched for.
    unchanged = [p for p in points if (p not in changed_points or p in changes.empty_both)
                 and not any(p.startswith(path + ".") for path in ctx.replaced)]
    return MergeReport(
        description=revision_description(keys),
        merged_keys=keys,
        sections=changed_points,
        changed_sections=changes.top,
        vips_added=ctx.vips_added,
        vips_changed=ctx.vips_changed,
        vips_removed=ctx.vips_removed,
        warnings=ctx.warnings,
        kept_local=kept_paths,
        unchanged_points=unchanged,
        as_sent_points=[p for p in points if p in changes.as_sent],
        as_sent_token=token if changes.as_sent else "",
    )


def _merge_container(parent: etree._Element, incoming: Mapping[str, Any], path: str, ctx: _Context) -> None:
    """merge_config_attributes() on a container: key by key, backup-only keys stay."""
    leaf_attributes: list[tuple[str, dict[str, Any]]] = []
    for key, value in incoming.items():
        if key == ATTRIBUTES:
            for name, attr in value.items():
                parent.set(name, scalar_text(attr))
            continue
        if key.endswith(ATTRIBUTES):
            leaf_attributes.append((key[: -len(ATTRIBUTES)], value))
            continue
        # The path is computed per key (PHP accumulates it across keys; see decision 1).
        _merge_key(parent, key, value, f"{path}.{key}" if path else key, ctx)
    for base, attributes in leaf_attributes:
        targets = children(parent, base)
        if targets:
            for name, attr in attributes.items():
                targets[0].set(name, scalar_text(attr))


def _dest_kind(existing: list[etree._Element], key: str) -> str:
    """What PHP's array form of the destination would be: missing, scalar, list, uuid, container."""
    if not existing:
        return "missing"
    if len(existing) > 1 or key in LIST_TAGS:
        return "list"
    node = existing[0]
    if len(node) > 0:
        return "uuid" if node.get("uuid") is not None else "container"
    return "scalar"


def _merge_key(parent: etree._Element, key: str, value: Any, path: str, ctx: _Context) -> None:
    existing = children(parent, key)
    if isinstance(value, (dict, list)):
        kind = _dest_kind(existing, key)
        if kind == "container":
            if isinstance(value, dict):
                _merge_container(existing[0], value, path, ctx)
                return
            if not value:
                ctx.warnings.append(
                    f"{path}: the primary sent it empty (missing there), but here it is a container; "
                    "kept as OPNsense does"
                )
                return
        _replace(parent, key, existing, value, path, kind, ctx)
    else:
        _set_scalar(parent, key, existing, value)


def _is_nosync_record(node: etree._Element) -> bool:
    flag = node.find("nosync")
    if flag is None or len(node) == 0:
        return False
    return len(flag) > 0 or not php_empty(flag.text or "")


def _nosync_records(parent: etree._Element, key: str) -> list[etree._Element]:
    """The `key` children of `parent` that are nosync records, in order. libxml2 picks those
    holding a <nosync> child first (most hold none); `key` is a validated config name, which
    XPath reads as a plain name."""
    found = parent.xpath(f"{key}[nosync]")
    return [node for node in (found if isinstance(found, list) else [])
            if isinstance(node, etree._Element) and _is_nosync_record(node)]


def _describe(node: etree._Element) -> str:
    for tag in ("descr", "description", "name"):
        text = (node.findtext(tag) or "").strip()
        if text:
            return f"'{text}'"
    uuid = node.get("uuid")
    return f"uuid {uuid}" if uuid else "(no description)"


def _replace(
    parent: etree._Element, key: str, existing: list[etree._Element], value: Any, path: str, kind: str, ctx: _Context
) -> None:
    """Reset-and-replace: the incoming value in its order, after the backup's nosync records."""
    ctx.replaced.append(path)
    items = value if isinstance(value, list) else [value]
    kept: list[etree._Element] = []
    if kind in ("list", "uuid"):
        local = _nosync_records(parent, key)
        if path in RULE_LISTS:
            for node in local:
                ctx.warnings.append(
                    f"{path}: dropped this node's local (nosync) rule {_describe(node)}: the ordered rule "
                    "list is replaced wholesale so rule order stays the primary's"
                )
        else:
            kept = local
    kept_uuids = {node.get("uuid") for node in kept if node.get("uuid")}
    # The old nodes go before the new ones are built, so a list's new records can take the
    # memory its old ones had (a 20 MB config's rule list replaced from a stock primary's
    # payload held both at once: ~20 MB more at the agent's peak). `existing` is the caller's
    # list, which nothing reads after this: emptied, so the old nodes are freed now.
    marker = _vacate(parent, existing)
    new_nodes: list[etree._Element] = []
    for item in items:
        uuid = record_attribute(item, "uuid") if kept_uuids else None  # (a `DeferredRecord` stays unfilled)
        if uuid and uuid in kept_uuids:
            ctx.warnings.append(
                f"{path}: kept this node's nosync record uuid {uuid}; "
                "the incoming record with the same uuid was skipped"
            )
            continue
        grafted = ctx.grafts.take(item, key) if ctx.grafts is not None and isinstance(item, dict) else None
        if grafted is not None:
            new_nodes.append(grafted)  # the element this record was decoded from: moved, not rebuilt
        else:
            new_nodes.extend(value_to_elements(key, item))
    if not kept and not new_nodes and isinstance(value, list):
        new_nodes = [etree.Element(key)]  # PHP's fromArray writes an empty array as <key/>
    _fill(parent, marker, kept + new_nodes)
    if kept and path not in RULE_LISTS:
        ctx.kept_own.extend(node for node in kept if dropped_list_record(node, parent))


def _splice(parent: etree._Element, old: list[etree._Element], new: list[etree._Element]) -> None:
    """Put `new` where the first of `old` was (or at the end), removing `old`."""
    _fill(parent, _vacate(parent, list(old)), new)


def _vacate(parent: etree._Element, old: list[etree._Element]) -> etree._Element | None:
    """Remove `old` from `parent` and empty the list; a placeholder where the first of them was
    (None: there were none), for `_fill`.

    Inserting by index walks the child list each time (quadratic for a list of 20 000 rules), so
    a placeholder marks the spot and every node goes in right before it.
    """
    if not old:
        return None
    marker = etree.Element("hasync-splice-marker")
    old[0].addprevious(marker)
    for node in old:
        if node.getparent() is parent:
            parent.remove(node)
    old.clear()
    return marker


def _fill(parent: etree._Element, marker: etree._Element | None, new: list[etree._Element]) -> None:
    """Put `new` where `_vacate` left its placeholder (at the end without one), and drop it."""
    if marker is None:
        parent.extend(new)
        return
    for node in new:
        marker.addprevious(node)
    parent.remove(marker)


def _set_scalar(parent: etree._Element, key: str, existing: list[etree._Element], value: Any) -> None:
    if value is False:  # PHP's fromArray skips false values: the element disappears
        for node in existing:
            parent.remove(node)
        return
    text = scalar_text(value) or None
    if not existing:
        etree.SubElement(parent, key).text = text
        return
    first = existing[0]
    if len(first) > 0:  # a container or record becomes a string: its children and attributes go
        tail = first.tail
        first.clear()
        first.tail = tail
    first.text = text
    for extra in existing[1:]:
        parent.remove(extra)


# --- virtual IPs --------------------------------------------------------------------------


def _record_text(node: etree._Element) -> dict[str, str]:
    return {child.tag: (child.text or "").strip() for child in node if isinstance(child.tag, str)}


def _value_text(vip: Mapping[str, Any]) -> dict[str, str]:
    return {key: scalar_text(item).strip() for key, item in vip.items() if not isinstance(item, (dict, list))}


def _php_loose_equal(a: str, b: str) -> bool:
    """PHP's ``==`` on two config strings: numeric strings compare as numbers."""
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def _vip_change(root: etree._Element, record: Mapping[str, str], uuid: str, fields: tuple[str, ...] = ()) -> VipChange:
    interface = record.get("interface", "")
    device = (root.findtext(f"interfaces/{interface}/if") or "").strip() if NAME_RE.match(interface) else ""
    spec = VipSpec(
        interface=interface,
        device=device or interface,
        vhid=php_intval(record.get("vhid", "")),
        advbase=php_intval(record.get("advbase", "") or "1"),
        advskew=php_intval(record.get("advskew", "")),
        subnet=record.get("subnet", ""),
        subnet_bits=php_intval(record.get("subnet_bits", "")),
        password=record.get("password", ""),
        peer=record.get("peer", ""),
        uuid=uuid,
        mode=record.get("mode", ""),
        peer6=record.get("peer6", ""),
    )
    return VipChange(key=vip_key(record), spec=spec, changed_fields=fields)


def _merge_vips(root: etree._Element, value: Any, ctx: _Context) -> None:
    """VIPs with a vhid are replaced by the incoming set; the backup keeps its own others."""
    if isinstance(value, dict):
        incoming = value.get("vip", [])
        others = {key: item for key, item in value.items() if key != "vip"}
    else:
        if not php_empty(value):
            ctx.warnings.append("virtualip: expected a struct with a vip list; treated as no VIPs")
        incoming, others = [], {}
    if isinstance(incoming, dict):
        incoming = [incoming]
    if not isinstance(incoming, list) or not all(isinstance(vip, dict) for vip in incoming):
        raise MergeError("virtualip.vip: every VIP must be a struct")

    section = root.find("virtualip")
    if section is None:
        section = etree.SubElement(root, "virtualip")
    elif len(section) == 0:
        section.text = None
    if others:
        _merge_container(section, others, "virtualip", ctx)

    existing = children(section, "vip")
    kept: list[etree._Element] = []
    old: dict[str, tuple[etree._Element, dict[str, str]]] = {}
    for node in existing:
        record = _record_text(node)
        if not php_empty(record.get("vhid", "")) and php_empty(record.get("nosync", "")):
            old[vip_key(record)] = (node, record)
        else:
            kept.append(node)  # no vhid (plain alias, proxy ARP) or marked nosync: this node's own
    kept_keys = {vip_key(_record_text(node)) for node in kept if not php_empty(node.findtext("vhid") or "")}

    new_nodes: list[etree._Element] = []
    seen: set[str] = set()
    for vip in incoming:
        record = _value_text(vip)
        key = vip_key(record)
        if key in kept_keys:
            ctx.warnings.append(
                f"virtualip: kept this node's nosync VIP {key}; the incoming VIP with the same vhid was skipped"
            )
            continue
        uuid = str(vip.get(ATTRIBUTES, {}).get("uuid", "")) if isinstance(vip.get(ATTRIBUTES), dict) else ""
        if key in old and key not in seen:
            _, before = old[key]
            fields = tuple(f for f in VIP_FIELDS if not _php_loose_equal(before.get(f, ""), record.get(f, "")))
            if fields:
                ctx.vips_changed.append(_vip_change(root, record, uuid, fields))
        elif key not in old:
            ctx.vips_added.append(_vip_change(root, record, uuid))
        seen.add(key)
        new_nodes.extend(value_to_elements("vip", vip))
    for key, (node, record) in old.items():
        if key not in seen:
            ctx.vips_removed.append(_vip_change(root, record, node.get("uuid", "")))
    # Kept VIPs first, in their original order (PHP's array_unshift loop reverses them).
    _splice(section, existing, kept + new_nodes)
