"""The status page's backend: versions, services and service actions on the backup.

Shapes are those of OPNsense's `HasyncStatusController` (reference §6), so the existing web UI
can consume our JSON unchanged: `{"response": ...}` on success, `{"status": "error", "message"}`
on failure, `{"response": msg, "status": "ok"}` for an action, `{"status": "ok", "count": N}`
for "Synchronize and reconfigure all".
"""

from __future__ import annotations

from typing import Any

from hasync.config.items import SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore
from hasync.core import versions
from hasync.core.errors import HaError
from hasync.core.paths import state_dir
from hasync.sync.plan import ConfigView
from hasync.sync.run import Progress, SyncOptions, SyncRun, peer_from_settings, restart_all
from hasync.wire.client import ClientOptions, PeerClient

SERVICE_ACTIONS = ("start", "stop", "restart")


class Remote:
    """The primary's view of its backup."""

    def __init__(
        self,
        store: ConfigStore,
        registry: SyncItemRegistry,
        client_options: ClientOptions | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.client_options = client_options or ClientOptions()
        self.progress = progress

    def peer(self) -> PeerClient:
        # the sync settings without parsing all of config.xml when a sync already cached them
        root = ConfigView(self.store, state_dir(self.store.conf_dir)).light_root()
        return peer_from_settings(self.store.conf_dir, root, read_hasync(root), self.client_options)

    def version(self) -> dict[str, Any]:
        reply = self.peer().call("opnsense.firmware_version")
        if not isinstance(reply, dict):
            raise HaError(f"backup sent an unexpected firmware_version reply: {str(reply)[:200]}")
        firmware = dict(reply.get("firmware") or {})
        firmware["_my_version"] = versions.local_versions(self.store.conf_dir)["firmware"]["version"]
        reply["firmware"] = firmware
        return {"response": reply}

    def services(self) -> dict[str, Any]:
        listing = self.peer().call("opnsense.list_services", [[]])
        if not isinstance(listing, list):
            raise HaError(f"backup sent an unexpected list_services reply: {str(listing)[:200]}")
        return {"response": listing}

    def _sync(self, restart_services: bool = False) -> SyncRun:
        run = SyncRun(self.store, self.registry, SyncOptions(restart_services=restart_services,
                                                               client=self.client_options),
                      progress=self.progress)
        result = run.run()
        if result.status != "ok":
            raise HaError(result.message)
        return run

    def service_action(self, action: str, name: str, service_id: str = "") -> dict[str, Any]:
        """Sync, reload templates, then start/stop/restart one service (ha_xmlrpc_exec.php)."""
        if action not in SERVICE_ACTIONS:
            raise HaError(f"unknown service action {action!r}; use one of {', '.join(SERVICE_ACTIONS)}")
        self._sync()
        peer = self.peer()
        peer.call("opnsense.configd_reload_all_templates", [[]])
        message = peer.call(f"opnsense.{action}_service", [{"service": name, "id": service_id}])
        return {"response": str(message), "status": "ok"}

    def reload_templates(self) -> dict[str, Any]:
        """Re-render the backup's templates (`ha exec reload_templates`); no sync first."""
        reply = self.peer().call("opnsense.configd_reload_all_templates", [[]])
        if not isinstance(reply, dict):
            raise HaError(f"backup sent an unexpected configd_reload_all_templates reply: {str(reply)[:200]}")
        return reply

    def restart_all(self) -> dict[str, Any]:
        """Synchronize and reconfigure all: list first, sync, reload templates, restart each."""
        listing = self.services()["response"]
        run = self._sync()
        restart_all(self.peer(), run, run.result, services=listing)
        return {"status": "ok", "count": run.result.services_restarted}


def error_document(exc: Exception) -> dict[str, Any]:
    return {"status": "error", "message": str(exc)}
