"""Naming the threads of this process, without a master: Python threads, a real native
thread (pthread_create from ctypes), a thread that has just ended; and the check that
warns once per thread or, under strict, refuses at the first."""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from prefork import threads
from prefork.threads import TaskThread, ThreadCheck, ThreadsAtFork, name_threads

# -- naming, without a master ------------------------------------------------------------


@dataclass
class FakeThread:
    name: str
    daemon: bool
    native_id: int | None


def test_name_threads_names_python_threads_by_their_thread_and_others_by_comm() -> None:
    comm = {11: "grpc_global_tim", 12: "python"}
    named = name_threads(
        [12, 10, 11, 13, 14],
        [FakeThread("MainThread", False, 10), FakeThread("exporter", False, 13),
         FakeThread("flusher", True, 14), FakeThread("not-started", False, None)],
        own_tid=10, comm=comm.get)
    assert named == [
        TaskThread(11, "grpc_global_tim", python=False),
        TaskThread(12, "python", python=False),
        TaskThread(13, "exporter", python=True, daemon=False),
        TaskThread(14, "flusher", python=True, daemon=True),
    ]
    assert [t.describe() for t in named] == [
        "'grpc_global_tim' (native thread, tid 11)",
        "'python' (native thread, tid 12)",
        "'exporter' (Python thread, tid 13)",
        "'flusher' (Python daemon thread, tid 14)",
    ]


def test_a_task_that_exited_since_the_listing_is_left_out() -> None:
    assert name_threads([1, 2], [], own_tid=1, comm=lambda tid: None) == []


def test_the_message_counts_and_tells_what_to_do() -> None:
    two = [TaskThread(5, "a", True, True), TaskThread(6, "b", False)]
    assert threads.describe(two, first=True) == (
        "2 other threads in the master: 'a' (Python daemon thread, tid 5), 'b' (native "
        "thread, tid 6); a lock one of them holds at a fork stays held for good in the "
        "worker: start them in a post_fork hook (Fleet(post_fork=...), run in each worker) "
        "instead of at import, or use their library's fork-safe option")
    assert threads.describe(two[1:], first=False).startswith(
        "1 new thread in the master: 'b' (native thread, tid 6); a lock it holds")


def test_a_real_python_thread_is_named_with_what_it_runs() -> None:
    with _python_thread("exporter-7") as thread:
        mine = [t for t in threads.other_threads() if t.tid == thread.native_id]
    assert thread.native_id is not None
    assert mine == [TaskThread(thread.native_id, "exporter-7", python=True, daemon=True,
                               runs="threading.Event.wait")]


def test_a_real_native_thread_is_named_by_its_comm() -> None:
    with _native_thread(b"c-exporter") as tid:
        mine = [t for t in threads.other_threads() if t.tid == tid]
    assert mine == [TaskThread(tid, "c-exporter", python=False)]


def test_check_warns_once_per_thread_and_strict_raises_only_at_the_first(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="prefork")
    check = ThreadCheck(strict=True)
    with _python_thread("first"), _native_thread(b"native-first"):
        with pytest.raises(ThreadsAtFork) as raised:
            check.check()
        assert {"first", "native-first"} <= {t.name for t in raised.value.threads}
        assert str(raised.value).startswith("not forking with ")
        check.check()
        assert caplog.records == []  # seen at the first check: never named again
        with _python_thread("second"):
            check.check()
            check.check()
    assert len(caplog.records) == 1, caplog.text
    message = caplog.records[0].getMessage()
    assert message.startswith("forking with 1 new thread in the master: 'second' (Python")


def test_a_thread_that_just_ended_is_not_named(caplog: pytest.LogCaptureFixture) -> None:
    """After ~1% of joins the ended thread is still in /proc/self/task for up to a few ms,
    in no threading.Thread: it must not be taken for a native thread."""
    caplog.set_level(logging.WARNING, logger="prefork")
    check = ThreadCheck()
    check.check()  # whatever this process already runs
    caplog.clear()
    for _ in range(500):
        thread = threading.Thread(target=lambda: None)
        thread.start()
        thread.join()
        check.check()
    assert caplog.records == [], caplog.text


def test_settling_drops_a_task_that_exits_and_keeps_one_that_stays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    reads = {98: 0}

    def comm(tid: int) -> str | None:
        if tid == 98:
            reads[98] += 1
            return "python" if reads[98] < 3 else None  # an ended thread, gone after 2 looks
        return "grpc_global_tim"

    monkeypatch.setattr(threads, "read_comm", comm)
    assert threads._settled([98]) == []
    assert reads[98] == 3
    assert threads._settled([99]) == [TaskThread(99, "grpc_global_tim", python=False)]


# -- helpers -----------------------------------------------------------------------------


def _tid(text: str) -> int:
    found = re.search(r"tid (\d+)", text)
    assert found is not None, text
    return int(found[1])


@contextmanager
def _python_thread(name: str) -> Iterator[threading.Thread]:
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name=name, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join()


_libc = ctypes.CDLL(None, use_errno=True)


@contextmanager
def _native_thread(name: bytes) -> Iterator[int]:
    """A thread no Python code runs on: pthread_create straight into libc's pause(), ended
    with pthread_cancel (pause() is a cancellation point). Yields its task id."""
    handle = ctypes.c_ulong()
    start = ctypes.cast(_libc.pause, ctypes.c_void_p)
    assert _libc.pthread_create(ctypes.byref(handle), None, start, None) == 0
    try:
        assert _libc.pthread_setname_np(handle, name) == 0
        yield next(t for t in threads.task_ids() if threads.read_comm(t) == name.decode())
    finally:
        assert _libc.pthread_cancel(handle) == 0
        assert _libc.pthread_join(handle, None) == 0
