"""Dask workers forked by prefork against Dask's own, on the same floor: ``make bench-dask``.

1. ``prefork dask-worker ADDRESS --fleet cpu --nworkers N``: one master imports the cpu
   fleet's floor and ``distributed`` once and forks N workers (nthreads 1).
2. ``dask worker ADDRESS --nworkers N --nthreads 1 --preload prefork_workers.cpu.fleet``:
   Dask's own nanny, which spawns each worker (a fresh interpreter that imports
   ``distributed`` and, through ``--preload``, the same floor).

One scheduler on 127.0.0.1 (a subprocess) serves every run; a ``distributed.Client`` in
this process watches it. Measured from outside, per run:

- connected: seconds from starting the command until the scheduler has N workers
  (polled every 10 ms);
- memory, IDLE_AFTER seconds after that: each Dask worker's USS (``Private_Clean +
  Private_Dirty`` in ``/proc/PID/smaps_rollup``: what its death would free) and PSS, the
  workers' pids as the scheduler reports them (``client.run(os.getpid)``); and the PSS of
  every process of the run's session (prefork's master, or Dask's nanny process, too).

The two are interleaved, ``--runs`` times each (default 3); the report gives medians.
Writes ``dask-bench.md`` and ``dask-bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hosting import session_pids
from machine import describe_machine

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "dask-bench.json"
RESULTS_MD = HERE / "dask-bench.md"
MIB = 1024 * 1024
IDLE_AFTER = 5.0  # seconds after the last worker connected
FLOOR = "prefork_workers.cpu.fleet"
SCHEDULER = """
import asyncio
from distributed import Scheduler

async def main():
    async with Scheduler(host="127.0.0.1", port=0, dashboard=False) as scheduler:
        print(scheduler.address, flush=True)
        await scheduler.finished()

asyncio.run(main())
"""


def commands(address: str, nworkers: int, runtime: Path) -> dict[str, list[str]]:
    dask = str(Path(sys.executable).parent / "dask")
    return {
        "prefork dask-worker": [sys.executable, "-m", "prefork", "dask-worker", address,
                                "--fleet", "cpu", "--nworkers", str(nworkers),
                                "--log-level", "warning", "--runtime-dir", str(runtime)],
        "dask worker (nanny, spawn)": [dask, "worker", address, "--nworkers", str(nworkers),
                                       "--nthreads", "1", "--preload", FLOOR],
    }


def rollup(pid: int) -> dict[str, int]:
    """USS and PSS of ``pid``, in bytes."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0]) * 1024
    return {"uss": fields["Private_Clean"] + fields["Private_Dirty"], "pss": fields["Pss"]}


def worker_count(client: Any) -> int:
    return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.workers))


def run_once(config: str, command: list[str], client: Any, nworkers: int,
             work: Path) -> dict[str, Any]:
    with open(work / f"{config.split()[0]}-{time.monotonic_ns()}.log", "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while worker_count(client) < nworkers:
            if proc.poll() is not None:
                raise RuntimeError(f"{config}: exited {proc.returncode}; see {log.name}")
            if time.monotonic() - started > 300:
                raise RuntimeError(f"{config}: not connected in 300 s; see {log.name}")
            time.sleep(0.01)
        connected = time.monotonic() - started
        time.sleep(IDLE_AFTER)
        pids = sorted(client.run(os.getpid).values())
        workers = [rollup(pid) for pid in pids]
        session = session_pids(proc.pid)
        total_pss = sum(rollup(pid)["pss"] for pid in session)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        while worker_count(client):  # the next run starts with none
            time.sleep(0.01)
    return {"config": config, "connected_s": connected, "processes": len(session),
            "worker_uss": [w["uss"] for w in workers],
            "worker_pss": [w["pss"] for w in workers], "session_pss": total_pss}


def render(document: dict[str, Any]) -> str:
    m = document["machine"]
    runs = document["runs"]
    configs = list(dict.fromkeys(r["config"] for r in runs))

    def med(config: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["config"] == config)

    def worker_med(config: str, key: str) -> float:
        return statistics.median(statistics.median(r[key]) for r in runs
                                 if r["config"] == config)

    n = document["nworkers"]
    lines = [
        "# Dask workers: forked by prefork against spawned by Dask's nanny "
        "(`make bench-dask`)",
        "",
        f"{m['date']}, Python {m['python'].split()[0]}, {m['cpu']}, {m['nproc']} cores, "
        f"commit {m['commit']}; {n} workers of 1 thread each, floor "
        f"`{FLOOR}` (the cpu fleet's); medians of {document['runs_each']} runs each, "
        "interleaved; memory read "
        f"{IDLE_AFTER:g} s after the last worker connected, idle.",
        "",
        "| command | processes | connected after | USS per worker | PSS per worker "
        "| PSS of all its processes |",
        "|---|---|---|---|---|---|",
    ]
    for config in configs:
        lines.append(
            f"| {config} | {med(config, 'processes'):.0f} | {med(config, 'connected_s'):.2f} s "
            f"| {worker_med(config, 'worker_uss') / MIB:.1f} MiB "
            f"| {worker_med(config, 'worker_pss') / MIB:.1f} MiB "
            f"| {med(config, 'session_pss') / MIB:.1f} MiB |")
    if len(configs) == 2:
        ours, theirs = configs
        lines += ["", f"Per worker, {ours} holds "
                  f"{worker_med(theirs, 'worker_uss') / worker_med(ours, 'worker_uss'):.1f}x "
                  f"less private memory than {theirs}; its {n} workers were connected "
                  f"{med(theirs, 'connected_s') / med(ours, 'connected_s'):.1f}x sooner, and "
                  f"all its processes together have "
                  f"{med(theirs, 'session_pss') / med(ours, 'session_pss'):.1f}x less PSS."]
    lines += ["", "Every run (USS of each worker, MiB):", "",
              "| command | connected after | worker USS | PSS of all |", "|---|---|---|---|"]
    for r in runs:
        uss = ", ".join(f"{u / MIB:.1f}" for u in r["worker_uss"])
        lines.append(f"| {r['config']} | {r['connected_s']:.2f} s | {uss} "
                     f"| {r['session_pss'] / MIB:.1f} MiB |")
    lines += ["", "Method: `measurements/bench_dask.py` (its docstring).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nworkers", type=int, default=4)
    parser.add_argument("--render", action="store_true", help="only rewrite the .md")
    args = parser.parse_args()
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        return
    from distributed import Client

    machine = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="bench-dask-"))
    runtime = work / "run"
    runtime.mkdir(mode=0o700)
    scheduler = subprocess.Popen([sys.executable, "-c", SCHEDULER], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert scheduler.stdout is not None
    address = scheduler.stdout.readline().decode().strip()
    runs = []
    try:
        with Client(address, timeout=60) as client:
            for i in range(args.runs):
                for config, command in commands(address, args.nworkers, runtime).items():
                    result = run_once(config, command, client, args.nworkers, work)
                    print(f"run {i + 1}: {config}: connected in {result['connected_s']:.2f} s, "
                          f"worker USS {statistics.median(result['worker_uss']) / MIB:.1f} MiB, "
                          f"all PSS {result['session_pss'] / MIB:.1f} MiB", flush=True)
                    runs.append(result)
    finally:
        scheduler.terminate()
        scheduler.wait()
    document = {"machine": machine, "nworkers": args.nworkers, "runs_each": args.runs,
                "idle_after_s": IDLE_AFTER, "runs": runs}
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n")
    RESULTS_MD.write_text(render(document))


if __name__ == "__main__":
    main()
