"""actions_ha.conf round trip: parsed, quoted and executed the way OPNsense's configd does it.

configd (src/opnsense/service/modules/processhandler.py + actions/base.py in opnsense/core) reads
every `actions_<topic>.conf` with `RawConfigParser`; `[a]` in actions_ha.conf is `configctl ha a`.
It wraps each parameter in single quotes (`'` becomes `'"'"'`), fills missing ones with `''`,
answers `Parameter mismatch` for too many, runs the line with `/bin/sh`, and replies `OK` /
`Error (<rc>)` for `script` and stdout (or `Execute error` on a non-zero exit) for `script_output`.
The helpers below do exactly that, then run our scripts from this checkout against a primary
node whose backup is a real TLS agent on loopback (tests/nodes.py).

The failover backend is forced to `none` (OPNSENSE_HA_FAILOVER): the carp/pfsync/boot actions
must not touch this machine's interfaces.
"""

from __future__ import annotations

import configparser
import fcntl
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hasync.config.store import ConfigStore
from hasync.core.osiface import SubprocessRunner
from hasync.services.backends import ServicesDirBackend, action_message, unknown_service_message
from support.nodes import Pair, make_pair, running_agent
from support.paths import REPO
from support.processes import reap_orphans  # noqa: F401 - autouse fixture

ACTIONS_FILE = REPO / "src" / "opnsense" / "service" / "conf" / "actions.d" / "actions_ha.conf"
INSTALLED_SCRIPTS = "/usr/local/opnsense/scripts/ha/"
CHECKOUT_SCRIPTS = REPO / "src" / "opnsense" / "scripts" / "ha"
CRON_SELECTABLE = {"reconfigure_backup", "check"}
JSON_ACTIONS_WITHOUT_BACKUP = {"options", "carp_status", "pfsync_status", "pfsync_apply", "boot"}


# ------------------------------------------------------------------------------------------
# configd, reimplemented
# ------------------------------------------------------------------------------------------


def load_actions() -> configparser.RawConfigParser:
    """Exactly configd's loader: one RawConfigParser per actions file."""
    cnf = configparser.RawConfigParser()
    assert cnf.read(ACTIONS_FILE) == [str(ACTIONS_FILE)]
    return cnf


def build_command(action: dict[str, str], parameters: list[str]) -> str:
    """configd's BaseAction._cmd_builder: quote every parameter, fill or refuse, substitute."""
    script_command = action["command"]
    template = action.get("parameters")
    if template is not None:
        if template.find("%s") > -1:
            parameters = list(parameters)
            if template.count("%s") > len(parameters):
                parameters += [""] * (template.count("%s") - len(parameters))
            elif len(parameters) > template.count("%s"):
                raise TypeError("Parameter mismatch")
            parameters = ["'" + p.replace("'", "'\"'\"'") + "'" for p in parameters]
            template = template % tuple(parameters)
        return script_command + " " + template
    return script_command


def log_message(action: dict[str, str], parameters: list[str]) -> str:
    """configd's syslog line for an action (BaseAction.execute)."""
    message = action["message"]
    wanted = message.count("%s")
    log_param = list(parameters[:wanted]) if wanted and parameters else []
    log_param += [""] * (wanted - len(log_param))
    return message % tuple(log_param)


def to_checkout(command: str) -> str:
    """Run our installed script paths from this checkout, with this test's interpreter."""
    return re.sub(
        re.escape(INSTALLED_SCRIPTS) + r"(ha_\w+\.py)",
        lambda m: f"{shlex.quote(sys.executable)} {shlex.quote(str(CHECKOUT_SCRIPTS / m.group(1)))}",
        command,
    )


