"""Service backends: list, start, stop and restart services, reload templates, reconfigure the filter.

The agent answers `opnsense.list_services`, `opnsense.{start,stop,restart}_service`,
`opnsense.configd_reload_all_templates` and `opnsense.filter_configure` through one
`ServiceBackend`, so the same agent runs on an OPNsense box and on a Linux node:

* `OpnsenseServiceBackend` drives OPNsense itself: `pluginctl -S` (the JSON dump of the service
  registry; plain `pluginctl -s` without arguments prints bare names only), `pluginctl -s NAME
  ACTION [ID]` (which prints OPNsense's own message), and `configctl`.
* `ServicesDirBackend` manages real processes declared in a drop-in directory of JSON files
  (schema `schemas/service.schema.json`); the demo and the Linux lab use it.

Both return OPNsense's service record shape (`name`, `description`, `status` as a bool, optional
`id`, `pidfile`, `locked`, `nocheck` and recipes; `noshow` records hidden; sorted by name) and
OPNsense's exact messages: ``Service `unbound' has been restarted.``, ``Service `openvpn[1]' has
been restarted.``, ``Could not find unknown service `x'``. An unknown service is an answer, not an
error (as in OPNsense); a command that fails raises `ServiceError`, which the agent turns into a
fault naming the command, so a failed restart is never reported as success.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hasync.core import schemas
from hasync.core.errors import ConfigError, ServiceError
from hasync.core.osiface import Clock, CommandResult, CommandRunner, SystemClock
from hasync.core.php import php_truthy

if TYPE_CHECKING:  # validation imports it when a file is read: configd's scripts need only the names
    import jsonschema

log = logging.getLogger("hasync.services")

ACTIONS = ("start", "stop", "restart")
_PAST = {"start": "started", "stop": "stopped", "restart": "restarted"}

# Names/ids we pass as argv to pluginctl: no leading '-' (PHP's getopt would read it as an option),
# no whitespace or control characters. Every real OPNsense service name and id fits.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")

DEFAULT_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 10.0
HOOKS_FILE = "hooks.json"
DAEMONIZE = Path(__file__).with_name("daemonize.py")


# --------------------------------------------------------------------------------------------
# OPNsense's wording
# --------------------------------------------------------------------------------------------


def php_htmlspecialchars(text: str) -> str:
    """PHP 8's htmlspecialchars() with its defaults (ENT_QUOTES): OPNsense escapes names this way."""
    for char, entity in (("&", "&amp;"), ('"', "&quot;"), ("'", "&#039;"), ("<", "&lt;"), (">", "&gt;")):
        text = text.replace(char, entity)
    return text


def service_label(name: str, service_id: str | None = None) -> str:
    """`name`, or `name[id]` for one instance of a multi-instance service."""
    return f"{name}[{service_id}]" if service_id else name


def action_message(action: str, name: str, service_id: str | None = None) -> str:
    """``Service `openvpn[1]' has been restarted.`` and the start/stop variants."""
    return f"Service `{php_htmlspecialchars(service_label(name, service_id))}' has been {_PAST[action]}."


def unknown_service_message(name: str) -> str:
    return f"Could not find unknown service `{php_htmlspecialchars(name)}'"


def _id_key(service_id: str) -> tuple[int, int, str]:
    return (0, int(service_id), "") if service_id.isdigit() else (1, 0, service_id)


