"""The CLI imports only the module of the command being run (issue 12: start-up).

No timing here (that is `make bench`'s "no-op sync, CLI" row against a bare Python); what is
asserted is the structure that makes start-up cheap: a `sync` process never loads the agent, the
lab, the checks, jsonschema, cryptography or bcrypt, and every command still finds its module.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hasync import cli
from hasync.cli.commands import sync as sync_command
from hasync.core.fileio import RACY_WINDOW
from support.nodes import Pair, make_pair, running_agent
from support.paths import PACKAGE_ROOT, REPO

# the lab (halab) is no command of the product any more: it never loads, asserted here too
HEAVY = ("jsonschema", "cryptography", "bcrypt", "passlib", "hasync.agent", "halab", "hasync.health.checks",
         "hasync.health.diff", "hasync.agent.serve", "hasync.failover.linux")


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY a fresh interpreter has imported after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env,
                         timeout=60)
    loaded: list[str] = json.loads(out.stdout.splitlines()[-1])
    return loaded


@pytest.mark.parametrize("command", ["sync", "trust", "status", "payload", "items"])
def test_primary_commands_load_none_of_the_heavy_modules(command: str) -> None:
    assert loaded_after(f"from hasync import cli\ncli.build_parser({command!r})") == []


def test_configd_scripts_load_none_of_them() -> None:
    """Every `ha_*.py` configd script starts with `from hasync import configd`."""
    assert loaded_after("from hasync import configd") == []


def test_control_the_full_parser_loads_them() -> None:
    """Without a known command (`--help`, a typo) every command module is imported: the probe sees it."""
    assert set(loaded_after("from hasync import cli\ncli.build_parser(None)")) >= {"hasync.agent",
                                                                                 "hasync.health.checks"}


# What a no-op sync never needs: the merge and the failover layer, the standard library's temp
# files (only a write needs them) and processes (`opnsense-version` is looked for at its installed
# path, so no command runs where it is absent), ctypes (the agent's malloc setting), and
# dataclasses (its records are NamedTuples or plain classes: each dataclass costs ~0.5 ms to build).
NOT_IN_A_NO_OP = ("hasync.payload.merge", "hasync.failover.base", "tempfile", "subprocess", "ctypes", "dataclasses")

# What a no-op sync imports and runs past the parser (items, the digest cache, the snapshot),
# then a check that none of NOT_IN_A_NO_OP came with it.
NO_OP_IMPORTS = ("from hasync.config.items import SyncItemRegistry\nfrom hasync import cli\n"
                 "from hasync.sync import run, plan, snapshot\nfrom hasync.payload import digest\n"
                 "cli.build_parser('sync')\nSyncItemRegistry.load()\nimport sys\n"
                 f"loaded = [m for m in {NOT_IN_A_NO_OP!r} if m in sys.modules]\nassert not loaded, loaded")


def test_a_sync_run_loads_none_of_them_either() -> None:
    assert loaded_after(NO_OP_IMPORTS) == []


def test_control_the_check_sees_a_dataclass() -> None:
    with pytest.raises(subprocess.CalledProcessError):
        loaded_after("import dataclasses\n" + NO_OP_IMPORTS)


def sync_process(conf_dir: Path, *flags: str) -> tuple[int, list[str]]:
    """Run `opnsense-ha sync` in a fresh interpreter: its exit code and which of NOT_IN_A_NO_OP it loaded."""
    argv = ["--conf-dir", str(conf_dir), "sync", *flags]
    code = ("import json, sys\nfrom hasync import cli\n"
            f"code = cli.main({argv!r})\n"
            f"print(json.dumps([code, [m for m in {NOT_IN_A_NO_OP!r} if m in sys.modules]]))")
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "OPNSENSE_HA_FAILOVER": "none"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    exit_code, loaded = json.loads(out.stdout.splitlines()[-1])
    return exit_code, loaded


def age_past_racy_window(path: Path) -> None:
    """Set the file's mtime well before now, as for a config.xml not edited in the last minute."""
    then = time.time() - 60 * RACY_WINDOW
    os.utime(path, (then, then))


