"""The kernel pool: ``run_kernel`` inline and in kernel processes forked by the master."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import Events, master_env
from fleets import kernels
from prefork.kernel_pool import ANSWER, LENGTH, PID, RAISED, RAN
from prefork.offload import run_kernel


def _pool_pids(master) -> list[int]:
    return sorted(p.pid for p in master.workers() if "kernel-pool" in " ".join(p.cmdline()))


# -- without a pool: inline -----------------------------------------------------------


def test_without_a_pool_the_kernel_runs_inline_in_the_caller() -> None:
    assert asyncio.run(run_kernel(kernels.whoami, 5)) == (os.getpid(), os.getppid(), 10)


def _closure() -> object:
    def inner() -> None:
        pass

    return inner


class _Kernels:
    def method(self) -> None:
        pass


@pytest.mark.parametrize("fn", [lambda: None, _closure(), _Kernels().method],
                         ids=["lambda", "closure", "bound method"])
def test_a_function_not_found_by_its_name_is_refused_pool_or_not(fn: object) -> None:
    with pytest.raises(TypeError, match="cannot be found by its name in another process"):
        asyncio.run(run_kernel(fn))  # type: ignore[arg-type]


def test_a_fleet_without_a_pool_runs_its_kernels_inline(start_master, events: Events) -> None:
    master = start_master("fleets.kernels:no_pool")
    caller = events.wait_kind("pooled")[0]
    assert (caller["kernel_pid"], caller["kernel_ppid"]) == (caller["pid"], master.pid)


# -- with a pool ------------------------------------------------------------------------


def test_kernels_run_in_processes_forked_by_the_master(start_master, events: Events) -> None:
    master = start_master("fleets.kernels:basic_fleet")
    pooled = events.wait_kind("pooled")[0]
    assert pooled["value"] == 42
    assert pooled["kernel_pid"] != pooled["pid"]
    assert pooled["kernel_ppid"] == master.pid  # a child of the master, not of the caller
    assert pooled["kernel_pid"] in _pool_pids(master)
    inline = events.wait_kind("inline")[0]
    assert (inline["kernel_pid"], inline["value"]) == (inline["pid"], 8)  # offload_if=False
    raised = events.wait_kind("raised")[0]
    assert raised["message"] == "bad input"
    assert "raised in kernel process" in raised["notes"][0] and "in fail" in raised["notes"][0]
    assert "cannot be found by its name" in events.wait_kind("refused")[0]["message"]
    master.wait_log(r"worker kernel-pool\.1 spawned")


def test_a_kernel_process_killed_mid_kernel_is_lost_to_the_caller_and_restarted(
        start_master, events: Events) -> None:
    master = start_master("fleets.kernels:lost_fleet")
    running = events.wait_kind("kernel-running")[0]
    os.kill(running["pid"], signal.SIGKILL)
    message = events.wait_kind("lost")[0]["message"]
    assert message == (f"kernel fleets.kernels.held: kernel process {running['pid']} died "
                       "before it answered (IncompleteReadError); it is not retried")
    master.wait_log(rf"worker kernel-pool \(pid {running['pid']}\) exited: killed by SIGKILL")
    again = events.wait_kind("pooled")[0]  # the call waited in the queue for the new one
    assert again["kernel_pid"] != running["pid"] and again["kernel_ppid"] == master.pid
    assert again["kernel_pid"] in _pool_pids(master)


def test_sigterm_lets_a_kernel_process_finish_its_kernel_then_it_is_restarted(
        start_master, events: Events, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "release.fifo")
    master = start_master("fleets.kernels:graceful_fleet")
    running = events.wait_kind("kernel-running")[0]
    os.kill(running["pid"], signal.SIGTERM)  # as the master's recycling would
    with open(tmp_path / "release.fifo", "wb") as release:
        release.write(b"done\n")
    assert events.wait_kind("answer")[0]["value"] == "done"
    master.wait_log(rf"worker kernel-pool \(pid {running['pid']}\) exited: exit code 0")
    master.wait_log(r"worker kernel-pool spawned", count=2)  # a pool process always restarts


def test_a_pool_whose_processes_all_failed_fails_calls_instead_of_keeping_them_waiting(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.kernels:failing_pool")
    master.wait_log(r"worker kernel-pool .*failed")
    master.wait_log(r"kernel pool: every kernel process has failed; its socket is closed")
    message = events.wait_kind("failed")[0]["message"]
    assert message.startswith("kernel fleets.kernels.whoami: ")
    assert ("died before it answered" in message  # it waited in the queue as it closed
            or f"no kernel pool at {runtime_dir / 'kfailing.kernels'}" in message), message
    assert not (runtime_dir / "kfailing.kernels").exists()


def test_what_cannot_be_pickled_is_a_clear_error_and_the_pool_goes_on(
        start_master, events: Events) -> None:
    start_master("fleets.kernels:errors_fleet")
    arguments = events.wait_kind("error", on="arguments")[0]
    assert arguments["type"] == "KernelError"
    assert arguments["message"] == ("kernel fleets.kernels.whoami: its arguments cannot be "
                                    "pickled: this argument cannot be pickled")
    result = events.wait_kind("error", on="result")[0]
    assert result["message"] == "this argument cannot be pickled"
    assert "raised in kernel process" in result["notes"][0]
    assert events.wait_kind("pooled")[0]["value"] == 4


def _call(path: Path, request: bytes) -> tuple[int, int, bytes]:
    """One raw call: the kernel process's pid, the answer's kind and body."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(20)
        sock.connect(str(path))
        pid = PID.unpack(sock.recv(PID.size, socket.MSG_WAITALL))[0]
        sock.sendall(request)
        kind, length = ANSWER.unpack(sock.recv(ANSWER.size, socket.MSG_WAITALL))
        return pid, kind, sock.recv(length, socket.MSG_WAITALL)


