"""The backup agent: an XML-RPC endpoint that any OPNsense primary can sync to.

It answers `POST /xmlrpc.php` exactly like OPNsense's `xmlrpc.php` (IXR wire format, the same
method set and argument shapes, the same untyped `Authentication failed` reply), so a stock
OPNsense primary cannot tell it apart, and our own client works against a stock OPNsense backup.

Hardening that a root-owned network service needs and OPNsense's PHP leaves to the web server:
a body size limit checked before reading, a deadline for reading the whole body (a trickling
client cannot pin a thread), a bounded number of concurrent connections, TLS 1.2 minimum, login
throttling, one merge at a time, and a decoder that refuses DTDs and deep nesting.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

from hasync.core.errors import HaError, MergeError, MethodFault, ServiceError
from hasync.core.memory import gc_paused
from hasync.wire import xmlrpc
from hasync.wire.protocol import ALLOW_LOCKOUT_HEADER, CONFIRM_HEADER, no_delay

log = logging.getLogger("hasync.agent")

XMLRPC_PATH = "/xmlrpc.php"
DEFAULT_MAX_BODY = 128 * 1024 * 1024
DEFAULT_READ_TIMEOUT = 30.0
DEFAULT_BODY_DEADLINE = 120.0
DEFAULT_MAX_CONNECTIONS = 32
DRAIN_LIMIT = 1024 * 1024
DEFAULT_MAX_INFLIGHT = 256 * 1024 * 1024
DEFAULT_GC_PAUSE_BODY = 256 * 1024  # a merge of even a small config; a probe or login is a few KB

IXR_CAPABILITIES = {
    "xmlrpc": {"specUrl": "http://www.xmlrpc.com/spec", "specVersion": 1},
    "faults_interop": {
        "specUrl": "http://xmlrpc-epi.sourceforge.net/specs/rfc.fault_codes.php",
        "specVersion": 20010516,
    },
    "system.multicall": {"specUrl": "http://www.xmlrpc.com/discuss/msgReader$1208", "specVersion": 1},
}


@dataclass(frozen=True)
class CallContext:
    """Who is calling: handlers use it for revision user names and logs."""

    username: str
    remote_addr: str
    # The request's Authorization header, for the lock-out guard (`lockout.guard_merge`): a merge
    # checks that these credentials still log in afterwards. Never printed (repr=False).
    authorization: str | None = field(default=None, repr=False, compare=False)
    allow_lockout: bool = False  # header protocol.ALLOW_LOCKOUT_HEADER: `sync --allow-lockout`
    confirm: str = ""  # header protocol.CONFIRM_HEADER ("<seconds> <id>"): `sync --confirm`
    # What a handler is done with but leaves to be freed once the reply is sent: freeing a 20 MB
    # merge's decoded payload, a million objects one by one, took ~20 ms the primary waited for.
    kept_until_sent: list[Any] = field(default_factory=list, repr=False, compare=False)
    # Work that may wait until the reply is out (and the request's body budget released): the
    # fast path's digests the primary needs not wait for. Runs in the request's thread once the
    # agent is quiet; each task gets a `pause` to call between its steps (`Activity.deferred`).
    after_reply: list[Callable[[Callable[[], None]], None]] = field(default_factory=list, repr=False,
                                                                     compare=False)


Handler = Callable[[Any, CallContext], Any]


@dataclass
class Dispatcher:
    """Method table with IXR's calling convention: one param is passed as is, else the list."""

    methods: dict[str, Handler] = field(default_factory=dict)

    def register(self, name: str, handler: Handler) -> None:
        self.methods[name] = handler

    def __post_init__(self) -> None:
        self.methods.setdefault("system.listMethods", lambda _a, _c: sorted(self.methods))
        self.methods.setdefault("system.getCapabilities", lambda _a, _c: IXR_CAPABILITIES)
        self.methods.setdefault("system.multicall", self._multicall)

    def call(self, method: str, params: list[Any], context: CallContext) -> Any:
        handler = self.methods.get(method)
        if handler is None:
            raise MethodFault(xmlrpc.UNKNOWN_METHOD, f"server error. requested method {method} does not exist.")
        argument: Any = params[0] if len(params) == 1 else params
        return handler(argument, context)

    def _multicall(self, calls: Any, context: CallContext) -> Any:
        if not isinstance(calls, list):
            raise MethodFault(xmlrpc.INVALID_PARAMS, "system.multicall expects an array of calls")
        results: list[Any] = []
        for call in calls:
            try:
                if not isinstance(call, dict) or not isinstance(call.get("methodName"), str):
                    raise MethodFault(xmlrpc.INVALID_PARAMS, "each call needs a methodName and params")
                if call["methodName"] == "system.multicall":
                    raise MethodFault(xmlrpc.NOT_METHOD_CALL, "Recursive calls to system.multicall are forbidden")
                params = call.get("params", [])
                if not isinstance(params, list):
                    params = [params]
                results.append([self.call(call["methodName"], params, context)])
            except Exception as exc:  # IXR answers each call of a multicall on its own
                fault = as_fault(exc, str(call.get("methodName")) if isinstance(call, dict) else "?", context)
                results.append({"faultCode": fault.code, "faultString": fault.message})
        return results


