"""A fleet whose stderr fills up: one worker writes until the pipe nobody reads is full,
one exits at once and is restarted with no backoff (three master log lines each time),
and one sleeps, for the test to kill."""

from __future__ import annotations

import os
import sys

from fleets.common import emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker

FLOOD_LINE = "flood {n:06d} " + "x" * 80 + "\n"


def flood() -> None:
    """Write whole lines to stderr through a non-blocking description of its own until the
    pipe is full; report it, then keep stderr full with one last, blocking write."""
    fd = os.open(f"/proc/self/fd/{sys.stderr.fileno()}", os.O_WRONLY | os.O_NONBLOCK)
    n = 0
    try:
        while True:
            os.write(fd, FLOOD_LINE.format(n=n).encode())
            n += 1
    except BlockingIOError:
        pass
    emit("full", lines=n)
    os.write(sys.stderr.fileno(), FLOOD_LINE.format(n=n).encode())  # blocks: it is full
    idle_forever()


def quitter() -> None:
    emit("quit")
    sys.exit(3)  # silent: a worker that printed would block on the full pipe


def sleeper() -> None:
    emit("up")
    idle_forever()


noisy = Fleet("noisy", [Worker("sleeper", sleeper), Worker("flood", flood),
                        Worker("quitter", quitter)],
              backoff=Backoff(initial=0.0, factor=1.0, jitter=0.0),
              start_limit=StartLimit(interval=0))
