"""Stopping: SIGTERM then SIGKILL after the grace period, a second signal kills at once,
Ctrl-C to the whole process group is clean, and a signal during start-up is not lost."""

from __future__ import annotations

import os
import signal
import time

from conftest import Events, wait_gone


def test_sigterm_stops_every_worker_and_exits_0(start_master, events: Events) -> None:
    master = start_master("fleets.basic:sleepers")
    pids = [e["pid"] for e in events.wait_kind("up", count=4)]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert wait_gone(pids, timeout=0) == []
    assert len(master.log_matches(r"exited: killed by SIGTERM")) == 4
    assert not master.log_matches(r"restart \d+ in")
    assert f"master {master.pid}: stopped in" in master.log


def test_worker_ignoring_sigterm_is_killed_after_the_grace_period(start_master,
                                                                  events: Events) -> None:
    master = start_master("fleets.basic:stubborn", "--grace", "1")
    events.wait_kind("up", count=2)
    sent = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    elapsed = time.monotonic() - sent
    assert elapsed >= 1.0  # it waited the grace period out ...
    assert elapsed < 10.0  # ... and did not wait for the worker forever
    master.wait_log(r"worker stubborn \(pid \d+\) still running, grace period of 1s over: "
                    r"SIGKILL")
    master.wait_log(r"worker stubborn \(pid \d+\) exited: killed by SIGKILL")
    master.wait_log(r"worker sleeper \(pid \d+\) exited: killed by SIGTERM")
    assert "1 killed after the grace period" in master.log


def test_second_sigterm_kills_the_rest_at_once(start_master, events: Events) -> None:
    master = start_master("fleets.basic:stubborn", "--grace", "120")
    events.wait_kind("up", count=2)
    master.signal(signal.SIGTERM)
    master.wait_log(r"stopping on SIGTERM")
    master.wait_log(r"worker sleeper .* exited")  # the polite one is gone already
    sent = time.monotonic()
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert time.monotonic() - sent < 60  # far inside the 120 s grace
    master.wait_log(r"worker stubborn \(pid \d+\) still running, second SIGTERM: SIGKILL")


def test_ctrl_c_to_the_process_group_stops_cleanly(start_master, events: Events) -> None:
    master = start_master("fleets.basic:mixed", new_session=True)
    events.wait_kind("up", label="sleeper")
    events.wait_kind("up", label="async")
    pids = [p.pid for p in master.workers()]
    os.killpg(master.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
    assert master.wait_exit() == 0
    assert wait_gone(pids) == []
    assert "Traceback" not in master.log
    assert "KeyboardInterrupt" not in master.log
    stop_line = next(i for i, line in enumerate(master.lines) if "stopping on SIGINT" in line)
    assert not any("spawned" in line or "restart" in line
                   for line in master.lines[stop_line + 1:])


def test_sigterm_during_startup_is_not_lost(start_master, events: Events) -> None:
    """SIGTERM lands while the master is still forking its 48 workers: it must stop them
    all (the signal is held across fork, not dropped or run in a child)."""
    master = start_master("fleets.basic:many")
    master.wait_log(r"master \d+: fleet many, 48 workers")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    spawned = {int(m[1]) for m in master.log_matches(r"spawned \(pid (\d+)\)")}
    assert wait_gone(sorted(spawned)) == []
    master.wait_log(r"stopping on SIGTERM")
