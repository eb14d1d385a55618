"""`core.memory.single_malloc_arena`: the agent's threads share one glibc malloc arena.

Counted, not timed: glibc's own `malloc_stats()` lists one "Arena N:" block per arena, so a
child process that lets a thread allocate shows how many arenas it has. The control is the same
child without the setting, which gets a second arena for the thread.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from support.paths import PACKAGE_ROOT

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only (FreeBSD: jemalloc)")

CHILD = """
import ctypes, sys, threading
from hasync.core import memory
took = memory.single_malloc_arena() if sys.argv[1] == "single" else None
def work():
    blocks = [bytearray(64 * 1024) for _ in range(64)]  # what a request thread allocates
    del blocks
thread = threading.Thread(target=work)
thread.start()
thread.join()
ctypes.CDLL(None).malloc_stats()  # to stderr, one "Arena N:" block per arena
print(took)
"""


def arenas(mode: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT)}
    env.pop("MALLOC_ARENA_MAX", None)
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env,
                          timeout=60, check=True)
    return proc.stderr.count("Arena "), proc.stdout.strip()


def test_one_arena_for_every_thread_of_the_agent() -> None:
    count, took = arenas("single")
    assert took == "True" and count == 1


def test_control_without_the_setting_a_thread_gets_an_arena_of_its_own() -> None:
    count, took = arenas("default")
    assert took == "None" and count >= 2
