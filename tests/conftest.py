"""Test harness: real masters in subprocesses, and waiting on events instead of sleeping.

- ``events``: a FIFO that workers write JSON lines to (``fleets.common.emit``); the test
  blocks in ``select()`` on it until the event it wants arrives.
- ``start_master``: ``python -m prefork run ...`` with its stderr read line by line, also
  through ``select()``, so a test can wait for a log line.
- This pytest process is a child subreaper: a worker orphaned by its master is re-parented
  here, so the autouse ``no_leftover_processes`` check finds any worker, live or zombie,
  that outlived its test.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

TESTS = Path(__file__).resolve().parent
WAIT = 20.0  # generous: a loaded 2-core CI machine must never make a wait time out

_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Started as a shell's background job (`make test &`, a CI runner's nohup), pytest
    # inherits SIGINT ignored, and every master it execs would too: masters and workers
    # keep an ignored SIGINT on purpose, so the Ctrl-C tests would find no Ctrl-C. A
    # handler is reset to the default by exec, where an ignored signal is not.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


class LineReader:
    """Complete lines from a descriptor, as they arrive, waiting in ``select()``."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.eof = False
        self._partial = b""

    def read(self, timeout: float) -> list[bytes]:
        """Wait up to ``timeout`` for data; return the lines it completed (maybe none)."""
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        try:
            chunk = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        if not chunk:
            self.eof = True
            return []
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        return lines


class Events:
    """Lines of JSON that workers write to a FIFO, read as they come."""

    def __init__(self, path: Path) -> None:
        os.mkfifo(path)
        self.path = path
        self._r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # Our own writer keeps the FIFO from reporting EOF whenever no worker has it open.
        self._keep = os.open(path, os.O_WRONLY)
        self._lines = LineReader(self._r)
        self.seen: list[dict] = []

    def wait(self, predicate: Callable[[dict], bool], timeout: float = WAIT,
             what: str = "event") -> dict:
        """Return the first event (old or new) matching ``predicate``."""
        start = len(self.seen)
        for event in self.seen:
            if predicate(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            for event in self.seen[start:]:
                if predicate(event):
                    return event
            start = len(self.seen)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; events: {self.seen}")
            self._read(remaining)

    def wait_kind(self, kind: str, count: int = 1, timeout: float = WAIT,
                  **match: object) -> list[dict]:
        """Wait until ``count`` events of ``kind`` (with the given fields) have arrived."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(kind, **match)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {count} x {kind} {match}; "
                                     f"events: {self.seen}")
            self._read(remaining)

    def of(self, kind: str, **match: object) -> list[dict]:
        return [e for e in self.seen
                if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())]

    def drain(self) -> None:
        """Read whatever has already been written, without waiting."""
        self._read(0)

    def _read(self, timeout: float) -> None:
        self.seen.extend(json.loads(line) for line in self._lines.read(timeout) if line)

    def close(self) -> None:
        os.close(self._r)
        os.close(self._keep)


@dataclass
class MasterProcess:
    proc: subprocess.Popen[bytes]
    events: Events
    lines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.proc.stderr is not None
        self._stderr = LineReader(self.proc.stderr.fileno())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_log(self, pattern: str, timeout: float = WAIT, count: int = 1) -> re.Match[str]:
        """Wait for the ``count``-th stderr line matching ``pattern``; return its match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            matches = [m for m in map(regex.search, self.lines) if m]
            if len(matches) >= count:
                return matches[count - 1]
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._stderr.eof and not self._read(0)):
                raise AssertionError(f"no {count} x {pattern!r} in master's log:\n{self.log}")
            self._read(remaining)

    def log_matches(self, pattern: str) -> list[re.Match[str]]:
        self._read(0)
        return [m for m in map(re.compile(pattern).search, self.lines) if m]

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to ``timeout``); True if a line arrived."""
        lines = self._stderr.read(timeout)
        self.lines.extend(line.decode(errors="replace") for line in lines)
        return bool(lines)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = WAIT) -> int:
        """Wait for the master to exit, reading all of its log; return its exit code."""
        deadline = time.monotonic() + timeout
        while not self._stderr.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"master did not close stderr in {timeout}s:\n{self.log}")
            self._read(remaining)
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def workers(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children()

    def close(self) -> None:
        """Kill the master if the test left it running, reap it, close its stderr."""
        if self.proc.poll() is None:
            try:
                workers = [p.pid for p in self.workers()]
            except psutil.Error:
                workers = []
            self.proc.kill()
            self.proc.wait()
            # PR_SET_PDEATHSIG kills them, but not before kill() returns: without this the
            # leftover check could find one still dying and blame the test for it.
            wait_gone(workers)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def runtime_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def events(tmp_path: Path) -> Iterator[Events]:
    channel = Events(tmp_path / "events.fifo")
    yield channel
    channel.close()


def master_env(events: Events, runtime_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    env["PREFORK_TEST_EVENTS"] = str(events.path)
    env["PREFORK_RUNTIME_DIR"] = str(runtime_dir)
    env.pop("JOURNAL_STREAM", None)
    env.update(extra)
    return env


@pytest.fixture
def start_master(events: Events, runtime_dir: Path, tmp_path: Path
                 ) -> Iterator[Callable[..., MasterProcess]]:
    """Start ``prefork run --fleet FLEET ARGS...`` in a subprocess; kill it after the test."""
    started: list[MasterProcess] = []

    def start(fleet: str, *args: str, new_session: bool = False,
              env: dict[str, str] | None = None) -> MasterProcess:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork", "run", "--fleet", fleet, *args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env or master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path)),
            start_new_session=new_session,
        )
        master = MasterProcess(proc, events)
        started.append(master)
        return master

    yield start
    for master in started:
        master.close()


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail a test that leaves any descendant behind, alive or as a zombie."""
    yield
    leftovers = []
    for child in psutil.Process().children(recursive=True):
        try:
            leftovers.append(f"{child.pid} {child.status()} {' '.join(child.cmdline())}")
            child.kill()
        except psutil.NoSuchProcess:
            continue
    while True:  # reap what was re-parented to us, so one test's mess stays its own
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    assert not leftovers, f"processes outlived the test: {leftovers}"


