"""The copy-on-write probe: how much of each worker's memory is really its own.

:func:`probe_fleet` does what the master does - the floor is already imported, optionally
every worker's warm-up runs, then ``gc.collect(); gc.freeze()`` - and forks K children
and one bare ``os.fork()`` child that only sleeps (what a fork of this floor costs
before prefork does anything in the child). It measures the master and every child
while they idle and again after each child ran its worker's warm-up and a full
collection; then it starts the baseline, K fresh interpreters each importing the same
floor as one unit per worker would, and measures them the same way.
:func:`probe_running` reads the same figures from a live fleet. :func:`probe_fleet` sets
the process title, as a master does before it forks.

Every figure is read by a separate process, :mod:`prefork.smaps_reader`, which has not
imported the floor: read from the probe's own process, the master's USS counted the
probe's own thread pool and buffers (+11-12%).

Children are forked as `prefork run`'s master forks its workers: back to back, through
:func:`prefork.child.run_child` with the master's arguments (heartbeat, journal, process
settings, the pipe of the import report), and wait for commands on a socket; no process
is left behind, whatever happens. A child costs what a `prefork run` worker costs above
a bare fork of its master; a `prefork run` master's own work after the fork un-shares
~0.17 MiB more of every child's pages than the probe does (measured; see the README).
After the working phase each child is asked for its import report, as the master asks
its workers: what the warm-up imported after the fork, and the ``--preload`` line. The
report's shape and its table are in :mod:`prefork.probe_report`.
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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from setproctitle import setproctitle

from prefork import after_fork, journal, titles
from prefork.child import Handler, WorkerContext, flush_stdio, run_child
from prefork.client import masters_in
from prefork.control import ControlError
from prefork.fleet import Fleet, FleetError, Worker, load_fleet, replica_label
from prefork.floor import WarmUpError, prepare_floor
from prefork.heartbeats import HeartbeatTable
from prefork.memory import Memory, MemoryUnavailable
from prefork.probe_report import ProbeReport, Sample
from prefork.signals import HANDLED, IGNORED
from prefork.threads import ThreadCheck

# An idle child wakes this often and leaves some reference cycles behind, as a polling
# loop does (exceptions, futures, frames): only the collector frees those, so its
# collections run as they would in a real worker (gen 0 about every second). Garbage
# freed by reference counting alone would never trigger one.
IDLE_TICK = 0.1
IDLE_CYCLES = 100
STARTUP_TIMEOUT = 120.0
WORK_TIMEOUT = 600.0
REPORT_TIMEOUT = 10.0  # seconds for every child's import report


# The measuring process: a shell that reads the smaps_rollup of the pids asked for with
# one cat per sample (4.2 ms for 10 small processes; 6.5 with the shell's own `read`, a
# byte a call). Not Python, which maps what the measured processes map: a page two
# processes map is no longer either one's own, and its PSS is split once more. On the
# tests' probed floor, an idle master's figures while another process lived beside it:
# a `python -I -S` reader -0.2% USS and -1.7% PSS; the prefork CLI itself (click,
# psutil, the control client) -2.2% and -4.9%; `sh` 0.0% and -0.1%. Each file is its
# header line ("... [rollup]") and fields, or one line of cat's error (gone, a zombie's
# ESRCH, not ours to read), so the answers come in the order asked.
READER = "while read -r paths; do cat $paths 2>&1; echo end; done"
# `probe --pid`'s: the pids of the master ($1) and its children, then their rollups, to
# fd 3; then run the rest of the arguments.
SNAPSHOT = ('pids="$1 $(cat /proc/"$1"/task/*/children 2>/dev/null)"; paths=""; '
            'for p in $pids; do paths="$paths /proc/$p/smaps_rollup"; done; '
            '{ echo $pids; cat $paths 2>&1; } >&3; shift; exec "$@"')
ROLLUPS_FD = 3
MAX_READERS = 4  # measuring shells at most, one per CPU


class ProbeError(Exception):
    """The probe could not measure. ``str()`` is one line for the user."""


class OutsideMeter:
    """The measuring processes (:data:`READER`), one per CPU: started once, asked for
    every sample until :meth:`close`, each for its share of the pids at the same time (the
    kernel's page-table walk is most of a read: 9 cpu-fleet processes took 22 ms through
    one shell, against 11 ms for the two threads of the in-process reader before it).
    Raises ProbeError if one cannot start or stops answering."""

    def __init__(self) -> None:
        self._processes: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(min(os.cpu_count() or 1, MAX_READERS)):
                self._processes.append(subprocess.Popen(
                    ["/bin/sh", "-c", READER], stdin=subprocess.PIPE, stdout=subprocess.PIPE))
        except OSError as exc:
            self.close()
            raise ProbeError(f"cannot start the measuring process: {exc}") from None

    def fds(self) -> list[int]:
        """Their pipes' ends in this process: a forked child closes them."""
        return [stream.fileno() for process in self._processes
                for stream in (process.stdin, process.stdout) if stream is not None]

    def measure_all(self, pids: Sequence[int]) -> list[Memory]:
        """Every pid's memory, read in one request to each reader; the first unreadable
        pid raises :class:`MemoryUnavailable`, as :func:`prefork.memory.measure` would."""
        count = max(min(len(self._processes), len(pids)), 1)
        shares = [list(pids[i::count]) for i in range(count)]
        readers = self._processes[:count]
        found: dict[int, Memory | None] = {}
        try:
            for process, share in zip(readers, shares, strict=True):
                assert process.stdin is not None
                process.stdin.write(" ".join(map(rollup_path, share)).encode() + b"\n")
                process.stdin.flush()
            for process, share in zip(readers, shares, strict=True):
                assert process.stdout is not None
                lines = []
                while (line := process.stdout.readline()) not in (b"end\n", b""):
                    lines.append(line)
                if line != b"end\n":
                    raise ProbeError("the measuring process exited")
                found.update(zip(share, parse_rollups(share, lines), strict=True))
        except OSError as exc:
            raise ProbeError(f"the measuring process failed: {exc}") from None
        return [_readable(pid, found[pid]) for pid in pids]

    def close(self) -> None:
        for process in self._processes:
            try:
                if process.stdin is not None:
                    process.stdin.close()  # end of input: it exits
            except OSError:
                pass
        for process in self._processes:
            try:
                process.wait(5.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            if process.stdout is not None:
                process.stdout.close()


_ROLLUP_FIELDS = {b"Rss": "rss", b"Private_Clean": "uss", b"Private_Dirty": "uss",
                  b"Private_Hugetlb": "uss", b"Pss": "pss", b"Swap": "swap"}


def rollup_path(pid: int) -> str:
    return f"/proc/{pid}/smaps_rollup"


def parse_rollups(pids: Sequence[int], lines: Iterable[bytes]) -> list[Memory | None]:
    """``cat``'s output for the rollups of ``pids``: each pid's memory, or None for one
    cat could not read. Raises ProbeError if the output does not have one per pid."""
    memories: list[Memory | None] = []
    sums: dict[str, int] | None = None

    def close() -> None:
        if sums is not None:
            memories.append(Memory(rss=sums["rss"], uss=sums["uss"], pss=sums["pss"],
                                   shared=max(sums["rss"] - sums["uss"], 0),
                                   swap=sums["swap"]))

    for line in lines:
        key, _, rest = line.partition(b":")
        if line.rstrip().endswith(b"[rollup]"):
            close()
            sums = dict.fromkeys(("rss", "uss", "pss", "swap"), 0)
        elif line.startswith(b"cat: "):
            close()
            sums = None
            memories.append(None)
        elif sums is not None and (field := _ROLLUP_FIELDS.get(key)) is not None:
            sums[field] += int(rest.split()[0]) * 1024
    close()
    if len(memories) != len(pids):
        raise ProbeError(f"the measuring process read {len(memories)} processes, "
                         f"not {len(pids)}")
    return memories


def _readable(pid: int, memory: Memory | None) -> Memory:
    """``memory``, or the MemoryUnavailable that says why ``pid`` could not be read."""
    if memory is not None:
        return memory
    rollup = rollup_path(pid)
    if os.path.exists(rollup) and not os.access(rollup, os.R_OK):
        raise MemoryUnavailable(f"cannot read the memory of process {pid}: permission "
                                "denied (run as its user or as root)")
    raise MemoryUnavailable(f"process {pid} does not exist (any more)")  # or a zombie


@dataclass(frozen=True)
class _Member:
    """A measured process the probe controls: a forked child or a baseline interpreter."""

    role: str  # "child", "bare" (says nothing, only sleeps) or "baseline"
    name: str
    pid: int
    read_fd: int
    write_fd: int
    process: subprocess.Popen[bytes] | None = None  # a baseline's, which owns its fds

    @property
    def target(self) -> tuple[str, str, int]:
        return self.role, self.name, self.pid


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
    meter = OutsideMeter()  # first: nothing forked below holds more than its pipes
    try:
        _probe(report, meter, fleet, spec, assignments, freeze, warm_up, baseline,
               idle_times)
    finally:
        meter.close()
    return report


def _probe(report: ProbeReport, meter: OutsideMeter, fleet: Fleet, spec: str,
           assignments: list[tuple[Worker, int]], freeze: bool, warm_up: bool,
           baseline: bool, idle_times: list[float]) -> None:
    # As `prefork run`'s master does before it forks. It matters: setproctitle's first call
    # in a process moves argv and environ, which cost each child ~200 KiB of private
    # memory when the child was the first to call it.
    setproctitle(titles.probe(fleet.name))
    try:
        prepare_floor(fleet, freeze=freeze, warm_up=warm_up)
    except WarmUpError as exc:
        raise ProbeError(f"in the master: {exc}") from None
    ThreadCheck().check()  # a warning, as from `prefork run`'s master
    floor = _measure(meter, [os.getpid()])[0]
    heartbeats = (HeartbeatTable(len(assignments))
                  if any(w.timeout is not None for w, _ in assignments) else None)
    streams = journal.for_workers()
    bare, members, reports = _fork_all(fleet, assignments, meter.fds(), heartbeats, streams)
    try:
        try:
            master = ("master", "master", os.getpid())
            timings = _run_phases(report, meter, [master], [bare], members, idle_times)
            report.imported_after_fork = _import_reports(members, reports)
        finally:
            _stop([bare, *members])
            for fd in reports.values():
                os.close(fd)
    finally:
        if heartbeats is not None:
            heartbeats.close()
    if baseline:
        started = _start_baseline(spec, assignments)
        try:
            _run_phases(report, meter, [], [], started, idle_times)
        finally:
            _stop(started)
    report.summary = _summarize(report, fleet, len(assignments), freeze, warm_up, floor,
                                idle_times[-1], timings)


def _import_reports(members: list[_Member], reports: dict[int, int]
                    ) -> list[dict[str, object]]:
    """Each child's report of what it imported after the fork (its warm-up's imports, in
    the working phase), asked for with the signal `prefork run`'s master sends
    (:mod:`prefork.after_fork`): ``{"name", "pid", "imported_after_fork"}`` per child,
    the last None if a child did not answer within REPORT_TIMEOUT."""
    for member in members:
        os.kill(member.pid, after_fork.REPORT_SIGNAL)
    deadline = time.monotonic() + REPORT_TIMEOUT
    found: list[dict[str, object]] = []
    for member in members:
        fd, data = reports[member.pid], b""
        while b"\n" not in data and len(data) <= after_fork.MAX_REPORT:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
        found.append({"name": member.name, "pid": member.pid,
                      "imported_after_fork": after_fork.parse_report(data.partition(b"\n")[0])
                      if b"\n" in data else None})
    return found


def _run_phases(report: ProbeReport, meter: OutsideMeter, others: list[tuple[str, str, int]],
                sleepers: list[_Member], members: list[_Member],
                idle_times: list[float]) -> list[float]:
    """Idle samples at ``idle_times`` after all members are ready, then the working one.
    ``sleepers`` are measured and watched but never spoken to. Returns how long each
    sampling of all the processes took."""
    for member in members:
        _expect(member, "ready", STARTUP_TIMEOUT)
    targets = others + [m.target for m in sleepers + members]
    timings = []
    up = time.monotonic()
    for at in idle_times:
        _watch_until(sleepers + members, up + at)
        samples, seconds = _sample(meter, targets, "idle", at)
        report.processes.extend(samples)
        timings.append(seconds)
    for member in members:
        os.write(member.write_fd, b"w")
    for member in members:
        _expect(member, "worked", WORK_TIMEOUT)
    samples, seconds = _sample(meter, targets, "working", None)
    report.processes.extend(samples)
    timings.append(seconds)
    return timings


def _measure(meter: OutsideMeter, pids: list[int]) -> list[Memory]:
    try:
        return meter.measure_all(pids)
    except MemoryUnavailable as exc:
        raise ProbeError(str(exc)) from None


def _sample(meter: OutsideMeter, targets: list[tuple[str, str, int]], phase: str,
            at: float | None) -> tuple[list[Sample], float]:
    started = time.perf_counter()
    memories = _measure(meter, [pid for _, _, pid in targets])
    samples = [Sample(role, name, pid, phase, at, memory)
               for (role, name, pid), memory in zip(targets, memories, strict=True)]
    return samples, time.perf_counter() - started


def _summarize(report: ProbeReport, fleet: Fleet, count: int, freeze: bool, warm_up: bool,
               floor: Memory, last_idle: float, timings: list[float]) -> dict[str, object]:
    def total(role: set[str], phase: str) -> int | None:
        picked = [s.memory.pss for s in report.processes if s.role in role
                  and s.phase == phase and (phase != "idle" or s.at == last_idle)]
        return sum(picked) if picked else None

    def private(phase: str, role: str = "child") -> int:
        return int(statistics.median(
            s.memory.uss for s in report.processes if s.role == role
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
        "bare_idle_private": private("idle", "bare"),
        "working_private": private("working"),
        "working_prefork_pss": total({"master", "child"}, "working"),
        "working_baseline_pss": total({"baseline"}, "working"),
        "probe_seconds": round(statistics.median(timings), 6),
    }


# -- the measured processes ------------------------------------------------------------


@dataclass
class _ChildPlan:
    """One probe child, made ready before the batch forks: its context and set-up as
    `prefork run`'s master gives them (:meth:`prefork.master.Master._prepare_fork`)."""

    worker: Worker
    context: WorkerContext
    title: str
    heartbeat: tuple[HeartbeatTable, int, float] | None
    ours: socket.socket  # the probe's end of the command socket
    theirs: socket.socket
    report_read: int  # its import report's pipe (prefork.after_fork)
    report_write: int

    def fds(self) -> list[int]:
        return [self.ours.fileno(), self.theirs.fileno(), self.report_read, self.report_write]


def _fork_all(fleet: Fleet, assignments: list[tuple[Worker, int]], close_fds: list[int],
              heartbeats: HeartbeatTable | None, streams: journal.JournalStreams | None
              ) -> tuple[_Member, list[_Member], dict[int, int]]:
    """Fork a bare child, then one child per assignment as `prefork run`'s master forks
    its workers (:meth:`prefork.master.Master._spawn_all`: everything made first, the
    forks back to back, each child closing what belongs to the others). The bare child
    only sleeps, in a read of its socket, until the probe says ``q`` or goes away: no
    run_child, no prefork set-up; what it holds of its own is what a fork of this floor
    costs by itself, and a prefork child's excess over it is prefork's. The children
    serve the probe's commands (:func:`_serve`), not their workers. Returns the bare
    child, the children, and each child's import report pipe (pid -> read end)."""
    bare_ours, bare_theirs = socket.socketpair()
    plans = [_plan_child(fleet, worker, replica, heartbeats) for worker, replica in assignments]
    everything = [bare_ours.fileno(), bare_theirs.fileno(), *close_fds,
                  *(fd for plan in plans for fd in plan.fds())]
    defaults = _signal_defaults()
    floor = frozenset(sys.modules)
    # Made before the forks, as the master makes its (each child keeps its socket; the
    # report's pipe run_child keeps itself).
    closes = [[f for f in everything if f != plan.theirs.fileno()] for plan in plans]
    flush_stdio()
    forked: list[int] = []
    try:
        bare = os.fork()
        if bare == 0:
            _bare_child(bare_theirs.fileno(), everything)
        forked.append(bare)
        for plan, close in zip(plans, closes, strict=True):  # nothing else between forks
            pid = os.fork()
            if pid == 0:
                fd = plan.theirs.fileno()
                run_child(plan.context, lambda w=plan.worker, fd=fd: _serve(w, fd, fd),
                          title=plan.title, signal_defaults=defaults, close_fds=close,
                          heartbeat=plan.heartbeat, post_fork=fleet.post_fork,
                          journal=streams, settings=plan.worker.process_plan,
                          imports=(plan.report_write, floor))
            forked.append(pid)
    except OSError as exc:  # EAGAIN/ENOMEM: end what was forked, say so in one line
        for pid in forked:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for sock in (bare_ours, bare_theirs, *(s for p in plans for s in (p.ours, p.theirs))):
            sock.close()
        for plan in plans:
            os.close(plan.report_read)
            os.close(plan.report_write)
        raise ProbeError(f"cannot fork: {exc.strerror}") from None
    pids = forked[1:]
    bare_theirs.close()
    fd = bare_ours.detach()
    members, reports = [], {}
    for plan, pid in zip(plans, pids, strict=True):
        plan.theirs.close()
        os.close(plan.report_write)
        fd_child = plan.ours.detach()
        members.append(_Member("child", plan.context.label, pid, fd_child, fd_child))
        reports[pid] = plan.report_read
    return _Member("bare", "bare", bare, fd, fd), members, reports


def _bare_child(fd: int, close_fds: list[int]) -> NoReturn:
    try:
        for other in close_fds:  # the measuring process's pipes too: it must see their EOF
            if other != fd:
                os.close(other)
        os.read(fd, 1)
    finally:
        os._exit(0)


def _plan_child(fleet: Fleet, worker: Worker, replica: int,
                heartbeats: HeartbeatTable | None) -> _ChildPlan:
    context = WorkerContext(fleet.name, worker.name, replica, os.getpid())
    heartbeat = None
    if heartbeats is not None and worker.timeout is not None:
        cell = heartbeats.take()
        heartbeats.reset(cell, time.monotonic())
        heartbeat = (heartbeats, cell, worker.timeout / 4)
    ours, theirs = socket.socketpair()
    report_read, report_write = os.pipe2(os.O_CLOEXEC)
    return _ChildPlan(worker, context, titles.probe(fleet.name, context.label), heartbeat,
                      ours, theirs, report_read, report_write)


def _signal_defaults() -> dict[int, Handler]:
    """What a master's SignalInbox records at ``open()`` and its children put back: the
    probe handles none of those signals itself, so their dispositions now."""
    defaults: dict[int, Handler] = {}
    for signum in HANDLED + IGNORED:
        previous = signal.getsignal(signum)
        if signum in IGNORED and previous not in (signal.SIG_DFL, None):
            continue
        defaults[signum] = signal.SIG_DFL if previous is None else previous
    return defaults


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


def exec_snapshot(master_pid: int, argv: list[str]) -> NoReturn:
    """`probe --pid`'s first step: replace this process by a shell (:data:`SNAPSHOT`) that
    writes the smaps_rollup of ``master_pid`` and its children to descriptor 3 (a memfd),
    then runs ``argv``, which reads them with :func:`probe_running`.

    Why not read them from here: a Python process alive beside the master maps the same
    pages, which then are no longer the master's own (measured: -2.2% USS, -4.9% PSS
    while the prefork CLI lived; the issue saw -2.7% and -4.3%). The shell is replaced
    too, so what runs beside the master at the moment of the read is sh and cat alone."""
    if not os.path.exists(f"/proc/{master_pid}"):
        raise ProbeError(f"no process has pid {master_pid}")
    memfd = os.memfd_create("prefork-probe-rollups", 0)
    os.dup2(memfd, ROLLUPS_FD)  # inheritable: the shell, then argv, have it
    flush_stdio()
    try:
        os.execv("/bin/sh", ["sh", "-c", SNAPSHOT, "prefork-probe", str(master_pid), *argv])
    except OSError as exc:
        raise ProbeError(f"cannot run /bin/sh to read the master's memory: {exc}") from None


def probe_running(master_pid: int, rollups_fd: int, runtime_dir: Path, *,
                  any_uid: bool = False) -> tuple[ProbeReport, str | None]:
    """Measure a running prefork master and its workers without disturbing them: their
    smaps_rollup, read by :func:`exec_snapshot` into ``rollups_fd``; then the master is
    asked its status (its first answer costs it memory: ~0.9 MiB USS once, measured).

    The master is found by its control socket in ``runtime_dir``, the one whose listener
    (``SO_PEERCRED``) is ``master_pid``; its status reply names the fleet and its workers.
    Without one, the fleet and its workers are taken from the process titles, and the
    second value returned is a warning saying so (else None). Raises
    :class:`ProbeError` for a pid that is not a prefork master."""
    try:
        os.lseek(rollups_fd, 0, os.SEEK_SET)
        with os.fdopen(rollups_fd, "rb") as rollups:
            pids = [int(pid) for pid in rollups.readline().split()]
            figures = parse_rollups(pids, rollups)
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read the figures of master {master_pid}: {exc}") from None
    if pids[:1] != [master_pid]:
        raise ProbeError(f"no process has pid {master_pid}")
    memories = dict(zip(pids, figures, strict=True))
    try:
        master_memory = _readable(master_pid, memories[master_pid])
    except MemoryUnavailable as exc:
        raise ProbeError(str(exc)) from None
    try:
        found = next((reply for _, reply, _ in masters_in(runtime_dir, pid=master_pid,
                                                           any_uid=any_uid)), None)
    except ControlError as exc:
        raise ProbeError(str(exc)) from None
    warning = None
    imported: list[dict[str, object]] = []
    if found is not None:
        fleet = str(found.get("fleet"))
        workers = [w for w in found.get("workers", [])
                   if isinstance(w, dict) and isinstance(w.get("pid"), int)]
        labels = {w["pid"]: str(w.get("label")) for w in workers}
        # What each worker reported to its master (`prefork status` shows the same).
        imported = [{"name": labels[w["pid"]], "pid": w["pid"],
                     "imported_after_fork": w.get("imported_after_fork")} for w in workers]
    else:
        fleet, labels = _from_titles(master_pid, list(memories)[1:], runtime_dir)
        warning = (f"no control socket of master {master_pid} in {runtime_dir} (give its "
                   "--runtime-dir): fleet and workers read from process titles")
    # A worker that exited since is left out (the master restarts it), and so is a child
    # that is no worker (the metrics exporter, what a worker left behind).
    samples = [Sample("master", "master", master_pid, "live", None, master_memory)]
    samples += [Sample("child", labels[pid], pid, "live", None, memory)
                for pid, memory in memories.items()
                if pid in labels and memory is not None]
    children_uss = [s.memory.uss for s in samples if s.role == "child"]
    report = ProbeReport(samples, imported_after_fork=imported)
    report.summary = {
        "fleet": fleet,
        "workers": len(children_uss),
        "python": None,
        "freeze": None,
        "warm_up": None,
        "floor_rss": None,
        "prefork_pss": sum(s.memory.pss for s in samples),
        "baseline_pss": None,
        "ratio": None,
        "idle_private": int(statistics.median(children_uss)) if children_uss else None,
        "bare_idle_private": None,
        "working_private": None,
        "working_prefork_pss": None,
        "working_baseline_pss": None,
        "probe_seconds": None,
    }
    return report, warning


def _from_titles(master_pid: int, children: list[int], runtime_dir: Path
                 ) -> tuple[str, dict[int, str]]:
    """The fleet and its workers' labels as the process titles say, for a master without
    a control socket (``control=False``, or another runtime directory)."""
    parsed = titles.parse(_command_line(master_pid))
    if parsed is None or parsed.role != "master":
        raise ProbeError(f"process {master_pid} is not a prefork master: no control socket "
                         f"in {runtime_dir} is its (give its --runtime-dir), nor is its "
                         "title a master's")
    labels = {}
    for pid in children:
        worker = titles.parse(_command_line(pid))
        if worker is not None and worker.role == "worker" and worker.label is not None:
            labels[pid] = worker.label
    return parsed.fleet, labels


def _command_line(pid: int) -> str:
    """``/proc/PID/cmdline`` as one line: a title set by setproctitle is padded with spaces
    or NULs to the length of the original command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            raw = cmdline.read()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()
