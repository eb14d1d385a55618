"""The backup side's `opnsense.*` methods, wired onto the agent's dispatcher.

Argument and return shapes are those of OPNsense's `xmlrpc/*.inc` handlers (reference §2), so
a stock primary can drive us. `restore_config_section` merges under one exclusive lock via the
config store and then reconfigures selectively from the merge report: CARP VIPs that changed go
to the failover backend, the services of the sync items whose sections changed go to the
service backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lxml import etree

from hasync.agent import lockout
from hasync.agent.server import CallContext, Dispatcher
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core import versions
from hasync.core.errors import HaError, MethodFault, ServiceError
from hasync.failover import model
from hasync.failover.base import FailoverBackend
from hasync.node.reconfigure import reconfigure_vips, restart_item_services
from hasync.payload.merge import MergeReport, merge_payload, revision_description
from hasync.services.backends import ServiceBackend
from hasync.wire import xmlrpc

log = logging.getLogger("hasync.backup")


class MergeHook(Protocol):
    # `read_before` reads config.xml's bytes as they are before the write (a 20 MB read, only
    # when needed: a commit-confirmed sync keeps them to roll back to)
    def before_write(self, context: CallContext, read_before: Callable[[], bytes]) -> None: ...


class BackupNode:
    """Everything the agent needs to act as a backup: config, items, services, failover."""

    def __init__(
        self,
        store: ConfigStore,
        registry: SyncItemRegistry,
        services: ServiceBackend,
        failover: FailoverBackend | None = None,
        *,
        accept_unknown_sections: bool = False,
        version_provider: Callable[[], dict[str, dict[str, str]]] | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.services = services
        self.failover = failover
        self.accept_unknown_sections = accept_unknown_sections
        self._versions = version_provider or (lambda: versions.local_versions(store.conf_dir))
        self.merge_lock = threading.Lock()  # one merge at a time, on top of the file lock
        self.last_report: MergeReport | None = None
        # commit-confirmed sync (confirm.ArmedRollback, set by the extensions): arms a rollback
        # just before a merge is written; None on a stock-like agent
        self.merge_hook: MergeHook | None = None
        # told the merged tree and its report under the store's lock, right before the write (the
        # agent's `ConfigCache.note_merged`: it keeps the digests of what the merge left as it was)
        self.on_merged: Callable[[etree._Element, MergeReport], None] | None = None

    @property
    def conf_dir(self) -> Path:
        return self.store.conf_dir

    def register(self, dispatcher: Dispatcher) -> Dispatcher:
        for name, handler in {
            "opnsense.firmware_version": self.firmware_version,
            "opnsense.restore_config_section": self.restore_config_section,
            "opnsense.filter_configure": self.filter_configure,
            "opnsense.configd_reload_all_templates": self.reload_templates,
            "opnsense.list_services": self.list_services,
            "opnsense.start_service": self._service_action("start"),
            "opnsense.stop_service": self._service_action("stop"),
            "opnsense.restart_service": self._service_action("restart"),
            "opnsense.test": self.test,
        }.items():
            dispatcher.register(name, handler)
        return dispatcher

    # --- methods ------------------------------------------------------------------------------

    def firmware_version(self, _argument: Any, _context: CallContext) -> dict[str, dict[str, str]]:
        return self._versions()

    def test(self, argument: Any, _context: CallContext) -> Any:
        return argument if isinstance(argument, str) else ""

    def restore_config_section(self, sections: Any, context: CallContext) -> bool:
        if not isinstance(sections, dict) or not sections:
            raise MethodFault(
                xmlrpc.INVALID_PARAMS,
                "restore_config_section expects one struct of config sections, got "
                f"{type(sections).__name__ if sections != [] else 'an empty array'}",
            )
        with self.merge_lock:
            description = revision_description(sections)
            who = f"{context.username}@{context.remote_addr}"
            with self.store.transaction(description, username=who) as root:
                accounts_before = lockout.accounts_copy(root)
                # the decoded request serves nothing else: the merge lets go of it as it goes
                report = merge_payload(root, sections, self.registry, accept_unknown=self.accept_unknown_sections,
                                       consume=True)
                # raises before anything is written if the request's credentials would stop working
                lockout.guard_merge(accounts_before, root, context.authorization, allow=context.allow_lockout,
                                    now=self.store.clock.time(), who=who)
                if self.merge_hook is not None:  # still under the store's lock
                    self.merge_hook.before_write(context, self.store.config_path.read_bytes)
                if self.on_merged is not None:  # the last step before the write
                    self.on_merged(root, report)
            log.info("%s (from %s@%s)", description, context.username, context.remote_addr)
            for warning in report.warnings:
                log.warning("%s", warning)
            self.last_report = report
            self._reconfigure(root, report)
        return True

    def filter_configure(self, _argument: Any, _context: CallContext) -> bool:
        self.services.filter_configure()
        return True

    def reload_templates(self, _argument: Any, _context: CallContext) -> dict[str, str]:
        self.services.reload_templates()
        return {"status": "done"}

    def list_services(self, _argument: Any, _context: CallContext) -> list[dict[str, Any]]:
        return self.services.list_services()

    def _service_action(self, action: str) -> Callable[[Any, CallContext], str]:
        def handler(argument: Any, context: CallContext) -> str:
            if not isinstance(argument, dict) or not isinstance(argument.get("service"), str):
                raise MethodFault(xmlrpc.INVALID_PARAMS, f"{action}_service expects a struct {{service, id}}")
            service_id = argument.get("id", "")
            service_id = "" if service_id is None else str(service_id)
            log.info("%s service %s[%s] requested by %s@%s", action, argument["service"], service_id,
                     context.username, context.remote_addr)
            method = getattr(self.services, action)
            return str(method(argument["service"], service_id))

        return handler

    # --- reconfiguration after a merge ---------------------------------------------------------

    def _reconfigure(self, root: Any, report: MergeReport) -> None:
        if self.failover is not None and (report.vips_added or report.vips_changed or report.vips_removed):
            touched = {vip.spec.vhid for vip in (*report.vips_added, *report.vips_changed)}
            specs = [spec for spec in model.carp_vips(root) if spec.vhid in touched]
            removed = [vip.spec for vip in report.vips_removed]
            try:
                reconfigure_vips(self.failover, root, specs, removed)
            except HaError as exc:
                log.error("reconfiguring CARP after the merge failed: %s", exc)
        _, failed = restart_item_services(self.services, self.registry, report.sections, tolerated=ServiceError)
        for name, error in failed:
            log.info("not restarting %s after the merge: %s", name, error)