def as_fault(exc: Exception, method: str, context: CallContext) -> MethodFault:
    """The fault a failed handler answers with, logged once: what the caller can fix is a
    parameter fault with our message; anything unexpected stays internal (no traceback leaks)."""
    if isinstance(exc, MethodFault):
        return exc
    if isinstance(exc, MergeError | ServiceError):
        log.warning("%s from %s@%s failed: %s", method, context.username, context.remote_addr, exc)
        return MethodFault(xmlrpc.INVALID_PARAMS, str(exc))
    if isinstance(exc, HaError):
        log.error("%s from %s@%s failed: %s", method, context.username, context.remote_addr, exc)
        return MethodFault(xmlrpc.INTERNAL_ERROR, str(exc))
    log.exception("internal error in %s", method)
    return MethodFault(xmlrpc.INTERNAL_ERROR, f"server error. internal error in {method}")


class AuthOutcome(Protocol):
    """What an authenticator returns (hasync.auth.AuthResult has this shape)."""

    @property
    def ok(self) -> bool: ...

    @property
    def username(self) -> str: ...


AuthFunction = Callable[[str | None, str], AuthOutcome]


@dataclass(frozen=True)
class AuthVerdict:
    ok: bool
    username: str
    reason: str = ""


@dataclass
class AgentLimits:
    max_body: int = DEFAULT_MAX_BODY
    read_timeout: float = DEFAULT_READ_TIMEOUT
    body_deadline: float = DEFAULT_BODY_DEADLINE
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Request bodies being read or handled at once, in bytes. One request alone may always use up
    # to max_body; beyond that, concurrent bodies share this budget, so a few authenticated peers
    # cannot make the agent hold max_connections x max_body at the same time.
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    # Requests with a body at least this large (a merge of a config past a few MB) run with the
    # cyclic GC paused (`core.memory.gc_paused`); small ones, the probes and logins, never do.
    gc_pause_body: int = DEFAULT_GC_PAUSE_BODY


