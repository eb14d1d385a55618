"""Per-node values applied: the primary's rewrites, the backup's kept fields, digests without them.

The declarations and their paths are `config.pernode`; this module applies them to payloads
(`rewrite_for_backup` on the primary, `prune_local` for digests; the backup's merge keeps
`local` fields through `payload.kept`) and finds a node's own address facing a peer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any, NamedTuple

from hasync.config.pernode import CopyOnWrite, Declarations, find, show_identity, slot_order
from hasync.core.errors import ConfigError

# --- applying the rules ----------------------------------------------------------------------------


class Note(NamedTuple):
    """What a declaration did to one field, for `diff`, the sync's warnings and logs."""

    path: str
    kind: str  # "kept on the backup" | "rewritten"
    old: Any = None
    new: Any = None


KEPT = "kept on the backup"
REWRITTEN = "rewritten"


def rewrite_for_backup(payload: dict[str, Any], config: Mapping[str, Any], rules: Declarations,
                       edits: list[tuple[Any, ...]] | None = None) -> list[Note]:
    """The primary's share, in place on a payload it just built: `self_address`, then `swap`.

    `config` needs only ``interfaces`` (``{if: {ipaddr, subnet, ipaddrv6, subnetv6}}``): our own
    addresses, of which the one on the subnet facing the peer replaces the peer's. `edits`
    receives the pointer (keys from the payload's root) of every container it changed.
    """
    notes: list[Note] = []
    for rule in rules.self_address:
        for slot in list(find(payload, rule.steps)):
            peer = slot.value
            if not isinstance(peer, str) or peer.strip() == "":
                continue  # empty stays empty
            prefer = slot.holder.get("interface") if isinstance(slot.holder.get("interface"), str) else \
                (slot.pointer[-2] if len(slot.pointer) >= 2 and isinstance(slot.pointer[-2], str) else "")
            own = address_facing(config, peer.strip(), prefer=prefer, what=show_identity(slot.identity))
            slot.holder[slot.key] = own
            if edits is not None:
                edits.append(slot.pointer[:-1])
            notes.append(Note(show_identity(slot.identity), REWRITTEN, peer, own))
    for first, second in rules.swap:
        parents = first.steps[:-1]
        a, b = first.steps[-1].name, second.steps[-1].name
        holders = [(s.value, s.identity, s.pointer) for s in find(payload, parents)] if parents else \
            [(payload, (), ())]
        for record, identity, pointer in holders:
            if not isinstance(record, dict) or (a not in record and b not in record):
                continue
            if edits is not None:
                edits.append(pointer)
            old_a, old_b = record.get(a), record.get(b)
            for name, value in ((a, old_b), (b, old_a)):
                if value is None:
                    del record[name]
                else:
                    record[name] = value
            where = show_identity(identity)
            notes.append(Note(f"{where}.{a}" if where else a, REWRITTEN, old_a, old_b))
            notes.append(Note(f"{where}.{b}" if where else b, REWRITTEN, old_b, old_a))
    return notes


def prune_local(value: Mapping[str, Any], rules: Declarations) -> Mapping[str, Any]:
    """`value` without its `local` slots (copy-on-write): what digests compare on both nodes."""
    matching = [rule for rule in rules.local if rule.steps[0].name in value]
    if not matching:
        return value
    cow = CopyOnWrite(dict(value))
    for rule in matching:
        for slot in sorted(find(cow.root, rule.steps), key=slot_order, reverse=True):
            del cow.container(slot.pointer[:-1])[slot.key]
    return cow.root


def local_fields(payload: Mapping[str, Any], rules: Declarations) -> list[str]:
    """The concrete `local` paths a payload carries (what a stock backup will overwrite)."""
    return [show_identity(slot.identity) for rule in rules.local for slot in find(payload, rule.steps)]


def local_notes(payload: Mapping[str, Any], rules: Declarations) -> list[Note]:
    return [Note(path, KEPT) for path in local_fields(payload, rules)]


# --- our own address facing a peer ------------------------------------------------------------------


def address_facing(config: Mapping[str, Any], peer: str, prefer: str = "", what: str = "peer") -> str:
    """Our static address on the interface whose subnet contains `peer` (IPv4 or IPv6).

    PHP asks the routing table (`guess_interface_from_ip`); we derive it from
    ``interfaces.<if>.ipaddr``/``subnet`` (``ipaddrv6``/``subnetv6`` for IPv6) so the payload is
    a pure function of config.xml. The most specific subnet wins; on a tie the interface named
    `prefer` (the record's own interface). Sending the peer its own address, or none, would break
    the feature on the backup, so not finding one is an error naming the field.
    """
    try:
        peer_ip = ipaddress.ip_address(peer)
    except ValueError:
        raise ConfigError(f"{what} {peer!r} is not an IP address") from None
    suffix = "" if peer_ip.version == 4 else "v6"
    interfaces = config.get("interfaces")
    best: tuple[int, int, str] | None = None
    for name, conf in (interfaces.items() if isinstance(interfaces, Mapping) else []):
        if not isinstance(conf, Mapping):
            continue
        address, bits = conf.get(f"ipaddr{suffix}"), conf.get(f"subnet{suffix}")
        if not isinstance(address, str) or not isinstance(bits, str):
            continue
        try:
            network = ipaddress.ip_interface(f"{address.strip()}/{bits.strip()}")
        except ValueError:
            continue  # dhcp, pppoe, track6, empty: no static address to offer
        if network.version != peer_ip.version:
            continue
        if peer_ip in network.network and peer_ip != network.ip:
            rank = (network.network.prefixlen, 1 if name == prefer else 0, str(network.ip))
            if best is None or rank[:2] > best[:2]:
                best = rank
    if best is None:
        family = "IPv4" if peer_ip.version == 4 else "IPv6"
        raise ConfigError(
            f"{what} {peer}: no interface has a static {family} subnet containing it, so our own address facing "
            f"the peer is unknown; fix interfaces.<if>.ipaddr{suffix}/subnet{suffix} or the peer address"
        )
    return best[2]


def interfaces_for_rewrite(interfaces: Any) -> dict[str, dict[str, str]]:
    """`interfaces` reduced to what `address_facing` reads (for the fast path's wire)."""
    out: dict[str, dict[str, str]] = {}
    if isinstance(interfaces, dict):
        for name, conf in interfaces.items():
            if not isinstance(conf, dict):
                continue
            kept = {key: conf[key] for key in ("ipaddr", "subnet", "ipaddrv6", "subnetv6")
                    if isinstance(conf.get(key), str)}
            if kept:
                out[str(name)] = kept
    return out
