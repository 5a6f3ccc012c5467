"""Code reload: SIGHUP (and `prefork reload`) imports the fleet's code afresh from disk in
a trial process, re-executes the master in place (its pid stays) and replaces the workers
one at a time; new code that fails touches nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import TESTS, WAIT, Events, MasterProcess, master_env, wait_gone
from prefork.fleet import Fleet, Worker
from prefork.reload import (
    ADOPT_OPTION,
    TRIAL_OPTION,
    HandoverError,
    ReloadState,
    _without_reload_options,
    adopt_slots,
    handed_workers,
    read_handover,
    removed_worker,
    write_handover,
)
from prefork.slot import StopReason, slots_for
from prefork.states import WorkerState

# The fleet module the tests deploy, by version. A worker reports its version when up and
# when stopped. GATE: while that FIFO exists, importing the module waits until the test
# opens it for writing (an event says it waits), so a test can hold a reload mid-way.
FLEET = '''
import asyncio, os
from prefork import Fleet, Worker, Backoff
from fleets.common import emit

VERSION = {version!r}
GATE = os.path.join(os.environ["PREFORK_TEST_DIR"], "gate")
if os.path.exists(GATE):
    emit("gate", version=VERSION)
    with open(GATE) as gate:
        gate.read()


async def work():
    emit("up", version=VERSION)
    print("up", VERSION, flush=True)
    try:
        await asyncio.sleep(3600)
    finally:
        print("bye", VERSION, flush=True)  # after the master's exec, for the old ones
        emit("term", version=VERSION)

{extra}
fleet = Fleet("deployed", ({workers}), backoff=Backoff(initial={backoff}, jitter=0){fleet_args})
'''
WORKERS = 'Worker("a", work), Worker("b", work), Worker("c", work)'


def deploy(app: Path, version: str, workers: str = WORKERS, extra: str = "",
           backoff: float = 1.0, fleet_args: str = "") -> None:
    """Write the fleet module as a deploy would: a new file put in place at once."""
    text = FLEET.format(version=version, workers=workers, extra=textwrap.dedent(extra),
                        backoff=backoff, fleet_args=fleet_args)
    new = app / "deployed.py.new"
    new.write_text(text)
    new.replace(app / "deployed.py")


@pytest.fixture
def app(tmp_path: Path) -> Path:
    path = tmp_path / "app"
    path.mkdir()
    return path


@pytest.fixture
def start(start_master, events: Events, runtime_dir: Path, tmp_path: Path, app: Path
          ) -> Callable[..., MasterProcess]:
    def start_deployed(*args: str) -> MasterProcess:
        # No bytecode cache: a test rewrites the module within the same second, and a .pyc
        # checked by mtime (in seconds) and size could be taken for the new source.
        env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path),
                         PYTHONDONTWRITEBYTECODE="1",
                         PYTHONPATH=os.pathsep.join([str(app), str(TESTS)]))
        return start_master("deployed:fleet", "--grace", "5", *args, env=env)
    return start_deployed


def cli(events: Events, runtime_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], capture_output=True,
                          text=True, timeout=WAIT * 2, env=master_env(events, runtime_dir))


def status(events: Events, runtime_dir: Path) -> dict:
    result = cli(events, runtime_dir, "status", "--fleet", "deployed", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def up(events: Events, version: str, count: int) -> dict[str, int]:
    return {e["label"]: e["pid"] for e in events.wait_kind("up", count=count, version=version)}


def open_gate(events: Events, tmp_path: Path, count: int) -> None:
    """Let the ``count``-th import that waits at the gate go on."""
    events.wait_kind("gate", count=count)
    os.close(os.open(tmp_path / "gate", os.O_WRONLY))  # the reader is there: EOF for it


def line_index(master: MasterProcess, pattern: str) -> int:
    hits = [i for i, line in enumerate(master.lines) if re.search(pattern, line)]
    assert len(hits) == 1, (pattern, hits, master.log)
    return hits[0]


def stop(master: MasterProcess) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_reload_runs_the_new_code_replacing_workers_one_at_a_time_and_keeps_the_pid(
        start, app: Path, events: Events, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    deploy(app, "2")
    master.signal(signal.SIGHUP)
    new = up(events, "2", 3)
    master.wait_log(r"reload done: code generation 1")
    assert set(new) == set(old) == {"a", "b", "c"}
    assert not set(new.values()) & set(old.values())
    assert {e["ppid"] for e in events.of("up")} == {master.pid}  # one master, all along
    assert len(master.log_matches(rf"\[{master.pid}\] .*floor of fleet deployed imported")) == 2
    assert [e["version"] for e in events.of("term")] == ["1", "1", "1"]
    previous_back = -1
    for label in ("a", "b", "c"):  # the fleet's order, one at a time
        stopped = line_index(master, rf"worker {label} \(pid {old[label]}\) rolling restart: "
                             "SIGTERM")
        exited = line_index(master, rf"worker {label} \(pid {old[label]}\) exited")
        back = line_index(master, rf"worker {label} spawned \(pid {new[label]}\)")
        assert previous_back < stopped < exited < back
        previous_back = back
    document = status(events, runtime_dir)
    assert document["master_pid"] == master.pid
    assert document["reloads"]["generation"] == 1
    assert document["reloads"]["last_result"]["ok"] is True
    assert {w["label"]: w["pid"] for w in document["workers"]} == new
    assert all(w["recycles"]["reload"] == 1 for w in document["workers"])
    os.kill(new["b"], signal.SIGKILL)  # a restart after the reload: from the new floor
    assert events.wait_kind("up", count=4, version="2")[-1]["label"] == "b"
    stop(master)


def test_reload_starts_added_workers_stops_removed_ones_and_applies_new_replicas(
        start, app: Path, events: Events, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    deploy(app, "2", 'Worker("a", work), Worker("b", work, replicas=2), Worker("d", work)')
    master.signal(signal.SIGHUP)
    new = up(events, "2", 4)
    master.wait_log(r"reload done")
    assert set(new) == {"a", "b", "b.1", "d"}
    master.wait_log(rf"worker c \(pid {old['c']}\) not in the reloaded fleet: SIGTERM")
    master.wait_log(r"worker c removed")
    assert len(events.of("up", label="c")) == 1  # never started again
    document = status(events, runtime_dir)
    assert {w["label"] for w in document["workers"]} == {"a", "b", "b.1", "d"}
    stop(master)


def test_new_code_that_fails_to_import_touches_nothing_and_restarts_use_the_old_floor(
        start, app: Path, events: Events, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    deploy(app, "2", extra="def broken(:\n")
    master.signal(signal.SIGHUP)
    master.wait_log(r"reload failed: .*SyntaxError")
    assert "Traceback (most recent call last)" in master.log  # the trial's, in the log
    result = status(events, runtime_dir)["reloads"]
    assert result["last_result"]["ok"] is False
    assert "SyntaxError" in result["last_result"]["error"]
    assert result["generation"] == 0 and not result["in_progress"]
    assert {w.pid for w in master.workers()} == set(old.values())
    # A restart after the failed reload still comes from the floor that works.
    os.kill(old["b"], signal.SIGKILL)
    again = events.wait_kind("up", count=4, version="1")
    assert again[-1]["label"] == "b"
    assert not events.of("up", version="2")
    stop(master)


@pytest.mark.parametrize(("workers", "extra", "fleet_args", "expected"), [
    (WORKERS, 'def post_fork(worker):\n    raise OSError("no database")\n',
     ", post_fork=post_fork", r"worker a: post_fork failed: OSError: no database"),
    ('Worker("a", work), Worker("b", work, warmup=warm), Worker("c", work)',
     'def warm():\n    raise ValueError("bad sample")\n', "",
     r"worker b: warm-up failed: ValueError: bad sample"),
])
def test_a_post_fork_or_warm_up_that_fails_at_once_fails_the_reload(
        start, app: Path, events: Events, workers: str, extra: str, fleet_args: str,
        expected: str) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    deploy(app, "2", workers, extra=extra, fleet_args=fleet_args)
    master.signal(signal.SIGHUP)
    failed = master.wait_log(r"reload failed: (.*)")
    assert re.search(expected, failed.group(1)), failed.group(0)
    assert {w.pid for w in master.workers()} == set(old.values())
    assert not events.of("up", version="2")
    stop(master)


def test_a_worker_in_backoff_during_a_reload_comes_back_on_the_new_code(
        start, app: Path, events: Events, tmp_path: Path) -> None:
    crash = 'async def crash():\n    emit("up", version=VERSION)\n    raise SystemExit(1)\n'
    deploy(app, "1", 'Worker("a", work), Worker("flaky", crash)', extra=crash, backoff=30.0)
    master = start()
    up(events, "1", 2)
    master.wait_log(r"worker flaky restart 1 in 30")  # in backoff for 30 s
    deploy(app, "2", 'Worker("a", work), Worker("flaky", work)')
    master.signal(signal.SIGHUP)
    assert set(up(events, "2", 2)) == {"a", "flaky"}
    master.wait_log(r"reload done")
    stop(master)


def test_a_second_sighup_during_a_reload_is_queued_and_follows_it(
        start, app: Path, events: Events, tmp_path: Path, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    up(events, "1", 3)
    os.mkfifo(tmp_path / "gate")
    deploy(app, "2")
    master.signal(signal.SIGHUP)
    events.wait_kind("gate", count=1)  # the trial waits at the gate
    master.signal(signal.SIGHUP)
    master.wait_log(r"SIGHUP: a reload is under way; another follows it")
    master.signal(signal.SIGHUP)  # coalesced with the one before: one reload follows
    master.wait_log(r"SIGHUP: a reload is under way; another follows it", count=2)
    assert status(events, runtime_dir)["reloads"]["pending"] is True
    deploy(app, "3")
    for count in range(1, 5):  # trial and new image of each reload
        open_gate(events, tmp_path, count)
    up(events, "3", 3)
    master.wait_log(r"reload done: code generation 2")
    assert len(master.log_matches(r"reload done")) == 2
    assert status(events, runtime_dir)["reloads"]["total"] == 2
    os.unlink(tmp_path / "gate")
    stop(master)


def test_code_broken_between_the_trial_and_the_exec_keeps_the_workers_until_a_reload_works(
        start, app: Path, events: Events, tmp_path: Path, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    os.mkfifo(tmp_path / "gate")
    deploy(app, "2")
    master.signal(signal.SIGHUP)
    events.wait_kind("gate", count=1)  # the trial has read version 2 and waits
    deploy(app, "3", extra="def broken(:\n")  # a second deploy, broken, in that window
    open_gate(events, tmp_path, 1)
    master.wait_log(r"reload: the new code failed after the re-exec")
    master.wait_log(r"reload failed: .*SyntaxError")
    reloads = status(events, runtime_dir)["reloads"]
    assert reloads["generation"] == 0 and reloads["last_result"]["ok"] is False
    assert {w.pid for w in master.workers()} == set(old.values())  # kept, same master
    os.kill(old["a"], signal.SIGKILL)  # no floor: it cannot be restarted...
    master.wait_log(r"worker a failed")
    os.unlink(tmp_path / "gate")
    deploy(app, "4")
    master.signal(signal.SIGHUP)  # ... until a reload goes through
    assert set(up(events, "4", 3)) == {"a", "b", "c"}
    master.wait_log(r"reload done: code generation 1")
    stop(master)


@pytest.mark.parametrize("when", ["trial", "exec"])
def test_sigterm_during_a_reload_stops_everything_within_the_grace(
        start, app: Path, events: Events, tmp_path: Path, when: str) -> None:
    deploy(app, "1")
    master = start()
    old = up(events, "1", 3)
    os.mkfifo(tmp_path / "gate")
    master.signal(signal.SIGHUP)
    if when == "exec":  # the trial passes; the new image waits in its import
        open_gate(events, tmp_path, 1)
        events.wait_kind("gate", count=2)
        assert psutil.Process(master.pid).cmdline()[-2] == ADOPT_OPTION
    else:
        events.wait_kind("gate", count=1)
    master.signal(signal.SIGTERM)  # exec: blocked until the new image handles it
    if when == "exec":
        open_gate(events, tmp_path, 2)
    assert master.wait_exit() == 0, master.log
    wait_gone(list(old.values()))
    assert len(events.wait_kind("term", count=3)) == 3  # each stopped cleanly, no SIGKILL
    assert master.log_matches(r"stopped in [\d.]+s; 0 killed after the grace period")


def test_worker_log_files_and_metrics_go_on_across_the_exec(
        start, app: Path, events: Events, tmp_path: Path) -> None:
    deploy(app, "1")
    textfile = tmp_path / "prefork.prom"
    (tmp_path / "logs").mkdir()
    master = start("--worker-log-dir", str(tmp_path / "logs"), "--metrics-textfile",
                   str(textfile), "--metrics-interval", "0.2")
    up(events, "1", 3)
    exporter = master.wait_log(r"metrics exporter started \(pid (\d+)\)").group(1)
    deploy(app, "2")
    master.signal(signal.SIGHUP)
    up(events, "2", 3)
    master.wait_log(r"reload done")
    assert len(master.log_matches(r"metrics exporter started")) == 1  # adopted, not restarted
    assert int(exporter) in {p.pid for p in master.workers()}
    stop(master)  # the master reads every pipe to its end before it exits
    for label in ("a", "b", "c"):  # the old worker's last line came through the adopted pipe
        assert (tmp_path / "logs" / f"{label}.log").read_text() == "up 1\nbye 1\nup 2\nbye 2\n"
    assert 'prefork_code_generation{fleet="deployed"} 1.0' in textfile.read_text()


def test_workers_only_reload_keeps_the_loaded_code(
        start, app: Path, events: Events, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    up(events, "1", 3)
    deploy(app, "2")
    result = cli(events, runtime_dir, "reload", "--fleet", "deployed", "--workers-only")
    assert result.returncode == 0, result.stderr
    assert set(up(events, "1", 6)) == {"a", "b", "c"}
    assert not events.of("up", version="2")
    assert "trial" not in master.log
    stop(master)


def test_prefork_reload_waits_for_the_end_and_says_how_it_went(
        start, app: Path, events: Events, runtime_dir: Path) -> None:
    deploy(app, "1")
    master = start()
    up(events, "1", 3)
    deploy(app, "2", extra="raise RuntimeError('config missing')\n")
    failed = cli(events, runtime_dir, "reload", "--fleet", "deployed")
    assert failed.returncode == 1
    assert failed.stderr.startswith("prefork: reload 1 failed: fleet module 'deployed' "
                                    "failed to import: RuntimeError: config missing"), failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    deploy(app, "3")
    done = cli(events, runtime_dir, "reload", "--fleet", "deployed")
    assert done.returncode == 0, done.stderr
    assert "reload 2 done" in done.stdout
    reloads = status(events, runtime_dir)["reloads"]  # it returned once the reload ended
    assert reloads["generation"] == 1 and not reloads["in_progress"]
    assert set(up(events, "3", 3)) == {"a", "b", "c"}
    stop(master)


# -- without a process ------------------------------------------------------------------


def test_reload_requests_during_a_reload_are_coalesced_into_the_next() -> None:
    state = ReloadState()
    assert state.ask("code") == (1, False)
    state.begin("code", "trial")
    assert state.ask("workers") == (2, True) and state.pending == "workers"
    assert state.ask("code") == (2, True) and state.pending == "code"
    assert state.ask("workers") == (2, True) and state.pending == "code"  # code covers it
    assert state.end("SyntaxError: x") == "code"
    assert state.last_result is not None
    assert state.last_result["id"] == 1 and state.last_result["ok"] is False
    assert not state.in_progress and state.as_status()["pending"] is False
    adopted = ReloadState.adopted(state.handed(), loaded=True)
    assert adopted.generation == 1 and adopted.phase == "rolling"
    assert ReloadState.adopted(state.handed(), loaded=False).generation == 0


def test_adopted_workers_go_into_their_slots_and_those_the_new_code_lacks_are_removed(
) -> None:
    old = slots_for(Fleet("f", (Worker("a", print), Worker("b", print, replicas=2),
                                Worker("c", print))))
    for pid, slot in enumerate(old, start=101):
        slot.started(pid, 10.0 + pid, count_start=True)
        slot.restarts, slot.ready = pid - 100, pid == 104
    old[0].stopping(StopReason.ROLLING_RESTART, "rolling restart", kill_at=50.0)
    new_fleet = Fleet("f", (Worker("a", print), Worker("b", print), Worker("d", print)))
    slots = slots_for(new_fleet)
    adopted = {slot.pid: (slot, ready) for slot, ready in
               adopt_slots(handed_workers(old), new_fleet, slots)}
    assert len(slots) == 5  # a, b, d; b.1 and c kept until they have stopped
    a, b, d = slots[:3]
    assert adopted[101] == (a, False) and a.state is WorkerState.STOPPING and a.kill_at == 50.0
    assert adopted[102] == (b, False) and b.state is WorkerState.RUNNING
    assert (b.started_at, b.restarts) == (112.0, 2)
    assert d.state is WorkerState.STOPPED and d.pid is None  # new: started by the master
    gone = {slot.label: ready for slot, ready in adopted.values()
            if slot.worker.target is removed_worker}
    assert gone == {"b.1": False, "c": True}


def test_the_command_run_again_drops_the_reloads_own_options() -> None:
    assert _without_reload_options(["-m", "prefork", "run", "--fleet", "x", ADOPT_OPTION, "7",
                                    TRIAL_OPTION, f"{ADOPT_OPTION}=9", "--grace", "1"]) == [
        "-m", "prefork", "run", "--fleet", "x", "--grace", "1"]


def test_a_handover_is_read_back_and_anything_else_is_one_line(tmp_path: Path) -> None:
    fd = write_handover({"version": 1, "workers": []})
    with pytest.raises(HandoverError):
        read_handover(fd)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed once read, whatever it held
    other = os.open(tmp_path / "x", os.O_RDWR | os.O_CREAT)
    os.write(other, b"not json")
    with pytest.raises(HandoverError, match="not a handover of a prefork master"):
        read_handover(other)
    with pytest.raises(HandoverError, match="Bad file descriptor"):
        read_handover(999)
    with pytest.raises(HandoverError, match=r"a broken handover: handover.fleet is missing"):
        read_handover(write_handover({"version": 1, "workers": []}))
    good = {"version": 1, "fleet": "f", "started_at": 1.0, "lock": [5, 6], "control": None,
            "kernels": None, "exporter": None, "worker_logs": [],
            "reloads": {"total": 1, "last": None, "pending": None, "generation": 0,
                        "last_result": None},
            "workers": [{"name": "a", "replica": 0, "pid": 7, "started_at": 1.0,
                         "restarts": 0, "recycles": {}, "ready": False, "kill_at": None}]}
    assert read_handover(write_handover(good)) == good
    good["workers"][0]["pid"] = True
    with pytest.raises(HandoverError, match=r"workers\[0\].pid is missing or not of type int"):
        read_handover(write_handover(good))


def test_run_with_an_adopt_fd_that_is_no_handover_is_one_line(
        events: Events, runtime_dir: Path) -> None:
    result = cli(events, runtime_dir, "run", "--fleet", "fleets.basic:sleepers",
                 ADOPT_OPTION, "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and ADOPT_OPTION in result.stderr, result.stderr
