"""The ``demo`` fleet: three kinds of worker over a shared SQLModel floor.

A stand-in for ``make run`` until the bundled ``cpu`` fleet lands. It shows what a fleet
is: a ``clock`` that ticks, two ``primes`` replicas doing bursts of CPU work, and a
``flaky`` worker that fails every half minute or so, so the restart backoff is visible.
"""

from __future__ import annotations

import logging
import random
import sys
import time

import sqlmodel  # noqa: F401 - the shared floor: imported once, in the master

from prefork import Fleet, Worker, current_worker

log = logging.getLogger("prefork_workers.demo")


def clock() -> None:
    """Log a tick every 10 seconds."""
    ticks = 0
    while True:
        time.sleep(10)
        ticks += 1
        log.info("clock: tick %d", ticks)


def primes() -> None:
    """Count primes below a growing bound with a sieve, one burst every 5 seconds."""
    me = current_worker()
    bound = 200_000
    while True:
        started = time.perf_counter()
        sieve = bytearray([1]) * bound
        sieve[0:2] = b"\x00\x00"
        for n in range(2, int(bound**0.5) + 1):
            if sieve[n]:
                sieve[n * n :: n] = bytes(len(range(n * n, bound, n)))
        log.info("%s: %d primes below %d in %.0f ms", me.label if me else "primes",
                 sum(sieve), bound, (time.perf_counter() - started) * 1000)
        bound = bound * 2 if bound < 20_000_000 else 200_000
        time.sleep(5)


def flaky() -> None:
    """Run for 20 to 40 seconds, then fail, so the master's restart shows in the log."""
    time.sleep(random.uniform(20, 40))
    sys.exit("flaky: simulated failure (exit 1); the master restarts it on its backoff")


fleet = Fleet(
    name="demo",
    workers=(
        Worker("clock", clock),
        Worker("primes", primes, replicas=2),
        Worker("flaky", flaky),
    ),
)
