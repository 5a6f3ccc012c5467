"""Fleets whose workers start after others (``after=``). Each attribute is one
``--fleet fleets.start_order:X``.

A held worker reports "up", then waits for SIGUSR2 from the test before it reports
"released" and becomes ready (or exits): the test decides when a dependency is ready.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker, heartbeat, ready


def held(then: Callable[[], object]) -> Callable[[], None]:
    def run() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # before "up": never lost
        emit("up")
        signal.sigwait({signal.SIGUSR2})
        emit("released")
        then()
    return run


def ready_then_idle() -> None:
    ready()
    ready()  # a second call does nothing
    idle_forever()


def beat_then_idle() -> None:
    heartbeat()
    idle_forever()


def sleeper() -> None:
    emit("up")
    idle_forever()


def failing_migration() -> None:
    emit("up")
    sys.exit(1)


# web waits for api (prefork.ready()) and cache (its first heartbeat(), no timeout).
by_ready = Fleet("by_ready", [
    Worker("web", sleeper, after=["api", "cache"]),  # listed first: the order is after='s
    Worker("api", held(ready_then_idle)),
    Worker("cache", held(beat_then_idle)),
])
migration = Fleet("migration", [
    Worker("migrate", held(lambda: None), restart="never"),
    Worker("web", sleeper, after=["migrate"]),
])
failed_migration = Fleet("failed_migration", [
    Worker("migrate", failing_migration, restart="never"),
    Worker("web", sleeper, after=["migrate"]),
    Worker("other", sleeper),
])
only_failed_migration = Fleet("only_failed_migration", [
    Worker("migrate", failing_migration, restart="never"),
    Worker("web", sleeper, after=["migrate"]),
])

# Refused at load.
cycle = Fleet("cycle", [Worker("a", sleeper, after=["b"]), Worker("b", sleeper, after=["c"]),
                        Worker("c", sleeper, after=["a"]), Worker("d", sleeper)])
unknown = Fleet("unknown", [Worker("migrate", sleeper), Worker("web", sleeper,
                                                                after=["migrat"])])
itself = Fleet("itself", [Worker("web", sleeper, after=["web"])])
a_string = Fleet("a_string", [Worker("migrate", sleeper),
                              Worker("web", sleeper, after="migrate")])  # type: ignore[arg-type]
