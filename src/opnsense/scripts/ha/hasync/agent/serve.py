"""Assemble a running backup agent from a conf dir: TLS material, auth, services, failover.

Kept apart from `server` (the HTTP mechanics) and the `*_methods` modules so the CLI, the demo,
the lab and the tests all build the agent the same way.
"""

from __future__ import annotations

import logging
import shutil
import ssl
from dataclasses import dataclass
from pathlib import Path

from hasync.agent import fastpath
from hasync.agent.auth import Authenticator
from hasync.agent.hasync_methods import Extensions
from hasync.agent.opnsense_methods import BackupNode
from hasync.agent.server import AgentLimits, AgentServer, Dispatcher
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import HaError
from hasync.core.memory import gc_paused
from hasync.core.osiface import SubprocessRunner
from hasync.failover.base import FailoverBackend
from hasync.services.backends import OpnsenseServiceBackend, ServiceBackend, ServicesDirBackend
from hasync.wire.tls import config_certificate, generate_self_signed, server_context, webgui_certificate

log = logging.getLogger("hasync.serve")

DEFAULT_PORT = 8443
DEFAULT_STATE_DIR = "/var/db/opnsense-ha"


@dataclass
class ServeOptions:
    conf_dir: Path
    listen: str = f"0.0.0.0:{DEFAULT_PORT}"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    cert_ref: str | None = None  # a <cert> of config.xml by refid, instead of the web GUI's
    plain_http: bool = False
    allow_loopback: bool = False
    services_dir: Path | None = None
    state_dir: Path | None = None
    items_dir: Path | None = None
    accept_unknown_sections: bool = False
    limits: AgentLimits | None = None
    extensions: bool = True  # hasync.* methods; False stands in for a stock OPNsense backup


def parse_listen(text: str) -> tuple[str, int]:
    """`ADDR:PORT`, `[v6]:PORT` or `:PORT` (all addresses)."""
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise HaError(f"--listen {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:8443 or [::1]:8443")
    host = host.strip("[]") or "0.0.0.0"
    try:
        port = int(port_text)
    except ValueError:
        raise HaError(f"--listen {text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise HaError(f"--listen {text!r}: port out of range")
    return host, port


def tls_context(options: ServeOptions, store: ConfigStore, state_dir: Path) -> ssl.SSLContext | None:
    """Files from the command line, else a config.xml certificate by refid, else the web GUI
    certificate, else a kept self-signed one."""
    if options.plain_http:
        if options.tls_cert or options.tls_key or options.cert_ref:
            raise HaError("--plain-http and --tls-cert/--tls-key/--cert-ref exclude each other")
        log.warning("serving plain HTTP: credentials and config travel unencrypted (--plain-http)")
        return None
    if bool(options.tls_cert) != bool(options.tls_key):
        raise HaError("--tls-cert and --tls-key go together")
    if options.tls_cert and options.tls_key:
        if options.cert_ref:
            raise HaError("--cert-ref and --tls-cert/--tls-key exclude each other")
        return server_context(options.tls_cert, options.tls_key)
    if options.cert_ref:
        log.info("using certificate %s from config.xml", options.cert_ref)
        return server_context(*config_certificate(store.load(), options.cert_ref, state_dir, "agent-certref"))
    gui = webgui_certificate(store.load(), state_dir)
    if gui is not None:
        log.info("using the web GUI certificate from config.xml")
        return server_context(*gui)
    cert, key = state_dir / "agent.crt", state_dir / "agent.key"
    if not (cert.exists() and key.exists()):
        generate_self_signed(cert, key)
        log.info("generated a self-signed certificate in %s", state_dir)
    return server_context(cert, key)


def service_backend(services_dir: Path | None) -> ServiceBackend:
    runner = SubprocessRunner()
    if services_dir is not None:
        return ServicesDirBackend(services_dir, runner)
    if shutil.which("pluginctl"):
        return OpnsenseServiceBackend(runner)
    raise HaError("no service backend: pass --services-dir DIR (pluginctl, OPNsense's, is not installed here)")


def build_server(options: ServeOptions, failover: FailoverBackend | None = None) -> AgentServer:
    store = ConfigStore(options.conf_dir)
    registry = SyncItemRegistry.load(options.items_dir)
    # parsed config.xml and digests, reused while the file is unchanged (logins read its users
    # every request) and handed to the next merge instead of a second parse
    cache = fastpath.ConfigCache(store, registry)
    cache.recover()  # fail early, with file/line, on a broken config; clean up after a crash
    state_dir = options.state_dir or Path(DEFAULT_STATE_DIR)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    node = BackupNode(
        store,
        registry,
        service_backend(options.services_dir),
        failover,
        accept_unknown_sections=options.accept_unknown_sections,
    )
    dispatcher = node.register(Dispatcher())
    node.on_merged = cache.note_merged  # a merge leaves most items' digests as they were
    # Parsed now, before the agent listens: the first login of the first sync then reads a warm
    # tree, as every later one does (a 20 MB config costs ~0.15 s to parse).
    cache.accounts()
    if options.extensions:
        # (`capabilities` reads it only inside `ConfigCache.capabilities`, under the cache's lock)
        extensions = Extensions(node, read_config=cache.root)
        extensions.register(dispatcher)
        fastpath.register(dispatcher, extensions.features, cache)
        extensions.armed.resume()  # a commit-confirmed sync whose deadline passed while we were down
        # Its digests too (after any overdue rollback: of the config it serves), as a running
        # agent holds them after its last merge: the first probe answers from them, and the
        # first merge keeps those of the items it leaves alone. ~0.5 s at 20 MB.
        try:
            with gc_paused():  # (a whole config's values, as for a large request: `core.memory`)
                cache.digests(registry.ids())
        except Exception as exc:  # an optimisation: the agent serves anyway, digesting on request
            log.warning("digests at start failed (%s); they are computed on request", type(exc).__name__)
    context = tls_context(options, store, state_dir)
    try:
        return AgentServer(
            parse_listen(options.listen),
            dispatcher,
            Authenticator(cache.accounts),
            tls=context,
            allow_loopback=options.allow_loopback,
            limits=options.limits,
        )
    except OSError as exc:
        raise HaError(f"cannot listen on {options.listen}: {exc.strerror or exc}") from None
