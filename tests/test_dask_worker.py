"""``prefork dask-worker``: Dask workers forked from a floor, with prefork as their nanny.

A real scheduler on 127.0.0.1 (``fleets.dask_scheduler``, a subprocess), two masters
standing for two hosts (each its own runtime directory and name prefix), 2 workers each,
and an asynchronous ``distributed.Client`` in the test (its loop is the test's own, run
by ``asyncio.run``: no thread is left in pytest). The kernels are ``fleets.dask_kernels``,
the floor the masters import; a kernel that must be mid-run waits on a FIFO the test
writes to.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import WAIT, Events, MasterProcess, cli_in_child, master_env, wait_gone

distributed = pytest.importorskip("distributed")

from dask_cluster import Scheduler, start_scheduler  # noqa: E402 - after the skip

FLOOR = "fleets.dask_kernels:fleet"
TESTS = Path(__file__).resolve().parent


@dataclass
class Cluster:
    scheduler: Scheduler
    masters: dict[str, MasterProcess]  # name prefix -> master: "hostA", "hostB"
    start: Callable[..., MasterProcess]

    def master_of(self, pid: int) -> str:
        parent = psutil.Process(pid).ppid()
        [prefix] = [p for p, m in self.masters.items() if m.pid == parent]
        return prefix


@pytest.fixture
def start_dask_master(events: Events, tmp_path: Path) -> Iterator[Callable[..., MasterProcess]]:
    """``prefork dask-worker ADDRESS --fleet FLOOR --name-prefix PREFIX ...``, each master
    with a runtime directory of its own (another host); stopped with SIGTERM after the
    test, its exit checked."""
    started: list[MasterProcess] = []

    def start(address: str, prefix: str, *args: str) -> MasterProcess:
        runtime = tmp_path / f"run-{prefix}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork", "dask-worker", address, "--fleet", FLOOR,
             "--nworkers", "2", "--name-prefix", prefix, "--grace", "5",
             "--runtime-dir", str(runtime), *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=master_env(events, runtime, PREFORK_TEST_DIR=str(tmp_path)))
        master = MasterProcess(proc, events)
        started.append(master)
        return master

    yield start
    for master in started:
        if master.proc.poll() is None:
            master.signal(signal.SIGTERM)
            code = master.wait_exit()
            assert code == 0, master.log
        master.close()


@pytest.fixture
def cluster(tmp_path: Path, start_dask_master: Callable[..., MasterProcess]
            ) -> Iterator[Cluster]:
    cluster = Cluster(start_scheduler(tmp_path), {}, start_dask_master)
    try:
        for prefix in ("hostA", "hostB"):
            cluster.masters[prefix] = start_dask_master(cluster.scheduler.address, prefix)
        yield cluster
        for master in cluster.masters.values():  # before their scheduler: a clean stop
            if master.proc.poll() is None:
                master.signal(signal.SIGTERM)
                assert master.wait_exit() == 0, master.log
    finally:
        cluster.scheduler.stop()


def run(coroutine_function: Callable[..., object], *args: object) -> object:
    """Run a test's client code on a loop of its own, as asyncio.run does."""
    return asyncio.run(coroutine_function(*args))  # type: ignore[arg-type]


async def workers_by_name(client: distributed.Client, names: set[str],
                          changed: dict[str, int] | None = None) -> dict[str, dict]:
    """Wait (deadline WAIT) until the scheduler has exactly the workers ``names``, each
    with a pid other than ``changed``'s; return them by name ({"address", "pid"})."""
    deadline = time.monotonic() + WAIT
    found: dict[str, dict] = {}
    while True:
        identity = await client.scheduler.identity()
        found = {info["name"]: {"address": address}
                 for address, info in identity["workers"].items()}
        if set(found) == names:
            pids = await client.run(os.getpid, on_error="return")
            for worker in found.values():
                worker["pid"] = pids.get(worker["address"])
            if all(isinstance(w["pid"], int) for w in found.values()) and all(
                    found[n]["pid"] != pid for n, pid in (changed or {}).items()):
                return found
        if time.monotonic() > deadline:
            raise AssertionError(f"scheduler has workers {found}, wanted "
                                 f"{sorted(names)} (changed: {changed})")
        await asyncio.sleep(0.05)  # the scheduler has no event to wait on for this


ALL = {"hostA-0", "hostA-1", "hostB-0", "hostB-1"}


