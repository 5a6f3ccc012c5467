"""The copy-on-write probe: how much of each worker's memory is really its own.

``prefork probe --fleet SPEC`` measures what ``prefork run`` runs, because it runs it:
:func:`exec_measure` replaces the CLI by the measuring process
(:mod:`prefork.probe_measure`, the standard library alone), which starts ``prefork run
--fleet SPEC`` with its workers' code swapped for the probe's commands
(:mod:`prefork.probe_run`), reads every figure from outside while nothing of the CLI is
alive, and execs the CLI again, which turns what it measured into the report
(:func:`report_from`). The master imports the floor, warms it up if asked, freezes it,
and before its first fork hands the probe one socket per child; the probe reads the
master's memory (the floor), then the master forks a bare ``os.fork()`` child that only
sleeps (what a fork of this floor costs before prefork does anything in it), a sleeper
(a prefork child that sleeps as the bare fork does: prefork's own cost is the
difference) and its workers, as it always does. The probe measures them all while they
idle and again after each child ran its worker's warm-up and a full collection, asks
each for its import report, and stops the master; then it starts the baseline, K fresh
interpreters each importing the same floor, and measures them the same way.
:func:`probe_running` reads the figures of a live fleet (``probe --pid``).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import NoReturn

from prefork import after_fork, titles
from prefork.client import masters_in
from prefork.control import ControlError
from prefork.memory import Memory
from prefork.probe_measure import FIGURES_FD, ProbeError, Unreadable, parse_rollups, readable
from prefork.probe_report import ProbeReport, Sample, fleet_pss

__all__ = ["FIGURES_FD", "ROLLUPS_FD", "ProbeError", "exec_measure", "exec_snapshot",
           "probe_running", "report_from"]

# `probe --pid`'s: the pids of the master ($1) and its children, then their rollups, to
# fd 3; then run the rest of the arguments.
SNAPSHOT = ('pids="$1 $(cat /proc/"$1"/task/*/children 2>/dev/null)"; paths=""; '
            'for p in $pids; do paths="$paths /proc/$p/smaps_rollup"; done; '
            '{ echo $pids; cat $paths 2>&1; } >&3; shift; exec "$@"')
ROLLUPS_FD = 3
MEASURE_SCRIPT = Path(__file__).with_name("probe_measure.py")


# -- the probe of a fleet ----------------------------------------------------------------


def exec_measure(spec: str, *, workers: int | None, idle: tuple[float, ...], freeze: bool,
                 warm_up: bool, bare: bool, baseline: bool, argv: list[str]) -> NoReturn:
    """Replace this process by the measuring process (``python -I -S``, nothing but the
    standard library: :mod:`prefork.probe_measure`), which writes what it measured to a
    memfd at :data:`FIGURES_FD` and then runs ``argv``, which reads it
    (:func:`report_from`). The baseline imports the fleet as this process would (a
    module:ATTR fleet in the working directory too)."""
    options = {"spec": spec, "workers": workers, "idle": list(idle), "freeze": freeze,
               "warm_up": warm_up, "bare": bare, "baseline": baseline,
               "pythonpath": os.pathsep.join(p or os.getcwd() for p in sys.path)}
    memfd = os.memfd_create("prefork-probe-figures", 0)
    os.dup2(memfd, FIGURES_FD)  # inheritable: the measuring process, then argv, have it
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", str(MEASURE_SCRIPT),
                                  json.dumps(options), *argv])
    except OSError as exc:
        raise ProbeError(f"cannot run the measuring process: {exc}") from None


def report_from(fd: int, *, freeze: bool, warm_up: bool) -> ProbeReport:
    """The report of what the measuring process wrote to ``fd``; raises
    :class:`ProbeError` with its error, if it had one."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(fd, "rb") as figures:
            result = json.loads(figures.read() or b"{}")
    except (OSError, ValueError) as exc:
        raise ProbeError(f"cannot read what the probe measured: {exc}") from None
    if "error" in result:
        raise ProbeError(str(result["error"]))
    if "measured" not in result:
        raise ProbeError("the measuring process ended before it measured")
    measured = result["measured"]
    figures_keys = ("rss", "uss", "pss", "shared", "swap")
    report = ProbeReport(
        [Sample(row["role"], row["name"], row["pid"], row["phase"], row["at"],
                Memory(**{key: row[key] for key in figures_keys}))
         for row in measured["rows"]],
        imported_after_fork=[{"name": r["name"], "pid": r["pid"],
                              "imported_after_fork": after_fork.parse_report(r["report"])}
                             for r in measured["reports"]])
    idle = [s.at for s in report.processes if s.phase == "idle" and s.at is not None]
    report.summary = _summarize(report, measured, freeze, warm_up, max(idle))
    return report


def _summarize(report: ProbeReport, measured: dict, freeze: bool, warm_up: bool,
               last_idle: float) -> dict[str, object]:
    def at_last(phase: str) -> list[Sample]:
        return [s for s in report.processes
                if s.phase == phase and (phase != "idle" or s.at == last_idle)]

    def total(role: str, phase: str) -> int | None:
        picked = [s.memory.pss for s in at_last(phase) if s.role == role]
        return sum(picked) if picked else None

    def fleet(phase: str) -> int | None:
        return fleet_pss((s.role, s.memory.pss, s.memory.uss) for s in at_last(phase))

    def private(phase: str, role: str = "child") -> int | None:
        picked = [s.memory.uss for s in at_last(phase) if s.role == role]
        return int(statistics.median(picked)) if picked else None

    prefork_pss = fleet("idle")
    baseline_pss = total("baseline", "idle")
    return {
        "fleet": measured["fleet"],
        "workers": len(measured["children"]),
        "python": sys.version.split()[0],
        "freeze": freeze,
        "warm_up": warm_up,
        "floor_rss": measured["floor"]["rss"],
        "prefork_pss": prefork_pss,
        "baseline_pss": baseline_pss,
        "ratio": round(prefork_pss / baseline_pss, 4) if prefork_pss and baseline_pss else None,
        "idle_private": private("idle"),
        "bare_idle_private": private("idle", "bare"),
        "sleeper_idle_private": private("idle", "sleeper"),
        "working_private": private("working"),
        "working_prefork_pss": fleet("working"),
        "working_baseline_pss": total("baseline", "working"),
        "probe_seconds": round(statistics.median(measured["timings"]), 6),
    }


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
    sys.stdout.flush()
    sys.stderr.flush()
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
    memories = {pid: None if figure is None else Memory(**figure)
                for pid, figure in zip(pids, figures, strict=True)}
    try:
        master_memory = Memory(**readable(master_pid, figures[0]))
    except Unreadable as exc:
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
        "sleeper_idle_private": None,
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
