"""The cpu fleet hosted three ways (and two halves of one), side by side on the same data:
``make hosting``.

1. ``C``: ``prefork run --fleet cpu``: four workers, one process each (kernels inline).
2. ``B in C``: ``prefork run --fleet cpu --group all=<the four> --kernel-workers 2``: the
   four hosted in one process, their two heavy kernels (``cluster_observations``,
   ``credential_reuse``) in two kernel processes forked from the master.
3. ``B``: the seeds' design rebuilt without prefork: one process (``--serve-b``, this
   script) runs the four worker coroutines on one event loop, and the same two kernels go
   to a ``ProcessPoolExecutor(max_workers=2)`` with the ``forkserver`` start method.

Each run gets a fresh copy of one generated demo database (``--observations``, default
the demo's 300,000) and its own session. Measured from this process, never from inside:

- catch-up: from start to the moment all four workers' watermarks reach the newest
  observation (read-only polls of the database every 50 ms);
- fleet PSS: the sum of ``Pss`` in ``/proc/PID/smaps_rollup`` over every process of the
  run's session, sampled every 250 ms while catching up (the peak is reported) and
  5 times from 6 s after catch-up, when each worker has polled once more and found
  nothing (idle: median);
- CPU time: ``utime + stime`` (and the children's the run reaped) of every process of the
  session at catch-up, against the wall time: above 1 means the work ran in parallel;
- results: a digest of every result table, which must be the same for every run.

Two more configurations take B in C apart: ``C + kernel pool`` (one process per worker,
kernels in a pool of 2) and ``group, kernels inline``. Configurations are interleaved
(C, B in C, B, C + kernel pool, group, C, ...) so drift hits all alike; the report
gives medians over ``--runs`` (default 3). Writes ``hosting.md`` and ``hosting.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from machine import describe_machine

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "hosting.json"
RESULTS_MD = HERE / "hosting.md"
MIB = 1024 * 1024
WORKERS = ("clusterer", "campaign-clusterer", "attribution", "reuse-correlate")
RESULT_TABLES = ("clusters", "campaigns", "identities", "attributions", "credential_reuse")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

PREFORK = [sys.executable, "-m", "prefork", "run", "--fleet", "cpu", "--log-level", "warning"]
GROUP = ["--group", f"all={','.join(WORKERS)}"]
POOL = ["--kernel-workers", "2"]
CONFIGS: dict[str, list[str]] = {
    "C": PREFORK,
    "B in C": [*PREFORK, *GROUP, *POOL],
    "B": [sys.executable, str(Path(__file__).resolve()), "--serve-b"],
    # The two halves of B in C alone: which one costs or saves what.
    "C + kernel pool": [*PREFORK, *POOL],
    "group, kernels inline": [*PREFORK, *GROUP],
}
IDLE_AFTER = 6.0  # seconds after catch-up: each worker has polled once more (every 5 s)


# -- design B, rebuilt: one process, a forkserver pool ----------------------------------


def serve_b() -> None:
    """The four worker coroutines on one loop; kernels in a forkserver pool of 2."""
    import asyncio
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from prefork_workers.cpu import loops

    pool = ProcessPoolExecutor(max_workers=2,
                               mp_context=multiprocessing.get_context("forkserver"))

    async def in_pool(fn: Any, *args: Any, offload_if: bool = True) -> Any:
        if not offload_if:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    loops.run_kernel = in_pool  # the loops call run_kernel by this name

    async def main() -> None:
        settings = loops.Settings()
        await asyncio.gather(*(loops.worker(name, settings)() for name in WORKERS))

    asyncio.run(main())


# -- measuring from outside -------------------------------------------------------------


def generate_demo(db: Path, observations: int) -> Path:
    """The cpu fleet's demo database with ``observations`` rows at ``db``, which each run
    copies: one generated data set for every configuration and run."""
    print(f"generating {observations:,} observations ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "prefork_workers.cpu", "generate", "--db", str(db),
                    "--observations", str(observations),
                    "--sources", str(max(1, observations // 100))], check=True,
                   stdout=subprocess.DEVNULL)
    return db


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


def pss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
    return total


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLOCK_TICKS


def watermarks(db: Path) -> tuple[dict[str, int], int]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as c:
        marks = dict(c.execute("SELECT worker, last_id FROM worker_watermarks"))
        latest = c.execute("SELECT coalesce(max(id), 0) FROM observations").fetchone()[0]
    return marks, latest


def digest(db: Path) -> str:
    h = hashlib.sha256()
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        for table in RESULT_TABLES:
            columns = [r[1] for r in c.execute(f"PRAGMA table_info({table})")
                       if r[1] not in ("id", "updated_at", "created_at")]
            rows = sorted(c.execute(f"SELECT {', '.join(columns)} FROM {table}"))
            h.update(f"{table}:{len(rows)}:{rows!r}".encode())
    return h.hexdigest()[:16]


def _catch_up(config: str, proc: subprocess.Popen[bytes], db: Path, started: float,
              log: str) -> tuple[float, float, list[int]]:
    """Sample the session's PSS every 250 ms until all four watermarks reach the newest
    observation: the seconds that took, the session's CPU seconds then, the samples."""
    samples: list[int] = []
    next_sample = started
    while True:
        now = time.monotonic()
        if proc.poll() is not None:
            raise RuntimeError(f"{config}: exited {proc.returncode}; see {log}")
        if now - started > 600:
            raise RuntimeError(f"{config}: no catch-up within 600 s; see {log}")
        if now >= next_sample:
            samples.append(pss(session_pids(proc.pid)))
            next_sample += 0.25
        try:
            marks, latest = watermarks(db)
        except sqlite3.Error:
            marks, latest = {}, 1
        if all(marks.get(w, 0) >= latest for w in WORKERS):
            caught_up = time.monotonic() - started
            return caught_up, cpu_seconds(session_pids(proc.pid)), samples
        time.sleep(0.05)