class Configd:
    """`configctl ha <action> [parameters...]` against actions_ha.conf, run like configd runs it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.actions = load_actions()
        self.env = env
        self.last_stderr = ""

    def __call__(self, name: str, *parameters: str) -> str:
        if not self.actions.has_section(name):
            return "Action not found"
        action = dict(self.actions.items(name))
        try:
            command = build_command(action, list(parameters))
        except TypeError as exc:
            return str(exc)
        log_message(action, list(parameters))
        proc = subprocess.run(
            to_checkout(command), shell=True, env=self.env, capture_output=True, text=True, timeout=180
        )
        self.last_stderr = proc.stderr
        if action["type"] == "script":
            return "OK" if proc.returncode == 0 else f"Error ({proc.returncode})"
        if action["type"] == "script_output":
            return proc.stdout if proc.returncode == 0 else "Execute error"
        raise AssertionError(f"unexpected action type {action['type']}")

    def json(self, name: str, *parameters: str) -> Any:
        reply = self(name, *parameters)
        try:
            return json.loads(reply)
        except ValueError:
            message = f"configctl ha {name} did not answer JSON: {reply!r}; stderr: {self.last_stderr}"
            raise AssertionError(message) from None


# ------------------------------------------------------------------------------------------
# the file itself
# ------------------------------------------------------------------------------------------


def test_every_action_is_complete() -> None:
    cnf = load_actions()
    assert cnf.sections(), "no actions"
    for name in cnf.sections():
        action = dict(cnf.items(name))
        assert {"command", "type", "message"} <= action.keys(), name
        assert action["type"] in ("script", "script_output"), name
        assert action["command"].strip(), name
        assert "." not in name, f"[{name}] would become a 3-level action"
        # our installed programs: configd scripts and the agent's rc.d script (src/X -> /usr/local/X)
        programs = re.findall(r"/usr/local/((?:opnsense/scripts/ha|etc/rc\.d)/[^\s;]+)", action["command"])
        assert programs, f"[{name}] does not call one of our scripts"
        for program in programs:
            path = REPO / "src" / program
            assert path.is_file() and os.access(path, os.X_OK), f"[{name}] {path} missing or not executable"
        if "cache_ttl" in action:
            assert action["type"] == "script_output" and action["cache_ttl"].isdigit(), name
        # the syslog message formats with any number of parameters (configd pads with '')
        for count in range(4):
            log_message(action, ["x"] * count)


def test_cron_selectable_actions_have_descriptions() -> None:
    cnf = load_actions()
    described = {name for name in cnf.sections() if dict(cnf.items(name)).get("description", "").strip()}
    assert described == CRON_SELECTABLE


def test_services_are_cached_five_seconds() -> None:
    assert dict(load_actions().items("services"))["cache_ttl"] == "5"


def test_reconfigure_backup_is_serialised_with_flock() -> None:
    command = dict(load_actions().items("reconfigure_backup"))["command"]
    argv = shlex.split(command)
    assert argv[0] == "flock" and "-n" in argv
    assert argv[-1] == INSTALLED_SCRIPTS + "ha_reconfigure_backup.py"


def test_configd_quoting_rule() -> None:
    action = {"command": "/x", "parameters": "%s %s %s"}
    assert build_command(action, ["restart", "it's", "1"]) == "/x 'restart' 'it'\"'\"'s' '1'"
    assert build_command(action, ["restart"]) == "/x 'restart' '' ''"
    with pytest.raises(TypeError, match="Parameter mismatch"):
        build_command(action, ["a", "b", "c", "d"])
    assert build_command({"command": "/x", "parameters": ""}, ["ignored"]) == "/x "
    assert build_command({"command": "/x"}, []) == "/x"
    # what the shell makes of it: exactly the original strings, one argv element each
    hostile = ["a'; touch /tmp/pwned; '", "$(id)", "x y"]
    assert shlex.split(build_command(action, hostile))[1:] == hostile


# ------------------------------------------------------------------------------------------
# running the actions against a primary with a real backup agent
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    made = make_pair(tmp_path_factory.mktemp("configd"))
    services = ServicesDirBackend(made.services_dir, SubprocessRunner())
    yield made
    for service in services.list_services():
        if service.get("status") and not service.get("nocheck"):
            services.stop(service["name"], service.get("id", ""))


@pytest.fixture(scope="module")
def configd(pair: Pair) -> Iterator[Configd]:
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        env = dict(os.environ)
        env.update({
            "OPNSENSE_HA_CONF_DIR": str(pair.primary),
            "OPNSENSE_HA_LOCK_DIR": str(pair.primary.parent),
            "OPNSENSE_HA_FAILOVER": "none",
        })
        yield Configd(env)


def backup_revisions(pair: Pair) -> int:
    return len(ConfigStore(pair.backup).history())


def change_primary(pair: Pair, note: str) -> None:
    """Give the next sync something to send: a sync finds unchanged items by digest and skips them."""
    with ConfigStore(pair.primary).transaction(f"test: {note}") as root:
        alias = root.find("OPNsense/Firewall/Alias/aliases/alias/description")
        assert alias is not None
        alias.text = note


def test_sync_script(pair: Pair, configd: Configd) -> None:
    before = backup_revisions(pair)
    assert configd("sync") == "OK", configd.last_stderr
    assert backup_revisions(pair) == before + 1  # it really merged on the backup


def test_sync_script_reports_failure(pair: Pair, configd: Configd, tmp_path: Path) -> None:
    broken = tmp_path / "node"
    shutil.copytree(pair.primary, broken)
    with ConfigStore(broken).transaction("test: unreachable target") as root:
        node = root.find("hasync/synchronizetoip")
        assert node is not None
        node.text = "https://127.0.0.1:9/"  # discard port: nothing listens
    other = Configd({**configd.env, "OPNSENSE_HA_CONF_DIR": str(broken)})
    reply = other("sync")
    assert re.fullmatch(r"Error \(\d+\)", reply), reply
    assert "127.0.0.1" in other.last_stderr


def test_reconfigure_backup_runs_and_is_serialised(pair: Pair, configd: Configd) -> None:
    if shutil.which("flock") is None:
        pytest.skip("flock(1) is not installed")
    change_primary(pair, "changed before reconfigure_backup")
    before = backup_revisions(pair)
    assert configd("reconfigure_backup") == "OK", configd.last_stderr
    assert configd.last_stderr.strip()  # control: the script ran and reported its steps
    assert backup_revisions(pair) == before + 1
    # while another run holds the lock, a second one exits at once without doing anything
    lock = Path(configd.env["OPNSENSE_HA_LOCK_DIR"]) / "ha_reconfigure_backup.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert configd("reconfigure_backup") == "OK"
        assert configd.last_stderr.strip() == ""
    assert backup_revisions(pair) == before + 1


def test_version(configd: Configd) -> None:
    document = configd.json("version")
    firmware = document["response"]["firmware"]
    assert {"version", "_my_version"} <= firmware.keys()
    assert {"base", "kernel"} <= document["response"].keys()


def test_status(configd: Configd) -> None:
    document = configd.json("status")
    assert "firmware" in document["version"]
    assert {s["name"] for s in document["services"]} >= {"configd", "openvpn", "unbound"}


def test_services_list(pair: Pair, configd: Configd) -> None:
    document = configd.json("services")
    expected = ServicesDirBackend(pair.services_dir, SubprocessRunner()).list_services()
    assert [(s["name"], s.get("id")) for s in document["response"]] == [(s["name"], s.get("id")) for s in expected]
    for service in document["response"]:
        assert isinstance(service["status"], bool) and service["description"]


def test_exec_restart_by_id(pair: Pair, configd: Configd) -> None:
    document = configd.json("exec", "restart", "openvpn", "1")
    assert document == {"response": action_message("restart", "openvpn", "1"), "status": "ok"}
    backend = ServicesDirBackend(pair.services_dir, SubprocessRunner())
    assert next(s for s in backend.list_services() if s["name"] == "openvpn")["status"] is True


@pytest.mark.parametrize("action", ["stop", "start"])
def test_exec_stop_start_without_id(pair: Pair, configd: Configd, action: str) -> None:
    # configd passes the missing id as '' (quoted empty string)
    document = configd.json("exec", action, "unbound")
    assert document == {"response": action_message(action, "unbound"), "status": "ok"}
    backend = ServicesDirBackend(pair.services_dir, SubprocessRunner())
    assert next(s for s in backend.list_services() if s["name"] == "unbound")["status"] is (action == "start")


def test_exec_unknown_service_is_an_answer(configd: Configd) -> None:
    document = configd.json("exec", "restart", "nosuch", "")
    assert document == {"response": unknown_service_message("nosuch"), "status": "ok"}


def test_exec_services_version_and_restart_all(configd: Configd) -> None:
    assert {s["name"] for s in configd.json("exec", "services")["response"]} >= {"openvpn", "unbound"}
    assert "_my_version" in configd.json("exec", "version")["response"]["firmware"]
    document = configd.json("exec", "restart_all")
    assert document["status"] == "ok" and document["count"] >= 2


def test_exec_errors_are_json(configd: Configd, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for parameters in [("bogus",), ("restart", "-x"), ("restart", f"a'; touch {marker}; '"),
                       ("restart", "openvpn", "$(touch " + str(marker) + ")")]:
        document = configd.json("exec", *parameters)
        assert document["status"] == "error" and document["message"], parameters
    assert not marker.exists()
    assert configd("exec", "restart", "openvpn", "1", "extra") == "Parameter mismatch"


def test_exec_sync(pair: Pair, configd: Configd) -> None:
    change_primary(pair, "changed before exec_sync")
    before = backup_revisions(pair)
    assert configd.json("exec", "exec_sync") == {"status": "done"}
    assert backup_revisions(pair) == before + 1


def test_exec_reload_templates(configd: Configd) -> None:
    assert configd.json("exec", "reload_templates") == {"status": "done"}


def test_options_lists_sync_items(configd: Configd) -> None:
    document = configd.json("options")
    assert isinstance(document, dict) and document
    assert {"users", "virtualip", "aliases"} <= document.keys()
    assert all(isinstance(v, str) and v for v in document.values())


def test_version_error_is_json_when_backup_is_down(pair: Pair, configd: Configd, tmp_path: Path) -> None:
    broken = tmp_path / "node"
    shutil.copytree(pair.primary, broken)
    with ConfigStore(broken).transaction("test: unreachable target") as root:
        node = root.find("hasync/synchronizetoip")
        assert node is not None
        node.text = "https://127.0.0.1:9/"
    other = Configd({**configd.env, "OPNSENSE_HA_CONF_DIR": str(broken)})
    for name in ("version", "services", "status"):
        document = other.json(name)
        assert document["status"] == "error" and "127.0.0.1" in document["message"], (name, document)


def test_check(configd: Configd) -> None:
    document = configd.json("check")
    assert isinstance(document, dict) and document.get("status") not in (None, "error"), document


def test_carp_and_pfsync_actions(configd: Configd) -> None:
    status = configd.json("carp_status")
    assert "carp" in status and "rows" in status
    assert configd.json("carp_maintenance", "enter")["status"] == "ok"
    assert configd.json("carp_status")["carp"]["maintenancemode"]
    assert configd.json("carp_maintenance", "leave")["status"] == "ok"
    assert not configd.json("carp_status")["carp"]["maintenancemode"]
    assert configd.json("carp_preempt", "on")["status"] == "ok"
    assert configd.json("carp_disable")["status"] == "ok"
    assert configd.json("carp_enable")["status"] == "ok"
    assert configd.json("carp_set_status", "maintenance")["status"] == "ok"
    assert configd.json("carp_set_status", "maintenance")["status"] == "ok"  # toggles back
    assert "pfsync" in configd.json("pfsync_status")
    assert configd.json("pfsync_apply")["status"] in ("ok", "unchanged")
    assert configd.json("boot")["status"] == "ok"
    assert configd("carp_event", "1@lo0", "MASTER") == "OK"


def test_carp_parameters_are_checked(configd: Configd) -> None:
    assert configd.json("carp_maintenance", "sideways")["status"] == "error"
    assert configd.json("carp_maintenance", "--conf-dir=/etc")["status"] == "error"
    assert configd.json("carp_maintenance")["status"] == "error"  # missing parameter arrives as ''
    assert configd("carp_event", "1@lo0", "-x") != "OK"


def test_unknown_action(configd: Configd) -> None:
    assert configd("nosuch") == "Action not found"
