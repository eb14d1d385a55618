"""The repository is an opnsense/plugins plugin: BSD make with their `Mk/` installs it, configd runs it.

The tracked files (`git ls-files`, so no caches or virtualenvs) are copied to `<tmp>/sysutils/
opnsense-ha/` beside copies of opnsense/plugins' `Mk/`, `Templates/` and `Scripts/` from
`../shared/anchors/opnsense-plugins`, in a fresh git repository as in a plugins checkout; then
`bmake install DESTDIR=<root>` and `bmake plist` run exactly as OPNsense's build runs them. The
installed tree is checked by rule (every file of `src/` under /usr/local, scripts executable,
nothing of the development tree), not against a frozen list. OPNsense's real configd (from
`../shared/anchors/opnsense-core`) then runs the *installed* `actions_ha.conf` against a node.

Skips cleanly without `../shared`, bmake, git or php.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from hasync.cli.commands.agent import AgentSettings
from hasync.config.store import parse_config_bytes, serialize
from support.paths import FIXTURES, REPO, SHARED

_plugins = SHARED / "anchors" / "opnsense-plugins"
_core_service = SHARED / "anchors" / "opnsense-core" / "src" / "opnsense" / "service"
PLUGINS = _plugins if (_plugins / "Mk" / "plugins.mk").is_file() else None
CORE_SERVICE = _core_service if (_core_service / "configd.py").is_file() else None
BMAKE = shutil.which("bmake")
PHP = shutil.which("php")
PLUGIN_DIR = "opnsense-ha"

# PyPI name -> FreeBSD port (origin); PLUGIN_DEPENDS names the package py${PLUGIN_PYTHON}-<port name>.
FREEBSD_PORTS = {
    "lxml": "devel/py-lxml",
    "jsonschema": "devel/py-jsonschema",
    "bcrypt": "security/py-bcrypt",
    "passlib": "security/py-passlib",
    "cryptography": "security/py-cryptography",
}
# Development-only parts of the repository: none of it may reach a firewall.
NEVER_INSTALLED = re.compile(r"(^|/)(tests|bench|fixtures|__pycache__|\.venv|[^/]*\.egg-info|\.pytest_cache"
                             r"|\.mypy_cache|\.ruff_cache|\.hypothesis)(/|$)|\.pyc$")

needs_bmake = pytest.mark.skipif(
    PLUGINS is None or BMAKE is None or shutil.which("git") is None,
    reason="needs ../shared/anchors/opnsense-plugins, bmake (Debian: apt-get install bmake) and git",
)


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (REPO / name).exists()]


def bmake(plugin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BMAKE), "-C", str(plugin), "PLUGIN_PYTHON=311", "PLUGIN_PHP=82", *args],
        capture_output=True, text=True, timeout=120,
    )


class Installed:
    def __init__(self, plugin: Path, root: Path, plist: list[str]) -> None:
        self.plugin, self.root, self.plist = plugin, root, plist
        self.local = root / "usr" / "local"

    def files(self) -> set[str]:
        return {"/" + str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if PLUGINS is None or BMAKE is None or shutil.which("git") is None:
        pytest.skip("needs ../shared/anchors/opnsense-plugins, bmake and git")
    tree = tmp_path_factory.mktemp("plugins")
    for part in ("Mk", "Templates", "Scripts"):
        shutil.copytree(PLUGINS / part, tree / part)
    plugin = tree / "sysutils" / PLUGIN_DIR
    for name in tracked_files():
        target = plugin / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)  # keeps the mode: the package's executables are git's
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=tree, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tree, check=True)
    subprocess.run([*git, "commit", "-qm", "plugins checkout"], cwd=tree, check=True)
    root = tree / "root"
    proc = bmake(plugin, "install", f"DESTDIR={root}")
    assert proc.returncode == 0, proc.stderr
    proc = bmake(plugin, "plist")
    assert proc.returncode == 0, proc.stderr
    return Installed(plugin, root, proc.stdout.split())


@needs_bmake
def test_install_puts_every_src_file_under_usr_local_and_nothing_else(installed: Installed) -> None:
    expected = {f"/usr/local/{name[len('src/'):]}" for name in tracked_files() if name.startswith("src/")}
    expected.add(f"/usr/local/opnsense/version/{PLUGIN_DIR}")  # written by plugins.mk
    assert installed.files() == expected
    assert set(installed.plist) == expected  # the package's file list is what was installed


@needs_bmake
def test_runtime_parts_are_installed_and_development_parts_are_not(installed: Installed) -> None:
    files = installed.files()
    scripts = {p.name for p in (REPO / "src/opnsense/scripts/ha").glob("ha_*.py")}
    assert {"ha_sync.py", "ha_serve.py", "ha_check.py"} <= scripts
    required = {f"/usr/local/opnsense/scripts/ha/{name}" for name in scripts} | {
        "/usr/local/opnsense/scripts/ha/hasync/__init__.py",
        "/usr/local/opnsense/scripts/ha/hasync/cli/__init__.py",
        "/usr/local/opnsense/scripts/ha/hasync/services/daemonize.py",
        "/usr/local/opnsense/service/conf/actions.d/actions_ha.conf",
        "/usr/local/etc/inc/plugins.inc.d/opnsense_ha.inc",
        "/usr/local/etc/rc.d/opnsense_ha",
        "/usr/local/etc/rc.syshook.d/early/85-opnsense-ha",
        "/usr/local/etc/rc.syshook.d/carp/20-opnsense-ha",
        "/usr/local/sbin/opnsense-ha",
        "/usr/local/opnsense/service/templates/OPNsense/HaSync/+TARGETS",
    }
    assert required <= files, sorted(required - files)
    # the package data the engine loads at run time
    items_dir = "/usr/local/opnsense/scripts/ha/hasync/config/items.d/"
    assert any(f.startswith(items_dir) and f.endswith(".json") for f in files)
    assert any(f.startswith("/usr/local/opnsense/scripts/ha/hasync/core/schemas/") for f in files)
    leaked = sorted(f for f in files if NEVER_INSTALLED.search(f))
    assert not leaked, leaked
    assert all(f.startswith("/usr/local/") for f in files)


@needs_bmake
def test_programs_are_executable_and_data_is_not(installed: Installed) -> None:
    for name in installed.files():
        path = installed.root / name.lstrip("/")
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        has_shebang = path.read_bytes()[:2] == b"#!"
        assert executable == has_shebang, f"{name}: executable={executable}, shebang={has_shebang}"
        assert not path.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH), f"{name} is group/world-writable"


def test_control_the_executable_rule_sees_a_lost_mode(tmp_path: Path) -> None:
    """Control for the rule above: a hook without its x bit (as from a mode-losing copy) is caught."""
    hook = tmp_path / "20-x"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    assert not hook.stat().st_mode & stat.S_IXUSR and hook.read_bytes()[:2] == b"#!"


@needs_bmake
def test_version_file_and_metadata(installed: Installed) -> None:
    version = json.loads((installed.local / "opnsense/version" / PLUGIN_DIR).read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version["product_name"] == PLUGIN_DIR
    assert version["product_version"].split("_")[0] == project["version"]  # one version for both
    assert version["product_id"] in (f"os-{PLUGIN_DIR}", f"os-{PLUGIN_DIR}-devel")
    proc = bmake(installed.plugin, "-V", "${PLUGIN_DEPENDS}")
    depends = proc.stdout.split()
    runtime = [re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in project["dependencies"]]
    assert sorted(runtime) == sorted(FREEBSD_PORTS), "every runtime dependency needs a known FreeBSD port"
    assert sorted(depends) == sorted(f"py311-{FREEBSD_PORTS[name].split('/py-')[1]}" for name in runtime)
    readme = (REPO / "README.md").read_text()
    for name, port in FREEBSD_PORTS.items():
        assert port in readme, f"README does not name the port of {name}"
    descr = (REPO / "pkg-descr").read_text()
    assert "Plugin Changelog" in descr and f"\n{project['version']}\n" in descr


@needs_bmake
def test_plist_skips_nothing_that_install_copies(installed: Installed) -> None:
    """`make package` builds its plist with `plist`: a file installed but not listed would be left
    behind by `pkg delete`; every listed file must be installed, or `pkg create` fails."""
    assert sorted(installed.plist) == sorted(installed.files())


# ------------------------------------------------------------------------------------------
# static checks of the non-Python parts: sh -n, php -l
# ------------------------------------------------------------------------------------------

SHELL_SCRIPTS = [p for p in (REPO / "src" / "etc").rglob("*") if p.is_file() and p.read_bytes()[:9] == b"#!/bin/sh"]


def test_shell_scripts_exist() -> None:
    names = {p.name for p in SHELL_SCRIPTS}
    assert {"opnsense_ha", "85-opnsense-ha", "20-opnsense-ha"} <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script: Path) -> None:
    sh = shutil.which("dash") or shutil.which("sh")  # a POSIX sh, as FreeBSD's /bin/sh
    assert sh is not None
    proc = subprocess.run([sh, "-n", str(script)], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def test_sh_n_catches_a_syntax_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nif true; then\n")
    sh = shutil.which("dash") or shutil.which("sh")
    assert subprocess.run([str(sh), "-n", str(broken)], capture_output=True, timeout=10).returncode != 0


needs_php = pytest.mark.skipif(PHP is None, reason="needs php-cli (Debian: apt-get install php-cli)")
INC = REPO / "src" / "etc" / "inc" / "plugins.inc.d" / "opnsense_ha.inc"

# The two OPNsense functions the .inc calls, as small as they can be: gettext() is PHP's own (or
# identity), and Config::getInstance()->object() is config.xml as SimpleXML.
PHP_STUBS = r"""<?php
namespace OPNsense\Core {
    class Config {
        private static $instance = null;
        public static function getInstance() { return self::$instance ?? (self::$instance = new Config()); }
        public function object() { return simplexml_load_file(getenv('CONFIG_XML')); }
    }
}
namespace {
    if (!function_exists('gettext')) { function gettext($text) { return $text; } }
    require_once getenv('PLUGIN_INC');
    echo json_encode(['services' => opnsense_ha_services(), 'syslog' => opnsense_ha_syslog()]);
}
"""


@needs_php
def test_inc_is_valid_php() -> None:
    proc = subprocess.run([str(PHP), "-l", str(INC)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def run_inc(tmp_path: Path, agent_enabled: str | None) -> dict[str, object]:
    root = parse_config_bytes((FIXTURES / "configs" / "backup.xml").read_bytes(), "backup.xml")
    if agent_enabled is not None:  # written as `opnsense-ha agent set` writes it
        AgentSettings(enabled=agent_enabled == "1").write(root)
    (tmp_path / "config.xml").write_bytes(serialize(root))
    (tmp_path / "run.php").write_text(PHP_STUBS)
    env = {**os.environ, "CONFIG_XML": str(tmp_path / "config.xml"), "PLUGIN_INC": str(INC)}
    proc = subprocess.run([str(PHP), str(tmp_path / "run.php")], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@needs_php
def test_inc_registers_the_agent_as_a_service_when_enabled(tmp_path: Path) -> None:
    result = run_inc(tmp_path, "1")
    [service] = result["services"]  # type: ignore[misc]
    assert service["name"] == "opnsense-ha" and service["description"]
    assert service["pidfile"] == "/var/run/opnsense_ha.pid"
    # the configd recipes name real actions of our actions_ha.conf
    actions = configparser.RawConfigParser()
    actions.read(REPO / "src/opnsense/service/conf/actions.d/actions_ha.conf")
    for verb in ("start", "stop", "restart"):
        [command] = service["configd"][verb]
        topic, action = command.split(" ", 1)
        assert topic == "ha" and actions.has_section(action), command
    # the pid file is the one the rc.d script writes
    assert 'pidfile="/var/run/${name}.pid"' in (REPO / "src/etc/rc.d/opnsense_ha").read_text()
    assert result["syslog"] == {"hasync": {"facility": ["opnsense-ha"]}}


@needs_php
@pytest.mark.parametrize("enabled", [None, "0"])
def test_inc_lists_no_service_where_the_agent_is_off(tmp_path: Path, enabled: str | None) -> None:
    assert run_inc(tmp_path, enabled)["services"] == []


# ------------------------------------------------------------------------------------------
# OPNsense's configd running the installed actions
# ------------------------------------------------------------------------------------------


def configd_call(sock_path: Path, command: str, timeout: float = 120) -> str:
    """configd_ctl.py's exchange: send the command, read until configd's end marker."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(sock_path))
        sock.sendall(command.encode())
        data = b""
        while not data.endswith(b"\n\n\n") and b"\x00\x00\x00" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.replace(b"\x00\x00\x00", b"").decode().strip()


