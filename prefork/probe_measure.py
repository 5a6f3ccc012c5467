"""``prefork probe``'s measuring process: it starts the ``prefork run`` master, speaks to
its children and reads every figure, while nothing of the prefork CLI is alive.

It uses the standard library alone and runs as ``python -I -S probe_measure.py``: a
process alive beside the master maps the shared libraries it maps, and a page two
processes map is no longer either one's own. The prefork CLI maps libcrypto (hashlib),
libpython and psutil's and click's modules; alive beside a master on a floor with
SQLAlchemy, SQLModel and an HTTP client, it took 3 MiB of libcrypto's pages out of the
master's USS (10.6 MiB alone, 6.5 beside it, 9.9 beside this process;
``/proc/PID/smaps``, Python 3.11).
:mod:`prefork.probe` execs this process with the options as JSON, and this process
writes what it measured (:class:`Measured`, as JSON) to descriptor :data:`FIGURES_FD`,
then execs the command line it was given after them, which reports it.

The master is ``prefork run --probe-fd`` (:mod:`prefork.probe_run` is its side): before
its first fork it hands this process one socket per child, the bare fork's and the
sleeper's, and waits until the floor is read; its children then serve commands (``w``:
warm up, ``r``: import report, ``q``) and say ``ready PID``. Every figure is read by
separate processes (:class:`OutsideMeter`, ``sh`` and ``cat``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import NoReturn

Figures = dict[str, int]  # rss, uss, pss, shared, swap: bytes
Row = dict[str, object]  # role, name, pid, phase, at and the figures
FIGURES_FD = 3  # where main() writes what it measured
MAX_FDS = 200  # descriptors per message on the master's socket (the kernel takes 253)
STARTUP_TIMEOUT = 120.0
WORK_TIMEOUT = 600.0
REPORT_TIMEOUT = 10.0  # seconds for every child's import report
STOP_TIMEOUT = 15.0  # seconds for the probe's master to stop, before SIGKILL
ERROR_PREFIX = "prefork: error: "  # how `prefork run` says why it exits
_ROUTINE = re.compile(r"(\S+ \S+ )?\[\d+\] (DEBUG|INFO) ")  # prefork.logs' line, below WARNING


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
MAX_READERS = 4  # measuring shells at most, one per CPU


class ProbeError(Exception):
    """The probe could not measure. ``str()`` is one line for the user."""


class Unreadable(ProbeError):
    """A process's figures cannot be read: gone, or not ours to read."""


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

    def measure_all(self, pids: Sequence[int]) -> list[Figures]:
        """Every pid's figures, read in one request to each reader; the first unreadable
        pid raises :class:`Unreadable`."""
        count = max(min(len(self._processes), len(pids)), 1)
        shares = [list(pids[i::count]) for i in range(count)]
        readers = self._processes[:count]
        found: dict[int, Figures | None] = {}
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
        return [readable(pid, found[pid]) for pid in pids]

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


def parse_rollups(pids: Sequence[int], lines: Iterable[bytes]) -> list[Figures | None]:
    """``cat``'s output for the rollups of ``pids``: each pid's memory, or None for one
    cat could not read. Raises ProbeError if the output does not have one per pid."""
    memories: list[Figures | None] = []
    sums: dict[str, int] | None = None

    def close() -> None:
        if sums is not None:
            memories.append({"rss": sums["rss"], "uss": sums["uss"], "pss": sums["pss"],
                             "shared": max(sums["rss"] - sums["uss"], 0),
                             "swap": sums["swap"]})

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


def readable(pid: int, memory: Figures | None) -> Figures:
    """``memory``, or the :class:`Unreadable` that says why ``pid`` could not be read."""
    if memory is not None:
        return memory
    rollup = rollup_path(pid)
    if os.path.exists(rollup) and not os.access(rollup, os.R_OK):
        raise Unreadable(f"cannot read the memory of process {pid}: permission "
                                "denied (run as its user or as root)")
    raise Unreadable(f"process {pid} does not exist (any more)")  # or a zombie


