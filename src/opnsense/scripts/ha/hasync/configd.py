"""What the configd scripts (`src/opnsense/scripts/ha/ha_*.py`, wired in `actions_ha.conf`) run.

configd calls a script with its parameters already shell-quoted, and turns the result into its
reply: a `script` action answers `OK` or `Error (<exit status>)`; a `script_output` action answers
stdout, but only when the exit status is 0 (otherwise just `Execute error`, and stderr goes to
syslog). OPNsense's own `ha_xmlrpc_exec.php` therefore always exits 0 and reports failures inside
its JSON (`{"status": "error", "message": ...}`). `run_json` gives our JSON actions the same
contract on top of the CLI, whose exit status stays meaningful for humans and cron.

The conf dir is `/conf` unless `OPNSENSE_HA_CONF_DIR` says otherwise (tests and the Linux lab
point it at their node directories); `OPNSENSE_HA_ITEMS_DIR` likewise adds plugin sync items.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Sequence

from hasync import cli
from hasync.services.backends import ID_RE, NAME_RE

CONF_DIR_ENV = "OPNSENSE_HA_CONF_DIR"
ITEMS_DIR_ENV = "OPNSENSE_HA_ITEMS_DIR"
DEFAULT_CONF_DIR = "/conf"

EXEC_USAGE = (
    "usage ha_exec.py action [service [id]] "
    "(action: start|stop|restart|restart_all|services|version|reload_templates|exec_sync)"
)


def global_args() -> list[str]:
    args = ["--conf-dir", os.environ.get(CONF_DIR_ENV) or DEFAULT_CONF_DIR]
    items_dir = os.environ.get(ITEMS_DIR_ENV)
    if items_dir:
        args += ["--items-dir", items_dir]
    return args


#: How every configd script ends: `cli.exit_process` (no garbage collection at the process's exit).
exit_process = cli.exit_process


def run_cli(argv: Sequence[str]) -> tuple[int, str, str]:
    """Run `opnsense-ha <global options> argv` in-process; (exit status, stdout, stderr).

    stderr is also passed on to our own stderr, so configd still logs it.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([*global_args(), *argv], ends_process=True)
        except SystemExit as exc:  # argparse: bad arguments, --help
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    sys.stderr.write(err.getvalue())
    sys.stderr.flush()
    return code, out.getvalue(), err.getvalue()


def run_script(argv: Sequence[str]) -> int:
    """For `type:script` actions: the CLI's own exit status is the answer (OK / Error (n))."""
    try:
        return cli.main([*global_args(), *argv], ends_process=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


def _error_message(stderr: str, stdout: str, code: int) -> str:
    for text in (stderr, stdout):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines:
            last = lines[-1]
            for prefix in ("opnsense-ha: error: ", "opnsense-ha: "):
                if last.startswith(prefix):
                    return last[len(prefix):]
            return last
    return f"opnsense-ha exited with status {code} and no message"


def print_error(message: str) -> int:
    print(json.dumps({"status": "error", "message": message}))
    return 0


def run_json(argv: Sequence[str]) -> int:
    """For `type:script_output` actions: always exit 0 with one JSON document on stdout.

    The CLI's JSON (including its own error documents) passes through unchanged; a failure that
    printed no JSON becomes `{"status": "error", "message": <its last stderr line>}`.
    """
    code, stdout, stderr = run_cli(argv)
    try:
        document = json.loads(stdout)
    except ValueError:
        document = None
    if isinstance(document, dict | list):
        sys.stdout.write(stdout if stdout.endswith("\n") else stdout + "\n")
        return 0
    return print_error(_error_message(stderr, stdout, code))


def exec_action(args: Sequence[str]) -> int:
    """`configctl ha exec <action> <service> <id>`: the contract of OPNsense's `ha_xmlrpc_exec.php`.

    start/stop/restart first sync, reload templates, then act on the backup (the status page's
    sequence, done by `opnsense-ha services ACTION`) and answer `{"response": msg, "status": "ok"}`.
    Arguments are checked here before anything runs, since they come from the GUI/API.
    """
    action, service, service_id = [*args, "", "", ""][:3]
    if len(args) > 3:
        return print_error(EXEC_USAGE)
    if action in ("start", "stop", "restart"):
        if not NAME_RE.match(service):
            return print_error(f"invalid service name {service[:64]!r}")
        if service_id and not ID_RE.match(service_id):
            return print_error(f"invalid service id {service_id[:64]!r}")
        return run_json(["services", action, service, *([service_id] if service_id else [])])
    if action == "restart_all":
        return run_json(["services", "restart-all"])
    if action == "services":
        return run_json(["services", "list"])
    if action == "version":
        return run_json(["version"])
    if action == "reload_templates":
        return run_json(["services", "reload-templates"])
    if action == "exec_sync":
        code, _stdout, stderr = run_cli(["sync"])
        if code != 0:
            return print_error(_error_message(stderr, "", code))
        print(json.dumps({"status": "done"}))
        return 0
    return print_error(EXEC_USAGE)


# subcommand -> (CLI argv, number of configd parameters, JSON action?)
CARP_ACTIONS: dict[str, tuple[list[str], int, bool]] = {
    "status": (["carp", "status", "--json"], 0, True),
    "maintenance": (["carp", "maintenance"], 1, True),
    "set-status": (["carp", "set-status"], 1, True),
    "preempt": (["carp", "preempt"], 1, True),
    "disable": (["carp", "disable"], 0, True),
    "enable": (["carp", "enable"], 0, True),
    "event": (["carp", "event"], 2, False),
}
PFSYNC_ACTIONS: dict[str, tuple[list[str], int, bool]] = {
    "status": (["pfsync", "status", "--json"], 0, True),
    "apply": (["pfsync", "apply", "--json"], 0, True),
}


def family_action(family: str, table: dict[str, tuple[list[str], int, bool]], args: Sequence[str]) -> int:
    """`carp|pfsync <subcommand> [parameters]` for configd: listed subcommands with their exact arity.

    configd passes each parameter as one argv element (missing ones as ''); one that starts with
    '-' would be read by argparse as an option, so it is refused instead of passed on.
    """
    if not args or args[0] not in table:
        return print_error(f"usage: {family} {'|'.join(table)} [parameters]")
    argv, arity, as_json = table[args[0]]
    rest = [a for a in args[1:] if a != ""]
    if len(rest) != arity or any(a.startswith("-") for a in rest):
        message = f"{family} {args[0]}: expected {arity} parameter(s), got {rest!r}"
        if as_json:
            return print_error(message)
        print(message, file=sys.stderr)
        return 2
    return run_json([*argv, *rest]) if as_json else run_script([*argv, *rest])
