"""Sync items: which config sections a "synchronize X" checkbox covers, and the `hasync` settings.

OPNsense collects sync items from `plugins_xmlrpc_sync()` (reference §3): each has an id, a
description, comma-separated dotted config paths, optional help and optional services to restart
after a sync. We keep the 33 core items in code (they ship with OPNsense's core package) and read
plugin items from drop-in JSON files, so installing a plugin's HA support never means editing
Python. Every drop-in file is validated against ``schemas/syncitem.schema.json`` and a bad file is
refused with its name and the failing field: a typo in a plugin file must not silently stop a
section from being synchronised (or make us synchronise `hasync` itself). Files byte-identical to
ones the test suite validated (their SHA-256 in ``items.d/SHA256SUMS``) skip the validator:
importing jsonschema costs more than a whole no-op sync, and every sync loads these files.

The `hasync` section is read in both of its forms: the current model (``syncitems`` comma list,
OPNsense >= 24.7) and the legacy one (``<synchronize<id>>on</...>`` per item plus
``pfsyncenabled``) that older configs and the official CARP example still carry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

from lxml import etree

from hasync.config.pernode import Declarations, declarations_from
from hasync.config.pernode import core as _declare
from hasync.core.errors import SyncItemError

DEFAULT_ITEMS_DIR = Path(__file__).resolve().parent / "items.d"
SCHEMA_PATH = Path(__file__).resolve().parents[1] / "core" / "schemas" / "syncitem.schema.json"
VALIDATED_SUMS = DEFAULT_ITEMS_DIR / "SHA256SUMS"  # shipped files the tests validated against the schema

# Top-level sections that are node-specific and never travel (reference §3), and `system`, which
# may only travel through listed sub-paths such as `system.user`.
NEVER_SYNCED_ROOTS: frozenset[str] = frozenset({"hasync", "interfaces", "revision"})
NEVER_SYNCED_WHOLE: frozenset[str] = frozenset({"system"})

# Upper bound for one drop-in file: item definitions are tiny, anything larger is a mistake.
MAX_ITEM_FILE_BYTES = 256 * 1024


class SyncItem(NamedTuple):
    """One synchronisable area, as `plugins_xmlrpc_sync()` describes it (a NamedTuple: see `hasync`)."""

    id: str
    description: str
    sections: list[str]
    services: Sequence[str] = ()
    help: str = ""
    source: str = "core"  # "core" or the drop-in file that defined it (for error messages)
    declarations: Declarations = Declarations()  # per-node values (pernode.py)

    def to_dict(self) -> dict[str, Any]:
        """The metadata as `items --verbose` prints it (PHP's `section` is a comma list)."""
        data = self._asdict()
        data["sections"], data["services"] = list(self.sections), list(self.services)
        data["section"] = ",".join(self.sections)
        data["declarations"] = self.declarations.as_json()
        return data


def _core(
    item_id: str, description: str, sections: str, services: Sequence[str] = (), help_text: str = "",
    declarations: Declarations | None = None,
) -> SyncItem:
    return SyncItem(item_id, description, sections.split(","), list(services), help_text,
                    declarations=declarations or Declarations())


# The core items of reference §3, in the order OPNsense's settings page lists them. Descriptions
# follow OPNsense's wording where known; services are the service names `pluginctl -s` uses for
# the daemons that read the sections (empty when filter_configure alone applies the change).
CORE_ITEMS: tuple[SyncItem, ...] = (
    _core("users", "Users and Groups", "system.user,system.group", ["login"],
          "Synchronize users, groups and their API keys and privileges."),
    _core("authservers", "Auth Servers", "system.authserver", [],
          "Synchronize LDAP and RADIUS authentication servers."),
    _core("certs", "Certificates", "cert,ca,crl", [],
          "Synchronize certificates, certificate authorities and revocation lists."),
    _core("virtualip", "Virtual IPs", "virtualip", [],
          "Synchronize CARP virtual IPs and IP aliases with a VHID; the backup advertises "
          "with advskew + 100 and a unicast peer becomes this node's address facing it.",
          _declare(self_address=["virtualip.vip[peer].peer", "virtualip.vip[peer6].peer6"])),
    _core("staticroutes", "Static Routes", "staticroutes,gateways,OPNsense.Gateways", [],
          "Synchronize static routes and gateways."),
    _core("syslog-ng", "Syslog", "syslog,OPNsense.Syslog", ["syslog-ng"],
          "Synchronize local and remote logging settings."),
    _core("cron", "Cron", "OPNsense.cron", ["cron"], "Synchronize cron jobs."),
    _core("sysctl", "System Tunables", "sysctl", [], "Synchronize system tunables (sysctl)."),
    _core("webgui", "Web GUI", "system.webgui", ["webgui"],
          "Synchronize the web GUI settings (protocol, port, certificate)."),
    _core("dhcrelay", "DHCRelay", "dhcrelay,dhcrelay6,OPNsense.DHCRelay", ["dhcrelay"],
          "Synchronize the DHCP relay settings."),
    _core("dnsforwarder", "Dnsmasq DNS & DHCP", "dnsmasq", ["dnsmasq"],
          "Synchronize the Dnsmasq DNS forwarder and DHCP settings."),
    _core("hostwatch", "Automatic discovery", "OPNsense.Hostwatch", ["hostwatch"],
          "Synchronize host discovery settings."),
    _core("shaper", "Traffic Shaper", "OPNsense.TrafficShaper", ["ipfw"],
          "Synchronize traffic shaper pipes, queues and rules."),
    _core("captiveportal", "Captive Portal", "OPNsense.captiveportal", ["captiveportal"],
          "Synchronize captive portal zones and templates."),
    _core("ipsec", "IPsec", "ipsec,OPNsense.IPsec,OPNsense.Swanctl", ["strongswan"],
          "Synchronize IPsec tunnels, keys and connections."),
    _core("kea", "Kea DHCP", "OPNsense.Kea", ["kea"],
          "Synchronize the Kea DHCP server settings; each node keeps its own HA this_server_name.",
          _declare(local=["OPNsense.Kea.dhcp4.ha.this_server_name", "OPNsense.Kea.dhcp6.ha.this_server_name"])),
    _core("monit", "Monit System Monitoring", "OPNsense.monit", ["monit"],
          "Synchronize Monit service tests and alerts."),
    _core("syslog", "Netflow / Insight", "OPNsense.Netflow", ["flowd"],
          "Synchronize Netflow settings (the id is historic)."),
    _core("ntpd", "Network Time", "ntpd,system.timeservers", ["ntpd"],
          "Synchronize the NTP server and the time servers."),
    _core("opendns", "OpenDNS", "opendns", [], "Synchronize the OpenDNS settings."),
    _core("ssh", "Secure Shell", "system.ssh", ["openssh"], "Synchronize the SSH server settings."),
    _core("openvpn", "OpenVPN", "openvpn,OPNsense.OpenVPN", ["openvpn"],
          "Synchronize OpenVPN servers, clients and client specific overrides."),
    _core("ifgroups", "Interface Groups", "ifgroups.ifgroupentry", [],
          "Synchronize interface groups (the member interfaces must exist on the backup)."),
    _core("rules", "Firewall Rules", "filter,OPNsense.Firewall.Filter.rules", [],
          "Synchronize firewall rules; rules marked 'no XMLRPC sync' stay local."),
    _core("schedules", "Firewall Schedules", "schedules", [], "Synchronize firewall schedules."),
    _core("categories", "Firewall Categories", "OPNsense.Firewall.Category", [],
          "Synchronize firewall categories."),
    _core("lvtemplate", "Firewall Log Templates", "OPNsense.Firewall.Lvtemplate", [],
          "Synchronize live view log templates."),
    _core("aliases", "Aliases", "aliases,OPNsense.Firewall.Alias", [],
          "Synchronize firewall aliases."),
    _core("nat", "Firewall NAT",
          "nat,OPNsense.Firewall.Filter.snatrules,OPNsense.Firewall.Filter.npt,"
          "OPNsense.Firewall.Filter.onetoone", [],
          "Synchronize port forwards, outbound NAT, NPTv6 and one-to-one NAT."),
    _core("radvd", "Router Advertisements", "OPNsense.radvd", ["radvd"],
          "Synchronize router advertisement settings."),
    _core("suricata", "Intrusion Detection", "OPNsense.IDS", ["suricata"],
          "Synchronize intrusion detection settings and policies."),
    _core("dnsresolver", "Unbound DNS", "unbound,OPNsense.unboundplus", ["unbound"],
          "Synchronize the Unbound DNS resolver settings."),
    _core("wireguard", "WireGuard", "OPNsense.wireguard", ["wireguard"],
          "Synchronize WireGuard instances and peers."),
)


def section_refusal(section: str) -> str | None:
    """Why `section` may never be synchronised, or None when it may."""
    root = section.split(".", 1)[0]
    if root in NEVER_SYNCED_ROOTS:
        return f"'{section}' is node-specific ({root} is never synchronised)"
    if section in NEVER_SYNCED_WHOLE:
        return f"'{section}' may only be synchronised through sub-paths such as system.user"
    return None


def paths_overlap(a: str, b: str) -> bool:
    """True when one dotted path equals or contains the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


# --- drop-in files ---------------------------------------------------------------------------


def _load_schema() -> dict[str, Any]:
    try:
        schema: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # a broken installation, not a user error
        raise SyncItemError(f"{SCHEMA_PATH}: cannot read the sync item schema: {exc}") from None
    return schema


def _field_name(path: Iterable[Any]) -> str:
    parts: list[str] = []
    for part in path:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        else:
            parts.append(("." if parts else "") + str(part))
    return "".join(parts) or "(top level)"


@cache
def validated_digests() -> frozenset[str]:
    """SHA-256 of the shipped drop-in files, each proven valid by the test suite (none if absent)."""
    try:
        text = VALIDATED_SUMS.read_text(encoding="ascii")
    except (OSError, ValueError):
        return frozenset()
    return frozenset(line.split()[0] for line in text.splitlines() if line.strip())


def _check_schema(path: Path, data: Any, schema: dict[str, Any]) -> None:
    """Refuse `data` naming the file and the first failing field."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(data), key=lambda e: (len(e.absolute_path), list(e.absolute_path)))
    if errors:
        best = jsonschema.exceptions.best_match(errors) or errors[0]
        raise SyncItemError(f"{path}: field {_field_name(best.absolute_path)}: {best.message}")


class ItemExtension(NamedTuple):
    """A drop-in record ``{"extends": id, "local": [...], ...}``: declarations for an existing item.

    This is how an admin declares per-node values without writing Python (e.g. one cron job each
    node keeps for itself); it is checked against the extended item's sections once all items
    are loaded.
    """

    extends: str
    record: dict[str, Any]
    where: str  # "file: " or "file: [i]." prefix for error messages


def load_item_file(path: Path, schema: dict[str, Any] | None = None) -> list[SyncItem]:
    """Read one drop-in file (one item object or an array of them), validated against the schema."""
    return [entry for entry in load_entries(path, schema) if isinstance(entry, SyncItem)]


def load_entries(path: Path, schema: dict[str, Any] | None = None) -> list[SyncItem | ItemExtension]:
    """Every record of one drop-in file: new items and extensions of existing ones."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SyncItemError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_ITEM_FILE_BYTES:
        raise SyncItemError(f"{path}: {len(raw)} bytes is too large for a sync item file")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SyncItemError(f"{path}: not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise SyncItemError(f"{path}: line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if hashlib.sha256(raw).hexdigest() not in validated_digests():
        _check_schema(path, data, schema or _load_schema())
    records = data if isinstance(data, list) else [data]
    items: list[SyncItem | ItemExtension] = []
    for index, record in enumerate(records):
        prefix = f"[{index}]." if isinstance(data, list) else ""
        if "extends" in record:
            items.append(ItemExtension(record["extends"], record, f"{path}: {prefix}"))
            continue
        sections = [s.strip() for s in record["sections"]]
        for pos, section in enumerate(sections):
            reason = section_refusal(section)
            if reason:
                raise SyncItemError(f"{path}: field {prefix}sections[{pos}]: {reason}")
        items.append(
            SyncItem(
                id=record["id"],
                description=record["description"],
                sections=sections,
                services=list(record.get("services", [])),
                help=record.get("help", ""),
                source=str(path),
                declarations=declarations_from(record, sections, f"{path}: {prefix}"),
            )
        )
    return items


# --- the registry ----------------------------------------------------------------------------


class SyncItemRegistry:
    """All known sync items, in a stable order: core first, then drop-ins by file name."""

    def __init__(self, items: Iterable[SyncItem]) -> None:
        self._items: dict[str, SyncItem] = {}
        self._declarations: Declarations | None = None
        for item in items:
            self.add(item)

    def add(self, item: SyncItem) -> None:
        if item.id in self._items:
            other = self._items[item.id]
            raise SyncItemError(
                f"{item.source}: field id: sync item '{item.id}' is already defined by {other.source}"
            )
        self._items[item.id] = item
        self._declarations = None

    @classmethod
    def load(cls, items_dir: str | Path | None = None, *, include_core: bool = True) -> SyncItemRegistry:
        """Core items plus every ``*.json`` in `items_dir` (default: ``items.d`` next to the package).

        A missing default directory is fine (no plugins); a missing directory the user named is an
        error, because a mistyped ``--items-dir`` would otherwise silently drop plugin items.
        """
        registry = cls(CORE_ITEMS if include_core else ())
        directory = Path(items_dir) if items_dir is not None else DEFAULT_ITEMS_DIR
        if not directory.is_dir():
            if items_dir is not None:
                raise SyncItemError(f"{directory}: items directory does not exist")
            return registry
        extensions: list[ItemExtension] = []
        for path in sorted(directory.glob("*.json")):
            for entry in load_entries(path):
                if isinstance(entry, ItemExtension):
                    extensions.append(entry)
                else:
                    registry.add(entry)
        for extension in extensions:  # after every item is known, whichever file defines it
            registry.extend(extension)
        return registry

    def extend(self, extension: ItemExtension) -> None:
        """Add an `ItemExtension`'s declarations to the item it names."""
        item = self._items.get(extension.extends)
        if item is None:
            raise SyncItemError(
                f"{extension.where.replace(': ', ': field ', 1)}extends: no sync item '{extension.extends}' "
                f"(known: {', '.join(sorted(self._items))})"
            )
        added = declarations_from(extension.record, item.sections, extension.where)
        self._items[item.id] = item._replace(declarations=item.declarations.merged(added))
        self._declarations = None

    def declarations(self) -> Declarations:
        """Every item's per-node declarations together (paths never overlap between items' sections)."""
        if self._declarations is None:
            combined = Declarations()
            for item in self._items.values():
                combined = combined.merged(item.declarations)
            self._declarations = combined
        return self._declarations

    # --- lookup ------------------------------------------------------------------------------

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def __iter__(self) -> Iterator[SyncItem]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def ids(self) -> list[str]:
        return list(self._items)

    def get(self, item_id: str) -> SyncItem:
        try:
            return self._items[item_id]
        except KeyError:
            raise SyncItemError(
                f"unknown sync item '{item_id}' (known: {', '.join(sorted(self._items))})"
            ) from None

    def resolve(self, item_ids: Iterable[str]) -> list[SyncItem]:
        """The items for `item_ids` in the order given (duplicates once); unknown ids are an error."""
        seen: dict[str, SyncItem] = {}
        unknown = []
        for item_id in item_ids:
            if item_id in seen:
                continue
            if item_id not in self._items:
                unknown.append(item_id)
                continue
            seen[item_id] = self._items[item_id]
        if unknown:
            raise SyncItemError(
                f"unknown sync item(s) {', '.join(unknown)} (known: {', '.join(sorted(self._items))}; "
                "plugin items come from --items-dir)"
            )
        return list(seen.values())

    def split_known(self, item_ids: Iterable[str]) -> tuple[list[str], list[str]]:
        """(known ids, unknown ids), each in the given order.

        rc.filter_synchronize only looks up the items it knows, so a stored id whose plugin is
        not installed (or a retired legacy flag such as ``synchronizewidgets``) is ignored there;
        callers working from `hasync` use this to do the same and say so.
        """
        known: list[str] = []
        unknown: list[str] = []
        for item_id in item_ids:
            (known if item_id in self._items else unknown).append(item_id)
        return known, unknown

    def sections_for(self, item_ids: Iterable[str]) -> list[str]:
        """Dotted section paths of the given items, in item order, each once."""
        sections: dict[str, None] = {}
        for item in self.resolve(item_ids):
            for section in item.sections:
                sections.setdefault(section, None)
        return list(sections)

    def covering_sections(self) -> list[str]:
        """Every section path some registered item covers (what a backup accepts)."""
        sections: dict[str, None] = {}
        for item in self._items.values():
            for section in item.sections:
                sections.setdefault(section, None)
        return list(sections)

    def items_covering(self, path: str) -> list[SyncItem]:
        """Items whose sections contain `path` (a section equal to it or above it)."""
        return [
            item
            for item in self._items.values()
            if any(path == s or path.startswith(s + ".") for s in item.sections)
        ]

    def is_covered(self, path: str) -> bool:
        return bool(self.items_covering(path))

    def services_for_sections(self, paths: Iterable[str]) -> list[str]:
        """Services of the items whose sections overlap any of `paths`, each once, in item order."""
        wanted = list(paths)
        services: dict[str, None] = {}
        for item in self._items.values():
            if any(paths_overlap(section, path) for section in item.sections for path in wanted):
                for service in item.services:
                    services.setdefault(service, None)
        return list(services)

    def options(self) -> dict[str, str]:
        """``{id: description}`` as `pluginctl -x` prints it."""
        return {item.id: item.description for item in self._items.values()}


# --- the hasync section ----------------------------------------------------------------------

#: Our own section of config.xml (never synced: no sync item covers it; it describes one node):
#: the backup agent's settings (`commands/agent.py`) and the primary's default confirm window
#: (`confirm.py`). Outside `hasync`, whose MVC model would drop fields it does not know.
PLUGIN_SECTION = "OPNsense/opnsense_ha"

LEGACY_PREFIX = "synchronize"
_LEGACY_NOT_ITEMS = frozenset({"synchronizetoip"})


class HasyncSettings:
    """The `hasync` section (reference §4), whichever form it is stored in.

    `password` is the backup's login, stored in plain text by OPNsense: it is excluded from
    repr() so it cannot reach a log line or a traceback by accident. A plain class (see
    `hasync`), not a NamedTuple: a tuple would hand the password to anything that iterates it,
    `json.dumps` included.
    """

    __slots__ = ("disablepreempt", "disconnectppps", "pfsyncinterface", "pfsyncpeerip", "pfsyncversion",  # noqa: RUF023
                 "pfsyncdefer", "synchronizetoip", "verifypeer", "username", "password", "syncitems", "form",
                 "pfsyncenabled")  # in the section's order: `public_dict` keeps it

    def __init__(self, *, disablepreempt: bool = False, disconnectppps: bool = False, pfsyncinterface: str = "",
                 pfsyncpeerip: str = "", pfsyncversion: str = "1400", pfsyncdefer: bool = False,
                 synchronizetoip: str = "", verifypeer: bool = False, username: str = "", password: str = "",
                 syncitems: Sequence[str] = (), form: str = "absent", pfsyncenabled: bool | None = None) -> None:
        self.disablepreempt = disablepreempt
        self.disconnectppps = disconnectppps
        self.pfsyncinterface = pfsyncinterface
        self.pfsyncpeerip = pfsyncpeerip
        self.pfsyncversion = pfsyncversion
        self.pfsyncdefer = pfsyncdefer
        self.synchronizetoip = synchronizetoip
        self.verifypeer = verifypeer
        self.username = username
        self.password = password
        self.syncitems = list(syncitems)
        self.form = form  # "current", "legacy" or "absent"
        self.pfsyncenabled = pfsyncenabled  # legacy flag; None in the current form

    def _by_name(self) -> dict[str, Any]:
        """Every field by name, in the section's order."""
        return {name: getattr(self, name) for name in self.__slots__}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HasyncSettings) and self._by_name() == other._by_name()

    __hash__ = None  # type: ignore[assignment]  # mutable fields: as a dataclass with eq

    @property
    def pfsync_interface_effective(self) -> str:
        """The pfsync interface in effect: the legacy form also needs ``pfsyncenabled``."""
        if self.pfsyncenabled is False:
            return ""
        return self.pfsyncinterface

    @property
    def effective_username(self) -> str:
        """OPNsense logs in as root when no user name is set."""
        return self.username or "root"

    @property
    def is_primary(self) -> bool:
        """A node with a sync target pushes; the backup must leave `synchronizetoip` empty."""
        return bool(self.synchronizetoip)

    def public_dict(self) -> dict[str, Any]:
        """Every field, with the password reduced to whether one is set (safe for JSON output)."""
        data = self._by_name()
        data["password"] = "********" if self.password else ""
        return data

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self._by_name().items() if name != "password")
        return f"HasyncSettings({shown})"


