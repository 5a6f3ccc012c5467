"""Fleet memory before, during and after a code reload of the cpu fleet: ``make measure-reload``.

A reload (``prefork reload``, :mod:`prefork.reload`) imports the fleet's code in a trial
process, re-executes the master in place (same pid) and replaces the workers one at a
time. This script shows what that costs in memory, and that afterwards the fleet holds
one floor, not two. Each run, in a directory of its own:

1. ``prefork run --fleet cpu`` on a fresh copy of one generated demo database
   (``--observations``, default 300,000), in a session of its own; idle as
   ``hosting.py`` defines it: 6 s after all four watermarks reach the newest observation.
2. ``--reloads`` times (default 2): a deploy, then ``prefork reload --fleet cpu`` with the
   fleet's ``PREFORK_RUNTIME_DIR``. The deploy replaces one compiled extension of the
   floor, ``pydantic_core``'s, as pip does (a copy renamed over it: a new inode at the same
   path; the fleet runs with a copy of the package first on its ``PYTHONPATH``), so the
   old generation maps a file that is gone; the Python code is unchanged (the trial and
   the new image import it afresh either way). Fleet PSS sampled every 50 ms until the
   command returns, each
   sample put in its phase (trial, exec, rolling) by the master's own log lines; then idle
   again, 6 s after the reload ended (each new worker has polled once more).

Every idle point is also at least 11 s after the workers' fork: past the import report
the master asks of each worker 10 s after its fork (``prefork.after_fork``), which runs
in the worker and closes a pipe per worker in the master, so no generation is measured
before it and another after it.

Reload 1 replaces workers that caught up on the whole data set; reload 2 replaces
workers that, like their successors, only polled and found nothing: its after/before is
like for like. Fleet PSS is the sum of ``Pss`` in ``/proc/PID/smaps_rollup`` over the
master's session and the session of a trial it started (the trial leads one of its own),
read from this process. At each idle point it also records, per process, PSS, USS, RSS,
start time and the files it maps, the master's open descriptors, and MemAvailable.

What would show an old floor kept alive, checked after each reload: a process started
before the reload other than the master (an old worker, or anything forked from the old
image); the master's USS well above its USS before (the old image's heap kept); a file
mapped under a path that now names another file, or deleted (an old library kept); the
fleet's PSS above its PSS before. ``--runs`` (default 3) repeats everything; the report
gives medians. Writes ``reload.md`` and ``reload.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hosting import IDLE_AFTER, WORKERS, _catch_up, generate_demo, session_pids
from machine import describe_machine
from measure import _terminate, spawn, stop_all, stop_group

from prefork.after_fork import DEFAULT_REPORT_AFTER
from prefork.probe_measure import Figures, ProbeError, parse_rollups

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "reload.json"
RESULTS_MD = HERE / "reload.md"
MIB = 1024 * 1024
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY = 0.05
RELOAD_TIMEOUT = 120.0
SETTLED = DEFAULT_REPORT_AFTER + 1.0  # seconds after the fork: the import report is done
PREFORK = [sys.executable, "-m", "prefork"]  # log level info: the phases come from the log
PHASES = ("asked", "trial", "exec", "rolling", "ended")
# The master's log lines that begin each phase (prefork/master.py, prefork/watches.py).
PHASE_LINES = {
    "trial": "importing the fleet's code from disk in a trial process",
    "exec": "reload: the new code passed its trial; re-executing the master",
    "rolling": "reload: new code imported: rolling restart of",
    "ended": "reload done: code generation",
}
SHADOWED = "pydantic_core"  # a package of the floor whose compiled extension is mapped
# Shared anonymous memory and memfds show as deleted files; they are no file on disk.
NOT_FILES = ("/dev/zero", "/memfd:", "/SYSV", "/dev/shm/", "[")


# -- reading the fleet from outside ----------------------------------------------------


def fleet_pids(master: int) -> tuple[list[int], list[int]]:
    """The master's session, and the processes of the sessions its children lead (a
    reload's trial and the children it forks for the warm-ups)."""
    session = session_pids(master)
    others: list[int] = []
    try:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    except OSError:
        children = []
    for child in map(int, children):
        if child not in session:
            others += session_pids(child)
    return session, others


