"""XML-RPC client for the primary side: talks to any OPNsense backup (or our agent).

What OPNsense's PHP client lacks and an admin needs: a connect timeout and a hard total deadline
(a stalled or trickling peer cannot hang the primary, issue #3635), bounded retries with backoff
for connection errors only, trust on first use of the backup's certificate when `verifypeer` is
off, and errors that name the cause (unreachable, TLS mismatch, bad credentials, fault text).
The password only ever lives in memory and in the Authorization header.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hasync.core.errors import AuthError, HaError, RemoteFault, TransportError
from hasync.core.fileio import atomic_write
from hasync.core.osiface import Clock, SystemClock
from hasync.wire import xmlrpc
from hasync.wire.protocol import no_delay
from hasync.wire.tls import MIN_TLS, fingerprint

log = logging.getLogger("hasync.client")

DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_TOTAL_TIMEOUT = 240.0
DEFAULT_RETRIES = 2
XMLRPC_PRIVILEGE = "page-xmlrpclibrary"


_PLAIN_USER = re.compile(r"[A-Za-z0-9._@-]{1,32}")


def shown_user(name: str) -> str:
    """How a configured sync user name appears in messages, logs and JSON.

    An OPNsense user name is short and plain. Anything else is an API key (half a credential; the
    agent logs only its start too) or a secret pasted into the user field, which must not end up
    in syslog or on a status page: it shows as its first 4 characters and its length.
    """
    if _PLAIN_USER.fullmatch(name):
        return name
    return f"{name[:4]}... ({len(name)} characters)"


def target_url(synchronizetoip: str, gui_protocol: str = "https", gui_port: str = "") -> str:
    """The backup's XML-RPC URL by OPNsense's rules (reference §3)."""
    target = synchronizetoip.strip()
    if not target:
        raise HaError("hasync.synchronizetoip is empty: set the backup's address under System > High Availability")
    if target.lower().startswith("http"):
        return target.rstrip("/") + "/xmlrpc.php"
    host = target.strip("[]")
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    protocol = gui_protocol.strip() or "https"
    port = f":{gui_port.strip()}" if gui_port.strip() else ""
    return f"{protocol}://{host}{port}/xmlrpc.php"


class TrustStore:
    """TOFU pins: one SHA-256 certificate fingerprint per backup host:port, in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise HaError(
                f"{self.path}: unreadable trust store ({exc}); fix it or run `opnsense-ha trust --reset`"
            ) from None
        return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}

    def pins(self) -> dict[str, str]:
        """Every pinned peer (host:port) with its fingerprint."""
        return self._read()

    def get(self, peer: str) -> str | None:
        return self._read().get(peer)

    def pin(self, peer: str, fp: str) -> None:
        pins = self._read()
        pins[peer] = fp
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.path, json.dumps(pins, indent=2, sort_keys=True) + "\n", mode=0o600)

    def reset(self, peer: str | None = None) -> int:
        pins = self._read()
        removed = len(pins) if peer is None else int(peer in pins)
        if peer is None:
            pins = {}
        else:
            pins.pop(peer, None)
        if self.path.exists() or pins:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.path, json.dumps(pins, indent=2, sort_keys=True) + "\n", mode=0o600)
        return removed


