"""Fleets at and past prefork's limits: how many workers, how long a duration, how much
private memory. Each attribute is one ``--fleet fleets.limits:X``."""

from __future__ import annotations

from fleets.common import emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker

MIB = 1024 * 1024
_kept: list[bytearray] = []


def sleeper() -> None:
    emit("up")
    idle_forever()


def over_its_limit_from_the_start() -> None:
    """Dirty 40 MiB of its own at once, every start: always over a 20 MiB limit."""
    block = bytearray(40 * MIB)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    _kept.append(block)
    emit("up")
    idle_forever()


huge_replicas = Fleet("huge", [Worker("w", sleeper, replicas=10**9)])
huge_max_replicas = Fleet("huge", [Worker("w", sleeper, max_replicas=1025)])
# 1,025 worker processes at most in all: one more than a fleet may run.
too_many = Fleet("many", [Worker("a", sleeper, timeout=5, max_replicas=1000),
                          Worker("b", sleeper, replicas=25)])
endless_backoff = Fleet("endless", [Worker("w", sleeper)], backoff=Backoff(initial=float("inf")))
long_timeout = Fleet("long", [Worker("w", sleeper, timeout=1e10)])
long_start_limit = Fleet("long", [Worker("w", sleeper)],
                         start_limit=StartLimit(interval=3_000_000))
memory_hog = Fleet("hog", [Worker("hog", over_its_limit_from_the_start)],
                   max_private_memory=20 * MIB, start_limit=StartLimit(burst=2, interval=60),
                   restart="always")
