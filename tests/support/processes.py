"""Keep the shared machine free of processes the tests start: no zombies, no daemons left running."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE = 5.0


def child_pids(parent: int | None = None) -> list[int]:
    """The live child processes of `parent` (default: this process), from /proc (Linux)."""
    parent = os.getpid() if parent is None else parent
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == parent and fields[0] != "Z":
                children.append(int(stat.parent.name))
    return children


def stop_processes(pids: list[int], grace: float = STOP_GRACE) -> None:
    """SIGTERM each process (its whole group when it leads one, as daemons do), SIGKILL what is
    left after `grace` seconds, and reap them."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            pids = [pid for pid in pids if pid in child_pids()]
            time.sleep(0.05)
        if not pids:
            return


@pytest.fixture(autouse=True, scope="module")
def reap_orphans() -> Iterator[None]:
    """Service daemons outlive the helper that started them (`daemonize.py` exits at once) and,
    with agents in subprocesses, outlive the agent too. Make this test process their subreaper
    (Linux) so they are reparented here instead of to PID 1, and stop and reap every one still
    running when the module ends: its fixtures are torn down by then, so whatever remains is a
    leftover, not a process a later test needs."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    if libc is not None:
        stop_processes(child_pids())
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
