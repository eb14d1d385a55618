"""What a sync will change on the backup, record by record and field by field.

`diff` compares, per sync item, what the backup *has* with what it will have *after* the sync.
"After" is not the primary's payload as is: it is the result of running the real merge
(`merge.merge_payload`) on a copy of the backup's sections, so every OPNsense merge rule is
honoured without being restated here: the backup's nosync records stay (and are no change), the
ordered rule lists drop them (a change, with the merge's warning), containers keep backup-only
keys, VIPs without a vhid stay, and the primary's `advskew + 100` arrives exactly as stored.

Records in lists are matched before they are compared:

* MVC records by their uuid;
* legacy records by a stable key when one exists and is unique on both sides (users and groups
  by name, certificates by refid, VIPs by OPNsense's VIP key, ...);
* records without any key (legacy firewall rules) by identical content first, then by an equal
  description, then by similarity (at least half of the fields equal); the rest are added or
  removed. A rule edited in place is therefore shown as one change, not a remove and an add.

Order is configuration for rules: of the matched records, those outside the longest run that
kept its relative order are reported as moved, with old and new positions.

Fields the sync items declare per-node (`pernode`) are never drift: a `local` field keeps the
backup's value through the simulated merge (so it is no change) and is listed as "kept on the
backup"; a `self_address`/`swap` field arrives as the primary rewrote it and is listed as
"rewritten" with the primary's value and the value sent.

Secrets (password hashes, private keys, API secrets, pre-shared keys, CARP and sync passwords)
are never printed: a field whose name, or any name above it, is secret-looking shows only as
changed/set/cleared. The unified format replaces each secret by a token derived with a random
per-run key, so equal secrets look equal within one output and nothing can be recovered from it.
"""

from __future__ import annotations

import bisect
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lxml import etree

from hasync.agent import lockout
from hasync.config.items import SyncItemRegistry, paths_overlap, read_hasync
from hasync.config.store import ConfigStore
from hasync.config.tree import ATTRIBUTES, value_to_elements
from hasync.config.vips import vip_key
from hasync.core.errors import HaError, TransportError
from hasync.core.secrets import is_secret_name, is_secret_path
from hasync.payload import digest as digestmod
from hasync.payload import pernode
from hasync.payload.merge import merge_payload
from hasync.sync import snapshot as snapshotmod
from hasync.sync.run import peer_from_settings
from hasync.wire.discovery import PeerFeatures, as_struct, discover, stock_note

if TYPE_CHECKING:
    from hasync.wire.client import ClientOptions, PeerClient

MISSING: Any = type("Missing", (), {"__repr__": lambda self: "<missing>"})()

def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --- the model --------------------------------------------------------------------------------


@dataclass
class FieldChange:
    field: str
    old: Any
    new: Any
    secret: bool

    @property
    def change(self) -> str:
        old_empty = self.old is MISSING or self.old == ""
        new_empty = self.new is MISSING or self.new == ""
        if old_empty and not new_empty:
            return "set"
        if new_empty and not old_empty:
            return "cleared"
        return "changed"

    def as_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"field": self.field, "secret": self.secret, "change": self.change}
        if not self.secret:
            data["old"] = None if self.old is MISSING else self.old
            data["new"] = None if self.new is MISSING else self.new
        return data


@dataclass
class RecordChange:
    kind: str  # added | removed | changed | moved
    path: str
    key: str
    label: str
    old_position: int | None = None
    new_position: int | None = None
    moved: bool = False
    fields: list[FieldChange] = field(default_factory=list)
    name: str | None = None  # the record's own `name`, when it has one (aliases, users, gateways, ...)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind, "path": self.path, "key": self.key, "label": self.label, "name": self.name,
            "old_position": self.old_position, "new_position": self.new_position, "moved": self.moved,
            "fields": [change.as_json() for change in self.fields],
        }


