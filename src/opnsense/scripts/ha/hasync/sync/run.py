"""The primary's sync run: OPNsense's call sequence with checks and timings.

Sequence (rc.filter_synchronize): firmware_version -> restore_config_section -> filter_configure
-> optionally configd_reload_all_templates, list_services and restart_service for each service.
Differences from the PHP, each deliberate: versions are compared (major/minor skew refuses, patch
skew warns), services are restarted by their real `id` (the PHP sends the name, so multi-instance
services fail), and every step is timed and reported.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from hasync.config.items import HasyncSettings, SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore
from hasync.core import versions
from hasync.core.errors import AuthError, HaError, RemoteFault
from hasync.core.memory import gc_paused
from hasync.core.paths import state_dir
from hasync.node import confirm_state as confirmmod
from hasync.payload import pernode
from hasync.sync import snapshot
from hasync.sync.confirm import PrimaryConfirm
from hasync.sync.plan import ConfigView, SyncPlan
from hasync.wire.client import ClientOptions, PeerClient, TrustStore, shown_user, target_url
from hasync.wire.protocol import ALLOW_LOCKOUT_HEADER, LOCKOUT_MARK

if TYPE_CHECKING:  # a no-op sync never loads the failover layer
    from hasync.failover.base import FailoverBackend

log = logging.getLogger("hasync.sync")

def trust_store(conf_dir: str | Path) -> TrustStore:
    return TrustStore(state_dir(conf_dir) / "trust.json")


class Step(NamedTuple):
    """One step of a sync as the administrator sees it (`sync --json`, the progress lines)."""

    step: str
    seconds: float
    ok: bool
    detail: str = ""


class SyncOptions:
    """How to sync: what the command line and configd pass in (a plain class: see `hasync`)."""

    def __init__(self, *, items: list[str] | None = None, restart_services: bool = False,
                 pre_check_master: bool = False, dry_run: bool = False, ignore_version: bool = False,
                 client: ClientOptions | None = None, full: bool = False, fast_path: bool = True,
                 allow_lockout: bool = False, confirm: int | None = None) -> None:
        self.items = items
        self.restart_services = restart_services
        self.pre_check_master = pre_check_master
        self.dry_run = dry_run
        self.ignore_version = ignore_version
        self.client = client or ClientOptions()
        self.full = full  # send every item without comparing digests first
        self.fast_path = fast_path  # compressed XML sections when the backup offers them (hasync.capabilities)
        self.allow_lockout = allow_lockout  # merge even if the sync account loses its access (lockout.py)
        self.confirm = confirm  # commit-confirmed window in seconds (confirm.py); None: the setting, 0: off


class SyncResult:
    """What a sync did, for the exit code, `--json` and the status page (filled in as it runs)."""

    def __init__(self, *, dry_run: bool = False) -> None:
        self.status = "ok"
        self.target = ""
        self.items: list[str] = []
        self.sections: list[str] = []
        self.steps: list[Step] = []
        self.warnings: list[str] = []
        self.local_version = ""
        self.remote_version = ""
        self.services_restarted = 0
        self.dry_run = dry_run
        self.skipped = ""
        self.message = ""
        self.bytes_sent = 0
        self.bytes_received = 0
        self.transfer = ""  # "fast path", "XML-RPC", or "none" when the digests matched
        self.items_unchanged: list[str] = []
        self.confirm: dict[str, Any] = {}  # commit-confirmed: id, state, deadline

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "target": self.target,
            "items": self.items,
            "sections": self.sections,
            "steps": [step._asdict() for step in self.steps],
            "warnings": self.warnings,
            "local_version": self.local_version,
            "remote_version": self.remote_version,
            "services_restarted": self.services_restarted,
            "dry_run": self.dry_run,
            "skipped": self.skipped,
            "message": self.message,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "transfer": self.transfer,
            "items_unchanged": self.items_unchanged,
            "confirm": self.confirm,
        }


Progress = Callable[[Step], None]


def peer_from_settings(
    conf_dir: str | Path, root: Any, settings: HasyncSettings, options: ClientOptions
) -> PeerClient:
    """A client for hasync.synchronizetoip with the local GUI protocol/port rules."""
    url = target_url(
        settings.synchronizetoip,
        root.findtext("system/webgui/protocol") or "https",
        root.findtext("system/webgui/port") or "",
    )
    options.verify_peer = settings.verifypeer
    return PeerClient(url, settings.effective_username, settings.password, options, trust_store(conf_dir))


class SyncRun:
    """One sync from this (primary) node to its backup."""

    def __init__(
        self,
        store: ConfigStore,
        registry: SyncItemRegistry,
        options: SyncOptions,
        *,
        failover: FailoverBackend | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.options = options
        self.failover = failover
        self.progress = progress
        self.result = SyncResult(dry_run=options.dry_run)
        self.username = ""
        self.confirmer: PrimaryConfirm | None = None  # set once a merge is sent armed
        self.plan: SyncPlan | None = None  # the run's plan (what was built and sent), once made

    def step(self, name: str, action: Callable[[], str]) -> None:
        started = time.monotonic()
        try:
            detail = action()
        except Exception as exc:
            step = Step(name, round(time.monotonic() - started, 3), False, str(exc))
            self.result.steps.append(step)
            if self.progress:
                self.progress(step)
            raise
        step = Step(name, round(time.monotonic() - started, 3), True, detail)
        self.result.steps.append(step)
        if self.progress:
            self.progress(step)

    def run(self) -> SyncResult:
        """The sync, with the cyclic GC paused: on a large config it builds (and drops) a million
        acyclic objects, which the collector would walk again and again (`core.memory`)."""
        result = self.result
        try:
            with gc_paused():
                self._run()
        except HaError as exc:
            result.status = "lockout" if LOCKOUT_MARK in str(exc) else "error"
            result.message = str(exc)
            if self.confirmer is not None and not isinstance(exc, RemoteFault):  # it may have merged
                self.confirmer.failed(result, exc)
            # OPNsense's own wording, so existing log filters and alerts keep matching
            log.error("An error occurred while attempting XMLRPC sync with username %s and %s: %s",
                      shown_user(self.username) if self.username else "(unknown)", result.target or "(no target)", exc)
        return result

    def _run(self) -> None:
        result = self.result
        # config.xml is parsed only when something is sent (a no-op sync reads cached digests)
        view = ConfigView(self.store, state_dir(self.store.conf_dir))
        root = view.light_root()
        settings = read_hasync(root)
        if self.options.pre_check_master and not self._all_master():
            result.skipped = "not every CARP VIP is MASTER on this node; sync skipped (pre_check_master)"
            log.info("%s", result.skipped)
            return
        if self.options.items is not None:
            item_ids = list(self.options.items)
        else:
            # like rc.filter_synchronize: stored ids of items not installed here are skipped
            item_ids, unknown = self.registry.split_known(settings.syncitems)
            if unknown:
                note = f"hasync.syncitems names items not installed here, skipped: {', '.join(unknown)}"
                result.warnings.append(note)
                log.warning("%s", note)
        if not item_ids:
            raise HaError("no sync items selected: hasync.syncitems is empty (choose items in System > "
                          "High Availability, or pass --items)")
        result.items = list(item_ids)
        plan = self.plan = SyncPlan(view, self.registry, item_ids, full=self.options.full, fast=self.options.fast_path)
        self.step("build payload", plan.prepare)
        peer = peer_from_settings(self.store.conf_dir, root, settings, self.options.client)
        result.target = peer.url
        self.username = peer.username
        if self.options.allow_lockout:
            peer.extra_headers[ALLOW_LOCKOUT_HEADER] = "1"
        try:
            self._talk(peer, plan)
        finally:
            result.bytes_sent, result.bytes_received = peer.bytes_sent, peer.bytes_received

    def _warn_unprotected_local(self, plan: SyncPlan) -> None:
        """A stock OPNsense backup merges with PHP, which knows no `local` declarations: say so
        once per sync, naming the fields it will overwrite (self_address and swap still work,
        the payload carries them rewritten)."""
        if not plan.send_ids or plan.peer_probe is None or plan.peer_probe.extensions:
            return
        fields = pernode.local_fields(plan.payload(), self.registry.declarations())
        if not fields:
            return
        note = (f"the backup is a stock OPNsense (no opnsense-ha agent): it cannot keep its own value of the "
                f"field(s) declared local, this sync overwrites them with this node's: {', '.join(fields)}")
        self.result.warnings.append(note)
        log.warning("%s", note)

    def _all_master(self) -> bool:
        """pre_check_master: every local CARP VIP is MASTER (no VIPs, no failover: nothing to check)."""
        if self.failover is None:
            return True
        states = self.failover.vip_states()
        return all(state.status == "MASTER" for state in states)

    def _talk(self, peer: PeerClient, plan: SyncPlan) -> None:
        result = self.result

        def probe() -> str:
            remote = versions.firmware_version_of(plan.probe(peer))
            local = versions.local_versions(self.store.conf_dir)["firmware"]["version"]
            result.local_version, result.remote_version = local, remote
            verdict = versions.compare(local, remote)
            if verdict == "major" and not self.options.ignore_version:
                raise HaError(
                    f"Remote version differs from this machines, please update first: backup runs {remote}, "
                    f"this node {local} (use --ignore-version to sync anyway)"
                )
            if verdict != "equal":
                result.warnings.append(f"backup runs {remote}, this node {local}")
                log.warning("version skew: backup runs %s, this node %s", remote, local)
            note = plan.probe_note()
            return f"backup {remote}, local {local}" + (f"; {note}" if note else "")

        self.step("firmware_version", probe)  # with --full, the fast-path blob is built meanwhile
        self._warn_unprotected_local(plan)
        result.items_unchanged = list(plan.unchanged)
        result.sections = plan.top_keys()
        if not plan.send_ids:  # digest-first: the backup already holds what we would send
            result.transfer = "none"
            self.step("nothing to sync", plan.nothing)
            plan.record_unchanged(peer, result.warnings)
            if self.options.restart_services and not self.options.dry_run:
                restart_all(peer, self, result)
            return
        if self.options.dry_run:
            self.step("dry run", lambda: plan.dry_run(peer))
            return

        seconds = self.options.confirm
        if seconds is None:  # the setting for syncs without --confirm (cron); read now that we parse anyway
            seconds = confirmmod.setting(plan.view.root)
        confirmer = PrimaryConfirm(seconds) if seconds else None
        if confirmer is not None:
            self.step("confirm: backup can roll back", lambda: confirmer.prepare(peer))
            confirmer.arm(peer)
            self.confirmer = confirmer
            result.confirm = confirmer.as_json()
        try:
            self.step("restore_config_section", lambda: plan.send(peer))
        except RemoteFault:
            self.confirmer = None  # the backup refused the merge: nothing merged, nothing armed
            raise
        finally:
            if confirmer is not None:
                confirmer.disarm_header(peer)
        if confirmer is not None:
            confirmer.merged = True
        result.transfer = plan.transfer
        result.sections = plan.top_keys()
        recorded = False

        def record() -> None:  # never raises (`record_after_sync`)
            nonlocal recorded
            recorded = True
            snapshot.record_after_sync(self.store.conf_dir, self.registry, result, plan.record_payload(), peer,
                                       item_ids=plan.record_ids, digests=plan.record_digests or plan.ours,
                                       prepared=plan.prepared,
                                       extensions=plan.peer_probe.extensions if plan.peer_probe else None,
                                       asked=plan.digests_asked, backup_reply=plan.backup_digests)

        # With the backup's digests in hand already (the fast path asked along with the merge),
        # the record needs no request of its own: it is written while the backup reloads its
        # filter. Otherwise it is written first; and if that request fails before it ran, after.
        overlap = plan.digests_asked
        if not overlap:
            record()
        log.info("Merged %s config sections to %s", ", ".join(result.sections), peer.peer_key)
        try:
            self.step("filter_configure",
                      lambda: str(plan.reload_filter(peer, while_waiting=record if overlap else None)))
        except AuthError:
            if not self.options.allow_lockout:
                raise
            note = ("the backup no longer accepts the sync credentials (merged with --allow-lockout): its filter "
                    "was not reloaded and no later call can reach it until its account is repaired there")
            result.warnings.append(note)
            log.warning("%s", note)
            if confirmer is not None:  # the check will fail to log in: the backup rolls back by itself
                self._confirm(confirmer)
            return
        finally:
            if not recorded:
                record()
        if self.options.restart_services:
            restart_all(peer, self, result)
        if confirmer is not None:
            self._confirm(confirmer)

    def _confirm(self, confirmer: PrimaryConfirm) -> None:
        def fresh_peer() -> PeerClient:  # the credentials of the config as it is now, a new connection
            root = self.store.load()
            return peer_from_settings(self.store.conf_dir, root, read_hasync(root), self.options.client)

        confirmer.finish(self.step, fresh_peer, self.result)


def restart_all(peer: PeerClient, run: SyncRun, result: SyncResult,
                services: list[dict[str, Any]] | None = None) -> None:
    """Reload templates, then restart every service by its real id (PHP sends the name: a bug)."""
    run.step("configd_reload_all_templates", lambda: str(peer.call("opnsense.configd_reload_all_templates", [[]])))
    listing: list[dict[str, Any]] = []

    def list_services() -> str:
        listing.extend(services if services is not None else peer.call("opnsense.list_services", [[]]) or [])
        return f"{len(listing)} services"

    run.step("list_services", list_services)
    for service in listing:
        name = str(service.get("name", ""))
        if not name:
            continue
        service_id = str(service.get("id", "") or "")
        label = f"{name}[{service_id}]" if service_id else name

        def restart(name: str = name, service_id: str = service_id) -> str:
            return str(peer.call("opnsense.restart_service", [{"service": name, "id": service_id}]))

        run.step(f"restart {label}", restart)
        result.services_restarted += 1
