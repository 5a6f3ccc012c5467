"""Start order (``Worker(after=[...])``): with real masters, a worker starts only once the
workers it names are ready; without a process, the graph checks and the decisions."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import prefork.heartbeats as hb
from conftest import Events, MasterProcess, master_env
from prefork import Fleet, FleetError, Worker, heartbeat, readiness, ready
from prefork.policy import ExitStatus
from prefork.readiness import StartOrder, failed_roots, find_cycle
from prefork.slot import Slot, slots_for
from prefork.states import WorkerState

S = WorkerState
RNG = random.Random(0)


def status(events: Events, runtime_dir: Path, fleet: str) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-m", "prefork", "status", "--fleet", fleet,
                             "--json"], capture_output=True, text=True, timeout=30,
                            env=master_env(events, runtime_dir))
    assert result.returncode == 0, result.stderr
    return {w["label"]: w for w in json.loads(result.stdout)["workers"]}


def release(events: Events, label: str) -> dict:
    """SIGUSR2 to held worker ``label``; its "released" event."""
    os.kill(events.wait_kind("up", label=label)[0]["pid"], signal.SIGUSR2)
    return events.wait_kind("released", label=label)[0]


def stop(master: MasterProcess, code: int) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == code, master.log


# -- with a real master -----------------------------------------------------------------


def test_a_worker_starts_only_once_prefork_ready_and_a_first_heartbeat_came(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.start_order:by_ready")
    events.wait_kind("up", label="api")
    events.wait_kind("up", label="cache")
    web = status(events, runtime_dir, "by_ready")["web"]
    assert (web["state"], web["pid"], web["reason"]) == ("waiting", None,
                                                         "waiting for api, cache")
    api_released = release(events, "api")
    master.wait_log(r"worker api is ready")
    web = status(events, runtime_dir, "by_ready")["web"]
    assert (web["state"], web["reason"]) == ("waiting", "waiting for cache")
    cache_released = release(events, "cache")  # readiness through its first heartbeat()
    up = events.wait_kind("up", label="web")[0]
    assert up["t"] > cache_released["t"] > api_released["t"]
    master.wait_log(r"worker web: api, cache ready, starting it")
    assert status(events, runtime_dir, "by_ready")["web"]["reason"] is None
    assert len(events.of("up", label="web")) == 1
    stop(master, 0)


def test_a_migration_that_exits_0_releases_its_dependents(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.start_order:migration")
    events.wait_kind("up", label="migrate")
    assert status(events, runtime_dir, "migration")["web"]["state"] == "waiting"
    released = release(events, "migrate")
    up = events.wait_kind("up", label="web")[0]
    assert up["t"] > released["t"]
    master.wait_log(r"worker migrate ended cleanly")
    assert status(events, runtime_dir, "migration")["migrate"]["state"] == "exited"
    stop(master, 0)


def test_a_failed_migration_leaves_its_dependents_waiting(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.start_order:failed_migration")
    master.wait_log(r"worker web will not start: dependency failed: migrate")
    events.wait_kind("up", label="other")
    workers = status(events, runtime_dir, "failed_migration")
    assert workers["migrate"]["state"] == "failed"
    assert (workers["web"]["state"], workers["web"]["pid"], workers["web"]["reason"]) == (
        "waiting", None, "dependency failed: migrate")
    assert workers["other"]["state"] == "running"
    stop(master, 5)  # a worker failed
    assert not events.of("up", label="web")


def test_a_master_left_with_only_workers_behind_a_failure_ends_failed(
        start_master, events: Events) -> None:
    master = start_master("fleets.start_order:only_failed_migration")
    assert master.wait_exit() == 5, master.log
    master.wait_log(r"no worker left to run; .*failed: migrate; never started: web "
                    r"\(dependency failed: migrate\)")
    assert not events.of("up", label="web")


def test_a_stop_while_a_worker_waits_stops_cleanly(start_master, events: Events) -> None:
    master = start_master("fleets.start_order:migration")
    events.wait_kind("up", label="migrate")
    master.wait_log(r"worker web waiting for migrate")
    stop(master, 0)
    events.drain()
    assert not events.of("up", label="web") and not events.of("released")


@pytest.mark.parametrize(("fleet", "message"), [
    ("cycle", "fleet 'cycle': workers wait for each other in a cycle: a -> b -> c -> a "
              "(each starts after the next)"),
    ("unknown", "worker 'web': after names 'migrat', which is not a worker of fleet 'unknown'"),
    ("itself", "worker 'web': after names the worker itself"),
    ("a_string", "worker 'web': after must be a list of worker names, got 'migrate'"),
])
def test_a_bad_start_order_is_one_line_and_exit_2(fleet: str, message: str, events: Events,
                                                  runtime_dir: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "prefork", "run", "--fleet", f"fleets.start_order:{fleet}"],
        capture_output=True, text=True, timeout=30,
        env=master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"prefork: error: {message}"]
    events.drain()
    assert not events.of("up")


# -- the graph, without a process --------------------------------------------------------


def work() -> None:
    raise AssertionError("no worker runs in these tests")


def test_find_cycle_names_the_path_around_it_or_none() -> None:
    assert find_cycle({"a": ("b",), "b": ("c",), "c": ()}) is None
    assert find_cycle({"a": ("b", "c"), "b": ("c",), "c": (), "d": ("a", "c")}) is None
    assert find_cycle({"x": (), "a": ("b",), "b": ("a",)}) == ["a", "b", "a"]
    assert find_cycle({"a": ("a",)}) == ["a", "a"]
    assert find_cycle({"d": ("a",), "a": ("b",), "b": ("c",), "c": ("a",)}) == [
        "a", "b", "c", "a"]


def test_a_long_chain_is_no_cycle_and_needs_no_deep_recursion() -> None:
    chain = {f"w{i}": (f"w{i + 1}",) for i in range(5000)}
    assert find_cycle(chain) is None
    chain["w5000"] = ("w0",)
    assert len(find_cycle(chain) or []) == 5002


def test_validation_accepts_a_diamond_and_keeps_after_as_a_tuple() -> None:
    fleet = Fleet("f", [Worker("db", work), Worker("api", work, after=["db"]),
                        Worker("cache", work, after={"db"}),
                        Worker("web", work, after=["api", "cache"])]).validate()
    assert fleet.workers[3].after == ("api", "cache")
    hash(fleet)  # still hashable
    with pytest.raises(FleetError, match=r"after must be a list of worker names, got 3"):
        Fleet("f", [Worker("w", work, after=3)]).validate()  # type: ignore[arg-type]
    with pytest.raises(FleetError, match=r"after must be a list of worker names"):
        Fleet("f", [Worker("w", work), Worker("v", work, after=[None])]).validate()  # type: ignore[list-item]


# -- decisions and the channel, without a fork -------------------------------------------


def order_of(*workers: Worker) -> tuple[StartOrder, dict[str, Slot]]:
    fleet = Fleet("f", list(workers)).validate()
    slots = slots_for(fleet)
    return StartOrder(fleet, slots), {s.label: s for s in slots}


def test_every_replica_of_a_dependency_must_be_ready_once_and_it_stays_ready() -> None:
    order, by = order_of(Worker("db", work, replicas=2, restart="never"),
                         Worker("web", work, after=["db"]))
    web, db0, db1 = by["web"], by["db"], by["db.1"]
    assert order.holds(web) and web.state is S.WAITING
    for pid, slot in enumerate((db0, db1)):
        slot.started(100 + pid, 1.0, count_start=True)
    db0.exited(ExitStatus(code=0), 2.0, RNG)
    order.exited(db0)
    assert order.released() == [] and "db" not in order.ready
    db1.exited(ExitStatus(code=0), 2.0, RNG)
    order.exited(db1)
    assert order.released() == [web] and order.ready == {"db"}
    assert not order.holds(web)  # a new replica of web, added later, need not wait


def test_a_failed_dependency_blocks_its_dependents_and_theirs() -> None:
    order, by = order_of(Worker("migrate", work, restart="never"),
                         Worker("api", work, after=["migrate"]),
                         Worker("web", work, after=["api"]), Worker("other", work))
    assert order.holds(by["api"]) and order.holds(by["web"])
    assert not order.holds(by["other"])
    migrate = by["migrate"]
    migrate.started(100, 1.0, count_start=True)
    slots = list(by.values())
    assert failed_roots("api", slots, order.ready) == set()
    migrate.exited(ExitStatus(code=1), 2.0, RNG)
    order.exited(migrate)
    assert failed_roots("api", slots, order.ready) == {"migrate"}
    assert by["api"].reason == by["web"].reason == "dependency failed: migrate"
    assert order.released() == []


def test_a_failure_at_the_root_of_the_longest_chain_is_found() -> None:
    """1,024 workers, each after the one before, the first failed: the walk back to it
    must neither recurse past Python's limit nor visit a worker twice."""
    workers = [Worker("w0", work, restart="never")]
    workers += [Worker(f"w{i}", work, after=[f"w{i - 1}"]) for i in range(1, 1024)]
    order, by = order_of(*workers)
    for worker in workers[1:]:
        assert order.holds(by[worker.name])
    by["w0"].started(100, 1.0, count_start=True)
    by["w0"].exited(ExitStatus(code=1), 2.0, RNG)
    order.exited(by["w0"])
    assert failed_roots("w1023", list(by.values()), order.ready) == {"w0"}
    assert by["w1023"].reason == "dependency failed: w0"


