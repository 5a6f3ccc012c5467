"""A worker slot - one replica of one worker - and what each event means for it.

The slot keeps its own state (see :mod:`prefork.states`) and decides: when its child
exits, :meth:`Slot.exited` moves it on (BACKOFF with the next delay, a final state, or
STOPPED) and returns what the master must do next (:class:`Next`); when the master stops
it on its own, the :class:`StopReason` says what follows once it is reaped. The master
only acts: it forks, signals, reaps and removes. Nothing here forks, signals or reads a
clock: ``now`` and the random source come in, so every decision can be tested without a
process.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from prefork.fleet import Backoff, Fleet, RestartPolicy, StartLimit, Worker, replica_label
from prefork.policy import (
    ExitStatus,
    backoff_delay,
    exceeds_start_limit,
    is_stable_run,
    should_restart,
)
from prefork.states import ALIVE, WorkerState, check_transition

log = logging.getLogger("prefork")


class After(Enum):
    """What the master does with a worker it stopped on its own, once it is reaped."""

    BACKOFF = "backoff"  # restart it on its backoff, as after a crash (its policy permitting)
    REPLACE = "replace"  # fork a new one at once from the same floor; no start-limit count
    REMOVE = "remove"  # drop the slot
    STAY_STOPPED = "stay stopped"  # the fleet is stopping
    FAIL = "fail"  # mark it failed: a new one would do the same


class StopReason(Enum):
    """Why the master sends a worker SIGTERM, with what follows and how loud the log is."""

    HUNG = ("hung", After.BACKOFF, logging.WARNING)  # no heartbeat within its timeout
    RECYCLED = ("recycled", After.REPLACE, logging.INFO)  # private memory over its limit
    AGED = ("aged", After.REPLACE, logging.INFO)  # older than its max_age
    OVER_MEMORY = ("over memory", After.FAIL, logging.ERROR)  # ... from its start, every time
    ROLLING_RESTART = ("rolling restart", After.REPLACE, logging.INFO)  # SIGHUP
    SCALED_DOWN = ("scaled down", After.REMOVE, logging.INFO)  # SIGTTOU, `prefork scale -1`
    REMOVED = ("removed by a reload", After.REMOVE, logging.INFO)  # gone from the new code
    SHUTDOWN = ("shutdown", After.STAY_STOPPED, logging.DEBUG)  # the fleet stops

    def __init__(self, label: str, after: After, level: int) -> None:
        self.label = label
        self.after = after
        self.level = level


# The stops that replace a worker for a cause, counted per slot by kind (`status`'s
# "recycles", the metrics' prefork_worker_recycles_total{reason}).
RECYCLE_KINDS = {StopReason.RECYCLED: "memory", StopReason.OVER_MEMORY: "memory",
                 StopReason.AGED: "age", StopReason.HUNG: "heartbeat",
                 StopReason.ROLLING_RESTART: "reload"}


class Next(Enum):
    """What the master must do after a slot's child exited."""

    NOTHING = "nothing"  # the slot moved on by itself (backoff scheduled, final, stopped)
    START = "start"  # fork it again now
    REMOVE = "remove"  # drop the slot from the fleet


