"""One bounded poll for the tests that wait for another process or thread to get somewhere."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, bound: float = 20.0, interval: float = 0.05) -> T:
    """Poll `predicate` until it returns something true, and return that.

    The bound only turns a broken build into a clear failure naming `what` instead of a hang; it
    is generous on purpose and never a timing assertion.
    """
    deadline = time.monotonic() + bound
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {bound:g}s: {what}")
        time.sleep(interval)