def wait_gone(pids: list[int], timeout: float = WAIT) -> list[int]:
    """Wait until none of ``pids`` runs (zombies count as gone); return those still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + timeout
    try:
        while fds:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            ready, _, _ = select.select(list(fds), [], [], remaining)
            for fd in ready:
                fds.pop(fd)
                os.close(fd)
        return sorted(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def cli_in_child(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``prefork ARGS`` as a forked child of this test process runs it, to its exit: the
    CLI's own entry point, its exit code and its stdout and stderr, for checks of what it
    answers to bad input. Not a fresh interpreter (tests that need one start ``python -m
    prefork``): it saves the 0.3 s an interpreter and prefork's imports take each time."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 70
        try:
            os.close(out_r)
            os.close(err_r)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - the child's end
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.environ.clear()
            os.environ.update(env)
            from prefork.cli import main

            main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int | None):
                sys.stderr.write(f"{exc.code}\n")
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code)
    os.close(out_w)
    os.close(err_w)
    output = {out_r: bytearray(), err_r: bytearray()}
    reading = [out_r, err_r]
    deadline = time.monotonic() + WAIT
    while reading:
        readable, _, _ = select.select(reading, [], [], max(0.0, deadline - time.monotonic()))
        if not readable:  # it hangs: the test fails on its output, nothing is left behind
            os.kill(pid, signal.SIGKILL)
            break
        for fd in readable:
            data = os.read(fd, 65536)
            if data:
                output[fd] += data
            else:
                reading.remove(fd)
    os.close(out_r)
    os.close(err_r)
    _, status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(["prefork", *args], os.waitstatus_to_exitcode(status),
                                       output[out_r].decode(), output[err_r].decode())
