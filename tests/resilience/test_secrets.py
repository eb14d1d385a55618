"""Authentication hardening: constant-time checks, per-address throttling with syslog lines,
TLS 1.2 minimum, and no password or API secret in argv, logs, exceptions or JSON output.

Timing is never measured (no timing assertions in tests). Constant time is proven by what the
code *does*: which comparisons it calls, how many bcrypt verifications an attempt costs, and a
scan of auth.py for plain `==` on secrets.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt
import pytest
from lxml import etree
from passlib.hash import sha512_crypt

from hasync.agent import auth
from hasync.agent.auth import Credentials, find_api_key, verify_credentials
from hasync.config.items import SyncItemRegistry
from hasync.config.store import ConfigStore
from hasync.core.errors import AuthError, HaError
from hasync.sync.run import SyncOptions, SyncRun
from hasync.wire import xmlrpc
from hasync.wire.client import ClientOptions, PeerClient
from hasync.wire.tls import MIN_TLS, server_context
from support.nodes import SYNC_USER, Pair, make_pair
from support.reliability import AgentProcess, basic, client_tls_context, php_bcrypt, raw_request

AUTH_PY = Path(auth.__file__)
ENV = dict(os.environ, OPNSENSE_HA_FAILOVER="none", PYTHONUNBUFFERED="1")


# --------------------------------------------------------------------------------------------
# constant time, by construction
# --------------------------------------------------------------------------------------------

SECRETISH = ("password", "secret", "hash", "stored", "presented", "digest", "credential")


def test_auth_py_never_compares_secrets_with_plain_operators() -> None:
    """`==`, `!=`, `in` on anything secret-looking would stop at the first differing byte."""
    tree = ast.parse(AUTH_PY.read_text())
    offending = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        if not any(isinstance(op, ast.Eq | ast.NotEq | ast.In | ast.NotIn) for op in node.ops):
            continue
        mentioned = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
        mentioned |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
        if any(word in name.lower() for name in mentioned for word in SECRETISH):
            offending.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offending, offending


def _root_with_keys(count: int) -> etree._Element:
    root = etree.fromstring("<opnsense><system/></opnsense>")
    system = root.find("system")
    assert system is not None
    for n in range(count):
        user = etree.SubElement(system, "user")
        etree.SubElement(user, "name").text = f"user{n}"
        etree.SubElement(user, "apikeys").text = f"KEY{n:04d}{'x' * 70}|$6$salt$hash{n}"
    return root


@pytest.mark.parametrize("position", [0, 7, 15, None])
def test_api_key_lookup_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch,
                                                            position: int | None) -> None:
    """The match position (or no match) does not change the work: every stored key goes through
    hmac.compare_digest once."""
    root = _root_with_keys(16)
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    presented = f"KEY{position:04d}{'x' * 70}" if position is not None else "NOPE" + "x" * 73
    hit = find_api_key(root, presented)
    assert (hit is not None) == (position is not None)
    assert len(calls) == 16


def _counting_bcrypt(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    seen: list[bytes] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        seen.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(auth.bcrypt, "checkpw", spy)
    return seen


def _account_root(**extra: str) -> etree._Element:
    root = etree.fromstring("<opnsense><system><group><name>g</name><member>7</member>"
                            "<priv>page-xmlrpclibrary</priv></group></system></opnsense>")
    system = root.find("system")
    assert system is not None
    user = etree.SubElement(system, "user")
    for tag, text in {"name": "alice", "uid": "7", "password": php_bcrypt("right-password"), **extra}.items():
        etree.SubElement(user, tag).text = text
    return root


def test_unknown_user_costs_one_bcrypt_like_a_wrong_password(monkeypatch: pytest.MonkeyPatch) -> None:
    root = _account_root()
    seen = _counting_bcrypt(monkeypatch)
    assert verify_credentials(root, "nobody", "guess", now=time.time()).reason == auth.REASON_UNKNOWN_USER
    unknown = list(seen)
    seen.clear()
    assert verify_credentials(root, "alice", "guess", now=time.time()).reason == auth.REASON_BAD_PASSWORD
    assert len(unknown) == len(seen) == 1
    assert unknown[0] == auth._DUMMY_BCRYPT  # a real hash of the same cost, not a shortcut
    assert unknown[0][:7] == b"$2b$10$"


@pytest.mark.parametrize("state", [{"disabled": "1"}, {"expires": "01/01/2000"}, {"uid": "8"}])
def test_refused_account_always_pays_a_full_verify(monkeypatch: pytest.MonkeyPatch, state: dict[str, str]) -> None:
    """A correct password for a disabled, expired or unprivileged account costs exactly what a
    wrong guess costs, every time: a cache of earlier successes must not make the second try
    faster, or timing would confirm the password of an account that may work elsewhere (GUI)."""
    good = _account_root()
    refused = _account_root(**state)
    seen = _counting_bcrypt(monkeypatch)
    assert verify_credentials(good, "alice", "right-password", now=time.time()).ok
    for attempt in range(3):
        seen.clear()
        result = verify_credentials(refused, "alice", "right-password", now=time.time())
        assert not result.ok and result.reason != auth.REASON_BAD_PASSWORD
        assert len(seen) == 1, f"attempt {attempt}: {len(seen)} bcrypt verifications instead of 1"
    seen.clear()
    verify_credentials(refused, "alice", "wrong-password", now=time.time())
    assert len(seen) == 1


def test_credentials_never_show_the_password() -> None:
    creds = Credentials("alice", "s3cret-value")
    assert "s3cret-value" not in repr(creds) and "s3cret-value" not in str(creds)
    client = PeerClient("https://127.0.0.1:1/xmlrpc.php", "alice", "s3cret-value")
    assert "s3cret-value" not in repr(client)


# --------------------------------------------------------------------------------------------
# a pair with a known password and a known API key/secret
# --------------------------------------------------------------------------------------------


@dataclass
class Secrets:
    pair: Pair
    password: str
    api_key: str
    api_secret: str
    tmp: Path
    texts: dict[str, str] = field(default_factory=dict)

    def needles(self) -> dict[str, str]:
        """What must never be seen, including the Authorization header forms."""
        return {
            "password": self.password,
            "api secret": self.api_secret,
            "basic(password)": base64.b64encode(f"{SYNC_USER}:{self.password}".encode()).decode(),
            "basic(secret)": base64.b64encode(f"{self.api_key}:{self.api_secret}".encode()).decode(),
        }

    def leaks(self) -> list[str]:
        return [f"{what} in {where}" for where, text in self.texts.items()
                for what, needle in self.needles().items() if needle in text]


def set_credentials(conf_dir: Path, username: str, password: str) -> None:
    with ConfigStore(conf_dir).transaction("test: sync credentials") as root:
        for tag, text in (("username", username), ("password", password)):
            node = root.find(f"hasync/{tag}")
            assert node is not None
            node.text = text


def give_hasync_user(conf_dir: Path, password: str, api_key: str, api_secret: str) -> None:
    with ConfigStore(conf_dir).transaction("test: sync account") as root:
        user = next(u for u in root.iterfind("system/user") if u.findtext("name") == SYNC_USER)
        node = user.find("password")
        assert node is not None
        node.text = php_bcrypt(password)
        keys = user.find("apikeys")
        if keys is None:
            keys = etree.SubElement(user, "apikeys")
        keys.text = f"{api_key}|{sha512_crypt.using(rounds=5000).hash(api_secret)}"


@pytest.fixture
def known(tmp_path: Path) -> Secrets:
    pair = make_pair(tmp_path)
    made = Secrets(pair, "pw-" + secrets.token_urlsafe(18), secrets.token_urlsafe(60),
                   "sec-" + secrets.token_urlsafe(40), tmp_path)
    for node in (pair.primary, pair.backup):  # users sync: both nodes carry the account
        give_hasync_user(node, made.password, made.api_key, made.api_secret)
    set_credentials(pair.primary, SYNC_USER, made.password)
    return made


# --------------------------------------------------------------------------------------------
# syslog: the agent process in a mount namespace where /dev/log is our datagram socket
# --------------------------------------------------------------------------------------------


class SyslogSink:
    """A unix datagram socket collecting syslog lines."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.lines.append(self.sock.recv(65536).decode(errors="replace"))
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=2)
        self.sock.close()


