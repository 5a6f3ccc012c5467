"""A master whose stderr nobody reads: it keeps supervising, answering and stopping, and
what reaches stderr is whole lines (:mod:`prefork.logs`)."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
from pathlib import Path

from conftest import WAIT, Events, MasterProcess
from prefork.client import fetch_status
from prefork.logs import PENDING_LIMIT
from prefork.paths import socket_path

PREFORK_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[\d+\] (INFO|WARNING) \S")
FLOOD_LINE = re.compile(r"^flood \d{6} x{80}$")
FLEET = "fleets.noisy:noisy"
DROPPED = r"\[\d+\] WARNING (\d+) log lines? dropped \(stderr was not read\)$"


def _supervises_while_full(master: MasterProcess, events: Events, runtime_dir: Path) -> None:
    """Once stderr is full and the master has had more lines than it keeps: status
    answers, a killed worker comes back."""
    events.wait_kind("full")
    # Each restart of the quitter is 3 master lines, over 200 bytes.
    events.wait_kind("quit", count=len(events.of("quit")) + PENDING_LIMIT // 200 + 10)
    sleeper = events.wait_kind("up", label="sleeper")[0]["pid"]
    status = fetch_status(socket_path(runtime_dir, "noisy"), timeout=WAIT / 4)
    assert {w["name"] for w in status["workers"]} == {"flood", "quitter", "sleeper"}
    os.kill(sleeper, signal.SIGKILL)
    events.wait(lambda e: e["kind"] == "up" and e["label"] == "sleeper" and e["pid"] != sleeper,
                what="the killed sleeper's replacement")


def _whole_lines(lines: list[str]) -> None:
    assert lines, "nothing came through"
    broken = [line for line in lines if not (PREFORK_LINE.match(line) or FLOOD_LINE.match(line))]
    assert not broken, broken[:5]
    master_lines = [line for line in lines if PREFORK_LINE.match(line)]
    assert len(master_lines) == len(set(master_lines)), "a master line came twice"


def test_full_stderr_does_not_stall_the_master(start_master, events: Events,
                                               runtime_dir: Path) -> None:
    master = start_master(FLEET)
    _supervises_while_full(master, events, runtime_dir)
    master.signal(signal.SIGTERM)  # stderr still full
    assert master.proc.wait(timeout=WAIT) == 0
    assert master.wait_exit() == 0  # reads what the pipe held
    _whole_lines(master.lines)


def test_dropped_lines_are_counted_once_output_flows(start_master, events: Events,
                                                     runtime_dir: Path) -> None:
    master = start_master(FLEET)
    _supervises_while_full(master, events, runtime_dir)
    first = master.wait_log(DROPPED)
    exited = r"worker quitter \(pid \d+\) exited"
    master.wait_log(exited, count=len(master.log_matches(exited)) + 1)  # it goes on logging
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    _whole_lines(master.lines)
    dropped = [int(m[1]) for m in master.log_matches(DROPPED)]
    assert dropped[0] == int(first[1]) and min(dropped) > 0, dropped
    # Each restart logs "restart N in": those missing were among the lines counted.
    restarts = [int(m[1]) for m in master.log_matches(r"worker quitter restart (\d+) in")]
    missing = set(range(1, max(restarts) + 1)) - set(restarts)
    assert 0 < len(missing) <= sum(dropped), (sorted(missing), dropped)


CHILD_SCRIPT = """
import logging, os, sys
from prefork import logs
logs.configure("info")
log = logging.getLogger("prefork")
full = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK)
for line in (b"f" * 99 + b"\\n", b"\\n"):  # then empty lines: not a byte left
    try:
        while True:
            os.write(full, line)
    except BlockingIOError:
        pass
log.info("master line")  # stderr is full: kept for later
pid = os.fork()
if pid == 0:
    log.info("child line")  # blocks, as any process's write to a full pipe
    os._exit(0)
print("forked", flush=True)
os.waitpid(pid, 0)
"""


def test_a_forked_child_writes_blocking_and_never_the_masters_lines(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT)
        assert ready and proc.stdout.readline() == b"forked\n", "the master's log blocked it"
        _, err = proc.communicate(timeout=WAIT)  # drains stderr: the child's write goes on
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    lines = [line for line in err.decode().splitlines() if line not in ("f" * 99, "")]
    assert [line.split("INFO ", 1)[-1] for line in lines] == ["child line", "master line"], lines