@pytest.fixture
def configd(installed: Installed, tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if CORE_SERVICE is None or importlib.util.find_spec("jinja2") is None:
        pytest.skip("needs ../shared/anchors/opnsense-core and jinja2 (the dev extra) for OPNsense's configd")
    service = tmp_path / "service"
    shutil.copytree(CORE_SERVICE, service, ignore=shutil.ignore_patterns("actions_*.conf", "__pycache__"))
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(FIXTURES / "configs" / "backup.xml", node / "config.xml")
    sock_path = tmp_path / "configd.sock"
    (service / "conf" / "configd.conf").write_text(
        "[main]\n"
        f"socket_filename:{sock_path}\n"
        f"pid_filename:{tmp_path / 'configd.pid'}\n\n"
        "[environment]\n"
        f"PATH={os.environ.get('PATH', '/usr/bin:/bin')}\n"
        f"OPNSENSE_HA_CONF_DIR={node}\n"
        "OPNSENSE_HA_FAILOVER=none\n"
        "PYTHONDONTWRITEBYTECODE=1\n"
    )
    # The installed file, unchanged but for two facts of this machine: the package root is
    # DESTDIR, and there is no /usr/local/bin/python3 for the scripts' #! line.
    actions = (installed.local / "opnsense/service/conf/actions.d/actions_ha.conf").read_text()
    actions = re.sub(r"/usr/local/(opnsense/scripts/ha/\S+\.py)",
                     lambda m: f"{sys.executable} {installed.local / m.group(1)}", actions)
    (service / "conf" / "actions.d").mkdir(exist_ok=True)
    (service / "conf" / "actions.d" / "actions_ha.conf").write_text(actions)
    log = tmp_path / "configd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(service / "configd.py"), "console"], cwd=service,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not sock_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"configd did not start: {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield sock_path, node
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@needs_bmake
def test_real_configd_runs_the_installed_actions(configd: tuple[Path, Path]) -> None:
    sock_path, _node = configd
    options = json.loads(configd_call(sock_path, "ha options"))
    assert "aliases" in options  # the sync items, read by the installed hasync package
    carp = json.loads(configd_call(sock_path, "ha carp_status"))
    assert isinstance(carp, dict)
    check = json.loads(configd_call(sock_path, "ha check"))
    assert "status" in check or "checks" in check
    assert configd_call(sock_path, "ha no_such_action").startswith("Action not")


# ------------------------------------------------------------------------------------------
# the agent's settings: config.xml -> OPNsense's template engine -> rc.conf.d -> sh
# ------------------------------------------------------------------------------------------


def render_rc_conf(installed: Installed, tmp_path: Path, config: Path) -> dict[str, str]:
    """Render the installed OPNsense/HaSync template with configd's own Template class, then read
    the result the way rc.subr does: sourced by sh."""
    if CORE_SERVICE is None or importlib.util.find_spec("jinja2") is None:
        pytest.skip("needs ../shared/anchors/opnsense-core and jinja2 (the dev extra) for OPNsense's templates")
    service = tmp_path / "service"
    shutil.copytree(CORE_SERVICE / "modules", service / "modules", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(installed.local / "opnsense/service/templates", service / "templates")
    out = tmp_path / "out"
    code = ("import sys; from modules.template import Template; from modules.config import Config; "
            "t = Template(sys.argv[2]); t.set_config(Config(sys.argv[1]).get()); print(t.generate('OPNsense/HaSync'))")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(config), str(out) + "/"], cwd=service,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    rendered = out / "etc/rc.conf.d/opnsense_ha"
    assert rendered.is_file(), proc.stdout
    shell = ('. "$1"; printf "%s\\n%s\\n%s\\n" "$opnsense_ha_enable" "$opnsense_ha_listen" "$opnsense_ha_certref"')
    sh = shutil.which("dash") or shutil.which("sh")
    proc = subprocess.run([str(sh), "-c", shell, "sh", str(rendered)], capture_output=True, text=True, timeout=10,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    enable, listen, certref = proc.stdout.split("\n")[:3]
    return {"enable": enable, "listen": listen, "certref": certref}


def agent_cli(conf_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hasync", "--conf-dir", str(conf_dir), "agent", *args],
                          capture_output=True, text=True, timeout=60, cwd=REPO / "src/opnsense/scripts/ha")


@needs_bmake
def test_agent_settings_reach_rc_conf_d(installed: Installed, tmp_path: Path) -> None:
    node = tmp_path / "node"
    node.mkdir()
    shutil.copy(FIXTURES / "configs" / "backup.xml", node / "config.xml")
    assert render_rc_conf(installed, tmp_path / "r0", node / "config.xml") == {
        "enable": "NO", "listen": "0.0.0.0:8443", "certref": ""}  # nothing set: off, the defaults
    refid = next(c.findtext("refid") for c in parse_config_bytes((node / "config.xml").read_bytes(), "x")
                 .iterfind("cert") if c.findtext("prv"))
    proc = agent_cli(node, "set", "--enable", "--listen", "10.0.0.2", "--port", "9443", "--cert-ref", refid)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"enabled": True, "listen": "10.0.0.2", "port": 9443, "certref": refid}
    assert render_rc_conf(installed, tmp_path / "r1", node / "config.xml") == {
        "enable": "YES", "listen": "10.0.0.2:9443", "certref": refid}
    assert agent_cli(node, "set", "--listen", "fd00::2", "--cert-ref", "").returncode == 0
    assert render_rc_conf(installed, tmp_path / "r2", node / "config.xml") == {
        "enable": "YES", "listen": "[fd00::2]:9443", "certref": ""}


@needs_bmake
def test_rc_conf_d_quotes_what_config_xml_holds(installed: Installed, tmp_path: Path) -> None:
    """config.xml can be edited by hand: nothing in it may run as shell code when rc.d sources the file."""
    canary = tmp_path / "canary"
    root = parse_config_bytes((FIXTURES / "configs" / "backup.xml").read_bytes(), "backup.xml")
    hostile = f"x'\"; touch {canary}; $(touch {canary}) `touch {canary}`"
    AgentSettings(enabled=True, listen="", certref=hostile).write(root)
    (tmp_path / "config.xml").write_bytes(serialize(root))
    values = render_rc_conf(installed, tmp_path / "r", tmp_path / "config.xml")
    assert values["certref"] == hostile and not canary.exists()


def test_agent_set_refuses_bad_values_and_leaves_config_untouched(tmp_path: Path) -> None:
    shutil.copy(FIXTURES / "configs" / "backup.xml", tmp_path / "config.xml")
    before = (tmp_path / "config.xml").read_bytes()
    for args, message in ((["--listen", "10.0.0.300"], "not an IP address"), (["--port", "70000"], "out of range"),
                          (["--cert-ref", "nosuchref"], "no certificate")):
        proc = agent_cli(tmp_path, "set", "--enable", *args)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert (tmp_path / "config.xml").read_bytes() == before
    assert json.loads(agent_cli(tmp_path, "show").stdout)["enabled"] is False
    # control: a good value is written, with a revision naming the change
    assert agent_cli(tmp_path, "set", "--enable").returncode == 0
    assert (tmp_path / "config.xml").read_bytes() != before
    written = parse_config_bytes((tmp_path / "config.xml").read_bytes(), "x")
    assert written.findtext("OPNsense/opnsense_ha/enabled") == "1"
    assert "agent settings" in (written.findtext("revision/description") or "")


# ------------------------------------------------------------------------------------------
# the installed command line and CARP hook
# ------------------------------------------------------------------------------------------


@needs_bmake
def test_installed_carp_hook_runs_the_admins_scripts_through_the_installed_cli(
    installed: Installed, tmp_path: Path
) -> None:
    """OPNsense runs rc.syshook.d/carp/20-opnsense-ha with `<vhid>@<if> <STATE>`; it hands the event
    to the installed `opnsense-ha`, which finds its package relative to itself and runs the admin's
    scripts with the validated arguments."""
    hook_dir = tmp_path / "carp.d"
    hook_dir.mkdir()
    seen = tmp_path / "seen"
    script = hook_dir / "10-record"
    script.write_text(f'#!/bin/sh\necho "$1 $2" >> {seen}\n')
    script.chmod(0o755)
    hook = (installed.local / "etc/rc.syshook.d/carp/20-opnsense-ha").read_text()
    assert "/usr/local/sbin/opnsense-ha carp event --hook-dir /usr/local/etc/opnsense-ha/carp.d" in hook
    # this machine's facts: the package root is DESTDIR, python3 is this interpreter
    hook = hook.replace("/usr/local/sbin/opnsense-ha", f"{sys.executable} {installed.local / 'sbin/opnsense-ha'}")
    hook = hook.replace("/usr/local/etc/opnsense-ha/carp.d", str(hook_dir))
    (tmp_path / "hook").write_text(hook)
    sh = shutil.which("dash") or shutil.which("sh")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OPNSENSE_HA_FAILOVER": "none"}
    env.pop("PYTHONPATH", None)
    run = subprocess.run([str(sh), str(tmp_path / "hook"), "1@em0", "MASTER"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert seen.read_text() == "1@em0 MASTER\n"
    # a malformed event never reaches the scripts
    bad = subprocess.run([str(sh), str(tmp_path / "hook"), "1@em0; reboot", "MASTER"], capture_output=True,
                         text=True, timeout=60, env=env, cwd=tmp_path)
    assert bad.returncode != 0 and seen.read_text() == "1@em0 MASTER\n"


# ------------------------------------------------------------------------------------------
# package scripts (+POST_INSTALL, +PRE_DEINSTALL) as `make package` generates them
# ------------------------------------------------------------------------------------------

# plugins.mk lists template folders with BSD find: `-s` (walk in lexical order) and `-depth 2`
# (exactly two levels down). The stand-in gives GNU find the same: it drops `-s` and sorts the
# output, and spells `-depth N` as `-mindepth N -maxdepth N`.
FIND_S = """#!/bin/sh
depth=
for arg in "$@"; do
    shift
    if [ -n "$depth" ]; then set -- "$@" -mindepth "$arg" -maxdepth "$arg"; depth=; continue; fi
    case "$arg" in -s) ;; -depth) depth=1 ;; *) set -- "$@" "$arg" ;; esac
done
/usr/bin/find "$@" | LC_ALL=C sort
"""


@needs_bmake
def test_package_scripts_reload_configd_and_templates_and_handle_the_agent(
    installed: Installed, tmp_path: Path
) -> None:
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "find").write_text(FIND_S)
    (shim / "find").chmod(0o755)
    meta = tmp_path / "meta"
    meta.mkdir()
    proc = subprocess.run(
        [str(BMAKE), "-C", str(installed.plugin), "PLUGIN_PYTHON=311", "PLUGIN_PHP=82", "scripts", f"DESTDIR={meta}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PATH": f"{shim}:{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stderr
    post_install = (meta / "+POST_INSTALL").read_text()
    lines = [line for line in post_install.splitlines() if line.strip() and not line.startswith("#")]
    assert "/usr/local/etc/rc.d/configd restart" in lines[0]  # our actions_ha.conf is loaded
    assert "configctl template reload OPNsense/HaSync" in post_install  # rc.conf.d from config.xml
    assert "configctl template reload OPNsense/Syslog" in post_install  # the hasync log target
    # only then, on an upgrade, the running agent is restarted onto the new code
    assert post_install.index("OPNsense/HaSync") < post_install.index("opnsense_ha restart")
    pre_deinstall = (meta / "+PRE_DEINSTALL").read_text()
    assert "/usr/local/etc/rc.d/opnsense_ha onestop" in pre_deinstall
    sh = shutil.which("dash") or shutil.which("sh")
    for script in (meta / "+POST_INSTALL", meta / "+PRE_DEINSTALL"):
        assert subprocess.run([str(sh), "-n", str(script)], capture_output=True, timeout=10).returncode == 0
