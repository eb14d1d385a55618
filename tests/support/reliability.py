"""Plumbing for the reliability and security tests: a real agent *process*, raw HTTP, /proc probes.

The crash, hostile-input and secrets tests need what an in-thread agent cannot give: a process
that can be SIGKILLed, whose memory can be read from /proc, and whose stderr is a separate
stream. Everything here talks to that process over real loopback sockets.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import hashlib
import os
import re
import select
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

from hasync.config.store import ConfigStore

PYTHON = sys.executable
_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _reap_leftovers() -> None:
    """Safety net: an agent a failed test did not stop must not outlive the test run."""
    for process in _STARTED:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
_LISTEN_RE = re.compile(rb"listening on (https?)://127\.0\.0\.1:(\d+)/xmlrpc\.php")
HISTORY_RE = re.compile(r"^config-\d+\.\d{4}\.xml$")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def php_bcrypt(password: str, cost: int = 4) -> str:
    """A `$2y$` hash as PHP's password_hash() writes it. Cost 4 keeps 10k fuzz logins cheap."""
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode("ascii")
    return "$2y$" + hashed[4:]


def set_user_password(conf_dir: Path, username: str, password: str, cost: int = 4) -> None:
    """Give `username` in conf_dir's config.xml a new bcrypt password (both nodes need it when users sync)."""
    with ConfigStore(conf_dir).transaction(f"test: password of {username}") as root:
        for user in root.iterfind("system/user"):
            if user.findtext("name") == username:
                node = user.find("password")
                assert node is not None
                node.text = php_bcrypt(password, cost)
                return
        raise AssertionError(f"no user {username} in {conf_dir}")


def set_backupcount(conf_dir: Path, count: int) -> None:
    with ConfigStore(conf_dir).transaction("test: history size") as root:
        node = root.find("system/backupcount")
        assert node is not None
        node.text = str(count)


def history_files(conf_dir: Path) -> dict[str, str]:
    """name -> sha256 of every history file of a conf dir."""
    backup = conf_dir / "backup"
    if not backup.is_dir():
        return {}
    return {p.name: sha256(p.read_bytes()) for p in backup.iterdir() if HISTORY_RE.match(p.name)}


def leftovers(conf_dir: Path) -> list[str]:
    """Files a crashed writer could leave: anything in backup/ that is not a history file, and
    hidden or *.tmp files next to config.xml."""
    found: list[str] = []
    backup = conf_dir / "backup"
    if backup.is_dir():
        found += [f"backup/{p.name}" for p in backup.iterdir() if not HISTORY_RE.match(p.name)]
    found += [p.name for p in conf_dir.iterdir()
              if p.is_file() and (p.name.startswith(".") or p.name.endswith(".tmp"))]
    return sorted(found)


# --------------------------------------------------------------------------------------------
# the agent as a separate process
# --------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM/Threads of a process, in KiB (Threads as a count)."""
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                values[key] = int(rest.split()[0])
    return values


