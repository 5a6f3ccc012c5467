"""Fleets with hooks: each hook reports where it ran (``pid``) and what it was given."""

from __future__ import annotations

import os
import sys

from fleets.common import bump, emit, idle_forever
from prefork import Backoff, Fleet, Worker, WorkerContext, current_worker
from prefork.policy import ExitStatus

_reconnected_in: int | None = None  # which process post_fork ran in, as a pool would


def _worker_fields(worker: WorkerContext) -> dict[str, object]:
    return {"fleet": worker.fleet, "worker": worker.name, "replica": worker.replica,
            "worker_pid": worker.pid, "master_pid": worker.master_pid}


def on_starting(fleet: object) -> None:
    emit("on_starting", fleet=getattr(fleet, "name", None))


def pre_fork(worker: WorkerContext) -> None:
    emit("pre_fork", **_worker_fields(worker))


def post_fork(worker: WorkerContext) -> None:
    global _reconnected_in
    _reconnected_in = os.getpid()
    emit("post_fork", same_as_current=worker == current_worker(), **_worker_fields(worker))


def worker_exit(worker: WorkerContext, status: ExitStatus) -> None:
    emit("worker_exit", status=status.describe(), code=status.code, **_worker_fields(worker))


def on_exit(fleet: object) -> None:
    emit("on_exit", fleet=getattr(fleet, "name", None))


def reporting() -> None:
    emit("up", reconnected_here=_reconnected_in == os.getpid())
    idle_forever()


def post_fork_fails_first(worker: WorkerContext) -> None:
    if bump("post_fork") == 1:
        raise RuntimeError("database is not reachable yet")


def failing(*_args: object) -> None:
    raise ValueError(f"hook failed in {os.getpid()}")


def exiting(*_args: object) -> None:
    sys.exit(9)


FAST = Backoff(initial=0.05, maximum=0.1, jitter=0.0)

hooked = Fleet("hooked", [Worker("w", reporting, replicas=2)], on_starting=on_starting,
               pre_fork=pre_fork, post_fork=post_fork, worker_exit=worker_exit,
               on_exit=on_exit)
flaky_post_fork = Fleet("flaky_post_fork", [Worker("w", reporting)],
                        post_fork=post_fork_fails_first, backoff=FAST)
failing_hooks = Fleet("failing_hooks", [Worker("w", reporting)], on_starting=failing,
                      pre_fork=failing, worker_exit=exiting, on_exit=failing)
