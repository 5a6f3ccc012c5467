"""Benchmarks of the prefork master, run side by side by ``make bench``.

With no arguments this is the driver: it runs every benchmark, each in a fresh
interpreter (``bench_master.py --case NAME``, which prints one line of JSON), and writes
``master-bench.json`` (raw numbers) and ``master-bench.md`` (a dated table) next to
itself, and ``metrics-bench.json``/``.md`` for what the metrics exporter costs the master
(each file only when one of its cases ran: ``--only`` leaves the other alone). A master
installs signal handlers and forks, so no two masters ever share an interpreter: a case
either is the master itself, or is a probe that starts masters as ``bench_master.py
--master`` subprocesses and measures them from outside.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the
machine), so a worker's timestamp and its master's can be subtracted. Workers report
to a probe pipe that they inherit: each record is ``(kind, pid, time)`` packed into 16
bytes, under PIPE_BUF, so every write is atomic. Targets come from the issue; results are
reported against them, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib
import importlib.util
import itertools
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from machine import describe_machine

import prefork
from prefork.master import Master, Observer
from prefork.metrics_process import MetricsOptions
from prefork.paths import socket_path

if TYPE_CHECKING:  # annotations only: the bench also runs against older layouts
    from prefork.slot import Slot

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
# Each plan's report: the master's cases, and those of the metrics exporter's cost to the
# master (measured at another time, so they get a file of their own; see REPORTS' titles).
REPORTS = {"master": (HERE / "master-bench.json", HERE / "master-bench.md"),
           "metrics": (HERE / "metrics-bench.json", HERE / "metrics-bench.md")}

# The floor: what `prefork run --fleet cpu` imports before it forks (the cpu fleet's models,
# loops and db modules, with SQLModel, SQLAlchemy, pydantic and aiosqlite), so that this
# bench and `make measure` weigh the same master.
FLOOR = "prefork_workers.cpu.fleet"

# Probe records: what happened, in which process, when (CLOCK_MONOTONIC seconds).
RECORD = struct.Struct("=iid")
ENTRY, DIED, RUN_START, FIRST_FORK, READY, HELD = range(6)

Json = dict[str, Any]

# Set in the master before run(); every forked worker inherits it.
_probe_fd = -1
_forks = 0  # bumped by the crash benchmark's observer at "forking": a child sees its number


# -- workers (they run in forked children) -----------------------------------------------


def _report(kind: int, when: float) -> None:
    os.write(_probe_fd, RECORD.pack(kind, os.getpid(), when))


def entry_then_pause() -> None:
    """Report the first line's time, then sleep until a signal (SIGTERM kills: default)."""
    _report(ENTRY, time.monotonic())
    while True:
        signal.pause()


def entry_then_exit() -> None:
    """Report the first line's time, linger 10 ms (the next fork finds an idle master),
    then exit 0 so ``restart="always"`` forks the next sample."""
    _report(ENTRY, time.monotonic())
    time.sleep(0.010)


def crash_after_a_moment() -> None:
    """Sleep 2-8 ms, so the master is asleep in select(), then report the time and die:
    by SIGKILL in even-numbered children, by ``os._exit(1)`` in odd ones."""
    time.sleep(random.SystemRandom().uniform(0.002, 0.008))
    killed = _forks % 2 == 0
    _report(DIED, time.monotonic())
    if killed:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(1)


def exit_at_once() -> None:
    """The flapping worker of the churn benchmark."""
    os._exit(1)


# -- helpers --------------------------------------------------------------------------


def quiet_logging() -> None:
    """Only errors: at WARNING every crash would still log a line (10,000 in the churn
    benchmark), through logging's last-resort stderr handler."""
    logging.getLogger("prefork").setLevel(logging.ERROR)


def load_floor(enabled: bool) -> Json:
    """Import the cpu fleet (``FLOOR``) into this (master) process if ``enabled``; returns
    its import time and table count, and this process's RSS afterwards."""
    if not enabled:
        return {"floor": False, "rss_kib_before_run": vm_kib("self", "VmRSS")}
    started = time.perf_counter()
    importlib.import_module(FLOOR)
    took = time.perf_counter() - started
    # Already imported by FLOOR (the fleet's floor module): a dictionary look-up, untimed.
    models = importlib.import_module("prefork_workers.cpu.models")
    return {
        "floor": True,
        "floor_module": FLOOR,
        "floor_import_ms": took * 1000,
        "floor_tables": len(models.TABLES),
        "rss_kib_before_run": vm_kib("self", "VmRSS"),
    }


def vm_kib(pid: int | str, field: str) -> int:
    """A ``kB`` field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def context_switches(pid: int) -> tuple[int, int]:
    """Voluntary and involuntary context switches of every thread of ``pid``."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def fleet_of(target: Callable[[], object], replicas: int, *, restart: str = "on-failure",
             immediate: bool = False) -> prefork.Fleet:
    """One worker with ``replicas``; ``immediate`` restarts at once and never gives up."""
    backoff = prefork.Backoff(initial=0.0, factor=1.0, jitter=0.0) if immediate else None
    start_limit = prefork.StartLimit(interval=0) if immediate else None
    return prefork.Fleet(
        "bench",
        [prefork.Worker("w", target, replicas=replicas)],
        restart=restart,  # type: ignore[arg-type]
        backoff=backoff or prefork.Backoff(),
        start_limit=start_limit or prefork.StartLimit(),
    )


