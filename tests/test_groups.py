"""Worker groups: several async workers hosted in one process, each under its own
supervision loop (prefork.groups). Real masters and processes; the board and the checks
also without a fork."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_cpu_fleet import OBSERVATIONS, expected_results, stored_results, wait_all_caught_up

from conftest import Events, MasterProcess, master_env
from prefork import Backoff, Fleet, FleetError, StartLimit, Worker
from prefork.groups import GroupHost, HostedBoard, host_groups, hosted_rows
from prefork_workers.cpu.demo_data import generate
from prefork_workers.cpu.fleet import WORKERS as CPU_WORKERS

COUNTERS = ("counter-a", "counter-b")


def status(events: Events, runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", "status", *args],
                          capture_output=True, text=True, timeout=30,
                          env=master_env(events, runtime_dir))


def process_titled(master: MasterProcess, title: str) -> int:
    pids = [p.pid for p in master.workers() if " ".join(p.cmdline()).strip() == title]
    assert len(pids) == 1, [p.cmdline() for p in master.workers()]
    return pids[0]


def wait_ups(events: Events, pid: int | None = None) -> dict[str, dict]:
    """The latest ``up`` of each counter (from process ``pid``, if given)."""
    match = {} if pid is None else {"pid": pid}
    return {name: events.wait_kind("up", worker=name, **match)[-1] for name in COUNTERS}


# -- real processes ------------------------------------------------------------------


def test_a_raising_worker_backs_off_while_its_siblings_keep_running(
        start_master, events: Events) -> None:
    master = start_master("fleets.grouped:fleet")
    ups = wait_ups(events)
    group = process_titled(master, "prefork: worker trio [grouped]")
    solo = process_titled(master, "prefork: worker solo [grouped]")
    # Hosted in the group's one process; current_worker() names each hosted worker.
    assert {up["pid"] for up in ups.values()} == {group} and group != solo
    assert all(up["current"] == name for name, up in ups.items())
    ticks_before = {name: events.wait_kind("tick", worker=name)[-1]["count"]
                    for name in COUNTERS}

    master.wait_log(r"worker raiser marked failed: started 5 times")
    delays = [float(m.group(1)) for m in master.log_matches(r"worker raiser restart \d+ in "
                                                            r"([\d.]+)s")]
    assert delays == sorted(delays) and len(set(delays)) == 4, delays  # 0.1, 0.2, 0.4, 0.8
    assert len(master.log_matches(r"WARNING worker raiser \(pid \d+, group trio\) exited: "
                                  r"exception ValueError: raiser: planned failure")) == 5
    assert master.log_matches(r'grouped\.py", line \d+, in raiser')  # its traceback
    raising = events.wait_kind("raising", count=5)
    assert len(raising) == 5 and {e["pid"] for e in raising} == {group}
    assert {e["current"] for e in raising} == {"raiser"}
    for name in COUNTERS:  # still counting on from where they were: never restarted
        later = events.wait(lambda e, n=name: e["kind"] == "tick" and e["worker"] == n
                            and e["count"] > ticks_before[n] + 20, what=f"{name} ticking")
        assert later["pid"] == group
        counts = [e["count"] for e in events.of("tick", worker=name)]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        assert len(events.of("up", worker=name)) == 1
    assert not master.log_matches(r"worker trio \(pid \d+\) exited")
    assert psutil.Process(group).is_running()


def test_status_shows_each_hosted_worker_under_its_group(start_master, events: Events,
                                                         runtime_dir: Path) -> None:
    master = start_master("fleets.grouped:fleet")
    wait_ups(events)
    group = process_titled(master, "prefork: worker trio [grouped]")
    master.wait_log(r"worker raiser marked failed")

    result = status(events, runtime_dir, "--json")
    assert result.returncode == 0, result.stderr
    workers = {w["name"]: w for w in json.loads(result.stdout)["workers"]}
    assert set(workers) == {"trio", "solo"} and "hosted" not in workers["solo"]
    trio = workers["trio"]
    assert trio["pid"] == group and trio["state"] == "running"
    assert trio["memory"]["uss"] > 0
    hosted = {h["name"]: h for h in trio["hosted"]}
    assert list(hosted) == ["counter-a", "counter-b", "raiser"]
    for name in COUNTERS:
        assert hosted[name]["state"] == "running" and hosted[name]["restarts"] == 0
        assert hosted[name]["last_exception"] is None and hosted[name]["uptime"] > 0
    assert hosted["raiser"]["state"] == "failed" and hosted["raiser"]["restarts"] == 4
    assert hosted["raiser"]["last_exception"] == "ValueError: raiser: planned failure"

    text = status(events, runtime_dir)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    trio_row = next(i for i, line in enumerate(lines) if line.startswith("trio "))
    assert str(group) in lines[trio_row]
    rows = lines[trio_row + 1:trio_row + 4]
    assert [row.split()[0] for row in rows] == ["counter-a", "counter-b", "raiser"]
    assert all(row.startswith("  ") and row.endswith("in group trio") for row in rows)
    assert re.search(r"\bfailed\s+4\b.*ValueError: raiser: planned failure", rows[2])
    assert re.search(r"\brunning\s+0\b", rows[0])


def test_sigkill_of_the_group_process_restarts_the_group(start_master, events: Events,
                                                         runtime_dir: Path) -> None:
    master = start_master("fleets.grouped:fleet")
    wait_ups(events)
    old = process_titled(master, "prefork: worker trio [grouped]")
    os.kill(old, signal.SIGKILL)
    master.wait_log(rf"worker trio \(pid {old}\) exited: killed by SIGKILL")
    new = int(master.wait_log(r"worker trio spawned \(pid (\d+)\)", count=2).group(1))
    assert new != old
    ups = wait_ups(events, pid=new)  # every hosted worker runs again, in the new process
    assert all(up["current"] == name for name, up in ups.items())
    events.wait_kind("raising", pid=new)
    document = json.loads(status(events, runtime_dir, "--json").stdout)
    trio = next(w for w in document["workers"] if w["name"] == "trio")
    assert trio["pid"] == new and trio["restarts"] == 1
    hosted = {h["name"]: h["state"] for h in trio["hosted"]}
    assert hosted["counter-a"] == hosted["counter-b"] == "running"


def test_sigterm_stops_a_group_gracefully(start_master, events: Events) -> None:
    master = start_master("fleets.grouped:fleet")
    wait_ups(events)
    group = process_titled(master, "prefork: worker trio [grouped]")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log
    for name in COUNTERS:  # each hosted worker's clean-up ran, in the group's process
        cleaned = events.wait_kind("cleaned", worker=name)
        assert [e["pid"] for e in cleaned] == [group]
    master.wait_log(rf"worker trio \(pid {group}\) exited: exit code 0")
    assert not master.log_matches("SIGKILL")


def test_group_option_moves_workers_into_one_process(start_master, events: Events) -> None:
    master = start_master("fleets.grouped:plain")  # no groups: a process each
    ups = wait_ups(events)
    assert len({up["pid"] for up in ups.values()}) == 2
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log

    master = start_master("fleets.grouped:plain", "--group", "pair=counter-a,counter-b")
    pair = int(master.wait_log(r"worker pair spawned \(pid (\d+)\)").group(1))
    ups = wait_ups(events, pid=pair)
    assert all(up["current"] == name for name, up in ups.items())
    assert process_titled(master, "prefork: worker pair [plain]") == pair
    raising = events.wait(lambda e: e["kind"] == "raising" and e["ppid"] == master.pid,
                          what="the raiser of the second master")
    assert raising["pid"] != pair  # not in the group: a process of its own
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_a_group_whose_loop_is_blocked_misses_its_heartbeat_and_is_restarted(
        start_master, events: Events, tmp_path: Path) -> None:
    master = start_master("fleets.grouped:hung")
    first = events.wait_kind("up", worker="blocker")[0]
    # Five ticks take 1 s, twice the timeout: the loop's beats kept the group alive.
    events.wait_kind("tick", worker="counter-a", count=5)
    assert not master.log_matches("no heartbeat")
    (tmp_path / "block").touch()
    events.wait_kind("blocking")
    found = master.wait_log(r"worker pair \(pid (\d+)\) no heartbeat for [\d.]+s "
                            r"\(timeout 0.5s\): SIGTERM")
    assert int(found.group(1)) == first["pid"]
    again = events.wait_kind("up", worker="blocker", count=2)[1]
    assert again["pid"] != first["pid"]  # the whole group, restarted by the master


def test_cpu_fleet_gives_the_same_results_grouped_with_a_kernel_pool_and_not(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    generated = tmp_path / "generated.sqlite3"
    generate(generated, observations=OBSERVATIONS, sources=300, seed=7)
    results = {}
    for grouped in (True, False):
        db = tmp_path / f"grouped-{grouped}.sqlite3"
        shutil.copyfile(generated, db)
        env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path),
                         PREFORK_DB=str(db))
        # Grouped: design B inside C, the heavy kernels in a pool of 2 (prefork.offload).
        args = (["--group", f"analysis={','.join(CPU_WORKERS)}", "--kernel-workers", "2"]
                if grouped else [])
        master = start_master("fleets.cpu_test:fleet", *args, env=env)
        wait_all_caught_up(master, OBSERVATIONS)
        titles = sorted(" ".join(p.cmdline()).strip() for p in master.workers())
        assert titles == (["prefork: worker analysis [cpu]", "prefork: worker kernel-pool "
                           "[cpu]", "prefork: worker kernel-pool.1 [cpu]"] if grouped else
                          sorted(f"prefork: worker {w} [cpu]" for w in CPU_WORKERS))
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0, master.log
        for worker in CPU_WORKERS:  # each finished its batch and stopped
            master.wait_log(rf"INFO {worker}: stopped")
        assert not master.log_matches(r"killed by SIGKILL|Traceback")
        results[grouped] = stored_results(db)
    assert results[True] == results[False] == expected_results(generated)


# Each group the fleet's validation refuses, as --group would set it, and its error line.
BAD_GROUPS = [
    ({"g": ["nope"]}, "group 'g' names 'nope', which is not a worker of the fleet"),
    ({"g": ["a"], "h": ["a"]}, "worker 'a' is in two groups, 'g' and 'h'"),
    ({"g": ["a", "a"]}, "group 'g' names worker 'a' twice"),
    ({"a": ["b"]}, "group 'a' has the name of a worker"),
    ({"no good": ["a"]}, "group name 'no good' must be letters"),
    ({"g": []}, "group 'g' has no workers"),
    ({"g": ["a", "blocking"]}, "worker 'blocking' in group 'g' is not an async def worker"),
    ({"g": ["twin"]}, "worker 'twin' in group 'g': replicas and max_replicas count"),
    ({"g": ["scalable"]}, "worker 'scalable' in group 'g': replicas and max_replicas"),
    ({"g": ["envy"]}, "worker 'envy' in group 'g': env is a process setting"),
    ({"g": ["niced"]}, "worker 'niced' in group 'g': nice is a process setting"),
    ({"g": ["late"]}, "worker 'late' in group 'g': after is not supported"),
    ({"g": ["b"]}, "worker 'late': after names 'b', which is hosted in group 'g'"),
    ({"g": ["hungry"]}, "worker 'hungry' in group 'g': max_private_memory recycles"),
    ({"g": ["old"]}, "worker 'old' in group 'g': max_age recycles a whole process"),
    (["a"], "groups must map a group name"),
]


@pytest.mark.parametrize(("groups", "message"), BAD_GROUPS,
                         ids=[repr(groups) for groups, _ in BAD_GROUPS])
def test_a_group_that_cannot_be_hosted_is_refused_in_one_line(groups: object,
                                                              message: str) -> None:
    from fleets import group_errors

    with pytest.raises(FleetError) as refused:
        dataclasses.replace(group_errors.fleet, groups=groups).validate()
    assert message in str(refused.value) and "\n" not in str(refused.value)


# The command line's own errors, and one refusal of each origin (--group, the fleet's),
# through `prefork run`: one line, exit 2, nothing forked.
@pytest.mark.parametrize(("args", "message"), [
    (["--group", "g"], "'g' is not NAME=WORKER,WORKER"),
    (["--group", "g=a", "--group", "g=b"], "--group g is given twice"),
    (["--group", "g=a,blocking"], "worker 'blocking' in group 'g' is not an async def worker"),
    (["--fleet", "fleets.group_errors:unknown_default"], "group 'g' names 'nope'"),
])
def test_a_group_that_cannot_be_hosted_is_one_line_and_exit_2(
        args: list[str], message: str, events: Events, runtime_dir: Path,
        tmp_path: Path) -> None:
    if "--fleet" not in args:
        args = ["--fleet", "fleets.group_errors:fleet", *args]
    result = subprocess.run([sys.executable, "-m", "prefork", "run", *args],
                            capture_output=True, text=True, timeout=30,
                            env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("prefork: error: "), result.stderr
    assert message in lines[0]


# -- without a fork ----------------------------------------------------------------------


async def _steady() -> None:
    await asyncio.sleep(3600)


async def _done() -> None:
    return None


def test_host_groups_makes_one_worker_per_group_where_its_first_worker_was() -> None:
    def warm() -> str:
        return "warm"

    fleet = Fleet("f", [Worker("solo", _steady), Worker("a", _steady, timeout=30.0),
                        Worker("b", _steady, timeout=10.0, warmup=warm), Worker("c", _steady)],
                  groups={"g": ["b", "a"]}).validate()
    hosted = host_groups(fleet).validate()
    assert [w.name for w in hosted.workers] == ["solo", "g", "c"] and not hosted.groups
    group = hosted.workers[1]
    assert isinstance(group.target, GroupHost)
    assert [w.name for w in group.target.hosted] == ["b", "a"]
    assert group.timeout == 10.0  # its loop beats for both: the shorter timeout
    assert group.warmup is not None and group.warmup() == ["warm"]
    assert group.replicas == 1 and group.restart is None  # the fleet's policy
    assert host_groups(hosted) is hosted


def test_a_group_ends_when_every_hosted_worker_has_ended() -> None:
    """In this process: one finishes, one fails for good, one fails twice then finishes;
    the group exits 1 because one failed, each with its own restarts and exception."""
    runs = {"flaky": 0}

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] <= 2:
            raise RuntimeError(f"flaky run {runs['flaky']}")

    async def broken() -> None:
        raise KeyError("broken")

    quick = Backoff(initial=0.01, maximum=0.05, jitter=0.0)
    fleet = Fleet("f", [Worker("done", _done), Worker("flaky", flaky),
                        Worker("broken", broken, restart="never")],
                  backoff=quick, groups={"g": ["done", "flaky", "broken"]}).validate()
    host = host_groups(fleet).workers[0].target
    assert isinstance(host, GroupHost)
    with pytest.raises(SystemExit) as exited:
        host()
    assert exited.value.code == 1
    rows = {r["name"]: r for r in host.board.read(os.getpid(), time.monotonic())}
    assert {n: (r["state"], r["restarts"]) for n, r in rows.items()} == {
        "done": ("exited", 0), "flaky": ("exited", 2), "broken": ("failed", 0)}
    assert rows["flaky"]["last_exception"] == "RuntimeError: flaky run 2"
    assert rows["broken"]["last_exception"] == "KeyError: 'broken'"


def test_a_hosted_worker_over_its_start_limit_fails_alone() -> None:
    async def crash() -> None:
        raise ValueError("again")

    fleet = Fleet("f", [Worker("crash", crash), Worker("done", _done)],
                  backoff=Backoff(initial=0.01, maximum=0.01, jitter=0.0),
                  start_limit=StartLimit(burst=3, interval=60.0),
                  groups={"g": ["crash", "done"]}).validate()
    host = host_groups(fleet).workers[0].target
    assert isinstance(host, GroupHost)
    with pytest.raises(SystemExit):
        host()
    rows = {r["name"]: r for r in host.board.read(os.getpid(), time.monotonic())}
    assert (rows["crash"]["state"], rows["crash"]["restarts"]) == ("failed", 2)
    assert rows["done"]["state"] == "exited"


@pytest.mark.parametrize(("groups", "message"), [
    ({"g": ["nope"]}, "not a worker"),
    ({"g": "a"}, "must be a list of worker names"),
    ({"g": []}, "has no workers"),
    ({"a": ["b"]}, "has the name of a worker"),
    ({"g": ["sync"]}, "is not an async def worker"),
])
def test_groups_are_checked_with_the_fleet(groups: dict, message: str) -> None:
    fleet = Fleet("f", [Worker("a", _steady), Worker("b", _steady),
                        Worker("sync", lambda: None)], groups=groups)
    with pytest.raises(FleetError, match=message):
        fleet.validate()


def test_board_round_trip_and_what_the_master_refuses() -> None:
    board = HostedBoard(2)
    rows = [{"name": "a", "state": "running", "restarts": 0, "started": 100.0, "due": None,
             "last_exception": None},
            {"name": "b", "state": "backoff", "restarts": 3, "started": 101.0, "due": 105.0,
             "last_exception": "ValueError: " + "x" * 500}]
    board.write(42, rows)
    shown = board.read(42, 103.0)
    assert shown[0] == {"name": "a", "state": "running", "restarts": 0, "uptime": 3.0,
                        "next_start_in": None, "last_exception": None}
    assert shown[1]["next_start_in"] == 2.0 and shown[1]["uptime"] is None
    assert len(shown[1]["last_exception"]) == 200
    assert board.read(43, 103.0) == []  # another process's rows: a group restarted since
    # Bad documents give no rows, never an exception.
    for document in ([], {"pid": 42}, {"pid": 42, "hosted": [1]},
                     {"pid": 42, "hosted": [{**rows[0], "state": "dancing"}]},
                     {"pid": 42, "hosted": [{**rows[0], "restarts": -1}]},
                     {"pid": 42, "hosted": [{**rows[0], "name": "../x"}]},
                     {"pid": 42, "hosted": [{**rows[0], "started": True}]}):
        assert hosted_rows(document, 42, 103.0) == []


def test_board_garbage_or_a_write_under_way_gives_no_rows() -> None:
    board = HostedBoard(1)
    board.write(7, [])
    raw = board._map
    raw[0:8] = (3).to_bytes(8, "little")  # odd: a writer (killed?) is mid-write
    assert board.read(7, 0.0) == []
    raw[0:8] = (4).to_bytes(8, "little")
    raw[8:12] = (1 << 31).to_bytes(4, "little")  # a length beyond the mapping
    assert board.read(7, 0.0) == []
    payload = b"[" * board.capacity  # nesting deep enough for a RecursionError
    raw[8:12] = len(payload).to_bytes(4, "little")
    raw[12:12 + len(payload)] = payload
    assert board.read(7, 0.0) == []
    raw[12:16] = b"\xff\xfe\x00{"
    raw[8:12] = (4).to_bytes(4, "little")
    assert board.read(7, 0.0) == []
    board.write(7, [])  # the next write (odd sequence left behind or not) is read again
    assert board.read(7, 0.0) == []
    board.write(7, [{"name": "a", "state": "exited", "restarts": 1, "started": 1.0,
                     "due": None, "last_exception": None}])
    assert [r["name"] for r in board.read(7, 2.0)] == ["a"]
