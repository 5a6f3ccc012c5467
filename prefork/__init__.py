"""prefork: import a fleet's floor once in a master, fork one child per named worker.

Public API::

    from prefork import Fleet, Worker, Backoff, StartLimit, run_fleet

    fleet = Fleet("jobs", [Worker("mailer", send_mail), Worker("indexer", index, replicas=2)])
    raise SystemExit(run_fleet(fleet))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from prefork.child import WorkerContext, current_worker
from prefork.fleet import (
    Backoff,
    Fleet,
    FleetError,
    RestartPolicy,
    StartLimit,
    Worker,
    WorkerTarget,
    as_fleet,
    asyncio_worker,
    load_fleet,
)
from prefork.heartbeats import heartbeat
from prefork.lock import AlreadyRunning, RuntimeDirError
from prefork.master import EXIT_OK, EXIT_WORKERS_FAILED, Master, Observer

__all__ = [
    "EXIT_OK",
    "EXIT_WORKERS_FAILED",
    "AlreadyRunning",
    "Backoff",
    "Fleet",
    "FleetError",
    "Master",
    "RestartPolicy",
    "RuntimeDirError",
    "StartLimit",
    "Worker",
    "WorkerContext",
    "WorkerTarget",
    "asyncio_worker",
    "current_worker",
    "heartbeat",
    "load_fleet",
    "run_fleet",
]

__version__ = "0.1.0"


def run_fleet(
    fleet: Fleet | Mapping[str, WorkerTarget] | Iterable[Worker],
    *,
    name: str = "fleet",
    grace: float = 15.0,
    freeze: bool = True,
    runtime_dir: Path | None = None,
    observer: Observer | None = None,
) -> int:
    """Run ``fleet`` in this process as its master until SIGTERM/SIGINT; return the exit code.

    Must be called from the main thread (it installs signal handlers). ``name`` names a
    fleet given as a mapping or list. Raises :class:`FleetError` for an invalid fleet,
    :class:`AlreadyRunning` if another master runs a fleet of the same name, and
    :class:`RuntimeDirError` if the lock's directory is unsafe. Returns ``EXIT_OK`` (0),
    or ``EXIT_WORKERS_FAILED`` (5) if a worker ended failed.
    """
    master = Master(as_fleet(fleet, name=name), grace=grace, freeze=freeze,
                    runtime_dir=runtime_dir, observer=observer)
    return master.run()
