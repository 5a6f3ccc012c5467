"""``--log-file`` and ``--worker-log-dir``: the master's lines in its file, each replica's
stdout and stderr in its own, and SIGUSR1 after logrotate's rename losing nothing
(:mod:`prefork.worker_logs`)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from conftest import WAIT, Events, MasterProcess, master_env
from fleets.logged import BATCH, line
from prefork.client import fetch_status
from prefork.paths import socket_path

COUNTERS = "fleets.logged:counters"
LABELS = ("counter", "counter.1")


def _barrier(runtime_dir: Path, fleet: str) -> None:
    """Return once the master has been through its loop after this call: the second of
    two status requests is answered in a later wake-up than the first, and every pipe
    readable at the first was read in that one."""
    for _ in range(2):
        fetch_status(socket_path(runtime_dir, fleet), timeout=WAIT / 4)


def _write_batch(events: Events, pids: dict[str, int], batch: int) -> None:
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)
    events.wait_kind("wrote", count=len(pids), batch=batch)


def _expected(label: str, batches: range) -> list[str]:
    return [line(label, n) for n in range(batches.start * BATCH, batches.stop * BATCH)]


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_the_master_logs_to_its_file_and_reopens_it_on_sigusr1(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    log_file = tmp_path / "master.log"
    master = start_master(COUNTERS, "--log-file", str(log_file))
    events.wait_kind("up", count=2)
    _barrier(runtime_dir, "counters")
    assert oct(log_file.stat().st_mode & 0o777) == oct(0o640 & ~_umask())
    before = log_file.read_text()
    assert len(re.findall(r"INFO worker counter(\.1)? spawned", before)) == 2, before

    log_file.rename(tmp_path / "master.log.1")
    master.signal(signal.SIGUSR1)
    _barrier(runtime_dir, "counters")
    after = log_file.read_text()
    assert re.search(rf"INFO SIGUSR1: reopened the master's log {re.escape(str(log_file))}$",
                     after, re.M), after
    assert (tmp_path / "master.log.1").read_text() == before  # the reopen line is not in it

    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert "stopped in" in log_file.read_text()
    # Nothing of the master's went to stderr; the workers' output still does.
    assert not [m for m in master.lines if "INFO" in m], master.log


def test_each_replica_writes_its_own_file_and_sigusr1_loses_nothing(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    master = start_master(COUNTERS, "--worker-log-dir", str(logs))
    pids = {e["label"]: e["pid"] for e in events.wait_kind("up", count=2)}
    assert set(pids) == set(LABELS)

    _write_batch(events, pids, 0)
    _barrier(runtime_dir, "counters")
    for label in LABELS:  # stdout and stderr in the order written, each replica its own
        assert _lines(logs / f"{label}.log") == _expected(label, range(1)), label
        (logs / f"{label}.log").rename(logs / f"{label}.log.1")  # what logrotate does

    _write_batch(events, pids, 1)  # between the rename and the reopen
    master.signal(signal.SIGUSR1)
    master.wait_log(rf"SIGUSR1: reopened 2 worker logs in {re.escape(str(logs))}$")
    _write_batch(events, pids, 2)  # after the reopen
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0

    for label in LABELS:
        renamed, new = _lines(logs / f"{label}.log.1"), _lines(logs / f"{label}.log")
        # Every line exactly once, in order: nothing lost, nothing doubled, none split.
        assert renamed + new == _expected(label, range(3)), label
        assert renamed[:BATCH] == _expected(label, range(1))
        assert new[-BATCH:] == _expected(label, range(2, 3))
    assert not [m for m in master.lines if re.search(r"counter(\.1)? \d{6} ", m)]


def test_a_worker_tree_is_read_to_the_end(start_master, events: Events,
                                          tmp_path: Path) -> None:
    """What a worker's grandchild writes after the worker was reaped still reaches the
    worker's file, and a last line without a newline gets one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    master = start_master("fleets.logged:last", "--worker-log-dir", str(logs))
    assert master.wait_exit() == 0  # the fleet ends on its own: its one worker is done
    events.wait_kind("up")
    master.wait_log(r"worker last \(pid \d+\) exited: exit code 0")
    assert (logs / "last.log").read_text() == (
        "worker: stdout\nworker: stderr\ngrandchild: after the worker exited, no newline\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _not_writable(tmp_path: Path) -> Path:
    path = tmp_path / "read-only"
    path.mkdir(mode=0o500)
    return path


def _file_is_a_directory(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    (path / "counter.1.log").mkdir(parents=True)
    return path


@pytest.mark.parametrize(("option", "make", "message"), [
    ("--worker-log-dir", lambda tmp: tmp / "missing", r"No such file or directory"),
    ("--worker-log-dir", lambda tmp: Path(os.devnull), r"not a directory"),
    pytest.param("--worker-log-dir", _not_writable, r"not writable",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")),
    ("--worker-log-dir", _file_is_a_directory, r"counter\.1\.log: Is a directory"),
    ("--log-file", lambda tmp: tmp, r"Is a directory"),
    ("--log-file", lambda tmp: tmp / "missing" / "master.log", r"No such file or directory"),
], ids=["missing", "not-a-directory", "not-writable", "file-is-a-directory",
        "log-file-is-a-directory", "log-file-in-missing-directory"])
def test_an_unusable_log_path_is_one_line_and_exit_2(
        start_master, events: Events, tmp_path: Path, option: str,
        make: object, message: str) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    master: MasterProcess = start_master(COUNTERS, option, str(path))
    assert master.wait_exit() == 2
    assert len(master.lines) == 1, master.log
    assert re.fullmatch(rf"prefork: error: {option} .*{message}", master.lines[0]), master.log
    events.drain()
    assert events.seen == []  # nothing forked


def test_without_a_log_dir_workers_write_to_the_masters_stderr(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master(COUNTERS, env=master_env(events, runtime_dir,
                                                   PREFORK_TEST_BATCH="3"))
    pids = {e["label"]: e["pid"] for e in events.wait_kind("up", count=2)}
    _write_batch(events, pids, 0)
    for label in LABELS:  # the even ones, its stderr (the fixture's stdout is /dev/null)
        for number in (0, 2):
            master.wait_log(rf"^{re.escape(line(label, number))}$")
    master.signal(signal.SIGUSR1)
    master.wait_log(r"SIGUSR1: no log file to reopen \(the master logs to stderr\)")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
