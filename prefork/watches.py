"""What the master watches between events, each owning its own deadline.

The master's loop has no clock. Every watch here tells it when it next needs to look
(:meth:`Watch.next_deadline`, a ``time.monotonic()`` or None) and, on every wake-up,
looks (:meth:`Watch.due`) and returns what the master should do: start a slot, stop one
gracefully, or kill one. The loop sleeps until the earliest deadline of all its watches
and carries out what they return; a new kind of watch is one class here and one entry in
the master's list of watches.

- :class:`SlotTimers`: restarts due after a backoff, SIGKILL due after a grace period.
- :class:`HeartbeatWatch`: workers with a timeout that stopped beating.
- :class:`MemoryWatch`: workers whose private memory stays over their limit.
- :class:`AgeWatch`: workers older than their ``max_age`` (plus jitter).
- :class:`RollingRestart`: SIGHUP's one-worker-at-a-time replacement of the fleet.

Scaling (:mod:`prefork.scaling`) speaks in the same actions.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from prefork.fleet import check_seconds
from prefork.heartbeats import HEARTBEAT_CAPACITY, HeartbeatTable
from prefork.memory import MIB, MemoryUnavailable, measure
from prefork.policy import age_deadline, memory_recycle_verdict, over_memory_limit
from prefork.slot import After, Slot, StopReason
from prefork.states import WorkerState

log = logging.getLogger("prefork")


@dataclass(frozen=True)
class Start:
    """Fork ``slot`` again now: its restart is due."""

    slot: Slot


@dataclass(frozen=True)
class Stop:
    """SIGTERM ``slot`` for ``reason``; ``detail`` is the line the log and status show."""

    slot: Slot
    reason: StopReason
    detail: str


@dataclass(frozen=True)
class Kill:
    """SIGKILL ``slot``, still running after its grace period; ``why`` ends the log line."""

    slot: Slot
    why: str


@dataclass(frozen=True)
class Add:
    """A new slot joins the fleet (one replica more): fork it."""

    slot: Slot


@dataclass(frozen=True)
class Remove:
    """``slot`` leaves the fleet (one replica fewer); it has no process."""

    slot: Slot


Action = Start | Stop | Kill | Add | Remove


class Watch(Protocol):
    """Anything with a deadline in the master's loop (the control server is one too)."""

    def next_deadline(self) -> float | None:
        """When ``due`` next has something to do, or None if only an event can change it."""

    def due(self, now: float) -> Iterable[Action]:
        """Called after every wake-up: what to do now (often nothing)."""


class SlotTimers:
    """Each slot's own deadlines: the end of its backoff, and the end of the grace period
    after SIGTERM - its own, or the whole fleet's when it stops."""

    def __init__(self, slots: Sequence[Slot], grace: float) -> None:
        check_seconds("grace", grace)  # FleetError: the master's too is checked at load
        self.slots = slots
        self.grace = grace

    def next_deadline(self) -> float | None:
        deadlines = [s.due for s in self.slots if s.due is not None]
        deadlines += [s.kill_at for s in self.slots if s.kill_at is not None]
        return min(deadlines, default=None)

    def due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot in self.slots:
            if slot.due is not None and now >= slot.due:
                actions.append(Start(slot))
            if slot.kill_at is not None and now >= slot.kill_at:
                if slot.stopping_for is StopReason.SHUTDOWN:
                    why = f", grace period of {self.grace:g}s over"
                else:
                    why = f" {self.grace:g}s after SIGTERM"
                actions.append(Kill(slot, why))
        return actions


