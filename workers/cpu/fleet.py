"""The bundled ``cpu`` fleet: four CPU-bound analysis workers on one SQLite database.

Importing this module is the floor the master pays once: SQLModel, SQLAlchemy and
pydantic with the fleet's 26 tables (about 53 MiB of RSS). The database is ``$PREFORK_DB``
or ``~/.local/share/prefork/cpu.sqlite3``; each worker opens its own connection after fork.
Each worker's ``warmup`` (:mod:`prefork_workers.cpu.warmup`) runs its real step once on a
copy of a small cached sample database, never the user's.
"""

from __future__ import annotations

from prefork import Fleet, Worker
from prefork_workers.cpu import models  # noqa: F401 - the floor, imported in the master
from prefork_workers.cpu.loops import STEPS, Settings, worker
from prefork_workers.cpu.warmup import warmup

WORKERS = tuple(STEPS)  # clusterer, campaign-clusterer, attribution, reuse-correlate


def make_fleet(settings: Settings | None = None, *, name: str = "cpu") -> Fleet:
    """The cpu fleet with its four workers, all using ``settings``, each with its warm-up."""
    return Fleet(name, [Worker(worker_name, worker(worker_name, settings),
                               warmup=warmup(worker_name, settings))
                        for worker_name in WORKERS])


fleet = make_fleet()
