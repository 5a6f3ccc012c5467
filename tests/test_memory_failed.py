"""A worker over its private memory limit from every start: recycling cannot help, so after
its start limit's burst of such runs it ends failed instead of being recycled for ever."""

from __future__ import annotations

from conftest import Events
from prefork.exits import ExitCode


def test_a_worker_over_its_memory_limit_at_every_start_ends_failed(start_master,
                                                                  events: Events) -> None:
    master = start_master("fleets.limits:memory_hog", "--memory-check-interval", "0.1")
    # burst=2: two runs over their limit at every check, then no third start.
    assert master.wait_exit() == ExitCode.WORKERS_FAILED, master.log
    failed = master.log_matches(r"worker hog marked failed: private memory (\d+) MiB > 20 MiB "
                                r"at every check of 2 runs in a row; not restarting it")
    assert len(failed) == 1 and int(failed[0].group(1)) >= 40, master.log
    assert len(master.log_matches(r"worker hog \(pid \d+\) recycled: private memory")) >= 1
    assert master.log_matches(r"failed: hog$"), master.log
    events.drain()
    ups = events.of("up")
    assert 2 <= len(ups) == len(master.log_matches(r"worker hog spawned")), master.log