@dataclass
class AgentProcess:
    """`python -m hasync --conf-dir X serve ...` on 127.0.0.1:<ephemeral>, stderr kept in a file."""

    conf_dir: Path
    state_dir: Path
    services_dir: Path
    log_path: Path
    tls: tuple[Path, Path] | None = None
    extra: list[str] = field(default_factory=list)
    verbose: bool = False
    prefix: list[str] = field(default_factory=list)  # e.g. a namespace wrapper that execs the agent
    process: subprocess.Popen[bytes] | None = None
    scheme: str = ""
    port: int = 0
    starts: int = 0

    def argv(self) -> list[str]:
        argv = [*self.prefix, PYTHON, "-m", "hasync", "--conf-dir", str(self.conf_dir)]
        if self.verbose:
            argv.append("-v")
        argv += ["serve", "--listen", "127.0.0.1:0", "--allow-loopback",
                 "--services-dir", str(self.services_dir), "--state-dir", str(self.state_dir)]
        if self.tls is None:
            argv.append("--plain-http")
        else:
            argv += ["--tls-cert", str(self.tls[0]), "--tls-key", str(self.tls[1])]
        return argv + self.extra

    def start(self, timeout: float = 20.0) -> AgentProcess:
        env = dict(os.environ, OPNSENSE_HA_FAILOVER="none", PYTHONUNBUFFERED="1")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=log, env=env)
        _STARTED.append(self.process)
        self.starts += 1
        assert self.process.stdout is not None
        line = _readline(self.process.stdout, timeout)
        match = _LISTEN_RE.search(line)
        if match is None:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"agent did not start: {line!r}; log:\n{self.log_path.read_text()[-3000:]}")
        self.scheme, self.port = match.group(1).decode(), int(match.group(2))
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL and reap: no cleanup code of the agent runs."""
        if self.process is None:
            return
        self.process.kill()  # Popen never signals a process it has already reaped
        self.process.wait(timeout=10)
        self._close()

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._close()

    def _close(self) -> None:
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _readline(stream: object, timeout: float) -> bytes:
    fd = stream.fileno()  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


@contextlib.contextmanager
def agent_process(**kwargs: object) -> Iterator[AgentProcess]:
    agent = AgentProcess(**kwargs).start()  # type: ignore[arg-type]
    try:
        yield agent
    finally:
        agent.stop()


# --------------------------------------------------------------------------------------------
# raw HTTP, one request per connection (the agent speaks HTTP/1.0 and closes)
# --------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    body: bytes
    seconds: float
    error: str = ""


def raw_request(
    port: int,
    body: bytes,
    *,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    path: str = "/xmlrpc.php",
    timeout: float = 30.0,
    tls: ssl.SSLContext | None = None,
    content_length: int | None = None,
    source: str | None = None,
) -> RawResponse:
    """Send one request and read the reply until EOF. `content_length` may lie on purpose (-1: no
    header). `source` binds another loopback address (127.0.0.0/8), which the agent's per-address
    login throttle counts separately."""
    started = time.monotonic()
    head = [f"{method} {path} HTTP/1.0", "Host: 127.0.0.1", "Content-Type: text/xml"]
    if content_length is None:
        content_length = len(body)
    if content_length >= 0:
        head.append(f"Content-Length: {content_length}")
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    try:
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="127.0.0.1")
        error = ""
        try:
            sock.sendall(request)
        except (BrokenPipeError, ConnectionResetError) as exc:
            error = f"send: {exc}"  # the server answered and closed before taking everything
        chunks: list[bytes] = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except (ConnectionResetError, ssl.SSLError) as exc:
            error = error or f"recv: {exc}"
    finally:
        sock.close()
    data = b"".join(chunks)
    status = 0
    head_end = data.find(b"\r\n\r\n")
    if data.startswith(b"HTTP/") and head_end > 0:
        status = int(data.split(b" ", 2)[1])
        data = data[head_end + 4:]
    return RawResponse(status, data, time.monotonic() - started, error)


def client_tls_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --------------------------------------------------------------------------------------------
# inotify: react to the agent's file writes the moment they happen
# --------------------------------------------------------------------------------------------

IN_MODIFY = 0x002
IN_CREATE = 0x100
IN_MOVED_TO = 0x080
_libc = ctypes.CDLL(None, use_errno=True)


class DirWatch:
    """Minimal inotify on one directory: `wait(timeout)` returns (mask, name) events."""

    def __init__(self, path: Path, mask: int = IN_CREATE | IN_MOVED_TO | IN_MODIFY) -> None:
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(self.fd, str(path).encode(), mask) < 0:
            os.close(self.fd)
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

    def wait(self, timeout: float) -> list[tuple[int, str]]:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        events: list[tuple[int, str]] = []
        offset = 0
        while offset + 16 <= len(data):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
            name = data[offset + 16: offset + 16 + length].rstrip(b"\0").decode(errors="replace")
            events.append((mask, name))
            offset += 16 + length
        return events

    def close(self) -> None:
        os.close(self.fd)
