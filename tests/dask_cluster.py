"""A Dask scheduler and workers on 127.0.0.1, started by a test as subprocesses: the
scheduler (``fleets.dask_scheduler``) says its address on stdout once it listens; Dask's own
``dask worker`` is waited for through its log lines. Never by sleeping."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from conftest import WAIT, LineReader

TESTS = Path(__file__).resolve().parent


class DaskProcess:
    """One Dask process, its stderr read line by line as it comes."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(TESTS)}  # the kernels' modules
        self.proc = subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     env=env, start_new_session=True)
        assert self.proc.stderr is not None
        os.set_blocking(self.proc.stderr.fileno(), False)
        self._lines = LineReader(self.proc.stderr.fileno())
        self.lines: list[str] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_log(self, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for line in self.lines[seen:]:
                if (found := re.search(pattern, line)) is not None:
                    return found
            seen = len(self.lines)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._lines.eof:
                raise AssertionError(f"no {pattern!r} in: {self.lines}")
            self.lines.extend(b.decode(errors="replace") for b in self._lines.read(remaining))

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        assert self.proc.stderr is not None
        self.proc.stderr.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Scheduler:
    proc: subprocess.Popen[bytes]
    address: str

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def start_scheduler(tmp_path: Path, port: int = 0) -> Scheduler:
    """A scheduler on 127.0.0.1:``port``; returns once it listens (it prints its address)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    with open(tmp_path / f"scheduler-{time.monotonic_ns()}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "fleets.dask_scheduler", str(port)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=log, env=env)
    assert proc.stdout is not None
    reader = LineReader(proc.stdout.fileno())
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not reader.eof:
        for line in reader.read(deadline - time.monotonic()):
            if line.startswith(b"tcp://"):
                return Scheduler(proc, line.decode().strip())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    raise AssertionError("the scheduler did not say its address")


def start_worker(address: str) -> DaskProcess:
    """One Dask worker with one thread and no nanny, registered with ``address``."""
    worker = DaskProcess(["distributed.cli.dask_worker", address, "--no-nanny",
                          "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"])
    worker.wait_log(r"Registered to:")
    return worker