def syslog_namespace(tmp: Path, socket_path: Path) -> list[str] | None:
    """argv prefix that runs a command with a private /dev whose `log` is `socket_path`.

    Needs root and mount namespaces; None when they are not available (the test then says so).
    """
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    dev = tmp / "dev"
    dev.mkdir()
    try:
        for name, minor in (("null", 3), ("zero", 5), ("random", 8), ("urandom", 9)):
            os.mknod(dev / name, 0o666 | 0o020000, os.makedev(1, minor))
            os.chmod(dev / name, 0o666)
    except OSError:
        return None
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2"), ("log", str(socket_path))):
        os.symlink(target, dev / name)
    prefix = ["unshare", "-m", "--propagation", "private", "sh", "-c", 'mount --bind "$0" /dev && exec "$@"',
              str(dev)]
    probe = subprocess.run([*prefix, "test", "-S", "/dev/log"], capture_output=True, timeout=10)
    return prefix if probe.returncode == 0 else None


@contextlib.contextmanager
def agent_with_syslog(made: Secrets, **kwargs: object) -> Iterator[tuple[AgentProcess, SyslogSink | None]]:
    services = made.tmp / "services-none"
    services.mkdir(exist_ok=True)
    sink_path = made.tmp / "syslog.sock"
    sink = SyslogSink(sink_path)
    prefix = syslog_namespace(made.tmp, sink_path)
    agent = AgentProcess(made.pair.backup, made.tmp / "agent-state", services, made.tmp / "agent.log",
                         tls=(made.pair.cert_file, made.pair.key_file), verbose=True, **kwargs)  # type: ignore[arg-type]
    if prefix is not None:
        agent.prefix = prefix
    agent.start()
    try:
        yield agent, (sink if prefix is not None else None)
    finally:
        agent.stop()
        sink.close()


