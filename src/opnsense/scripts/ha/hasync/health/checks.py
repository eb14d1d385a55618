"""Health checks of the HA pair, for cron, monit and Nagios-style monitoring.

Run on the primary (the node with `hasync.synchronizetoip`), `check` looks at both nodes: its
own state through the local failover backend, the backup's through the backup agent's
`hasync.*` methods. On a node without a sync target (the backup, a lone box) the pair-wide
checks look at this node only and say so.

Each check answers OK, WARNING, CRITICAL or UNKNOWN (could not be determined); the overall state
is the worst by CRITICAL > WARNING > UNKNOWN > OK, and the exit code follows Nagios (0/1/2/3).

===================  ===================================================================  =========
id                   what                                                                 failing
===================  ===================================================================  =========
peer                 the backup answers `opnsense.firmware_version` with our credentials  CRITICAL
version              both nodes run the same version (patch skew: WARNING)                CRITICAL
drift                per sync item: the backup's digest vs the one it reported right      WARNING
                     after our last sync (changed *there*), and this node's vs what we
                     pushed (changed *here*, not synced). Fallback on a stock backup: the
                     snapshot of what we pushed, and the message says so.
carp.master          every vhid has exactly one MASTER across the pair                    CRITICAL
carp.demotion        demotion on either node that opnsense-ha did not add, with its       WARNING
                     likely cause
carp.maintenance     maintenance mode left on, on either node                             WARNING
carp.preempt         preempt differs between the nodes, or from the configured value      WARNING
statesync            pfsync `syncok` / conntrackd running and its link up, where          CRITICAL
                     configured
sync_loop            the backup has `hasync.synchronizetoip` set                          WARNING
tls_expiry           the backup agent's TLS certificate expires within 30 days            WARNING
                     (expired: CRITICAL)
confirm              the backup rolled back a commit-confirmed sync nobody confirmed,     WARNING
                     and no sync merged since (on the backup: its own state file)
===================  ===================================================================  =========

Once the peer is found unreachable no further call is made to it, so a check of a dead pair
finishes within one connect timeout. No message ever contains a secret: values come from states,
names and counters, and the peer URL is shown without any user information.
"""

from __future__ import annotations

import datetime as dt
import logging
import logging.handlers
import os
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from hasync.agent.hasync_methods import carp_facts
from hasync.config.items import HasyncSettings, SyncItemRegistry, read_hasync
from hasync.config.store import ConfigStore
from hasync.core import schemas, versions
from hasync.core.errors import HaError
from hasync.core.logsetup import syslog_socket
from hasync.core.paths import state_dir
from hasync.failover.base import FailoverBackend
from hasync.failover.carp import CarpOps
from hasync.node import confirm_state as confirmmod
from hasync.payload import digest as digestmod
from hasync.sync import snapshot as snapshotmod
from hasync.sync.run import peer_from_settings
from hasync.wire.client import ClientOptions, PeerClient, shown_user
from hasync.wire.discovery import PeerFeatures, as_struct, discover
from hasync.wire.tls import certificate_not_after

log = logging.getLogger("hasync.checks")

OK, WARNING, CRITICAL, UNKNOWN = "OK", "WARNING", "CRITICAL", "UNKNOWN"
EXIT_CODES = {OK: 0, WARNING: 1, CRITICAL: 2, UNKNOWN: 3}
_SEVERITY = {OK: 0, UNKNOWN: 1, WARNING: 2, CRITICAL: 3}
SYSLOG_SOCKET = syslog_socket()
MONIT_LIMIT = 512
EXPIRY_DAYS = 30

CHECKS: tuple[tuple[str, str], ...] = (
    ("peer", "peer reachable and authenticated"),
    ("version", "versions equal"),
    ("drift", "configuration drift since the last sync"),
    ("carp.master", "exactly one MASTER per vhid"),
    ("carp.demotion", "no demotion that opnsense-ha did not add"),
    ("carp.maintenance", "maintenance mode off"),
    ("carp.preempt", "preempt equal on both nodes"),
    ("statesync", "state sync working"),
    ("sync_loop", "backup has no sync target"),
    ("tls_expiry", "agent TLS certificate valid for 30 days or more"),
    ("confirm", "no commit-confirmed sync rolled back since the last good sync"),
)
CHECK_IDS = tuple(check_id for check_id, _ in CHECKS)
_NAMES = dict(CHECKS)


