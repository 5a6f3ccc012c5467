"""The floor of ``prefork dask-worker`` in ``test_dask_worker``: kernels a Dask client
submits by reference, imported once in the master. The fleet's own worker is never run
(the fleet is only the floor)."""

from __future__ import annotations

import os
from pathlib import Path

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker

IMPORTED_IN = os.getpid()  # the master's pid, in every worker forked from its floor


def square(x: int) -> int:
    return x * x


def where() -> tuple[int, int, int]:
    """This worker's pid, its parent's, and the pid of the process that imported this
    module (the master, if the floor is shared)."""
    return os.getpid(), os.getppid(), IMPORTED_IN


def held(name: str) -> str:
    """Tell the test this kernel runs, then wait until the test writes a line to FIFO
    ``name`` in its directory: the test knows the kernel is mid-run."""
    emit("kernel-running", fifo=name)
    with open(Path(os.environ["PREFORK_TEST_DIR"]) / name, "rb") as release:
        return release.readline().decode().strip()


fleet = Fleet("dask_kernels", [Worker("never-run", idle_forever)])