@dataclass(frozen=True)
class _Member:
    """A measured process the probe speaks to: a `prefork run` child or a baseline
    interpreter."""

    role: str  # "child" or "baseline" (in messages, also "the master's")
    name: str
    pid: int
    read_fd: int
    write_fd: int
    process: subprocess.Popen[bytes] | None = None  # a baseline's, which owns its fds

    @property
    def target(self) -> tuple[str, str, int]:
        return self.role, self.name, self.pid


# What ends the probe if it becomes readable while the probe waits: a descriptor, and a
# function that raises the ProbeError saying why (or returns, if it was nothing).
Alarms = dict[int, Callable[[], None]]


# -- the probe of a fleet ----------------------------------------------------------------


def measure(spec: str, *, workers: int | None, idle: Sequence[float], freeze: bool,
            warm_up: bool, bare: bool, baseline: bool, pythonpath: str) -> Measured:
    """Measure the fleet ``spec`` under a real ``prefork run`` master, and, with
    ``baseline``, as K fresh interpreters whose ``PYTHONPATH`` is ``pythonpath``. Raises
    :class:`ProbeError`."""
    if workers is not None and workers < 1:
        raise ProbeError(f"--workers must be at least 1, got {workers}")
    idle_times = sorted(set(idle)) or [1.0]
    meter = OutsideMeter()  # first: the master started below does not inherit its pipes
    try:
        master = ProbedMaster(spec, workers, freeze=freeze, warm_up=warm_up, bare=bare)
        try:
            measured = _probe_prefork(meter, master, idle_times)
        except BaseException:
            master.stop(relay_log=False)
            raise
        master.stop(relay_log=True)
        if baseline:
            started = _start_baseline(spec, measured.children, pythonpath)
            try:
                _await_ready(started, {})
                _run_phases(measured.rows, meter, [], started, idle_times, {})
            finally:
                _stop_baseline(started)
    finally:
        meter.close()
    return measured


@dataclass
class Measured:
    """What the probe measured, in the shape :func:`main` hands on as JSON."""

    fleet: str
    children: list[tuple[str, int, str]]  # (worker, replica, label), in the probe's order
    floor: Figures  # the master's, just before its first fork
    timings: list[float]  # seconds each sample of the prefork processes took
    rows: list[Row] = field(default_factory=list)  # every process at every sample
    reports: list[dict[str, object]] = field(default_factory=list)  # name, pid, report


def _probe_prefork(meter: OutsideMeter, master: ProbedMaster,
                   idle_times: list[float]) -> Measured:
    fleet, children, max_report, bare, fds = master.receive_children()
    measured = Measured(fleet, children, meter.measure_all([master.pid])[0], [])
    master.go()
    targets = [("master", "master", master.pid)]
    if bare:  # --bare-fork: theirs come first
        bare_pid, sleeper_pid = master.receive_sleepers(fds[0], fds[1])
        targets += [("bare", "bare", bare_pid), ("sleeper", "sleeper", sleeper_pid)]
    alarms = master.alarms()
    members = [_Member("child", label, 0, fd, fd)
               for (_, _, label), fd in zip(children, fds[-len(children):], strict=True)]
    members = _await_ready(members, alarms)
    measured.timings = _run_phases(measured.rows, meter, targets, members, idle_times, alarms)
    measured.reports = _import_reports(members, alarms, max_report)
    return measured


