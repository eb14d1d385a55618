"""Build the `restore_config_section` argument exactly as OPNsense's PHP primary builds it.

The rules are those of `rc.filter_synchronize` / `carp_sync_xml()` (reference §3):

* each dotted section path is copied into the same nested position of the payload, and the
  intermediate levels carry nothing else (`system.user` sends ``{system: {user: [...]}}``, never
  the hostname next to it);
* a path missing locally is sent as an empty value (``[]``, an empty XML-RPC ``<array>``) so the
  backup learns that the data is gone;
* every record with a non-empty ``nosync`` is removed, wherever it sits;
* `virtualip` carries only VIPs with a vhid, each that has an advskew with ``advskew =
  min(advskew + 100, 254)`` so the backup always advertises worse than the primary (an IP alias
  stacked on a CARP vhid, with an empty or no advskew, travels as it is);
* the items' per-node declarations are applied (`pernode`): every ``self_address`` field (the
  DHCP failover peer ``dhcpd.<if>.failover_peerip``, a CARP VIP's unicast ``peer``/``peer6``)
  becomes our own address on the interface facing the peer (on the backup, the peer is us), and
  ``swap`` pairs trade places;
* `hasync`, `interfaces`, `revision` and `system` as a whole are never sent.

The input is the lxml root of config.xml; values come from `tree.element_to_value`, so the shape
(lists, ``@attributes``, empty strings) is the one `Config::toArray()` gives and the encoder in
`xmlrpc` turns it into the same bytes PHP's IXR library would.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lxml import etree

from hasync.config.items import SyncItemRegistry, read_hasync, section_refusal
from hasync.config.pernode import Declarations
from hasync.config.tree import element_to_value
from hasync.core.errors import SyncItemError
from hasync.core.php import php_empty, php_intval
from hasync.core.secrets import is_secret_name
from hasync.payload import pernode

VIRTUALIP = "virtualip"
BACKUP_SKEW_OFFSET = 100
MAX_ADVSKEW = 254

# Ordered legacy rule lists: the merge replaces them wholesale, the backup's nosync rules are not
# kept (here, not in `merge`, so the digests can name them without loading the merge engine).
RULE_LISTS: frozenset[str] = frozenset({"filter.rule", "nat.rule", "nat.outbound.rule"})


def check_sections(sections: Iterable[str]) -> list[str]:
    """The sections, refusing the node-specific ones with a message that says why."""
    checked: list[str] = []
    for section in sections:
        section = section.strip()
        if not section:
            continue
        reason = section_refusal(section)
        if reason:
            raise SyncItemError(f"refusing to synchronise {reason}")
        checked.append(section)
    return checked


@functools.lru_cache(maxsize=1)
def shipped_declarations() -> Declarations:
    """The per-node declarations of the items this package ships (core and its items.d)."""
    return SyncItemRegistry.load().declarations()


def build_payload(
    root: etree._Element,
    sections: Sequence[str],
    declarations: Declarations | None = None,
    notes: list[pernode.Note] | None = None,
) -> dict[str, Any]:
    """The nested value a PHP primary would send for these dotted `sections` of `root`.

    The whole root is converted once: a config is a few MB at most, and converting per path
    would have to re-implement toArray's list rules for each level. `declarations` are the
    registry's per-node rules (default: those this package ships); `notes` receives what they
    rewrote.
    """
    wanted = check_sections(sections)
    config = element_to_value(root)
    payload: dict[str, Any] = {}
    for section in wanted:
        if section == VIRTUALIP:
            payload[VIRTUALIP] = vip_section(config)
        else:
            copy_section(config, payload, section, copy_value=False)  # `config` is ours alone
    remove_nosync(payload)
    rules = shipped_declarations() if declarations is None else declarations
    done = pernode.rewrite_for_backup(payload, config, rules.rewriting(wanted))
    if notes is not None:
        notes.extend(done)
    return payload


def payload_for_items(
    root: etree._Element, registry: SyncItemRegistry, item_ids: Iterable[str]
) -> dict[str, Any]:
    """The payload for the given sync item ids (unknown ids are an error)."""
    return build_payload(root, registry.sections_for(item_ids), registry.declarations())


def selected_item_ids(root: etree._Element, explicit: str | None = None) -> list[str]:
    """`explicit` (a comma list, as `--items` takes it) or else the ids stored in `hasync`."""
    if explicit is not None:
        ids = [part.strip() for part in explicit.split(",") if part.strip()]
        if not ids:
            raise SyncItemError("--items is empty: name at least one sync item id")
        return ids
    ids = read_hasync(root).syncitems
    if not ids:
        raise SyncItemError(
            "no sync items selected: hasync.syncitems is empty (choose items in System > High "
            "Availability, or pass --items)"
        )
    return ids


# --- the rules ----------------------------------------------------------------------------


def copy_section(config: dict[str, Any], payload: dict[str, Any], dotted: str, copy_value: bool = True) -> None:
    """copy_conf_section(): put the subtree at `dotted` into the same position of `payload`.

    PHP keeps searching the *same* source level after a missing part (so `a.b` with `a` missing
    would pick up a top-level `b`); the intended behaviour, implemented here, is that everything
    below a missing level is missing too. `copy_value=False` places the subtree itself, for a
    `config` that is thrown away afterwards (a deep copy of 50 MB of values takes seconds).
    """
    parts = dotted.split(".")
    source: Any = config
    missing = False
    for part in parts:
        if isinstance(source, dict) and part in source:
            source = source[part]
        else:
            missing = True
            break
    value = [] if missing else (copy.deepcopy(source) if copy_value else source)
    place_at(payload, parts, value)


def place_at(payload: dict[str, Any], parts: Sequence[str], value: Any) -> None:
    """Put `value` at `parts` of `payload`, building the intermediate levels as copy_conf_section does.

    An intermediate level that an earlier, broader section already filled with a whole subtree
    wins: the narrower section is inside it already.
    """
    target = payload
    for part in parts[:-1]:
        existing = target.get(part)
        if isinstance(existing, dict):
            target = existing
        elif existing is None or php_empty(existing):
            target[part] = {}
            target = target[part]
        else:
            return
    target[parts[-1]] = value


def remove_nosync(value: Any, clean: Callable[[Any], bool] | None = None) -> None:
    """remove_nosync(): drop every record (dict) whose ``nosync`` is non-empty, at any depth.

    PHP unsets the record and leaves a hole in the list's keys, which its encoder then sends as a
    struct with keys "0", "2", ...; we keep the list a list (the backup's merge accepts both).
    `clean` tells dicts known to hold no nosync struct at any depth (the decoder's
    `tree.Grafts.holds`): they are not walked.
    """
    if isinstance(value, dict):
        if clean is not None and clean(value):
            return
        for key in list(value):
            item = value[key]
            if isinstance(item, dict) and not php_empty(item.get("nosync")):
                del value[key]
            else:
                remove_nosync(item, clean)
    elif isinstance(value, list):
        kept = [item for item in value if not (isinstance(item, dict) and not php_empty(item.get("nosync")))]
        value[:] = kept
        for item in kept:
            remove_nosync(item, clean)


def vip_section(config: dict[str, Any]) -> Any:
    """get_vip_config_section(): VIPs with a vhid, advskew raised so the backup stays backup.

    Only a VIP that *has* an advskew gets the raised one (PHP: ``isset($section['advskew']) &&
    $section['advskew'] !== ''``). An IP alias stacked on a CARP vhid has no skew of its own, an
    empty ``<advskew/>`` or none at all, and travels that way: the skew that counts is that of the
    CARP VIP owning the vhid. The new advskew is an integer, as PHP's ``min(intval(...) + 100,
    254)`` gives, so it travels as ``<int>``; the backup stores it as text either way.
    """
    section = config.get(VIRTUALIP)
    vips = section.get("vip") if isinstance(section, dict) else None
    if vips is None:
        return []
    if isinstance(vips, dict):
        vips = [vips]
    if not isinstance(vips, list):
        return {"vip": []}
    sent = []
    for vip in vips:
        if not isinstance(vip, dict) or php_empty(vip.get("vhid")):
            continue
        vip = copy.deepcopy(vip)
        if vip.get("advskew", "") != "":
            vip["advskew"] = min(php_intval(vip["advskew"]) + BACKUP_SKEW_OFFSET, MAX_ADVSKEW)
        sent.append(vip)
    return {"vip": sent}


def own_address_facing(config: dict[str, Any], peer: str, prefer: str = "") -> str:
    """Our static IPv4 address facing a DHCP failover `peer` (`pernode.address_facing`)."""
    return pernode.address_facing(config, peer, prefer=prefer, what="dhcpd failover_peerip")


# --- display aid --------------------------------------------------------------------------

REDACTED = "**redacted by opnsense-ha**"
def redact(value: Any) -> Any:
    """A copy with secret-looking values replaced, for showing a payload to a person.

    A redacted payload must never be merged (it would store the marker as a password);
    `node.apply.load_payload_bytes` refuses any payload that contains the marker.
    """
    if isinstance(value, dict):
        return {
            key: (REDACTED if is_secret_name(key) and not php_empty(item) else redact(item))
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [redact(item) for item in value]
    return value