@dataclass
class ItemDiff:
    id: str
    description: str = ""
    status: str = "same"  # same | differs | unknown
    note: str = ""
    primary_digest: str = ""
    backup_digest: str = ""
    changes: list[RecordChange] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    before: Any = ""
    after: Any = ""
    declared: list[pernode.Note] = field(default_factory=list)
    lockout: str = ""  # the backup would refuse this sync: it locks the sync account out (lockout.py)

    def counts(self) -> dict[str, int]:
        return {
            "added": sum(1 for c in self.changes if c.kind == "added"),
            "removed": sum(1 for c in self.changes if c.kind == "removed"),
            "changed": sum(1 for c in self.changes if c.kind == "changed"),
            "moved": sum(1 for c in self.changes if c.moved),
        }

    @property
    def differs(self) -> bool:
        return self.status in ("differs", "unknown")

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "description": self.description, "status": self.status, "note": self.note,
            "digest": {"primary": self.primary_digest, "backup": self.backup_digest},
            "summary": self.counts(),
            "changes": [change.as_json() for change in self.changes],
            "warnings": self.warnings,
            "declared": [_declared_json(note) for note in self.declared],
            "lockout": self.lockout,
        }


def _declared_json(note: pernode.Note) -> dict[str, Any]:
    data: dict[str, Any] = {"path": note.path, "kind": note.kind}
    if note.kind == pernode.REWRITTEN and not is_secret_path(note.path):
        data["old"] = None if note.old is None else str(note.old)
        data["new"] = None if note.new is None else str(note.new)
    return data


def declared_notes(values: Mapping[str, Any], rewritten: list[pernode.Note], registry: SyncItemRegistry,
                   item_id: str) -> list[pernode.Note]:
    """The per-node fields of one item: its local paths in the payload, and what was rewritten."""
    sections = registry.get(item_id).sections
    mine = [note for note in rewritten if any(paths_overlap(_without_selectors(note.path), s) for s in sections)]
    return pernode.local_notes(values, registry.get(item_id).declarations) + mine


def _without_selectors(path: str) -> str:
    return re.sub(r"\[[^\]]*\]", "", path)


@dataclass
class DiffReport:
    source: str = "live"  # live | snapshot
    target: str = ""
    note: str = ""
    snapshot_time: float = 0.0
    items: list[ItemDiff] = field(default_factory=list)
    status: str = "ok"
    message: str = ""

    @property
    def fallback(self) -> bool:
        return self.source == "snapshot"

    @property
    def differences(self) -> int:
        return sum(1 for item in self.items if item.differs)

    @property
    def lockout(self) -> str:
        """Why a sync of these items would be refused as a lock-out ('' when it would not)."""
        return "; ".join(item.lockout for item in self.items if item.lockout)

    @property
    def exit_code(self) -> int:
        """diff(1): 0 no difference, 1 differences, 2 trouble."""
        if self.status != "ok":
            return 2
        return 1 if self.differences else 0

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "source": self.source,
            "fallback": self.fallback,
            "note": self.note,
            "target": self.target,
            "snapshot_time": self.snapshot_time,
            "differences": self.differences if self.status == "ok" else 0,
            "items": [item.as_json() for item in self.items],
            "message": self.message,
            "lockout": self.lockout,
        }


# --- record-level diff ------------------------------------------------------------------------


def _uuid(value: Any) -> str:
    if isinstance(value, dict):
        attributes = value.get(ATTRIBUTES)
        if isinstance(attributes, dict):
            return str(attributes.get("uuid", "") or "")
    return ""


def _records_like(value: Any) -> bool:
    if isinstance(value, list):
        return any(isinstance(item, dict) for item in value)
    return bool(_uuid(value))


