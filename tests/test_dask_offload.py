"""``--offload``: the workers' kernels on a Dask cluster (a scheduler and a worker on
127.0.0.1, started here), locally while it cannot be reached, and back on it after."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dask_cluster import free_port, start_scheduler, start_worker
from test_cpu_fleet import OBSERVATIONS, expected_results, stored_results, wait_all_caught_up

from conftest import Events, MasterProcess, cli_in_child, master_env
from prefork_workers.cpu.demo_data import generate


def test_kernels_run_locally_until_the_scheduler_is_up_then_on_the_cluster(
        start_master, events: Events, tmp_path: Path) -> None:
    port = free_port()
    master = start_master("fleets.offloaded:fleet", "--offload", f"tcp://127.0.0.1:{port}")
    local = events.wait_kind("result")[0]
    assert local["kernel_pid"] == local["pid"] and local["value"] == 10  # inline, at once
    master.wait_log(rf"offload: scheduler tcp://127.0.0.1:{port} unreachable \(.+\); "
                    r"kernels run locally, and it is tried again every 5s")
    scheduler = start_scheduler(tmp_path, port)
    address = scheduler.address
    worker = start_worker(address)
    try:
        remote = events.wait(lambda e: e["kind"] == "result" and e["kernel_pid"] == worker.pid,
                             what="a kernel run by the Dask worker")
        assert remote["pid"] == local["pid"] and remote["value"] == 10  # the same worker
        # The kernel's exception, raised on the cluster, is raised in the caller as it is.
        events.wait(lambda e: e["kind"] == "raised" and e["message"] == f"failed in {worker.pid}",
                    what="the kernel's ValueError from the Dask worker")
        master.wait_log(rf"offload: scheduler {address} reached again")
        # Arguments that cannot be pickled are the caller's error, not an outage.
        unpicklable = events.wait(lambda e: e["kind"] == "unpicklable" and e["t"] > remote["t"],
                                  what="an unpicklable call with the cluster up")
        assert unpicklable["message"] == ("kernel fleets.kernels.whoami: its arguments cannot "
                                          "be pickled: this argument cannot be pickled")
        assert len(master.log_matches("offload: scheduler .* unreachable")) == 1  # the first
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0, master.log
    finally:
        worker.stop()
        scheduler.stop()


def test_with_fallback_error_an_unreachable_scheduler_fails_the_kernel(
        start_master, events: Events) -> None:
    port = free_port()
    start_master("fleets.offloaded:fleet", "--offload", f"tcp://127.0.0.1:{port}",
                 "--offload-fallback", "error")
    failed = events.wait_kind("failed")[0]["message"]
    assert failed.startswith(f"kernel fleets.kernels.whoami: scheduler tcp://127.0.0.1:{port} "
                             "unreachable")
    assert not events.of("result")


def test_cpu_fleet_results_with_offload_equal_the_kernels_run_directly(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    """The cluster: two `prefork dask-worker --fleet cpu` masters, standing for two hosts,
    2 Dask workers each, forked from the cpu fleet's floor."""
    generated = tmp_path / "generated.sqlite3"
    generate(generated, observations=OBSERVATIONS, sources=300, seed=7)
    db = tmp_path / "offloaded.sqlite3"
    shutil.copyfile(generated, db)
    scheduler = start_scheduler(tmp_path)
    hosts: list[MasterProcess] = []
    try:
        for host in ("hostA", "hostB"):
            runtime = tmp_path / f"run-{host}"
            runtime.mkdir(mode=0o700)
            hosts.append(MasterProcess(subprocess.Popen(
                [sys.executable, "-m", "prefork", "dask-worker", scheduler.address, "--fleet",
                 "cpu", "--nworkers", "2", "--name-prefix", host, "--runtime-dir",
                 str(runtime)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, env=master_env(events, runtime)), events))
        env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path), PREFORK_DB=str(db))
        master = start_master("fleets.cpu_test:fleet", "--offload", scheduler.address, env=env)
        wait_all_caught_up(master, OBSERVATIONS)
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0, master.log
        assert not master.log_matches("offload: scheduler")  # never fell back
        assert stored_results(db) == expected_results(generated)
    finally:
        for host in hosts:
            if host.proc.poll() is None:
                host.signal(signal.SIGTERM)
                assert host.wait_exit() == 0, host.log
            host.close()
        scheduler.stop()


@pytest.mark.parametrize(("args", "message"), [
    (["--offload", "127.0.0.1:8786"], "offload: scheduler address '127.0.0.1:8786' is not "
                                      "tcp://HOST:PORT"),
    (["--offload", "tcp://127.0.0.1:99999"], "the port must be 1 to 65535"),
    (["--offload", "tcp://127.0.0.1:8786", "--offload-fallback", "maybe"],
     "'--offload-fallback'"),
])
def test_bad_offload_options_are_one_line_and_exit_2(args: list[str], message: str,
                                                     events: Events, runtime_dir: Path) -> None:
    result = cli_in_child(["run", "--fleet", "fleets.offloaded:fleet", *args],
                          master_env(events, runtime_dir))
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and message in result.stderr, result.stderr