def _flag(text: str) -> bool:
    return text.strip() in ("1", "on", "yes", "true")


def read_hasync(root: etree._Element) -> HasyncSettings:
    """Read `hasync` from a config.xml root in the current or the legacy form."""
    node = root.find("hasync")
    if node is None:
        return HasyncSettings()
    values: dict[str, str] = {}
    legacy_items: list[str] = []
    for child in node:
        if not isinstance(child.tag, str):
            continue
        text = (child.text or "").strip()
        tag = child.tag
        if tag.startswith(LEGACY_PREFIX) and tag not in _LEGACY_NOT_ITEMS and len(tag) > len(LEGACY_PREFIX):
            # rc.filter_synchronize tested isset(): presence selects the item, whatever the text.
            legacy_items.append(tag[len(LEGACY_PREFIX):])
            continue
        values.setdefault(tag, text)
    has_current = node.find("syncitems") is not None
    is_legacy = not has_current and (bool(legacy_items) or "pfsyncenabled" in values)
    if has_current:
        syncitems = [part.strip() for part in values.get("syncitems", "").split(",") if part.strip()]
    else:
        syncitems = legacy_items
    return HasyncSettings(
        disablepreempt=_flag(values.get("disablepreempt", "")),
        disconnectppps=_flag(values.get("disconnectppps", "")),
        pfsyncinterface=values.get("pfsyncinterface", ""),
        pfsyncpeerip=values.get("pfsyncpeerip", ""),
        pfsyncversion=values.get("pfsyncversion", "") or "1400",
        pfsyncdefer=_flag(values.get("pfsyncdefer", "")),
        synchronizetoip=values.get("synchronizetoip", ""),
        verifypeer=_flag(values.get("verifypeer", "")),
        username=values.get("username", ""),
        password=values.get("password", ""),
        syncitems=syncitems,
        form="legacy" if is_legacy else "current",
        pfsyncenabled=(values.get("pfsyncenabled", "") == "on") if is_legacy else None,
    )
