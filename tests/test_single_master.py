"""One master per fleet: a second one is refused and leaves the first untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from conftest import Events, master_env


def test_second_master_of_a_fleet_is_refused(start_master, events: Events,
                                             runtime_dir: Path, tmp_path: Path) -> None:
    first = start_master("fleets.basic:sleepers")
    pids = sorted(e["pid"] for e in events.wait_kind("up", count=4))
    second = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "--fleet", "fleets.basic:sleepers"],
        capture_output=True, text=True, timeout=30,
        env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)),
    )
    assert second.returncode == 4
    assert second.stderr.splitlines() == [
        f"prefork: error: fleet 'sleepers' is already running (master pid {first.pid}, "
        f"lock {runtime_dir / 'sleepers.lock'})"
    ]
    assert sorted(p.pid for p in first.workers()) == pids
    assert (runtime_dir / "sleepers.lock").read_text() == f"{first.pid}\n"
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    events.drain()
    assert sorted(e["pid"] for e in events.of("up")) == pids  # the refused one forked nothing


def test_the_lock_is_free_again_once_the_master_is_gone(start_master, events: Events,
                                                        runtime_dir: Path) -> None:
    first = start_master("fleets.basic:one_sleeper")
    events.wait_kind("up")
    first.signal(signal.SIGKILL)  # no chance to clean up: the kernel drops the flock
    first.proc.wait(timeout=20)
    second = start_master("fleets.basic:one_sleeper")
    events.wait_kind("up", count=2)
    second.signal(signal.SIGTERM)
    assert second.wait_exit() == 0
    assert (runtime_dir / "fleets.basic.one_sleeper.lock").read_text() == ""


def test_different_fleets_run_side_by_side(start_master, events: Events) -> None:
    a = start_master("fleets.basic:sleepers")
    b = start_master("fleets.basic:one_sleeper")
    events.wait_kind("up", count=5)
    for master in (a, b):
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0
