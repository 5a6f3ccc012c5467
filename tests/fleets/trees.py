"""Workers that start processes of their own, for a worker's whole process tree
(``test_process_trees``). Each started process reports ``child-up`` with its pid and,
if it catches SIGTERM, ``child-terminated``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fleets.common import bump, emit, idle_forever
from prefork import Fleet, Worker

# A process the worker starts: reports its pid, then waits; with "catch" it reports the
# SIGTERM it gets, with "ignore" it ignores it.
_CHILD = """
import os, signal, sys
from fleets.common import emit
mode = sys.argv[1]
if mode == "catch":
    def on_term(signum, frame):
        emit("child-terminated", mode=mode)
        os._exit(0)
    signal.signal(signal.SIGTERM, on_term)
elif mode == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
emit("child-up", mode=mode, pgid=os.getpgid(0))
while True:
    signal.pause()
"""


def start_child(mode: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, mode])


def crashes_after_starting_a_child() -> None:
    """First run: starts a child that catches SIGTERM, and one that ignores it, then exits 3
    when the test sends SIGUSR1. Later runs: idle."""
    if bump("crasher") == 1:
        signal.signal(signal.SIGUSR1, lambda *_: os._exit(3))
        start_child("catch")
        start_child("ignore")
    emit("up")
    idle_forever()


def starts_a_child() -> None:
    """A plain worker with one child that SIGTERM stops; SIGTERM kills the worker at once."""
    start_child("plain")
    emit("up")
    idle_forever()


def daemonizes() -> None:
    """Double-forks a daemon in a session of its own, as a worker wrapping an old tool
    might: the daemon leaves the worker's process group. With ``DAEMON_EXITS`` a second
    one exits at once, leaving a zombie for whoever adopts it."""
    _daemon(lambda: _run_daemon("catch"))
    if os.environ.get("DAEMON_EXITS"):
        _daemon(lambda: emit("short-daemon", daemon_pid=os.getpid()))
    emit("up")
    idle_forever()


def _daemon(body: object) -> None:
    middle = os.fork()
    if middle == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                try:
                    body()  # type: ignore[operator]
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(middle, 0)


def _run_daemon(mode: str) -> None:
    def on_term(signum: int, frame: object) -> None:
        emit("child-terminated", mode=mode)
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    emit("child-up", mode=mode, pgid=os.getpgid(0))
    idle_forever()


crashing = Fleet("crashing", [Worker("crasher", crashes_after_starting_a_child)])
parents = Fleet("parents", [Worker("parent", starts_a_child, replicas=2, max_replicas=3)])
daemonizing = Fleet("daemonizing", [Worker("daemonizer", daemonizes)])