class ClientOptions:
    """Deadlines, retries and peer verification of one client (the sync's `--timeout` etc.; a
    plain class, see `hasync`)."""

    def __init__(self, *, connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 total_timeout: float = DEFAULT_TOTAL_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 backoff: float = 1.0, verify_peer: bool = False, ca_file: str | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.total_timeout = total_timeout
        self.retries = retries
        self.backoff = backoff
        self.verify_peer = verify_peer
        self.ca_file = ca_file


class PeerClient:
    """One backup endpoint. Each `call` is one HTTP request under the client's deadline."""

    def __init__(
        self,
        url: str,
        username: str,
        password: str,
        options: ClientOptions | None = None,
        trust: TrustStore | None = None,
        clock: Clock | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise HaError(f"backup URL {url!r} is not an http(s) URL")
        self.url = url
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.path = parts.path or "/xmlrpc.php"
        self.username = username or "root"
        self._auth_header = "Basic " + base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
        self.options = options or ClientOptions()
        self.trust = trust
        self.clock = clock or SystemClock()
        self.peer_key = f"{self.host}:{self.port}"
        self.bytes_sent = 0
        self.bytes_received = 0
        self.extra_headers: dict[str, str] = {}  # e.g. the agent's allow-lockout header (no secrets)

    def __repr__(self) -> str:
        return f"PeerClient({self.url!r}, user={shown_user(self.username)!r})"

    # --- TLS ----------------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = MIN_TLS
        if self.options.verify_peer:
            context.check_hostname = True
            context.verify_mode = ssl.CERT_REQUIRED
            if self.options.ca_file:
                context.load_verify_locations(self.options.ca_file)
            else:
                context.load_default_certs()
        else:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _check_pin(self, sock: ssl.SSLSocket) -> str:
        der = sock.getpeercert(binary_form=True)
        if der is None:
            raise TransportError(f"{self.peer_key} presented no TLS certificate")
        fp = fingerprint(der)
        if self.trust is not None and not self.options.verify_peer:
            pinned = self.trust.get(self.peer_key)
            if pinned is not None and pinned != fp:
                raise TransportError(
                    f"TLS certificate of {self.peer_key} changed: pinned {pinned}, got {fp}. If the backup's "
                    "certificate was replaced on purpose, run `opnsense-ha trust --reset` and sync again."
                )
        return fp

    # --- one request --------------------------------------------------------------------------

    def _connect(self, deadline: float) -> http.client.HTTPConnection:
        timeout = max(0.1, min(self.options.connect_timeout, deadline - self.clock.monotonic()))
        conn: http.client.HTTPConnection
        if self.scheme == "https":
            conn = http.client.HTTPSConnection(self.host, self.port, timeout=timeout, context=self._tls_context())
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        conn.connect()
        if conn.sock is not None:
            no_delay(conn.sock)
        return conn

    def call(self, method: str, params: list[Any] | None = None, *,
             while_waiting: Callable[[], None] | None = None) -> Any:
        """Call `method`; retries connection failures only, never a request the peer received.

        `while_waiting` runs once the request is sent, before the reply is read: work that does
        not need the reply overlaps the peer's (its bcrypt login, its merge). It runs in this
        thread on purpose: in a second thread it would hold the GIL while this one connects,
        shakes hands and sends, and each of those waits up to the switch interval to get it back
        (~25 ms of a 2 MB sync measured). It must not raise: its error would cost the reply.
        """
        body = xmlrpc.dumps_request(method, params or [])
        deadline = self.clock.monotonic() + self.options.total_timeout
        attempt = 0
        while True:
            try:
                conn = self._connect(deadline)
                break
            except ssl.SSLError as exc:
                raise TransportError(f"TLS handshake with {self.peer_key} failed: {exc.reason or exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                attempt += 1
                wait = self.options.backoff * (2 ** (attempt - 1))
                if attempt > self.options.retries or self.clock.monotonic() + wait >= deadline:
                    raise TransportError(
                        f"fetch error. remote host down? ({self.url}: {_describe(exc)}, "
                        f"{attempt} attempt{'s' if attempt > 1 else ''})"
                    ) from None
                log.info("connecting to %s failed (%s); retrying in %.1fs", self.peer_key, _describe(exc), wait)
                self.clock.sleep(wait)
        try:
            return self._exchange(conn, method, body, deadline, while_waiting)
        finally:
            conn.close()

    def _exchange(self, conn: http.client.HTTPConnection, method: str, body: bytes, deadline: float,
                  while_waiting: Callable[[], None] | None = None) -> Any:
        sock = conn.sock
        fp = None
        if isinstance(sock, ssl.SSLSocket):
            fp = self._check_pin(sock)
        if sock is not None:
            # The connect timeout bounded connecting; from here on only the total deadline counts,
            # or a backup that takes longer than the connect timeout to merge or reload its filter
            # would fail with "timed out" long before the deadline.
            sock.settimeout(max(0.1, deadline - self.clock.monotonic()))
        fired = threading.Event()  # the deadline cut the exchange: whatever was read is not a reply

        def abort() -> None:
            fired.set()
            _abort_socket(sock)

        watchdog = threading.Timer(max(0.0, deadline - self.clock.monotonic()), abort)
        watchdog.daemon = True
        watchdog.start()
        stalled = TransportError(
            f"{self.peer_key} did not answer {method} within {self.options.total_timeout:g}s (peer stalled or too slow)"
        )

        def broken(exc: BaseException) -> TransportError:
            if fired.is_set() or self.clock.monotonic() >= deadline - 0.05:
                return stalled
            return TransportError(f"connection to {self.peer_key} broke during {method}: {_describe(exc)}")

        try:
            try:
                conn.putrequest("POST", self.path, skip_accept_encoding=True)
                conn.putheader("User-Agent", "XML_RPC")
                conn.putheader("Content-Type", "text/xml")
                conn.putheader("Content-Length", str(len(body)))
                conn.putheader("Authorization", self._auth_header)
                for name, value in self.extra_headers.items():
                    conn.putheader(name, value)
                conn.endheaders()
                conn.send(body)
                self.bytes_sent += len(body)
            except (OSError, http.client.HTTPException) as exc:
                raise broken(exc) from None
            if while_waiting is not None:
                while_waiting()
            try:
                response = conn.getresponse()
                data = _read_all(response)
                self.bytes_received += len(data)
            except (OSError, http.client.HTTPException) as exc:
                raise broken(exc) from None
        finally:
            watchdog.cancel()
        if fired.is_set():  # cut in the headers: http.client takes a cut-off head for a complete one
            raise stalled
        if response.status != 200:
            raise TransportError(f"{self.url} answered HTTP {response.status} {response.reason} to {method}")
        try:
            value = xmlrpc.loads_response(data)
        except xmlrpc.Fault as fault:
            raise RemoteFault(fault.code, fault.message) from None
        except xmlrpc.XmlRpcDecodeError as exc:
            raise TransportError(f"parse error. not well formed reply from {self.peer_key}: {exc}") from None
        if value == xmlrpc.AUTH_FAILED_TEXT:
            raise AuthError(
                f"Authentication failed on {self.peer_key} for user {shown_user(self.username)!r}: check "
                f"hasync.username/password, and that the user has the privilege '{XMLRPC_PRIVILEGE}' "
                "(XMLRPC Library) or 'page-all' on the backup"
            )
        if fp is not None and self.trust is not None and not self.options.verify_peer and \
                self.trust.get(self.peer_key) is None:
            self.trust.pin(self.peer_key, fp)
            log.info("pinned TLS certificate of %s: %s", self.peer_key, fp)
        return value


def _read_all(response: http.client.HTTPResponse, limit: int = 512 * 1024 * 1024) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = response.read1(1 << 20)
        if not chunk:
            if response.length:  # read1 reports a cut-off reply as a plain end: say what it is
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise http.client.HTTPException(f"reply larger than {limit} bytes")
        chunks.append(chunk)


def _abort_socket(sock: socket.socket | None) -> None:
    """Deadline passed: shut the socket so the blocked read returns at once."""
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host ({exc.strerror})"
    if isinstance(exc, http.client.IncompleteRead):
        return f"reply cut short after {len(exc.partial)} bytes, {exc.expected} missing"
    text = str(exc) or type(exc).__name__
    return text
