"""After config.xml changed on this node: bring CARP, pfsync and the affected services in line.

Two changes reach a backup's config outside OPNsense's own GUI: a merge from the primary and a
rollback. Both end the same way, through these two functions: the VIPs that changed go to the
failover backend (then pfsync, whose settings travel with them), and the services of the sync
items whose sections changed are restarted. What differs between the two callers is only what
they report and whether the filter is reloaded (the primary calls `filter_configure` itself).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from lxml import etree

from hasync.config.items import SyncItemRegistry
from hasync.config.vips import VipSpec
from hasync.core.errors import HaError
from hasync.failover import model
from hasync.failover.base import FailoverBackend
from hasync.services.backends import ServiceBackend


def vip_changes(before: Sequence[VipSpec], after: Sequence[VipSpec]) -> tuple[list[VipSpec], list[VipSpec]]:
    """(touched, removed) between two VIP lists, paired by `vip_key`.

    A VIP whose address or device changed under the same key is touched and its old form is also
    removed, so the old address does not stay on the interface.
    """
    old = {spec.key: spec for spec in before}
    new = {spec.key: spec for spec in after}
    touched = [spec for key, spec in new.items() if old.get(key) != spec]
    removed = [spec for key, spec in old.items() if key not in new]
    removed += [old[key] for key, spec in new.items()
                if key in old and (old[key].subnet, old[key].device) != (spec.subnet, spec.device)]
    return touched, removed


def reconfigure_vips(failover: FailoverBackend, root: etree._Element, touched: list[VipSpec],
                     removed: list[VipSpec]) -> None:
    """Configure `touched`, remove `removed`, then apply pfsync as `root` declares it (HaError on failure)."""
    failover.configure_vips(touched, removed)
    failover.apply_pfsync(model.pfsync_config(root))


def restart_item_services(services: ServiceBackend, registry: SyncItemRegistry, sections: Iterable[str],
                          tolerated: type[HaError] = HaError) -> tuple[list[str], list[tuple[str, HaError]]]:
    """Restart the services of the sync items covering `sections`: (restarted, [(name, error)]).

    A `tolerated` error is collected and the next service restarted; any other propagates."""
    restarted: list[str] = []
    failed: list[tuple[str, HaError]] = []
    for name in registry.services_for_sections(list(sections)):
        try:
            services.restart(name, "")
            restarted.append(name)
        except tolerated as exc:
            failed.append((name, exc))
    return restarted, failed
