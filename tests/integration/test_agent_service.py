"""The agent as the rc.d service runs it: `daemonize.py --pidfile … -- python ha_serve.py ARGS`.

rc.subr itself is FreeBSD's; what it relies on is tested here with real processes: the start line
returns with the agent detached and a pid file naming it, the pid is `<interpreter> <ha_serve.py>`
(what rc.subr's pid check compares with command_interpreter and command), the certificate comes
from config.xml (the web GUI's by default, or `--cert-ref`) through a 0600 key file, SIGTERM to
that pid stops it (rc.subr's stop), and a restart on the same port works at once.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from hasync.config.store import ConfigStore
from hasync.wire.tls import generate_self_signed
from support.nodes import Pair, make_pair
from support.paths import PACKAGE_ROOT

DAEMONIZE = PACKAGE_ROOT / "hasync" / "services" / "daemonize.py"
HA_SERVE = PACKAGE_ROOT / "ha_serve.py"
RC_D = PACKAGE_ROOT.parents[2] / "etc" / "rc.d" / "opnsense_ha"
READY = "listening on"


def test_the_rc_d_script_starts_the_agent_this_way() -> None:
    """The start line below is the rc.d script's (same program, same readiness text)."""
    script = RC_D.read_text()
    assert '"${scripts}/hasync/services/daemonize.py" --pidfile "${pidfile}"' in script
    assert f'--ready "{READY}" -- ${{command_interpreter}} "${{command}}"' in script
    assert 'command="${scripts}/ha_serve.py"' in script


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def add_cert(conf_dir: Path, refid: str, cert: Path, key: Path, *, webgui: bool) -> None:
    with ConfigStore(conf_dir).transaction("test: certificate") as root:
        if webgui:
            gui = root.find("system/webgui")
            assert gui is not None
            etree.SubElement(gui, "ssl-certref").text = refid
        element = etree.SubElement(root, "cert")
        etree.SubElement(element, "refid").text = refid
        etree.SubElement(element, "crt").text = base64.b64encode(cert.read_bytes()).decode()
        etree.SubElement(element, "prv").text = base64.b64encode(key.read_bytes()).decode()


class Service:
    """rc.d's start line and stop, for one node."""

    def __init__(self, pair: Pair, tmp_path: Path) -> None:
        self.pair = pair
        self.pidfile = tmp_path / "opnsense_ha.pid"
        self.outfile = tmp_path / "opnsense_ha.out"
        self.port = free_port()

    def start(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "OPNSENSE_HA_CONF_DIR": str(self.pair.backup), "OPNSENSE_HA_FAILOVER": "none"}
        return subprocess.run(
            [sys.executable, str(DAEMONIZE), "--pidfile", str(self.pidfile), "--log", str(self.outfile),
             "--ready", READY, "--",
             sys.executable, str(HA_SERVE), "--listen", f"127.0.0.1:{self.port}",
             "--services-dir", str(self.pair.services_dir), "--state-dir", str(self.pair.state_dir), *args],
            capture_output=True, text=True, timeout=60, env=env,
        )

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def stop(self) -> None:
        pid = self.pid()
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with open(f"/proc/{pid}/stat") as handle:  # a zombie has exited: its parent (init) reaps it
                if handle.read().split(") ", 1)[1].startswith("Z"):
                    break
            time.sleep(0.05)

    def served_certificate(self) -> bytes:
        deadline = time.monotonic() + 20
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as raw, \
                        context.wrap_socket(raw) as tls:
                    der = tls.getpeercert(binary_form=True)
                    assert der is not None
                    return der
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    (tmp_path / "pair").mkdir()
    running = Service(make_pair(tmp_path / "pair"), tmp_path)
    yield running
    if running.pidfile.exists():
        with contextlib.suppress(ProcessLookupError):
            running.stop()


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def test_start_detaches_with_a_pid_file_and_serves_the_web_gui_certificate(service: Service) -> None:
    add_cert(service.pair.backup, "6512abcd", service.pair.cert_file, service.pair.key_file, webgui=True)
    result = service.start()
    assert result.returncode == 0, result.stderr + service.outfile.read_text()
    pid = service.pid()
    # rc.subr's check_pidfile: the pid must be "<command_interpreter> <command> ..."
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert argv[:2] == [sys.executable.encode(), str(HA_SERVE).encode()]
    assert os.getsid(pid) == pid  # its own session: not killed with the shell that started it
    assert service.served_certificate() == der_of(service.pair.cert_file)
    key = service.pair.state_dir / "webgui.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(service.pair.state_dir.stat().st_mode) == 0o700
    # the key never travels on a command line
    assert b"PRIVATE KEY" not in Path(f"/proc/{pid}/cmdline").read_bytes()


