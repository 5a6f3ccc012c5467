"""prefork: import a fleet's floor once in a master, fork one child per named worker.

Public API::

    from prefork import Fleet, Worker, Backoff, StartLimit, run_fleet

    fleet = Fleet("jobs", [Worker("mailer", send_mail), Worker("indexer", index, replicas=2)])
    raise SystemExit(run_fleet(fleet))

Importing ``prefork`` (which a fleet module does for ``Fleet`` and ``Worker``) does not
import the master: :class:`Master` and :func:`run_fleet` load it when first used, so
rendering a unit or asking a master for its status never pays for it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefork.child import WorkerContext, current_worker
from prefork.exits import ExitCode
from prefork.fleet import (
    DEFAULT_GRACE,
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
from prefork.lock import AlreadyRunning
from prefork.paths import RuntimeDirError
from prefork.readiness import ready
from prefork.version import __version__

if TYPE_CHECKING:
    from prefork.master import Master, Observer
    from prefork.threads import ThreadsAtFork

__all__ = [
    "EXIT_OK",
    "EXIT_WORKERS_FAILED",
    "AlreadyRunning",
    "Backoff",
    "ExitCode",
    "Fleet",
    "FleetError",
    "Master",
    "RestartPolicy",
    "RuntimeDirError",
    "StartLimit",
    "ThreadsAtFork",
    "Worker",
    "WorkerContext",
    "WorkerTarget",
    "__version__",
    "asyncio_worker",
    "current_worker",
    "heartbeat",
    "load_fleet",
    "ready",
    "run_fleet",
]

EXIT_OK = ExitCode.OK
EXIT_WORKERS_FAILED = ExitCode.WORKERS_FAILED


def run_fleet(
    fleet: Fleet | Mapping[str, WorkerTarget] | Iterable[Worker],
    *,
    name: str = "fleet",
    grace: float = DEFAULT_GRACE,
    freeze: bool = True,
    runtime_dir: Path | None = None,
    observer: Observer | None = None,
    strict_fork: bool = False,
) -> int:
    """Run ``fleet`` in this process as its master until SIGTERM/SIGINT; return the exit code.

    Must be called from the main thread (it installs signal handlers). ``name`` names a
    fleet given as a mapping or list. Raises :class:`FleetError` for an invalid fleet,
    :class:`AlreadyRunning` if another master runs a fleet of the same name, and
    :class:`RuntimeDirError` if the lock's directory is unsafe, and with ``strict_fork``
    :class:`ThreadsAtFork` if the master has other threads when it would first fork.
    Returns ``EXIT_OK`` (0), or ``EXIT_WORKERS_FAILED`` (5) if a worker ended failed.
    """
    from prefork.master import Master

    master = Master(as_fleet(fleet, name=name), grace=grace, freeze=freeze,
                    runtime_dir=runtime_dir, observer=observer, strict_fork=strict_fork)
    return master.run()


def __getattr__(name: str) -> Any:
    # PEP 562: `prefork.Master` and `prefork.Observer` import the master on first use,
    # `prefork.ThreadsAtFork` its module (4 ms of `import prefork` otherwise).
    if name in ("Master", "Observer"):
        from prefork import master

        return getattr(master, name)
    if name == "ThreadsAtFork":
        from prefork import threads

        return threads.ThreadsAtFork
    raise AttributeError(f"module 'prefork' has no attribute {name!r}")