class ProbedMaster:
    """The ``prefork run --probe-fd`` master the probe starts (:mod:`prefork.probe_run`
    is its side), in a session of its own, so a Ctrl-C reaches the probe, which stops
    it. Its log is kept in a file: its last error line is the probe's error; otherwise
    it is copied to stderr at the end. Raises :class:`ProbeError`."""

    def __init__(self, spec: str, workers: int | None, *, freeze: bool, warm_up: bool,
                 bare: bool) -> None:
        self.directory = tempfile.mkdtemp(prefix="prefork-probe-")  # its runtime dir
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by _clean_up)
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._ends: list[int] = []  # the probe's ends: bare fork, sleeper, children
        self._bare_pidfd = -1
        argv = [sys.executable, "-m", "prefork", "run", "--fleet", spec,
                "--runtime-dir", self.directory,
                "--freeze" if freeze else "--no-freeze",
                "--warm-up" if warm_up else "--no-warm-up",
                "--probe-fd", str(theirs.fileno()), *(["--probe-bare"] if bare else []),
                *([] if workers is None else ["--probe-workers", str(workers)])]
        # Not systemd's: this master is the probe's, not the unit's.
        env = {key: value for key, value in os.environ.items()
               if key not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "WATCHDOG_USEC")}
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, env=env,
                pass_fds=[theirs.fileno()], start_new_session=True)
        except OSError as exc:
            self._clean_up()
            raise ProbeError(f"cannot start prefork run: {exc}") from None
        finally:
            theirs.close()
        self.pid = self.process.pid
        self.pidfd = os.pidfd_open(self.pid)

    def receive_children(self) -> tuple[str, list[tuple[str, int, str]], int, bool,
                                        list[int]]:
        """The fleet's name, the children's (worker, replica, label), the most bytes an
        import report may have, whether it forks the bare child and the sleeper, and the
        probe's ends of their socket pairs and of one per child (:meth:`stop` closes
        them). Sent just before the master's first fork."""
        message, fds = self._receive(STARTUP_TIMEOUT)
        self._ends = fds
        try:
            header = json.loads(message)
            fleet = str(header["fleet"])
            children = [(str(name), int(replica), str(label))
                        for name, replica, label in header["children"]]
            max_report = int(header["max_report"])
            bare = bool(header["bare"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProbeError(f"the master said something else: {exc}") from None
        while len(fds) < 2 * bare + len(children):
            more, chunk = self._receive(STARTUP_TIMEOUT)
            if more != b"+" or not chunk:
                raise ProbeError("the master sent too few descriptors")
            fds += chunk
        return fleet, children, max_report, bare, fds

    def go(self) -> None:
        """The floor is read: the master may fork."""
        self.sock.send(b"g")

    def receive_sleepers(self, bare: int, sleeper: int) -> tuple[int, int]:
        """The pids of the bare fork and the sleeper, which each says on its socket
        (``bare``, ``sleeper``); they sleep until those are closed (:meth:`stop`)."""
        pids = []
        for fd, name in ((bare, "bare fork"), (sleeper, "sleeper")):
            said = _read_line(_Member("the master's", name, 0, fd, fd), "its pid",
                              STARTUP_TIMEOUT, self.alarms())
            if not said.isdigit():
                raise ProbeError(f"the master's {name} said {said[:80]!r}, not its pid")
            pids.append(int(said))
        self._bare_pidfd = os.pidfd_open(pids[0])
        return pids[0], pids[1]

    def alarms(self) -> Alarms:
        """The master exits, one of its children exits, or the bare fork exits."""
        alarms: Alarms = {self.pidfd: self._exited, self.sock.fileno(): self._message}
        if self._bare_pidfd >= 0:
            alarms[self._bare_pidfd] = self._bare_exited
        return alarms

    def _receive(self, timeout: float) -> tuple[bytes, list[int]]:
        readable, _, _ = select.select([self.sock, self.pidfd], [], [], timeout)
        if not readable:
            raise ProbeError(f"prefork run did not start its workers within {timeout:g} s")
        if self.sock not in readable:
            self._exited()
        message, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, MAX_FDS)
        if not message:
            self._exited()
        return message, fds

    def _message(self) -> None:
        message = self.sock.recv(4096).decode(errors="replace")
        if message.startswith("exited "):
            label, _, how = message[len("exited "):].partition(": ")
            raise ProbeError(f"child {label} exited during the probe ({how})")
        if not message:
            self._exited()

    def _bare_exited(self) -> None:
        raise ProbeError("the bare fork exited during the probe")

    def _exited(self) -> NoReturn:
        """Raise the master's error line, or how it ended and the last line it logged."""
        code = self.process.wait()
        lines = self._log_text().splitlines()
        for line in reversed(lines):
            if line.startswith(ERROR_PREFIX):
                raise ProbeError(line[len(ERROR_PREFIX):])
        how = f"exit code {code}" if code >= 0 else f"killed by signal {-code}"
        last = next((line.strip() for line in reversed(lines)
                     if line.strip() and not _ROUTINE.match(line)), "")
        raise ProbeError(f"prefork run exited during the probe ({how})"
                         + (f": {last}" if last else ""))

    def _log_text(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self, *, relay_log: bool) -> None:
        """Close the probe's ends (the bare fork, the sleeper and the children see EOF and
        exit), SIGTERM the master, SIGKILL it all if that takes longer than
        :data:`STOP_TIMEOUT`; reap the master, remove its runtime directory; copy its log
        to stderr if ``relay_log``."""
        for fd in self._ends:
            os.close(fd)
        self._ends = []
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)  # its children die with it (PDEATHSIG)
                self.process.wait()
        if relay_log:
            # It logs at `prefork run`'s default level, INFO (at WARNING its children held
            # 1.5% less than `prefork run`'s); those lines are not passed on.
            text = "".join(line for line in self._log_text().splitlines(keepends=True)
                           if not _ROUTINE.match(line))
            sys.stderr.write(text)
            sys.stderr.flush()
        self._clean_up()

    def _clean_up(self) -> None:
        for fd in (getattr(self, "pidfd", -1), self._bare_pidfd):
            if fd >= 0:
                os.close(fd)
        self._bare_pidfd = -1
        self.sock.close()
        self.log.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def _import_reports(members: list[_Member], alarms: Alarms, limit: int
                    ) -> list[dict[str, object]]:
    """Each child's report of what it imported after the fork (its warm-up's imports, in
    the working phase), the line :mod:`prefork.after_fork` makes for the master:
    ``{"name", "pid", "report"}`` per child."""
    for member in members:
        os.write(member.write_fd, b"r")
    found: list[dict[str, object]] = []
    for member in members:
        line = _read_line(member, "its import report", REPORT_TIMEOUT, alarms, limit + 1)
        found.append({"name": member.name, "pid": member.pid, "report": line})
    return found


