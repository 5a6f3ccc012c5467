"""A master killed with SIGKILL takes its workers with it (PR_SET_PDEATHSIG)."""

from __future__ import annotations

import signal
import time

import psutil

from conftest import Events, wait_gone


def test_sigkill_of_the_master_leaves_no_worker_alive(start_master, events: Events) -> None:
    master = start_master("fleets.basic:stubborn")  # one worker even ignores SIGTERM
    pids = [e["pid"] for e in events.wait_kind("up", count=2)]
    master.signal(signal.SIGKILL)
    master.proc.wait(timeout=20)
    died = time.monotonic()
    assert wait_gone(pids, timeout=1.0) == [], "workers outlived their master by a second"
    assert time.monotonic() - died < 1.0
    for pid in pids:  # re-parented to this test (a subreaper): reap them, they must be dead
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
