"""Worker groups (``test_groups``): two steady async workers and one that raises, hosted
in one process, beside a plain worker of its own.

Each counter reports ``up`` once per start (with its pid and who ``current_worker()``
says it is), then a ``tick`` with its in-memory count every 10 counts (200 ms): counts
that keep growing from one ``up`` are a worker never restarted. Its clean-up reports
``cleaned``. The raiser reports ``raising`` and raises 50 ms into each run.
"""

from __future__ import annotations

import asyncio

from fleets.common import emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker, current_worker

QUICK = Backoff(initial=0.1, factor=2.0, maximum=5.0, jitter=0.0, reset_after=60.0)


def _counter(name: str):
    async def count() -> None:
        me = current_worker()
        emit("up", worker=name, current=me.name if me else None)
        n = 0
        try:
            while True:
                n += 1
                if n % 10 == 0:
                    emit("tick", worker=name, count=n)
                await asyncio.sleep(0.02)
        finally:
            emit("cleaned", worker=name, count=n)

    count.__qualname__ = name
    return count


async def raiser() -> None:
    me = current_worker()
    emit("raising", worker="raiser", current=me.name if me else None)
    await asyncio.sleep(0.05)
    raise ValueError("raiser: planned failure")


WORKERS = [
    Worker("counter-a", _counter("counter-a")),
    Worker("counter-b", _counter("counter-b")),
    # Starts at 0, 0.15, 0.4, 0.85, 1.7 s: the sixth start would break the limit.
    Worker("raiser", raiser, start_limit=StartLimit(burst=5, interval=60.0)),
    Worker("solo", idle_forever),
]

fleet = Fleet("grouped", WORKERS, backoff=QUICK,
              groups={"trio": ["counter-a", "counter-b", "raiser"]})

# The same workers with no groups: `prefork run --group` makes them.
plain = Fleet("plain", WORKERS, backoff=QUICK)

# A group and a kernel pool: what `prefork probe` measures of them (test_probe).
pooled = Fleet("grouped-pooled", WORKERS, backoff=QUICK, kernel_workers=2,
               groups={"trio": ["counter-a", "counter-b", "raiser"]})


def _blocker():
    """A hosted worker that blocks its group's event loop once told to (a file appears),
    as a hung synchronous call would: no hosted worker runs, and the loop beats no more."""
    async def block() -> None:
        import os
        import time
        from pathlib import Path

        emit("up", worker="blocker")
        flag = Path(os.environ["PREFORK_TEST_DIR"]) / "block"
        while not flag.exists():
            await asyncio.sleep(0.02)
        flag.unlink()
        emit("blocking", worker="blocker")
        time.sleep(3600)  # the point: the loop is stuck

    return block


# The group's loop beats for its workers; a timeout of 0.5 s on one of them is the group's.
hung = Fleet("grouped-hung", [Worker("counter-a", _counter("counter-a"), timeout=0.5),
                              Worker("blocker", _blocker())],
             backoff=QUICK, groups={"pair": ["counter-a", "blocker"]})
