"""Stopping async workers gracefully: SIGTERM and SIGINT cancel the main task, its clean-up
runs, and the child exits 0; a handler of the worker's own wins; plain workers unchanged."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from conftest import Events
from prefork import asyncio_worker


def _pid(events: Events, label: str) -> int:
    return int(events.wait_kind("up", label=label)[0]["pid"])


def _story(events: Events, pid: int) -> list[str]:
    """What worker ``pid`` reported, in order; call it once the worker has exited."""
    events.drain()
    return [e["kind"] for e in events.seen if e["pid"] == pid]


def test_finally_runs_on_the_masters_sigterm_and_the_child_exits_0(start_master,
                                                                   events: Events) -> None:
    master = start_master("fleets.graceful:tidying")
    pid = _pid(events, "tidy")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert _story(events, pid) == ["up", "cleaned"]
    master.wait_log(rf"worker tidy \(pid {pid}\) exited: exit code 0 after")
    assert "Traceback" not in master.log


def test_cancelled_error_clean_up_may_await(start_master, events: Events) -> None:
    """Clean-up in ``except CancelledError`` that awaits completes, whether it re-raises
    the cancellation or returns."""
    master = start_master("fleets.graceful:flushing")
    pids = {label: _pid(events, label) for label in ("reraise", "swallow")}
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    for label, pid in pids.items():
        assert _story(events, pid) == ["up", "flushed"], label
        master.wait_log(rf"worker {label} \(pid {pid}\) exited: exit code 0 after")


def test_a_worker_handler_set_in_the_coroutine_replaces_ours(start_master,
                                                             events: Events) -> None:
    """``loop.add_signal_handler`` and ``signal.signal`` alike: the worker's handler runs
    and nothing cancels the worker, which ends on its own terms."""
    master = start_master("fleets.graceful:own_handlers")
    pids = {label: _pid(events, label) for label in ("loop", "signal")}
    master.signal(signal.SIGTERM)
    for pid in pids.values():
        events.wait_kind("own-handler", pid=pid)
        os.kill(pid, signal.SIGUSR1)
    assert master.wait_exit() == 0
    for label, pid in pids.items():
        assert _story(events, pid) == ["up", "own-handler", "returned"], label
        master.wait_log(rf"worker {label} \(pid {pid}\) exited: exit code 0 after")


def test_a_sigterm_handler_inherited_from_import_is_kept(start_master,
                                                         events: Events) -> None:
    master = start_master("fleets.own_sigterm:fleet")
    pid = _pid(events, "own")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert _story(events, pid) == ["up", "own-handler", "returned"]
    master.wait_log(rf"worker own \(pid {pid}\) exited: exit code 0 after")


def test_a_clean_up_that_raises_exits_1_with_its_traceback(start_master,
                                                           events: Events) -> None:
    master = start_master("fleets.graceful:failing")
    pid = _pid(events, "failing")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0  # stopped by the fleet's stop: not a failed worker
    master.wait_log(r"worker failing crashed")
    master.wait_log(r"^RuntimeError: flush failed: batch 42 lost$")
    assert "Traceback (most recent call last)" in master.log
    master.wait_log(rf"worker failing \(pid {pid}\) exited: exit code 1 after")


def test_sigterm_straight_to_the_worker_is_a_clean_finish(start_master,
                                                          events: Events) -> None:
    """Exit 0 under the default restart="on-failure" ends the worker, as systemd treats a
    clean exit: it is not restarted, and the master, with nothing left, exits 0."""
    master = start_master("fleets.graceful:tidying")
    pid = _pid(events, "tidy")
    os.kill(pid, signal.SIGTERM)
    assert master.wait_exit() == 0
    assert _story(events, pid) == ["up", "cleaned"]
    master.wait_log(rf"worker tidy \(pid {pid}\) exited: exit code 0 after")
    master.wait_log(r"worker tidy finished \(restart=on-failure\)")
    assert not master.log_matches(r"restart \d+ in|stopping on")
    assert len(master.log_matches(r"spawned")) == 1


def test_a_plain_worker_still_dies_by_sigterm(start_master, events: Events) -> None:
    master = start_master("fleets.graceful:plain_and_async")
    plain, tidy = _pid(events, "plain"), _pid(events, "tidy")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert _story(events, plain) == ["up"]
    assert _story(events, tidy) == ["up", "cleaned"]
    master.wait_log(rf"worker plain \(pid {plain}\) exited: killed by SIGTERM")
    master.wait_log(rf"worker tidy \(pid {tidy}\) exited: exit code 0")


def test_ctrl_c_then_the_masters_sigterm_end_the_clean_up_once(start_master,
                                                               events: Events) -> None:
    """A terminal's SIGINT reaches the master and every worker, and the master's SIGTERM
    follows while the clean-up still runs: it must not cut it short or run it twice.
    Sent here in the order hardest on the worker (its clean-up has begun when the
    SIGTERM comes), which a real Ctrl-C only produces at random."""
    master = start_master("fleets.graceful:holding", "--log-level", "debug")
    pid = _pid(events, "held")
    _pid(events, "sleeper")
    os.kill(pid, signal.SIGINT)
    events.wait_kind("cleaning", pid=pid)
    master.signal(signal.SIGINT)
    # Logged (at debug) just before the master signals sleeper, so after it signalled held.
    master.wait_log(r"worker sleeper \(pid \d+\) fleet stopping on SIGINT: SIGTERM")
    os.kill(pid, signal.SIGUSR1)
    assert master.wait_exit() == 0
    assert _story(events, pid) == ["up", "cleaning", "cleaned"]
    master.wait_log(rf"worker held \(pid {pid}\) exited: exit code 0 after")
    assert "Traceback" not in master.log
    assert "KeyboardInterrupt" not in master.log


def test_a_second_sigterm_during_the_clean_up_changes_nothing(start_master,
                                                              events: Events) -> None:
    master = start_master("fleets.graceful:holding_never")
    pid = _pid(events, "held")
    os.kill(pid, signal.SIGTERM)
    events.wait_kind("cleaning", pid=pid)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGUSR1)
    assert master.wait_exit() == 0
    assert _story(events, pid) == ["up", "cleaning", "cleaned"]
    master.wait_log(rf"worker held \(pid {pid}\) exited: exit code 0 after")


def test_a_second_sigint_during_the_clean_up_cuts_it_short(start_master,
                                                           events: Events) -> None:
    """The first signal puts SIGINT's default back: KeyboardInterrupt, and the child dies
    by SIGINT as a standalone program would, without a traceback."""
    master = start_master("fleets.graceful:holding_never")
    pid = _pid(events, "held")
    os.kill(pid, signal.SIGTERM)
    events.wait_kind("cleaning", pid=pid)
    os.kill(pid, signal.SIGINT)
    assert master.wait_exit() == 5  # restart="never": a worker killed by a signal failed
    assert _story(events, pid) == ["up", "cleaning"]
    master.wait_log(rf"worker held \(pid {pid}\) exited: killed by SIGINT")
    assert "Traceback" not in master.log


def test_once_the_main_task_is_over_signals_act_as_usual(start_master,
                                                         events: Events) -> None:
    """asyncio's shutdown may still wait for an executor thread: a SIGTERM then kills."""
    master = start_master("fleets.graceful:blocking")
    pid = _pid(events, "blocking")
    os.kill(pid, signal.SIGTERM)
    events.wait_kind("released", pid=pid)
    os.kill(pid, signal.SIGTERM)
    assert master.wait_exit() == 5  # restart="never": a worker killed by a signal failed
    master.wait_log(rf"worker blocking \(pid {pid}\) exited: killed by SIGTERM")


