"""The ``demo`` fleet: the small fleet that shows a master at work, restarts included.

A ``clock`` that ticks, two ``primes`` replicas doing bursts of CPU work, and a ``flaky``
worker that fails every half minute or so, so the restart backoff is visible in the log.
``prefork run --fleet demo`` (``make run FLEET=demo``) runs it.

Its floor (:data:`FLOOR`) is standard-library modules a service commonly imports, so it
runs on a bare ``pip install prefork``, with nothing beyond prefork's own dependencies.
Beside what prefork itself imports, they add 24 modules and 2.6 MiB to the master
(measured, Python 3.11).
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
import time

from prefork import Fleet, Worker, current_worker

# The shared floor: standard-library modules a service commonly imports, imported once here,
# in the master, so that every worker finds them in place. The workers below do not use them.
FLOOR = ("decimal", "email.parser", "http.client", "json", "sqlite3", "urllib.request",
         "xml.etree.ElementTree")
for _module in FLOOR:
    importlib.import_module(_module)

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
