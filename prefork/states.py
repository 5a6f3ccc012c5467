"""A worker slot's named states and the transitions the master may make between them.

    STOPPED --spawn--> RUNNING --exit, will restart--> BACKOFF --due--> RUNNING
    STOPPED --after= not ready--> WAITING --all ready--> RUNNING;  WAITING --shutdown--> STOPPED
                          |  \\--exit, no restart-----> EXITED (clean) | FAILED
                          \\--shutdown--> STOPPING --reaped--> STOPPED
    BACKOFF --shutdown--> STOPPED;  any exit over the start limit --> FAILED

A worker stopped on its own (missed heartbeat, memory recycling, rolling restart, scaled
down) goes RUNNING --> STOPPING too, and once reaped: BACKOFF (hung: the normal backoff),
RUNNING (replaced at once from the floor), STOPPED (scaled down) or FAILED.

EXITED and FAILED are final for this master: nothing restarts them. A slot WAITING
behind a FAILED dependency waits for good (:mod:`prefork.readiness`): it is not ACTIVE,
so a master left with only such slots ends, as when every worker ended.
"""

from __future__ import annotations

from enum import Enum


class WorkerState(Enum):
    STOPPED = "stopped"  # not started yet, or stopped by a shutdown
    RUNNING = "running"  # a child process is alive
    BACKOFF = "backoff"  # the child died; a restart is scheduled
    STOPPING = "stopping"  # SIGTERM sent, waiting for the child to exit
    EXITED = "exited"  # ended cleanly and its policy does not restart it
    FAILED = "failed"  # over its start limit, or a failure its policy does not restart
    WAITING = "waiting"  # not started yet: a worker in its `after` is not ready

    def __str__(self) -> str:
        return self.value


S = WorkerState
ALLOWED: dict[WorkerState, frozenset[WorkerState]] = {
    # BACKOFF, FAILED: its first fork() failed (FAILED: over the start limit).
    S.STOPPED: frozenset({S.RUNNING, S.BACKOFF, S.WAITING, S.FAILED}),
    S.RUNNING: frozenset({S.BACKOFF, S.EXITED, S.FAILED, S.STOPPING, S.STOPPED}),
    S.BACKOFF: frozenset({S.RUNNING, S.BACKOFF, S.STOPPED, S.FAILED}),  # BACKOFF: fork failed
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.RUNNING, S.FAILED}),
    S.EXITED: frozenset(),
    S.FAILED: frozenset(),
    # BACKOFF, FAILED: its fork failed (within or over the start limit).
    S.WAITING: frozenset({S.RUNNING, S.BACKOFF, S.FAILED, S.STOPPED}),
}
# Slots in these states have a live child the master must reap before it exits.
ALIVE = frozenset({S.RUNNING, S.STOPPING})
# Slots in these states still need the master: it is not done while any remains.
ACTIVE = frozenset({S.RUNNING, S.STOPPING, S.BACKOFF})


class IllegalTransition(RuntimeError):
    """The master tried a transition the table does not allow: a bug in prefork."""


def check_transition(current: WorkerState, new: WorkerState) -> None:
    if new not in ALLOWED[current]:
        raise IllegalTransition(f"{current} -> {new} is not allowed")