def test_a_blocked_loop_dies_of_sigterm_instead_of_waiting_for_sigkill(
        start_master, events: Events) -> None:
    """The loop cannot take the cancellation: the worker dies of SIGTERM as a plain process
    would, after BLOCKED_AFTER, long before the grace period's SIGKILL."""
    master = start_master("fleets.graceful:blocked", "--grace", "120")
    pid = _pid(events, "blocked")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0  # within the harness's 20 s wait: no 120 s grace
    master.wait_log(rf"worker blocked \(pid {pid}\) exited: killed by SIGTERM")
    assert "SIGKILL" not in master.log
    assert _story(events, pid) == ["up"]


@pytest.fixture
def standalone_dispositions() -> Iterator[None]:
    """SIGTERM and SIGINT as a standalone python has them, put back after the test."""
    saved = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    saved_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)
        signal.signal(signal.SIGINT, saved_int)


def test_the_wrapper_puts_the_dispositions_back(standalone_dispositions: None) -> None:
    seen: list[object] = []

    async def look() -> None:
        seen.extend(signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT))

    assert asyncio_worker(look)() is None
    assert signal.SIG_DFL not in seen and signal.default_int_handler not in seen
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.set_wakeup_fd(-1) == -1  # no loop's pipe left behind


def test_the_wrapper_in_another_thread_sets_no_handlers(standalone_dispositions: None
                                                        ) -> None:
    """A warm-up run from a thread: signal handlers can only be set in the main thread."""
    outcome: list[object] = []

    async def look() -> str:
        await asyncio.sleep(0)
        return "done"

    def run() -> None:
        try:
            outcome.append(asyncio_worker(look)())
        except BaseException as exc:  # reported to the test, not lost in the thread
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert outcome == ["done"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