def run_once(config: str, template: Path, work: Path) -> dict[str, Any]:
    """One run of ``config`` in a directory of its own: its database copy (with no WAL
    left by another run), its runtime directory and its log."""
    work = Path(tempfile.mkdtemp(prefix=config.replace(" ", "_") + "-", dir=work))
    db = work / "cpu.sqlite3"
    shutil.copyfile(template, db)
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "PREFORK_DB": str(db), "PREFORK_RUNTIME_DIR": str(runtime)}
    with open(work / "log", "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(CONFIGS[config], env=env, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            caught_up, cpu, samples = _catch_up(config, proc, db, started, log.name)
            time.sleep(IDLE_AFTER)
            idle = []
            for _ in range(5):
                idle.append(pss(session_pids(proc.pid)))
                time.sleep(0.2)
            processes = len(session_pids(proc.pid))
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"config": config, "catch_up_s": caught_up, "cpu_s": cpu,
            "cpu_per_wall": cpu / caught_up, "working_pss_peak": max(samples),
            "working_pss_median": statistics.median(samples),
            "idle_pss": statistics.median(idle), "processes": processes,
            "digest": digest(db)}


def render(document: dict[str, Any]) -> str:
    runs = document["runs"]
    by = {c: [r for r in runs if r["config"] == c] for c in CONFIGS}

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in by[config])

    machine = document["machine"]
    lines = [
        "# Hosting the cpu fleet: C, B in C, B, and B in C's two halves (`make hosting`)",
        "",
        f"{machine['date']}, Python {machine['python'].split()[0]}, {machine['cpu']}, "
        f"{machine['nproc']} cores, commit {machine['commit']}; "
        f"{document['observations']:,} demo observations; medians of "
        f"{document['runs_per_config']} runs per configuration, interleaved.",
        "",
        "| configuration | processes | catch-up | CPU time | CPU / wall | fleet PSS working "
        "(peak) | fleet PSS idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        lines.append(
            f"| {config} | {by[config][0]['processes']} | {med(config, 'catch_up_s'):.2f} s | "
            f"{med(config, 'cpu_s'):.2f} s | {med(config, 'cpu_per_wall'):.2f} | "
            f"{med(config, 'working_pss_peak') / MIB:.1f} MiB | "
            f"{med(config, 'idle_pss') / MIB:.1f} MiB |")
    digests = {r["digest"] for r in runs}
    lines += ["", "Results: " + ("identical in every run (digest "
                                 f"{digests.pop()})." if len(digests) == 1 else
                                 f"DIFFER between runs: {sorted(digests)}."), ""]
    lines += ["Every run:", "", "| configuration | catch-up | CPU / wall | PSS peak | "
              "PSS idle | results digest |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['config']} | {r['catch_up_s']:.2f} s | {r['cpu_per_wall']:.2f} | "
              f"{r['working_pss_peak'] / MIB:.1f} MiB | {r['idle_pss'] / MIB:.1f} MiB | "
              f"{r['digest']} |" for r in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-b", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RUNS", "3")))
    parser.add_argument("--observations", type=int, default=300_000)
    parser.add_argument("--render", action="store_true", help="rewrite hosting.md from json")
    args = parser.parse_args()
    if args.serve_b:
        serve_b()
        return
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        return
    with tempfile.TemporaryDirectory(prefix="hosting-") as tmp:
        work = Path(tmp)
        template = generate_demo(work / "template.sqlite3", args.observations)
        runs = []
        for i in range(args.runs):
            for config in CONFIGS:
                result = run_once(config, template, work)
                print(f"run {i + 1}/{args.runs} {config}: {result['catch_up_s']:.2f} s, "
                      f"cpu/wall {result['cpu_per_wall']:.2f}, peak "
                      f"{result['working_pss_peak'] / MIB:.1f} MiB, idle "
                      f"{result['idle_pss'] / MIB:.1f} MiB", file=sys.stderr)
                runs.append(result)
    document = {"machine": describe_machine(), "observations": args.observations,
                "runs_per_config": args.runs, "runs": runs}
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n")
    RESULTS_MD.write_text(render(document))
    print(RESULTS_MD.read_text())


if __name__ == "__main__":
    main()
