"""Running an ``async def`` worker on a fresh event loop that SIGTERM and SIGINT stop cleanly.

A standalone asyncio program dies of SIGTERM without running any of its clean-up, and
``asyncio.run`` turns only SIGINT into a cancellation, then re-raises KeyboardInterrupt so
the process still dies by the signal. A worker the master stops should unwind instead:
the first SIGTERM or SIGINT cancels its main task, its ``finally`` and ``except
CancelledError`` code runs, and a cancellation that came from the signal is a clean end.

A loop that is blocked (synchronous code that never yields: the hung worker a heartbeat
timeout finds) can never run that cancellation. If the loop has not taken the signal
:data:`BLOCKED_AFTER` seconds later, the worker dies of it as a plain process would,
rather than wait for the master's SIGKILL at the end of the grace period.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Seconds a loop may take to get to the cancellation before it counts as blocked. asyncio
# itself calls a callback slow at 0.1 s (debug mode); one that holds the loop for a second
# after a stop was asked for is not going to let the clean-up run.
BLOCKED_AFTER = 1.0

# The dispositions a standalone python starts with: no one else claimed these signals.
# SIG_IGN (SIGINT in a shell's background job) and any handler the worker's floor set
# are someone's choice and are left alone.
_UNCLAIMED: dict[int, tuple[object, ...]] = {
    signal.SIGTERM: (signal.SIG_DFL,),
    signal.SIGINT: (signal.SIG_DFL, signal.default_int_handler),
}


def run_until_stopped(main: Coroutine[Any, Any, T]) -> T | None:
    """Run ``main`` on a fresh event loop, as ``asyncio.run`` does, and return its result,
    or ``None`` if a SIGTERM/SIGINT cancelled it and it let the cancellation through.
    Any other exception, a clean-up's included, propagates."""
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        task = loop.create_task(main)
        stop = _StopOnSignal(loop, task)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if stop.requested and task.cancelled():
                return None
            raise
        finally:
            stop.uninstall()


class _StopOnSignal:
    """Loop handlers for SIGTERM and SIGINT that cancel ``task``.

    Installed only in the main thread (no other may set handlers) and only over an
    unclaimed disposition (``_UNCLAIMED``). A worker that sets its own handler later,
    with ``loop.add_signal_handler`` or ``signal.signal``, replaces ours.

    After the first signal, SIGINT raises KeyboardInterrupt again, as in any python
    program: a second Ctrl-C cuts a hung clean-up short. A later SIGTERM changes nothing:
    after Ctrl-C the master sends every worker SIGTERM too, and the master's SIGKILL at
    the end of the grace period bounds the clean-up anyway. A first signal the loop does
    not take within BLOCKED_AFTER (a watchdog thread checks) ends the process.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
        self.requested = False
        self._loop, self._task = loop, task
        self._mine: dict[int, object] = {}  # signal -> the disposition our handler set
        self._first: int | None = None  # the first signal, once the interpreter ran it
        self._blocked = False  # the loop did not take it within BLOCKED_AFTER
        self._on_signal_handler = self._on_signal  # one bound method, compared with `is`
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, unclaimed in _UNCLAIMED.items():
            if signal.getsignal(signum) in unclaimed:
                # The loop learns of the signal through its wake-up fd and calls _stop;
                # the Python-level handler, which asyncio makes a no-op, is ours: it runs
                # even while the loop is blocked, between two bytecodes of the code
                # blocking it.
                loop.add_signal_handler(signum, self._stop, signum)
                signal.signal(signum, self._on_signal_handler)
                self._mine[signum] = self._on_signal_handler

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._blocked and self._first is not None:
            # The watchdog found the loop blocked: end as the signal would end a python.
            _die_of(self._first)
        if self._first is None:
            self._first = signum
            watchdog = threading.Timer(BLOCKED_AFTER, self._check_taken)
            watchdog.daemon = True
            watchdog.start()

    def _check_taken(self) -> None:
        """In the watchdog's thread: if the loop has not run _stop, interrupt the main
        thread, whose handler then ends the process."""
        if self.requested or self._first is None:
            return
        self._blocked = True
        signal.pthread_kill(threading.main_thread().ident or 0, self._first)

    def _stop(self, signum: int) -> None:
        if self.requested:
            return
        # The loop hears every signal that has a Python handler, so it calls us even when
        # the worker has put its own in place with signal.signal(): that one ran instead.
        if signal.getsignal(signum) is not self._mine.get(signum):
            return
        self.requested = True
        self._task.cancel()
        self._release(signal.SIGINT)

    def uninstall(self) -> None:
        """Put back the dispositions our handlers replaced, where they are still ours."""
        for signum in list(self._mine):
            self._release(signum)

    def _release(self, signum: int) -> None:
        mine = self._mine.pop(signum, None)
        if mine is not None and signal.getsignal(signum) is mine:
            # asyncio puts back SIG_DFL, or default_int_handler for SIGINT: a python's own.
            self._loop.remove_signal_handler(signum)


def _die_of(signum: int) -> None:
    """End this process by ``signum``'s default action, as it would end a plain python
    (SIGINT: KeyboardInterrupt's exit, which prefork.child turns into death by SIGINT)."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