@dataclass(eq=False)
class Slot:
    """One replica of one worker, and everything the master knows about it."""

    worker: Worker
    replica: int
    restart: RestartPolicy
    backoff: Backoff
    start_limit: StartLimit
    state: WorkerState = WorkerState.STOPPED
    pid: int | None = None
    started_at: float = 0.0
    due: float | None = None  # when a BACKOFF slot restarts
    attempt: int = 0  # restarts since the last stable run
    restarts: int = 0
    last_exit: ExitStatus | None = None
    start_times: deque[float] = field(default_factory=deque)
    cell: int | None = None  # its heartbeat cell, for a worker with a timeout
    # A worker the master stopped: why, and when SIGKILL follows the SIGTERM.
    stopping_for: StopReason | None = None
    kill_at: float | None = None
    reason: str | None = None  # why the master last stopped it, for the log and status
    over_since: float | None = None  # its USS is above its limit since then
    seen_under: bool = False  # a memory check of this run found it under its limit
    runs_over: int = 0  # runs in a row recycled without ever being under their limit
    # Others start after it (prefork.readiness): it has been ready once, for good.
    ready: bool = False
    # Its workers the master stopped to replace them, by RECYCLE_KINDS' kind.
    recycles: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(sorted(set(RECYCLE_KINDS.values())), 0))
    # What its latest child that reported imported after the fork (prefork.after_fork).
    imported_after_fork: dict[str, object] | None = None

    @property
    def label(self) -> str:
        return replica_label(self.worker.name, self.replica)

    def move(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        self.state = new

    # -- events ---------------------------------------------------------------------

    def wait(self, reason: str) -> None:
        """Its first start waits for the workers in its ``after``; ``reason`` says which."""
        self.reason = reason
        self.move(WorkerState.WAITING)

    def started(self, pid: int, now: float, *, count_start: bool) -> None:
        """Its child was forked. ``count_start=False``: a replacement the master chose,
        which does not count towards the start limit."""
        self.pid, self.started_at, self.due, self.seen_under = pid, now, None, False
        if self.state is WorkerState.WAITING:
            self.reason = None  # what it waited for is no news once it runs
        if count_start:
            self.start_times.append(now)
        self.move(WorkerState.RUNNING)

    def stopping(self, reason: StopReason, detail: str, kill_at: float) -> None:
        """The master sent SIGTERM, for ``reason``; SIGKILL is due at ``kill_at``. A slot
        stopping already only takes the new reason: its grace period runs from its
        SIGTERM, so it keeps an earlier SIGKILL time."""
        self.stopping_for, self.reason = reason, detail
        self.kill_at = kill_at if self.kill_at is None else min(self.kill_at, kill_at)
        self.over_since = None
        if self.state is WorkerState.RUNNING:
            if reason in RECYCLE_KINDS:
                self.recycles[RECYCLE_KINDS[reason]] += 1
            self.move(WorkerState.STOPPING)

    def exited(self, status: ExitStatus, now: float, rng: random.Random) -> Next:
        """Its child exited with ``status``: move on, and say what the master must do."""
        uptime = now - self.started_at
        self.last_exit, self.pid = status, None
        stopped_for, self.stopping_for, self.kill_at = self.stopping_for, None, None
        after = stopped_for.after if stopped_for is not None else None
        if after is After.STAY_STOPPED:
            self.move(WorkerState.STOPPED)
            return Next.NOTHING
        if after is After.REMOVE:
            return Next.REMOVE
        if after is After.REPLACE:
            return Next.START
        if after is After.FAIL:
            self.move(WorkerState.FAILED)
            log.error("worker %s marked failed: %s; not restarting it", self.label, self.reason)
            return Next.NOTHING
        if after is After.BACKOFF and self.restart != "never":
            self.schedule_restart(now, uptime, rng)
            return Next.NOTHING
        if after is not None or not should_restart(self.restart, status):
            self.move(WorkerState.FAILED if status.failed else WorkerState.EXITED)
            log.log(logging.ERROR if status.failed else logging.INFO, "worker %s %s (restart=%s)",
                    self.label, "failed" if status.failed else "finished", self.restart)
            return Next.NOTHING
        self.schedule_restart(now, uptime, rng)
        return Next.NOTHING

    def fork_failed(self, now: float, rng: random.Random) -> None:
        """fork() itself failed (EAGAIN, ENOMEM): a failed start, retried on the backoff."""
        self.start_times.append(now)
        self.schedule_restart(now, 0.0, rng)

    def schedule_restart(self, now: float, uptime: float, rng: random.Random) -> None:
        """BACKOFF with the next delay, or FAILED if that start would break the limit."""
        if is_stable_run(uptime, self.backoff):
            self.attempt = 0
        self.attempt += 1
        delay = backoff_delay(self.attempt, self.backoff, rng.random())
        limit = self.start_limit
        _forget_before(self.start_times, now + delay - limit.interval)
        if exceeds_start_limit(self.start_times, now + delay, limit):
            self.move(WorkerState.FAILED)
            log.error("worker %s marked failed: started %d times within %gs "
                      "(start limit %d); not restarting it",
                      self.label, len(self.start_times), limit.interval, limit.burst)
            return
        self.due = now + delay
        self.move(WorkerState.BACKOFF)
        log.info("worker %s restart %d in %.3fs", self.label, self.attempt, delay)

    def shut_down(self) -> None:
        """The fleet stops: a slot waiting to restart, or to start, never will."""
        if self.state in (WorkerState.BACKOFF, WorkerState.WAITING):
            self.due = None
            self.move(WorkerState.STOPPED)

    def removed(self) -> None:
        """The slot leaves the fleet: a restart it waited for, or its stop, is over."""
        if self.state in (WorkerState.BACKOFF, WorkerState.STOPPING, WorkerState.WAITING):
            self.due = None
            self.move(WorkerState.STOPPED)

    # -- what status shows ------------------------------------------------------------

    def status(self, now: float, *, last_beat: float | None = None,
               wall_now: float | None = None) -> dict[str, object]:
        """This slot as one worker of `prefork status`. ``last_beat``: the monotonic time
        of its last heartbeat, for a worker with a heartbeat timeout (one that has not
        beaten since it was forked shows as "starting"); ``wall_now``: ``time.time()`` at
        ``now``, to give its start as a Unix time."""
        alive = self.state in ALIVE
        beaten = last_beat is None or last_beat > self.started_at
        starting = self.state is WorkerState.RUNNING and not beaten
        last = self.last_exit
        return {
            "name": self.worker.name,
            "replica": self.replica,
            "label": self.label,
            "pid": self.pid,
            "state": "starting" if starting else str(self.state),
            "restarts": self.restarts,
            "uptime": round(now - self.started_at, 3) if alive else None,
            "last_exit": self.last_exit.describe() if self.last_exit else None,
            "reason": self.reason,
            "next_start_in": round(max(self.due - now, 0.0), 3) if self.due else None,
            "exit_code": None if last is None else last.code,
            "exit_signal": None if last is None else last.signal,
            "recycles": dict(self.recycles),
            "started": (round(wall_now - (now - self.started_at), 3)
                        if alive and wall_now is not None else None),
            "heartbeat_age": (round(max(now - last_beat, 0.0), 3)
                              if last_beat is not None and alive and beaten else None),
            "imported_after_fork": self.imported_after_fork,
        }


def slots_for(fleet: Fleet) -> list[Slot]:
    """A slot for every replica of every worker, in the fleet's order."""
    return [new_slot(fleet, worker, replica)
            for worker in fleet.workers for replica in range(worker.replicas)]


def new_slot(fleet: Fleet, worker: Worker, replica: int) -> Slot:
    return Slot(worker=worker, replica=replica, restart=worker.restart or fleet.restart,
                backoff=worker.backoff or fleet.backoff,
                start_limit=worker.start_limit or fleet.start_limit)


def summary(slots: Iterable[Slot], *, stopping: bool) -> str:
    """One line for systemd's STATUS=: "4 running, 0 in backoff, 1 failed" (and ", 2
    waiting" while workers wait for those in their ``after``)."""
    count = dict.fromkeys(WorkerState, 0)
    for slot in slots:
        count[slot.state] += 1
    text = (f"{count[WorkerState.RUNNING]} running, {count[WorkerState.BACKOFF]} in "
            f"backoff, {count[WorkerState.FAILED]} failed")
    if count[WorkerState.WAITING]:
        text += f", {count[WorkerState.WAITING]} waiting"
    if stopping:
        text = f"stopping: {count[WorkerState.STOPPING]} left; " + text
    return text


def _forget_before(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()
