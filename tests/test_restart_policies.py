"""on-failure, always and never, and a master that ends when no worker is left."""

from __future__ import annotations

import signal

from conftest import Events


def test_on_failure_leaves_a_clean_exit_alone_and_master_ends(start_master,
                                                             events: Events) -> None:
    master = start_master("fleets.basic:finishing")  # 2 replicas that return at once
    assert master.wait_exit() == 0
    events.drain()
    assert len(events.of("up")) == 2
    assert len(master.log_matches(r"worker done(\.1)? finished \(restart=on-failure\)")) == 2
    assert "no worker left to run" in master.log


def test_never_with_a_failure_exits_5(start_master, events: Events) -> None:
    master = start_master("fleets.basic:failing_never")
    assert master.wait_exit() == 5
    master.wait_log(r"worker bad failed \(restart=never\)")
    master.wait_log(r"worker good finished \(restart=never\)")
    master.wait_log(r"failed: bad$")


def test_always_restarts_a_clean_exit_until_the_start_limit(start_master,
                                                           events: Events) -> None:
    master = start_master("fleets.basic:always")  # burst 3 in 60 s
    assert master.wait_exit() == 5
    events.drain()
    assert len(events.of("up")) == 3
    master.wait_log(r"worker again marked failed: started 3 times")


def test_cli_restart_option_sets_the_fleet_default(start_master, events: Events) -> None:
    master = start_master("fleets.basic:finishing", "--restart", "never")
    assert master.wait_exit() == 0
    assert len(master.log_matches(r"finished \(restart=never\)")) == 2


def test_async_worker_runs_in_a_fresh_running_loop(start_master, events: Events) -> None:
    master = start_master("fleets.basic:asyncs")
    up = events.wait_kind("up")[0]
    assert up["running"] is True
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