def test_a_kernel_process_survives_what_a_client_sends(start_master, runtime_dir: Path,
                                                       events: Events) -> None:
    master = start_master("fleets.kernels:idle")
    master.wait_log(r"worker kernel-pool spawned")
    path = runtime_dir / "kidle.kernels"
    assert (os.stat(path).st_mode & 0o777) == 0o600
    pid, kind, body = _call(path, LENGTH.pack(5) + b"junk!")
    assert kind == RAISED and "UnpicklingError" in pickle.loads(body)[1]
    for request in (b"", LENGTH.pack(1 << 40), LENGTH.pack(10) + b"short"):
        with socket.socket(socket.AF_UNIX) as sock:  # sends this much, then hangs up
            sock.connect(str(path))
            sock.recv(PID.size, socket.MSG_WAITALL)
            sock.sendall(request)
    good = LENGTH.pack(len(p := pickle.dumps((kernels.whoami, (3,))))) + p
    assert _call(path, good) == (pid, RAN, pickle.dumps((pid, master.pid, 6), protocol=5))
    assert _pool_pids(master) == [pid]


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel-workers", "-1"], "Invalid value for '--kernel-workers': -1 is not in the "
                                 "range 0<=x<=1024."),
    (["--fleet", "fleets.kernels:not_a_count"], "fleet 'kcount': kernel_workers must be an "
                                                "integer >= 0 and at most 1024, got '2'"),
    (["--fleet", "fleets.kernels:clash"], "fleet 'kclash': worker 'kernel-pool' has the "
                                          "name of the kernel pool's processes; rename it"),
])
def test_bad_pool_settings_are_one_line_and_exit_2(events: Events, runtime_dir: Path,
                                                   args: list[str], message: str) -> None:
    if "--fleet" not in args:
        args = ["--fleet", "fleets.kernels:basic_fleet", *args]
    result = subprocess.run([sys.executable, "-m", "prefork", "run", *args],
                            capture_output=True, text=True, timeout=30,
                            env=master_env(events, runtime_dir))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"prefork: error: {message}"]
