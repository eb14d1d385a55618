"""Agent extension methods (`hasync.*`): what OPNsense's XML-RPC cannot tell a primary.

Our agent answers every `opnsense.*` method exactly like OPNsense, so any primary can sync to it.
The `hasync.` namespace adds what OPNsense's XML-RPC cannot tell a primary, and never collides
with OPNsense's own names:

=========================  ====================  =============================================
method                     argument              reply
=========================  ====================  =============================================
hasync.capabilities        none                  ``{agent, version, canonical, algorithm,
                                                 methods, features, node: {hostname,
                                                 synchronizetoip_set, role}}``
hasync.digest              array of item ids     ``{algorithm, canonical, items: {id: hex},
                           (empty: every item)   unknown: [ids]}`` (see `digest`)
hasync.export_sections     array of item ids     ``{canonical, items: {id: {sections, value}},
                                                 unknown}``; value = raw payload form,
                                                 nosync records included
hasync.carp_status         none                  `carp_facts` (VIP states, demotion, preempt,
                                                 maintenance, state sync)
hasync.history             none                  `rollback.history_document`
hasync.rollback            ``{force: bool}``     `rollback.RollbackResult.as_json`
hasync.confirm             ``{id}``              the commit-confirmed outcome (`confirm`)
hasync.confirm_state       none                  `confirm.public_state`: armed rollback, past
=========================  ====================  =============================================

A client learns what a peer supports from `system.listMethods` (`wire.discovery.discover`): a stock OPNsense
backup lists no `hasync.*` method, and every feature that needs one falls back (see `snapshot`).
`ServeOptions.extensions = False` (`serve --no-extensions`) switches them all off so tests can
stand in for a stock backup.

`hasync.export_sections` hands out config sections, secrets included, to the authenticated sync
account. That account can already overwrite the same sections (and the users in them), so this
grants nothing new; the CLI never prints secret values (see `core.secrets`).

The extension also wraps `opnsense.restore_config_section`: before the merge it keeps a copy of a
config.xml that is not in the config history (`rollback.preserve_current`, into
`<conf-dir>/ha-state/preserved/`), so the first sync into a node can be rolled back. The merge
itself, and OPNsense's history directory, are untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hasync import __version__
from hasync.agent.confirm import ArmedRollback
from hasync.agent.server import CallContext, Dispatcher
from hasync.config.items import read_hasync
from hasync.core import paths
from hasync.core.errors import HaError, MethodFault
from hasync.failover import model
from hasync.failover.base import PfsyncState
from hasync.failover.carp import CarpOps, pfsync_differences
from hasync.node import confirm_state as confirmmod
from hasync.node import rollback as rollbackmod
from hasync.payload import digest as digestmod
from hasync.wire import xmlrpc

if TYPE_CHECKING:
    from lxml import etree

    from hasync.agent.opnsense_methods import BackupNode

log = logging.getLogger("hasync.extensions")

METHODS: tuple[str, ...] = (
    "hasync.capabilities",
    "hasync.digest",
    "hasync.export_sections",
    "hasync.carp_status",
    "hasync.history",
    "hasync.rollback",
    *confirmmod.METHODS,
)
MAX_ITEMS_PER_CALL = 1000


# --- CARP facts (the same function for the local node and for hasync.carp_status) --------------


def _tri(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def carp_facts(ops: CarpOps) -> dict[str, Any]:
    """This node's CARP and state-sync facts in an XML-RPC-safe shape (no None anywhere).

    The pair checks compare two of these, one made locally and one fetched with
    `hasync.carp_status`, so both nodes must describe themselves with this same function.
    """
    try:
        status = ops.status()
        root = ops.store.load()
    except HaError as exc:
        return {"available": False, "reason": str(exc), "node": "", "time": round(time.time(), 3)}
    facts = status["hasync"]
    vhids: dict[tuple[str, int], dict[str, Any]] = {}
    for vip in facts["vips"]:
        key = (str(vip["interface"]), int(vip["vhid"]))
        entry = vhids.setdefault(key, {
            "vhid": int(vip["vhid"]), "interface": str(vip["interface"]), "device": str(vip["device"]),
            "status": str(vip["status"]), "advbase": int(vip["advbase"]), "advskew": int(vip["advskew"]),
            "addresses": [],
        })
        if vip["subnet"]:
            entry["addresses"].append(str(vip["subnet"]))
    configured = [
        {"vhid": int((vip.findtext("vhid") or "").strip()), "interface": (vip.findtext("interface") or "").strip()}
        for vip in root.iterfind("virtualip/vip")
        if (vip.findtext("mode") or "").strip() == "carp" and (vip.findtext("vhid") or "").strip().isdigit()
    ]
    desired = model.pfsync_config(root)
    pfsync = facts["pfsync"]
    differences = pfsync_differences(desired, PfsyncState(**pfsync))
    carp = status["carp"]
    return {
        "available": True,
        "node": (root.findtext("system/hostname") or "").strip(),
        "backend": str(facts["backend"]),
        "allow": carp["allow"] == "1",
        "demotion": int(carp["demotion"]),
        "preempt": bool(facts["preempt"]),
        "preempt_configured": bool(facts["preempt_configured"]),
        "maintenance_mode": bool(carp["maintenancemode"]),
        "maintenance_demotion": int(facts["maintenance_demotion"]),
        "external_demotion": int(facts["external_demotion"]),
        "external_demotion_causes": [str(c) for c in facts["external_demotion_causes"]],
        "vhids": list(vhids.values()),
        "configured_vhids": configured,
        "state_sync": {
            "configured": desired.syncdev is not None,
            "syncdev": desired.syncdev or "",
            "syncpeer": desired.syncpeer or "",
            "enabled": bool(pfsync["enabled"]),
            "running": bool(pfsync["running"]),
            "syncok": _tri(pfsync["syncok"]),
            "detail": str(pfsync.get("detail") or ""),
            "differences": differences,
        },
        "time": round(time.time(), 3),
    }


def node_info(root: Any) -> dict[str, Any]:
    settings = read_hasync(root)
    return {
        "hostname": (root.findtext("system/hostname") or "").strip(),
        "synchronizetoip_set": bool(settings.synchronizetoip.strip()),
        "role": "primary" if settings.is_primary else "backup",
    }


# --- server side --------------------------------------------------------------------------------


def item_ids_argument(argument: Any, method: str) -> list[str]:
    """IXR hands a lone param over as is: an array of ids, one id, or nothing (= every item)."""
    if argument in ([], "", None):
        return []
    if isinstance(argument, str):
        return [argument]
    if isinstance(argument, list) and all(isinstance(item, str) for item in argument):
        if len(argument) > MAX_ITEMS_PER_CALL:
            raise MethodFault(xmlrpc.INVALID_PARAMS, f"{method}: at most {MAX_ITEMS_PER_CALL} item ids per call")
        return list(dict.fromkeys(argument))
    raise MethodFault(xmlrpc.INVALID_PARAMS, f"{method} expects an array of sync item ids")


class Extensions:
    """The `hasync.*` methods of one backup node."""

    def __init__(self, node: BackupNode, *, state_dir: Path | None = None,
                 read_config: Callable[[], etree._Element] | None = None) -> None:
        """`read_config`: the config tree for reading only (the agent passes its cache's, so the
        probe's capabilities do not parse config.xml a second time); default: a fresh load."""
        self.node = node
        self.state_dir = state_dir or paths.state_dir(node.conf_dir)
        self.read_config = read_config or node.store.load
        self.features: set[str] = {"digest", "export_sections", "carp_status", "history", "rollback",
                                   "preserve_before_merge", confirmmod.FEATURE}
        self.armed = ArmedRollback(node, self.state_dir)
        node.merge_hook = self.armed

    def methods(self) -> dict[str, Callable[[Any, CallContext], Any]]:
        return {
            "hasync.capabilities": self.capabilities,
            "hasync.digest": self.digest,
            "hasync.export_sections": self.export_sections,
            "hasync.carp_status": self.carp_status,
            "hasync.history": self.history,
            "hasync.rollback": self.rollback,
        }

    def register(self, dispatcher: Dispatcher) -> Dispatcher:
        for name, handler in self.methods().items():
            dispatcher.register(name, handler)
        self.armed.register(dispatcher)
        merge = dispatcher.methods.get("opnsense.restore_config_section")
        if merge is not None:
            dispatcher.register("opnsense.restore_config_section", self._preserving(merge))
        return dispatcher

    def _preserving(self, merge: Callable[[Any, CallContext], Any]) -> Callable[[Any, CallContext], Any]:
        def handler(argument: Any, context: CallContext) -> Any:
            if isinstance(argument, dict) and argument:  # the merge refuses anything else itself
                try:
                    rollbackmod.preserve_current(self.node.store, self.state_dir)
                except (HaError, OSError) as exc:  # never block a sync over the undo copy
                    log.warning("could not preserve config.xml in history before the merge: %s", exc)
            return merge(argument, context)

        return handler

    # --- methods ---

    def capabilities(self, _argument: Any, _context: CallContext) -> dict[str, Any]:
        return {
            "agent": "opnsense-ha",
            "version": __version__,
            "canonical": digestmod.CANONICAL_FORM,
            "algorithm": digestmod.ALGORITHM,
            "methods": list(METHODS),
            "features": sorted(self.features),
            "node": node_info(self.read_config()),
        }

    def digest(self, argument: Any, _context: CallContext) -> dict[str, Any]:
        ids = item_ids_argument(argument, "hasync.digest") or self.node.registry.ids()
        digests, unknown = digestmod.backup_item_digests(self.node.store.load(), self.node.registry, ids)
        return digestmod.digest_reply(digests, unknown)

    def export_sections(self, argument: Any, _context: CallContext) -> dict[str, Any]:
        ids = item_ids_argument(argument, "hasync.export_sections") or self.node.registry.ids()
        values, unknown = digestmod.backup_item_values(self.node.store.load(), self.node.registry, ids)
        return {
            "canonical": digestmod.CANONICAL_FORM,
            "items": {item_id: {"sections": self.node.registry.get(item_id).sections, "value": value}
                      for item_id, value in values.items()},
            "unknown": unknown,
        }

    def carp_status(self, _argument: Any, _context: CallContext) -> dict[str, Any]:
        if self.node.failover is None:
            return {"available": False, "reason": "the agent runs without a failover backend",
                    "node": node_info(self.node.store.load())["hostname"], "time": round(time.time(), 3)}
        return carp_facts(CarpOps(self.node.store, self.node.failover))

    def history(self, _argument: Any, _context: CallContext) -> dict[str, Any]:
        return confirmmod.with_state(rollbackmod.history_document(self.node.store, self.state_dir), self.state_dir)

    def rollback(self, argument: Any, context: CallContext) -> dict[str, Any]:
        options = argument if isinstance(argument, dict) else {}
        force = options.get("force") in (True, 1, "1", "true", "yes")
        with self.node.merge_lock:  # never interleave with a merge
            try:
                result = rollbackmod.rollback(
                    self.node.store, self.node.registry, state_dir=self.state_dir,
                    services=self.node.services, failover=self.node.failover, force=force,
                    username=f"{context.username}@{context.remote_addr}",
                )
            except rollbackmod.RollbackError as exc:
                node = node_info(self.node.store.load())["hostname"]
                return {"status": "error", "message": str(exc), "node": node, "warnings": []}
        return result.as_json()


# --- client side --------------------------------------------------------------------------------








