"""The copy-on-write probe: how much of each worker's memory is really its own.

:func:`probe_fleet` does what the master does - the floor is already imported, optionally
every worker's warm-up runs, then ``gc.collect(); gc.freeze()`` - and forks K children.
It measures the master and every child while they idle and again after each child ran
its worker's warm-up and a full collection; then it starts the baseline, K fresh
interpreters each importing the same floor as one unit per worker would, and measures
them the same way. :func:`probe_running` reads the same figures from a live fleet.
:func:`probe_fleet` sets the process title, as a master does before it forks.

Children are forked through :func:`prefork.child.run_child`, like the master's, and wait
for commands on a socket; no process is left behind, whatever happens. The report's
shape and its table are in :mod:`prefork.probe_report`.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
from setproctitle import setproctitle

from prefork import titles
from prefork.child import WorkerContext, flush_stdio, run_child
from prefork.fleet import Fleet, FleetError, Worker, load_fleet, replica_label
from prefork.floor import WarmUpError, prepare_floor
from prefork.memory import Memory, MemoryUnavailable, Meter, measure
from prefork.probe_report import ProbeReport, Sample
from prefork.threads import ThreadCheck

# An idle child wakes this often and leaves some reference cycles behind, as a polling
# loop does (exceptions, futures, frames): only the collector frees those, so its
# collections run as they would in a real worker (gen 0 about every second). Garbage
# freed by reference counting alone would never trigger one.
IDLE_TICK = 0.1
IDLE_CYCLES = 100
STARTUP_TIMEOUT = 120.0
WORK_TIMEOUT = 600.0


class ProbeError(Exception):
    """The probe could not measure. ``str()`` is one line for the user."""


@dataclass(frozen=True)
class _Member:
    """A measured process the probe controls: a forked child or a baseline interpreter."""

    role: str
    name: str
    pid: int
    read_fd: int
    write_fd: int
    process: subprocess.Popen[bytes] | None = None  # a baseline's, which owns its fds


# -- the probe of a fleet ----------------------------------------------------------------


def probe_fleet(
    fleet: Fleet,
    spec: str,
    *,
    workers: int | None = None,
    idle: Sequence[float] = (1.0,),
    freeze: bool = True,
    warm_up: bool = False,
    baseline: bool = True,
) -> ProbeReport:
    """Measure ``fleet`` (already imported in this process, from ``spec``) under prefork
    and, with ``baseline``, as K fresh interpreters. Raises :class:`ProbeError`."""
    count = len(fleet.workers) if workers is None else workers
    if count < 1:
        raise ProbeError(f"--workers must be at least 1, got {count}")
    idle_times = sorted(set(idle)) or [1.0]
    assignments = [(fleet.workers[i % len(fleet.workers)], i // len(fleet.workers))
                   for i in range(count)]
    report = ProbeReport()
    # As `prefork run`'s master does before it forks. It matters: setproctitle's first call
    # in a process moves argv and environ, which cost each child ~200 KiB of private
    # memory when the child was the first to call it.
    setproctitle(titles.probe(fleet.name))
    try:
        prepare_floor(fleet, freeze=freeze, warm_up=warm_up)
    except WarmUpError as exc:
        raise ProbeError(f"in the master: {exc}") from None
    ThreadCheck().check()  # a warning, as from `prefork run`'s master
    floor = measure(os.getpid())
    members: list[_Member] = []
    for worker, replica in assignments:
        members.append(_fork_child(fleet, worker, replica, members))
    master = ("master", "master", os.getpid())
    try:
        timings = _run_phases(report, [master], members, idle_times)
    finally:
        _stop(members)
    if baseline:
        started = _start_baseline(spec, assignments)
        try:
            _run_phases(report, [], started, idle_times)
        finally:
            _stop(started)
    report.summary = _summarize(report, fleet, count, freeze, warm_up, floor, idle_times[-1],
                                timings)
    return report


def _run_phases(report: ProbeReport, others: list[tuple[str, str, int]],
                members: list[_Member], idle_times: list[float]) -> list[float]:
    """Idle samples at ``idle_times`` after all members are ready, then the working one.
    Returns how long each sampling of all the processes took."""
    for member in members:
        _expect(member, "ready", STARTUP_TIMEOUT)
    targets = others + [(m.role, m.name, m.pid) for m in members]
    timings = []
    up = time.monotonic()
    for at in idle_times:
        _watch_until(members, up + at)
        samples, seconds = _sample(targets, "idle", at)
        report.processes.extend(samples)
        timings.append(seconds)
    for member in members:
        os.write(member.write_fd, b"w")
    for member in members:
        _expect(member, "worked", WORK_TIMEOUT)
    samples, seconds = _sample(targets, "working", None)
    report.processes.extend(samples)
    timings.append(seconds)
    return timings


_meter = Meter()


def _sample(targets: list[tuple[str, str, int]], phase: str,
            at: float | None) -> tuple[list[Sample], float]:
    started = time.perf_counter()
    try:
        memories = _meter.measure_all([pid for _, _, pid in targets])
        samples = [Sample(role, name, pid, phase, at, memory)
                   for (role, name, pid), memory in zip(targets, memories, strict=True)]
    except MemoryUnavailable as exc:
        raise ProbeError(str(exc)) from None
    return samples, time.perf_counter() - started


def _summarize(report: ProbeReport, fleet: Fleet, count: int, freeze: bool, warm_up: bool,
               floor: Memory, last_idle: float, timings: list[float]) -> dict[str, object]:
    def total(role: set[str], phase: str) -> int | None:
        picked = [s.memory.pss for s in report.processes if s.role in role
                  and s.phase == phase and (phase != "idle" or s.at == last_idle)]
        return sum(picked) if picked else None

    def private(phase: str) -> int:
        return int(statistics.median(
            s.memory.uss for s in report.processes if s.role == "child"
            and s.phase == phase and (phase != "idle" or s.at == last_idle)))

    prefork_pss = total({"master", "child"}, "idle")
    baseline_pss = total({"baseline"}, "idle")
    return {
        "fleet": fleet.name,
        "workers": count,
        "python": sys.version.split()[0],
        "freeze": freeze,
        "warm_up": warm_up,
        "floor_rss": floor.rss,
        "prefork_pss": prefork_pss,
        "baseline_pss": baseline_pss,
        "ratio": round(prefork_pss / baseline_pss, 4) if prefork_pss and baseline_pss else None,
        "idle_private": private("idle"),
        "working_private": private("working"),
        "working_prefork_pss": total({"master", "child"}, "working"),
        "working_baseline_pss": total({"baseline"}, "working"),
        "probe_seconds": round(statistics.median(timings), 6),
    }


# -- the measured processes ------------------------------------------------------------


def _fork_child(fleet: Fleet, worker: Worker, replica: int,
                siblings: list[_Member]) -> _Member:
    ours, theirs = socket.socketpair()
    fleet_name = fleet.name
    context = WorkerContext(fleet_name, worker.name, replica, os.getpid())
    flush_stdio()
    pid = os.fork()
    if pid == 0:
        ours.close()
        fd = theirs.detach()
        run_child(context, lambda: _serve(worker, fd, fd),
                  title=titles.probe(fleet_name, context.label), signal_defaults={},
                  close_fds=[m.read_fd for m in siblings], post_fork=fleet.post_fork)
    theirs.close()
    fd = ours.detach()
    return _Member("child", context.label, pid, fd, fd)


def _start_baseline(spec: str, assignments: list[tuple[Worker, int]]) -> list[_Member]:
    """K fresh interpreters, each importing the fleet as a unit of its own would."""
    env = dict(os.environ)
    # Whatever this process could import (e.g. a module:ATTR fleet in the working
    # directory), the baseline must import the same way.
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path if p is not None)
    started: list[_Member] = []
    for worker, replica in assignments:
        process = subprocess.Popen(
            [sys.executable, "-c", "from prefork.probe import baseline_main; baseline_main()",
             spec, worker.name], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        assert process.stdin is not None and process.stdout is not None
        started.append(_Member("baseline", replica_label(worker.name, replica), process.pid,
                               process.stdout.fileno(), process.stdin.fileno(), process))
    return started


def baseline_main() -> None:
    """A baseline process: import the fleet from ``argv[1]``, then serve worker ``argv[2]``
    on stdin/stdout."""
    spec, name = sys.argv[1], sys.argv[2]
    # The protocol owns the real stdout; anything the fleet prints goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    try:
        fleet = load_fleet(spec)
        worker = next(w for w in fleet.workers if w.name == name)
    except (FleetError, StopIteration) as exc:
        os.write(out, f"error: {exc}\n".encode())
        raise SystemExit(1) from None
    _serve(worker, 0, out)


def _serve(worker: Worker, read_fd: int, write_fd: int) -> None:
    """A measured process's loop: say ``ready``; on ``w`` run the worker's warm-up and a
    full collection and say ``worked``; end on ``q`` or when the probe goes away."""
    os.write(write_fd, b"ready\n")
    while True:
        readable, _, _ = select.select([read_fd], [], [], IDLE_TICK)
        if not readable:
            for _ in range(IDLE_CYCLES):
                cycle: list[object] = []
                cycle.append(cycle)
            continue
        command = os.read(read_fd, 1)
        if command in (b"", b"q"):
            return
        if command == b"w":
            try:
                if worker.warmup is not None:
                    worker.warmup()
                gc.collect()
            except Exception as exc:
                message = " ".join(f"{type(exc).__name__}: {exc}".split())
                os.write(write_fd, f"error: {message}\n".encode())
            else:
                os.write(write_fd, b"worked\n")


def _expect(member: _Member, word: str, timeout: float) -> None:
    """Wait for ``member`` to say ``word``; raise ProbeError if it says otherwise or dies."""
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([member.read_fd], [], [], left)[0]:
            raise ProbeError(f"{member.role} {member.name} (pid {member.pid}) did not say "
                             f"{word!r} within {timeout:g} s")
        chunk = os.read(member.read_fd, 4096)
        if not chunk:
            raise ProbeError(f"{member.role} {member.name} (pid {member.pid}) exited "
                             "during the probe")
        line += chunk
    text = line.decode(errors="replace").strip()
    if text != word:
        raise ProbeError(f"{member.role} {member.name}: {text}")


def _watch_until(members: list[_Member], deadline: float) -> None:
    """Wait until ``deadline``; a member that speaks or dies meanwhile is an error."""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([m.read_fd for m in members], [], [], left)
        for member in members:
            if member.read_fd in readable:
                _expect(member, "(silence)", 0.1)


def _stop(members: list[_Member]) -> None:
    """End every member and reap it: ``q`` first, SIGKILL for one that does not go."""
    for member in members:
        try:
            os.write(member.write_fd, b"q")
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for member in members:
        if member.process is not None:
            _reap_popen(member.process, deadline)
        else:
            _reap_forked(member.pid, deadline)
            os.close(member.read_fd)  # one socket: read_fd == write_fd


def _reap_popen(process: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        process.wait(max(deadline - time.monotonic(), 0))
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def _reap_forked(pid: int, deadline: float) -> None:
    """Wait for ``pid`` to exit (its pidfd becomes readable) until ``deadline``, then
    SIGKILL it; reap it either way."""
    pidfd = os.pidfd_open(pid)
    try:
        if not select.select([pidfd], [], [], max(deadline - time.monotonic(), 0))[0]:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    os.waitpid(pid, 0)


# -- a running fleet -------------------------------------------------------------------


def probe_running(master_pid: int) -> ProbeReport:
    """Measure a running prefork master and its workers without disturbing them: only
    ``/proc`` is read. Raises :class:`ProbeError` for a pid that is not a prefork master."""
    try:
        master = psutil.Process(master_pid)
        title = " ".join(master.cmdline())
        children = master.children()
    except psutil.NoSuchProcess:
        raise ProbeError(f"no process has pid {master_pid}") from None
    except psutil.AccessDenied:
        raise ProbeError(f"cannot read process {master_pid}: permission denied") from None
    parsed = titles.parse(title)
    if parsed is None or parsed.role != "master":
        raise ProbeError(f"process {master_pid} is not a prefork master "
                         f"(its command line is {title.strip()[:60]!r})")
    targets = [("master", "master", master_pid)]
    for child in sorted(children, key=lambda c: c.pid):
        try:
            worker = titles.parse(" ".join(child.cmdline()))
        except psutil.Error:
            continue  # exited since: not part of the fleet any more
        if worker is not None and worker.role == "worker" and worker.label is not None:
            targets.append(("child", worker.label, child.pid))
    started = time.perf_counter()
    samples = []
    for role, name, pid in targets:
        try:
            samples.append(Sample(role, name, pid, "live", None, measure(pid)))
        except MemoryUnavailable as exc:
            if role == "master":
                raise ProbeError(str(exc)) from None
            # A worker that exited between listing and reading: the master restarts it.
    seconds = time.perf_counter() - started
    children_uss = [s.memory.uss for s in samples if s.role == "child"]
    report = ProbeReport(samples)
    report.summary = {
        "fleet": parsed.fleet,
        "workers": len(children_uss),
        "python": None,
        "freeze": None,
        "warm_up": None,
        "floor_rss": None,
        "prefork_pss": sum(s.memory.pss for s in samples),
        "baseline_pss": None,
        "ratio": None,
        "idle_private": int(statistics.median(children_uss)) if children_uss else None,
        "working_private": None,
        "working_prefork_pss": None,
        "working_baseline_pss": None,
        "probe_seconds": round(seconds, 6),
    }
    return report
