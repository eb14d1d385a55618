"""Per-node values: what must differ between the two firewalls, declared per sync item (the model).

This module holds the declarations, their path syntax and how a path finds its values; applying
them to a payload is `payload.pernode`.

OPNsense's sync copies every value verbatim, yet some values are only right when they differ
between the nodes (Kea's `this_server_name`, a unicast CARP peer, HAProxy's local peer, one
admin's cron job). Guessing which ones is "prone to assumptions"; instead each sync item
*declares* them, and every part of the sync honours the declarations:

* ``local``: paths whose value on the backup is kept. The backup's merge puts its own value (or
  its absence) into the incoming payload before merging (`keep_local`), so the value is never
  overwritten nor removed, and a kept value is no change; digests leave these paths out on both
  nodes (`prune_local`), so a declared-local difference is not a difference.
* ``self_address``: paths holding the *other* node's address. The primary sends its own address
  on the interface facing that peer (`rewrite_for_backup`), so on the backup the field points
  back at the primary. Today's DHCP failover rewrite is one such declaration.
* ``swap``: pairs of fields of one record whose values trade places on the backup (HAProxy's
  "this peer"/"other peer").

`self_address` and `swap` are applied by the primary to the payload, so they work with a stock
OPNsense backup too; `local` needs our merge on the backup (a stock one overwrites the fields,
and the sync says so).

Path syntax (dotted, below ``<opnsense>``, inside one of the item's sections)::

    path     := step ("." step)*
    step     := NAME [ "[" selector "]" ] | "*"
    selector := "*" | FIELD | FIELD "=" VALUE

``*`` as a step is every child key (``dhcpd.*.failover_peerip``: every interface). A selector
treats the value at NAME as a list of records (a single record counts as a list of one) and picks
every record (``*``), those whose FIELD is non-empty (``vip[peer]``), or those whose FIELD equals
VALUE (``job[description=Firmware update]``). A path ending in a selector names whole records.
Records are paired between the nodes by uuid when both have one, otherwise by their order among
the records the selector picks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from hasync.core.errors import SyncItemError
from hasync.core.php import php_truthy

ATTRIBUTES = "@attributes"  # tree.ATTRIBUTES (not imported: tree is imported by callers of this module)

_NAME = r"[A-Za-z_][A-Za-z0-9_-]*"
_STEP_RE = re.compile(rf"^(?:(\*)|({_NAME})(?:\[(?:(\*)|({_NAME})(?:=([^\]]*))?)\])?)$")

# --- the declaration model -----------------------------------------------------------------------


class Selector(NamedTuple):
    """Which records of a list a step picks: all, those with a non-empty field, or field == value."""

    field: str = ""  # "" = every record
    value: str | None = None  # None = the field is non-empty

    def picks(self, record: Any) -> bool:
        if not isinstance(record, dict):
            return False
        if not self.field:
            return True
        got = record.get(self.field)
        if isinstance(got, (dict, list)) or got is None:
            got = ""
        text = str(got).strip()
        return text == self.value if self.value is not None else php_truthy(text)


class Step(NamedTuple):
    """One step of a declaration path: a child key (or `*`), optionally narrowed to records."""

    name: str  # "*" = every child key
    selector: Selector | None = None


class PathRule(NamedTuple):
    """One parsed declaration path."""

    text: str
    steps: tuple[Step, ...]

    @property
    def literal_prefix(self) -> list[str]:
        """The plain names up to the first wildcard or selector (where the value can be located directly)."""
        names: list[str] = []
        for step in self.steps:
            if step.name == "*":
                break
            names.append(step.name)
            if step.selector is not None:
                break
        return names

    @property
    def names_record(self) -> bool:
        """True when the path ends in a selector: it names whole records."""
        return self.steps[-1].selector is not None


def _split(text: str) -> list[str]:
    """Split at dots outside brackets (a selector's value may contain dots)."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
        elif char == "." and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def parse_path(text: str) -> PathRule:
    """Parse a declaration path; ValueError says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("a path must be a non-empty string")
    steps: list[Step] = []
    for part in _split(text.strip()):
        match = _STEP_RE.match(part)
        if match is None:
            raise ValueError(f"{text!r}: step {part!r} is not NAME, NAME[selector] or *")
        star, name, all_records, sel_field, sel_value = match.groups()
        if star:
            steps.append(Step("*"))
        elif all_records or sel_field:
            steps.append(Step(name, Selector(sel_field or "", sel_value.strip() if sel_value is not None else None)))
        else:
            steps.append(Step(name))
    return PathRule(text.strip(), tuple(steps))


class Declarations(NamedTuple):
    """The per-node declarations of one item, or of a whole registry (their union)."""

    local: tuple[PathRule, ...] = ()
    self_address: tuple[PathRule, ...] = ()
    swap: tuple[tuple[PathRule, PathRule], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.local or self.self_address or self.swap)

    def merged(self, other: Declarations) -> Declarations:
        """Both sets, each rule once, in order."""
        return Declarations(
            tuple(dict.fromkeys((*self.local, *other.local))),
            tuple(dict.fromkeys((*self.self_address, *other.self_address))),
            tuple(dict.fromkeys((*self.swap, *other.swap))),
        )

    def as_json(self) -> dict[str, Any]:
        """The declaration as written in a drop-in file (also the fast path's wire form)."""
        return {
            "local": [rule.text for rule in self.local],
            "self_address": [rule.text for rule in self.self_address],
            "swap": [[a.text, b.text] for a, b in self.swap],
        }

    def rewriting(self, sections: Iterable[str]) -> Declarations:
        """Only the `self_address`/`swap` rules that can touch `sections` (what the primary applies)."""
        tops = {section.split(".")[0] for section in sections}
        return Declarations(
            (),
            tuple(rule for rule in self.self_address if rule.steps[0].name in tops),
            tuple(pair for pair in self.swap if pair[0].steps[0].name in tops),
        )


def _inside(rule: PathRule, sections: Sequence[str]) -> bool:
    prefix = rule.literal_prefix
    return any(prefix[: len(parts)] == parts and len(prefix) >= len(parts)
               for parts in (section.split(".") for section in sections))


def declarations_from(record: Mapping[str, Any], sections: Sequence[str], where: str) -> Declarations:
    """Parse and check the ``local``/``self_address``/``swap`` members of one item record.

    `where` names the file and record for errors (``items.d/x.json: field [0].local[1]: ...``).
    Every path must lie inside one of the item's `sections` (a declaration cannot reach into
    another item, or into `interfaces`); a `self_address` path must end in a field; a `swap`
    pair must be two fields of the same record.
    """
    def fail(name: str, message: str) -> SyncItemError:
        return SyncItemError(f"{where}field {name}: {message}")

    def parse(name: str, text: Any) -> PathRule:
        try:
            rule = parse_path(text)
        except ValueError as exc:
            raise fail(name, str(exc)) from None
        if not _inside(rule, sections):
            raise fail(name, f"{rule.text!r} is not inside the item's sections ({', '.join(sections)})")
        return rule

    def field_rule(name: str, text: Any, what: str) -> PathRule:
        rule = parse(name, text)
        if rule.steps[-1].name == "*" or rule.names_record:
            raise fail(name, f"{rule.text!r}: a {what} path must end in a field name, not a selector or *")
        return rule

    local = tuple(parse(f"local[{i}]", text) for i, text in enumerate(record.get("local", [])))
    self_address = tuple(field_rule(f"self_address[{i}]", text, "self_address")
                         for i, text in enumerate(record.get("self_address", [])))
    swap: list[tuple[PathRule, PathRule]] = []
    for i, pair in enumerate(record.get("swap", [])):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise fail(f"swap[{i}]", "a swap is a pair of two paths")
        first = field_rule(f"swap[{i}][0]", pair[0], "swap")
        second = field_rule(f"swap[{i}][1]", pair[1], "swap")
        if first.steps[:-1] != second.steps[:-1] or first.steps[-1] == second.steps[-1]:
            raise fail(f"swap[{i}]", f"{first.text!r} and {second.text!r} must be two different fields of the "
                                     "same record")
        swap.append((first, second))
    return Declarations(local, self_address, tuple(swap))


def core(local: Sequence[str] = (), self_address: Sequence[str] = (),
         swap: Sequence[tuple[str, str]] = ()) -> Declarations:
    """Declarations written in code (the core items); the paths are ours, so a bad one is a bug."""
    return Declarations(tuple(parse_path(p) for p in local), tuple(parse_path(p) for p in self_address),
                        tuple((parse_path(a), parse_path(b)) for a, b in swap))


def from_wire(value: Any) -> Declarations:
    """The rewriting rules the primary sent along a fast-path blob (``as_json`` form)."""
    if value in (None, [], {}):
        return Declarations()
    if not isinstance(value, dict):
        raise ValueError("'pernode' must be a struct")
    self_address = value.get("self_address") or []
    swap = value.get("swap") or []
    if not isinstance(self_address, list) or not isinstance(swap, list):
        raise ValueError("'pernode' rules must be arrays")
    def field(text: Any) -> PathRule:
        rule = parse_path(text)
        if rule.steps[-1].name == "*" or rule.names_record:
            raise ValueError(f"{rule.text!r} must end in a field name")
        return rule

    pairs = []
    for pair in swap:
        if not isinstance(pair, list) or len(pair) != 2:
            raise ValueError("'pernode' swap entries must be pairs")
        pairs.append((field(pair[0]), field(pair[1])))
    return Declarations((), tuple(field(p) for p in self_address), tuple(pairs))


# --- finding the values a rule names ---------------------------------------------------------------

# A slot is where one matched value sits: the container holding it and the key (dict) or index
# (list) inside it, plus the pointer from the root (for copy-on-write) and the identity that pairs
# it with the same slot on the other node.
Identity = tuple[Any, ...]


class Slot:
    """Where a declared path lands in a payload: the holding container and key, for reading and
    writing in place, and the record identity that names it in notes."""

    __slots__ = ("holder", "identity", "key", "pointer")

    def __init__(self, holder: Any, key: Any, pointer: tuple[Any, ...], identity: Identity) -> None:
        self.holder = holder
        self.key = key
        self.pointer = pointer
        self.identity = identity

    @property
    def value(self) -> Any:
        return self.holder[self.key]


def _uuid(record: Any) -> str:
    attributes = record.get(ATTRIBUTES) if isinstance(record, dict) else None
    return str(attributes.get("uuid") or "") if isinstance(attributes, dict) else ""


def find(value: Any, steps: Sequence[Step]) -> Iterator[Slot]:
    """Every slot of `value` (a payload-form value from the root) that `steps` name."""
    yield from _find(value, tuple(steps), 0, (), ())


def _find(node: Any, steps: tuple[Step, ...], index: int, pointer: tuple[Any, ...],
          identity: Identity) -> Iterator[Slot]:
    if not isinstance(node, dict):
        return
    step = steps[index]
    last = index == len(steps) - 1
    keys = [k for k in node if not k.endswith(ATTRIBUTES)] if step.name == "*" else \
        ([step.name] if step.name in node else [])
    for key in keys:
        child = node[key]
        if step.selector is None:
            if last:
                yield Slot(node, key, (*pointer, key), (*identity, key))
            else:
                yield from _find(child, steps, index + 1, (*pointer, key), (*identity, key))
            continue
        single = isinstance(child, dict)
        records = [child] if single else (child if isinstance(child, list) else [])
        ordinal = 0
        for position, record in enumerate(records):
            if not step.selector.picks(record):
                continue
            uuid = _uuid(record)
            record_id = (key, ("uuid", uuid) if uuid else ("#", ordinal))
            ordinal += 1
            record_pointer = pointer + ((key,) if single else (key, position))
            if last:
                yield Slot(node, key, record_pointer, (*identity, record_id)) if single else \
                    Slot(child, position, record_pointer, (*identity, record_id))
            else:
                yield from _find(record, steps, index + 1, record_pointer, (*identity, record_id))


def show_identity(identity: Identity) -> str:
    """A concrete dotted path for messages: ``virtualip.vip[uuid=…].peer``, ``….job[#2]``."""
    parts = []
    for part in identity:
        if isinstance(part, tuple):
            key, (kind, value) = part
            parts.append(f"{key}[uuid={value}]" if kind == "uuid" else f"{key}[#{value + 1}]")
        else:
            parts.append(str(part))
    return ".".join(parts)


def slot_order(slot: Slot) -> tuple[tuple[int, int, str], ...]:
    """Sort key: removing slots in reverse of this order keeps the remaining list indexes valid."""
    return tuple((1, part, "") if isinstance(part, int) else (0, 0, str(part)) for part in slot.pointer)


class CopyOnWrite:
    """Makes the containers along a pointer private before they are changed.

    The payloads and values handed around share subtrees (a digest's value with the payload it
    came from, a diff's payload with the report); a declaration must change only its own copy,
    and deep-copying a large section for one field would cost seconds.
    """

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = dict(root)
        self._fresh = {id(self.root)}

    def container(self, pointer: Sequence[Any]) -> Any:
        node: Any = self.root
        for part in pointer:
            child = node[part]
            if id(child) not in self._fresh:
                child = dict(child) if isinstance(child, dict) else list(child)
                node[part] = child
                self._fresh.add(id(child))
            node = child
        return node


