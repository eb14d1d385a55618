"""`core.memory.gc_paused`: the cyclic GC off inside, back to what it was after the last block."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import pytest

from hasync.core.memory import gc_paused


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    """Whatever a test does, the rest of the suite runs with the collector as it found it."""
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_off_inside_and_on_again_after_even_when_the_block_raises() -> None:
    gc.enable()
    with gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("the merge failed")
    assert gc.isenabled()


def test_overlapping_blocks_share_one_pause() -> None:
    """Two requests in two threads: the first to end must not switch the collector back on."""
    gc.enable()
    inside, release = threading.Event(), threading.Event()

    def other_request() -> None:
        with gc_paused():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=other_request)
    with gc_paused():
        thread.start()
        assert inside.wait(10)
    assert not gc.isenabled()  # this block ended, the other one still runs
    release.set()
    thread.join(10)
    assert gc.isenabled()


def test_a_collector_that_was_off_stays_off() -> None:
    """The control for the resume rule: the pause never switches on what someone else switched off."""
    gc.disable()
    with gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
