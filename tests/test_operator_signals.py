"""Every signal an operator might send the master has a harmless meaning: SIGQUIT stops
gracefully like SIGTERM, SIGUSR1 reopens logs, the rest that would end the master are
logged and ignored, and a handler the application set at import is kept."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from conftest import Events, master_env, wait_gone
from prefork.signals import signal_name

IGNORED_SAMPLE = [signal.SIGUSR2, signal.SIGALRM, signal.SIGPROF, signal.SIGPWR,
                  signal.SIGXCPU, signal.SIGRTMIN + 3]


def test_sigusr1_keeps_the_fleet_and_sigquit_stops_it_with_grace(start_master,
                                                                 events: Events) -> None:
    master = start_master("fleets.app_floor:politeness", "--grace", "30")
    pids = sorted(e["pid"] for e in events.wait_kind("up", count=2))
    master.signal(signal.SIGUSR1)
    master.wait_log(r"SIGUSR1: no log file to reopen")
    assert sorted(p.pid for p in master.workers()) == pids  # nobody died or restarted

    master.signal(signal.SIGQUIT)
    assert master.wait_exit() == 0
    # Each worker got SIGTERM and ended on its own: the grace was given, nothing killed.
    assert sorted(e["pid"] for e in events.wait_kind("term", count=2)) == pids
    assert {e["signal"] for e in events.of("term")} == {signal.SIGTERM}
    assert len(master.log_matches(r"worker polite(\.1)? \(pid \d+\) exited: exit code 0")) == 2
    assert "stopping on SIGQUIT" in master.log
    assert "0 killed after the grace period" in master.log
    assert wait_gone(pids, timeout=0) == []


@pytest.mark.parametrize("signum", IGNORED_SAMPLE, ids=signal_name)
def test_a_signal_that_would_end_the_master_is_logged_and_ignored(
        start_master, events: Events, signum: int) -> None:
    master = start_master("fleets.basic:sleepers")
    pids = sorted(e["pid"] for e in events.wait_kind("up", count=4))
    master.signal(signum)
    master.wait_log(rf"{re.escape(signal_name(signum))}: ignored")
    assert master.proc.poll() is None
    assert sorted(p.pid for p in master.workers()) == pids
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert len(master.log_matches(r"exited: killed by SIGTERM")) == 4


def test_while_the_fleet_stops_other_signals_are_logged_and_change_nothing(
        start_master, events: Events) -> None:
    master = start_master("fleets.basic:stubborn", "--grace", "120")
    events.wait_kind("up", count=2)
    master.signal(signal.SIGTERM)
    master.wait_log(r"worker sleeper .* exited")  # stopping: the stubborn one holds it
    for signum in (signal.SIGHUP, signal.SIGTTIN, signal.SIGUSR2):
        master.signal(signum)
        master.wait_log(rf"{signal_name(signum)}: ignored")
    master.signal(signal.SIGQUIT)  # a second stop signal: SIGKILL at once
    assert master.wait_exit() == 0
    master.wait_log(r"worker stubborn \(pid \d+\) still running, second SIGQUIT: SIGKILL")
    assert "rolling restart" not in master.log
    assert len(master.log_matches(r"spawned")) == 2


def test_a_handler_the_application_set_at_import_is_kept(start_master, events: Events,
                                                         runtime_dir: Path,
                                                         tmp_path: Path) -> None:
    env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path), APP_SIGUSR2="1")
    master = start_master("fleets.app_floor:politeness", env=env)
    events.wait_kind("up", count=2)
    master.signal(signal.SIGUSR2)
    usr2 = events.wait_kind("usr2")[0]
    assert usr2["pid"] == master.pid
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert "ignored" not in master.log
