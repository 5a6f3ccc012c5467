"""A worker is its whole process tree (prefork.trees): what a worker starts is stopped
when the worker ends, daemons that left its group are stopped with the fleet, and the
master reaps whatever is re-parented to it - also as PID 1 of a PID namespace."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import termios

import psutil
import pytest

from conftest import Events, MasterProcess, master_env, wait_gone


def child_pids(events: Events, **match: object) -> list[int]:
    return [e["pid"] for e in events.of("child-up", **match)]


def test_what_a_crashed_worker_started_gets_sigterm_then_sigkill(
        start_master, events: Events) -> None:
    master = start_master("fleets.trees:crashing", "--grace", "1")
    worker = events.wait_kind("up")[0]["pid"]
    up = events.wait_kind("child-up", count=2)
    assert {e["pgid"] for e in up} == {worker}  # in the worker's own group
    os.kill(worker, signal.SIGUSR1)  # the worker exits 3; its two children stay behind
    master.wait_log(r"worker crasher \(pid \d+\) left processes in its group: SIGTERM")
    events.wait_kind("child-terminated", mode="catch")
    master.wait_log(r"processes left by worker crasher \(group \d+\) still running after "
                    r"the grace period: SIGKILL")
    assert wait_gone(child_pids(events, mode="ignore")) == []
    events.wait_kind("up", count=2)  # the worker itself restarted as usual
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_the_fleet_stop_ends_what_the_workers_started(start_master, events: Events) -> None:
    master = start_master("fleets.trees:parents")
    events.wait_kind("child-up", count=2)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log
    assert wait_gone(child_pids(events)) == []
    assert len(master.log_matches(r"left processes in its group: SIGTERM")) == 2


def test_a_daemon_that_left_its_worker_is_adopted_and_stopped_with_the_fleet(
        start_master, events: Events) -> None:
    master = start_master("fleets.trees:daemonizing")
    worker = events.wait_kind("up")[0]["pid"]
    daemon = events.wait_kind("child-up")[0]
    assert daemon["pgid"] != worker  # setsid: no longer in the worker's group
    # Its parent exited before the worker said "up": the master adopted it, not PID 1.
    assert psutil.Process(daemon["pid"]).ppid() == master.pid
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log
    events.wait_kind("child-terminated")
    assert wait_gone([daemon["pid"]]) == []
    master.wait_log(rf"pid {daemon['pid']} \(daemonizer\), left by a worker: SIGTERM")


def test_second_sigterm_kills_every_descendant(start_master, events: Events) -> None:
    master = start_master("fleets.trees:crashing", "--grace", "60")
    events.wait_kind("child-up", count=2)
    master.signal(signal.SIGTERM)
    master.wait_log(r"left processes in its group: SIGTERM")
    master.signal(signal.SIGTERM)  # the "ignore" child would outlive a 60 s grace
    assert master.wait_exit() == 0, master.log
    assert wait_gone(child_pids(events)) == []


def test_ctrl_c_in_a_terminal_reaches_the_master_which_stops_the_fleet(
        events: Events, runtime_dir, tmp_path) -> None:
    """Workers lead groups of their own, so the terminal's SIGINT (the foreground group's)
    reaches the master only; the workers get its SIGTERM, as for any stop."""
    terminal, tty = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefork", "run", "--fleet", "fleets.basic:mixed"],
        stdin=tty, stdout=tty, stderr=subprocess.PIPE, start_new_session=True,
        preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    os.close(tty)
    master = MasterProcess(proc, events)
    try:
        events.wait_kind("up", label="sleeper")
        events.wait_kind("up", label="async")
        pids = [p.pid for p in master.workers()]
        os.write(terminal, b"\x03")  # Ctrl-C
        assert master.wait_exit() == 0, master.log
        assert wait_gone(pids) == []
        master.wait_log(r"stopping on SIGINT")
        master.wait_log(r"worker sleeper \(pid \d+\) exited: killed by SIGTERM")
        assert "Traceback" not in master.log
    finally:
        master.close()
        os.close(terminal)


needs_pid_namespace = pytest.mark.skipif(
    os.getuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace needs root and unshare(1)")


@needs_pid_namespace
def test_as_pid_1_orphans_are_reaped_and_the_stop_is_graceful(
        events: Events, runtime_dir, tmp_path) -> None:
    """``prefork run`` as a container's ENTRYPOINT: PID 1 of its own PID namespace."""
    env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path), DAEMON_EXITS="1")
    proc = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "prefork",
         "run", "--fleet", "fleets.trees:daemonizing", "--log-level", "debug"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    master = MasterProcess(proc, events)
    try:
        master.wait_log(r"master 1: fleet daemonizing")
        short = events.wait_kind("short-daemon")[0]["daemon_pid"]
        master.wait_log(rf"reaped pid {short}, not a worker")  # no zombie left to pile up
        events.wait_kind("child-up")
        (inner,) = psutil.Process(proc.pid).children()  # PID 1, as the host sees it
        os.kill(inner.pid, signal.SIGTERM)
        assert master.wait_exit() == 0, master.log
        events.wait_kind("child-terminated")  # the daemon was stopped, not just killed
        master.wait_log(r"left by a worker: SIGTERM")
        assert "Traceback" not in master.log
    finally:
        master.close()