def rollups(pids: list[int]) -> dict[int, Figures]:
    """Each pid's memory (``prefork.probe_measure``'s figures); a pid gone meanwhile is left out."""
    found: dict[int, Figures] = {}
    for pid in pids:
        try:
            data = Path(f"/proc/{pid}/smaps_rollup").read_bytes()
            [figures] = parse_rollups([pid], data.splitlines(keepends=True))
        except (OSError, ProbeError):
            continue
        if figures is not None:
            found[pid] = figures
    return found


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (its identity across pid reuse)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def mapped_files(pid: int) -> tuple[set[tuple[int, int]], list[str]]:
    """The distinct (dev, inode) of the files ``pid`` maps, and the paths of those it maps
    that are stale: deleted, or the path now names another file."""
    files: dict[tuple[int, int], str] = {}
    try:
        lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    except OSError:
        return set(), []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[4] == "0" or parts[5].startswith(NOT_FILES):
            continue
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        files[(os.makedev(major, minor), int(parts[4]))] = parts[5]
    stale = []
    for (device, inode), path in files.items():
        try:
            info = os.stat(path)
        except OSError:  # "... (deleted)" among others
            stale.append(path)
            continue
        if (info.st_dev, info.st_ino) != (device, inode):
            stale.append(path)
    return set(files), stale


def shadow_package(site: Path) -> Path:
    """A copy of :data:`SHADOWED` in ``site`` (put first on the fleet's PYTHONPATH);
    returns the path of its compiled extension."""
    spec = importlib.util.find_spec(SHADOWED)
    assert spec is not None and spec.origin is not None, f"{SHADOWED} is not installed"
    shutil.copytree(Path(spec.origin).parent, site / SHADOWED)
    [extension] = (site / SHADOWED).glob("*.so")
    return extension


def deploy(extension: Path) -> None:
    """Replace ``extension`` as pip does: a new file renamed over the old path."""
    fresh = extension.with_name(extension.name + ".new")
    shutil.copyfile(extension, fresh)
    os.replace(fresh, extension)


def mapping_stale(master: int) -> int:
    """How many of the fleet's processes map a file that is stale (deleted, replaced)."""
    session, others = fleet_pids(master)
    return sum(bool(mapped_files(pid)[1]) for pid in session + others)


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def idle_snapshot(master: int) -> tuple[dict[str, Any], set[tuple[int, int]]]:
    """The idle fleet: fleet PSS and MemAvailable (medians of 5 reads 0.2 s apart), and
    every process's figures, start time and mapped files (at the middle read). Also the
    master's mapped files, returned apart (not for the json)."""
    totals, available, middle = [], [], {}
    session: list[int] = []
    others: list[int] = []
    for i in range(5):
        session, others = fleet_pids(master)
        figures = rollups(session + others)
        totals.append(sum(f["pss"] for f in figures.values()))
        available.append(mem_available())
        if i == 2:
            middle = figures
        time.sleep(0.2)
    processes, master_files = [], set()
    for pid, figures in sorted(middle.items()):
        files, stale = mapped_files(pid)
        if pid == master:
            master_files = files
        processes.append({"pid": pid, "role": "master" if pid == master else
                          "worker" if pid in session else "other",
                          "started": start_ticks(pid), "pss": figures["pss"],
                          "uss": figures["uss"], "rss": figures["rss"],
                          "files": len(files), "stale": stale})
    fds = len(os.listdir(f"/proc/{master}/fd"))
    return {"pss": statistics.median(totals), "mem_available": statistics.median(available),
            "processes": processes, "master_fds": fds, "other_sessions": len(others)}, \
        master_files


# -- one reload --------------------------------------------------------------------------


def log_times(log: Path, master: int, since: float) -> dict[str, float]:
    """When each phase began, from the master's log lines written at or after ``since``."""
    found: dict[str, float] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            at = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
        except ValueError:
            continue
        if at < since - 0.002 or f"[{master}]" not in line[23:35]:
            continue
        for phase, text in PHASE_LINES.items():
            if text in line and phase not in found:
                found[phase] = at
    return found


