"""A fleet for the metrics exporter: a worker with a heartbeat timeout (its async loop
beats on its own), one the tests kill, and one that shares the floor without touching it."""

from __future__ import annotations

import asyncio

from fleets.common import emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker

QUICK = Backoff(initial=0.1, factor=2.0, maximum=0.4, jitter=0.0, reset_after=60)
# A floor of ~10 MiB the workers share, so the memory series have something to split.
FLOOR = [str(i) * 8 for i in range(250_000)]


async def beating() -> None:
    emit("up")
    await asyncio.Event().wait()


def victim() -> None:
    emit("up")
    idle_forever()


metered = Fleet("metered", [Worker("beating", beating, timeout=2.0),
                            Worker("victim", victim)],
                backoff=QUICK, start_limit=StartLimit(interval=0))