def _run_phases(rows: list[Row], meter: OutsideMeter, others: list[tuple[str, str, int]],
                members: list[_Member], idle_times: list[float], alarms: Alarms
                ) -> list[float]:
    """Idle samples at ``idle_times`` from now (all members are ready), then the working
    one. ``others`` are measured but never spoken to. Returns how long each sampling of
    all the processes took."""
    targets = others + [m.target for m in members]
    timings = []
    up = time.monotonic()
    for at in idle_times:
        _watch_until(members, up + at, alarms)
        samples, seconds = _sample(meter, targets, "idle", at)
        rows.extend(samples)
        timings.append(seconds)
    for member in members:
        os.write(member.write_fd, b"w")
    for member in members:
        _expect(member, "worked", WORK_TIMEOUT, alarms)
    samples, seconds = _sample(meter, targets, "working", None)
    rows.extend(samples)
    timings.append(seconds)
    return timings




def _sample(meter: OutsideMeter, targets: list[tuple[str, str, int]], phase: str,
            at: float | None) -> tuple[list[Row], float]:
    started = time.perf_counter()
    memories = meter.measure_all([pid for _, _, pid in targets])
    samples = [{"role": role, "name": name, "pid": pid, "phase": phase, "at": at, **memory}
               for (role, name, pid), memory in zip(targets, memories, strict=True)]
    return samples, time.perf_counter() - started


# -- talking to the measured processes ------------------------------------------------