def worst(statuses: Iterable[str]) -> str:
    return max(statuses, key=lambda status: _SEVERITY[status], default=OK)


def safe_url(url: str) -> str:
    """The URL without user:password@ (synchronizetoip may carry them)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class CheckResult:
    id: str
    status: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _NAMES.get(self.id, self.id)

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "status": self.status, "message": self.message, "data": self.data}


@dataclass
class CheckReport:
    node: str
    role: str
    peer: str
    fallback: bool
    checks: list[CheckResult]
    time: float

    @property
    def status(self) -> str:
        return worst(check.status for check in self.checks)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]

    @property
    def problems(self) -> list[CheckResult]:
        return sorted((c for c in self.checks if c.status != OK), key=lambda c: -_SEVERITY[c.status])

    def summary(self) -> str:
        if not self.problems:
            return f"all {len(self.checks)} checks OK"
        return "; ".join(f"{check.id}: {check.message}" for check in self.problems)

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "exit_code": self.exit_code,
            "node": self.node,
            "role": self.role,
            "peer": self.peer,
            "fallback": self.fallback,
            "time": self.time,
            "summary": self.summary(),
            "checks": [check.as_json() for check in self.checks],
        }


def fetch_certificate(host: str, port: int, timeout: float) -> bytes:
    """The PEM certificate a TLS server presents (not verified: we only read its dates)."""
    return ssl.get_server_certificate((host, port), timeout=timeout).encode()


@dataclass
class CheckContext:
    store: ConfigStore
    registry: SyncItemRegistry
    failover: FailoverBackend | None = None
    client_options: ClientOptions = field(
        default_factory=lambda: ClientOptions(connect_timeout=5.0, total_timeout=15.0, retries=0))
    peer: PeerClient | None = None  # default: built from hasync.synchronizetoip
    clock: Callable[[], float] = time.time
    expiry_days: int = EXPIRY_DAYS
    cert_fetcher: Callable[[str, int, float], bytes] = fetch_certificate


@dataclass
class _Facts:
    """Everything gathered once, shared by the checks."""

    root: Any
    settings: HasyncSettings
    node: str
    primary: bool
    local: dict[str, Any] | None = None
    local_error: str = ""
    peer: PeerClient | None = None
    peer_error: str = ""
    remote_version: str = ""
    local_version: str = ""
    features: PeerFeatures | None = None
    capabilities: dict[str, Any] | None = None
    peer_carp: dict[str, Any] | None = None
    peer_carp_error: str = ""
    peer_name: str = "backup"

    @property
    def reachable(self) -> bool:
        return self.peer is not None and not self.peer_error

    def has(self, method: str) -> bool:
        return self.reachable and self.features is not None and self.features.has(method)


def _gather(ctx: CheckContext, wanted: set[str]) -> _Facts:
    root = ctx.store.load()
    settings = read_hasync(root)
    facts = _Facts(root, settings, (root.findtext("system/hostname") or "").strip() or "this node",
                   settings.is_primary)
    facts.local_version = versions.local_versions(ctx.store.conf_dir)["firmware"]["version"]
    carp_checks = {"carp.master", "carp.demotion", "carp.maintenance", "carp.preempt", "statesync"}
    if wanted & carp_checks:
        if ctx.failover is None:
            facts.local_error = "no failover backend on this node"
        else:
            facts.local = carp_facts(CarpOps(ctx.store, ctx.failover))
            if not facts.local.get("available"):
                facts.local_error = str(facts.local.get("reason", "CARP state unavailable"))
                facts.local = None
    if not facts.primary:
        return facts

    try:
        facts.peer = ctx.peer or peer_from_settings(ctx.store.conf_dir, root, settings, ctx.client_options)
        facts.remote_version = versions.firmware_version_of(facts.peer.call("opnsense.firmware_version"))
        facts.features = discover(facts.peer)
    except HaError as exc:
        facts.peer_error = str(exc)
        return facts
    try:
        if facts.has("hasync.capabilities"):
            facts.capabilities = as_struct(facts.peer.call("hasync.capabilities"))
            node = as_struct(facts.capabilities.get("node", {}))
            facts.peer_name = str(node.get("hostname") or "backup")
        if wanted & carp_checks:
            if facts.has("hasync.carp_status"):
                reply = as_struct(facts.peer.call("hasync.carp_status"))
                if reply.get("available"):
                    facts.peer_carp = reply
                    facts.peer_name = str(reply.get("node") or facts.peer_name)
                else:
                    facts.peer_carp_error = f"the backup reports no CARP state: {reply.get('reason', '')}"
            else:
                facts.peer_carp_error = ("FALLBACK impossible: the backup offers no hasync.carp_status (a stock "
                                         "OPNsense backup, or our agent with --no-extensions); its CARP state "
                                         "cannot be queried")
    except HaError as exc:
        facts.peer_error = f"{facts.peer.peer_key} failed during the checks: {exc}"
    if facts.peer_name == facts.node:
        facts.peer_name = f"{facts.peer_name} (peer)"
    return facts


# --- the checks ---------------------------------------------------------------------------------


def _not_primary(check_id: str) -> CheckResult:
    return CheckResult(check_id, OK, "not applicable: this node has no sync target (hasync.synchronizetoip is "
                                     "empty); pair checks run on the primary", {"applicable": False})


def _unreachable(check_id: str, facts: _Facts) -> CheckResult:
    return CheckResult(check_id, UNKNOWN, f"unknown: the backup is unreachable ({facts.peer_error})")


def check_peer(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary:
        return _not_primary("peer")
    url = safe_url(facts.peer.url) if facts.peer else ""
    if facts.peer_error:
        return CheckResult("peer", CRITICAL, facts.peer_error, {"url": url})
    assert facts.peer is not None and facts.features is not None
    extensions = "with hasync.* extensions" if facts.features.extensions else "stock: no hasync.* methods"
    user = shown_user(facts.peer.username)
    return CheckResult("peer", OK, f"{url} answers, authenticated as {user!r} ({extensions})",
                       {"url": url, "extensions": facts.features.extensions})


def check_version(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary:
        return _not_primary("version")
    if not facts.remote_version:
        return _unreachable("version", facts)
    verdict = versions.compare(facts.local_version, facts.remote_version)
    data = {"local": facts.local_version, "remote": facts.remote_version, "verdict": verdict}
    if verdict == "equal":
        return CheckResult("version", OK, f"both nodes run {facts.local_version}", data)
    if verdict == "patch":
        return CheckResult("version", WARNING, f"patch level differs: this node {facts.local_version}, backup "
                                               f"{facts.remote_version} (update the older node)", data)
    return CheckResult("version", CRITICAL, f"versions differ: this node {facts.local_version}, backup "
                                            f"{facts.remote_version}; sync refuses until both run the same "
                                            "major.minor", data)


def check_drift(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary:
        return _not_primary("drift")
    if not facts.reachable:
        return _unreachable("drift", facts)
    assert facts.peer is not None
    ids, _unknown = ctx.registry.split_known(facts.settings.syncitems)
    if not ids:
        return CheckResult("drift", OK, "no sync items selected (hasync.syncitems is empty)", {"items": []})
    local = digestmod.item_digests(digestmod.primary_item_values(facts.root, ctx.registry, ids), ctx.registry)
    snap = snapshotmod.load(ctx.store.conf_dir)
    records = snap.items if snap is not None else {}
    pending = [i for i in ids if i in records and records[i].digest != local[i]]
    never = [i for i in ids if i not in records]
    data: dict[str, Any] = {"items": ids, "pending": pending, "never_synced": never,
                            "last_sync": snap.time if snap else 0.0, "fallback": False}
    when = f"the last sync ({snap.time_iso})" if snap is not None else "any sync by this node"
    if not facts.has("hasync.digest"):
        data["fallback"] = True
        note = ("FALLBACK: the backup offers no hasync.digest (stock OPNsense); changes made on the backup itself "
                "cannot be seen, compared with the snapshot of what this node last pushed instead")
        if snap is None:
            return CheckResult("drift", UNKNOWN, f"{note}, but no sync by this node is recorded; run "
                                                 "`opnsense-ha sync` once", data)
        if pending or never:
            parts = [f"changed on this node since {when}, not synced: {', '.join(pending)}"] if pending else []
            parts += [f"never synced by this node: {', '.join(never)}"] if never else []
            return CheckResult("drift", WARNING, f"{'; '.join(parts)} ({note})", data)
        return CheckResult("drift", OK, f"nothing changed on this node since {when} ({note})", data)
    remote, unknown = digestmod.parse_digest_reply(facts.peer.call("hasync.digest", [ids]))
    drifted = []
    for item_id in ids:
        if item_id in unknown:
            continue
        record = records.get(item_id)
        if record is not None:
            baseline = record.backup_digest or record.digest
            if remote.get(item_id) != baseline:
                drifted.append(item_id)
    unsynced = [i for i in never if i not in unknown and remote.get(i) != local[i]]
    data.update({"drifted": drifted, "unknown_on_backup": unknown, "out_of_sync": unsynced})
    parts = []
    if drifted:
        parts.append(f"changed on the backup since {when}: {', '.join(drifted)} "
                     "(`opnsense-ha diff` shows what a sync would put back)")
    if pending:
        parts.append(f"changed on this node since {when}, not synced: {', '.join(pending)}")
    if unsynced:
        parts.append(f"differs from the backup, never synced by this node: {', '.join(unsynced)}")
    if unknown:
        parts.append(f"unknown to the backup (plugin or version missing there): {', '.join(unknown)}")
    if parts:
        return CheckResult("drift", WARNING, "; ".join(parts), data)
    return CheckResult("drift", OK, f"no drift: the backup holds what this node last pushed ({len(ids)} items)"
                       if snap is not None else f"in sync: the backup's digests equal this node's ({len(ids)} items)",
                       data)


def _nodes(facts: _Facts) -> list[tuple[str, dict[str, Any]]]:
    nodes = [(facts.node, facts.local)] if facts.local is not None else []
    if facts.peer_carp is not None:
        nodes.append((facts.peer_name, facts.peer_carp))
    return nodes


def _pair_gap(facts: _Facts) -> str:
    """Why the pair-wide view is incomplete ('' when it is complete or this node has no peer)."""
    gaps = []
    if facts.local is None:
        gaps.append(f"this node's CARP state is unknown ({facts.local_error})")
    if facts.primary and facts.peer_carp is None:
        reason = facts.peer_error or facts.peer_carp_error or "not queried"
        gaps.append(f"the backup's CARP state is unknown ({reason})")
    return "; ".join(gaps)


def _finish(check_id: str, problems: list[tuple[str, str]], ok_message: str, facts: _Facts,
            data: dict[str, Any]) -> CheckResult:
    gap = _pair_gap(facts)
    data["local_only"] = not facts.primary
    if problems:
        status = worst(status for status, _ in problems)
        message = "; ".join(text for _, text in problems)
        return CheckResult(check_id, status, message + (f" ({gap})" if gap else ""), data)
    if gap:
        return CheckResult(check_id, UNKNOWN, f"{gap}; {ok_message}" if ok_message else gap, data)
    suffix = " (this node only: it has no sync target)" if not facts.primary else ""
    return CheckResult(check_id, OK, ok_message + suffix, data)


def check_carp_master(ctx: CheckContext, facts: _Facts) -> CheckResult:
    nodes = _nodes(facts)
    table: dict[tuple[str, int], dict[str, str]] = {}
    for name, node in nodes:
        for vhid in node.get("vhids", []):
            table.setdefault((str(vhid["interface"]), int(vhid["vhid"])), {})[name] = str(vhid["status"])
    problems: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    for (interface, vhid), states in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for name, _ in nodes:
            states.setdefault(name, "absent")
        masters = [name for name, state in states.items() if state == "MASTER"]
        listing = ", ".join(f"{name} {state}" for name, state in states.items())
        rows.append({"vhid": vhid, "interface": interface, "states": states, "masters": len(masters)})
        if not facts.primary:
            continue  # one node alone cannot tell split brain from a healthy pair
        if len(masters) > 1:
            problems.append((CRITICAL, f"split brain: vhid {vhid} ({interface}) is MASTER on {' and '.join(masters)}"))
        elif not masters:
            problems.append((CRITICAL, f"no MASTER for vhid {vhid} ({interface}): {listing}"))
    data: dict[str, Any] = {"vhids": rows}
    if not table:
        ok = "no CARP VIPs on " + (" or ".join(name for name, _ in nodes) if nodes else "either node")
    elif facts.primary:
        ok = f"one MASTER for each of {len(table)} vhid(s): " + "; ".join(
            f"vhid {r['vhid']} " + ", ".join(f"{n} {s}" for n, s in r["states"].items()) for r in rows)
    else:
        ok = "; ".join(f"vhid {r['vhid']} {next(iter(r['states'].values()))}" for r in rows)
    return _finish("carp.master", problems, ok, facts, data)


def check_carp_demotion(ctx: CheckContext, facts: _Facts) -> CheckResult:
    problems = []
    data: dict[str, Any] = {}
    for name, node in _nodes(facts):
        external = int(node.get("external_demotion", 0))
        data[name] = {"demotion": node.get("demotion", 0), "ours": node.get("maintenance_demotion", 0),
                      "external": external, "causes": node.get("external_demotion_causes", [])}
        if external:
            causes = "; ".join(node.get("external_demotion_causes", [])) or "cause unknown"
            problems.append((WARNING, f"{name}: demotion {external} not added by opnsense-ha, likely: {causes}"))
    return _finish("carp.demotion", problems, "no demotion other than opnsense-ha's own", facts, data)


def check_carp_maintenance(ctx: CheckContext, facts: _Facts) -> CheckResult:
    problems = []
    data: dict[str, Any] = {}
    for name, node in _nodes(facts):
        on = bool(node.get("maintenance_mode")) or int(node.get("maintenance_demotion", 0)) > 0
        data[name] = {"maintenance_mode": bool(node.get("maintenance_mode")),
                      "demotion": int(node.get("maintenance_demotion", 0))}
        if on:
            problems.append((WARNING, f"maintenance mode is on on {name} (it stays demoted until "
                                      "`opnsense-ha carp maintenance leave`)"))
    return _finish("carp.maintenance", problems, "maintenance mode is off", facts, data)


def check_carp_preempt(ctx: CheckContext, facts: _Facts) -> CheckResult:
    problems = []
    nodes = _nodes(facts)
    data = {name: {"preempt": bool(node.get("preempt")), "configured": bool(node.get("preempt_configured"))}
            for name, node in nodes}
    for name, values in data.items():
        if values["preempt"] != values["configured"]:
            problems.append((WARNING, f"{name}: preempt is {'on' if values['preempt'] else 'off'} but configured "
                                      f"{'on' if values['configured'] else 'off'} (run `opnsense-ha boot` or "
                                      "`opnsense-ha carp preempt on|off`)"))
    if len(nodes) == 2 and data[nodes[0][0]]["preempt"] != data[nodes[1][0]]["preempt"]:
        listing = ", ".join(f"{name} {'on' if v['preempt'] else 'off'}" for name, v in data.items())
        problems.append((WARNING, f"preempt differs between the nodes: {listing}; failover and failback then "
                                  "behave differently in each direction"))
    running = {v["preempt"] for v in data.values()}
    ok = f"preempt {'on' if True in running else 'off'}" + (" on both nodes" if len(nodes) == 2 else "")
    return _finish("carp.preempt", problems, ok, facts, data)


def check_statesync(ctx: CheckContext, facts: _Facts) -> CheckResult:
    problems = []
    data: dict[str, Any] = {}
    configured = []
    for name, node in _nodes(facts):
        sync = as_struct(node.get("state_sync", {}))
        data[name] = sync
        if not sync.get("configured"):
            continue
        configured.append(name)
        detail = str(sync.get("detail") or "")
        if node.get("backend") == "none":
            problems.append((UNKNOWN, f"{name}: state sync is configured but this node has no failover backend "
                                      "(OPNSENSE_HA_FAILOVER=none), so it cannot be checked"))
        elif not sync.get("enabled") or not sync.get("running"):
            problems.append((CRITICAL, f"{name}: state sync is configured but not running ({detail or 'down'})"))
        elif sync.get("syncok") == "no":
            why = detail or "syncok 0: bulk update not finished or the peer does not answer"
            problems.append((CRITICAL, f"{name}: state sync is not in sync ({why})"))
        elif sync.get("differences"):
            problems.append((WARNING, f"{name}: state sync runs with other settings than configured: "
                                      f"{', '.join(sync['differences'])}"))
    nodes = _nodes(facts)
    if len(nodes) == 2 and len(configured) == 1:
        problems.append((WARNING, f"state sync is configured on {configured[0]} only"))
    if configured:
        ok = f"state sync running and in sync on {', '.join(configured)}"
    else:
        ok = "state sync is not configured (hasync.pfsyncinterface empty)"
    return _finish("statesync", problems, ok, facts, data)


def check_sync_loop(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary:
        return CheckResult("sync_loop", OK, "this node has no sync target, so it cannot start a sync loop",
                           {"applicable": False})
    if not facts.reachable:
        return _unreachable("sync_loop", facts)
    if facts.capabilities is None:
        return CheckResult("sync_loop", UNKNOWN, "FALLBACK impossible: the backup offers no hasync.capabilities "
                                                 "(stock OPNsense); check System > High Availability > Settings on "
                                                 "the backup: 'Synchronize Config to IP' must be empty",
                           {"fallback": True})
    node = as_struct(facts.capabilities.get("node", {}))
    if node.get("synchronizetoip_set"):
        return CheckResult("sync_loop", WARNING, f"the backup {facts.peer_name} has hasync.synchronizetoip set: it "
                                                 "can push its config back (sync-loop risk); clear it on the backup",
                           {"synchronizetoip_set": True})
    return CheckResult("sync_loop", OK, f"the backup {facts.peer_name} has no sync target",
                       {"synchronizetoip_set": False})


def check_tls_expiry(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary or facts.peer is None:
        if not facts.primary:
            return _not_primary("tls_expiry")
        return _unreachable("tls_expiry", facts)
    peer = facts.peer
    if peer.scheme != "https":
        return CheckResult("tls_expiry", WARNING, f"{safe_url(peer.url)} is plain HTTP: the config and the sync "
                                                  "password travel unencrypted", {"tls": False})
    try:
        pem = ctx.cert_fetcher(peer.host, peer.port, ctx.client_options.connect_timeout)
        not_after = certificate_not_after(pem)
    except (OSError, ValueError) as exc:
        return CheckResult("tls_expiry", UNKNOWN, f"could not read the backup's TLS certificate: {exc}")
    now = dt.datetime.fromtimestamp(ctx.clock(), dt.UTC)
    days = (not_after - now).total_seconds() / 86400
    data = {"not_after": not_after.strftime("%Y-%m-%dT%H:%M:%SZ"), "days_left": round(days, 1)}
    if days < 0:
        return CheckResult("tls_expiry", CRITICAL, f"the backup agent's TLS certificate expired on "
                                                   f"{data['not_after']}; replace it (verifypeer syncs fail)", data)
    if days < ctx.expiry_days:
        return CheckResult("tls_expiry", WARNING, f"the backup agent's TLS certificate expires in {days:.0f} days "
                                                  f"({data['not_after']}); renew it, then `opnsense-ha trust --reset` "
                                                  "if it is pinned", data)
    return CheckResult("tls_expiry", OK, f"the backup agent's TLS certificate is valid until {data['not_after']} "
                                         f"({days:.0f} days)", data)


def check_confirm(ctx: CheckContext, facts: _Facts) -> CheckResult:
    if not facts.primary:  # the backup itself: the state its agent keeps

        document = confirmmod.public_state(state_dir(ctx.store.conf_dir), ctx.clock())
    elif not facts.reachable:
        return _unreachable("confirm", facts)
    elif not facts.has("hasync.confirm_state"):
        return CheckResult("confirm", OK, "not applicable: the backup has no commit-confirmed sync (stock "
                                          "OPNsense or --no-extensions)", {"applicable": False})
    else:
        assert facts.peer is not None
        document = as_struct(facts.peer.call("hasync.confirm_state"))
    healthy, message = confirmmod.health(document, ctx.clock())
    past = document.get("past") or []
    data = {"armed": (document.get("armed") or {}).get("state") == confirmmod.ARMED,
            "last": str(past[0].get("state", "")) if past else ""}
    return CheckResult("confirm", OK if healthy else WARNING, message, data)


_FUNCTIONS: dict[str, Callable[[CheckContext, _Facts], CheckResult]] = {
    "peer": check_peer,
    "version": check_version,
    "drift": check_drift,
    "carp.master": check_carp_master,
    "carp.demotion": check_carp_demotion,
    "carp.maintenance": check_carp_maintenance,
    "carp.preempt": check_carp_preempt,
    "statesync": check_statesync,
    "sync_loop": check_sync_loop,
    "tls_expiry": check_tls_expiry,
    "confirm": check_confirm,
}


def select(only: Iterable[str] | None = None, skip: Iterable[str] | None = None) -> list[str]:
    chosen = list(only) if only else list(CHECK_IDS)
    unknown = [c for c in [*chosen, *(skip or [])] if c not in _FUNCTIONS]
    if unknown:
        raise HaError(f"unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECK_IDS)}")
    skipped = set(skip or [])
    return [c for c in CHECK_IDS if c in chosen and c not in skipped]


def run_checks(ctx: CheckContext, only: Iterable[str] | None = None, skip: Iterable[str] | None = None) -> CheckReport:
    """Gather once, then run the selected checks. A check that raises reports UNKNOWN, never a trace."""
    wanted = select(only, skip)
    facts = _gather(ctx, set(wanted))
    results = []
    for check_id in wanted:
        try:
            results.append(_FUNCTIONS[check_id](ctx, facts))
        except HaError as exc:
            results.append(CheckResult(check_id, UNKNOWN, f"could not check: {exc}"))
    peer = safe_url(facts.peer.url) if facts.peer is not None else ""
    fallback = facts.reachable and facts.features is not None and not facts.features.extensions
    return CheckReport(facts.node, "primary" if facts.primary else "backup", peer, fallback, results,
                       round(ctx.clock(), 3))


# --- output ------------------------------------------------------------------------------------


def render_text(report: CheckReport) -> str:
    counts = {status: sum(1 for c in report.checks if c.status == status) for status in EXIT_CODES}
    perf = " ".join(f"{status.lower()}={n}" for status, n in counts.items())
    lines = [f"OPNSENSE-HA {report.status} - {report.summary()} | checks={len(report.checks)} {perf}"]
    lines += [f"{check.status:<9} {check.id}: {check.message}" for check in report.checks]
    return "\n".join(lines)


def render_monit(report: CheckReport) -> str:
    """One line of at most 512 bytes (what monit keeps of a program's output)."""
    if not report.problems:
        line = f"OK: all {len(report.checks)} checks passed"
    else:
        line = "; ".join(f"{c.status} {c.id}: {c.message}" for c in report.problems)
    encoded = line.replace("\n", " ").encode("utf-8")
    if len(encoded) > MONIT_LIMIT:
        encoded = encoded[: MONIT_LIMIT - 3].decode("utf-8", "ignore").encode("utf-8") + b"..."
    return encoded.decode("utf-8")


def render_json(report: CheckReport) -> dict[str, Any]:
    document = report.as_json()
    schemas.validate("check-result", document)
    return document


_SYSLOG_LEVELS = {CRITICAL: logging.CRITICAL, WARNING: logging.WARNING, UNKNOWN: logging.WARNING}


def emit_syslog(report: CheckReport, address: str = SYSLOG_SOCKET) -> int:
    """One syslog line per non-OK check; returns how many were sent (0 without a syslog socket)."""
    if not os.path.exists(address):
        return 0
    try:
        handler = logging.handlers.SysLogHandler(address=address, facility=logging.handlers.SysLogHandler.LOG_USER)
    except OSError as exc:
        log.debug("syslog unavailable at %s: %s", address, exc)
        return 0
    handler.setFormatter(logging.Formatter("opnsense-ha[%(process)d]: %(message)s"))
    sent = 0
    try:
        for check in report.checks:
            if check.status == OK:
                continue
            record = logging.LogRecord("hasync.checks", _SYSLOG_LEVELS[check.status], __file__, 0,
                                       "check %s %s: %s", (check.status, check.id, check.message), None)
            handler.emit(record)
            sent += 1
    finally:
        handler.close()
    return sent
