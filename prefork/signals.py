"""The master's signals: queued by their handlers, read by its loop.

A handler only appends the signal number to a queue; ``signal.set_wakeup_fd`` makes the
interpreter's C-level handler write a byte to a non-blocking pipe as well, which wakes the
loop's ``select()``. Nothing heavy ever runs inside a handler (it can interrupt a log call).

What the master does with each signal (the README's signal table):

    SIGTERM, SIGINT,  stop: SIGTERM to every worker, SIGKILL after the grace period;
    SIGQUIT           a second one SIGKILLs the stragglers at once
    SIGHUP            rolling restart of every worker, one at a time
    SIGUSR1           reopen log files (logrotate's ``postrotate``)
    SIGTTIN, SIGTTOU  one replica more / fewer of each worker that has max_replicas
    SIGCHLD           nothing but the wake-up: every wake-up reaps
    IGNORED           logged and ignored: their default action would end the master at
                      once, and the kernel would then SIGKILL every worker without grace

The fault signals (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGSYS, SIGTRAP, SIGABRT) keep their
default, a core dump: a handler cannot run Python code on a real fault, and an operator
who sends SIGABRT asks for the core. SIGTSTP, SIGCONT, SIGWINCH and SIGURG keep theirs too
(stop, continue, nothing, nothing: none of them ends a process).
"""

from __future__ import annotations

import os
import signal
from collections import deque
from collections.abc import Callable, Iterator

HANDLED: tuple[int, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD, signal.SIGHUP,
    signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU)
STOP = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# Signals whose default action terminates a process and that mean nothing to a master. A
# handler is set only where the floor left the default: an application's own handler (a
# profiler's SIGPROF) stays.
IGNORED: tuple[int, ...] = (
    signal.SIGUSR2, signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGIO,
    signal.SIGPWR, signal.SIGSTKFLT, signal.SIGXCPU, signal.SIGXFSZ,
    *range(signal.SIGRTMIN, signal.SIGRTMAX + 1))



def signal_name(signum: int) -> str:
    """``SIGTERM``; ``SIGRTMIN+3`` for a real-time signal; ``signal 99`` for no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return f"signal {signum}"


Disposition = Callable[[int, object], object] | int | signal.Handlers | None


class SignalInbox:
    """The handlers, their queue and the wake-up pipe, from ``open()`` to ``close()``.

    ``defaults`` keeps the dispositions found at ``open()`` of every signal it handles, as
    (signal, disposition) pairs of plain values (SIG_DFL and SIG_IGN as the ints 0 and 1):
    a forked child puts them back, so a worker reacts to signals as it would as a program
    of its own, and touches no enum member of the floor doing it (:mod:`prefork.child`).
    """

    def __init__(self) -> None:
        self.defaults: tuple[tuple[int, Disposition], ...] = ()
        self.wake_r = self.wake_w = -1
        self._queue: deque[int] = deque()
        self._previous_wakeup_fd = -1

    def open(self) -> None:
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # One handler object for all: a child then drops its references to one object of
        # the master's, not to 50 (prefork.child).
        handler = self._on_signal
        defaults = []
        for signum in HANDLED + IGNORED:
            previous = signal.getsignal(signum)
            if signum in IGNORED and previous not in (signal.SIG_DFL, None):
                continue
            previous = signal.SIG_DFL if previous is None else previous
            defaults.append((int(signum),
                             int(previous) if isinstance(previous, int) else previous))
            signal.signal(signum, handler)
        self.defaults = tuple(defaults)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def close(self) -> None:
        """Put back the dispositions and wake-up fd found at ``open()``; close the pipe."""
        if self.defaults:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            for signum, handler in self.defaults:
                signal.signal(signum, handler)  # type: ignore[arg-type]
            self.defaults = ()
        for fd in (self.wake_r, self.wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_r = self.wake_w = -1

    def handled(self) -> list[int]:
        """The signals with the inbox's handler: what the master blocks across a fork."""
        return [signum for signum, _ in self.defaults]

    def fds(self) -> list[int]:
        """The pipe: what a forked child must close."""
        return [fd for fd in (self.wake_r, self.wake_w) if fd >= 0]

    def drain(self) -> None:
        """Empty the wake-up pipe (the queue holds the signals themselves)."""
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def queued(self) -> bool:
        """A signal other than SIGCHLD was caught and not taken yet."""
        return any(signum != signal.SIGCHLD for signum in self._queue)

    def take(self) -> Iterator[int]:
        """Each queued signal, oldest first, including any that arrive meanwhile."""
        while self._queue:
            yield self._queue.popleft()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._queue.append(signum)