class BodyBudget:
    """Bytes of request bodies in flight, shared by all worker threads."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.used and self.used + size > self.limit:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class Activity:
    """Connections being served, so work that can wait (`CallContext.after_reply`) runs when the
    agent is quiet: the fast path's digests after a merge would otherwise compete for the GIL with
    the primary's next request (its filter reload: ten times slower beside them), which it waits
    for. The work runs in its own request's thread, so that connection does not count."""

    QUIET = 0.15  # seconds without another connection before deferred work starts or goes on
    LONGEST_WAIT = 3.0  # it starts (or goes on) anyway after this long

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._changed = threading.Condition()
        self._in_flight = 0  # connections, those running deferred work included
        self._running = 0  # connections running deferred work (`deferred`)
        self._last = clock()
        self._deferred = 0
        self.closing = False

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._changed:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._changed:
                self._in_flight -= 1
                self._last = self.clock()
                self._changed.notify_all()

    def defer(self) -> None:
        """A request whose reply is out has work for `deferred` (counted from now, for `settle`;
        and quiet is counted from now: the primary's next request comes right after this reply)."""
        with self._changed:
            self._deferred += 1
            self._last = self.clock()

    def _wait_quiet(self) -> None:
        """Holding `_changed`: until no other connection has been served for `QUIET` seconds."""
        deadline = self.clock() + self.LONGEST_WAIT
        while not self.closing:
            now = self.clock()
            quiet_for = now - self._last
            if now >= deadline or (self._in_flight == self._running and quiet_for >= self.QUIET):
                return
            self._changed.wait(min(deadline - now, max(self.QUIET - quiet_for, 0.01)))

    @contextlib.contextmanager
    def deferred(self) -> Iterator[Callable[[], None]]:
        """Around the work announced by `defer`, in a connection's thread: waits for quiet first,
        and gives the work a `pause` to call between its steps (it waits for quiet again)."""

        def pause() -> None:
            with self._changed:
                self._wait_quiet()

        with self._changed:
            self._running += 1
            self._wait_quiet()
        try:
            yield pause
        finally:
            with self._changed:
                self._running -= 1
                self._deferred -= 1
                self._changed.notify_all()

    def settle(self, timeout: float) -> bool:
        """Wait (at most `timeout`) until no deferred work is announced or running; whether so."""
        deadline = self.clock() + timeout
        with self._changed:
            while self._deferred and self.clock() < deadline:
                self._changed.wait(max(deadline - self.clock(), 0.01))
            return not self._deferred

    def close(self, timeout: float) -> None:
        """Deferred work starts at once from now on; wait (at most `timeout`) for it to end."""
        with self._changed:
            self.closing = True
            self._changed.notify_all()
        self.settle(timeout)


class AgentServer(ThreadingHTTPServer):
    """Threaded HTTP(S) server; the TLS handshake runs in the worker thread, not the accept loop."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        dispatcher: Dispatcher,
        authenticate: AuthFunction,
        *,
        tls: ssl.SSLContext | None,
        allow_loopback: bool,
        limits: AgentLimits | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.authenticate = authenticate
        self.tls = tls
        self.allow_loopback = allow_loopback
        self.limits = limits or AgentLimits()
        self.slots = threading.BoundedSemaphore(self.limits.max_connections)
        self.body_budget = BodyBudget(self.limits.max_inflight)
        self.activity = Activity()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, AgentRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        no_delay(sock)
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            log.warning("refusing connection from %s: %d connections busy", client_address[0],
                        self.limits.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            with self.activity.request():  # from the TLS handshake on
                super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def server_close(self) -> None:
        """Also lets deferred work (`CallContext.after_reply`) end: it runs at once now, and is
        waited for a bounded time (a stopping agent loses nothing by not finishing it)."""
        self.activity.close(timeout=30)
        super().server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake or a vanished peer is one log line (already written), not a traceback:
        a port scanner must not be able to flood the log. Anything else is a bug and gets the trace."""
        if isinstance(sys.exc_info()[1], (ssl.SSLError, OSError)):
            return
        log.exception("internal error serving %s", client_address[0])

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        scheme = "https" if self.tls else "http"
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"{scheme}://{shown}:{port}{XMLRPC_PATH}"


class _BodyLost(Exception):
    """A request body that did not arrive whole: nothing more is answered (or 408 already was)."""