def phase_of(at: float, begins: dict[str, float]) -> str:
    current = "asked"
    for phase in PHASES[1:]:
        if phase in begins and at >= begins[phase]:
            current = phase
    return current


def reload_once(master: int, env: dict[str, str], log: Path, old: set[int],
                generation: int) -> dict[str, Any]:
    """``prefork reload --fleet cpu``, sampling the fleet every 50 ms until it returns."""
    asked = time.time()
    cli = subprocess.Popen([*PREFORK, "reload", "--fleet", "cpu"], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    samples = []
    next_at = time.monotonic()
    while cli.poll() is None:
        if time.time() - asked > RELOAD_TIMEOUT:
            cli.kill()
            raise RuntimeError(f"prefork reload: no answer in {RELOAD_TIMEOUT:g} s")
        before = time.time()
        session, others = fleet_pids(master)
        figures = rollups(session + others)
        at = (before + time.time()) / 2
        parts = {"master": 0, "old": 0, "new": 0, "trial": 0}
        for pid, fig in figures.items():
            role = ("master" if pid == master else "trial" if pid not in session
                    else "old" if pid in old else "new")
            parts[role] += fig["pss"]
        samples.append({"at": at, "pss": sum(parts.values()), **parts})
        next_at += SAMPLE_EVERY
        time.sleep(max(next_at - time.monotonic(), 0.0))
    output = cli.communicate()[0].decode(errors="replace").strip()
    took = time.time() - asked
    if cli.returncode != 0:
        raise RuntimeError(f"prefork reload exited {cli.returncode}: {output}")
    begins = log_times(log, master, asked)
    missing = [phase for phase in PHASE_LINES if phase not in begins]
    if missing:
        raise RuntimeError(f"no log line for the phases {missing}; see {log}")
    status = json.loads(subprocess.run([*PREFORK, "status", "--fleet", "cpu", "--json"],
                                       env=env, capture_output=True, check=True).stdout)
    reloads = status["reloads"]
    if reloads["generation"] != generation or not reloads["last_result"]["ok"] \
            or reloads["in_progress"]:
        raise RuntimeError(f"status after the reload: {reloads}")
    phases = {}
    for phase in PHASES[1:-1]:
        inside = [s["pss"] for s in samples if phase_of(s["at"], begins) == phase]
        end = begins[PHASES[PHASES.index(phase) + 1]]
        phases[phase] = {"seconds": end - begins[phase], "samples": len(inside),
                         "max_pss": max(inside, default=None)}
    peak = max(samples, key=lambda s: s["pss"])
    for sample in samples:
        sample["phase"] = phase_of(sample["at"], begins)
        sample["at"] = round(sample["at"] - asked, 4)
    return {"asked": asked, "ended": begins["ended"], "seconds": took, "output": output,
            "phases": phases,
            "peak_pss": peak["pss"], "peak_phase": peak["phase"], "peak": peak,
            "samples": samples, "status": reloads}


# -- one run -------------------------------------------------------------------------------


def compare(before: dict[str, Any], after: dict[str, Any], asked: float,
            files: tuple[set[tuple[int, int]], set[tuple[int, int]]]) -> dict[str, Any]:
    """What shows whether anything of the generation before survived the reload."""
    def master(snapshot: dict[str, Any]) -> dict[str, Any]:
        return next(p for p in snapshot["processes"] if p["role"] == "master")

    def workers(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
        return [p for p in snapshot["processes"] if p["role"] == "worker"]

    asked_ticks = (time.clock_gettime(time.CLOCK_BOOTTIME) - (time.time() - asked)) \
        * CLOCK_TICKS
    m0, m1 = master(before), master(after)
    old_pids = {p["pid"] for p in workers(before)}
    new = workers(after)
    return {
        "processes": len(after["processes"]), "workers": len(new),
        "other_sessions": after["other_sessions"],
        "master_same": (m0["pid"], m0["started"]) == (m1["pid"], m1["started"]),
        "workers_new": sum(p["pid"] not in old_pids for p in new),
        # Anything but the master started before the reload was asked: the old generation.
        "older_than_reload": sum(p["started"] is None or p["started"] < asked_ticks
                                 for p in after["processes"] if p["role"] != "master"),
        "pss_ratio": after["pss"] / before["pss"],
        "master_uss_ratio": m1["uss"] / m0["uss"], "master_pss_ratio": m1["pss"] / m0["pss"],
        "master_rss_ratio": m1["rss"] / m0["rss"],
        "master_files": [len(files[0]), len(files[1])],
        "master_files_gone": len(files[0] - files[1]), "master_files_new": len(files[1] - files[0]),
        "stale_mappings": sorted({path for p in after["processes"] for path in p["stale"]}),
        "stale_processes": sum(bool(p["stale"]) for p in after["processes"]),
        "master_fds": [before["master_fds"], after["master_fds"]],
        "mem_available_drop": before["mem_available"] - after["mem_available"],
    }


def settle(forked: float) -> None:
    """Wait until idle: IDLE_AFTER from now, and SETTLED after ``forked`` (monotonic)."""
    time.sleep(max(IDLE_AFTER, forked + SETTLED - time.monotonic()))


def run_once(template: Path, work: Path, reloads: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    db = work / "cpu.sqlite3"
    shutil.copyfile(template, db)
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    extension = shadow_package(work / "site")
    path = os.pathsep.join(filter(None, [str(work / "site"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PREFORK_DB": str(db), "PREFORK_RUNTIME_DIR": str(runtime),
           "PYTHONPATH": path}
    log_path = work / "log"
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = spawn([*PREFORK, "run", "--fleet", "cpu"], env=env, stdin=subprocess.DEVNULL,
                     stdout=log, stderr=subprocess.STDOUT)
        try:
            caught_up, _, working = _catch_up("C", proc, db, started, str(log_path))
            settle(started)
            snapshot, files = idle_snapshot(proc.pid)
            if not any(line.endswith(str(extension)) for line in
                       Path(f"/proc/{proc.pid}/maps").read_text().splitlines()):
                raise RuntimeError(f"the master does not map {extension}")
            stages, done = [snapshot], []
            for generation in range(1, reloads + 1):
                old = {p["pid"] for p in snapshot["processes"] if p["role"] == "worker"}
                deploy(extension)
                stale_at_deploy = mapping_stale(proc.pid)
                reload = reload_once(proc.pid, env, log_path, old, generation)
                reload["stale_at_deploy"] = stale_at_deploy
                settle(time.monotonic() - (time.time() - reload["ended"]))
                after, after_files = idle_snapshot(proc.pid)
                reload["after"] = compare(snapshot, after, reload["asked"],
                                          (files, after_files))
                stages.append(after)
                done.append(reload)
                snapshot, files = after, after_files
        finally:
            stop_group(proc)
    return {"caught_up_s": caught_up, "working_pss_peak": max(working), "stages": stages,
            "reloads": done}


# -- the report --------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def mib(size: float | None) -> str:
    return "-" if size is None else f"{size / MIB:.1f} MiB"


def render(document: dict[str, Any]) -> str:
    runs, machine = document["runs"], document["machine"]
    count = len(document["runs"][0]["reloads"])

    def stage(i: int, key: str, role: str | None = None) -> float:
        if role is None:
            return med([r["stages"][i][key] for r in runs])
        return med([med([p[key] for p in r["stages"][i]["processes"] if p["role"] == role])
                    for r in runs])

    def during(i: int, key: str) -> list[Any]:
        return [r["reloads"][i][key] for r in runs]

    def after(i: int, key: str) -> list[Any]:
        return [r["reloads"][i]["after"][key] for r in runs]

    def phase(i: int, name: str, key: str) -> float | None:
        values = [r["reloads"][i]["phases"][name][key] for r in runs]
        values = [v for v in values if v is not None]
        return med(values) if values else None

    def same(values: list[Any]) -> str:
        shown = sorted({str(v) for v in values})
        return shown[0] if len(shown) == 1 else " / ".join(shown)

    lines = [
        "# Fleet memory across a code reload of the cpu fleet (`make measure-reload`)",
        "",
        f"{machine['date']}, Python {machine['python'].split()[0]}, {machine['cpu']}, "
        f"{machine['nproc']} cores, commit {machine['commit']}; "
        f"{document['observations']:,} demo observations; medians of {len(runs)} runs "
        f"of {count} reloads each.",
        "",
        "Each deploy replaces the file of one compiled extension of the floor "
        f"(`{SHADOWED}`'s, from a copy of the package first on the fleet's PYTHONPATH) as "
        "pip does, by renaming a new copy over it: the running generation then maps a "
        "file that is gone. The Python code is unchanged, a fair stand-in for new code: "
        "the trial process and the re-executed master import the fleet's code afresh from "
        "disk either way. Then `prefork reload --fleet cpu`. Generation 0 caught up on the "
        "whole data set before it went idle; generations 1 and up started on a caught-up "
        "database, polled and found nothing, so generation 2 against 1 is like for like.",
        "",
        "## Idle (6 s after catch-up or after the reload ended, and at least "
        f"{SETTLED:g} s after the workers' fork)",
        "",
        "| generation | processes | fleet PSS | master PSS | master USS | master RSS | "
        "worker USS (median) | worker PSS (median) | MemAvailable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(count + 1):
        lines.append(
            f"| {i} | {same([len(r['stages'][i]['processes']) for r in runs])} | "
            f"{mib(stage(i, 'pss'))} | {mib(stage(i, 'pss', 'master'))} | "
            f"{mib(stage(i, 'uss', 'master'))} | {mib(stage(i, 'rss', 'master'))} | "
            f"{mib(stage(i, 'uss', 'worker'))} | {mib(stage(i, 'pss', 'worker'))} | "
            f"{mib(stage(i, 'mem_available'))} |")
    lines += [
        "",
        f"While generation 0 caught up (sampled every 250 ms): fleet PSS peak "
        f"{mib(med([r['working_pss_peak'] for r in runs]))}, catch-up "
        f"{med([r['caught_up_s'] for r in runs]):.2f} s.",
        "",
        "## During each reload (fleet PSS every 50 ms until `prefork reload` returned)",
        "",
        "Phases from the master's log: *trial* from the trial's start to \"passed its "
        "trial\"; *exec* from there to \"new code imported\" (the exec and the new image's "
        "import, while the old workers run on); *rolling* until \"reload done\". A phase's "
        "figure is the largest sample in it; a phase shorter than 50 ms may have none.",
        "",
        "| reload | took | trial | exec | rolling | peak fleet PSS (phase) | peak / idle before "
        "| max in trial | max in exec | max in rolling | samples trial/exec/rolling |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(count):
        ratio = med([r["reloads"][i]["peak_pss"] / r["stages"][i]["pss"] for r in runs])
        counts = "/".join(str(int(phase(i, p, "samples") or 0))
                          for p in ("trial", "exec", "rolling"))
        lines.append(
            f"| {i + 1} | {med(during(i, 'seconds')):.2f} s | "
            f"{phase(i, 'trial', 'seconds'):.2f} s | {phase(i, 'exec', 'seconds'):.2f} s | "
            f"{phase(i, 'rolling', 'seconds') * 1000:.0f} ms | "
            f"{mib(med(during(i, 'peak_pss')))} ({same(during(i, 'peak_phase'))}) | "
            f"{ratio:.2f} | {mib(phase(i, 'trial', 'max_pss'))} | "
            f"{mib(phase(i, 'exec', 'max_pss'))} | {mib(phase(i, 'rolling', 'max_pss'))} | "
            f"{counts} |")
    lines += [
        "",
        "At the peak of reload 1 (median run), fleet PSS split by process: "
        + ", ".join(f"{name} {mib(med([r['reloads'][0]['peak'][name] for r in runs]))}"
                    for name in ("master", "old", "new", "trial")) + ".",
        "",
        "## Afterwards: is anything of the old generation left?",
        "",
        "Every check in every run (a value differing between runs is shown as a / b).",
        "",
        "| reload | processes (workers, other sessions) | master pid kept | workers new | "
        "started before the reload, besides the master | fleet PSS after / before | "
        "master USS / PSS / RSS after / before | master's mapped files before → after "
        "(gone, new) | processes mapping a replaced file: after the deploy → after the reload | "
        "master fds before → after | MemAvailable drop |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i in range(count):
        files = after(i, "master_files")
        fds = after(i, "master_fds")
        lines.append(
            f"| {i + 1} | {same(after(i, 'processes'))} ({same(after(i, 'workers'))}, "
            f"{same(after(i, 'other_sessions'))}) | {same(after(i, 'master_same'))} | "
            f"{same(after(i, 'workers_new'))}/{len(WORKERS)} | "
            f"{same(after(i, 'older_than_reload'))} | {med(after(i, 'pss_ratio')):.3f} | "
            f"{med(after(i, 'master_uss_ratio')):.3f} / {med(after(i, 'master_pss_ratio')):.3f}"
            f" / {med(after(i, 'master_rss_ratio')):.3f} | "
            f"{same([f[0] for f in files])} → {same([f[1] for f in files])} "
            f"({same(after(i, 'master_files_gone'))}, {same(after(i, 'master_files_new'))}) | "
            f"{same(during(i, 'stale_at_deploy'))} → {same(after(i, 'stale_processes'))} | "
            f"{same([f[0] for f in fds])} → {same([f[1] for f in fds])} | "
            f"{mib(med(after(i, 'mem_available_drop')))} (runs: "
            + ", ".join(f"{d / MIB:+.1f}" for d in after(i, "mem_available_drop")) + ") |")
    lines += [
        "",
        "How to read it: an old floor kept alive would show as a process other than the "
        "master started before the reload (an old worker, or anything the old image "
        "forked), as a master USS after well above before (the old image's heap kept), as "
        "a process still mapping the replaced extension (or any file whose path now names "
        "another file or none), or as fleet PSS "
        "after above before. MemAvailable is the whole machine's, which other work "
        "moves by tens of MiB: noise, shown for what it is. Absolute PSS and USS move by a "
        "few MiB between invocations with what else runs (file pages shared with other "
        "Pythons on the machine are split with them, or private); compare within a run, "
        "as the ratios do. Fleet PSS after reload 1 is "
        "below before mostly because generation 0's workers had caught up on "
        f"{document['observations']:,} observations and kept the heap that grew; reload 2 "
        "compares workers that did the same.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RUNS") or 3))
    parser.add_argument("--reloads", type=int, default=2, help="reloads per run [2]")
    parser.add_argument("--observations", type=int, default=300_000)
    parser.add_argument("--render", action="store_true", help="rewrite reload.md from json")
    args = parser.parse_args()
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        print(RESULTS_MD.read_text())
        return
    if args.runs < 1 or args.reloads < 1:
        parser.error("--runs and --reloads must be at least 1")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        runs = measure(args)
    except KeyboardInterrupt:
        print("interrupted: stopped what ran; no report written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        stop_all()
    document = {"machine": describe_machine(), "observations": args.observations,
                "runs": runs}
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n")
    RESULTS_MD.write_text(render(document))
    print(RESULTS_MD.read_text())


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="reload-") as tmp:
        work = Path(tmp)
        template = generate_demo(work / "template.sqlite3", args.observations)
        runs = []
        for i in range(args.runs):
            result = run_once(template, work, args.reloads)
            pss = " -> ".join(mib(s["pss"]) for s in result["stages"])
            peaks = ", ".join(f"{mib(r['peak_pss'])} ({r['peak_phase']})"
                              for r in result["reloads"])
            print(f"run {i + 1}/{args.runs}: idle fleet PSS {pss}; peaks {peaks}",
                  file=sys.stderr)
            runs.append(result)
    return runs


if __name__ == "__main__":
    main()
