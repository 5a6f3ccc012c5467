"""The fleet's hooks: each runs in the right process with the right arguments; a failing
post_fork is a failed start; a failing master-side hook is logged and the fleet goes on."""

from __future__ import annotations

import os
import signal

from conftest import Events


def test_each_hook_runs_in_its_process_with_its_arguments(start_master,
                                                          events: Events) -> None:
    master = start_master("fleets.hooked:hooked")
    ups = events.wait_kind("up", count=2)
    worker_pids = {e["pid"] for e in ups}
    assert all(e["reconnected_here"] for e in ups)  # post_fork ran in that very process

    (starting,) = events.of("on_starting")
    assert (starting["pid"], starting["fleet"]) == (master.pid, "hooked")
    pre = events.of("pre_fork")
    assert {e["pid"] for e in pre} == {master.pid}
    assert sorted((e["worker"], e["replica"], e["worker_pid"]) for e in pre) == [
        ("w", 0, None), ("w", 1, None)]
    post = events.of("post_fork")
    assert {e["pid"] for e in post} == worker_pids
    assert all(e["worker_pid"] == e["pid"] and e["master_pid"] == master.pid
               and e["fleet"] == "hooked" and e["same_as_current"] for e in post)
    assert events.seen.index(starting) < min(events.seen.index(e) for e in pre)

    victim = ups[0]["pid"]
    os.kill(victim, signal.SIGKILL)
    (exit_event,) = events.wait_kind("worker_exit")
    assert exit_event["pid"] == master.pid
    assert exit_event["worker_pid"] == victim
    assert exit_event["status"] == "killed by SIGKILL"
    events.wait_kind("up", count=3)  # restarted, through pre_fork and post_fork again
    assert len(events.of("pre_fork")) == len(events.of("post_fork")) == 3

    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    (ending,) = events.wait_kind("on_exit")
    assert (ending["pid"], ending["fleet"]) == (master.pid, "hooked")
    exits = events.of("worker_exit")
    assert len(exits) == 3
    assert events.seen.index(ending) > max(events.seen.index(e) for e in exits)


def test_a_failing_post_fork_is_a_failed_start_retried_on_the_backoff(start_master,
                                                                      events: Events) -> None:
    master = start_master("fleets.hooked:flaky_post_fork")
    (up,) = events.wait_kind("up")  # the second start: the worker's code ran only there
    master.wait_log(r"worker w: post_fork hook failed: RuntimeError: database is not "
                    r"reachable yet")
    master.wait_log(r"worker w \(pid \d+\) exited: exit code 70")
    master.wait_log(r"worker w restart 1 in")
    assert "Traceback" in master.log
    assert up["reconnected_here"] is False  # this hook sets nothing: it only fails once
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_a_failing_master_hook_is_logged_and_the_fleet_goes_on(start_master,
                                                               events: Events) -> None:
    master = start_master("fleets.hooked:failing_hooks")
    (up,) = events.wait_kind("up")
    master.wait_log(rf"on_starting hook failed \(the fleet goes on\): ValueError: hook "
                    rf"failed in {master.pid}")
    master.wait_log(r"pre_fork hook failed \(the fleet goes on\): ValueError")
    os.kill(up["pid"], signal.SIGKILL)
    events.wait_kind("up", count=2)
    master.wait_log(r"worker_exit hook failed \(the fleet goes on\): SystemExit: 9")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    master.wait_log(r"on_exit hook failed \(the fleet goes on\): ValueError")
    # on_starting; pre_fork for both starts; worker_exit for the kill and for the stop;
    # on_exit
    assert master.log.count("Traceback") == 6