class AgentRequestHandler(BaseHTTPRequestHandler):
    server: AgentServer
    protocol_version = "HTTP/1.0"
    server_version = "opnsense-ha"
    sys_version = ""

    _watchdog: threading.Timer | None = None

    def setup(self) -> None:
        # The socket timeout bounds each read; the watchdog bounds the whole phase, so a client
        # that trickles its handshake or request head one byte at a time cannot hold a thread.
        self._guard = threading.Lock()
        self.request.settimeout(self.server.limits.read_timeout)
        self._arm(self.server.limits.read_timeout, "TLS handshake and request head")
        if isinstance(self.request, ssl.SSLSocket):
            try:
                self.request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                self._disarm()  # finish() does not run when setup() fails
                log.info("TLS handshake with %s failed: %s", self.client_address[0], exc)
                raise
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            log.info("connection from %s dropped: %s", self.client_address[0], exc)

    def finish(self) -> None:
        self._disarm()
        super().finish()

    def _arm(self, seconds: float, phase: str) -> None:
        """Shut the socket down if `phase` is not over within `seconds` (blocked reads return)."""
        self._disarm()
        timer = threading.Timer(seconds, lambda: self._expired(timer, phase, seconds))
        timer.daemon = True
        with self._guard:
            self._watchdog = timer
        timer.start()

    def _disarm(self) -> None:
        with self._guard:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None

    def _expired(self, timer: threading.Timer, phase: str, seconds: float) -> None:
        with self._guard:  # never act on a socket whose phase already ended (or that was closed)
            if self._watchdog is not timer:
                return
            self._watchdog = None
            log.info("closing connection from %s: %s not received within %gs",
                     self.client_address[0], phase, seconds)
            with contextlib.suppress(OSError):  # the plain socket's shutdown: SSLSocket's is not thread-safe
                socket.socket.shutdown(self.request, socket.SHUT_RDWR)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)

    def _send(self, status: int, body: bytes, content_type: str = "text/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._disarm()
        self._send(405, b"XML-RPC server accepts POST requests only.", "text/plain")

    do_PUT = do_DELETE = do_HEAD = do_GET

    def _body_length(self) -> int | None:
        """The declared body length, or None once a request without a usable one is answered."""
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._send(411, b"chunked request bodies are not accepted; send Content-Length", "text/plain")
            return None
        try:
            length = int(length_text or "")
        except ValueError:
            self._send(411, b"Content-Length required", "text/plain")
            return None
        if length < 0 or length > self.server.limits.max_body:
            self._send(413, f"request body over {self.server.limits.max_body} bytes".encode(), "text/plain")
            return None
        return length

    def _body_pieces(self, length: int) -> Iterator[bytes]:
        """The body as it arrives, a read (at most 1 MiB) at a time, within the body deadline.

        Why pieces: the decoder parses each one as it comes (`xmlrpc.loads_request`), so the
        agent never holds a large body whole beside what it decodes to (a stock primary's
        request for a 20 MB config is 41 MB). Raises `_BodyLost` when the client goes away or
        the deadline passes (then answered with 408).
        """
        self._arm(self.server.limits.body_deadline, "request body")
        deadline = time.monotonic() + self.server.limits.body_deadline
        remaining = length
        while remaining > 0:
            if time.monotonic() > deadline:
                self._send(408, b"request body not received in time", "text/plain")
                raise _BodyLost
            chunk = self.rfile.read1(min(remaining, 1 << 20))
            if not chunk:
                raise _BodyLost  # client went away
            remaining -= len(chunk)
            yield chunk
        self._disarm()

    def do_POST(self) -> None:
        # A large request runs with the cyclic collector paused (`AgentLimits.gc_pause_body`), up
        # to the end of its work left for after the reply (`CallContext.after_reply`): that work
        # holds a million objects of the merge, which a collection in another request would walk.
        with contextlib.ExitStack() as paused:
            context = self._post(paused)
            if context is not None and context.after_reply:
                self.server.activity.defer()
                self._run_after_reply(context)

    def _post(self, paused: contextlib.ExitStack) -> CallContext | None:
        """Serve one request; its context, for the work left until the reply is out. `paused`
        receives the collector's pause of a large request."""
        self._disarm()  # the request head is in
        if self.path.split("?")[0] != XMLRPC_PATH:
            self._send(404, b"not found", "text/plain")
            return None
        remote = self.client_address[0]
        local = self.request.getsockname()[0]
        if not self.server.allow_loopback and remote == local:
            log.warning("refused request from %s: it is this server's own address (loop guard)", remote)
            self._send(200, xmlrpc.AUTH_FAILED_RESPONSE)
            return None
        # Credentials travel in the header: check them before reading the body, so an
        # unauthenticated (or throttled) client can never make us read up to the body limit.
        verdict = self.server.authenticate(self.headers.get("Authorization"), remote)
        if not verdict.ok:
            self._drain_small_body()
            self._send(200, xmlrpc.AUTH_FAILED_RESPONSE)
            return None
        size = self._declared_length()
        budget = self.server.body_budget
        if not budget.reserve(size):
            log.warning("refused a %d-byte request from %s: %d bytes of requests already in flight",
                        size, remote, budget.used)
            self._send(503, b"agent busy with other large requests; retry later", "text/plain")
            return None
        context: CallContext | None = None
        try:
            length = self._body_length()
            if length is None:
                return None
            context = CallContext(verdict.username, remote, self.headers.get("Authorization"),
                                  self.headers.get(ALLOW_LOCKOUT_HEADER, "").strip() == "1",
                                  self.headers.get(CONFIRM_HEADER, "").strip())
            if length >= self.server.limits.gc_pause_body:
                # (to the end of `do_POST`: work left for after the reply holds what it needs)
                paused.enter_context(gc_paused())
            try:
                request = self._decode(self._body_pieces(length))
            except _BodyLost:
                return None
            reply = request if isinstance(request, bytes) else self._dispatch(*request, context)
            self._send(200, reply)
            # Freed once the reply is out, and while the collector is still paused (back on,
            # its next pass would walk all of it first): the decoded request, and what the
            # handlers kept for now (`CallContext.kept_until_sent`).
            del request
            context.kept_until_sent.clear()
        finally:
            budget.release(size)
        return context

    def _run_after_reply(self, context: CallContext) -> None:
        """`CallContext.after_reply`, once the agent is quiet: each task once; a failure is
        logged (the reply is out)."""
        with self.server.activity.deferred() as pause:
            while context.after_reply:
                task = context.after_reply.pop(0)
                try:
                    task(pause)
                except Exception as exc:  # the type only: a message could quote a config value
                    log.warning("work after a reply failed (%s)", type(exc).__name__)

    def _declared_length(self) -> int:
        """Content-Length for budgeting (0 when absent or bad: `_body_length` refuses those)."""
        try:
            return max(0, min(int(self.headers.get("Content-Length") or "0"), self.server.limits.max_body))
        except ValueError:
            return 0

    def _drain_small_body(self) -> None:
        """Read (and drop) a small refused body so closing the socket does not reset the reply.

        A large one is left unread: the peer may then see a reset instead of the reply, which is
        acceptable for a client that is not allowed in anyway.
        """
        try:
            length = int(self.headers.get("Content-Length") or "0")
        except ValueError:
            return
        if 0 < length <= DRAIN_LIMIT:
            self._arm(self.server.limits.body_deadline, "refused request body")
            with contextlib.suppress(OSError):
                self.rfile.read(length)
            self._disarm()

    @staticmethod
    def _decode(pieces: Iterator[bytes]) -> tuple[str, list[Any]] | bytes:
        """The request's method and params, or the fault to answer. A body refused before its
        end is still read to the end: answering first would have the client's send reset."""
        try:
            return xmlrpc.loads_request(pieces)
        except xmlrpc.XmlRpcDecodeError as exc:
            for _rest in pieces:
                pass
            return xmlrpc.dumps_fault(exc.code, str(exc))

    def _dispatch(self, method: str, params: list[Any], context: CallContext) -> bytes:
        try:
            result = self.server.dispatcher.call(method, params, context)
            return xmlrpc.dumps_response(result)
        except Exception as exc:
            fault = as_fault(exc, method, context)
            return xmlrpc.dumps_fault(fault.code, fault.message)


def run_until_signalled(server: AgentServer, on_ready: Callable[[], None] | None = None) -> None:
    """Serve in the foreground; SIGTERM/SIGINT stop the loop cleanly and close the socket.

    The handlers are installed before `on_ready` announces the agent, so a supervisor that
    signals as soon as it sees the announcement always gets a clean stop.
    """
    # The handler runs in the main thread between two bytecodes, possibly while that thread holds
    # a lock; so it only appends to a list. (It used to call Event.set() on the Event the loop waits
    # on: a signal arriving inside Event.wait() then blocked forever on the Event's own lock, and
    # the agent ignored SIGTERM; seen once in the suite, a py-spy stack showed it.)
    stop_requested: list[int] = []

    def _stop(signum: int, _frame: object) -> None:
        stop_requested.append(signum)

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    log.info("agent listening on %s", server.url)
    if on_ready is not None:
        on_ready()
    try:
        while not stop_requested and thread.is_alive():
            time.sleep(0.2)
    finally:
        server.shutdown()
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        log.info("agent stopped")


def load_state_dir(state_dir: str | Path) -> Path:
    path = Path(state_dir)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