class HeartbeatWatch:
    """Workers with a ``timeout`` write ``time.monotonic()`` into their cell of a table
    shared with the master (:mod:`prefork.heartbeats`); the master reads a cell only when
    that worker's timeout would be over, so beating workers never wake it."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.table: HeartbeatTable | None = None

    def open(self) -> None:
        """Make the table; before the first fork, so every child shares it."""
        self.table = HeartbeatTable(capacity=HEARTBEAT_CAPACITY)

    def close(self) -> None:
        if self.table is not None:
            self.table.close()
            self.table = None

    def arm(self, slot: Slot, now: float) -> tuple[HeartbeatTable, int, float] | None:
        """Before ``slot`` forks: count the fork as its first beat; returns what the child
        attaches to (table, cell, how often an async worker beats) or None if it has no
        timeout."""
        if slot.worker.timeout is None or self.table is None:
            return None
        if slot.cell is None:
            slot.cell = self.table.take()
        self.table.reset(slot.cell, now)
        return self.table, slot.cell, slot.worker.timeout / 4

    def release(self, slot: Slot) -> None:
        """``slot`` leaves the fleet: its cell is free for another."""
        if slot.cell is not None and self.table is not None:
            self.table.give_back(slot.cell)
            slot.cell = None

    def last_beat(self, slot: Slot) -> float | None:
        """The monotonic time of ``slot``'s last beat (its fork counts as one), or None for
        a worker without a heartbeat timeout."""
        if slot.cell is None or self.table is None:
            return None
        return self.table.last(slot.cell)

    def next_deadline(self) -> float | None:
        return min((d for s in self.slots if (d := self._deadline(s)) is not None), default=None)

    def due(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for slot in self.slots:
            deadline = self._deadline(slot)
            if deadline is not None and now >= deadline:
                assert self.table is not None and slot.cell is not None
                silent = now - self.table.last(slot.cell)
                actions.append(Stop(slot, StopReason.HUNG, f"no heartbeat for {silent:.1f}s "
                                    f"(timeout {slot.worker.timeout:g}s)"))
        return actions

    def _deadline(self, slot: Slot) -> float | None:
        if (slot.state is not WorkerState.RUNNING or slot.cell is None
                or slot.worker.timeout is None or self.table is None):
            return None
        return self.table.last(slot.cell) + slot.worker.timeout


class MemoryWatch:
    """Every ``interval`` seconds, read the private memory (USS) of each worker that has a
    limit - about 1 ms a worker - and recycle one that stayed above it for a whole
    interval: only one at a time, so a fleet-wide leak is not a fleet-wide restart. One
    over its limit at every check of its start limit's ``burst`` runs in a row is stopped
    and failed instead (:func:`prefork.policy.memory_recycle_verdict`)."""

    def __init__(self, slots: Sequence[Slot], default_limit: int | None,
                 interval: float) -> None:
        check_seconds("memory check interval", interval, positive=True)
        self.slots = slots
        self.default_limit = default_limit
        self.interval = interval
        self._next_check: float | None = None
        self._recycling: Slot | None = None

    def limit(self, slot: Slot) -> int | None:
        return slot.worker.max_private_memory or self.default_limit

    def start(self, now: float) -> None:
        """Begin checking, if any worker has a limit."""
        if any(self.limit(s) for s in self.slots):
            self._next_check = now + self.interval

    def next_deadline(self) -> float | None:
        return self._next_check

    def due(self, now: float) -> list[Action]:
        if self._next_check is None or now < self._next_check:
            return []
        self._next_check = now + self.interval
        if self._recycling is not None and self._recycling.state is not WorkerState.STOPPING:
            self._recycling = None
        actions: list[Action] = []
        for slot in self.slots:
            limit = self.limit(slot)
            if limit is None or slot.state is not WorkerState.RUNNING or slot.pid is None:
                continue
            try:
                uss = measure(slot.pid).uss
            except MemoryUnavailable:
                continue  # it just exited: the reaper will see it
            slot.seen_under = slot.seen_under or uss <= limit
            slot.over_since, recycle = over_memory_limit(uss, limit, slot.over_since, now,
                                                         self.interval)
            if recycle and self._recycling is None:
                self._recycling = slot
                over = f"private memory {uss / MIB:.0f} MiB > {limit / MIB:.0f} MiB"
                slot.runs_over, fail = memory_recycle_verdict(slot.runs_over, slot.seen_under,
                                                              slot.start_limit)
                if fail:
                    actions.append(Stop(slot, StopReason.OVER_MEMORY, f"{over} at every check "
                                        f"of {slot.runs_over} runs in a row"))
                else:
                    actions.append(Stop(slot, StopReason.RECYCLED, f"recycled: {over}"))
        return actions


class AgeWatch:
    """Replace a worker gracefully once it is older than its ``max_age`` plus the jitter
    drawn for that run (:func:`prefork.policy.age_deadline`): one at a time, the oldest
    due first, and never while another worker is being replaced (aged, recycled for its
    memory, or in a rolling restart), so the fleet loses at most one worker to it at once.
    A fleet where no worker has a ``max_age`` costs the loop nothing."""

    def __init__(self, slots: Sequence[Slot], default_max_age: float | None,
                 rng: random.Random) -> None:
        self.slots = slots
        self.default_max_age = default_max_age
        self._rng = rng
        self._active = default_max_age is not None or any(s.worker.max_age for s in slots)
        # Each slot's run (its started_at) and the deadline drawn for that run.
        self._deadlines: weakref.WeakKeyDictionary[Slot, tuple[float, float]] = (
            weakref.WeakKeyDictionary())

    def max_age(self, slot: Slot) -> float | None:
        return slot.worker.max_age or self.default_max_age

    def next_deadline(self) -> float | None:
        if not self._active or self._replacing():
            return None  # a replacement's end is an event (reap, fork) that wakes the loop
        return min((d for _, d in self._due_times()), default=None)

    def due(self, now: float) -> list[Action]:
        if not self._active or self._replacing():
            return []
        due = [(deadline, slot) for slot, deadline in self._due_times() if deadline <= now]
        if not due:
            return []
        _, slot = min(due, key=lambda pair: pair[0])
        return [Stop(slot, StopReason.AGED,
                     f"recycled: older than {self.max_age(slot):g}s (max_age)")]

    def _due_times(self) -> list[tuple[Slot, float]]:
        times = []
        for slot in self.slots:
            max_age = self.max_age(slot)
            if max_age is None or slot.state is not WorkerState.RUNNING:
                continue
            drawn = self._deadlines.get(slot)
            if drawn is None or drawn[0] != slot.started_at:  # a new run: a new jitter
                drawn = (slot.started_at, age_deadline(slot.started_at, max_age,
                                                       slot.worker.max_age_jitter,
                                                       self._rng.random()))
                self._deadlines[slot] = drawn
            times.append((slot, drawn[1]))
        return times

    def _replacing(self) -> bool:
        return any(s.state is WorkerState.STOPPING and s.stopping_for is not None
                   and s.stopping_for.after is After.REPLACE for s in self.slots)


class RollingRestart:
    """Replace every running worker, one at a time: the next only once the previous one is
    back, so there are never two copies of a worker, and never more than one worker of the
    fleet down for it. Workers in backoff are left to start from the same floor when due."""

    def __init__(self, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self._queue: deque[Slot] = deque()
        self._replacing: Slot | None = None

    def begin(self, only: Sequence[Slot] | None = None) -> int:
        """Queue every running or backing-off worker (of ``only``, if given) not queued
        yet; returns the queue's length."""
        self._queue.extend(s for s in (self.slots if only is None else only)
                           if s.state in (WorkerState.RUNNING, WorkerState.BACKOFF)
                           and s not in self._queue and s is not self._replacing)
        return len(self._queue)

    def cancel(self) -> None:
        self._queue.clear()

    @property
    def in_progress(self) -> bool:
        """Workers are queued, or one is being replaced."""
        return self._replacing is not None or bool(self._queue)

    def next_deadline(self) -> float | None:
        return None  # it moves on events: the previous worker reaped and forked again

    def due(self, now: float) -> list[Action]:
        if self._replacing is not None and self._replacing.state is WorkerState.STOPPING:
            return []
        in_progress = self.in_progress
        self._replacing = None
        while self._queue:
            slot = self._queue.popleft()
            if slot.state is WorkerState.RUNNING and slot in self.slots:
                self._replacing = slot
                return [Stop(slot, StopReason.ROLLING_RESTART, "rolling restart")]
        if in_progress:
            log.info("rolling restart done")
        return []