def _start_baseline(spec: str, children: list[tuple[str, int, str]], pythonpath: str
                    ) -> list[_Member]:
    """K fresh interpreters, each importing the fleet as a unit of its own would."""
    env = dict(os.environ, PYTHONPATH=pythonpath)
    started: list[_Member] = []
    try:
        for name, _, label in children:
            process = subprocess.Popen(
                [sys.executable, "-c", "from prefork.probe_run import baseline_main; "
                 "baseline_main()", spec, name],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
            assert process.stdin is not None and process.stdout is not None
            started.append(_Member("baseline", label, process.pid,
                                   process.stdout.fileno(), process.stdin.fileno(), process))
    except OSError as exc:
        _stop_baseline(started)
        raise ProbeError(f"cannot start the baseline: {exc}") from None
    return started


def _await_ready(members: list[_Member], alarms: Alarms) -> list[_Member]:
    """Wait until each member says ``ready PID``; the members with their pids."""
    ready = []
    for member in members:
        word, _, pid = _read_line(member, "'ready'", STARTUP_TIMEOUT, alarms).partition(" ")
        if word != "ready" or not pid.isdigit():
            raise ProbeError(f"{member.role} {member.name}: {word} {pid}".rstrip())
        ready.append(member if member.pid else dataclasses.replace(member, pid=int(pid)))
    return ready


def _read_line(member: _Member, what: str, timeout: float, alarms: Alarms,
               limit: int = 4096) -> str:
    """One line from ``member`` (at most ``limit`` bytes); ProbeError if it does not come
    within ``timeout``, if the member exits, or if an alarm goes off meanwhile."""
    who = f"{member.role} {member.name}" + (f" (pid {member.pid})" if member.pid else "")
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        readable = select.select([member.read_fd, *alarms], [], [], max(left, 0))[0]
        if member.read_fd not in readable:
            for fd in readable:
                alarms[fd]()
            if left <= 0 or not readable:
                raise ProbeError(f"{who} did not send {what} within {timeout:g} s")
            continue
        chunk = os.read(member.read_fd, 65536)
        if not chunk:
            raise ProbeError(f"{who} exited during the probe")
        line += chunk
        if len(line) > limit:
            raise ProbeError(f"{member.role} {member.name}: more than {limit} bytes "
                             f"instead of {what}")
    return line.decode(errors="replace").strip()


def _expect(member: _Member, word: str, timeout: float, alarms: Alarms) -> None:
    """Wait for ``member`` to say ``word``; raise ProbeError if it says otherwise or dies."""
    text = _read_line(member, repr(word), timeout, alarms)
    if text != word:
        raise ProbeError(f"{member.role} {member.name}: {text}")


def _watch_until(members: list[_Member], deadline: float, alarms: Alarms) -> None:
    """Wait until ``deadline``; a member that speaks or dies, or an alarm, is an error."""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([*(m.read_fd for m in members), *alarms], [], [],
                                       left)
        for member in members:
            if member.read_fd in readable:
                _expect(member, "(silence)", 0.1, alarms)
        for fd in readable:
            if fd in alarms:
                alarms[fd]()


def _stop_baseline(members: list[_Member]) -> None:
    """End every baseline process and reap it: ``q`` first, SIGKILL for one that does not
    go."""
    for member in members:
        try:
            os.write(member.write_fd, b"q")
        except OSError:
            pass
    deadline = time.monotonic() + 5.0
    for member in members:
        assert member.process is not None
        try:
            member.process.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            member.process.kill()
            member.process.wait()
        for stream in (member.process.stdin, member.process.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass


# -- the process ----------------------------------------------------------------------


def main(argv: list[str]) -> NoReturn:
    """``OPTIONS_JSON COMMAND...``: measure, write ``{"measured": ...}`` or ``{"error":
    ...}`` to :data:`FIGURES_FD`, exec COMMAND. Ctrl-C: exit 130, with everything ended."""
    options, command = json.loads(argv[0]), argv[1:]
    try:
        result: dict[str, object] = {"measured": asdict(measure(**options))}
    except ProbeError as exc:
        result = {"error": str(exc)}
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    os.write(FIGURES_FD, json.dumps(result).encode())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
