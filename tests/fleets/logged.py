"""Fleets whose workers write to stdout and stderr, for ``--worker-log-dir``.

``counters``: two replicas; each SIGUSR2 the test sends one makes it write its next batch
of numbered lines, alternating stdout and stderr, then report ``wrote``.
``last``: one worker (not restarted) that leaves a grandchild behind, which writes a last
line without a newline after the worker has exited.
"""

from __future__ import annotations

import os
import signal
import sys

from fleets.common import emit
from prefork import Fleet, Worker, current_worker

BATCH = int(os.environ.get("PREFORK_TEST_BATCH", "500"))


def line(label: str, number: int) -> str:
    """Line ``number`` of replica ``label``: odd ones go to stdout, even ones to stderr."""
    return f"{label} {number:06d} {'out' if number % 2 else 'err'} " + "." * 40


def counter() -> None:
    me = current_worker()
    assert me is not None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    emit("up")
    batch = 0
    while True:
        signal.sigwait({signal.SIGUSR2})
        for number in range(batch * BATCH, (batch + 1) * BATCH):
            if number % 2:
                print(line(me.label, number))
            else:
                sys.stderr.write(line(me.label, number) + "\n")
        emit("wrote", batch=batch)
        batch += 1


def last_words() -> None:
    read_end, write_end = os.pipe()
    # The master SIGTERMs what a worker leaves behind: the grandchild holds it until its
    # last write, blocked before the fork so no SIGTERM can come first.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if os.fork() == 0:  # the grandchild: waits for its parent to be gone, then writes
        os.close(write_end)
        os.read(read_end, 1)  # EOF when the worker has exited
        os.write(1, b"grandchild: after the worker exited, no newline")
        os._exit(0)
    os.close(read_end)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    print("worker: stdout")
    sys.stderr.write("worker: stderr\n")
    emit("up")


counters = Fleet("counters", [Worker("counter", counter, replicas=2)])
last = Fleet("last", [Worker("last", last_words, restart="never")])
