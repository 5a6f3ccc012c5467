"""Threads in the master at fork: named in one warning, refused under --strict-fork, and
threads started later named once before the next fork. Naming itself is tested without a
master: Python threads, a real native thread (pthread_create from ctypes), and a thread
that has just ended."""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import Events, MasterProcess, master_env
from fleets.threaded import THREAD_NAME
from prefork import threads
from prefork.threads import TaskThread, ThreadCheck, ThreadsAtFork, name_threads

THREADED = "fleets.threaded:fleet"
NAMED = f"'{THREAD_NAME}' (Python daemon thread, tid {{tid}}, runs fleets.threaded.flush_forever)"
ADVICE = ("start it in a post_fork hook (Fleet(post_fork=...), run in each worker) instead "
          "of at import, or use its library's fork-safe option")


# -- a real master -----------------------------------------------------------------------


def test_a_thread_started_at_import_is_named_in_one_warning_and_the_fleet_runs(
        start_master, events: Events) -> None:
    master: MasterProcess = start_master(THREADED)
    events.wait(lambda e: e["kind"] == "up" and e.get("attempt") == 2, what="crashy restarted")
    events.wait_kind("up", count=5)  # 3 sleepers, crashy twice
    master.wait_log(r"worker crashy spawned", count=2)  # the restart's fork, after its check
    warnings = master.log_matches(r"WARNING forking with (.*)")
    assert len(warnings) == 1, master.log
    tid = _tid(warnings[0][1])
    assert str(tid) in os.listdir(f"/proc/{master.pid}/task")  # the master's real thread
    assert warnings[0][1] == (f"1 other thread in the master: {NAMED.format(tid=tid)}; a lock "
                              f"it holds at a fork stays held for good in the worker: {ADVICE}")
    first_spawn = next(i for i, line in enumerate(master.lines) if " spawned " in line)
    assert "WARNING forking with" in "".join(master.lines[:first_spawn])
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_strict_fork_refuses_with_the_thread_named_and_forks_nothing(
        events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "--fleet", THREADED, "--strict-fork"],
        capture_output=True, text=True, timeout=30,
        env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert re.fullmatch(
        "prefork: error: --strict-fork: not forking with 1 other thread in the master: "
        + re.escape(NAMED).replace(r"\{tid\}", r"\d+") + re.escape(
            f"; a lock it holds at a fork stays held for good in the worker: {ADVICE}"),
        errors[0]), errors[0]
    assert result.stderr.splitlines()[-1] == errors[0]
    others = [line for line in result.stderr.splitlines() if line not in errors]
    assert all(" INFO " in line for line in others), result.stderr  # no traceback, no warning
    # Refused right after the floor: before the master announced, let alone forked, a worker.
    assert not re.search(r"sleeper|crashy", result.stderr), result.stderr
    events.drain()
    assert not events.of("up"), "a worker ran although the master refused to fork"
    lock = runtime_dir / "threaded.lock"
    assert list(runtime_dir.iterdir()) == [lock], "the control socket was left behind"
    assert lock.read_text() == "", "the lock was not released"


@pytest.mark.parametrize("args", [[], ["--strict-fork"]], ids=["warn", "strict"])
def test_a_fleet_without_threads_forks_without_a_word(start_master, events: Events,
                                                      args: list[str]) -> None:
    master: MasterProcess = start_master("fleets.basic:sleepers", *args)
    events.wait_kind("up", count=4)
    master.wait_log(r"worker sleeper.3 spawned")
    assert not master.log_matches(r"thread|WARNING|ERROR"), master.log
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_a_thread_started_after_the_first_forks_is_named_once_and_strict_only_warns(
        events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    """The observer starts a thread in the master when the crasher first exits: each of the
    crasher's later forks finds it, only the first says so, and strict_fork does not stop
    the fleet."""
    script = tmp_path / "late.py"
    script.write_text(textwrap.dedent("""
        import logging, sys, threading
        from fleets.basic import crashing
        from prefork import Master

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        never = threading.Event()

        def observer(event, slot, now):
            if event == "exited" and not any(t.name == "late" for t in threading.enumerate()):
                threading.Thread(target=never.wait, name="late", daemon=True).start()

        sys.exit(Master(crashing, strict_fork=True, observer=observer).run())
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL,
                            env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    master = MasterProcess(proc, events)
    try:
        events.wait_kind("up", count=4)
        master.wait_log(r"worker crasher spawned", count=4)
        warnings = master.log_matches(r"WARNING (forking with .*)")
        assert [w[1] for w in warnings] == [
            "forking with 1 new thread in the master: 'late' (Python daemon thread, tid "
            f"{_tid(warnings[0][1])}, runs threading.Event.wait); a lock it holds at a fork "
            f"stays held for good in the worker: {ADVICE}"], master.log
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0, master.log
    finally:
        master.close()


def test_the_probe_names_the_thread_once_and_still_measures(events: Events,
                                                            runtime_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefork", "probe", "--fleet", THREADED, "--idle", "0",
         "--no-baseline", "--json"], capture_output=True, text=True, timeout=50,
        env=master_env(events, runtime_dir))
    assert result.returncode == 0, result.stderr
    # The probe's master logs it, and the probe passes its warnings on.
    named, = [line for line in result.stderr.splitlines() if THREAD_NAME in line]
    assert named.endswith(
        f" WARNING forking with 1 other thread in the master: "
        f"{NAMED.format(tid=_tid(result.stderr))}; "
        f"a lock it holds at a fork stays held for good in the worker: {ADVICE}"), named
    assert json.loads(result.stdout)["summary"]["workers"] == 2


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
