"""Work a request leaves until its reply is out (`CallContext.after_reply`) waits for a quiet
agent (`server.Activity`): the fast path's "as sent" digests must not compete with the
primary's next request, which it waits for."""

from __future__ import annotations

import threading
import time

import pytest

from hasync.agent.server import Activity


@pytest.mark.parametrize("closing", [False, True], ids=["waits for quiet", "control: closing, starts at once"])
def test_deferred_work_starts_once_no_request_is_in_flight(monkeypatch: pytest.MonkeyPatch, closing: bool) -> None:
    monkeypatch.setattr(Activity, "QUIET", 0.05)
    activity = Activity()
    activity.closing = closing
    order: list[str] = []
    in_request = threading.Event()

    def another_request() -> None:
        with activity.request():
            in_request.set()
            time.sleep(0.3)  # a request the deferred work must not compete with
            order.append("request done")

    def deferred_work() -> None:  # in its own connection's thread, as the agent runs it
        with activity.request(), activity.deferred():
            order.append("deferred work")

    request = threading.Thread(target=another_request)
    request.start()
    assert in_request.wait(10)
    activity.defer()
    work = threading.Thread(target=deferred_work)
    work.start()
    assert not activity.settle(timeout=0.0) or closing  # announced and not done yet (closing: maybe done)
    request.join(10)
    work.join(10)
    assert activity.settle(timeout=1)
    expected = ["deferred work", "request done"] if closing else ["request done", "deferred work"]
    assert order == expected


def test_close_lets_waiting_work_start_and_waits_for_it() -> None:
    activity = Activity()
    done: list[bool] = []
    with activity.request():
        activity.defer()

        def deferred_work() -> None:
            with activity.request(), activity.deferred():
                done.append(True)

        work = threading.Thread(target=deferred_work)
        work.start()
        activity.close(timeout=10)  # a request is still in flight: only closing lets the work start
        assert done == [True]
    work.join(10)


def test_deferred_work_pauses_between_its_steps_while_another_request_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request that arrives while deferred work runs gets the agent to itself: the work's next
    step waits until it is done (`pause`)."""
    monkeypatch.setattr(Activity, "QUIET", 0.05)
    activity = Activity()
    order: list[str] = []
    first_step, request_started = threading.Event(), threading.Event()

    def deferred_work() -> None:
        with activity.request(), activity.deferred() as pause:
            order.append("step 1")
            first_step.set()
            assert request_started.wait(10)
            pause()
            order.append("step 2")

    def another_request() -> None:
        with activity.request():
            request_started.set()
            time.sleep(0.3)
            order.append("request done")

    activity.defer()
    work = threading.Thread(target=deferred_work)
    work.start()
    assert first_step.wait(10)
    request = threading.Thread(target=another_request)
    request.start()
    work.join(10)
    request.join(10)
    assert order == ["step 1", "request done", "step 2"]


def test_quiet_counts_from_the_reply_that_left_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """The primary's next request comes right after the merge's reply: however long the agent
    had been quiet before that merge, the work it left waits `QUIET` from its reply, so the
    next request finds the agent free (it started fill-first, and ten times slower, before)."""
    monkeypatch.setattr(Activity, "QUIET", 0.3)
    activity = Activity()
    time.sleep(0.35)  # quiet for longer than QUIET before the merge
    order: list[str] = []
    replied = threading.Event()

    def merge_connection() -> None:
        with activity.request():
            activity.defer()  # the reply is out, work is left
            replied.set()
            with activity.deferred():
                order.append("deferred work")

    def next_request() -> None:
        assert replied.wait(10)
        time.sleep(0.05)  # the primary reads the reply and connects again
        with activity.request():
            time.sleep(0.1)
            order.append("next request done")

    threads = [threading.Thread(target=merge_connection), threading.Thread(target=next_request)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert order == ["next request done", "deferred work"]
