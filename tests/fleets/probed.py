"""Fleets for ``prefork probe``: a worker whose warm-up allocates 50 MiB of its own, and
one whose warm-up allocates nothing."""

from __future__ import annotations

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker, WorkerContext

HOG_BYTES = 50 * 1024 * 1024
# The floor both workers share: ~16 MiB of objects made at import, in the master.
FLOOR = [str(i) * 8 for i in range(400_000)]
_kept: list[bytearray] = []


def hog_warmup() -> None:
    """Allocate and write 50 MiB this process alone holds (bytearray(n) alone would be
    untouched zero pages), and keep it."""
    emit("warmup", worker="hog")
    block = bytearray(HOG_BYTES)
    for offset in range(0, HOG_BYTES, 4096):
        block[offset] = 1
    _kept.append(block)


def calm_warmup() -> None:
    emit("warmup", worker="calm")
    sum(len(s) for s in FLOOR[:1000])


def importing_warmup() -> None:
    """Imports what nothing in the probe's master has: a worker's lazy import."""
    import xml.dom.minidom  # noqa: F401


def broken_warmup() -> None:
    raise RuntimeError("sample data is missing")


fleet = Fleet("probed", [Worker("hog", idle_forever, warmup=hog_warmup),
                         Worker("calm", idle_forever, warmup=calm_warmup)])
broken = Fleet("broken-warmup", [Worker("w", idle_forever, warmup=broken_warmup)])
plain = Fleet("plain", [Worker("w", idle_forever)])
# Has a worker with the name the probe gives its sleeper.
clash = Fleet("clash", [Worker("prefork-sleeper", idle_forever)])
importing = Fleet("importing", [Worker("importer", idle_forever, warmup=importing_warmup),
                                Worker("calm", idle_forever, warmup=calm_warmup)])


def announce(worker: WorkerContext) -> None:
    emit("up", worker=worker.label)


# Says when each child is forked (the bare fork is made just before).
announced = Fleet("announced", [Worker("w", idle_forever)], post_fork=announce)
