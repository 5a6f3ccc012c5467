"""A Dask scheduler and workers on 127.0.0.1, started by a test as subprocesses (Dask's own
``dask scheduler`` and ``dask worker``), waited for through their log lines, never by
sleeping."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
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


def start_scheduler(port: int = 0) -> tuple[DaskProcess, str]:
    scheduler = DaskProcess(["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", str(port), "--no-dashboard"])
    address = scheduler.wait_log(r"Scheduler at:\s+(tcp://\S+)").group(1)
    return scheduler, address


def start_worker(address: str) -> DaskProcess:
    """One Dask worker with one thread and no nanny, registered with ``address``."""
    worker = DaskProcess(["distributed.cli.dask_worker", address, "--no-nanny",
                          "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"])
    worker.wait_log(r"Registered to:")
    return worker
