"""`make demo` / `python -m halab.demo`: the nodes go where the admin started it, nothing else
is touched, and no process outlives it."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halab import demo
from support.paths import DEV_ROOT, PACKAGE_ROOT, REPO

DEMO_TIMEOUT = 240


def _live_processes_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose environment carries `marker`: everything the demo
    started inherits it, daemonized services included."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if marker.encode() in (entry / "environ").read_bytes():
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


def _reap_orphans() -> None:
    """The suite is a subreaper (conftest): daemons the demo stopped are reparented to us."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find leftover processes")
def test_demo_writes_its_nodes_under_the_current_directory(tmp_path: Path) -> None:
    elsewhere = tmp_path / "admin's shell"
    elsewhere.mkdir()
    in_tree = REPO / demo.DEFAULT_DIR_NAME
    existed_in_tree = in_tree.exists()
    marker = f"OPNSENSE_HA_DEMO_TEST={secrets.token_hex(8)}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), str(DEV_ROOT)]),
               OPNSENSE_HA_DEMO_TEST=marker.split("=")[1])
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=env) as probe:
        # control: the search sees a process carrying the marker. Popen may return a moment before the
        # kernel has set up the new program's environment (posix_spawn/vfork resume the parent inside
        # execve), so look again for a bounded while rather than once.
        deadline = time.monotonic() + 10
        while not (seen := _live_processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.02)
        probe.kill()
    assert seen == [probe.pid]
    log = tmp_path / "demo.log"  # a file, not a pipe: a leftover process holding it must not hang us
    try:
        with log.open("w") as out:
            code = subprocess.run([sys.executable, "-m", "halab.demo"], cwd=elsewhere, env=env,
                                  stdout=out, stderr=subprocess.STDOUT, timeout=DEMO_TIMEOUT).returncode
        _reap_orphans()
        leftover = _live_processes_with(marker)
    finally:
        for pid in _live_processes_with(marker):  # never leave one behind, even when failing
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _reap_orphans()
    printed = log.read_text()
    assert code == 0, printed
    assert leftover == []  # the agent and the demo services are gone
    nodes = elsewhere / demo.DEFAULT_DIR_NAME
    for node in ("primary", "backup"):
        assert (nodes / node / "config.xml").is_file()
    assert "XMLRPC" in (nodes / "backup" / "config.xml").read_text()  # the sync reached the backup
    assert f"Files (all under {nodes}):" in printed  # says where, at the end
    assert printed.rstrip().endswith("demo finished: agent stopped, demo services stopped")
    assert in_tree.exists() == existed_in_tree  # nothing written into the source tree


def test_dir_refuses_a_directory_the_demo_did_not_make(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty and was not made by this demo"):
        demo.main(["--dir", str(precious)])
    assert (precious / "notes.txt").read_text() == "keep me"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SystemExit, match="not a directory"):
        demo.main(["--dir", str(a_file)])


def test_an_earlier_demo_directory_is_emptied_and_reused(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    demo.prepare_dir(nodes)  # new: made and marked
    (nodes / "primary").mkdir()
    (nodes / "primary" / "config.xml").write_text("<opnsense/>")
    demo.prepare_dir(nodes)
    assert sorted(p.name for p in nodes.iterdir()) == [demo.DEMO_MARKER]


def test_missing_fixtures_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no demo fixtures"):
        demo.main(["--dir", str(tmp_path / "nodes"), "--fixtures", str(tmp_path / "absent")])
    assert not (tmp_path / "nodes").exists()  # nothing written before the check


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_demo_runs_in_the_callers_directory(tmp_path: Path) -> None:
    """`make -C <checkout> demo` changes make's directory; the demo still runs where the admin is."""
    env = dict(os.environ, PWD=str(tmp_path))
    plan = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "demo"], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=30, check=True).stdout
    assert f'cd "{tmp_path}" && "{REPO / ".venv" / "bin" / "python"}" -m halab.demo' in plan
    plan = subprocess.run(["make", "-n", "-s", "-C", str(REPO), "demo", "DIR=/srv/demo"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=30, check=True).stdout
    assert '-m halab.demo --dir "/srv/demo"' in plan
