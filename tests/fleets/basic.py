"""Small fleets for the master's behaviours. Each attribute is one ``--fleet fleets.basic:X``."""

from __future__ import annotations

import asyncio
import atexit
import gc
import os
import signal
import sys
import time
from pathlib import Path

from fleets.common import bump, emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker, after_fork, current_worker


def sleeper() -> None:
    emit("up")
    idle_forever()


def crasher() -> None:
    emit("up")
    sys.exit(3)


def raiser() -> None:
    emit("up")
    raise ValueError("boom-42")


def clean_exit() -> None:
    emit("up")


def term_ignorer() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    emit("up")
    idle_forever()


def stable_on_fourth() -> None:
    """Starts 1-3 die at once; start 4 stays up past the backoff reset, then dies; 5 stays."""
    attempt = bump("stable_on_fourth")
    emit("up", attempt=attempt)
    if attempt <= 3:
        sys.exit(1)
    if attempt == 4:
        time.sleep(0.6)  # longer than reset_after below: a stable run
        sys.exit(1)
    idle_forever()


def inspect_self() -> None:
    """Report what crossed the fork: signal mask and handlers, descriptors, title, gc."""
    status_text = Path("/proc/self/status").read_text()
    status = dict(line.split(":", 1) for line in status_text.splitlines())
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read().replace(b"\0", b" ").decode().strip()
    try:
        asyncio.get_running_loop()
        loop_running = True
    except RuntimeError:
        loop_running = False
    emit("inspect", report_fd=after_fork._channel,
         sigblk=status["SigBlk"].strip(), sigcgt=status["SigCgt"].strip(),
         sigign=status["SigIgn"].strip(), fds=fds, cmdline=cmdline,
         freeze_count=gc.get_freeze_count(), env_worker=os.environ.get("PREFORK_WORKER"),
         env_replica=os.environ.get("PREFORK_REPLICA"), loop_running=loop_running,
         env_notify=[k for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
                     if k in os.environ],
         comm=Path("/proc/self/comm").read_text().strip())
    idle_forever()


async def async_sleeper() -> None:
    loop = asyncio.get_running_loop()
    emit("up", loop=id(loop), running=loop.is_running())
    await asyncio.Event().wait()


def say_goodbye() -> None:
    """Exit with a message (as a worker does on a fatal error) once all 16 replicas are up,
    so that their messages race for the shared stderr."""
    me = current_worker()
    assert me is not None
    here = Path(os.environ["PREFORK_TEST_DIR"])
    (here / f"ready-{me.replica}").touch()
    while len(list(here.glob("ready-*"))) < 16:
        time.sleep(0.001)  # the start line of the race
    sys.exit(f"worker {me.label} says goodbye")


def _atexit_report() -> None:
    emit("atexit")


atexit.register(_atexit_report)

FAST = Backoff(initial=0.1, factor=2.0, maximum=5.0, jitter=0.1, reset_after=0.5)

sleepers = Fleet("sleepers", [Worker("sleeper", sleeper, replicas=4)])
one_sleeper = {"sleeper": sleeper}
crashing = Fleet("crashing", [Worker("crasher", crasher)],
                 backoff=Backoff(initial=0.1, factor=2.0, maximum=0.4, jitter=0.1),
                 start_limit=StartLimit(interval=0))
resetting = Fleet("resetting", [Worker("flappy", stable_on_fourth)], backoff=FAST,
                  start_limit=StartLimit(interval=0))
flapping = Fleet("flapping", [Worker("crasher", crasher), Worker("sleeper", sleeper)],
                 backoff=Backoff(initial=0.05, factor=1.0, jitter=0.0),
                 start_limit=StartLimit(burst=3, interval=30))
stubborn = Fleet("stubborn", [Worker("stubborn", term_ignorer), Worker("sleeper", sleeper)])
inspect = Fleet("inspect", [Worker("inspect", inspect_self)])
# Forked in one batch: each child must close its siblings' pipe ends.
inspect_many = Fleet("inspect_many", [Worker("inspect", inspect_self, replicas=3)])
asyncs = Fleet("asyncs", [Worker("async", async_sleeper)])
raising = Fleet("raising", [Worker("raiser", raiser)], restart="never")
finishing = Fleet("finishing", [Worker("done", clean_exit, replicas=2)])
finishing_never = Fleet("finishing_never", [Worker("done", clean_exit)], restart="never")
failing_never = Fleet("failing_never", [Worker("bad", crasher), Worker("good", clean_exit)],
                      restart="never")
always = Fleet("always", [Worker("again", clean_exit, restart="always", backoff=FAST,
                                 start_limit=StartLimit(burst=3, interval=60))])
many = Fleet("many", [Worker("sleeper", sleeper, replicas=48)])
goodbyes = Fleet("goodbyes", [Worker("shout", say_goodbye, replicas=16)], restart="never")
mixed = Fleet("mixed", [Worker("sleeper", sleeper), Worker("crasher", crasher),
                        Worker("async", async_sleeper)], backoff=FAST,
              start_limit=StartLimit(interval=0))

# Deliberately broken fleets, for bad-input tests.
empty = Fleet("empty", [])
not_a_fleet = 42
uncallable = {"w": 17}
needs_args = {"w": lambda x: None}
bad_name = {"has space": sleeper}
bad_replicas = Fleet("bad", [Worker("w", sleeper, replicas=0)])
bad_policy = Fleet("bad", [Worker("w", sleeper, restart="sometimes")])  # type: ignore[arg-type]
duplicate = Fleet("dup", [Worker("w", sleeper), Worker("w", crasher)])
bad_timeout = Fleet("bad", [Worker("w", sleeper, timeout=0)])
bad_max_replicas = Fleet("bad", [Worker("w", sleeper, replicas=2, max_replicas=1)])
bad_memory_limit = Fleet("bad", [Worker("w", sleeper, max_private_memory=-1)])
bad_warmup = Fleet("bad", [Worker("w", sleeper, warmup=lambda x: None)])
