"""The cpu fleet as the tests run it: fast polling, small batches, and a hook that lets a
test SIGKILL the clusterer in the middle of its second batch."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

from fleets.common import emit
from prefork import Backoff, StartLimit
from prefork_workers.cpu.fleet import make_fleet
from prefork_workers.cpu.loops import Settings

SETTINGS = Settings(poll_interval=0.2, batch_size=2_000, busy_timeout=2.0)
QUICK = Backoff(initial=0.1, factor=2.0, maximum=0.5, jitter=0.1)

fleet = dataclasses.replace(make_fleet(SETTINGS), backoff=QUICK)


def _hang_in_second_batch() -> None:
    """Inside the clusterer's second transaction, after its writes: tell the test, then
    wait to be killed. Only once per test (a marker file), so the restart goes through."""
    batches = int(os.environ.get("_CPU_TEST_BATCHES", "0")) + 1
    os.environ["_CPU_TEST_BATCHES"] = str(batches)
    marker = Path(os.environ["PREFORK_TEST_DIR"]) / "hung-once"
    if batches == 2 and not marker.exists():
        marker.touch()
        emit("in-batch", batch=batches)
        while True:
            signal.pause()


def _clusterer_hook(worker: str) -> None:
    if worker == "clusterer":
        _hang_in_second_batch()


killable = dataclasses.replace(
    make_fleet(dataclasses.replace(SETTINGS, before_commit=_clusterer_hook)), backoff=QUICK)

# Faults: fail fast and give up soon, so the test sees the error and a failed worker.
failing = dataclasses.replace(
    make_fleet(dataclasses.replace(SETTINGS, busy_timeout=0.3)),
    backoff=QUICK, start_limit=StartLimit(burst=2, interval=60))
