"""Heartbeats: a worker tells the master it is alive by writing the time into its cell of
a table the master shares with every child.

The table is an anonymous ``MAP_SHARED`` mapping the master makes before its first fork,
one 8-byte cell per worker slot. A beat is one ``struct.pack_into`` of
``time.monotonic()`` (a system-wide clock): no system call, no file, no wake-up of the
master, which reads the cell only when the worker's timeout would be over.

A worker's first beat is also its readiness for the workers that start after it
(:func:`prefork.readiness.ready`; a no-op unless one does). The beats an async worker's
loop makes on its own are not: they say its loop runs, not that it is ready.
"""

from __future__ import annotations

import mmap
import struct
import time

from prefork import readiness

_CELL = struct.Struct("d")
# Cells in the master's table: one per worker process a fleet may run at once, which
# fleet validation bounds by this (prefork.fleet.MAX_WORKERS).
HEARTBEAT_CAPACITY = 1024

# Child side: set by prefork.child right after fork for a worker that has a timeout.
_table: mmap.mmap | None = None
_offset = 0
_interval: float | None = None


class HeartbeatTable:
    """``capacity`` cells shared by the master and all its children."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._map = mmap.mmap(-1, capacity * _CELL.size)  # MAP_SHARED | MAP_ANONYMOUS
        self._free = list(range(capacity - 1, -1, -1))

    def take(self) -> int:
        """A free cell's index; raises IndexError if the table is full."""
        return self._free.pop()

    def give_back(self, index: int) -> None:
        self._free.append(index)

    def reset(self, index: int, when: float) -> None:
        """Count ``when`` as the last beat (the master does this at each fork)."""
        _CELL.pack_into(self._map, index * _CELL.size, when)

    def last(self, index: int) -> float:
        return _CELL.unpack_from(self._map, index * _CELL.size)[0]

    def close(self) -> None:
        self._map.close()

    def attach(self, index: int, interval: float) -> None:
        """In a child: make :func:`heartbeat` write to cell ``index``; async workers run by
        prefork beat every ``interval`` seconds on their own."""
        global _table, _offset, _interval
        _table, _offset, _interval = self._map, index * _CELL.size, interval


def heartbeat() -> None:
    """Tell the master this worker is alive (and, the first time, ready: see
    :mod:`prefork.readiness`). Costs well under a microsecond; a no-op in a worker without
    a timeout that nobody waits for, in the master and outside prefork."""
    if _table is not None:
        _CELL.pack_into(_table, _offset, time.monotonic())
    if readiness.channel >= 0:
        readiness.ready()


def _beat_only() -> None:
    """A beat that says the event loop runs, not that the worker is ready."""
    if _table is not None:
        _CELL.pack_into(_table, _offset, time.monotonic())


def beat_interval() -> float | None:
    """How often an async worker beats on its own, or ``None`` without a timeout."""
    return _interval if _table is not None else None


async def beat_while_the_loop_runs(interval: float) -> None:
    """Beat every ``interval`` seconds for as long as the event loop gets to run this: a
    loop blocked by a synchronous call stops beating, which is what the timeout is for."""
    import asyncio  # imported already (it runs in an event loop); not by a sync fleet's master

    while True:
        _beat_only()
        await asyncio.sleep(interval)
