"""Service backends (hasync.services).

OPNsense backend: recorded `pluginctl -S` output (fixtures/opnsense/) and a fake runner that
checks the exact command lines. Services-dir backend: schema errors that name file and field,
command construction with a fake runner, and real processes started, restarted and stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from hasync.core.errors import ConfigError, ServiceError
from hasync.core.osiface import CommandResult, SubprocessRunner
from hasync.services.backends import (
    OpnsenseServiceBackend,
    ServiceDefinitionError,
    ServicesDirBackend,
    action_message,
    pid_alive,
    read_pidfile,
    service_label,
    sort_services,
    unknown_service_message,
)
from hasync.wire import xmlrpc
from support.paths import FIXTURES, shared_path
from support.polling import wait_for
from support.processes import reap_orphans  # noqa: F401 - autouse fixture

PLUGINCTL = "/usr/local/sbin/pluginctl"
CONFIGCTL = "/usr/local/sbin/configctl"
PGREP = "/bin/pgrep"


class FakeRunner:
    """Answers by exact argv (or by a callable); records every call. Unknown argv fail the test."""

    def __init__(self, answers: dict[tuple[str, ...], CommandResult | Callable[[], CommandResult]] | None = None,
                 default: CommandResult | None = None) -> None:
        self.answers = dict(answers or {})
        self.default = default
        self.calls: list[tuple[str, ...]] = []

    def run(self, argv: Sequence[str], *, input_text: str | None = None, timeout: float = 60.0) -> CommandResult:
        key = tuple(argv)
        self.calls.append(key)
        answer = self.answers.get(key, self.default)
        if answer is None:
            raise AssertionError(f"unexpected command {key}")
        return answer() if callable(answer) else answer


def ok(stdout: str = "", argv: Sequence[str] = ()) -> CommandResult:
    return CommandResult(tuple(argv), 0, stdout, "")


def fail(code: int = 1, stderr: str = "", stdout: str = "") -> CommandResult:
    return CommandResult((), code, stdout, stderr)


# ------------------------------------------------------------------------------------------
# messages
# ------------------------------------------------------------------------------------------


def test_messages_match_opnsense_wording() -> None:
    assert action_message("restart", "unbound") == "Service `unbound' has been restarted."
    assert action_message("start", "openvpn", "1") == "Service `openvpn[1]' has been started."
    assert action_message("stop", "openvpn", "") == "Service `openvpn' has been stopped."
    assert unknown_service_message("x") == "Could not find unknown service `x'"
    # PHP htmlspecialchars on the name, as OPNsense does
    assert unknown_service_message("a<b>'&\"") == "Could not find unknown service `a&lt;b&gt;&#039;&amp;&quot;'"
    assert service_label("openvpn", "2") == "openvpn[2]" and service_label("unbound", None) == "unbound"


def test_restart_message_equals_the_wire_sample() -> None:
    wire = xmlrpc.loads_response(shared_path("fixtures", "wire", "response-restart_service.xml").read_bytes())
    request = shared_path("fixtures", "wire", "request-restart_service.xml").read_bytes()
    _method, params = xmlrpc.loads_request(request)
    assert action_message("restart", params[0]["service"], params[0]["id"]) == wire


def test_sort_services_by_name_then_numeric_id() -> None:
    records = [{"name": "b"}, {"name": "a", "id": "10"}, {"name": "a", "id": "2"}, {"name": "a", "id": "x"}]
    assert [(r["name"], r.get("id")) for r in sort_services(records)] == [
        ("a", "2"), ("a", "10"), ("a", "x"), ("b", None)
    ]


# ------------------------------------------------------------------------------------------
# OPNsense backend (pluginctl / configctl), recorded outputs + fake runner
# ------------------------------------------------------------------------------------------


def recorded_registry() -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads((FIXTURES / "opnsense" / "pluginctl-S.json").read_text())
    return data


def pgrep_answers(registry: list[dict[str, Any]], running: Callable[[dict[str, Any]], bool]) -> dict[Any, Any]:
    answers: dict[Any, Any] = {}
    for rec in registry:
        result = ok("123\n") if running(rec) else fail(1)
        if "pidfile" in rec:
            answers[(PGREP, "-nF", rec["pidfile"])] = result
        else:
            answers[(PGREP, "-anx", rec["name"])] = result
    return answers


def test_opnsense_list_services_from_recorded_output() -> None:
    registry = recorded_registry()

    def running(rec: dict[str, Any]) -> bool:  # every second service down, deterministic
        return registry.index(rec) % 2 == 0

    runner = FakeRunner({(PLUGINCTL, "-S"): ok(json.dumps(registry)), **pgrep_answers(registry, running)})
    services = OpnsenseServiceBackend(runner).list_services()

    shown = [rec for rec in registry if not rec.get("noshow")]
    assert len(services) == len(shown)
    assert "hostwatch" not in {s["name"] for s in services}
    keys = [(s["name"], s.get("id", "")) for s in services]
    assert keys == sorted(keys, key=lambda k: (k[0], (0, int(k[1]), "") if k[1].isdigit() else (1, 0, k[1])))
    assert [s.get("id") for s in services if s["name"] == "openvpn"] == ["2", "10"]
    for service in services:
        rec = next(r for r in registry if r["name"] == service["name"] and r.get("id") == service.get("id"))
        assert isinstance(service["status"], bool)
        expected = True if rec.get("nocheck") else running(rec)
        assert service["status"] is expected, service["name"]
        assert service["description"] == rec["description"]
        for key in ("pidfile", "configd", "php", "mwexec"):
            assert service.get(key) == rec.get(key)
        assert service.get("locked", False) is bool(rec.get("locked"))
        assert service.get("nocheck", False) is bool(rec.get("nocheck"))
    # nocheck services cost no pgrep; the others exactly one each
    pgreps = [c for c in runner.calls if c[0] == PGREP]
    assert len(pgreps) == len([r for r in shown if not r.get("nocheck")])
    assert (PGREP, "-anx", "dpinger") in pgreps  # no pidfile: by process name, as OPNsense does


def test_opnsense_list_services_round_trips_the_wire_sample() -> None:
    """Records shaped like the wire sample (status included) come out unchanged."""
    wire = xmlrpc.loads_response(shared_path("fixtures", "wire", "response-list_services.xml").read_bytes())
    runner = FakeRunner({(PLUGINCTL, "-S"): ok(json.dumps(wire))})
    assert OpnsenseServiceBackend(runner).list_services() == sort_services(wire)
    assert runner.calls == [(PLUGINCTL, "-S")]  # status given: no pgrep


def test_opnsense_list_services_accepts_a_name_keyed_object() -> None:
    registry = {"unbound": {"description": "Unbound DNS", "nocheck": True},
                "cron": {"description": "Cron", "status": 0}}
    runner = FakeRunner({(PLUGINCTL, "-S"): ok(json.dumps(registry))})
    services = OpnsenseServiceBackend(runner).list_services()
    assert services == [
        {"name": "cron", "description": "Cron", "status": False},
        {"name": "unbound", "description": "Unbound DNS", "nocheck": True, "status": True},
    ]


@pytest.mark.parametrize(
    ("result", "needle"),
    [
        (ok("configd\ncron\nunbound\n"), "did not print the JSON service list"),
        (fail(255, "PHP Fatal error"), "exit status 255"),
        (ok('"just a string"'), "expected a list"),
    ],
)
def test_opnsense_list_services_errors_name_the_command(result: CommandResult, needle: str) -> None:
    with pytest.raises(ServiceError) as info:
        OpnsenseServiceBackend(FakeRunner({(PLUGINCTL, "-S"): result})).list_services()
    assert needle in str(info.value) and "pluginctl -S" in str(info.value)


@pytest.mark.parametrize("action", ["start", "stop", "restart"])
def test_opnsense_actions_build_pluginctl_commands(action: str) -> None:
    with_id = (PLUGINCTL, "-s", "openvpn", action, "1")
    without = (PLUGINCTL, "-s", "unbound", action)
    runner = FakeRunner({
        with_id: ok(f"some rc output\n{action_message(action, 'openvpn', '1')}\n"),
        without: ok(action_message(action, "unbound") + "\n"),
    })
    backend = OpnsenseServiceBackend(runner)
    assert getattr(backend, action)("openvpn", "1") == action_message(action, "openvpn", "1")
    assert getattr(backend, action)("unbound", "") == action_message(action, "unbound")
    assert backend.action(action, "unbound") == action_message(action, "unbound")
    assert runner.calls == [with_id, without, without]


def test_opnsense_unknown_service_message_passes_through() -> None:
    message = unknown_service_message("nosuch")
    runner = FakeRunner({(PLUGINCTL, "-s", "nosuch", "restart"): ok(message + "\n")})
    assert OpnsenseServiceBackend(runner).restart("nosuch") == message


@pytest.mark.parametrize(("name", "service_id"), [("-c", ""), ("a b", ""), ("", ""), ("x;reboot", ""), ("ok", "-x"),
                                                  ("ok", "1 2"), ("\nunbound", "")])
def test_opnsense_refuses_names_that_could_become_options(name: str, service_id: str) -> None:
    runner = FakeRunner()
    assert OpnsenseServiceBackend(runner).restart(name, service_id) == unknown_service_message(name)
    assert runner.calls == []


def test_opnsense_action_failure_raises_with_command() -> None:
    runner = FakeRunner({(PLUGINCTL, "-s", "unbound", "restart"): fail(1, "configd socket missing")})
    with pytest.raises(ServiceError, match=r"pluginctl -s unbound restart failed.*configd socket missing"):
        OpnsenseServiceBackend(runner).restart("unbound")


def test_opnsense_reload_templates_and_filter_configure() -> None:
    runner = FakeRunner(default=ok("OK\n"))
    backend = OpnsenseServiceBackend(runner)
    backend.reload_templates()
    backend.filter_configure()
    assert runner.calls == [
        (CONFIGCTL, "template", "reload", "*"),
        (CONFIGCTL, "interface", "routes", "configure"),
        (CONFIGCTL, "dns", "reload"),
        (CONFIGCTL, "filter", "reload"),
    ]


def test_opnsense_configd_failures_are_errors_and_filter_runs_every_step() -> None:
    runner = FakeRunner({(CONFIGCTL, "template", "reload", "*"): ok("Execute error\n")})
    with pytest.raises(ServiceError, match="template reload"):
        OpnsenseServiceBackend(runner).reload_templates()

    runner = FakeRunner({
        (CONFIGCTL, "interface", "routes", "configure"): ok("Error (1)\n"),
        (CONFIGCTL, "dns", "reload"): ok("OK\n"),
        (CONFIGCTL, "filter", "reload"): ok("OK\n"),
    })
    with pytest.raises(ServiceError, match=r"routes configure failed: Error \(1\)"):
        OpnsenseServiceBackend(runner).filter_configure()
    assert (CONFIGCTL, "filter", "reload") in runner.calls  # the filter was still reloaded


# ------------------------------------------------------------------------------------------
# services dir: definitions
# ------------------------------------------------------------------------------------------


def write(directory: Path, filename: str, data: Any) -> Path:
    path = directory / filename
    path.write_text(data if isinstance(data, str) else json.dumps(data, indent=2))
    return path


BASIC = {"name": "demo", "description": "Demo", "pidfile": "demo.pid", "start": ["true"]}


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({**BASIC, "name": "-bad"}, "field 'name'"),
        ({k: v for k, v in BASIC.items() if k != "description"}, "top level: 'description' is a required property"),
        ({**BASIC, "start": "true"}, "field 'start': 'true' is not of type 'array'"),
        ({**BASIC, "start": []}, "field 'start'"),
        ({**BASIC, "start": ["", "x"]}, "field 'start/0'"),
        ({**BASIC, "start": ["ok", 3]}, "field 'start/1'"),
        ({**BASIC, "nocheck": "yes"}, "field 'nocheck'"),
        ({**BASIC, "shell": "rm -rf /"}, "Additional properties are not allowed ('shell'"),
        ({k: v for k, v in BASIC.items() if k != "pidfile"}, "needs a way to tell whether it runs"),
        ({**{k: v for k, v in BASIC.items() if k != "pidfile"}, "status_command": ["true"]},
         "needs a stop command or a pidfile"),
        ({**{k: v for k, v in BASIC.items() if k != "start"}}, "needs a start"),
        ({**{k: v for k, v in BASIC.items() if k != "pidfile"}, "daemon": True, "nocheck": True, "stop": ["x"]},
         "\"daemon\": true needs both start and pidfile"),
        ({**BASIC, "timeout": 0}, "field 'timeout'"),
        (["not", "an", "object"], "top level"),
    ],
)
def test_bad_service_files_name_file_and_field(tmp_path: Path, data: Any, needle: str) -> None:
    write(tmp_path, "good.json", {**BASIC, "name": "good"})
    bad = write(tmp_path, "bad.json", data)
    with pytest.raises(ServiceDefinitionError) as info:
        ServicesDirBackend(tmp_path, FakeRunner())
    assert str(info.value).startswith(f"{bad}: ")
    assert needle in str(info.value)
    assert isinstance(info.value, ConfigError)


def test_bad_json_names_line_and_column(tmp_path: Path) -> None:
    bad = write(tmp_path, "broken.json", '{\n  "name": "x",\n  "description": oops\n}')
    with pytest.raises(ServiceDefinitionError, match=r"broken.json: line 3 column 18: invalid JSON"):
        ServicesDirBackend(tmp_path, FakeRunner())
    bad.write_bytes(b'{"name": "\xff"}')
    with pytest.raises(ServiceDefinitionError, match="not UTF-8"):
        ServicesDirBackend(tmp_path, FakeRunner())


def test_duplicate_name_and_id_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "a.json", {**BASIC, "id": "1"})
    write(tmp_path, "b.json", {**BASIC, "id": "2"})  # other instance: fine
    ServicesDirBackend(tmp_path, FakeRunner())
    write(tmp_path, "c.json", {**BASIC, "id": "1", "description": "again"})
    with pytest.raises(ServiceDefinitionError, match=r"c.json: service demo\[1\] is already defined in a.json"):
        ServicesDirBackend(tmp_path, FakeRunner())


def test_missing_dir_and_bad_hooks(tmp_path: Path) -> None:
    with pytest.raises(ServiceDefinitionError, match="does not exist"):
        ServicesDirBackend(tmp_path / "nope", FakeRunner())
    write(tmp_path, "hooks.json", {"reload_templates": "make"})
    with pytest.raises(ServiceDefinitionError, match=r"hooks\.json: field 'reload_templates'"):
        ServicesDirBackend(tmp_path, FakeRunner())


def test_files_are_reread_on_every_call(tmp_path: Path) -> None:
    backend = ServicesDirBackend(tmp_path, FakeRunner(default=fail(1)))
    assert backend.list_services() == []
    write(tmp_path, "late.json", {**BASIC, "name": "late"})
    assert [s["name"] for s in backend.list_services()] == ["late"]
    write(tmp_path, "worse.json", {"name": "worse"})
    with pytest.raises(ServiceDefinitionError, match=r"worse\.json"):
        backend.list_services()


# ------------------------------------------------------------------------------------------
# services dir: records and command construction (fake runner)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def declared(tmp_path: Path) -> Path:
    write(tmp_path, "web.json", {
        "name": "web", "description": "Web server", "status_command": ["{dir}/check", "web"],
        "start": ["{python}", "{dir}/ctl.py", "start"], "stop": ["{dir}/ctl.py", "stop"], "locked": True,
    })
    write(tmp_path, "vpn-10.json", {
        "name": "vpn", "id": "10", "description": "VPN 10", "status_command": ["vpnctl", "status", "10"],
        "start": ["vpnctl", "start", "10"], "stop": ["vpnctl", "stop", "10"], "restart": ["vpnctl", "restart", "10"],
    })
    write(tmp_path, "vpn-2.json", {
        "name": "vpn", "id": "2", "description": "VPN 2", "status_command": ["vpnctl", "status", "2"],
        "start": ["vpnctl", "start", "2"], "stop": ["vpnctl", "stop", "2"],
    })
    write(tmp_path, "dns.json", {"name": "dns", "description": "Resolver", "nocheck": True,
                                 "restart": ["dnsctl", "reload"], "stop": ["dnsctl", "stop"]})
    write(tmp_path, "hidden.json", {**BASIC, "name": "hidden", "noshow": True})
    write(tmp_path, "hooks.json", {"reload_templates": [["render", "{dir}/templates"], ["render", "--check"]],
                                   "filter_configure": [["nft", "-f", "/etc/nftables.conf"]]})
    return tmp_path


def test_dir_list_services_shape(declared: Path) -> None:
    d = str(declared.resolve())
    runner = FakeRunner({
        (f"{d}/check", "web"): ok(),
        ("vpnctl", "status", "10"): fail(3),
        ("vpnctl", "status", "2"): ok(),
    })
    services = ServicesDirBackend(declared, runner).list_services()
    assert [(s["name"], s.get("id")) for s in services] == [("dns", None), ("vpn", "2"), ("vpn", "10"), ("web", None)]
    web = services[-1]
    assert web == {
        "name": "web", "description": "Web server", "locked": True, "status": True,
        "mwexec": {"start": [f"{sys.executable} {d}/ctl.py start"], "stop": [f"{d}/ctl.py stop"]},
    }
    assert services[0]["nocheck"] is True and services[0]["status"] is True  # no status command run for nocheck
    assert services[2]["status"] is False and services[1]["status"] is True
    assert ("dnsctl",) not in {c[:1] for c in runner.calls}
    for service in services:  # every record carries the fields the status page uses
        assert {"name", "description", "status"} <= service.keys() and isinstance(service["status"], bool)


def test_dir_actions_run_the_declared_commands(declared: Path) -> None:
    d = str(declared.resolve())
    runner = FakeRunner(default=ok())
    backend = ServicesDirBackend(declared, runner)
    assert backend.start("web") == "Service `web' has been started."
    assert runner.calls[-1] == (sys.executable, f"{d}/ctl.py", "start")
    assert backend.restart("vpn", "10") == "Service `vpn[10]' has been restarted."
    assert runner.calls[-1] == ("vpnctl", "restart", "10")
    runner.calls.clear()
    # no restart command: stop (it is running: status 0) then start
    assert backend.restart("vpn", "2") == "Service `vpn[2]' has been restarted."
    assert runner.calls == [("vpnctl", "status", "2"), ("vpnctl", "stop", "2"), ("vpnctl", "start", "2")]
    # no id given: the first instance of that name (ids sort numerically: 2 before 10)
    runner.calls.clear()
    assert backend.stop("vpn", "") == "Service `vpn[2]' has been stopped."
    assert runner.calls == [("vpnctl", "stop", "2")]
    # nocheck service without start command starts through its restart command
    assert backend.start("dns") == "Service `dns' has been started." and runner.calls[-1] == ("dnsctl", "reload")
    # noshow hides from the list, not from control
    assert backend.stop("hidden").startswith("Service `hidden'")


def test_dir_restart_of_stopped_service_only_starts(declared: Path) -> None:
    runner = FakeRunner({("vpnctl", "status", "2"): fail(3)}, default=ok())
    ServicesDirBackend(declared, runner).restart("vpn", "2")
    assert runner.calls == [("vpnctl", "status", "2"), ("vpnctl", "start", "2")]


def test_dir_unknown_service_or_id(declared: Path) -> None:
    runner = FakeRunner(default=ok())
    backend = ServicesDirBackend(declared, runner)
    assert backend.restart("nosuch") == unknown_service_message("nosuch")
    assert backend.restart("vpn", "3") == unknown_service_message("vpn")
    assert backend.start("web", "1") == unknown_service_message("web")  # web has no instances
    assert runner.calls == []


def test_dir_failed_command_raises_naming_file_and_command(declared: Path) -> None:
    runner = FakeRunner({("vpnctl", "restart", "10"): fail(2, "vpnctl: no config for 10")})
    with pytest.raises(ServiceError) as info:
        ServicesDirBackend(declared, runner).restart("vpn", "10")
    text = str(info.value)
    assert "vpn[10]" in text and "vpn-10.json" in text and "vpnctl restart 10" in text and "no config for 10" in text


def test_dir_hooks(declared: Path, tmp_path: Path) -> None:
    d = str(declared.resolve())
    runner = FakeRunner(default=ok())
    backend = ServicesDirBackend(declared, runner)
    backend.reload_templates()
    backend.filter_configure()
    assert runner.calls == [("render", f"{d}/templates"), ("render", "--check"), ("nft", "-f", "/etc/nftables.conf")]
    runner = FakeRunner({("render", f"{d}/templates"): fail(1, "template error")})
    with pytest.raises(ServiceError, match=r"reload_templates hook.*template error"):
        ServicesDirBackend(declared, runner).reload_templates()
    empty = tmp_path / "empty"
    empty.mkdir()
    runner = FakeRunner()
    ServicesDirBackend(empty, runner).filter_configure()  # no hooks.json: nothing to run
    assert runner.calls == []


# ------------------------------------------------------------------------------------------
# services dir: real processes
# ------------------------------------------------------------------------------------------

def kill_quietly(pid: int | None) -> None:
    if pid:
        for sender in (os.killpg, os.kill):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                sender(pid, signal.SIGKILL)


def status_of(backend: ServicesDirBackend, name: str) -> bool:
    return next(s["status"] for s in backend.list_services() if s["name"] == name)


def test_real_http_server_daemon_start_restart_stop(tmp_path: Path) -> None:
    write(tmp_path, "http.json", {
        "name": "demo-http", "description": "Demo HTTP server", "daemon": True,
        "pidfile": "run/http.pid", "log_file": "http.log",
        "start": ["{python}", "-u", "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", "{dir}/www"],
    })
    (tmp_path / "run").mkdir()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text("hello from the services dir\n")
    backend = ServicesDirBackend(tmp_path, SubprocessRunner())
    pidfile = tmp_path / "run" / "http.pid"
    pids: list[int] = []
    try:
        assert status_of(backend, "demo-http") is False  # control: not running before start

        assert backend.start("demo-http") == "Service `demo-http' has been started."
        first = read_pidfile(pidfile)
        assert first is not None
        pids.append(first)
        assert status_of(backend, "demo-http") is True and pid_alive(first)
        port = wait_for(lambda: _served_port(tmp_path / "http.log", 1), "the server's port in its log")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as response:
            assert response.read() == b"hello from the services dir\n"

        assert backend.start("demo-http") == "Service `demo-http' has been started."  # already running: no 2nd
        assert read_pidfile(pidfile) == first

        assert backend.restart("demo-http") == "Service `demo-http' has been restarted."
        second = read_pidfile(pidfile)
        assert second is not None and second != first
        pids.append(second)
        assert not pid_alive(first) and pid_alive(second)
        assert status_of(backend, "demo-http") is True

        assert backend.stop("demo-http") == "Service `demo-http' has been stopped."
        assert not pid_alive(second) and not pidfile.exists()
        assert status_of(backend, "demo-http") is False
        assert backend.stop("demo-http") == "Service `demo-http' has been stopped."  # stopping twice is fine
    finally:
        for pid in pids:
            kill_quietly(pid)


def _served_port(log: Path, occurrence: int) -> int | None:
    try:
        lines = [line for line in log.read_text().splitlines() if "port" in line]
    except OSError:
        return None
    if len(lines) < occurrence:
        return None
    return int(lines[occurrence - 1].split("port")[1].split()[0])


SELF_DAEMONIZING = """
import os, sys, time
pidfile = sys.argv[1]
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(pidfile + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.replace(pidfile + ".tmp", pidfile)
if len(sys.argv) > 2:
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.closerange(0, 3)
while True:
    time.sleep(1)
"""


def test_real_self_daemonizing_service_stopped_by_pidfile(tmp_path: Path) -> None:
    """start daemonizes by itself (like an rc script); stop defaults to SIGTERM via the pid file."""
    pidfile = tmp_path / "sleeper.pid"
    write(tmp_path, "sleeper.json", {
        "name": "sleeper", "description": "sleep loop", "pidfile": str(pidfile),
        "start": ["{python}", "-c", SELF_DAEMONIZING, str(pidfile)],
    })
    backend = ServicesDirBackend(tmp_path, SubprocessRunner())
    pid = None
    try:
        assert status_of(backend, "sleeper") is False
        backend.start("sleeper")
        pid = wait_for(lambda: read_pidfile(pidfile), "the pid file")
        assert status_of(backend, "sleeper") is True
        backend.stop("sleeper")
        assert not pid_alive(pid)
        assert status_of(backend, "sleeper") is False
    finally:
        kill_quietly(pid)


def test_real_stop_escalates_to_sigkill(tmp_path: Path) -> None:
    pidfile = tmp_path / "stubborn.pid"
    write(tmp_path, "stubborn.json", {
        "name": "stubborn", "description": "ignores SIGTERM", "pidfile": str(pidfile), "stop_timeout": 0.5,
        "start": ["{python}", "-c", SELF_DAEMONIZING, str(pidfile), "ignore-term"],
    })
    backend = ServicesDirBackend(tmp_path, SubprocessRunner())
    pid = None
    try:
        backend.start("stubborn")
        pid = wait_for(lambda: read_pidfile(pidfile), "the pid file")
        wait_for(lambda: _ignores_sigterm(pid), "SIGTERM to be ignored")
        backend.stop("stubborn")
        assert not pid_alive(pid)
    finally:
        kill_quietly(pid)


def _ignores_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    ignored = int(next(line for line in status.splitlines() if line.startswith("SigIgn:")).split()[1], 16)
    return bool(ignored & (1 << (signal.SIGTERM - 1)))


def test_real_daemon_that_dies_at_once_is_a_failed_start(tmp_path: Path) -> None:
    write(tmp_path, "broken.json", {
        "name": "broken", "description": "exits immediately", "daemon": True, "pidfile": "broken.pid",
        "log_file": "broken.log", "start": ["{python}", "-c", "import sys; print('bad config'); sys.exit(3)"],
    })
    backend = ServicesDirBackend(tmp_path, SubprocessRunner())
    with pytest.raises(ServiceError, match=r"exited at once with status 3"):
        backend.start("broken")
    assert not (tmp_path / "broken.pid").exists()
    assert "bad config" in (tmp_path / "broken.log").read_text()
    assert status_of(backend, "broken") is False


def test_real_status_command_exit_code(tmp_path: Path) -> None:
    flag = tmp_path / "up"
    write(tmp_path, "flag.json", {
        "name": "flag", "description": "status from a command",
        "status_command": ["{python}", "-c", f"import os, sys; sys.exit(0 if os.path.exists({str(flag)!r}) else 1)"],
        "start": ["touch", str(flag)], "stop": ["rm", "-f", str(flag)],
    })
    backend = ServicesDirBackend(tmp_path, SubprocessRunner())
    assert status_of(backend, "flag") is False
    backend.start("flag")
    assert status_of(backend, "flag") is True
    backend.restart("flag")
    assert status_of(backend, "flag") is True
    backend.stop("flag")
    assert status_of(backend, "flag") is False


def test_pid_alive_sees_zombies_as_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert pid_alive(child.pid)  # control: a running process is alive
        child.kill()
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 "the child to become a zombie")
        assert not pid_alive(child.pid)  # exited but not yet reaped
    finally:
        child.kill()
        child.wait()
    assert not pid_alive(child.pid)


@pytest.mark.parametrize(("content", "expected"), [("123\n", 123), ("  77 extra", 77), ("", None), ("abc", None),
                                                   ("0", None), ("-5", None)])
def test_read_pidfile(tmp_path: Path, content: str, expected: int | None) -> None:
    path = tmp_path / "x.pid"
    path.write_text(content)
    assert read_pidfile(path) == expected
    assert read_pidfile(tmp_path / "missing.pid") is None
