"""One master per fleet: a second one is refused and leaves the first untouched."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import WAIT, Events, LineReader, master_env


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


def test_a_second_master_is_refused_after_the_runtime_dir_is_removed(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    first = start_master("fleets.basic:sleepers")
    pids = sorted(e["pid"] for e in events.wait_kind("up", count=4))
    shutil.rmtree(runtime_dir)  # lock file and socket gone: a tmp cleaner, say
    second = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "--fleet", "fleets.basic:sleepers"],
        capture_output=True, text=True, timeout=30,
        env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)),
    )
    assert (second.returncode, second.stderr) == (4, (
        f"prefork: error: fleet 'sleepers' is already running (master pid {first.pid}; "
        f"its lock {runtime_dir / 'sleepers.lock'} was removed while it ran)\n"))
    assert sorted(p.pid for p in first.workers()) == pids
    first.signal(signal.SIGTERM)
    assert first.wait_exit() == 0
    events.drain()
    assert sorted(e["pid"] for e in events.of("up")) == pids  # the refused one forked nothing


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to take another uid")
def test_another_users_process_on_the_guard_name_is_one_line(
        events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    name = f"prefork:{runtime_dir}/sleepers"
    squatter = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
         "-c", "import socket, sys\n"
               "s = socket.socket(socket.AF_UNIX)\n"
               f"s.bind(b'\\0' + {name.encode()!r}); s.listen()\n"
               "print('bound', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert squatter.stdout is not None
        said = LineReader(squatter.stdout.fileno())
        deadline = time.monotonic() + WAIT
        while not (lines := said.read(max(0.0, deadline - time.monotonic()))) and not said.eof \
                and time.monotonic() < deadline:
            pass
        assert lines == [b"bound"], "the squatter did not bind the name"
        refused = subprocess.run(
            [sys.executable, "-m", "prefork", "run", "--fleet", "fleets.basic:sleepers"],
            capture_output=True, text=True, timeout=30,
            env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)),
        )
    finally:
        squatter.communicate(b"", timeout=WAIT)  # EOF on its stdin: it exits
    assert (refused.returncode, refused.stderr) == (2, (
        f"prefork: error: fleet 'sleepers': pid {squatter.pid} of uid 65534 holds {name}, "
        "the name that keeps a second master out; stop that process\n"))
    assert (runtime_dir / "sleepers.lock").read_text() == ""
    events.drain()
    assert events.of("up") == []
