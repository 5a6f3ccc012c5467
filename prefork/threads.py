"""Threads in the master when it forks: name them, warn once, or refuse (strict fork).

``fork()`` copies only the thread that calls it. Every other thread of the master is
simply absent from the child, and whatever it held at that instant (a lock of the
logging module, of a connection pool, of malloc) stays held there for good: the child
deadlocks the first time it needs it. A tracing or metrics exporter, or a database pool,
started at import is the usual cause. Python 3.12+ warns about such a fork with a
DeprecationWarning that does not say which threads; :class:`ThreadCheck` names them.

The threads are the kernel's list, ``/proc/self/task``, so it includes those a C library
started. Each is named by the ``threading.Thread`` whose ``native_id`` is its task id, or
else by ``/proc/self/task/TID/comm`` (a native thread).

Measured (2-core EPYC VM, Linux 6.18, Python 3.11.7 and 3.12.1): a check that finds
nothing new, one listing of ``/proc/self/task``, takes 7 us with one thread and 12 us
with nine, so the master checks before every fork (~2.6 ms to the worker's first line).
Naming is paid once per new thread: 40 us for eight Python threads; a thread that looks
native is looked at for :data:`SETTLE` seconds.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("prefork")

# A thread that just ended (even one whose join() returned) stays in /proc/self/task until
# its OS thread exits: measured after 1% of joins on 3.11 and 3.12, for up to 4 ms (one
# scheduler tick). Such a task is in no threading.Thread any more and would be named as a
# native thread, so a new unknown task must outlast this before it is reported.
SETTLE = 0.02
_SETTLE_POLL = 0.001

_TASKS = "/proc/self/task"
_ADVICE = ("start {them} in a post_fork hook (Fleet(post_fork=...), run in each worker) "
           "instead of at import, or use {their} library's fork-safe option")


class ThreadsAtFork(Exception):
    """The master has other threads before its first fork and ``strict_fork`` is set.
    ``str()`` is one line for the user; nothing was forked."""

    def __init__(self, message: str, threads: Sequence[TaskThread]) -> None:
        super().__init__(message)
        self.threads = tuple(threads)


class PythonThread(Protocol):
    """What naming needs of a ``threading.Thread``."""

    @property
    def name(self) -> str: ...

    @property
    def daemon(self) -> bool: ...

    @property
    def native_id(self) -> int | None: ...


@dataclass(frozen=True)
class TaskThread:
    """One thread of this process other than the caller."""

    tid: int
    name: str
    python: bool  # a threading.Thread has this task id; else native (e.g. a C library's)
    daemon: bool = False
    runs: str | None = None  # a Python thread's target or Thread subclass, if it has one

    def describe(self) -> str:
        """``'flusher' (Python daemon thread, tid 812, runs app.metrics.flush)``."""
        if self.python:
            kind = "Python daemon thread" if self.daemon else "Python thread"
        else:
            kind = "native thread"
        runs = f", runs {self.runs}" if self.runs else ""
        return f"{self.name!r} ({kind}, tid {self.tid}{runs})"


def name_threads(
    tids: Iterable[int],
    python_threads: Iterable[PythonThread],
    own_tid: int,
    comm: Callable[[int], str | None],
) -> list[TaskThread]:
    """The threads in ``tids`` except ``own_tid``, in task-id order. A task id that is some
    Python thread's ``native_id`` is named by it; any other by ``comm(tid)``, and left out
    when that is None (the thread exited since it was listed)."""
    by_tid = {t.native_id: t for t in python_threads if t.native_id is not None}
    named = []
    for tid in sorted(set(tids) - {own_tid}):
        thread = by_tid.get(tid)
        if thread is not None:
            named.append(TaskThread(tid, thread.name, True, thread.daemon, _runs(thread)))
        elif (name := comm(tid)) is not None:
            named.append(TaskThread(tid, name, False))
    return named


def other_threads() -> list[TaskThread]:
    """This process's threads other than the calling one, named."""
    return name_threads(task_ids(), threading.enumerate(), threading.get_native_id(),
                        read_comm)


def task_ids() -> list[int]:
    """The task id of every thread of this process. Without ``/proc`` only the Python
    threads can be seen."""
    try:
        return [int(tid) for tid in os.listdir(_TASKS)]
    except OSError:
        return [t.native_id for t in threading.enumerate() if t.native_id is not None]


def read_comm(tid: int) -> str | None:
    """The kernel's name of thread ``tid`` of this process (15 bytes at most), or None if
    it has exited."""
    try:
        with open(f"{_TASKS}/{tid}/comm", "rb") as f:
            return f.read().rstrip(b"\n").decode(errors="replace")
    except OSError:
        return None


def describe(threads: Sequence[TaskThread], *, first: bool) -> str:
    """Which threads (``first``: all besides the forking one; else those new since the
    last check) and what to do about them, in one line: ``1 other thread in the master:
    'flusher' (...); a lock it holds ...``."""
    one = len(threads) == 1
    count = f"{len(threads)} {'other' if first else 'new'} thread{'' if one else 's'}"
    advice = _ADVICE.format(them="it" if one else "them", their="its" if one else "their")
    return (f"{count} in the master: {', '.join(t.describe() for t in threads)}; a lock "
            f"{'it' if one else 'one of them'} holds at a fork stays held for good in the "
            f"worker: {advice}")


class ThreadCheck:
    """The master's threads, checked before each of its forks.

    The first :meth:`check` names every thread besides the calling one in one warning,
    or with ``strict`` raises :class:`ThreadsAtFork`. Each later check lists the threads
    again and warns once about those it has not seen before, never more than once per
    thread, and never raises: by then workers are running, and refusing to fork would
    leave the worker being started or restarted down for good. A later check that finds
    nothing new costs one listing of ``/proc/self/task`` (measured 7-12 us).
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict
        self._seen: set[int] | None = None  # None until the first check

    def check(self) -> None:
        tids = task_ids()
        if self._seen is not None and self._seen.issuperset(tids):
            return
        first = self._seen is None
        if self._seen is None:
            self._seen = {threading.get_native_id()}
        new = [tid for tid in tids if tid not in self._seen]
        threads = _settled(new)
        self._seen.update(new)
        if not threads:
            return
        message = describe(threads, first=first)
        if first and self.strict:
            raise ThreadsAtFork(f"not forking with {message}", threads)
        log.warning("forking with %s", message)


def _settled(tids: list[int]) -> list[TaskThread]:
    """``tids`` named; one that looks native is looked at again for up to :data:`SETTLE`
    seconds, and dropped if it exits meanwhile (a Python thread that just ended)."""
    deadline = time.monotonic() + SETTLE
    while True:
        threads = name_threads(tids, threading.enumerate(), threading.get_native_id(),
                               read_comm)
        if all(t.python for t in threads) or time.monotonic() >= deadline:
            return threads
        time.sleep(_SETTLE_POLL)


def _runs(thread: PythonThread) -> str | None:
    """Where a Python thread's code is: its target, else its Thread subclass."""
    target = getattr(thread, "_target", None)  # threading.Thread keeps it while it runs
    if target is not None:
        return _qualified(target)
    cls = type(thread)
    if cls.__module__ != "threading" and isinstance(thread, threading.Thread):
        return _qualified(cls)
    return None


def _qualified(obj: object) -> str | None:
    module, name = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
    if not isinstance(name, str):
        return None
    return f"{module}.{name}" if isinstance(module, str) else name
