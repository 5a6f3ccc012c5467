"""Operating a live fleet: hung workers, memory recycling, rolling restart, scaling, status."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

from conftest import Events, MasterProcess, master_env
from prefork.memory import MIB, measure


def cli(events: Events, runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], capture_output=True,
                          text=True, timeout=30, env=master_env(events, runtime_dir))


def status(events: Events, runtime_dir: Path, fleet: str) -> dict:
    result = cli(events, runtime_dir, "status", "--fleet", fleet, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_label(document: dict) -> dict[str, dict]:
    return {w["label"]: w for w in document["workers"]}


def stop(master: MasterProcess, code: int = 0) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == code, master.log


def line_index(master: MasterProcess, pattern: str) -> int:
    """The index of the one log line matching ``pattern``."""
    hits = [i for i, line in enumerate(master.lines) if re.search(pattern, line)]
    assert len(hits) == 1, (pattern, hits, master.log)
    return hits[0]


def test_silent_worker_is_stopped_after_its_timeout_and_restarted(
        start_master, events: Events) -> None:
    master = start_master("fleets.operated:hanging")
    beats = events.wait_kind("beat", count=20, attempt=1)
    events.wait_kind("up", attempt=2)
    # 20 beats took about twice the timeout: beating kept it alive all along.
    assert beats[-1]["at"] - beats[0]["at"] > 0.5
    restarted = events.of("up", attempt=2)[0]
    assert restarted["t"] - beats[-1]["at"] >= 0.5  # not before its timeout was over
    found = master.wait_log(r"worker hanger \(pid (\d+)\) no heartbeat for ([\d.]+)s "
                            r"\(timeout 0.5s\): SIGTERM")
    assert int(found.group(1)) == events.of("up", attempt=1)[0]["pid"]
    assert float(found.group(2)) >= 0.5
    master.wait_log(r"worker hanger restart 1 in")  # through the normal backoff
    assert len(master.log_matches(r"worker sleeper spawned")) == 1
    stop(master)


def test_hung_worker_deaf_to_sigterm_is_killed_after_the_grace(
        start_master, events: Events) -> None:
    master = start_master("fleets.operated:deaf", "--grace", "0.4")
    hung = events.wait_kind("up", attempt=1)[0]
    events.wait_kind("up", attempt=2)
    master.wait_log(rf"worker deaf \(pid {hung['pid']}\) no heartbeat for ")
    master.wait_log(rf"worker deaf \(pid {hung['pid']}\) still running 0.4s after SIGTERM: "
                    r"SIGKILL")
    master.wait_log(rf"worker deaf \(pid {hung['pid']}\) exited: killed by SIGKILL")
    stop(master)


def test_async_worker_beats_from_its_event_loop(start_master, events: Events) -> None:
    master = start_master("fleets.operated:async_hanging")
    # Up for three timeouts without calling heartbeat() itself: the loop beat for it.
    events.wait_kind("still-up", attempt=1)
    assert not events.of("up", attempt=2)
    events.wait_kind("up", attempt=2)  # then it blocked its loop, and was replaced
    master.wait_log(r"worker blocker \(pid \d+\) no heartbeat for")
    stop(master)


def test_private_memory_over_the_limit_is_recycled_one_at_a_time(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.operated:leaking", "--memory-check-interval", "0.2")
    first = events.wait_kind("up", count=3)
    reader_pid = next(e["pid"] for e in first if e["label"] == "reader")
    events.wait_kind("up", count=2, attempt=2)  # both leakers, replaced
    recycled = master.log_matches(r"worker (leaker(?:\.1)?) \(pid \d+\) recycled: private "
                                  r"memory (\d+) MiB > 20 MiB: SIGTERM")
    assert sorted(m.group(1) for m in recycled) == ["leaker", "leaker.1"]
    assert all(40 <= int(m.group(2)) <= 48 for m in recycled), [m.group(0) for m in recycled]
    # One at a time: the second leaker was stopped only once the first one was back.
    one, two = (m.group(1) for m in recycled)
    old = {e["label"]: e["pid"] for e in first}
    back = line_index(master, rf"worker {re.escape(one)} spawned \(pid (?!{old[one]}\))")
    assert back < line_index(master, rf"worker {re.escape(two)} \(pid \d+\) recycled")
    # The reader's RSS is mostly the shared floor, far over the limit; its USS is not.
    reader = measure(reader_pid)
    assert reader.rss > 30 * MIB > 20 * MIB > reader.uss, reader
    assert not master.log_matches(r"worker reader .*recycled")
    workers = by_label(status(events, runtime_dir, "leaking"))
    assert workers["leaker"]["reason"].startswith("recycled: private memory ")
    assert workers["leaker"]["restarts"] == 1 and workers["reader"]["restarts"] == 0
    stop(master)


def test_a_workers_only_reload_replaces_every_worker_once_one_at_a_time(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.operated:rolling")
    old = {e["label"]: e["pid"] for e in events.wait_kind("up", count=4)}
    result = cli(events, runtime_dir, "reload", "--fleet", "rolling", "--workers-only")
    assert result.returncode == 0, result.stderr
    assert f"master pid {master.pid}" in result.stdout
    events.wait_kind("up", count=8)
    events.wait_kind("term", count=4)
    master.wait_log(r"rolling restart done")
    new = {e["label"]: e["pid"] for e in events.of("up")[4:]}
    assert set(new) == set(old) == {"a", "b", "b.1", "c"}
    assert not set(new.values()) & set(old.values())
    previous_back = -1
    for label in ("a", "b", "b.1", "c"):  # the fleet's order
        stopped = line_index(master, rf"worker {re.escape(label)} \(pid {old[label]}\) "
                             r"rolling restart: SIGTERM")
        exited = line_index(master, rf"worker {re.escape(label)} \(pid {old[label]}\) exited")
        back = line_index(master, rf"worker {re.escape(label)} spawned \(pid {new[label]}\)")
        # Never two copies: the old one was reaped before the new one was forked; and the
        # next worker was stopped only once the previous one was back.
        assert previous_back < stopped < exited < back
        previous_back = back
    assert len(events.of("term")) == 4  # each old worker stopped once
    stop(master)


def test_ttin_ttou_and_scale_change_replicas(start_master, events: Events,
                                             runtime_dir: Path) -> None:
    master = start_master("fleets.operated:scalable")
    events.wait_kind("up", count=2)
    master.signal(signal.SIGTTIN)
    events.wait_kind("up", label="w.1")
    master.signal(signal.SIGTTIN)
    events.wait_kind("up", label="w.2")
    master.signal(signal.SIGTTIN)
    master.wait_log(r"SIGTTIN: worker w already runs 3 replicas \(max_replicas 3\)")
    master.signal(signal.SIGTTOU)
    events.wait_kind("term", label="w.2")
    master.wait_log(r"worker w.2 removed")
    assert sorted(by_label(status(events, runtime_dir, "scalable"))) == ["fixed", "w", "w.1"]
    result = cli(events, runtime_dir, "scale", "--fleet", "scalable", "w", "+1")
    assert result.returncode == 0, result.stderr
    events.wait_kind("up", label="w.2", count=2)
    refused = cli(events, runtime_dir, "scale", "--fleet", "scalable", "fixed", "+1")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "prefork: error: worker fixed has a fixed number of replicas (no max_replicas)"]
    assert len(events.of("up", label="fixed")) == 1
    stop(master)


def test_max_age_replaces_workers_one_at_a_time(start_master, events: Events) -> None:
    master = start_master("fleets.operated:aging")
    events.wait_kind("up", count=3)
    aged = r"worker (\S+) \(pid (\d+)\) recycled: older than 0.3s \(max_age\): SIGTERM"
    master.wait_log(aged, count=6)
    stop(master)
    replacing: str | None = None  # the label being replaced, until its successor is forked
    for line in master.lines:
        if match := re.search(aged, line):
            assert replacing is None, f"{match[1]} aged while {replacing} was replaced"
            replacing = match[1]
        elif replacing and re.search(rf"worker {re.escape(replacing)} spawned", line):
            replacing = None
    events.wait_kind("term", count=6)  # each was stopped gracefully


def test_scale_is_refused_while_the_fleet_stops(start_master, events: Events,
                                                runtime_dir: Path) -> None:
    master = start_master("fleets.operated:stalling", "--grace", "30")
    events.wait_kind("up", count=2)
    master.signal(signal.SIGTERM)
    master.wait_log(r"worker w \(pid \d+\) exited")  # "deaf" keeps the stop going
    refused = cli(events, runtime_dir, "scale", "--fleet", "stalling", "w", "+1")
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        "prefork: error: the fleet is stopping: it scales no more"]
    master.signal(signal.SIGTERM)  # the second one ends "deaf" at once
    assert master.wait_exit() == 0
    assert len(events.of("up", label="w.1")) == 0
    assert not master.log_matches(r"worker w.1 spawned")


def test_status_shows_true_pids_and_states(start_master, events: Events,
                                           runtime_dir: Path) -> None:
    master = start_master("fleets.operated:troubled")
    master.wait_log(r"worker doomed failed")
    master.wait_log(r"worker crasher restart 1 in 30")
    document = status(events, runtime_dir, "troubled")
    assert document["master_pid"] == master.pid
    assert document["python"] == sys.version.split()[0]
    workers = by_label(document)
    steady_pid, = (p.pid for p in master.workers())
    assert workers["steady"]["pid"] == steady_pid
    assert workers["steady"]["state"] == "running"
    assert workers["steady"]["memory"]["uss"] > 0
    assert workers["crasher"] | {"memory": None, "uptime": None, "next_start_in": None} == {
        "name": "crasher", "replica": 0, "label": "crasher", "pid": None,
        "state": "backoff", "restarts": 0, "uptime": None, "last_exit": "exit code 3",
        "reason": None, "next_start_in": None, "memory": None, "exit_code": 3,
        "exit_signal": None, "started": None, "heartbeat_age": None,
        "recycles": {"age": 0, "heartbeat": 0, "memory": 0, "reload": 0},
        "imported_after_fork": None}
    assert 0 < workers["crasher"]["next_start_in"] <= 30
    assert workers["doomed"]["state"] == "failed"
    assert workers["doomed"]["last_exit"] == "exit code 3"
    assert document["total_pss"] >= document["memory"]["pss"] + workers["steady"]["memory"]["pss"]
    table = cli(events, runtime_dir, "status", "--fleet", "troubled")
    assert table.returncode == 0, table.stderr
    assert str(master.pid) in table.stdout.splitlines()[0]
    assert re.search(rf"steady\s.*{steady_pid}\s+running", table.stdout), table.stdout
    stop(master, code=5)  # doomed failed


def test_control_socket_is_for_the_owner_only(start_master, events: Events,
                                              runtime_dir: Path) -> None:
    master = start_master("fleets.operated:scalable")
    events.wait_kind("up", count=2)
    path = runtime_dir / "scalable.sock"
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
    assert stat.S_IMODE(runtime_dir.stat().st_mode) == 0o700
    stop(master)
    assert not path.exists()  # a stopped master leaves no socket behind


def test_no_master_is_exit_3(events: Events, runtime_dir: Path) -> None:
    for command in (["status"], ["reload"], ["scale", "w", "+1"]):
        result = cli(events, runtime_dir, command[0], "--fleet", "scalable", *command[1:])
        assert result.returncode == 3, result
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith("prefork: error: no master of fleet 'scalable'")


def test_status_finds_a_module_attr_fleet_without_importing_it(
        start_master, events: Events, runtime_dir: Path) -> None:
    other = start_master("fleets.basic:sleepers")  # a second socket in the directory
    master = start_master("fleets.announced:fleet")
    events.wait_kind("up", count=5)  # sleepers' 4 and announced's 1
    imported = events.of("imported")
    assert [e["pid"] for e in imported] == [master.pid]
    document = status(events, runtime_dir, "fleets.announced:fleet")
    assert document["master_pid"] == master.pid
    assert (document["fleet"], document["spec"]) == ("announced", "fleets.announced:fleet")
    events.drain()
    assert events.of("imported") == imported  # the status command imported nothing
    # Started by name, a master says so too; a spec no master was started with is exit 3.
    assert status(events, runtime_dir, "sleepers")["spec"] == "fleets.basic:sleepers"
    result = cli(events, runtime_dir, "status", "--fleet", "fleets.probed:fleet")
    assert result.returncode == 3, result.stderr
    assert result.stderr == ("prefork: error: no master started with --fleet "
                             "fleets.probed:fleet is running (none of the 2 answering in "
                             f"{runtime_dir} was)\n")
    events.drain()
    assert events.of("imported") == imported
    stop(master)
    stop(other)