@contextlib.contextmanager
def private_runtime_dir() -> Iterator[Path]:
    """A fresh 0700 directory of ours for the fleet lock."""
    path = Path(tempfile.mkdtemp(prefix="prefork-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_master(fleet: prefork.Fleet, observer: Observer, *, grace: float = 5.0,
               before_run: Callable[[], None] | None = None,
               metrics_port: int | None = None, runtime_dir: Path | None = None,
               setup: Callable[[Master], None] | None = None) -> int:
    """Run a master for ``fleet`` in this process until it stops; with ``metrics_port``,
    with its metrics exporter on 127.0.0.1:PORT. ``setup`` sees the master before run()."""
    metrics = None if metrics_port is None else MetricsOptions(listen=(LOOPBACK, metrics_port))
    with contextlib.ExitStack() as stack:
        if runtime_dir is None:
            runtime_dir = stack.enter_context(private_runtime_dir())
        master = prefork.Master(fleet, grace=grace, runtime_dir=runtime_dir,
                                observer=observer, metrics=metrics)
        if setup is not None:
            setup(master)
        if before_run is not None:
            before_run()
        return master.run()


def stop_self() -> None:
    """Ask the master running in this process to stop, as systemd would."""
    os.kill(os.getpid(), signal.SIGTERM)


def read_records(fd: int, timeout: float = 0.0) -> list[tuple[int, int, float]]:
    """The records in the probe pipe ``fd``: waits up to ``timeout`` for any to arrive,
    then returns those read so far, always whole ones."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) % RECORD.size == 0:
            break
    if len(data) % RECORD.size:  # a record is written whole; finish a split read
        data += os.read(fd, RECORD.size - len(data) % RECORD.size)
    return [RECORD.unpack_from(data, i) for i in range(0, len(data), RECORD.size)]


def summarize(values: list[float]) -> Json:
    """n, median, p95, p99 (linear interpolation), min, max, mean of ``values``."""
    ordered = sorted(values)
    if not ordered:
        return {"n": 0}
    return {
        "n": len(ordered),
        "median": statistics.median(ordered),
        "p95": percentile(ordered, 95),
        "p99": percentile(ordered, 99),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


def percentile(ordered: list[float], q: float) -> float:
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- metrics: the exporter's port, a scraper, the master's share of a status request ---

LOOPBACK = "127.0.0.1"


def need_metrics_extra() -> None:
    """The exporter a master spawns imports prometheus_client: without it every case with
    metrics would time out, so say so at once."""
    if importlib.util.find_spec("prometheus_client") is None:
        raise SystemExit("bench: the metrics cases need prometheus-client: "
                         "pip install -e '.[metrics]' (make bench does)")


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now, for a master's --metrics
    (the probe must know it before the master binds it; the master sets SO_REUSEADDR)."""
    with socket.socket() as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


class Scraper:
    """A thread of the probe that GETs ``/metrics`` in a loop, one request after another,
    from start() to stop(). Refused connections (the master not listening yet, or gone)
    are retried after 5 ms and counted apart. Keeps the distinct readings it saw (the
    values of ``prefork_reading_timestamp_seconds``): each is one status request to the
    master."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.ok = 0
        self.up = 0  # scrapes that said prefork_up 1
        self.refused = 0
        self.failed = 0
        self.first_ok: float | None = None
        self.last_ok: float | None = None
        self.scrape_ms: list[float] = []
        self.readings: set[float] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="scraper", daemon=True)

    def start(self) -> Scraper:
        self._thread.start()
        return self

    def stop(self) -> Json:
        self._stop.set()
        self._thread.join(15)
        window = ((self.last_ok or 0.0) - (self.first_ok or 0.0)) if self.ok > 1 else 0.0
        at = sorted(self.readings)
        return {"scrapes": self.ok, "up": self.up, "refused": self.refused,
                "failed": self.failed, "window_s": window,
                "scrapes_per_s": (self.ok - 1) / window if window else 0.0,
                "readings": len(at), "reading_gaps_s": [b - a for a, b in itertools.pairwise(at)],
                "scrape_ms": summarize(self.scrape_ms)}

    def scrape(self) -> bytes:
        """One GET /metrics; the body. Raises OSError or http.client's errors."""
        conn = http.client.HTTPConnection(LOOPBACK, self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise http.client.HTTPException(f"HTTP {response.status}")
            return body
        finally:
            conn.close()

    def _loop(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                body = self.scrape()
            except ConnectionRefusedError:
                self.refused += 1
                self._stop.wait(0.005)
                continue
            except (OSError, http.client.HTTPException):
                self.failed += 1
                self._stop.wait(0.005)
                continue
            now = time.monotonic()
            self.ok += 1
            self.first_ok = self.first_ok or now
            self.last_ok = now
            self.scrape_ms.append((now - began) * 1000)
            for line in body.splitlines():
                if line.startswith(b"prefork_up{") and line.endswith(b" 1.0"):
                    self.up += 1
                elif line.startswith(b"prefork_reading_timestamp_seconds{"):
                    self.readings.add(float(line.rsplit(b" ", 1)[1]))


def time_control(master: Master) -> None:
    """Make the master report how long each call of its control server's ``handle()``
    (accept, read, status, JSON, send: what a status request holds the loop for) took,
    as a HELD record whose time is the duration. The bench reaches into the master here:
    nothing public times the control socket, and this wraps it without changing it."""
    control = master._control
    assert control is not None
    handle = control.handle

    def timed(fd: int) -> None:
        began = time.perf_counter()
        handle(fd)
        _report(HELD, time.perf_counter() - began)

    control.handle = timed  # type: ignore[method-assign]


def cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid``'s threads have run on a CPU (/proc/PID/task/*/schedstat): read
    from outside, so it does not wake the process."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir())


def exporter_of(master_pid: int) -> int | None:
    """The pid of ``master_pid``'s metrics exporter (its child ``-m prefork metrics``)."""
    for task in Path(f"/proc/{master_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
                if b"prefork" in argv and b"metrics" in argv:
                    return int(child)
    return None


# -- probed masters: `--master` runs one, a probe measures it from outside ---------------


def master_main(workers: int, probe_fd: int, floor: bool, *, metrics_port: int | None = None,
                runtime_dir: Path | None = None, timed_control: bool = False) -> Json:
    """The process a probe starts: ``workers`` pausing workers under one master.

    Reports RUN_START just before ``Master.run()``, FIRST_FORK and READY from the observer
    to the probe pipe; prints its own timestamps as JSON once ``run()`` has returned.
    ``metrics_port``: with the metrics exporter there; ``runtime_dir``: its control socket's
    directory (the probe's); ``timed_control``: HELD records (:func:`time_control`).
    """
    global _probe_fd
    _probe_fd = probe_fd
    info = load_floor(floor)
    marks: dict[str, float] = {}

    def observer(event: str, _slot: Slot | None, now: float) -> None:
        if event == "forking" and "first_fork" not in marks:
            marks["first_fork"] = now
            _report(FIRST_FORK, now)
        elif event == "ready":
            marks["ready"] = now
            _report(READY, now)
        elif event == "stopping":
            marks["stopping"] = now

    def before_run() -> None:
        marks["run_start"] = time.monotonic()
        _report(RUN_START, marks["run_start"])

    rc = run_master(fleet_of(entry_then_pause, workers), observer, before_run=before_run,
                    metrics_port=metrics_port, runtime_dir=runtime_dir,
                    setup=time_control if timed_control else None)
    marks["run_returned"] = time.monotonic()
    return {"rc": rc, **marks, **info}


@dataclass
class ProbedMaster:
    """A ``--master`` subprocess and the read end of its probe pipe."""

    proc: subprocess.Popen[str]
    probe: int
    pidfd: int

    @classmethod
    def start(cls, workers: int, floor: bool, *, metrics_port: int | None = None,
              runtime_dir: Path | None = None, timed_control: bool = False) -> ProbedMaster:
        read_end, write_end = os.pipe()
        extra = [] if metrics_port is None else ["--metrics-port", str(metrics_port)]
        if runtime_dir is not None:
            extra += ["--runtime-dir", str(runtime_dir)]
        if timed_control:
            extra.append("--timed-control")
        proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--master", "--workers", str(workers),
             "--probe-fd", str(write_end), "--floor" if floor else "--no-floor", *extra],
            pass_fds=(write_end,), stdout=subprocess.PIPE, text=True,
        )
        os.close(write_end)
        return cls(proc, read_end, os.pidfd_open(proc.pid))

    def collect(self, wanted: dict[int, int], timeout: float) -> list[tuple[int, int, float]]:
        """Read probe records until ``wanted[kind]`` of each kind have come."""
        records: list[tuple[int, int, float]] = []
        deadline = time.monotonic() + timeout
        while any(sum(1 for r in records if r[0] == k) < n for k, n in wanted.items()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise TimeoutError(f"probe: got {len(records)} records, wanted {wanted}")
            records += read_records(self.probe, remaining)
        return records

    def stop(self, timeout: float = 30.0) -> tuple[float, float, Json]:
        """SIGTERM the master; return when it was sent, when the process ended (its pidfd
        turned readable: exact, no polling) and the JSON the master printed."""
        sent = time.monotonic()
        os.kill(self.proc.pid, signal.SIGTERM)
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        ended = time.monotonic()
        if not ready:
            self.kill()
            raise TimeoutError(f"master {self.proc.pid} still running {timeout}s after SIGTERM")
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        rc = self.proc.wait()
        self.close()
        if rc != 0:
            raise RuntimeError(f"master exited {rc}")
        return sent, ended, json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.close()

    def close(self) -> None:
        for fd in (self.probe, self.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- the cases ------------------------------------------------------------------------


def case_crash(samples: int, floor: bool, *, metrics_port: int | None = None,
               warmup: float = 0.0) -> Json:
    """(a) Crash to noticed: a worker stamps the time just before it dies (SIGKILL or
    ``os._exit(1)``, alternately); the observer's ``now`` at "exited" is when the master
    noticed. One worker, restarted at once, so samples never overlap. ``metrics_port``:
    with the metrics exporter on it (:func:`case_crash_scraped` scrapes it); deaths in the
    first ``warmup`` seconds of run() are not counted (the exporter is still starting)."""
    global _probe_fd
    info = load_floor(floor)
    read_end, _probe_fd = os.pipe()
    os.set_blocking(read_end, False)
    latencies: dict[str, list[float]] = {"SIGKILL": [], "_exit": []}
    stopping = False

    def observer(event: str, _slot: Slot | None, now: float) -> None:
        global _forks
        nonlocal stopping
        if event == "forking":
            _forks += 1
        elif event == "exited" and not stopping:
            try:
                kind, _pid, died = RECORD.unpack(os.read(read_end, RECORD.size))
            except BlockingIOError:
                return  # died before reporting (not ours to time)
            assert kind == DIED
            if died < counting_from:
                return
            # The child that just died was fork number _forks; even ones were SIGKILLed.
            latencies["SIGKILL" if _forks % 2 == 0 else "_exit"].append((now - died) * 1000)
            if sum(map(len, latencies.values())) >= samples:
                stopping = True
                stop_self()

    counting_from = time.monotonic() + warmup
    rc = run_master(fleet_of(crash_after_a_moment, 1, immediate=True), observer,
                    metrics_port=metrics_port)
    every = latencies["SIGKILL"] + latencies["_exit"]
    baseline = kernel_exit_baseline(read_end, max(20, samples // 4))
    return {"rc": rc, **info, "latency_ms": summarize(every), "counting_from": counting_from,
            "metrics": metrics_port is not None,
            "by_death": {k: summarize(v) for k, v in latencies.items()},
            "kernel_baseline_ms": summarize(baseline),
            "samples_ms": every, "kernel_baseline_samples_ms": baseline}


def kernel_exit_baseline(read_end: int, samples: int) -> list[float]:
    """The kernel's share of crash-to-noticed, without prefork: from the same process
    (same size, same floor) after its master returned, fork a child that dies like the
    crash worker and wait for it on a pidfd, which turns readable once the child has
    exited (its memory torn down, SIGCHLD sent). Only a master that spins could beat it."""
    global _forks
    latencies: list[float] = []
    os.set_blocking(read_end, True)
    for _ in range(samples):
        _forks += 1
        pid = os.fork()
        if pid == 0:
            try:
                crash_after_a_moment()
            finally:
                os._exit(1)
        pidfd = os.pidfd_open(pid)
        select.select([pidfd], [], [])
        now = time.monotonic()
        os.close(pidfd)
        os.waitpid(pid, 0)
        _kind, _pid, died = RECORD.unpack(os.read(read_end, RECORD.size))
        latencies.append((now - died) * 1000)
    return latencies


def case_fork(samples: int, floor: bool) -> Json:
    """(b) Fork to worker entry (the issue's case has the floor imported): the observer's
    time at "forking" against the time on the worker's first line, matched by pid. One
    worker with ``restart="always"`` that exits 10 ms after its entry, so forks happen one
    at a time."""
    global _probe_fd
    info = load_floor(floor)
    read_end, _probe_fd = os.pipe()
    forking: dict[str, float] = {}
    fork_at: dict[int, float] = {}
    spawned_ms: list[float] = []
    exits = 0

    def observer(event: str, slot: Slot | None, now: float) -> None:
        nonlocal exits
        if event == "forking":
            forking["last"] = now
        elif event == "spawned" and slot is not None and slot.pid is not None:
            fork_at[slot.pid] = forking["last"]
            spawned_ms.append((now - forking["last"]) * 1000)
        elif event == "exited":
            exits += 1
            if exits == samples:
                stop_self()

    rc = run_master(fleet_of(entry_then_exit, 1, restart="always", immediate=True), observer)
    entries = {pid: t for kind, pid, t in read_records(read_end) if kind == ENTRY}
    latencies = [(entries[pid] - t) * 1000 for pid, t in fork_at.items() if pid in entries]
    latencies = latencies[:samples]
    baseline = bare_fork_baseline(read_end, max(20, samples // 2))
    return {"rc": rc, **info, "latency_ms": summarize(latencies),
            "master_side_ms": summarize(spawned_ms[:samples]),
            "bare_fork_baseline_ms": summarize(baseline),
            "samples_ms": latencies, "bare_fork_baseline_samples_ms": baseline}


def bare_fork_baseline(read_end: int, samples: int) -> list[float]:
    """What ``os.fork()`` alone costs this process (same floor, gc already frozen by the
    master that ran here): from just before the call to the child's first line, with no
    prefork in between. The rest of fork-to-entry is prefork's child setup."""
    latencies: list[float] = []
    for _ in range(samples):
        before = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _report(ENTRY, time.monotonic())
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.005)
        _kind, _pid, entered = read_records(read_end, timeout=5)[0]
        latencies.append((entered - before) * 1000)
    return latencies


def case_fresh(samples: int, warmup: int = 1) -> Json:
    """(b) What a systemd unit per worker pays: from just before ``Popen`` of a fresh
    interpreter to the moment it has imported the floor, ``FLOOR`` (it prints
    time.monotonic()); ``prefork probe``'s baseline interpreters import the same module.
    The first ``warmup`` runs are not counted. A deployed service has its .pyc files, so
    PYTHONDONTWRITEBYTECODE is dropped: the warm-up writes the fleet's (``__pycache__`` is
    git-ignored) and the measured runs load them, as they load site-packages' own."""
    code = f"import {FLOOR}, time; print(time.monotonic(), flush=True)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    latencies: list[float] = []
    for i in range(warmup + samples):
        before = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-c", code], env=env,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        imported = float(proc.stdout.readline())
        proc.wait()
        if i >= warmup:
            latencies.append((imported - before) * 1000)
    return {"latency_ms": summarize(latencies), "samples_ms": latencies,
            "python": sys.executable}


def case_idle(seconds: float, workers: int = 8, settle: float = 3.0,
              metrics: bool = False) -> Json:
    """(c) Idle wake-ups: the kernel's count of the master's context switches
    (voluntary + involuntary, all threads, from /proc/PID/task/*/status) over ``seconds``
    with ``workers`` healthy pausing workers, starting ``settle`` s after all reported in.
    ``metrics``: with the metrics exporter running and never scraped; its own context
    switches are counted too (apart: they are not the master's)."""
    if metrics:
        need_metrics_extra()
    master = ProbedMaster.start(workers, floor=True,
                                metrics_port=free_port() if metrics else None)
    master.collect({ENTRY: workers}, timeout=60)
    exporter = None
    deadline = time.monotonic() + 10
    while metrics and exporter is None and time.monotonic() < deadline:
        exporter = exporter_of(master.proc.pid)
        time.sleep(0.05)
    if metrics and exporter is None:
        master.kill()
        raise RuntimeError("the master started no metrics exporter within 10 s")
    time.sleep(settle)
    exporter_first = None if exporter is None else context_switches(exporter)
    threads = len(list(Path(f"/proc/{master.proc.pid}/task").iterdir()))
    start = time.monotonic()
    first = context_switches(master.proc.pid)
    per_second: list[int] = []
    previous = sum(first)
    for tick in range(1, int(seconds) + 1):
        time.sleep(max(0.0, start + tick - time.monotonic()))
        now = sum(context_switches(master.proc.pid))
        per_second.append(now - previous)
        previous = now
    last = context_switches(master.proc.pid)
    elapsed = time.monotonic() - start
    exporter_switches = None
    if exporter is not None and exporter_first is not None:
        exporter_switches = sum(context_switches(exporter)) - sum(exporter_first)
    master.stop()
    wakeups = sum(last) - sum(first)
    return {
        "seconds": elapsed, "workers": workers, "master_threads": threads, "metrics": metrics,
        "exporter_switches": exporter_switches,
        "voluntary": last[0] - first[0], "involuntary": last[1] - first[1],
        "wakeups": wakeups, "wakeups_per_s": wakeups / elapsed,
        "per_second": per_second,
    }


def case_crash_scraped(rounds: int, samples: int, floor: bool, warmup: float = 1.5) -> Json:
    """(g) Crash to noticed with the metrics exporter on and scraped in a tight loop,
    against the same case without metrics, alternately: ``rounds`` pairs of ``--case
    crash`` runs (fresh interpreters; the order flips every round, so drift on a busy
    machine falls on both), ``samples`` deaths each. In the scraped runs a thread of this
    probe (never the master) GETs /metrics one request after another for the whole run.
    Both variants skip the deaths of the first ``warmup`` s, while the exporter starts."""
    need_metrics_extra()
    runs: dict[str, list[Json]] = {"off": [], "on": []}
    scraped: list[Json] = []
    for index in range(rounds):
        for variant in ("off", "on") if index % 2 == 0 else ("on", "off"):
            argv = [sys.executable, str(SCRIPT), "--case", "crash",
                    "--floor" if floor else "--no-floor", "--samples", str(samples),
                    "--warmup", str(warmup)]
            scraper = None
            if variant == "on":
                port = free_port()
                argv += ["--metrics-port", str(port)]
                scraper = Scraper(port).start()
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                  check=False)
            counts = None if scraper is None else scraper.stop()
            if proc.returncode != 0:
                raise RuntimeError(f"crash run ({variant}) exited {proc.returncode}: "
                                   f"{proc.stderr[-2000:]}")
            case = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[variant].append(case)
            if scraper is not None and counts is not None:
                # Negative: the scraper was served before the first counted death.
                counts["first_scrape_after_counting_s"] = (
                    None if scraper.first_ok is None else scraper.first_ok - case["counting_from"])
                scraped.append(counts)
    out: Json = {"rounds": rounds, "samples_per_run": samples, "warmup_s": warmup,
                 "floor": floor}
    for variant, cases in runs.items():
        every = [x for c in cases for x in c["samples_ms"]]
        kernel = [x for c in cases for x in c["kernel_baseline_samples_ms"]]
        out[variant] = {"latency_ms": summarize(every), "kernel_baseline_ms": summarize(kernel),
                        "run_medians_ms": [c["latency_ms"]["median"] for c in cases],
                        "samples_ms": every}
    off, on = out["off"]["latency_ms"], out["on"]["latency_ms"]
    out["ratio_median"] = on["median"] / off["median"]
    out["ratio_p95"] = on["p95"] / off["p95"]
    out["scraper"] = {
        "runs": scraped,
        "scrapes": sum(c["scrapes"] for c in scraped),
        "failed": sum(c["failed"] for c in scraped),
        "scrapes_per_s": statistics.median(c["scrapes_per_s"] for c in scraped),
        "readings": sum(c["readings"] for c in scraped),
        "reading_gap_s": summarize([g for c in scraped for g in c["reading_gaps_s"]]),
        "scrape_ms_median": statistics.median(c["scrape_ms"]["median"] for c in scraped),
        "first_scrape_after_counting_s": max(c["first_scrape_after_counting_s"] or 0.0
                                             for c in scraped),
    }
    return out


def status_round_trip(path: Path) -> tuple[float, bytes]:
    """One status request on the control socket at ``path``, by hand (not prefork.client,
    which also parses the reply): the milliseconds from connect to the reply's newline,
    and the reply line."""
    began = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        sock.sendall(b'{"command": "status"}\n')
        data = bytearray()
        while not data.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return (time.monotonic() - began) * 1000, bytes(data)


def case_status(workers: int, samples: int, scrapes: int = 3) -> Json:
    """(h) What one status request costs the master of ``workers`` sleeping workers (no
    floor, metrics on, nobody scraping): the round trip seen by a client; how long the
    master's control server held its loop (``time_control``: every handle() call of the
    request, summed); the CPU time the master ran for it (schedstat, read from outside,
    including its wake-up and select()). Requests 20 ms apart, one at a time. Then
    ``scrapes`` GET /metrics, each past MIN_INTERVAL so each makes a fresh reading: what a
    scrape takes in the exporter (status plus reading every process's memory from /proc),
    and the master's share of it."""
    need_metrics_extra()
    port = free_port()
    with private_runtime_dir() as runtime_dir:
        master = ProbedMaster.start(workers, floor=False, metrics_port=port,
                                    runtime_dir=runtime_dir, timed_control=True)
        master.collect({ENTRY: workers}, timeout=120)
        time.sleep(1.0)
        pid, path = master.proc.pid, socket_path(runtime_dir, "bench")
        round_trip, held, cpu = [], [], []
        reply = b""
        for _ in range(samples):
            before = cpu_ns(pid)
            took, reply = status_round_trip(path)
            time.sleep(0.020)  # the master closes the connection and sleeps again
            cpu.append((cpu_ns(pid) - before) / 1e6)
            round_trip.append(took)
            held.append(sum(t for kind, _p, t in read_records(master.probe) if kind == HELD)
                        * 1000)
        listed = len(json.loads(reply)["workers"])
        scraper = Scraper(port)
        scraper.scrape()  # the first waits for the exporter to start: not counted
        scrape_ms, scrape_held, body = [], [], b""
        for _ in range(scrapes):
            time.sleep(1.1)  # past MIN_INTERVAL: this scrape makes a reading of its own
            began = time.monotonic()
            body = scraper.scrape()
            scrape_ms.append((time.monotonic() - began) * 1000)
            time.sleep(0.020)
            scrape_held.append(sum(t for kind, _p, t in read_records(master.probe)
                                   if kind == HELD) * 1000)
        master.stop()
    return {"workers": workers, "listed": listed, "reply_bytes": len(reply),
            "round_trip_ms": summarize(round_trip), "held_ms": summarize(held),
            "cpu_ms": summarize(cpu), "scrape_ms": summarize(scrape_ms),
            "scrape_held_ms": summarize(scrape_held), "scrape_bytes": len(body),
            "samples_ms": round_trip, "held_samples_ms": held}


def case_shutdown(runs: int, workers: int, floor: bool) -> Json:
    """(d) Graceful stop: once all ``workers`` (default SIGTERM disposition) reported in,
    SIGTERM the master and time until its process has ended (pidfd readable). Split into
    signal -> "stopping", "stopping" -> run() returned, run() returned -> process gone."""
    totals: list[float] = []
    phases: dict[str, list[float]] = {"to_stopping": [], "reaping": [], "teardown": []}
    for _ in range(runs):
        master = ProbedMaster.start(workers, floor)
        master.collect({ENTRY: workers}, timeout=60)
        time.sleep(0.3)
        sent, ended, marks = master.stop()
        totals.append((ended - sent) * 1000)
        phases["to_stopping"].append((marks["stopping"] - sent) * 1000)
        phases["reaping"].append((marks["run_returned"] - marks["stopping"]) * 1000)
        phases["teardown"].append((ended - marks["run_returned"]) * 1000)
    return {"workers": workers, "floor": floor, "stop_ms": summarize(totals),
            "phases_ms": {k: summarize(v) for k, v in phases.items()}, "samples_ms": totals}


def case_start(runs: int, workers: int, floor: bool) -> Json:
    """(e) Start-up of ``workers``: from just before ``Master.run()`` (and from the first
    "forking") to the last worker's first line, read from the probe pipe."""
    from_run: list[float] = []
    from_fork: list[float] = []
    forked: list[float] = []
    stops: list[float] = []
    for _ in range(runs):
        master = ProbedMaster.start(workers, floor)
        records = master.collect({RUN_START: 1, FIRST_FORK: 1, READY: 1, ENTRY: workers},
                                 timeout=120)
        at = {kind: t for kind, _pid, t in records if kind != ENTRY}
        last_entry = max(t for kind, _pid, t in records if kind == ENTRY)
        from_run.append((last_entry - at[RUN_START]) * 1000)
        from_fork.append((last_entry - at[FIRST_FORK]) * 1000)
        forked.append((at[READY] - at[RUN_START]) * 1000)
        sent, ended, _marks = master.stop()
        stops.append((ended - sent) * 1000)
    return {"workers": workers, "floor": floor, "from_run_ms": summarize(from_run),
            "from_first_fork_ms": summarize(from_fork), "all_forked_ms": summarize(forked),
            "stop_ms": summarize(stops), "samples_ms": from_run}


def case_churn(cycles: int, workers: int, floor: bool, every: int = 1000) -> Json:
    """(f) RSS under churn: ``workers`` that exit at once, restarted with no delay and no
    start limit. Every ``every`` exits the observer reads the master's own VmRSS and
    pymalloc's allocated block count; growth is from exit 1,000 to exit ``cycles``."""
    info = load_floor(floor)
    marks: list[Json] = []
    exits = 0
    started: dict[str, float] = {}

    def observer(event: str, _slot: Slot | None, now: float) -> None:
        nonlocal exits
        if event == "ready":
            started["t"] = now
            marks.append({"exits": 0, "t": 0.0, "rss_kib": vm_kib("self", "VmRSS"),
                          "blocks": sys.getallocatedblocks()})
        elif event == "exited" and exits < cycles:
            exits += 1
            if exits % every == 0:
                marks.append({"exits": exits, "t": now - started["t"],
                              "rss_kib": vm_kib("self", "VmRSS"),
                              "blocks": sys.getallocatedblocks()})
            if exits == cycles:
                stop_self()

    rc = run_master(fleet_of(exit_at_once, workers, immediate=True), observer)
    at = {m["exits"]: m for m in marks}
    first, last = at[every], at[cycles]
    rates = [every / (b["t"] - a["t"]) for a, b in itertools.pairwise(marks)]
    return {
        "rc": rc, **info, "workers": workers, "cycles": cycles, "marks": marks,
        "rss_growth_kib": last["rss_kib"] - first["rss_kib"],
        "blocks_growth": last["blocks"] - first["blocks"],
        "cycles_per_s_first_last": [rates[0], rates[-1]],
        "seconds": last["t"],
    }


def run_case(name: str, args: argparse.Namespace) -> Json:
    quiet_logging()
    if name == "crash":
        return case_crash(args.samples or 200, args.floor, metrics_port=args.metrics_port,
                          warmup=args.warmup or 0.0)
    if name == "fork":
        return case_fork(args.samples or 50, args.floor)
    if name == "fresh":
        return case_fresh(args.samples or 10)
    if name == "idle":
        return case_idle(args.seconds or 30.0, metrics=args.metrics)
    if name == "crash_scraped":
        return case_crash_scraped(args.rounds or 4, args.samples or 300, args.floor)
    if name == "status":
        return case_status(args.workers or 1024, args.samples or 50)
    if name == "shutdown":
        return case_shutdown(args.runs or 7, args.workers or 64, args.floor)
    if name == "start":
        return case_start(args.runs or 5, args.workers or 256, args.floor)
    if name == "churn":
        return case_churn(args.cycles or 10_000, args.workers or 4, args.floor)
    raise SystemExit(f"unknown case {name!r}")


# -- the driver -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One subprocess the driver runs: a key for the results, its arguments, and the
    report (a key of REPORTS) its results go to."""

    key: str
    argv: tuple[str, ...]
    quick_argv: tuple[str, ...]
    report: str = "master"


PLANS: tuple[Plan, ...] = (
    Plan("crash", ("--case", "crash", "--floor", "--samples", "200"),
         ("--case", "crash", "--floor", "--samples", "40")),
    Plan("crash_no_floor", ("--case", "crash", "--no-floor", "--samples", "200"),
         ("--case", "crash", "--no-floor", "--samples", "40")),
    Plan("fork", ("--case", "fork", "--floor", "--samples", "50"),
         ("--case", "fork", "--floor", "--samples", "20")),
    Plan("fork_no_floor", ("--case", "fork", "--no-floor", "--samples", "50"),
         ("--case", "fork", "--no-floor", "--samples", "20")),
    Plan("fresh", ("--case", "fresh", "--samples", "10"), ("--case", "fresh", "--samples", "3")),
    Plan("idle", ("--case", "idle", "--seconds", "30"), ("--case", "idle", "--seconds", "5")),
    Plan("shutdown", ("--case", "shutdown", "--floor", "--runs", "7", "--workers", "64"),
         ("--case", "shutdown", "--floor", "--runs", "2", "--workers", "64")),
    Plan("shutdown_no_floor", ("--case", "shutdown", "--no-floor", "--runs", "5"),
         ("--case", "shutdown", "--no-floor", "--runs", "2")),
    Plan("start", ("--case", "start", "--floor", "--runs", "5", "--workers", "256"),
         ("--case", "start", "--floor", "--runs", "2", "--workers", "256")),
    Plan("start_no_floor", ("--case", "start", "--no-floor", "--runs", "3"),
         ("--case", "start", "--no-floor", "--runs", "1")),
    Plan("churn", ("--case", "churn", "--floor", "--cycles", "10000"),
         ("--case", "churn", "--floor", "--cycles", "2000")),
    # What the metrics exporter costs the master (metrics-bench.md).
    Plan("crash_scraped", ("--case", "crash_scraped", "--floor", "--rounds", "4",
                           "--samples", "300"),
         ("--case", "crash_scraped", "--floor", "--rounds", "2", "--samples", "60"), "metrics"),
    Plan("status_256", ("--case", "status", "--workers", "256", "--samples", "50"),
         ("--case", "status", "--workers", "256", "--samples", "10"), "metrics"),
    Plan("status_1024", ("--case", "status", "--workers", "1024", "--samples", "50"),
         ("--case", "status", "--workers", "1024", "--samples", "10"), "metrics"),
    Plan("idle_metrics", ("--case", "idle", "--metrics", "--seconds", "30"),
         ("--case", "idle", "--metrics", "--seconds", "5"), "metrics"),
)


def environment() -> Json:
    """Where these numbers come from: the machine, and the versions under the floor."""
    return {
        **describe_machine(),
        "prefork": prefork.__version__,
        "packages": {name: metadata.version(name)
                     for name in ("sqlmodel", "sqlalchemy", "pydantic", "psutil")},
    }


def drive(quick: bool, only: list[str] | None) -> int:
    """Run every plan in a fresh interpreter; write the JSON and the Markdown of each
    report that any of them belongs to (only those: ``--only`` leaves the others be)."""
    env = environment()
    reports: dict[str, Json] = {}
    failed = 0
    for plan in PLANS:
        if only and plan.key not in only:
            continue
        results = reports.setdefault(plan.report, {"environment": env, "quick": quick,
                                                   "cases": {}})
        argv = plan.quick_argv if quick else plan.argv
        print(f"bench: {plan.key} ({' '.join(argv)})", file=sys.stderr, flush=True)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True,
                              text=True, timeout=600, check=False)
        took = time.monotonic() - started
        if proc.returncode != 0 or not proc.stdout.strip():
            failed += 1
            results["cases"][plan.key] = {"error": f"exit {proc.returncode}",
                                          "stderr": proc.stderr[-4000:]}
            print(f"bench: {plan.key} FAILED (exit {proc.returncode}):\n{proc.stderr[-4000:]}",
                  file=sys.stderr, flush=True)
            continue
        if proc.stderr.strip():
            print(proc.stderr.rstrip(), file=sys.stderr)
        case = json.loads(proc.stdout.strip().splitlines()[-1])
        case["wall_s"] = took
        results["cases"][plan.key] = case
        print(f"bench: {plan.key} done in {took:.1f}s", file=sys.stderr, flush=True)
    for report, results in reports.items():
        results["total_wall_s"] = sum(c.get("wall_s", 0.0) for c in results["cases"].values())
        json_path, md_path = REPORTS[report]
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        md_path.write_text(render_markdown(results, report))
        print(md_path.read_text())
    return 1 if failed else 0


# -- the report -----------------------------------------------------------------------


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def _met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _met_latency(stats: Json, limit_ms: float) -> str:
    """Judged on the median; says whether the p99 is under the target too."""
    if stats["median"] >= limit_ms:
        return "**no**"
    return "yes (p99 too)" if stats["p99"] < limit_ms else "median yes, **p99 no**"


def table_rows(cases: Json) -> list[tuple[str, str, str, str, str]]:
    """(benchmark, median, p99 or max, target, met?) for each benchmark that ran."""
    rows: list[tuple[str, str, str, str, str]] = []

    def ok(key: str) -> bool:
        return key in cases and "error" not in cases[key]

    for key, label in (("crash", "a. crash to noticed (floor in master)"),
                       ("crash_no_floor", "a. crash to noticed (no floor)")):
        if ok(key):
            s = cases[key]["latency_ms"]
            rows.append((f"{label}, n={s['n']}", _ms(s["median"]), f"p99 {_ms(s['p99'])}",
                         "< 5 ms", _met_latency(s, 5)))
    for key, label in (("fork", "b. fork to worker entry (floor in master)"),
                       ("fork_no_floor", "b. fork to worker entry (no floor)")):
        if ok(key):
            s = cases[key]["latency_ms"]
            rows.append((f"{label}, n={s['n']}", _ms(s["median"]), f"p99 {_ms(s['p99'])}",
                         "< 3 ms", _met_latency(s, 3)))
    if ok("fresh"):
        s = cases["fresh"]["latency_ms"]
        rows.append((f"b. fresh interpreter + floor, n={s['n']}", _ms(s["median"]),
                     f"p99 {_ms(s['p99'])}", "(baseline)", _met(None)))
    if ok("fork") and ok("fresh"):
        ratio = cases["fresh"]["latency_ms"]["median"] / cases["fork"]["latency_ms"]["median"]
        rows.append(("b. fresh / fork (medians)", f"{ratio:.0f}x", "", ">= 150x",
                     _met(ratio >= 150)))
    if ok("idle"):
        c = cases["idle"]
        rows.append((f"c. idle master wake-ups, 8 workers, {c['seconds']:.0f} s",
                     f"{c['wakeups_per_s']:.2f} /s", f"max {max(c['per_second'])} in 1 s",
                     "<= 1 /s", _met(c["wakeups_per_s"] <= 1)))
    for key, label in (("shutdown", "d. graceful stop, 64 workers (floor)"),
                       ("shutdown_no_floor", "d. graceful stop, 64 workers (no floor)")):
        if ok(key):
            s = cases[key]["stop_ms"]
            rows.append((f"{label}, {s['n']} runs", _ms(s["median"]), f"max {_ms(s['max'])}",
                         "< 250 ms", _met(s["median"] < 250)))
    for key, label in (("start", "e. start 256 workers (floor)"),
                       ("start_no_floor", "e. start 256 workers (no floor)")):
        if ok(key):
            s = cases[key]["from_run_ms"]
            rows.append((f"{label}, {s['n']} runs", _ms(s["median"]), f"max {_ms(s['max'])}",
                         "< 3 s", _met(s["median"] < 3000)))
    if ok("churn"):
        c = cases["churn"]
        growth = c["rss_growth_kib"]
        rows.append((f"f. master RSS growth, exit 1,000 to {c['cycles']:,}",
                     f"{growth:+d} KiB", f"{c['blocks_growth']:+d} pymalloc blocks",
                     "~0 (<= 256 KiB)", _met(growth <= 256)))
    return rows + metrics_rows(cases)


def metrics_rows(cases: Json) -> list[tuple[str, str, str, str, str]]:
    """The rows of the metrics cases (metrics-bench.md): spreads are p95s."""
    rows: list[tuple[str, str, str, str, str]] = []
    if "crash_scraped" in cases and "error" not in cases["crash_scraped"]:
        c = cases["crash_scraped"]
        off, on = c["off"]["latency_ms"], c["on"]["latency_ms"]
        rows += [
            (f"g. crash to noticed, metrics off (floor), n={off['n']}", _ms(off["median"]),
             f"p95 {_ms(off['p95'])}", "(baseline)", _met(None)),
            (f"g. crash to noticed, metrics on, /metrics scraped in a loop "
             f"({c['scraper']['scrapes_per_s']:.0f}/s), n={on['n']}", _ms(on["median"]),
             f"p95 {_ms(on['p95'])}", "< 5 ms", _met(on["median"] < 5)),
            ("g. scraped / off", f"{c['ratio_median']:.2f}x", f"p95 {c['ratio_p95']:.2f}x",
             "within 2x", _met(c["ratio_median"] <= 2)),
        ]
    for key in ("status_256", "status_1024"):
        if key not in cases or "error" in cases[key]:
            continue
        c = cases[key]
        n = c["workers"]
        rows += [
            (f"h. status request, {n} workers: client's round trip, n={c['round_trip_ms']['n']}",
             _ms(c["round_trip_ms"]["median"]), f"p95 {_ms(c['round_trip_ms']['p95'])}",
             "(report)", _met(None)),
            (f"h. status request, {n} workers: master's loop held",
             _ms(c["held_ms"]["median"]), f"p95 {_ms(c['held_ms']['p95'])}",
             "(report)", _met(None)),
            (f"h. scrape, {n} workers (exporter reads status + /proc), "
             f"n={c['scrape_ms']['n']}", _ms(c["scrape_ms"]["median"]),
             f"max {_ms(c['scrape_ms']['max'])}", "(report)", _met(None)),
        ]
    if "idle_metrics" in cases and "error" not in cases["idle_metrics"]:
        c = cases["idle_metrics"]
        rows.append((f"i. idle master wake-ups, metrics on, never scraped, 8 workers, "
                     f"{c['seconds']:.0f} s", f"{c['wakeups_per_s']:.2f} /s",
                     f"max {max(c['per_second'])} in 1 s", "<= 1 /s",
                     _met(c["wakeups_per_s"] <= 1)))
    return rows


METHOD = """\
## Method

Every benchmark runs in a fresh interpreter (`bench_master.py --case NAME`), and so does
every master: a master installs signal handlers and forks, so none shares a process
with another. Times are `time.monotonic()` (CLOCK_MONOTONIC, one clock for every process
on the machine); workers write `(kind, pid, time)` records to a pipe they inherit. The
`prefork` logger is set to ERROR so that log lines (one per crash) do not weigh on the
timings. "Floor" means the master imported the bundled cpu fleet's floor before
`Master.run()`, as `prefork run --fleet cpu` does before it forks: the module
`prefork_workers.cpu.fleet`, which brings the fleet's models (its SQLModel tables), loops
and db modules with SQLAlchemy, pydantic and aiosqlite. It is the floor `make measure`
weighs; its import time, table count and the master's RSS are under Details. Most cases
also run without it, to show what the floor's size costs.

- **a. Crash to noticed.** One worker sleeps 2-8 ms (so the master is asleep in
  `select()`), writes `time.monotonic()` to the pipe, and dies: SIGKILL in half the
  samples, `os._exit(1)` in the other half. The observer's `now` at `"exited"` is when
  the master noticed; latency = noticed - died. The worker is restarted at once
  (Backoff(initial=0), no start limit), one sample at a time. This includes the kernel
  tearing down the dying process's memory before it signals SIGCHLD, so the same
  process, once its master has returned, also forks children that die the same way and
  waits for each on a pidfd: the kernel's share, with no prefork in between.
- **b. Fork to worker entry.** With the floor imported in the master, the observer's
  time at `"forking"` against the first line of the worker (matched by pid); one worker
  with `restart="always"` that exits 10 ms after its first line. For scale, the same
  process then times a bare `os.fork()` to the child's first line. The comparison is
  what a systemd unit per worker pays: from just before `Popen([python, "-c", "import
  prefork_workers.cpu.fleet; ..."])` to the moment that fresh interpreter reports it has
  imported the floor (after one uncounted warm-up run that writes the fleet's `.pyc`
  files; PYTHONDONTWRITEBYTECODE is dropped for these runs, as a deployed service has its
  bytecode cached). Ratio = fresh median / fork median (with the floor).
- **c. Idle wake-ups.** A master with the floor and 8 workers that `signal.pause()`.
  Once all 8 reported in and 3 s more have passed, the probe reads the master's
  `voluntary_ctxt_switches + nonvoluntary_ctxt_switches` (all threads,
  `/proc/PID/task/*/status`) every second for 30 s; reading /proc does not wake the
  master. Every wake-up of a sleeping process is at least one context switch.
- **d. Graceful stop.** A master with 64 pausing workers (default SIGTERM disposition).
  Once all reported in, the probe sends SIGTERM and waits on a pidfd of the master, which
  turns readable the moment the process has ended (no polling); the time includes the
  interpreter's own exit after `run()` returns. Phases come from the master's observer
  ("stopping") and a timestamp after `run()` returned.
- **e. Start 256 workers.** From just before `Master.run()` (which takes the lock and
  runs `gc.collect(); gc.freeze()` first) to the latest first line among the 256
  workers. Also reported: from the first `"forking"`, and until all forks were made.
- **f. RSS under churn.** 4 workers that `os._exit(1)` at once, Backoff(initial=0.0,
  factor=1.0, jitter=0.0), StartLimit(interval=0). The observer reads the master's own
  VmRSS (and `sys.getallocatedblocks()`) every 1,000 exits; growth is from exit 1,000 to
  exit 10,000. "Met" means under 256 KiB, allocator noise; a leak of even 100 bytes a
  cycle would show as ~900 KiB.
"""


METRICS_NOTE = """\
What `Master(..., metrics=MetricsOptions(listen=...))` (`prefork run --metrics`) costs
the master. These rows come from a run of their own, apart from master-bench.md (another
time, another commit, another load on a noisy machine): the scraped crash case is
compared with the metrics-off runs it alternated with in this run, never with
master-bench.md's `crash` row.
"""

METRICS_METHOD = """\
## Method

As in master-bench.md (fresh interpreters, CLOCK_MONOTONIC, the `prefork` logger at
ERROR; the exporter a master spawns logs at ERROR too). Every master here runs its
metrics exporter (`python -m prefork metrics`, prometheus-client) on a free loopback port.

- **g. Crash to noticed, scraped.** Case a (floor in the master) run as `--case crash`
  subprocesses, alternately without and with metrics: 4 rounds of one run of each, the
  order flipped every round, 300 deaths a run. In the runs with metrics, a thread of the
  probe (not the master, not the exporter) GETs `/metrics` one request after another, a
  new connection each, for the whole run; deaths in the first 1.5 s of `run()` are not
  counted, in either variant (the exporter is still starting: the scraper's first answer
  came before the first counted death in every run, see Details). Scrapes within
  MIN_INTERVAL (1 s) share one reading, so the master gets about one status request a
  second while the scraper keeps the exporter and a core busy. Target (the issue's): the
  scraped median within 2x of the metrics-off median.
- **h. A status request to a large fleet.** A master (no floor) of 256 or 1024 workers
  that `signal.pause()`, metrics on, nobody scraping. The probe sends 50 status requests,
  20 ms apart, each on a fresh connection to the control socket, and times connect to
  the reply's newline (the client's round trip, parsing not included). The master wraps
  its control server's `handle()` (the bench's own wrapper: accept, read, build the
  status, encode the JSON, send) and reports each call's duration; their sum per request
  is how long the request held the master's loop, during which a worker's death waits.
  The master's CPU time per request (`/proc/PID/task/*/schedstat`, read from outside,
  with its wake-up) is under Details. Then 3 scrapes, each 1.1 s after the last (so
  each makes a reading of its own): the exporter's status request plus its read of every
  process's memory from /proc, and the master's share of it (the same wrapper).
- **i. Idle wake-ups, metrics on.** Case c with the exporter running and never scraped
  (the probe waits for the exporter's process, then 3 s). Only the master's context
  switches count; the exporter's are under Details.
"""


def render_markdown(results: Json, report: str = "master") -> str:
    env = results["environment"]
    cases = results["cases"]
    title = "master benchmarks" if report == "master" else "metrics benchmarks"
    lines = [
        f"# prefork {title}, {env['date'][:10]}",
        "",
        f"Measured {env['date']} by `make bench` (`measurements/bench_master.py`)"
        + (", **quick mode** (fewer samples)" if results["quick"] else "") + ".",
        *(["", METRICS_NOTE.rstrip()] if report == "metrics" else []),
        "",
        f"- Python: {env['python'].splitlines()[0]}",
        f"- Kernel: {env['kernel']}",
        f"- CPU: {env['cpu']}, nproc {env['nproc']}, "
        f"{env['mem_total_kib'] // 1024} MiB RAM",
        f"- prefork {env['prefork']} at {env['commit']}; "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items()),
        f"- Whole run: {results['total_wall_s']:.0f} s",
        "",
        "| Benchmark | Measured (median) | Spread | Target | Met? |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {' | '.join(row)} |" for row in table_rows(cases)]
    errors = [key for key, case in cases.items() if "error" in case]
    if errors:
        lines += ["", "Failed to run: " + ", ".join(errors)
                  + f" (see {REPORTS[report][0].name})."]
    lines += ["", details(cases), METHOD if report == "master" else METRICS_METHOD]
    return "\n".join(lines)


def details(cases: Json) -> str:
    """A few derived numbers worth a line each."""
    out = ["## Details", ""]
    for key in ("fork", "fork_no_floor"):
        if key not in cases or "error" in cases[key]:
            continue
        c = cases[key]
        what = (f"Floor import in the master: {c['floor_import_ms']:.0f} ms, "
                f"{c['floor_tables']} tables" if c["floor"] else "No floor")
        extra = c["latency_ms"]["median"] - c["bare_fork_baseline_ms"]["median"]
        # The bare forks run after the master's, not interleaved with them: on a busy
        # machine the difference can come out negative, which means noise, not a saving.
        share = (f"so prefork's child setup accounts for about {_ms(extra)}" if extra > 0
                 else f"{_ms(-extra)} slower than through prefork: the two sequential "
                      "measurements differ by more than prefork's own share, which this "
                      "run cannot resolve")
        out.append(f"- {key}: {what}, master RSS {c['rss_kib_before_run'] // 1024}"
                   f" MiB. Master side of a fork (\"forking\" to \"spawned\"): median "
                   f"{_ms(c['master_side_ms']['median'])}. A bare `os.fork()` of the same "
                   f"process reaches the child's first line in "
                   f"{_ms(c['bare_fork_baseline_ms']['median'])} (median), {share}.")
    for key in ("crash", "crash_no_floor"):
        if key in cases and "error" not in cases[key]:
            by = cases[key]["by_death"]
            base = cases[key]["kernel_baseline_ms"]
            out.append(f"- {key}: median by SIGKILL {_ms(by['SIGKILL']['median'])}, "
                       f"by `os._exit(1)` {_ms(by['_exit']['median'])}; "
                       f"max {_ms(cases[key]['latency_ms']['max'])}. The kernel alone (a "
                       f"pidfd on the same kind of child, no prefork): median "
                       f"{_ms(base['median'])}, p99 {_ms(base['p99'])}.")
    if "idle" in cases and "error" not in cases["idle"]:
        c = cases["idle"]
        out.append(f"- idle: {c['voluntary']} voluntary + {c['involuntary']} involuntary "
                   f"switches in {c['seconds']:.1f} s; master threads: {c['master_threads']}.")
    for key in ("shutdown", "shutdown_no_floor"):
        if key in cases and "error" not in cases[key]:
            p = cases[key]["phases_ms"]
            out.append(f"- {key} phases (medians): SIGTERM to \"stopping\" "
                       f"{_ms(p['to_stopping']['median'])}, reaping 64 "
                       f"{_ms(p['reaping']['median'])}, after run() returned "
                       f"{_ms(p['teardown']['median'])}.")
    for key in ("start", "start_no_floor"):
        if key in cases and "error" not in cases[key]:
            c = cases[key]
            out.append(f"- {key}: from first \"forking\" "
                       f"{_ms(c['from_first_fork_ms']['median'])}; all 256 forked after "
                       f"{_ms(c['all_forked_ms']['median'])}; stopping 256 took "
                       f"{_ms(c['stop_ms']['median'])}.")
    if "churn" in cases and "error" not in cases["churn"]:
        c = cases["churn"]
        rss = ", ".join(f"{m['rss_kib'] // 1024}" for m in c["marks"][:: max(1, len(c["marks"])
                                                                         // 6)])
        first, last = c["cycles_per_s_first_last"]
        out.append(f"- churn: {c['cycles']:,} exits in {c['seconds']:.1f} s; "
                   f"restarts/s {first:.0f} in the first 1,000, {last:.0f} in the last; "
                   f"RSS MiB along the way: {rss}.")
    return "\n".join(out + metrics_details(cases)) + "\n"


def metrics_details(cases: Json) -> list[str]:
    out: list[str] = []
    if "crash_scraped" in cases and "error" not in cases["crash_scraped"]:
        c = cases["crash_scraped"]
        sc = c["scraper"]
        medians = {v: ", ".join(f"{m:.2f}" for m in c[v]["run_medians_ms"])
                   for v in ("off", "on")}
        lag = sc["first_scrape_after_counting_s"]
        first = (f"In every run the scraper had its first answer {-lag:.2f} s or more before "
                 "the first counted death." if lag <= 0 else
                 f"**In a run the scraper's first answer came {lag:.2f} s after counting "
                 "began**: its first samples were not scraped.")
        out.append(
            f"- crash_scraped: {sc['scrapes']:,} scrapes in all, median {sc['scrapes_per_s']:.0f}"
            f"/s a run, {_ms(sc['scrape_ms_median'])} each (median), {sc['failed']} failed "
            f"(as a master stopped); they made {sc['readings']} readings, one status request "
            f"to the master each, {sc['reading_gap_s']['median']:.2f} s apart (median). "
            f"{first} Medians of each run, off: {medians['off']} ms; "
            f"on: {medians['on']} ms. "
            f"The kernel alone (pidfd, see master-bench.md's method), off: "
            f"{_ms(c['off']['kernel_baseline_ms']['median'])}, on: "
            f"{_ms(c['on']['kernel_baseline_ms']['median'])} (medians; the scraper was "
            "still running during the latter).")
    for key in ("status_256", "status_1024"):
        if key in cases and "error" not in cases[key]:
            c = cases[key]
            out.append(
                f"- {key}: reply {c['reply_bytes'] / 1024:.0f} KiB for {c['listed']} "
                f"workers; the master's CPU time per request (schedstat) median "
                f"{_ms(c['cpu_ms']['median'])}, p95 {_ms(c['cpu_ms']['p95'])}; loop held "
                f"max {_ms(c['held_ms']['max'])}. A scrape's /metrics is "
                f"{c['scrape_bytes'] / 1024:.0f} KiB; the master's loop was held "
                f"{_ms(c['scrape_held_ms']['median'])} (median) of it.")
    if "idle_metrics" in cases and "error" not in cases["idle_metrics"]:
        c = cases["idle_metrics"]
        exporter = c["exporter_switches"]
        out.append(f"- idle_metrics: the master {c['voluntary']} voluntary + "
                   f"{c['involuntary']} involuntary switches in {c['seconds']:.1f} s. The "
                   f"exporter (its own process) {exporter} in the same time, "
                   f"{exporter / c['seconds']:.1f}/s (its HTTP server sleeps until a "
                   "client or a signal comes); none of its wake-ups would reach the master.")
    return out


# -- entry point ----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one benchmark and print its JSON")
    parser.add_argument("--master", action="store_true",
                        help="(internal) be a probed master of pausing workers")
    parser.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                        help=f"import the cpu fleet's floor ({FLOOR}) in the master first")
    parser.add_argument("--samples", type=int)
    parser.add_argument("--runs", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--probe-fd", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--warmup", type=float)
    parser.add_argument("--metrics", action="store_true",
                        help="idle: with the metrics exporter on (never scraped)")
    parser.add_argument("--metrics-port", type=int,
                        help="(internal) the master's metrics exporter on this port")
    parser.add_argument("--runtime-dir", type=Path, help="(internal) the master's")
    parser.add_argument("--timed-control", action="store_true",
                        help="(internal) the master reports its control server's time")
    parser.add_argument("--quick", action="store_true", help="fewer samples, ~1 minute")
    parser.add_argument("--only", nargs="+", metavar="KEY",
                        help=f"driver: run only these ({', '.join(p.key for p in PLANS)})")
    args = parser.parse_args(argv)
    if args.master:
        quiet_logging()
        print(json.dumps(master_main(args.workers, args.probe_fd, args.floor,
                                     metrics_port=args.metrics_port,
                                     runtime_dir=args.runtime_dir,
                                     timed_control=args.timed_control)))
        return 0
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return 0
    return drive(args.quick, args.only)


if __name__ == "__main__":
    raise SystemExit(main())