def test_throttle_over_the_wire_per_source_address_with_syslog_lines(known: Secrets) -> None:
    with agent_with_syslog(known) as (agent, syslog):
        tls = client_tls_context()
        probe = xmlrpc.dumps_request("opnsense.firmware_version", [])

        def attempt(source: str, password: str) -> bool:
            reply = raw_request(agent.port, probe, headers={"Authorization": basic(SYNC_USER, password)},
                                tls=tls, source=source)
            assert reply.status == 200
            return reply.body != xmlrpc.AUTH_FAILED_RESPONSE

        assert attempt("127.0.0.3", known.password)  # control: the right password works from here
        for _ in range(5):
            assert not attempt("127.0.0.3", "wrong-" + secrets.token_hex(4))
        assert not attempt("127.0.0.3", known.password), "the right password got in while throttled"
        assert attempt("127.0.0.4", known.password), "another address was throttled too"
        time.sleep(0.3)
        log = agent.log_text()
        failures = [line for line in log.splitlines() if "authentication error for 'hasync' from 127.0.0.3" in line]
        throttled = [line for line in log.splitlines()
                     if "authentication refused for 'hasync' from 127.0.0.3: throttled" in line]
        assert len(failures) == 5 and "bad password (5 of 5" in failures[-1]
        assert len(throttled) == 1
        assert "127.0.0.4" not in "".join(failures + throttled)
        if syslog is None:
            pytest.skip("no mount namespace here: the lines were checked on the agent's stderr only")
        lines = [line for line in syslog.lines if "127.0.0.3" in line]
        assert any("throttled" in line for line in lines), syslog.lines
        assert sum("authentication error for 'hasync'" in line for line in lines) == 5
        assert all(line.startswith("<") and f"opnsense-ha[{agent.pid}]: " in line for line in lines)
        known.texts["syslog"] = "\n".join(syslog.lines)
        assert not known.leaks()