def sort_services(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """By name, then instance id (numeric ids numerically), as the status page lists them."""
    return sorted(records, key=lambda r: (str(r.get("name", "")), _id_key(str(r.get("id", "") or ""))))


def _tail(result: CommandResult) -> str:
    text = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return text[-1][:300] if text else "(no output)"


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class ServiceBackend(ABC):
    """What the agent needs from the node's service manager."""

    @abstractmethod
    def list_services(self) -> list[dict[str, Any]]:
        """Service records, OPNsense's shape, sorted by name, `noshow` ones left out."""

    @abstractmethod
    def start(self, name: str, service_id: str | None = None) -> str:
        """Start one service (the first one of that name when `service_id` is empty); OPNsense's message."""

    @abstractmethod
    def stop(self, name: str, service_id: str | None = None) -> str: ...

    @abstractmethod
    def restart(self, name: str, service_id: str | None = None) -> str: ...

    @abstractmethod
    def reload_templates(self) -> None:
        """Re-render every configuration template (configd `template reload *`)."""

    @abstractmethod
    def filter_configure(self) -> None:
        """Reload routing, the DNS resolver and the packet filter (OPNsense's `filter_configure`)."""

    def action(self, action: str, name: str, service_id: str | None = None) -> str:
        """`start`/`stop`/`restart` by name, for callers that hold the action as a string."""
        if action not in ACTIONS:
            raise ServiceError(f"unknown service action {action!r}: use one of {', '.join(ACTIONS)}")
        result: str = getattr(self, action)(name, service_id)
        return result


# --------------------------------------------------------------------------------------------
# OPNsense: pluginctl / configctl
# --------------------------------------------------------------------------------------------

_CONFIGD_FAILURES = ("Error (", "Execute error", "Action not found", "Action not allowed", "Parameter mismatch")


class OpnsenseServiceBackend(ServiceBackend):
    """OPNsense's own service registry and control, through `pluginctl` and `configctl`."""

    def __init__(
        self,
        runner: CommandRunner,
        *,
        pluginctl: str = "/usr/local/sbin/pluginctl",
        configctl: str = "/usr/local/sbin/configctl",
        pgrep: str = "/bin/pgrep",
        timeout: float = 120.0,
    ) -> None:
        self.runner = runner
        self.pluginctl = pluginctl
        self.configctl = configctl
        self.pgrep = pgrep
        self.timeout = timeout

    def list_services(self) -> list[dict[str, Any]]:
        result = self.runner.run([self.pluginctl, "-S"], timeout=self.timeout)
        if not result.ok:
            raise ServiceError(f"{self.pluginctl} -S failed with exit status {result.returncode}: {_tail(result)}")
        try:
            data = json.loads(result.stdout)
        except ValueError:
            lines = result.stdout.strip().splitlines()
            first = lines[0][:100] if lines else ""
            raise ServiceError(
                f"{self.pluginctl} -S did not print the JSON service list (first line: {first!r});"
                " this OPNsense may be too old for opnsense-ha's OPNsense backend"
            ) from None
        if isinstance(data, dict):
            entries: list[Any] = []
            for key, value in data.items():
                if isinstance(value, dict) and "name" not in value:
                    value = {"name": str(key), **value}
                entries.append(value)
        elif isinstance(data, list):
            entries = data
        else:
            raise ServiceError(f"{self.pluginctl} -S printed {type(data).__name__}, expected a list of services")
        records = []
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
                log.warning("ignoring a malformed service record from pluginctl -S: %.200r", entry)
                continue
            if php_truthy(entry.get("noshow")):
                continue
            records.append(self._normalise(entry))
        return sort_services(records)

    def _normalise(self, entry: dict[str, Any]) -> dict[str, Any]:
        record = dict(entry)
        record.setdefault("description", record["name"])
        if "id" in record:
            record["id"] = "" if record["id"] is None else str(record["id"])
            if not record["id"]:
                del record["id"]
        for flag in ("nocheck", "locked"):
            if flag in record:
                if php_truthy(record[flag]):
                    record[flag] = True
                else:
                    del record[flag]
        status = record.pop("status", None)
        record["status"] = bool(php_truthy(status)) if status is not None else self._status(record)
        return record

    def _status(self, record: Mapping[str, Any]) -> bool:
        """OPNsense's `service_status()`: nocheck → running; pidfile → `pgrep -nF`; else `pgrep -anx NAME`."""
        if record.get("nocheck"):
            return True
        pidfile = record.get("pidfile")
        if isinstance(pidfile, str) and pidfile:
            return self.runner.run([self.pgrep, "-nF", pidfile], timeout=10).ok
        return self.runner.run([self.pgrep, "-anx", str(record["name"])], timeout=10).ok

    def _control(self, action: str, name: str, service_id: str | None) -> str:
        service_id = service_id or ""
        if not NAME_RE.match(name) or (service_id and not ID_RE.match(service_id)):
            return unknown_service_message(name)
        argv = [self.pluginctl, "-s", name, action] + ([service_id] if service_id else [])
        result = self.runner.run(argv, timeout=self.timeout)
        lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
        if not result.ok or not lines:
            raise ServiceError(
                f"{shlex.join(argv)} failed with exit status {result.returncode}: {_tail(result)}"
            )
        return lines[-1]  # pluginctl prints OPNsense's message last

    def start(self, name: str, service_id: str | None = None) -> str:
        return self._control("start", name, service_id)

    def stop(self, name: str, service_id: str | None = None) -> str:
        return self._control("stop", name, service_id)

    def restart(self, name: str, service_id: str | None = None) -> str:
        return self._control("restart", name, service_id)

    def _configctl(self, *words: str) -> None:
        argv = [self.configctl, *words]
        result = self.runner.run(argv, timeout=self.timeout)
        answer = result.stdout.strip()
        if not result.ok or answer.startswith(_CONFIGD_FAILURES):
            raise ServiceError(f"{shlex.join(argv)} failed: {answer[:300] or _tail(result)}")

    def reload_templates(self) -> None:
        self._configctl("template", "reload", "*")

    def filter_configure(self) -> None:
        """Routing, then the resolver, then the filter, as OPNsense's XML-RPC handler does.

        Every step runs even when an earlier one failed (a broken route must not leave the new
        rules unloaded); the failures are reported together afterwards.
        """
        failures = []
        for words in (("interface", "routes", "configure"), ("dns", "reload"), ("filter", "reload")):
            try:
                self._configctl(*words)
            except ServiceError as exc:
                failures.append(str(exc))
        if failures:
            raise ServiceError("; ".join(failures))


# --------------------------------------------------------------------------------------------
# A directory of JSON service files
# --------------------------------------------------------------------------------------------


class ServiceDefinitionError(ConfigError):
    """A services-dir file is unreadable or breaks the schema; the message names file and field."""


@dataclass(frozen=True)
class ServiceSpec:
    """One validated service file, with placeholders expanded and paths made absolute."""

    source: Path
    name: str
    service_id: str
    description: str
    pidfile: Path | None
    status_command: tuple[str, ...] | None
    start: tuple[str, ...] | None
    stop: tuple[str, ...] | None
    restart: tuple[str, ...] | None
    daemon: bool
    log_file: Path | None
    timeout: float
    stop_timeout: float
    nocheck: bool
    locked: bool
    noshow: bool

    @property
    def label(self) -> str:
        return service_label(self.name, self.service_id)


def _expand(text: str, directory: Path) -> str:
    return text.replace("{dir}", str(directory)).replace("{python}", sys.executable)


def _argv(value: Any, directory: Path) -> tuple[str, ...] | None:
    return None if value is None else tuple(_expand(str(arg), directory) for arg in value)


def _path(value: Any, directory: Path) -> Path | None:
    if value is None:
        return None
    path = Path(_expand(str(value), directory))
    return path if path.is_absolute() else directory / path


def _schema_error(
    path: Path, errors: Iterable[jsonschema.ValidationError], schema: Mapping[str, Any]
) -> ServiceDefinitionError:
    """`file: field 'start/0': message` for the most useful of the schema errors.

    Missing required keys come first, then errors of one field, then the cross-field rules of the
    schema's `allOf`, which are reported with their own description instead of jsonschema's
    "is not valid under any of the given schemas".
    """

    def rank(error: jsonschema.ValidationError) -> tuple[int, str]:
        if error.validator == "required" and not error.absolute_path and error.relative_schema_path[0] == "required":
            return (0, error.message)
        return (1 if error.absolute_path else 2, error.message)

    error = sorted(errors, key=rank)[0]
    schema_path = list(error.relative_schema_path)
    if schema_path[:1] == ["allOf"] and len(schema_path) > 1:
        rule = schema["allOf"][int(schema_path[1])]
        return ServiceDefinitionError(f"{path}: top level: {rule.get('description', error.message)}")
    from jsonschema.exceptions import best_match

    best = best_match([error]) or error
    field = "/".join(str(p) for p in best.absolute_path)
    where = f"field '{field}'" if field else "top level"
    return ServiceDefinitionError(f"{path}: {where}: {best.message}")


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ServiceDefinitionError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ServiceDefinitionError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ServiceDefinitionError(f"{path}: line {exc.lineno} column {exc.colno}: invalid JSON: {exc.msg}") from None


def load_service_file(path: Path, directory: Path) -> ServiceSpec:
    data = _read_json(path)
    errors = schemas.errors("service", data)
    if errors:
        raise _schema_error(path, errors, schemas.load("service"))
    return ServiceSpec(
        source=path,
        name=data["name"],
        service_id=data.get("id", ""),
        description=data["description"],
        pidfile=_path(data.get("pidfile"), directory),
        status_command=_argv(data.get("status_command"), directory),
        start=_argv(data.get("start"), directory),
        stop=_argv(data.get("stop"), directory),
        restart=_argv(data.get("restart"), directory),
        daemon=bool(data.get("daemon", False)),
        log_file=_path(data.get("log_file"), directory),
        timeout=float(data.get("timeout", DEFAULT_TIMEOUT)),
        stop_timeout=float(data.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
        nocheck=bool(data.get("nocheck", False)),
        locked=bool(data.get("locked", False)),
        noshow=bool(data.get("noshow", False)),
    )


def load_services_dir(directory: Path) -> tuple[list[ServiceSpec], dict[str, list[tuple[str, ...]]], float]:
    """All service files of a directory (sorted by name, id) plus the hooks of `hooks.json`.

    Raises ServiceDefinitionError naming the file (and field) for the first problem found,
    including two files declaring the same name and id.
    """
    directory = directory.resolve()
    if not directory.is_dir():
        raise ServiceDefinitionError(f"{directory}: services directory does not exist")
    specs: list[ServiceSpec] = []
    seen: dict[tuple[str, str], Path] = {}
    hooks: dict[str, list[tuple[str, ...]]] = {}
    hooks_timeout = DEFAULT_TIMEOUT
    for path in sorted(directory.glob("*.json")):
        if path.name.startswith("."):
            continue
        if path.name == HOOKS_FILE:
            data = _read_json(path)
            errors = schemas.errors("service-hooks", data)
            if errors:
                raise _schema_error(path, errors, schemas.load("service-hooks"))
            for hook in ("reload_templates", "filter_configure"):
                hooks[hook] = [tuple(_expand(a, directory) for a in argv) for argv in data.get(hook, [])]
            hooks_timeout = float(data.get("timeout", DEFAULT_TIMEOUT))
            continue
        spec = load_service_file(path, directory)
        key = (spec.name, spec.service_id)
        if key in seen:
            raise ServiceDefinitionError(
                f"{path}: service {spec.label} is already defined in {seen[key].name}; give each instance its own id"
            )
        seen[key] = path
        specs.append(spec)
    specs.sort(key=lambda s: (s.name, _id_key(s.service_id)))
    return specs, hooks, hooks_timeout


def read_pidfile(path: Path) -> int | None:
    """The pid in a pid file, or None when the file is missing, empty or not a positive number."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    first = text.split()[0] if text else ""
    return int(first) if first.isdigit() and int(first) > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody reaped is not running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as exc:
        return exc.errno != errno.ESRCH
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (FreeBSD): kill(0) is the best we have
    state = stat.rsplit(")", 1)[-1].split()[:1]
    return state != ["Z"]


class ServicesDirBackend(ServiceBackend):
    """Services declared as JSON files in a directory (see `schemas/service.schema.json`).

    The directory is read again on every call, so a drop-in added or changed takes effect
    without restarting the agent; a broken file makes every call fail with a message naming the
    file and field (it is also checked at construction, so `serve` refuses to start with one).
    Actions are serialised: two restarts of the same daemon must not race on its pid file.
    """

    def __init__(
        self, services_dir: str | os.PathLike[str], runner: CommandRunner, *, clock: Clock | None = None
    ) -> None:
        self.services_dir = Path(services_dir)
        self.runner = runner
        self.clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._load()

    def _load(self) -> tuple[list[ServiceSpec], dict[str, list[tuple[str, ...]]], float]:
        return load_services_dir(self.services_dir)

    def specs(self) -> list[ServiceSpec]:
        return self._load()[0]

    # --- status --------------------------------------------------------------------------------

    def is_running(self, spec: ServiceSpec) -> bool:
        if spec.nocheck:
            return True
        if spec.status_command is not None:
            return self.runner.run(spec.status_command, timeout=spec.timeout).ok
        if spec.pidfile is not None:
            pid = read_pidfile(spec.pidfile)
            return pid is not None and pid_alive(pid)
        return False

    def list_services(self) -> list[dict[str, Any]]:
        records = []
        for spec in self.specs():
            if spec.noshow:
                continue
            record: dict[str, Any] = {"name": spec.name}
            if spec.service_id:
                record["id"] = spec.service_id
            record["description"] = spec.description
            if spec.pidfile is not None:
                record["pidfile"] = str(spec.pidfile)
            if spec.locked:
                record["locked"] = True
            if spec.nocheck:
                record["nocheck"] = True
            recipes = {
                action: [shlex.join(argv)]
                for action, argv in (("start", spec.start), ("stop", spec.stop), ("restart", spec.restart))
                if argv is not None
            }
            if recipes:
                record["mwexec"] = recipes
            record["status"] = self.is_running(spec)
            records.append(record)
        return sort_services(records)

    # --- actions -------------------------------------------------------------------------------

    def find(self, name: str, service_id: str | None = None) -> ServiceSpec | None:
        """First service of that name, or the instance with that id when one is given."""
        for spec in self.specs():
            if spec.name == name and (not service_id or spec.service_id == service_id):
                return spec
        return None

    def _act(self, action: str, name: str, service_id: str | None) -> str:
        spec = self.find(name, service_id or "")
        if spec is None:
            log.info("%s of unknown service %r (id %r) refused", action, name, service_id or "")
            return unknown_service_message(name)
        with self._lock:
            log.info("%s service %s (%s)", action, spec.label, spec.source.name)
            getattr(self, f"_{action}")(spec)
        return action_message(action, spec.name, spec.service_id)

    def start(self, name: str, service_id: str | None = None) -> str:
        return self._act("start", name, service_id)

    def stop(self, name: str, service_id: str | None = None) -> str:
        return self._act("stop", name, service_id)

    def restart(self, name: str, service_id: str | None = None) -> str:
        return self._act("restart", name, service_id)

    def _run(self, spec: ServiceSpec, action: str, argv: Sequence[str]) -> None:
        result = self.runner.run(argv, timeout=spec.timeout)
        if not result.ok:
            raise ServiceError(
                f"{action} of service {spec.label} ({spec.source.name}) failed: {shlex.join(argv)} "
                f"exited with status {result.returncode}: {_tail(result)}"
            )

    def _start(self, spec: ServiceSpec) -> None:
        if spec.daemon:
            assert spec.pidfile is not None and spec.start is not None  # schema guarantees both
            if self.is_running(spec):
                return  # one instance per pid file, as rc(8) scripts do
            argv = [sys.executable, str(DAEMONIZE), "--pidfile", str(spec.pidfile)]
            argv += ["--cwd", str(self.services_dir.resolve())]
            if spec.log_file is not None:
                argv += ["--log", str(spec.log_file)]
            self._run(spec, "start", [*argv, "--", *spec.start])
        elif spec.start is not None:
            self._run(spec, "start", spec.start)
        else:
            assert spec.restart is not None  # schema: start or restart
            self._run(spec, "start", spec.restart)

    def _stop(self, spec: ServiceSpec) -> None:
        if spec.stop is not None:
            self._run(spec, "stop", spec.stop)
            return
        assert spec.pidfile is not None  # schema: stop or pidfile
        pid = read_pidfile(spec.pidfile)
        if pid is None or not pid_alive(pid):
            if spec.daemon:
                with contextlib.suppress(FileNotFoundError):
                    spec.pidfile.unlink()
            return
        self._signal(spec, pid, signal.SIGTERM)
        if not self._wait_gone(pid, spec.stop_timeout):
            log.warning("service %s (pid %d) ignored SIGTERM for %gs; sending SIGKILL",
                        spec.label, pid, spec.stop_timeout)
            self._signal(spec, pid, signal.SIGKILL)
            if not self._wait_gone(pid, 5.0):
                raise ServiceError(f"stop of service {spec.label} failed: pid {pid} survived SIGKILL")
        if spec.daemon:
            with contextlib.suppress(FileNotFoundError):
                spec.pidfile.unlink()

    def _signal(self, spec: ServiceSpec, pid: int, sig: signal.Signals) -> None:
        """A daemon we started leads its own process group: signal the group, children included."""
        try:
            if spec.daemon and os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            raise ServiceError(f"stop of service {spec.label} failed: not allowed to signal pid {pid}: {exc}") from None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = self.clock.monotonic() + timeout
        while pid_alive(pid):
            if self.clock.monotonic() >= deadline:
                return False
            self.clock.sleep(0.05)
        return True

    def _restart(self, spec: ServiceSpec) -> None:
        if spec.restart is not None:
            self._run(spec, "restart", spec.restart)
            return
        if spec.nocheck or self.is_running(spec):
            self._stop(spec)
        self._start(spec)

    # --- hooks -----------------------------------------------------------------------------------

    def _hook(self, name: str) -> None:
        _specs, hooks, timeout = self._load()
        commands = hooks.get(name, [])
        if not commands:
            log.debug("no %s hook in %s/%s: nothing to do", name, self.services_dir, HOOKS_FILE)
        for argv in commands:
            result = self.runner.run(argv, timeout=timeout)
            if not result.ok:
                raise ServiceError(
                    f"{name} hook ({HOOKS_FILE}) failed: {shlex.join(argv)} exited with status "
                    f"{result.returncode}: {_tail(result)}"
                )

    def reload_templates(self) -> None:
        self._hook("reload_templates")

    def filter_configure(self) -> None:
        self._hook("filter_configure")