async def client_of(cluster: Cluster) -> distributed.Client:
    return await distributed.Client(cluster.scheduler.address, asynchronous=True,
                                    timeout=WAIT)


async def wait_event(events: Events, predicate: Callable[[dict], bool], what: str) -> dict:
    """``events.wait`` off the loop, which must go on running the client meanwhile."""
    return await asyncio.to_thread(events.wait, predicate, what=what)


def release(tmp_path: Path, name: str, answer: str) -> None:
    """Let the kernel waiting on FIFO ``name`` finish (blocks until it reads)."""
    with open(tmp_path / name, "wb") as fifo:
        fifo.write(answer.encode() + b"\n")


def test_four_workers_of_two_masters_connect_and_compute_on_the_shared_floor(
        cluster: Cluster) -> None:
    from fleets.dask_kernels import square, where

    async def scenario() -> None:
        async with await client_of(cluster) as client:
            workers = await workers_by_name(client, ALL)
            results = await client.gather(client.map(square, range(100)))
            assert results == [x * x for x in range(100)]
            for name, info in workers.items():
                pid, ppid, imported_in = await client.submit(
                    where, workers=[info["address"]], pure=False)
                master = cluster.masters[name.split("-")[0]]
                # Forked by its master, which imported the floor: nothing spawned anew.
                assert (pid, ppid, imported_in) == (info["pid"], master.pid, master.pid)

    run(scenario)
    for master in cluster.masters.values():
        master.wait_log(r"floor of fleet dask_kernels and distributed imported")
        assert not master.log_matches(r"WARNING|Traceback"), master.log


def test_a_worker_killed_mid_kernel_is_restarted_and_its_task_rescheduled(
        cluster: Cluster, events: Events, tmp_path: Path) -> None:
    from fleets.dask_kernels import held

    os.mkfifo(tmp_path / "gate")

    async def scenario() -> None:
        async with await client_of(cluster) as client:
            workers = await workers_by_name(client, ALL)
            victim = workers["hostA-0"]
            future = client.submit(held, "gate", workers=[victim["address"]],
                                   allow_other_workers=True, pure=False)
            running = await wait_event(events, lambda e: e["kind"] == "kernel-running",
                                  what="the kernel")
            assert running["pid"] == victim["pid"]
            os.kill(victim["pid"], signal.SIGKILL)
            again = await wait_event(events, lambda e: e["kind"] == "kernel-running"
                                and e["pid"] != victim["pid"], what="the rescheduled kernel")
            await asyncio.to_thread(release, tmp_path, "gate", "done")
            assert await future == "done"
            # prefork restarted the worker: same name, a new pid, connected again.
            back = await workers_by_name(client, ALL, changed={"hostA-0": victim["pid"]})
            assert psutil.Process(back["hostA-0"]["pid"]).ppid() == cluster.masters["hostA"].pid
            assert again["pid"] in {w["pid"] for w in back.values()}

    run(scenario)
    cluster.masters["hostA"].wait_log(r"worker dask-worker \(pid \d+\) exited: killed by "
                                      r"SIGKILL")


def test_the_other_master_finishes_the_work_of_a_master_killed_mid_kernel(
        cluster: Cluster, events: Events, tmp_path: Path) -> None:
    from fleets.dask_kernels import held, square

    os.mkfifo(tmp_path / "gate")
    killed = cluster.masters["hostA"]

    async def scenario() -> list[int]:
        async with await client_of(cluster) as client:
            workers = await workers_by_name(client, ALL)
            future = client.submit(held, "gate", workers=[workers["hostA-1"]["address"]],
                                   allow_other_workers=True, pure=False)
            running = await wait_event(events, lambda e: e["kind"] == "kernel-running",
                                       what="the kernel")
            assert running["pid"] == workers["hostA-1"]["pid"]
            orphans = [p.pid for p in killed.workers()]
            killed.signal(signal.SIGKILL)
            assert wait_gone(orphans) == [], "workers outlived their master"
            for pid in orphans:  # re-parented to this test (a subreaper): reap them
                os.waitpid(pid, 0)
            again = await wait_event(events, lambda e: e["kind"] == "kernel-running"
                                and e["pid"] != running["pid"], what="the rescheduled kernel")
            assert cluster.master_of(again["pid"]) == "hostB"
            squares = client.map(square, range(50))
            await asyncio.to_thread(release, tmp_path, "gate", "finished")
            assert await future == "finished"
            await workers_by_name(client, {"hostB-0", "hostB-1"})
            return await client.gather(squares)

    assert run(scenario) == [x * x for x in range(50)]
    assert killed.proc.wait(timeout=WAIT) == -signal.SIGKILL