# --------------------------------------------------------------------------------------------
# TLS 1.2 minimum
# --------------------------------------------------------------------------------------------


def _old_client() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def _handshake(port: int, context: ssl.SSLContext) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, \
            context.wrap_socket(sock, server_hostname="127.0.0.1") as tls:
        return str(tls.version())


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_agent_refuses_tls_below_1_2(known: Secrets) -> None:
    assert server_context(known.pair.cert_file, known.pair.key_file).minimum_version == ssl.TLSVersion.TLSv1_2
    assert ssl.TLSVersion.TLSv1_2 == MIN_TLS
    # Control: can this OpenSSL speak TLS 1.1 at all? Try against a deliberately permissive server.
    permissive = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    permissive.minimum_version = ssl.TLSVersion.TLSv1
    permissive.set_ciphers("DEFAULT:@SECLEVEL=0")
    permissive.load_cert_chain(str(known.pair.cert_file), str(known.pair.key_file))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve_once() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), permissive.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    server = threading.Thread(target=serve_once, daemon=True)
    server.start()
    try:
        spoken = _handshake(int(listener.getsockname()[1]), _old_client())
    except ssl.SSLError as exc:
        spoken = ""
        reason = str(exc)
    finally:
        server.join(timeout=5)
        listener.close()
    if spoken != "TLSv1.1":
        pytest.skip(f"this OpenSSL cannot build a TLS 1.1 client at all ({spoken or reason}); "
                    "the agent's context minimum (TLS 1.2) was checked above")
    with agent_with_syslog(known) as (agent, _syslog):
        with pytest.raises(ssl.SSLError, match=r"(?i)protocol|version|alert"):
            _handshake(agent.port, _old_client())
        modern = client_tls_context()
        modern.maximum_version = ssl.TLSVersion.TLSv1_2
        assert _handshake(agent.port, modern) == "TLSv1.2"
        assert agent.alive()


# --------------------------------------------------------------------------------------------
# no secret in argv, logs, exceptions, JSON
# --------------------------------------------------------------------------------------------


class ProcSampler:
    """Reads /proc/*/cmdline (and environ where readable) of every process, over and over."""

    def __init__(self) -> None:
        self.seen: dict[int, str] = {}
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcSampler:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stop.is_set():
            for entry in os.scandir("/proc"):
                if not entry.name.isdigit():
                    continue
                text = ""
                for part in ("cmdline", "environ"):
                    with contextlib.suppress(OSError), open(f"/proc/{entry.name}/{part}", "rb") as handle:
                        text += handle.read().replace(b"\0", b" ").decode(errors="replace") + "\n"
                if text:
                    self.seen[int(entry.name)] = self.seen.get(int(entry.name), "") + text
            self.samples += 1
            time.sleep(0.002)

    def text(self) -> str:
        return "\n".join(self.seen.values())


def cli(made: Secrets, *args: str, label: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "hasync", "-v", "--conf-dir", str(made.pair.primary), *args]
    done = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=timeout)
    made.texts[f"{label} stdout"] = done.stdout
    made.texts[f"{label} stderr"] = done.stderr
    return done


def point(primary: Path, url: str) -> None:
    with ConfigStore(primary).transaction("test: sync target") as root:
        node = root.find("hasync/synchronizetoip")
        assert node is not None
        node.text = url


