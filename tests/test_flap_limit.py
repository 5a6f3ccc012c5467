"""A worker over its start limit is marked failed; its siblings keep running."""

from __future__ import annotations

import os
import signal

from conftest import Events


def test_flapping_worker_is_failed_and_the_others_keep_running(start_master,
                                                                events: Events) -> None:
    master = start_master("fleets.basic:flapping")  # crasher: burst 3 in 30 s
    sleeper = events.wait_kind("up", label="sleeper")[0]
    master.wait_log(r"worker crasher marked failed: started 3 times within 30s "
                    r"\(start limit 3\); not restarting it")
    assert len(events.wait_kind("up", label="crasher", count=3)) == 3
    os.kill(sleeper["pid"], 0)  # the healthy sibling is untouched: same process, alive
    assert [p.pid for p in master.workers()] == [sleeper["pid"]]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 5
    assert "failed: crasher" in master.log
    events.drain()
    assert len(events.of("up", label="crasher")) == 3  # never started again
