"""``prefork dask-worker``: Dask workers forked from a fleet's floor, with prefork as
their nanny.

Dask's own nanny starts each worker with ``spawn``: a fresh interpreter that imports
everything again. Here the master imports the floor (the fleet's modules: the kernels a
cluster runs) and ``distributed`` once, and forks N children; each runs one
``distributed.Worker`` on its own event loop, connected to the scheduler. The fleet's own
workers are not run: the fleet is the floor. prefork does what Dask's nanny would: restart
on backoff, heartbeat (the worker's event loop beats), recycling on private memory or age,
status, titles, SIGTERM then SIGKILL.

What the Dask worker does on its own, and why it is left so:

- It waits for a scheduler that is not there yet, retrying its connection for as long as
  it takes (Dask's ``death_timeout`` is not set): a worker is a process that waits, and a
  scheduler down for an hour costs each worker one start, not a start limit's worth.
- It never reconnects: once its connection to the scheduler breaks (the scheduler
  stopped or restarted) it closes, and so does its process. The worker's policy is
  ``restart="always"``, so prefork starts a new one from the floor after its backoff,
  which then waits for the scheduler to come back.
- On SIGTERM (:mod:`prefork.aio` cancels the coroutine) it closes: it tells the scheduler,
  which reschedules its tasks at once, without waiting for a task that runs in its
  threads (that would hold the stop until the grace period's SIGKILL).
"""

from __future__ import annotations

import importlib
import logging
import re
import socket
from dataclasses import dataclass

from prefork.fleet import MAX_WORKERS, Fleet, FleetError, Worker

log = logging.getLogger("prefork")

WORKER = "dask-worker"  # the name of the fleet's one worker, N replicas
SUFFIX = "-dask"  # the fleet NAME's Dask workers run as the fleet NAME-dask
# Seconds the worker's event loop may be blocked before prefork replaces the worker: the
# scheduler's own default worker-ttl (distributed.scheduler.worker-ttl), after which it
# has given up on the worker anyway.
DEFAULT_TIMEOUT = 300.0
# tcp://HOST:PORT, HOST a name, an IPv4 address, or an IPv6 address in brackets.
_ADDRESS = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)"
                      r":([0-9]{1,5})")


def scheduler_problem(address: str) -> str | None:
    """Why ``address`` is not a scheduler's ``tcp://HOST:PORT``, or None."""
    match = _ADDRESS.fullmatch(address)
    if match is None:
        return (f"scheduler address {address!r} is not tcp://HOST:PORT "
                "(e.g. tcp://10.0.0.5:8786)")
    if not 0 < int(match.group(2)) < 65536:
        return f"scheduler address {address!r}: the port must be 1 to 65535"
    return None


def arguments_problem(scheduler: str, nworkers: object, nthreads: object) -> str | None:
    """Why dask-worker's scheduler address, ``--nworkers`` or ``--nthreads`` cannot be
    used, or None."""
    problem = scheduler_problem(scheduler)
    if problem is not None:
        return problem
    for what, value in (("--nworkers", nworkers), ("--nthreads", nthreads)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            return f"{what} must be 1 to {MAX_WORKERS}, got {value!r}"
    return None


def default_name_prefix(fleet: str) -> str:
    """``HOST-FLEET``: with the replica, a name no other host's worker has."""
    return f"{socket.gethostname()}-{fleet}"


@dataclass(frozen=True)
class DaskWorkerSettings:
    """What each forked ``distributed.Worker`` is given. Its name is
    ``{name_prefix}-{replica}``."""

    scheduler: str
    nthreads: int
    name_prefix: str

    async def serve(self) -> None:
        """Run one Dask worker until it closes, or until SIGTERM cancels this."""
        from distributed import Worker as DaskWorker  # imported already, in the master

        from prefork import current_worker

        me = current_worker()
        name = f"{self.name_prefix}-{me.replica if me is not None else 0}"
        worker = DaskWorker(self.scheduler, nthreads=self.nthreads, name=name)
        stopped = True
        try:
            await worker  # registers with the scheduler, waiting for it as long as it takes
            await worker.finished()
            stopped = False
        finally:
            if stopped:  # cancelled: SIGTERM, or an error
                await worker.close(executor_wait=False, reason="prefork: worker stopped")
        log.warning("dask worker %s closed on its own (its scheduler went away, or "
                    "asked it to close); prefork starts a new one", name)


def _import_distributed() -> None:
    """Import into the floor what a Dask worker imports: ``distributed`` (0.6 s, which each
    worker would pay again), and the modules of its HTTP routes (Dask's config
    ``distributed.worker.http.routes``: health and Prometheus metrics, which bring
    prometheus_client, http.server and email), which it imports as it starts: 39 modules
    that made each worker 15.9-16.9 MiB private (USS) after connecting when they were
    imported after the fork. None of them starts a thread at import."""
    try:
        import dask.config
        import distributed  # noqa: F401
        import tornado.platform.asyncio  # noqa: F401 - its IOLoop on the worker's loop
    except ImportError as exc:
        raise FleetError(f"dask-worker needs distributed ({exc}): "
                         "pip install 'prefork[dask]'") from None
    for module in dask.config.get("distributed.worker.http.routes", []):
        try:
            importlib.import_module(module)
        except ImportError:  # the worker itself says so, when it starts
            pass


def dask_fleet(floor: Fleet, scheduler: str, *, nworkers: int, nthreads: int = 1,
               name_prefix: str | None = None,
               timeout: float | None = DEFAULT_TIMEOUT) -> Fleet:
    """A fleet of ``nworkers`` Dask workers connected to ``scheduler``, on ``floor``'s
    floor (imported already: loading it imported it) but none of its workers or hooks.

    Named ``{floor.name}-dask``: its lock and control socket differ from a ``prefork run``
    of the same fleet on the host. It keeps the floor fleet's backoff, start limit,
    ``max_private_memory`` and ``max_age``. ``timeout`` is the heartbeat timeout (None:
    none). Imports ``distributed`` here, in the master, so the workers share it. Raises
    :class:`FleetError` with one line for anything invalid.
    """
    problem = arguments_problem(scheduler, nworkers, nthreads)
    if problem is not None:
        raise FleetError(problem)
    if name_prefix is not None and (not name_prefix or not name_prefix.isprintable()
                                    or any(c.isspace() for c in name_prefix)):
        raise FleetError(f"--name-prefix {name_prefix!r} must be printable, without "
                         "whitespace, and not empty")
    _import_distributed()
    name = f"{floor.name}{SUFFIX}"
    settings = DaskWorkerSettings(scheduler, nthreads,
                                  name_prefix or default_name_prefix(floor.name))
    return Fleet(
        name=name,
        workers=(Worker(WORKER, settings.serve, replicas=nworkers, restart="always",
                        timeout=timeout),),
        backoff=floor.backoff, start_limit=floor.start_limit,
        max_private_memory=floor.max_private_memory, max_age=floor.max_age,
    ).validate()