@pytest.mark.slow
def test_no_secret_in_argv_logs_exceptions_or_json(known: Secrets, caplog: pytest.LogCaptureFixture) -> None:
    with agent_with_syslog(known) as (agent, syslog):
        point(known.pair.primary, agent.url)
        # a planted process with the password in its argv: the sampler must find it (control)
        with ProcSampler() as sampler:
            planted = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)", known.password])
            sync = cli(known, "sync", "--json", "--timeout", "60", label="sync --json (password)")
            planted.wait()
        assert sync.returncode == 0, sync.stderr
        assert json.loads(sync.stdout)["status"] == "ok"
        assert any("hasync" in text and " sync --json" in text for text in sampler.seen.values()), \
            "the sampler never saw the sync command"
        assert known.password in sampler.seen.get(planted.pid, ""), "the sampler missed the planted password"
        known.texts["/proc during sync (without the planted process)"] = "\n".join(
            text for pid, text in sampler.seen.items() if pid != planted.pid)
        known.texts["sampler samples"] = str(sampler.samples)

        for args, label in [
            (("status", "--json"), "status --json"),
            (("version",), "version"),
            (("services", "list"), "services list"),
            (("check", "--json", "--no-syslog"), "check --json"),
            (("diff", "--json"), "diff --json"),
            (("history", "--remote", "--json"), "history --remote --json"),
            (("rollback", "--remote", "--json"), "rollback --remote --json"),
        ]:
            done = cli(known, *args, label=label)
            assert done.stdout.strip().startswith(("{", "[")), f"{label}: no JSON: {done.stdout[:200]} {done.stderr}"
            json.loads(done.stdout)

        # the same with the API key and secret as the sync credentials
        set_credentials(known.pair.primary, known.api_key, known.api_secret)
        with ProcSampler() as sampler:
            by_key = cli(known, "sync", "--json", label="sync --json (api key)")
        assert by_key.returncode == 0 and json.loads(by_key.stdout)["status"] == "ok", by_key.stdout + by_key.stderr
        known.texts["/proc during api-key sync"] = sampler.text()
        for args, label in [(("status", "--json"), "status --json (api key)"), (("version",), "version (api key)")]:
            cli(known, *args, label=label)

        # failures: wrong secret, wrong password, a secret typed into the user field
        set_credentials(known.pair.primary, known.api_key, known.api_secret + "-wrong")
        assert cli(known, "sync", "--json", label="sync --json (wrong secret)").returncode != 0
        set_credentials(known.pair.primary, known.api_secret, known.password)
        assert cli(known, "sync", "--json", label="sync --json (secret as user name)").returncode != 0
        assert cli(known, "status", "--json", label="status --json (secret as user name)").returncode != 0

        # in-process: exceptions, their tracebacks and every log record at DEBUG
        caplog.set_level(logging.DEBUG)
        set_credentials(known.pair.primary, SYNC_USER, known.password + "-wrong")
        failed = SyncRun(ConfigStore(known.pair.primary), SyncItemRegistry.load(),
                         SyncOptions(client=ClientOptions(retries=0, total_timeout=30))).run()
        assert failed.status == "error" and "Authentication failed" in failed.message
        known.texts["in-process failed sync"] = json.dumps(failed.as_json())
        for password in (known.password, known.password + "-wrong"):
            client = PeerClient(agent.url + "xmlrpc.php", SYNC_USER, password, ClientOptions(retries=0))
            try:
                client.call("opnsense.restore_config_section", [{"zz_unknown": "x"}] if password == known.password
                            else [])
            except HaError as exc:
                known.texts[f"exception {type(exc).__name__}"] = "".join(traceback.format_exception(exc)) + repr(exc)
            known.texts[f"repr client {len(password)}"] = repr(client)
        with pytest.raises(AuthError) as info:
            PeerClient(agent.url + "xmlrpc.php", known.api_key, "nope", ClientOptions(retries=0)).call(
                "opnsense.firmware_version")
        known.texts["auth error"] = "".join(traceback.format_exception(info.value))
        known.texts["caplog"] = caplog.text
        time.sleep(0.3)
        known.texts["agent stderr (-v)"] = agent.log_text()
        if syslog is not None:
            known.texts["syslog"] = "\n".join(syslog.lines)
    # the checks must have looked at real material
    assert "authentication error" in known.texts["agent stderr (-v)"]
    assert any("DEBUG" in record.levelname for record in caplog.records) or "authenticated" in known.texts[
        "agent stderr (-v)"]
    assert len(known.texts) >= 25
    leaks = known.leaks()
    assert not leaks, leaks