def _as_list(value: Any) -> list[Any]:
    if value is MISSING or value == "":
        return []
    return value if isinstance(value, list) else [value]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a record as dotted field names; lists of scalars stay one field."""
    out: dict[str, Any] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if key == ATTRIBUTES and isinstance(item, dict):
                for name, text in item.items():
                    out[f"{prefix}@{name}"] = text
            elif key.endswith(ATTRIBUTES) and isinstance(item, dict):
                for name, text in item.items():
                    out[f"{join_path(prefix, key[: -len(ATTRIBUTES)])}@{name}"] = text
            else:
                out.update(flatten(item, join_path(prefix, key)))
        if not value:
            out[prefix] = ""
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        for index, item in enumerate(value):
            out.update(flatten(item, f"{prefix}[{index}]"))
    else:
        out[prefix] = value
    return out


def _field_changes(old: Mapping[str, Any], new: Mapping[str, Any], base: str, skip: Iterable[str] = ()) -> list[
        FieldChange]:
    skipped = set(skip)
    changes: list[FieldChange] = []
    for name in [*new, *(k for k in old if k not in new)]:
        if name in skipped:
            continue
        before, after = old.get(name, MISSING), new.get(name, MISSING)
        if before != after:
            changes.append(FieldChange(name or "(value)", before, after, is_secret_path(join_path(base, name))))
    return changes


_LABEL_FIELDS = ("descr", "description", "name", "hostname", "username", "tunable", "domain", "host", "subnet",
                 "refid", "ifname", "network")
_KEY_FIELDS: dict[str, tuple[str, ...]] = {
    "user": ("name", "uid"), "group": ("name", "gid"), "cert": ("refid",), "ca": ("refid",), "crl": ("refid",),
    "alias": ("name",), "gateway_item": ("name",), "authserver": ("name", "refid"), "schedule": ("name",),
    "staticmap": ("mac", "cid"), "ifgroupentry": ("ifname",), "phase1": ("ikeid",), "phase2": ("uniqid", "reqid"),
    "openvpn-server": ("vpnid",), "openvpn-client": ("vpnid",), "openvpn-csc": ("common_name",), "item": (),
    "route": ("network",), "timerange": (), "rule": ("tracker",),
}
_GENERIC_KEYS = ("refid", "name", "tunable", "vpnid", "ikeid", "uniqid", "tracker")


def _first_line(record: dict[str, Any], field_name: str) -> str:
    text = record.get(field_name)
    return text.strip().splitlines()[0][:80] if isinstance(text, str) and text.strip() else ""


def _naming(record: Any, key: str, secret_path: bool) -> tuple[str, str | None]:
    """(label, name): how an admin knows the record, for `diff`.

    A record whose model has a `name` (aliases, users, groups, gateways, schedules, Monit services,
    ...) is known by it: ``mail_servers ('Mail relays')``, and the name is returned on its own for
    --json. Otherwise the first descriptive field, quoted, or else the matching key.
    """
    if not isinstance(record, dict) or secret_path:
        return key, None
    name = _first_line(record, "name")
    if name:
        description = _first_line(record, "descr") or _first_line(record, "description")
        return (f"{name} ('{description}')" if description and description != name else name), name
    for field_name in _LABEL_FIELDS:
        text = _first_line(record, field_name)
        if text and not is_secret_name(field_name):
            return f"'{text}'", None
    return key, None


def _unique_key(records: list[Any], name: str) -> list[str] | None:
    values: list[str] = []
    for record in records:
        text = record.get(name) if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            return None
        values.append(text.strip())
    return values if len(set(values)) == len(values) else None


def _keys_for(old: list[Any], new: list[Any], path: str) -> tuple[str, list[str], list[str]] | None:
    """(mode, old keys, new keys) when every record has a unique key on both sides."""
    if not old and not new:
        return None
    if not all(isinstance(r, dict) for r in [*old, *new]):
        return None
    old_uuids, new_uuids = [_uuid(r) for r in old], [_uuid(r) for r in new]
    if all(old_uuids) and all(new_uuids) and len(set(old_uuids)) == len(old_uuids) and \
            len(set(new_uuids)) == len(new_uuids):
        return "uuid", old_uuids, new_uuids
    if is_secret_path(path):
        return None
    tag = path.rsplit(".", 1)[-1]
    if tag == "vip":
        def key(record: dict[str, Any]) -> str:
            return vip_key({k: v for k, v in record.items() if isinstance(v, str)})

        old_keys, new_keys = [key(r) for r in old], [key(r) for r in new]
        if len(set(old_keys)) == len(old_keys) and len(set(new_keys)) == len(new_keys):
            return "vip", old_keys, new_keys
    for name in (*_KEY_FIELDS.get(tag, ()), *_GENERIC_KEYS):
        old_keys_or_none, new_keys_or_none = _unique_key(old, name), _unique_key(new, name)
        if old_keys_or_none is not None and new_keys_or_none is not None:
            return name, old_keys_or_none, new_keys_or_none
    return None


def _similarity(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    names = set(a) | set(b)
    if not names:
        return 1.0
    return sum(1 for name in names if a.get(name, MISSING) == b.get(name, MISSING)) / len(names)


def _match_by_content(old: list[Any], new: list[Any]) -> list[tuple[int, int]]:
    """Pairs (old index, new index) for keyless records: identical, same description, similar."""
    pairs: list[tuple[int, int]] = []
    free_old = list(range(len(old)))
    free_new: list[int] = []
    for ni, record in enumerate(new):
        match = next((oi for oi in free_old if old[oi] == record), None)
        if match is None:
            free_new.append(ni)
        else:
            pairs.append((match, ni))
            free_old.remove(match)
    for name in ("descr", "description"):
        old_text = {oi: old[oi].get(name) for oi in free_old if isinstance(old[oi], dict)}
        new_text = {ni: new[ni].get(name) for ni in free_new if isinstance(new[ni], dict)}
        for ni, text in list(new_text.items()):
            if not isinstance(text, str) or not text.strip():
                continue
            olds = [oi for oi, other in old_text.items() if other == text]
            if len(olds) == 1 and list(new_text.values()).count(text) == 1:
                pairs.append((olds[0], ni))
                free_old.remove(olds[0])
                free_new.remove(ni)
                del old_text[olds[0]]
    flat_old = {oi: flatten(old[oi]) for oi in free_old}
    flat_new = {ni: flatten(new[ni]) for ni in free_new}
    candidates = sorted(
        ((_similarity(flat_old[oi], flat_new[ni]), -abs(oi - ni), oi, ni) for oi in free_old for ni in free_new),
        reverse=True,
    )
    used_old: set[int] = set()
    used_new: set[int] = set()
    for score, _distance, oi, ni in candidates:
        if score < 0.5:
            break
        if oi in used_old or ni in used_new:
            continue
        pairs.append((oi, ni))
        used_old.add(oi)
        used_new.add(ni)
    return pairs


def _stable_run(sequence: list[int]) -> set[int]:
    """Indexes (into `sequence`) of one longest increasing subsequence: the records that kept order."""
    if not sequence:
        return set()
    tails: list[int] = []  # index into sequence of the smallest tail of each length
    parent = [-1] * len(sequence)
    for i, value in enumerate(sequence):
        pos = bisect.bisect_left([sequence[t] for t in tails], value)
        if pos > 0:
            parent[i] = tails[pos - 1]
        if pos == len(tails):
            tails.append(i)
        else:
            tails[pos] = i
    keep: set[int] = set()
    index = tails[-1]
    while index != -1:
        keep.add(index)
        index = parent[index]
    return keep


def diff_list(old: list[Any], new: list[Any], path: str, out: list[RecordChange]) -> None:
    secret_path = is_secret_path(path)
    keyed = _keys_for(old, new, path)
    if keyed is not None:
        mode, old_keys, new_keys = keyed
        position = {key: index for index, key in enumerate(old_keys)}
        pairs = [(position[key], ni) for ni, key in enumerate(new_keys) if key in position]

        def key_text(index: int, side: str) -> str:
            keys = old_keys if side == "old" else new_keys
            return f"{mode} {keys[index]}"
    else:
        pairs = _match_by_content(old, new)

        def key_text(index: int, side: str) -> str:
            return f"#{index + 1}"

    pairs.sort(key=lambda pair: pair[1])
    kept = _stable_run([oi for oi, _ in pairs])
    matched_old = {oi for oi, _ in pairs}
    matched_new = {ni: oi for oi, ni in pairs}
    moved_new = {ni for index, (_, ni) in enumerate(pairs) if index not in kept}
    for oi, record in enumerate(old):
        if oi not in matched_old:
            label, name = _naming(record, key_text(oi, "old"), secret_path)
            out.append(RecordChange("removed", path, key_text(oi, "old"), label, old_position=oi + 1,
                                    fields=_field_changes(flatten(record), {}, path), name=name))
    for ni, record in enumerate(new):
        if ni not in matched_new:
            label, name = _naming(record, key_text(ni, "new"), secret_path)
            out.append(RecordChange("added", path, key_text(ni, "new"), label, new_position=ni + 1,
                                    fields=_field_changes({}, flatten(record), path), name=name))
            continue
        oi = matched_new[ni]
        skip = ("@uuid",) if keyed is not None and keyed[0] == "uuid" else ()
        fields = _field_changes(flatten(old[oi]), flatten(record), path, skip)
        moved = ni in moved_new
        if fields or moved:
            key = key_text(ni, "new") if keyed is not None else f"#{ni + 1}"
            label, name = _naming(record, key, secret_path)
            out.append(RecordChange("changed" if fields else "moved", path, key, label, old_position=oi + 1,
                                    new_position=ni + 1, moved=moved, fields=fields, name=name))


def diff_values(before: Any, after: Any, path: str = "") -> list[RecordChange]:
    """Record-level changes between two normalized values (see `digest.normalize`)."""
    out: list[RecordChange] = []
    _walk(before, after, path, out)
    return out


def _walk(before: Any, after: Any, path: str, out: list[RecordChange]) -> None:
    if before == after:
        return
    if isinstance(before, dict) and (after in ("", MISSING)):
        after = {}
    if isinstance(after, dict) and (before in ("", MISSING)):
        before = {}
    if isinstance(before, dict) and isinstance(after, dict):
        settings: list[FieldChange] = []
        for key in [*after, *(k for k in before if k not in after)]:
            old, new = before.get(key, MISSING), after.get(key, MISSING)
            if old == new:
                continue
            sub = join_path(path, key)
            if key == ATTRIBUTES or key.endswith(ATTRIBUTES):
                settings.extend(_field_changes(flatten({key: old}) if old is not MISSING else {},
                                               flatten({key: new}) if new is not MISSING else {}, path))
            elif _records_like(old) or _records_like(new):
                diff_list(_as_list(old), _as_list(new), sub, out)
            elif isinstance(old, dict) and isinstance(new, dict):
                _walk(old, new, sub, out)
            elif isinstance(old, dict) or isinstance(new, dict):
                if old in ("", MISSING) or new in ("", MISSING):
                    _walk(old, new, sub, out)
                else:
                    settings.extend(_field_changes(flatten(old, key), flatten(new, key), path))
            else:
                settings.append(FieldChange(key, old, new, is_secret_path(sub)))
        if settings:
            out.append(RecordChange("changed", path or "(top)", "", "(settings)", fields=settings))
        return
    if _records_like(before) or _records_like(after):
        diff_list(_as_list(before), _as_list(after), path, out)
        return
    name = path.rsplit(".", 1)[-1] if path else "(value)"
    out.append(RecordChange("changed", path or "(top)", "", "(value)",
                            fields=[FieldChange(name, before, after, is_secret_path(path))]))


# --- comparing with the backup ----------------------------------------------------------------


@dataclass(frozen=True)
class SyncLogin:
    """The credentials a sync would use (hasync.username/password), for the lock-out check."""

    username: str
    password: str = field(repr=False)


def simulate(before_raw: Mapping[str, Any], payload_part: Mapping[str, Any], registry: SyncItemRegistry,
             sections: list[str], login: SyncLogin | None = None) -> tuple[Any, Any, list[str], str]:
    """(before, after, merge warnings, lock-out): the backup's sections before and after the real
    merge, and, given the sync's `login`, the backup's refusal if the merge would lock it out."""
    tree = etree.Element("opnsense")
    for key, value in before_raw.items():
        tree.extend(value_to_elements(key, value))
    before = digestmod.normalize(digestmod.tree_item_value(tree, sections))
    accounts = lockout.accounts_copy(tree) if login is not None else None
    report = merge_payload(tree, dict(payload_part), registry, accept_unknown=True)
    after = digestmod.normalize(digestmod.tree_item_value(tree, sections))
    warnings = [w for w in report.warnings if "--accept-unknown-sections" not in w]
    refusal = ""
    if login is not None and accounts is not None:
        refusal = lockout.lost_access(accounts, tree, login.username, login.password, now=time.time()) or ""
    return before, after, warnings, refusal


def _compare_item(item: ItemDiff, before_raw: Mapping[str, Any], payload_part: Mapping[str, Any],
                  registry: SyncItemRegistry, sections: list[str], login: SyncLogin | None = None) -> None:
    before, after, warnings, item.lockout = simulate(before_raw, payload_part, registry, sections, login)
    item.before, item.after = before, after
    item.changes = diff_values(before, after)
    item.warnings = warnings
    if item.changes:
        item.status = "differs"
    else:
        item.status = "same"
        item.note = ("the digests differ only in content a sync keeps on the backup (its own nosync records or "
                     "settings only it has); a sync changes nothing here")


def selected_items(root: etree._Element, registry: SyncItemRegistry, explicit: list[str] | None) -> list[str]:
    if explicit:
        registry.resolve(explicit)  # unknown ids are an error, named
        return list(dict.fromkeys(explicit))
    ids, _unknown = registry.split_known(read_hasync(root).syncitems)
    if not ids:
        raise HaError("no sync items selected: hasync.syncitems is empty (choose items in System > High "
                      "Availability, or pass --items)")
    return ids


def build_diff(
    store: ConfigStore,
    registry: SyncItemRegistry,
    peer: PeerClient,
    item_ids: list[str] | None = None,
    features: PeerFeatures | None = None,
) -> DiffReport:
    """Compare this (primary) node's items with the backup: live if it has hasync.*, else the snapshot."""
    root = store.load()
    ids = selected_items(root, registry, item_ids)
    rewritten: list[pernode.Note] = []
    values = digestmod.primary_item_values(root, registry, ids, rewritten)
    local = digestmod.item_digests(values, registry)
    features = features or discover(peer)
    settings = read_hasync(root)
    login = SyncLogin(settings.effective_username, settings.password)
    report = DiffReport(target=peer.url)
    items = {item_id: ItemDiff(item_id, registry.get(item_id).description, primary_digest=local[item_id],
                               declared=declared_notes(values[item_id], rewritten, registry, item_id))
             for item_id in ids}
    report.items = list(items.values())
    if features.has("hasync.digest") and features.has("hasync.export_sections"):
        remote, unknown = digestmod.parse_digest_reply(peer.call("hasync.digest", [ids]))
        differing = [i for i in ids if i not in unknown and remote.get(i) != local[i]]
        exported: dict[str, Any] = {}
        if differing:
            reply = as_struct(peer.call("hasync.export_sections", [differing]))
            exported = as_struct(reply.get("items", {}))
        for item_id, item in items.items():
            item.backup_digest = remote.get(item_id, "")
            if item_id in unknown:
                item.status = "unknown"
                item.note = ("the backup does not know this sync item (plugin or version missing there); "
                             "it would refuse these sections")
            elif item_id in differing:
                entry = as_struct(exported.get(item_id, {}))
                if "value" not in entry:
                    raise TransportError(f"hasync.export_sections did not return item {item_id}")
                _compare_item(item, as_struct(entry["value"]), values[item_id], registry,
                              registry.get(item_id).sections, login)
        return report
    report.source = "snapshot"
    snap = snapshotmod.load(store.conf_dir)
    if snap is None:
        raise HaError(stock_note(peer, "and this node has no snapshot of an earlier sync to compare with, so "
                                       "what the backup holds is unknown. Run `opnsense-ha sync` once; diff then "
                                       "shows what changed on this node since"))
    report.snapshot_time = snap.time
    report.note = stock_note(peer, f"this diff compares with the snapshot of what this node last pushed "
                                   f"({snap.time_iso}); changes made on the backup itself are NOT visible")
    if snap.target and snap.target != peer.url:
        report.note += f". The snapshot is of a sync to {snap.target}, not {peer.url}"
    kept = [note.path for item in items.values() for note in item.declared if note.kind == pernode.KEPT]
    if kept:  # PHP's merge knows no declarations: nothing is kept there
        for item in items.values():
            item.declared = [note for note in item.declared if note.kind != pernode.KEPT]
        report.note += (f". A stock backup cannot keep its own value of the field(s) declared local, a sync "
                        f"overwrites them: {', '.join(kept)}")
    for item_id, item in items.items():
        record = snap.items.get(item_id)
        if record is None:
            item.status = "unknown"
            item.note = "not in the snapshot: this node never pushed this item, so the backup's copy is unknown"
            continue
        item.backup_digest = record.digest
        if record.digest == local[item_id]:
            continue
        pushed = snap.item_value(item_id)
        if pushed is None:
            item.status = "unknown"
            item.note = "the snapshot lacks this item's values; run `opnsense-ha sync` to refresh it"
            continue
        _compare_item(item, pushed, values[item_id], registry, registry.get(item_id).sections, login)
    return report


def diff_with_backup(store: ConfigStore, registry: SyncItemRegistry, client_options: ClientOptions,
                     item_ids: list[str] | None = None) -> DiffReport:
    """`build_diff` against the backup named by hasync.synchronizetoip."""
    root = store.load()
    peer = peer_from_settings(store.conf_dir, root, read_hasync(root), client_options)
    return build_diff(store, registry, peer, item_ids)