def test_a_real_no_op_sync_loads_none_of_what_it_never_needs(tmp_path: Path) -> None:
    """The whole run, not just the imports: probe over TLS, digests compared, snapshot read."""
    pair: Pair = make_pair(tmp_path)
    with running_agent(pair) as server:
        pair.point_primary_at(f"https://127.0.0.1:{server.server_address[1]}/")
        # config.xml just written is inside the digest cache's racy window (RACY_WINDOW): an entry
        # recorded then is not trusted, and the first run after the window checks the file by hash
        # and records the entry again (one write). Which sync that is depends on the machine's
        # speed (a CI run saw the third one write); aged past the window, none does.
        age_past_racy_window(pair.primary / "config.xml")
        code, loaded_by_full = sync_process(pair.primary, "--full")
        assert code == 0
        assert "tempfile" in loaded_by_full  # the control: it wrote the snapshot, and the probe saw it
        # the first digest-first sync computes this config version's digests and caches them
        # (a write); from then on a sync that finds nothing to send writes nothing either
        assert sync_process(pair.primary)[0] == 0
        code, loaded_by_noop = sync_process(pair.primary)
        assert code == 0
        assert loaded_by_noop == []


def test_every_command_is_found_in_the_module_that_registers_it() -> None:
    for name in cli.command_modules():
        parser = argparse.ArgumentParser()
        subparsers = parser.add_subparsers()
        importlib.import_module(f"hasync.cli.commands.{name}").register(subparsers)
        for command in subparsers.choices:
            assert cli.module_of(command) == name, (command, name)
    assert cli.module_of("nonsense") is None and cli.module_of(None) is None


@pytest.mark.parametrize(("argv", "command"), [
    (["--conf-dir", "/x", "sync", "--full"], "sync"),
    (["-v", "--items-dir", "/i", "carp", "maintenance", "enter"], "carp"),
    (["--help"], None),
    (["--conf-dir"], None),
])
def test_the_command_word_is_found_after_the_global_options(argv: list[str], command: str | None) -> None:
    assert cli.requested_command(argv) == command


def test_help_and_errors_still_list_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    err = capsys.readouterr().err
    for command in ("serve", "sync", "trust", "check", "history", "apply-payload"):
        assert repr(command) in err, command


EXIT_PROBE = """
import atexit, gc, sys
atexit.register(lambda: print(gc.get_freeze_count() > 0, flush=True))  # runs before the last collection
from hasync import cli
if sys.argv[1] == "exit_process":
    cli.exit_process(3)
sys.exit(3)
"""


@pytest.mark.parametrize(("how", "frozen"), [("exit_process", True), ("sys.exit", False)])
def test_a_process_ends_with_everything_frozen_for_the_last_collection(how: str, frozen: bool) -> None:
    """`exit_process` leaves the interpreter's exit collection nothing to walk; `sys.exit` is the control."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    out = subprocess.run([sys.executable, "-c", EXIT_PROBE, how], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 3
    assert out.stdout.strip() == str(frozen)


KEEP_PROBE = """
import sys
from hasync import cli
from hasync.core.memory import keep_until_exit

class Built:
    def __del__(self):
        print("freed", flush=True)

def command():
    built = Built()
    if sys.argv[1] == "kept":
        keep_until_exit(built)
    return 3

code = command()
print("returned", flush=True)
cli.exit_process(code)
"""


@pytest.mark.parametrize(("how", "lines"), [("kept", ["returned"]), ("control: not kept", ["freed", "returned"])])
def test_what_a_command_keeps_until_exit_is_never_freed(how: str, lines: list[str]) -> None:
    """`keep_until_exit` leaves a command's objects to the process's end, where nothing frees
    them; without it they are freed as the command returns."""
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    out = subprocess.run([sys.executable, "-c", KEEP_PROBE, how], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 3
    assert out.stdout.split() == lines


@pytest.mark.parametrize("ends_process", [True, False])
def test_only_a_process_entry_leaves_the_sync_to_the_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         ends_process: bool) -> None:
    """In-process callers (tests, the library) get everything freed as usual."""
    kept: list[object] = []
    monkeypatch.setattr(sync_command, "keep_until_exit", kept.append)
    pair = make_pair(tmp_path)
    cli.main(["--conf-dir", str(pair.primary), "sync", "--dry-run"], ends_process=ends_process)
    assert [type(value).__name__ for value in kept] == (["SyncRun"] if ends_process else [])


def test_every_process_entry_ends_through_exit_process() -> None:
    """The launcher, `python -m hasync`, the console script and every configd script."""
    scripts = sorted(PACKAGE_ROOT.glob("ha_*.py"))
    assert scripts
    for script in scripts:
        assert "configd.exit_process(configd." in script.read_text() and "sys.exit(" not in script.read_text(), script
    launcher = (REPO / "src" / "sbin" / "opnsense-ha").read_text()
    assert launcher.rstrip().endswith("run()")
    assert (PACKAGE_ROOT / "hasync" / "__main__.py").read_text().rstrip().endswith("run()")
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'opnsense-ha = "hasync.cli:run"' in pyproject