def test_failures_reached_by_several_paths_are_each_named_once() -> None:
    """A diamond (d after b and c, both after a) and a worker behind two failed roots."""
    order, by = order_of(Worker("a", work, restart="never"), Worker("x", work, restart="never"),
                         Worker("b", work, after=["a"]), Worker("c", work, after=["a", "x"]),
                         Worker("d", work, after=["b", "c"]))
    for name in ("b", "c", "d"):
        assert order.holds(by[name])
    for name in ("a", "x"):
        by[name].started(100, 1.0, count_start=True)
        by[name].exited(ExitStatus(code=1), 2.0, RNG)
        order.exited(by[name])
    assert by["b"].reason == "dependency failed: a"
    assert by["c"].reason == by["d"].reason == "dependency failed: a, x"
    assert failed_roots("d", list(by.values()), order.ready) == {"a", "x"}


def test_the_pipe_carries_readiness_and_eof_does_not() -> None:
    order, by = order_of(Worker("db", work, replicas=2), Worker("web", work, after=["db"]))
    assert order.arm(by["web"]) == -1  # nobody waits for web
    first, second = by["db"], by["db.1"]
    readiness.attach(os.dup(order.arm(first)))  # the child's copy of the write end
    try:
        ready()
        assert readiness.channel == -1
        ready()  # the second call does nothing (the fd is closed already)
    finally:
        readiness.attach(-1)
    order.forked(first, True)
    (read_end,) = order.fds()
    order.read(read_end)
    assert first.ready and order.fds() == []
    order.arm(second)
    order.forked(second, True)  # no child holds a write end: as one that died unready
    order.read(order.fds()[0])
    assert not second.ready and order.fds() == [] and order.ready == set()
    assert order.arm(first) == -1  # ready once: no pipe again
    order.close()


def test_ready_and_heartbeat_are_no_ops_outside_an_awaited_worker() -> None:
    assert readiness.channel == -1
    ready()
    heartbeat()
    assert readiness.channel == -1


def test_the_first_heartbeat_is_readiness_but_an_async_loops_own_beat_is_not() -> None:
    read_end, write_end = os.pipe()
    readiness.attach(write_end)
    try:
        hb._beat_only()  # what an async worker's loop sends on its own
        assert readiness.channel == write_end
        heartbeat()
        assert readiness.channel == -1
        assert os.read(read_end, 2) == b"!"
    finally:
        readiness.attach(-1)
        os.close(read_end)
