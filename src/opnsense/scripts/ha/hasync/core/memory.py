"""The agent's memory settings: one malloc arena, and the cyclic GC paused for large requests.

The agent serves every request in a thread of its own. glibc gives threads arenas of their own
and keeps what a thread frees in that thread's arena, so the memory a merge frees (the replaced
parse of config.xml, the payload) is not reused by the next request's thread: the process grows
by about a parsed config per arena. On a 20 MB config a full sync peaked at 521 MB with glibc's
default and at 401 MB with one arena, slightly faster too (`make bench`). The agent runs one
merge at a time under a lock and the GIL serialises the Python work anyway, so one arena costs
no concurrency. FreeBSD's libc (jemalloc) has no `mallopt`: there this does nothing.

The cyclic garbage collector, for its part, walks every live container object each time its
oldest generation is due, and a merge request builds (then drops) about a million of them: the
payload's dicts, lists and lxml proxies, none of them in a reference cycle. On a 20 MB config
that was four full walks, 0.22 s of a 2.3 s merge. `gc_paused` switches the collector off
while such a request runs; reference counting still frees everything the moment it is dropped.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

M_ARENA_MAX = -8  # glibc's <malloc.h> parameter number


def single_malloc_arena() -> bool:
    """Ask the C library's malloc for one arena; whether the setting took (False: not glibc).

    Call it before the process starts threads: a thread keeps the arena it already has.
    """
    import ctypes  # here: every sync imports this module (`gc_paused`), only the agent needs ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))


class _Pauses:
    """How many `gc_paused` blocks are running, and whether the collector was on before the first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.count = 0
        self.resume = False


_PAUSES = _Pauses()


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic GC off for the block; back on when the last of overlapping blocks ends.

    Overlapping blocks (two requests in two threads) share one pause, and a collector that was
    already off before the first stays off. Only for work that creates no reference cycles worth
    collecting before it ends: what does become cyclic garbage meanwhile is collected later.
    """
    with _PAUSES.lock:
        if _PAUSES.count == 0:
            _PAUSES.resume = gc.isenabled()
            gc.disable()
        _PAUSES.count += 1
    try:
        yield
    finally:
        with _PAUSES.lock:
            _PAUSES.count -= 1
            if _PAUSES.count == 0 and _PAUSES.resume:
                gc.enable()


# Held until the process ends: a list that holds itself is never freed by reference counting,
# and once `cli.exit_process` freezes it the collection at exit does not look at it either.
_KEPT_UNTIL_EXIT: list[object] = []
_KEPT_UNTIL_EXIT.append(_KEPT_UNTIL_EXIT)


def keep_until_exit(value: object) -> None:
    """Leave `value` to the end of the process instead of freeing it when the command returns,
    and stop the cyclic collector for the rest of the process.

    Why: a sync's parsed config and payload are millions of objects. Freeing them one by one just
    before the process ends cost ~7 ms at 2 MB and ~80 ms at 20 MB; and while they live, each
    collection of the oldest generation walks them all (as long again). Only for commands run by a
    process entry point (`cli.main(..., ends_process=True)`), which ends through
    `cli.exit_process`; never for in-process callers.
    """
    _KEPT_UNTIL_EXIT.append(value)
    gc.disable()  # `gc_paused` blocks leave it off: it was off before them
