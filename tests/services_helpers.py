"""Shared by test_services.py and test_configd_actions.py: keep the shared machine free of zombies."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator

import pytest

PR_SET_CHILD_SUBREAPER = 36


@pytest.fixture(autouse=True, scope="module")
def reap_orphans() -> Iterator[None]:
    """Daemons outlive the helper that started them and get reparented. Make this test process
    their subreaper (Linux) and reap them at the end of the module, so no zombies stay behind
    when PID 1 does not reap."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    if libc is not None:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0] > 0:
                pass