def test_cert_ref_selects_another_certificate_of_config_xml(service: Service, tmp_path: Path) -> None:
    add_cert(service.pair.backup, "6512abcd", service.pair.cert_file, service.pair.key_file, webgui=True)
    other_cert, other_key = tmp_path / "other.crt", tmp_path / "other.key"
    generate_self_signed(other_cert, other_key, "backup-agent")
    add_cert(service.pair.backup, "77aa", other_cert, other_key, webgui=False)
    result = service.start("--cert-ref", "77aa")
    assert result.returncode == 0, result.stderr + service.outfile.read_text()
    served = service.served_certificate()
    assert served == der_of(other_cert) and served != der_of(service.pair.cert_file)


def test_a_bad_setting_fails_the_start_and_names_the_log(service: Service) -> None:
    result = service.start("--cert-ref", "nosuchref")
    assert result.returncode == 1
    assert str(service.outfile) in result.stderr
    assert "nosuchref" in service.outfile.read_text()
    assert not service.pidfile.exists()  # no pid file for a dead agent


def test_stop_then_start_on_the_same_port(service: Service) -> None:
    add_cert(service.pair.backup, "6512abcd", service.pair.cert_file, service.pair.key_file, webgui=True)
    assert service.start().returncode == 0
    first = service.pid()
    service.served_certificate()
    service.stop()  # rc.d restart: stop, then start at once
    result = service.start()
    assert result.returncode == 0, result.stderr + service.outfile.read_text()
    assert service.pid() != first
    assert service.served_certificate() == der_of(service.pair.cert_file)


SLOW_PROGRAM = "import time; print('starting', flush=True); time.sleep(60)"


def test_a_program_that_never_gets_ready_is_killed_not_left_running(tmp_path: Path) -> None:
    pidfile, log = tmp_path / "p.pid", tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(DAEMONIZE), "--pidfile", str(pidfile), "--log", str(log), "--ready", READY,
         "--ready-timeout", "1", "--", sys.executable, "-c", SLOW_PROGRAM],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1 and "not ready within 1s" in result.stderr
    assert time.monotonic() - started < 20 and not pidfile.exists()
    assert subprocess.run(["pgrep", "-f", SLOW_PROGRAM], capture_output=True).returncode == 1  # none left


def test_log_lines_reach_freebsds_syslog_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """FreeBSD's syslogd (and OPNsense's syslog-ng) listen on /var/run/log, Linux on /dev/log: the
    named `hasync` log only gets lines if we write to the socket that exists."""
    import logging

    from hasync.core import logsetup

    freebsd, linux = tmp_path / "var-run-log", tmp_path / "dev-log"
    monkeypatch.setattr(logsetup, "SYSLOG_SOCKETS", (str(freebsd), str(linux)))
    assert logsetup.syslog_socket() == str(linux)  # neither exists: the Linux default
    freebsd.mkdir()  # a directory of that name (some Linux systems) is no syslog
    assert logsetup.syslog_socket() == str(linux)
    freebsd.rmdir()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(freebsd))
        server.settimeout(5)
        assert logsetup.syslog_socket() == str(freebsd)
        logger = logging.getLogger("hasync.test-syslog")
        logger.propagate = False
        logger.setLevel(logging.INFO)
        logsetup.setup_syslog(logger)
        try:
            logger.info("agent started")
            line = server.recv(4096).decode()
        finally:
            for handler in list(logger.handlers):
                logger.removeHandler(handler)
                handler.close()
    assert f"opnsense-ha[{os.getpid()}]: agent started" in line
