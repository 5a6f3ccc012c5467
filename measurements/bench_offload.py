"""What a ``run_kernel`` call costs beyond the kernel: inline, in the kernel pool, on Dask.

``make bench-offload``. One worker of a real ``prefork run`` master times its own
``run_kernel`` calls (``--bench-worker``, this script), in three masters started one after
the other, twice each, interleaved: no pool (inline), ``--kernel-workers 1``, and
``--offload`` to a Dask scheduler and one Dask worker on 127.0.0.1 started here (``dask
scheduler``, ``dask worker --no-nanny --nthreads 1``). Two inputs: small (one int) and
large (100,000 tuples of three ints, about the cpu fleet's 50,000-observation batch; the
kernel returns their count, so the answer is small). The kernel itself is a sum, cheap
beside the transfer, so the figures are overhead. 200 calls small, 20 large, after 5
warm-up calls; medians and p95 per call, in ms. Writes ``offload-bench.md`` and
``offload-bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import describe_machine

from prefork import Fleet, Worker

HERE = Path(__file__).resolve().parent
RESULTS_JSON = HERE / "offload-bench.json"
RESULTS_MD = HERE / "offload-bench.md"
CALLS = {"small": 200, "large": 20}
WARM_UP = 5
ROUNDS = 2


# -- the worker that times its calls (runs in the master's child) -------------------------


def kernel(data: object) -> int:
    """The kernel: a count (the large input's answer is as small as the small one's)."""
    return len(data) if isinstance(data, list) else int(data)  # type: ignore[arg-type]


def _inputs() -> dict[str, object]:
    return {"small": 7, "large": [(i, i * 3, i % 97) for i in range(100_000)]}


async def _time_calls() -> None:
    from prefork.offload import run_kernel

    out = Path(os.environ["BENCH_OUT"])
    results: dict[str, list[float]] = {}
    for size, data in _inputs().items():
        for _ in range(WARM_UP):
            await run_kernel(kernel, data)
        times = []
        for _ in range(CALLS[size]):
            started = time.perf_counter()
            await run_kernel(kernel, data)
            times.append((time.perf_counter() - started) * 1000)
        results[size] = times
    partial = out.with_suffix(".partial")
    partial.write_text(json.dumps(results))
    partial.replace(out)  # whole, for the bench that waits for it
    await asyncio.Event().wait()  # until the bench stops the master


fleet = Fleet("offload-bench", [Worker("timer", _time_calls)])


# -- the bench ---------------------------------------------------------------------------


def _dask(args: list[str], pattern: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([sys.executable, "-m", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert proc.stderr is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline().decode()
        if (found := re.search(pattern, line)) is not None:
            return proc, found.group(1) if found.groups() else ""
        if not line and proc.poll() is not None:
            break
    raise RuntimeError(f"{args[0]} did not start")


def _run_master(extra: list[str], work: Path) -> dict[str, list[float]]:
    out = work / "times.json"
    out.unlink(missing_ok=True)
    runtime = Path(tempfile.mkdtemp(dir=work))
    env = {**os.environ, "BENCH_OUT": str(out), "PYTHONPATH": str(HERE),
           "PREFORK_RUNTIME_DIR": str(runtime)}
    proc = subprocess.Popen([sys.executable, "-m", "prefork", "run", "--fleet",
                             "bench_offload:fleet", "--log-level", "warning", *extra],
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not out.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the bench worker did not finish ({extra})")
            time.sleep(0.1)
        return json.loads(out.read_text())
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def _summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {"median": statistics.median(ordered),
            "p95": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    scheduler, address = _dask(["distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                "--port", str(port), "--no-dashboard"],
                               r"Scheduler at:\s+(tcp://\S+)")
    worker, _ = _dask(["distributed.cli.dask_worker", address, "--no-nanny", "--nthreads",
                       "1", "--no-dashboard", "--host", "127.0.0.1"], r"(Registered) to:")
    ways = {"inline": [], "kernel pool": ["--kernel-workers", "1"],
            "Dask on loopback": ["--offload", address]}
    runs: dict[str, dict[str, list[float]]] = {w: {"small": [], "large": []} for w in ways}
    try:
        with tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
            for round_ in range(ROUNDS):
                for way, extra in ways.items():
                    times = _run_master(extra, Path(tmp))
                    for size in CALLS:
                        runs[way][size] += times[size]
                    print(f"round {round_ + 1} {way}: small "
                          f"{statistics.median(times['small']):.3f} ms, large "
                          f"{statistics.median(times['large']):.1f} ms", file=sys.stderr)
    finally:
        for proc in (worker, scheduler):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    document = {"machine": describe_machine(), "calls": CALLS, "rounds": ROUNDS,
                "results": {w: {s: _summary(t) for s, t in by.items()} for w, by in runs.items()},
                "raw": runs}
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n")
    machine = document["machine"]
    lines = ["# What a run_kernel call costs (`make bench-offload`)", "",
             f"{machine['date']}, Python {machine['python'].split()[0]}, {machine['cpu']}, "
             f"{machine['nproc']} cores, commit {machine['commit']}. Per call, ms, median "
             f"(p95) of {ROUNDS} masters x {CALLS['small']} small / {CALLS['large']} large "
             "calls; the kernel is a count, so this is the overhead.", "",
             "| way | small input (one int) | large input (100,000 tuples) |", "|---|---|---|"]
    for way, by in document["results"].items():
        lines.append(f"| {way} | {by['small']['median']:.3f} ({by['small']['p95']:.3f}) | "
                     f"{by['large']['median']:.1f} ({by['large']['p95']:.1f}) |")
    RESULTS_MD.write_text("\n".join(lines) + "\n")
    print(RESULTS_MD.read_text())


if __name__ == "__main__":
    main()