def test_workers_go_on_after_the_scheduler_is_stopped_and_started_again(
        cluster: Cluster, tmp_path: Path) -> None:
    from fleets.dask_kernels import square

    async def pids() -> dict[str, int]:
        async with await client_of(cluster) as client:
            return {n: w["pid"] for n, w in (await workers_by_name(client, ALL)).items()}

    before = run(pids)
    cluster.scheduler.stop()
    # Each Dask worker closes when its scheduler goes; prefork starts a new one from the
    # floor, which waits for a scheduler to come back.
    for master in cluster.masters.values():
        master.wait_log(r"worker dask-worker(\.1)? spawned", count=4)
        # Every start says so, before it tries: 2 at the start, 2 now, with none there.
        master.wait_log(r"Waiting to connect to: +" + re.escape(cluster.scheduler.address),
                        count=4)
    cluster.scheduler = start_scheduler(tmp_path, port=cluster.scheduler.port)

    async def after() -> list[int]:
        async with await client_of(cluster) as client:
            await workers_by_name(client, ALL, changed=before)
            return await client.gather(client.map(square, range(20)))

    assert run(after) == [x * x for x in range(20)]
    for master in cluster.masters.values():
        assert len(master.log_matches(r"closed on its own")) == 2, master.log
        assert not master.log_matches(r"Traceback|marked failed"), master.log


def test_sigterm_closes_the_workers_and_the_scheduler_forgets_them_at_once(
        cluster: Cluster) -> None:
    async def scenario() -> None:
        async with await client_of(cluster) as client:
            await workers_by_name(client, ALL)
            master = cluster.masters["hostB"]
            master.signal(signal.SIGTERM)
            assert master.wait_exit() == 0, master.log
            # Well within the scheduler's own worker-ttl (5 min): the workers said goodbye.
            await workers_by_name(client, {"hostA-0", "hostA-1"})

    run(scenario)
    log = cluster.masters["hostB"].log
    assert len(re.findall(r"worker dask-worker(\.1)? \(pid \d+\) exited: exit code 0", log)) == 2


@pytest.mark.parametrize(("args", "message"), [
    (["http://127.0.0.1:8786"], "is not tcp://HOST:PORT"),
    (["127.0.0.1:8786"], "is not tcp://HOST:PORT"),
    (["tcp://127.0.0.1"], "is not tcp://HOST:PORT"),
    (["tcp://127.0.0.1:0"], "the port must be 1 to 65535"),
    (["tcp://127.0.0.1:70000"], "the port must be 1 to 65535"),
    (["tcp://127.0.0.1:8786", "--nworkers", "0"], "--nworkers must be 1 to 1024, got 0"),
    (["tcp://127.0.0.1:8786", "--nthreads", "-1"], "--nthreads must be 1 to 1024, got -1"),
    (["tcp://127.0.0.1:8786", "--fleet", "nosuchfleet"], "unknown fleet 'nosuchfleet'"),
    (["tcp://127.0.0.1:8786", "--fleet", "fleets.nosuch:fleet"],
     "fleet module 'fleets.nosuch' not found"),
    (["tcp://127.0.0.1:8786", "--name-prefix", "a b"], "--name-prefix 'a b' must be"),
])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, events: Events,
                                          runtime_dir: Path) -> None:
    if "--fleet" not in args:
        args = [*args, "--fleet", FLOOR]
    result = cli_in_child(["dask-worker", *args], master_env(events, runtime_dir))
    assert result.returncode == 2, result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("prefork: error: ") and message in line, line
    assert list(runtime_dir.iterdir()) == []  # no lock taken: nothing started


def test_without_distributed_it_says_what_to_install(events: Events, runtime_dir: Path) -> None:
    code = ("import sys; sys.modules['distributed'] = None\n"
            "from prefork.cli import main\n"
            f"main(['dask-worker', 'tcp://127.0.0.1:8786', '--fleet', {FLOOR!r}])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=master_env(events, runtime_dir), timeout=WAIT)
    assert result.returncode == 2, result.stderr
    assert result.stderr == ("prefork: error: dask-worker needs distributed: "
                             "pip install 'prefork[dask]'\n")
