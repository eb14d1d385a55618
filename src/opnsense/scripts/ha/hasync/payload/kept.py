"""The backup's `local` fields kept through a merge (per-node declarations, `config.pernode`).

Before merging, the backup puts its own value (or its absence) into the incoming payload at
every declared `local` slot, so the merge writes back what the backup had: a kept field is
never overwritten, a kept record never replaced or removed, and neither counts as a change.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

from lxml import etree

from hasync.config.pernode import CopyOnWrite, Declarations, Identity, PathRule, Slot, find, show_identity, slot_order
from hasync.payload.digest import tree_item_value
from hasync.payload.pernode import KEPT, Note


def _backup_values(root: etree._Element, rules: Iterable[PathRule]) -> dict[str, Any]:
    """The backup's payload-form value under each rule's literal prefix (only those subtrees)."""
    # stop above the last step: a missing field must read as absent, not as the `[]` a missing path gets
    prefixes = list(dict.fromkeys(".".join(rule.literal_prefix[: max(1, len(rule.steps) - 1)]) for rule in rules))
    return tree_item_value(root, prefixes) if prefixes else {}


def keep_local(root: etree._Element, payload: dict[str, Any], rules: Declarations) -> tuple[dict[str, Any], list[Note]]:
    """The payload with every `local` slot carrying the backup's own value (or its absence).

    Run by the backup's merge before merging, so the merge writes back what the backup had:
    a kept field is never overwritten, a kept record never replaced or removed, and neither
    counts as a change. The incoming payload is not modified (copy-on-write).
    """
    matching = [rule for rule in rules.local if rule.steps[0].name in payload]
    if not matching:
        return payload, []
    backup = _backup_values(root, matching)
    cow = CopyOnWrite(payload)
    notes: list[Note] = []
    for rule in matching:
        ours = {slot.identity: slot.value for slot in find(backup, rule.steps)}
        incoming = list(find(cow.root, rule.steps))
        removals: list[Slot] = []
        for slot in incoming:
            if slot.identity in ours:
                cow.container(slot.pointer[:-1])[slot.key] = copy.deepcopy(ours[slot.identity])
            else:
                removals.append(slot)
            notes.append(Note(show_identity(slot.identity), KEPT, slot.value,
                              ours.get(slot.identity)))
        # removals last, from the highest list index down, so earlier indexes stay valid
        for slot in sorted(removals, key=slot_order, reverse=True):
            holder = cow.container(slot.pointer[:-1])
            del holder[slot.key]
        missing = [identity for identity in ours if identity not in {s.identity for s in incoming}]
        if missing:
            _add_backup_only(cow, rule, missing, ours)
    return cow.root, notes


def _add_backup_only(cow: CopyOnWrite, rule: PathRule, missing: list[Identity], ours: dict[Identity, Any]) -> None:
    """Put the backup's slots the payload lacks into the payload, where their parent travels."""
    last = rule.steps[-1]
    parents = {slot.identity: slot.pointer for slot in find(cow.root, rule.steps[:-1])} if len(rule.steps) > 1 \
        else {(): ()}
    for identity in missing:
        pointer = parents.get(identity[:-1])
        if pointer is None:
            continue  # the payload does not carry the record around it: the merge leaves it alone
        holder = cow.container(pointer)
        if not isinstance(holder, dict):
            continue
        key = identity[-1][0] if isinstance(identity[-1], tuple) else identity[-1]
        value = copy.deepcopy(ours[identity])
        if last.selector is None:
            holder[key] = value
            continue
        existing = holder.get(key)
        if isinstance(existing, list):
            holder[key] = [*existing, value]
        elif isinstance(existing, dict):
            holder[key] = [existing, value]
        else:
            holder[key] = [value]
