"""Memory of a forked fleet on CPython 3.11, 3.12 and 3.13, run by ``make measure``.

For every Python that pyenv has among 3.11, 3.12 and 3.13 this driver makes (or
refreshes) a venv ``.venv-measure/X.Y`` with prefork and its ``measure`` extra, then:

- runs ``prefork probe --fleet cpu --workers 8 --idle 0 --idle 10 --idle 60 --json`` with
  ``gc.freeze()`` (the default, plus the baseline: 8 fresh interpreters each importing the
  same floor), with ``--no-freeze``, and with ``--warm-up`` (master warmed before fork);
- runs the peer, gunicorn ``--preload`` with 8 sync workers on the same floor
  (``gunicorn_app.py``), and samples its master and workers at 0, 10 and 60 s after the
  workers are up, with the same measuring process the probe uses
  (``prefork.probe_measure.OutsideMeter``).

It writes ``memory.json`` (every raw probe document and gunicorn sample), ``memory.md``
(tables, findings and targets, all derived from the numbers, so a rerun updates them)
and ``memory.png`` (shared vs private per process) next to itself. ``--runs N`` (or
``$RUNS``) repeats every measurement and reports medians. ``--render`` rewrites the
report and the chart from ``memory.json`` without measuring. Targets are reported,
never asserted. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from machine import describe_machine

from prefork.probe_measure import OutsideMeter, ProbeError
from prefork.probe_report import fleet_pss

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SCRIPT = Path(__file__).resolve()
VENVS = ROOT / ".venv-measure"
RESULTS_JSON = HERE / "memory.json"
RESULTS_MD = HERE / "memory.md"
CHART = HERE / "memory.png"

MIB = 1024 * 1024
PYTHONS = ("3.11", "3.12", "3.13")
FLEET = "cpu"
WORKERS = 8
IDLE = (0.0, 10.0, 60.0)
VERSIONED = ("psutil", "gunicorn", "sqlmodel", "sqlalchemy", "pydantic", "matplotlib",
             "prefork")

# Targets (from the issue): reported against, never asserted.
PER_WORKER_OVER_FLOOR = 1.5 * MIB
WORKING_PRIVATE_MAX = 4 * MIB
PROBE_MAX_S = 0.020
BARE_FORK_MARGIN = 0.1 * MIB

# A difference under this much per process is called noise in the findings.
NOISE = 0.5 * MIB

Json = dict[str, Any]


def shown(path: Path) -> str:
    """``path`` relative to the project if it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def log(message: str) -> None:
    """One progress line on stderr."""
    print(f"measure: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Config:
    """One way of running the probe: its key in the results and its extra flags."""

    key: str
    label: str
    flags: tuple[str, ...]


CONFIGS = (
    Config("freeze", "gc.freeze() (default)", ()),
    Config("no-freeze", "--no-freeze", ("--no-freeze",)),
    Config("warm-up", "gc.freeze() + --warm-up", ("--warm-up",)),
)


# -- child processes: each in its own session, cleaned up whatever happens --------------

_live: set[subprocess.Popen[Any]] = set()
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM if the driver dies (even by SIGKILL)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def spawn(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` in a session of its own (Ctrl-C reaches only the driver, which
    then stops the whole group) and remember it for :func:`stop_group`."""
    proc = subprocess.Popen(list(argv), start_new_session=True, preexec_fn=_die_with_parent,
                            **kwargs)
    _live.add(proc)
    return proc


def stop_group(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM ``proc``'s process group (it leads it), SIGKILL what is left after
    ``grace`` seconds, and reap ``proc``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # The leader is gone; make sure none of its group outlived it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        break
    _live.discard(proc)


def stop_all() -> None:
    for proc in list(_live):
        stop_group(proc, grace=5.0)


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- Pythons and their venvs -------------------------------------------------------------


@dataclass(frozen=True)
class Interpreter:
    """A base Python found on the machine and the venv the driver makes from it."""

    minor: str  # "3.11"
    base: Path

    @property
    def venv(self) -> Path:
        return VENVS / self.minor

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def pyenv_versions() -> list[Path]:
    """The install directories of pyenv's versions (``$(pyenv root)/versions/*``)."""
    roots: list[Path] = []
    try:
        out = subprocess.run(["pyenv", "root"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip()
        roots.append(Path(out))
    except (OSError, subprocess.SubprocessError):
        pass
    roots += [Path(os.environ.get("PYENV_ROOT", "~/.pyenv")).expanduser()]
    for root in roots:
        if (root / "versions").is_dir():
            return sorted((root / "versions").iterdir())
    return []


def find_interpreters(wanted: Sequence[str]) -> tuple[list[Interpreter], dict[str, str]]:
    """The newest pyenv CPython of each wanted minor version; the rest, with a reason."""
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in pyenv_versions():
        match = re.fullmatch(r"(3\.\d+)\.(\d+)", path.name)  # plain CPython builds only
        python = path / "bin" / "python"
        if match and match.group(1) in wanted and os.access(python, os.X_OK):
            key = tuple(int(p) for p in path.name.split("."))
            if match.group(1) not in found or key > found[match.group(1)][0]:
                found[match.group(1)] = (key, python)
    interpreters, skipped = [], {}
    for minor in wanted:
        if minor in found:
            interpreters.append(Interpreter(minor, found[minor][1]))
        elif (python := shutil.which(f"python{minor}")) is not None:
            interpreters.append(Interpreter(minor, Path(python)))
        else:
            skipped[minor] = "not installed (no pyenv version, no python" + minor + " on PATH)"
    return interpreters, skipped


def prepare_venv(interp: Interpreter, log_dir: Path) -> None:
    """Create or refresh ``.venv-measure/X.Y`` with ``pip install -e '.[measure]'``;
    skipped when the stamp says this base Python and this pyproject.toml are installed."""
    stamp = interp.venv / ".installed-measure"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()
                          + str(interp.base.resolve()).encode()).hexdigest()
    if interp.python.exists() and stamp.exists() and stamp.read_text().strip() == want:
        return
    log(f"{interp.minor}: preparing {shown(interp.venv)} from {interp.base}")
    VENVS.mkdir(exist_ok=True)
    (VENVS / ".gitignore").write_text("*\n")  # the venvs never belong in git
    output = log_dir / f"pip-{interp.minor}.log"
    with output.open("w") as out:
        for argv in ([str(interp.base), "-m", "venv", "--clear", str(interp.venv)],
                     [str(interp.venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                      "--disable-pip-version-check", "-e", ".[measure]"]):
            proc = spawn(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(900)
            finally:
                stop_group(proc)
            if rc != 0:
                tail = output.read_text().strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"{argv[2] if argv[1] == '-m' else argv[0]} exited {rc}: "
                                   f"{tail[0]}")
    stamp.write_text(want + "\n")


def versions_of(interp: Interpreter) -> Json:
    """The venv's Python and the versions of the packages under the floor and the peer."""
    code = ("import json, platform, sys\nfrom importlib import metadata\nv = {}\n"
            f"for name in {VERSIONED!r}:\n"
            "    try:\n        v[name] = metadata.version(name)\n"
            "    except metadata.PackageNotFoundError:\n        v[name] = None\n"
            "print(json.dumps({'python': platform.python_version(), 'build': sys.version,"
            " 'packages': v}))")
    out = subprocess.run([str(interp.python), "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    return json.loads(out)


# -- the probe ---------------------------------------------------------------------------


def probe_argv(interp: Interpreter, config: Config, idle: Sequence[float], baseline: bool,
               workers: int) -> list[str]:
    argv = [str(interp.bin("prefork")), "probe", "--fleet", FLEET, "--workers", str(workers),
            "--bare-fork"]
    for at in idle:
        argv += ["--idle", f"{at:g}"]
    argv += [*config.flags, "--baseline" if baseline else "--no-baseline", "--json"]
    return argv


def run_probe(argv: Sequence[str], timeout: float) -> Json:
    """Run one probe; its JSON document, or RuntimeError with its last stderr line."""
    proc = spawn(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"probe still running after {timeout:.0f} s") from None
    finally:
        stop_group(proc)
    if proc.returncode != 0:
        last = err.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"probe exited {proc.returncode}: {last[0]}")
    try:
        return json.loads(out)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"probe printed no JSON document ({exc})") from None


# -- the peer: gunicorn --preload --------------------------------------------------------


def run_gunicorn(interp: Interpreter, idle: Sequence[float], workers: int,
                 boot_timeout: float = 120.0) -> Json:
    """gunicorn --preload with ``workers`` sync workers on the cpu floor, on a unix socket
    in a temp dir; master + workers measured ``idle`` seconds after all workers are up."""
    with tempfile.TemporaryDirectory(prefix="prefork-measure-") as tmp:
        read_end, write_end = os.pipe()
        gunicorn_log = Path(tmp) / "gunicorn.log"
        argv = [str(interp.bin("gunicorn")), "--preload", "--workers", str(workers),
                "--worker-class", "sync", "--bind", f"unix:{tmp}/gunicorn.sock",
                "--config", str(HERE / "gunicorn_conf.py"), "--chdir", str(HERE),
                "--pythonpath", str(HERE), "gunicorn_app:app"]
        env = {**os.environ, "MEASURE_READY_FD": str(write_end)}
        started = time.monotonic()
        with gunicorn_log.open("w") as out:
            proc = spawn(argv, cwd=HERE, env=env, pass_fds=(write_end,), stdout=out,
                         stderr=subprocess.STDOUT)
        os.close(write_end)
        try:
            booted = wait_for_workers(proc, read_end, workers, started + boot_timeout,
                                      gunicorn_log)
            up = time.monotonic()
            samples: list[Json] = []
            processes: list[Json] = []
            # Read as the probe reads its fleet, by the same kind of process, so the
            # figures and the times compare.
            meter = OutsideMeter()
            try:
                for at in idle:
                    time.sleep(max(0.0, up + at - time.monotonic()))
                    pids = [proc.pid, *worker_pids(proc.pid)]
                    began = time.perf_counter()
                    try:
                        memories = meter.measure_all(pids)
                    except ProbeError as exc:
                        raise RuntimeError(f"gunicorn: {exc}") from None
                    took = time.perf_counter() - began
                    rows = []
                    for pid, memory in zip(pids, memories, strict=True):
                        role = "master" if pid == proc.pid else "worker"
                        rows.append({"role": role, "name": role, "pid": pid, "phase": "idle",
                                     "at": time.monotonic() - up, **memory})
                    processes += rows
                    samples.append({"at": at, "processes": len(rows),
                                    "measure_seconds": took})
            finally:
                meter.close()
            return {"workers": workers, "boot_seconds": up - started, "booted_pids": booted,
                    "samples": samples, "processes": processes}
        finally:
            os.close(read_end)
            stopped = time.monotonic()
            stop_group(proc, grace=35.0)
            log(f"  gunicorn stopped in {time.monotonic() - stopped:.1f} s")


def worker_pids(master: int) -> list[int]:
    """The pids of gunicorn's workers: its master's children."""
    return sorted(child.pid for child in psutil.Process(master).children())


def wait_for_workers(proc: subprocess.Popen[Any], read_end: int, workers: int,
                     deadline: float, gunicorn_log: Path) -> list[int]:
    """Block on the ready pipe until ``workers`` distinct workers reported in and are the
    master's children; RuntimeError if gunicorn exits or the deadline passes."""
    reported: set[int] = set()
    buffer = b""
    while True:
        if proc.poll() is not None:
            tail = gunicorn_log.read_text().strip().splitlines()[-1:] or ["(no output)"]
            raise RuntimeError(f"gunicorn exited {proc.returncode} before its workers were "
                               f"up: {tail[0]}")
        if len(reported) >= workers:
            children = set(worker_pids(proc.pid))
            if len(children) == workers and reported >= children:
                return sorted(children)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RuntimeError(f"gunicorn: {len(reported)} of {workers} workers up after "
                               "the boot timeout")
        ready, _, _ = select.select([read_end], [], [], min(remaining, 0.5))
        if ready:
            chunk = os.read(read_end, 4096)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            reported.update(int(line) for line in lines if line.strip())


# -- derived figures ---------------------------------------------------------------------


def nearest(at: float | None, idle: Sequence[float]) -> float | None:
    """The requested idle time a sample taken ``at`` seconds after the fork belongs to."""
    if at is None:
        return None
    return min(idle, key=lambda t: abs(t - at))


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def sum_or_none(values: Sequence[int]) -> int | None:
    return sum(values) if values else None


def tag(at: float) -> str:
    return f"{at:g}s"


def derive_probe(doc: Json, idle: Sequence[float]) -> Json:
    """Flat figures of one probe document: the summary, plus per idle time the fleet's
    PSS and the median child's private (USS) and shared memory."""
    summary = doc["summary"]
    rows = doc["processes"]
    out: Json = {k: summary.get(k) for k in (
        "floor_rss", "prefork_pss", "baseline_pss", "ratio", "idle_private",
        "bare_idle_private", "working_private", "working_prefork_pss", "working_baseline_pss",
        "probe_seconds")}
    for at in idle:
        here = [r for r in rows if r["phase"] == "idle" and nearest(r["at"], idle) == at]
        children = [r for r in here if r["role"] == "child"]
        out[f"fleet_pss_{tag(at)}"] = fleet_pss((r["role"], r["pss"], r["uss"]) for r in here)
        out[f"children_{tag(at)}"] = len(children)
        out[f"idle_private_{tag(at)}"] = median_or_none([r["uss"] for r in children])
        out[f"idle_private_max_{tag(at)}"] = max((r["uss"] for r in children), default=None)
        out[f"idle_shared_{tag(at)}"] = median_or_none([r["shared"] for r in children])
        out[f"idle_rss_{tag(at)}"] = median_or_none([r["rss"] for r in children])
        out[f"master_uss_{tag(at)}"] = median_or_none(
            [r["uss"] for r in here if r["role"] == "master"])
        # The bare os.fork() child of the master, and a prefork child that sleeps as it
        # does (probes since the bare baseline, and since the sleeper): prefork's own cost
        # is the sleeper's excess over the bare fork; an idle child's over the sleeper is
        # its idle loop's. Before the sleeper, the idle child stood in for it.
        out[f"bare_private_{tag(at)}"] = median_or_none(
            [r["uss"] for r in here if r["role"] == "bare"])
        out[f"sleeper_private_{tag(at)}"] = median_or_none(
            [r["uss"] for r in here if r["role"] == "sleeper"])
        private, bare = out[f"idle_private_{tag(at)}"], out[f"bare_private_{tag(at)}"]
        sleeper = out[f"sleeper_private_{tag(at)}"]
        prefork = private if sleeper is None else sleeper
        out[f"prefork_cost_{tag(at)}"] = (None if prefork is None or bare is None
                                          else prefork - bare)
        out[f"idle_loop_{tag(at)}"] = (None if private is None or sleeper is None
                                       else private - sleeper)
        baseline = [r for r in here if r["role"] == "baseline"]
        out[f"baseline_pss_{tag(at)}"] = sum_or_none([r["pss"] for r in baseline])
        out[f"baseline_private_{tag(at)}"] = median_or_none([r["uss"] for r in baseline])
    working = [r for r in rows if r["phase"] == "working" and r["role"] == "child"]
    out["working_children"] = len(working)
    out["working_private_median"] = median_or_none([r["uss"] for r in working])
    out["working_private_max"] = max((r["uss"] for r in working), default=None)
    out["working_shared"] = median_or_none([r["shared"] for r in working])
    # Split a working child's growth: the floor pages it un-shared (its shared memory
    # shrank: refcounts, specialized bytecode, dicts written) and what it allocated anew
    # (the rest of the USS growth: its data, SQLite's page cache, the allocator's arenas).
    last_idle = {r["pid"]: r for r in rows if r["phase"] == "idle" and r["role"] == "child"
                 and nearest(r["at"], idle) == idle[-1]}
    paired = [(last_idle[r["pid"]], r) for r in working if r["pid"] in last_idle]
    out["working_unshared"] = median_or_none([i["shared"] - w["shared"] for i, w in paired])
    out["working_new"] = median_or_none(
        [(w["uss"] - i["uss"]) - (i["shared"] - w["shared"]) for i, w in paired])
    out["master_uss_working"] = median_or_none(
        [r["uss"] for r in rows if r["phase"] == "working" and r["role"] == "master"])
    for name in sorted({base_name(r["name"]) for r in working}):
        out[f"working_private[{name}]"] = median_or_none(
            [r["uss"] for r in working if base_name(r["name"]) == name])
    return out


def base_name(label: str) -> str:
    """A worker's name without its replica suffix: ``clusterer.1`` -> ``clusterer``."""
    return re.sub(r"[.#]\d+$", "", label)


def derive_gunicorn(run: Json, idle: Sequence[float]) -> Json:
    """Flat figures of one gunicorn run, keyed like :func:`derive_probe`'s."""
    out: Json = {"boot_seconds": run["boot_seconds"]}
    for at, sample in zip(idle, run["samples"], strict=False):
        here = [r for r in run["processes"] if nearest(r["at"], idle) == at]
        workers = [r for r in here if r["role"] == "worker"]
        out[f"processes_{tag(at)}"] = len(here)
        out[f"fleet_pss_{tag(at)}"] = sum(r["pss"] for r in here)
        out[f"idle_private_{tag(at)}"] = median_or_none([r["uss"] for r in workers])
        out[f"idle_private_max_{tag(at)}"] = max((r["uss"] for r in workers), default=None)
        out[f"idle_shared_{tag(at)}"] = median_or_none([r["shared"] for r in workers])
        out[f"master_rss_{tag(at)}"] = sum(r["rss"] for r in here if r["role"] == "master")
        out[f"master_uss_{tag(at)}"] = sum(r["uss"] for r in here if r["role"] == "master")
        out[f"measure_seconds_{tag(at)}"] = sample["measure_seconds"]
    return out


def medians(figures: Sequence[Json]) -> Json:
    """Key by key, the median over runs of each number (None where no run has one)."""
    keys: dict[str, None] = {}
    for f in figures:
        keys.update(dict.fromkeys(f))
    out: Json = {}
    for key in keys:
        values = [f[key] for f in figures
                  if isinstance(f.get(key), int | float) and not isinstance(f.get(key), bool)]
        out[key] = statistics.median(values) if values else None
    return out


def check_probe(doc: Json, idle: Sequence[float], workers: int, baseline: bool) -> list[str]:
    """What looks wrong in a probe document: missing fields or figures that disagree."""
    problems: list[str] = []
    summary = doc.get("summary", {})
    if doc.get("schema") != 1:
        problems.append(f"schema is {doc.get('schema')!r}, not 1")
    d = derive_probe(doc, idle)
    last = tag(idle[-1])
    for at in idle:
        if d[f"children_{tag(at)}"] != workers:
            problems.append(f"{d[f'children_{tag(at)}']} children sampled at {at:g} s, "
                            f"not {workers}")
    if d["working_children"] != workers:
        problems.append(f"{d['working_children']} working children, not {workers}")
    if d[f"fleet_pss_{last}"] is not None and summary.get("prefork_pss") is not None:
        diff = abs(d[f"fleet_pss_{last}"] - summary["prefork_pss"])
        if diff > 64 * 1024:
            problems.append(f"summary prefork_pss {summary['prefork_pss']} != the fleet's "
                            f"PSS at {idle[-1]:g} s {d[f'fleet_pss_{last}']}")
    if baseline:
        if summary.get("baseline_pss") is None:
            problems.append("no baseline_pss although --baseline")
        elif summary.get("ratio") is not None:
            ratio = summary["prefork_pss"] / summary["baseline_pss"]
            if abs(ratio - summary["ratio"]) > 0.005:
                problems.append(f"ratio {summary['ratio']} != prefork_pss / baseline_pss "
                                f"{ratio:.3f}")
    for row in doc.get("processes", []):
        if row["uss"] > row["rss"] or row["pss"] > row["rss"] or row["uss"] > row["pss"]:
            problems.append(f"{row['role']} {row['name']} ({row['phase']}): not "
                            "uss <= pss <= rss")
            break
        if row["shared"] != row["rss"] - row["uss"]:
            problems.append(f"{row['role']} {row['name']}: shared != rss - uss")
            break
    return problems


# -- the driver --------------------------------------------------------------------------


def measure_python(interp: Interpreter, runs: int, idle: Sequence[float], workers: int,
                   log_dir: Path) -> Json:
    """Every probe configuration and the gunicorn peer on one Python, ``runs`` times."""
    result: Json = {"base": str(interp.base), "venv": shown(interp.venv),
                    "probes": {}, "gunicorn": [], "errors": [], "checks": []}
    began = time.monotonic()
    prepare_venv(interp, log_dir)
    result["versions"] = versions_of(interp)
    timeout = 2 * max(idle) + 600
    for run in range(runs):
        for index, config in enumerate(CONFIGS):
            baseline = index == 0
            argv = probe_argv(interp, config, idle, baseline, workers)
            what = f"{interp.minor} {config.key} run {run + 1}/{runs}"
            log(f"{what}: {' '.join(argv[1:])}")
            started = time.monotonic()
            try:
                doc = run_probe(argv, timeout)
            except RuntimeError as exc:
                log(f"ERROR {what}: {exc}")
                result["errors"].append(f"{config.key} run {run + 1}: {exc}")
                continue
            doc["wall_seconds"] = time.monotonic() - started
            result["probes"].setdefault(config.key, []).append(doc)
            try:
                problems = check_probe(doc, idle, workers, baseline)
            except (KeyError, TypeError, ValueError, statistics.StatisticsError) as exc:
                problems = [f"the document does not follow the probe's contract: "
                            f"{type(exc).__name__}: {exc}"]
            for problem in problems:
                log(f"CHECK {what}: {problem}")
                result["checks"].append(f"{config.key} run {run + 1}: {problem}")
            log(f"{what}: done in {doc['wall_seconds']:.0f} s")
        what = f"{interp.minor} gunicorn --preload run {run + 1}/{runs}"
        log(f"{what}: {workers} sync workers")
        try:
            peer = run_gunicorn(interp, idle, workers)
        except RuntimeError as exc:
            log(f"ERROR {what}: {exc}")
            result["errors"].append(f"gunicorn run {run + 1}: {exc}")
            continue
        result["gunicorn"].append(peer)
        for sample in peer["samples"]:
            if sample["processes"] != workers + 1:
                problem = f"{sample['processes']} processes at {sample['at']:g} s, not " \
                          f"{workers + 1}"
                log(f"CHECK {what}: {problem}")
                result["checks"].append(f"gunicorn run {run + 1}: {problem}")
        log(f"{what}: done, workers up in {peer['boot_seconds']:.1f} s")
    result["wall_seconds"] = time.monotonic() - began
    return result


def drive(args: argparse.Namespace) -> int:
    """Measure every Python, then write memory.json, memory.md and memory.png."""
    began = time.monotonic()
    interpreters, skipped = find_interpreters(args.python or PYTHONS)
    for minor, why in skipped.items():
        log(f"skipping Python {minor}: {why}")
    results: Json = {
        "schema": 1,
        "environment": describe_machine(),
        "settings": {"fleet": FLEET, "workers": args.workers, "idle": list(args.idle),
                     "runs": args.runs, "configs": {c.key: list(c.flags) for c in CONFIGS}},
        "skipped": skipped,
        "pythons": {},
    }
    failed = 0
    with tempfile.TemporaryDirectory(prefix="prefork-measure-logs-") as logs:
        for interp in interpreters:
            try:
                results["pythons"][interp.minor] = measure_python(
                    interp, args.runs, args.idle, args.workers, Path(logs))
            except (RuntimeError, OSError, subprocess.SubprocessError,
                    json.JSONDecodeError) as exc:
                failed += 1
                log(f"ERROR Python {interp.minor}: {exc}")
                results["pythons"][interp.minor] = {"base": str(interp.base),
                                                    "fatal": str(exc)}
                continue
            if results["pythons"][interp.minor]["errors"]:
                failed += 1
    results["total_wall_s"] = time.monotonic() - began
    results["environment"]["loadavg_at_end"] = os.getloadavg()
    write_outputs(results)
    log(f"wrote {RESULTS_JSON.name}, {RESULTS_MD.name}"
        + (f", {CHART.name}" if results["chart"]["drawn"] else "")
        + f" in {results['total_wall_s'] / 60:.1f} min")
    return 1 if failed else 0


def write_outputs(results: Json) -> None:
    """memory.json, then the chart (drawn by a venv that has matplotlib), then memory.md."""
    results["chart"] = draw_chart_with_a_venv(results)
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    RESULTS_MD.write_text(render_markdown(results))


def draw_chart_with_a_venv(results: Json) -> Json:
    """Run ``measure.py --chart`` with the first measure venv whose matplotlib imports
    (the driver itself needs only the stdlib and prefork)."""
    tried: list[str] = []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as data:
        json.dump(results, data)
        data.flush()
        for minor in results["pythons"]:
            python = VENVS / minor / "bin" / "python"
            if not python.exists():
                continue
            proc = subprocess.run([str(python), str(SCRIPT), "--chart", data.name],
                                  capture_output=True, text=True, timeout=300, check=False)
            if proc.returncode == 0:
                return {"drawn": True, "by": minor}
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            tried.append(f"{minor}: {last}")
    note = "; ".join(tried) if tried else "no measure venv to draw it with"
    log(f"no chart: {note}")
    CHART.unlink(missing_ok=True)
    return {"drawn": False, "note": note}


# -- the chart (runs in a measure venv, with matplotlib) ----------------------------------


def draw_chart(results: Json, path: Path) -> None:
    """Stacked bars, shared under private (USS), one bar per process: prefork's master
    and children idle at the last sample and working, the baseline's interpreters, and
    gunicorn's master and workers; one panel per Python."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idle = results["settings"]["idle"]
    last = idle[-1]
    pythons = [(m, p) for m, p in results["pythons"].items() if p.get("probes")]
    if not pythons:
        raise RuntimeError("nothing to draw")
    fig, axes = plt.subplots(len(pythons), 1, figsize=(15, 4.2 * len(pythons)), squeeze=False)
    colours = {"prefork idle": ("#9ecae1", "#08519c"), "prefork working": ("#a1d99b", "#006d2c"),
               "working, --no-freeze": ("#fcbba1", "#a50f15"),
               "baseline": ("#fdae6b", "#a63603"), "gunicorn --preload": ("#bcbddc", "#54278f")}
    for ax, (minor, data) in zip(axes[:, 0], pythons, strict=True):
        bars: list[tuple[str, str, int, int]] = []  # (group, label, shared, private)
        probe = (data["probes"].get("freeze") or [None])[0]
        if probe is not None:
            rows = probe["processes"]
            for role in ("master", "child"):
                for r in rows:
                    if r["role"] == role and r["phase"] == "idle" \
                            and nearest(r["at"], idle) == last:
                        bars.append(("prefork idle", r["name"], r["shared"], r["uss"]))
            for role in ("master", "child"):
                for r in rows:
                    if r["role"] == role and r["phase"] == "working":
                        bars.append(("prefork working", r["name"], r["shared"], r["uss"]))
        unfrozen = (data["probes"].get("no-freeze") or [None])[0]
        if unfrozen is not None:
            for role in ("master", "child"):
                for r in unfrozen["processes"]:
                    if r["role"] == role and r["phase"] == "working":
                        bars.append(("working, --no-freeze", r["name"], r["shared"], r["uss"]))
        if probe is not None:
            for r in probe["processes"]:
                if r["role"] == "baseline" and r["phase"] == "idle" \
                        and nearest(r["at"], idle) == last:
                    bars.append(("baseline", r["name"], r["shared"], r["uss"]))
        if data.get("gunicorn"):
            for r in data["gunicorn"][0]["processes"]:
                if nearest(r["at"], idle) == last:
                    bars.append(("gunicorn --preload", r["role"], r["shared"], r["uss"]))
        xs = list(range(len(bars)))
        shared = [b[2] / MIB for b in bars]
        private = [b[3] / MIB for b in bars]
        ax.bar(xs, shared, color=[colours[b[0]][0] for b in bars], edgecolor="white",
               linewidth=0.5)
        ax.bar(xs, private, bottom=shared, color=[colours[b[0]][1] for b in bars],
               edgecolor="white", linewidth=0.5)
        ax.set_xticks(xs, [b[1] for b in bars], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("MiB (light: shared, dark: private USS)")
        version = data.get("versions", {}).get("python", minor)
        ax.set_title(f"Python {version}: cpu fleet, {results['settings']['workers']}"
                     f" workers; idle bars at {last:g} s after the fork; gc.freeze() unless "
                     "marked", fontsize=10)
        start = 0
        for group in colours:
            count = sum(1 for b in bars if b[0] == group)
            if count:
                ax.annotate(group, xy=(start + (count - 1) / 2, 0.97),
                            xycoords=("data", "axes fraction"), ha="center", va="top",
                            fontsize=8, color=colours[group][1])
                if start:
                    ax.axvline(start - 0.5, color="#888888", linewidth=0.6)
                start += count
        ax.set_xlim(-0.6, len(bars) - 0.4)
        ax.set_ylim(0, max(s + p for s, p in zip(shared, private, strict=True)) * 1.15)
        ax.grid(axis="y", linewidth=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# -- the report --------------------------------------------------------------------------


def m(size: float | None, digits: int = 1) -> str:
    """Bytes as MiB, or a dash."""
    return "-" if size is None else f"{size / MIB:.{digits}f}"


def na(size: float | None, digits: int = 2, sign: str = "") -> str:
    """Bytes as MiB, or n/a: a figure older probe documents do not have."""
    return "n/a" if size is None else f"{size / MIB:{sign}.{digits}f}"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def met(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**NOT met**")


def figures(results: Json) -> dict[str, Json]:
    """Per Python: median figures of each probe configuration and of gunicorn."""
    idle = results["settings"]["idle"]
    out: dict[str, Json] = {}
    for minor, data in results["pythons"].items():
        if "probes" not in data:
            continue
        per: Json = {key: medians([derive_probe(d, idle) for d in docs])
                     for key, docs in data["probes"].items() if docs}
        if data.get("gunicorn"):
            per["gunicorn"] = medians([derive_gunicorn(r, idle) for r in data["gunicorn"]])
        out[minor] = per
    return out


def render_markdown(results: Json) -> str:
    env = results["environment"]
    settings = results["settings"]
    idle = settings["idle"]
    figs = figures(results)
    runs = settings["runs"]
    lines = [
        f"# prefork memory: a forked fleet on CPython {', '.join(results['pythons']) or '-'}, "
        f"{env['date'][:10]}",
        "",
        f"Measured {env['date']} by `make measure` (`measurements/measure.py`), "
        f"{runs} run{'s' if runs != 1 else ''} of everything"
        + (" (medians over the runs)" if runs > 1 else "") + ". MiB throughout.",
        "",
        f"- Machine: {env['cpu']}, nproc {env['nproc']}, {env['mem_total_kib'] // 1024} MiB "
        f"RAM; {env['kernel']}",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in env['loadavg_at_start'])}"
        + (f"; at the end: {', '.join(f'{x:.2f}' for x in env['loadavg_at_end'])}"
           if "loadavg_at_end" in env else ""),
        f"- prefork at {env['commit']}; fleet `{settings['fleet']}`, {settings['workers']} "
        f"workers (the 4 cpu workers, cycled), idle samples at "
        f"{', '.join(f'{t:g}' for t in idle)} s after the fork",
        f"- Whole run: {results.get('total_wall_s', 0) / 60:.1f} min",
    ]
    for minor, data in results["pythons"].items():
        v = data.get("versions")
        if v:
            pk = v["packages"]
            lines.append(f"- Python {v['python']} (`{data['venv']}` from {data['base']}): "
                         + ", ".join(f"{k} {pk[k] or 'missing'}" for k in VERSIONED))
        else:
            lines.append(f"- Python {minor}: **failed**: {data.get('fatal', 'no results')}")
    for minor, why in results["skipped"].items():
        lines.append(f"- Python {minor}: skipped, {why}")
    lines += ["", *targets_section(figs, settings), "", *pss_section(figs, settings),
              "", *private_section(figs, settings), "", *findings_section(figs, settings), ""]
    chart = results.get("chart", {})
    lines += ["## Chart", ""]
    if chart.get("drawn"):
        lines += ["![Shared and private memory per process](memory.png)", "",
                  f"Each bar is one process: shared pages (light) under its private ones (USS, "
                  f"dark), from the first gc.freeze() run and the first gunicorn run, idle at "
                  f"{idle[-1]:g} s and working.", ""]
    else:
        lines += [f"Not drawn: {chart.get('note', 'matplotlib missing')}.", ""]
    problems = [(minor, p) for minor, data in results["pythons"].items()
                for p in data.get("errors", []) + data.get("checks", [])]
    fatal = [(minor, data["fatal"]) for minor, data in results["pythons"].items()
             if "fatal" in data]
    if problems or fatal:
        lines += ["## Errors and checks", ""]
        lines += [f"- {minor}: {p}" for minor, p in fatal + problems]
        lines.append("")
    lines += [METHOD.format(last=idle[-1], workers=settings["workers"],
                            idle_flags=" ".join(f"--idle {t:g}" for t in idle),
                            idle_list=", ".join(f"{t:g}" for t in idle))]
    return "\n".join(lines)


def targets_section(figs: dict[str, Json], settings: Json) -> list[str]:
    workers = settings["workers"]
    last = tag(settings["idle"][-1])
    lines = ["## Targets", "",
             "| Target | Python | Measured | Limit | Result |", "|---|---|---|---|---|"]
    for minor, per in figs.items():
        f, g = per.get("freeze"), per.get("gunicorn")
        if f is None:
            continue
        pss, floor = f.get(f"fleet_pss_{last}"), f.get("floor_rss")
        if pss is not None and floor is not None:
            limit = floor + workers * PER_WORKER_OVER_FLOOR
            lines.append(f"| {workers}-worker cpu fleet idle PSS <= floor + 1.5 MiB/worker "
                         f"| {minor} | {m(pss)} | {m(limit)} ({m(floor)} + {workers} x 1.5) "
                         f"| {met(pss <= limit)} |")
            gp = g.get(f"fleet_pss_{last}") if g else None
            lines.append(f"| ... and below gunicorn --preload | {minor} | {m(pss)} | "
                         f"{m(gp)} | {met(None if gp is None else pss < gp)} |")
        private, cost = f.get(f"sleeper_private_{last}"), f.get(f"prefork_cost_{last}")
        lines.append(f"| a prefork child that sleeps <= a bare os.fork() child + 0.1 MiB "
                     f"private | {minor} | "
                     f"{na(private)} vs {na(f.get(f'bare_private_{last}'))} "
                     f"({na(cost, sign='+')}) | +0.10 | "
                     f"{met(None if cost is None else cost <= BARE_FORK_MARGIN)} |")
        for key in ("freeze", "warm-up"):
            c = per.get(key)
            if c is None or c.get("working_private_max") is None:
                continue
            med, top = c["working_private_median"], c["working_private_max"]
            result = ("met (every child)" if top <= WORKING_PRIVATE_MAX else
                      "median met, **max NOT met**" if med <= WORKING_PRIVATE_MAX else
                      "**NOT met**")
            lines.append(f"| working child <= 4 MiB private ({key}) | {minor} | median "
                         f"{m(med, 2)}, max {m(top, 2)} | 4.00 | {result} |")
        times = [c["probe_seconds"] for key, c in per.items()
                 if key != "gunicorn" and c.get("probe_seconds") is not None]
        if times:
            med, top = statistics.median(times), max(times)
            result = ("met (every configuration)" if top < PROBE_MAX_S else
                      "median met, **max NOT met**" if med < PROBE_MAX_S else "**NOT met**")
            lines.append(f"| probe < 20 ms for {workers + 3} processes | {minor} | median "
                         f"{ms(med)}, max {ms(top)} ({len(times)} configurations) | 20 ms "
                         f"| {result} |")
    return lines


def pss_section(figs: dict[str, Json], settings: Json) -> list[str]:
    workers = settings["workers"]
    at = settings["idle"][-1]
    last = tag(at)
    lines = [f"## The fleet's memory (PSS), idle at {at:g} s", "",
             f"Sum of PSS over the fleet's processes: prefork's master and {workers} children; "
             f"{workers} fresh interpreters importing the same floor (the baseline: one "
             f"systemd unit per worker); gunicorn `--preload`'s master and {workers} sync "
             "workers on the same floor.", "",
             "| Python | floor RSS | prefork | baseline | gunicorn --preload "
             "| prefork / baseline | prefork - gunicorn | working: prefork | working: baseline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for minor, per in figs.items():
        f, g = per.get("freeze"), per.get("gunicorn") or {}
        if f is None:
            continue
        pss, base = f.get(f"fleet_pss_{last}"), f.get("baseline_pss")
        gp = g.get(f"fleet_pss_{last}")
        ratio = f"{pss / base:.2f}" if pss and base else "-"
        diff = f"{(pss - gp) / MIB:+.1f}" if pss is not None and gp is not None else "-"
        lines.append(f"| {minor} | {m(f['floor_rss'])} | {m(pss)} | {m(base)} | {m(gp)} | "
                     f"{ratio} | {diff} | {m(f.get('working_prefork_pss'))} | "
                     f"{m(f.get('working_baseline_pss'))} |")
    return lines


def private_section(figs: dict[str, Json], settings: Json) -> list[str]:
    idle = settings["idle"]
    workers = settings["workers"]
    last = tag(idle[-1])
    head = " | ".join(f"idle private {t:g} s" for t in idle)
    lines = ["## Private memory per child (USS, median of the children)", "",
             "Idle children wait for the probe's next command with the GC on; a working "
             "child has run its worker's warm-up (its real kernel on sample data) and a full "
             "`gc.collect()`. gunicorn's rows are its sync workers, idle. The bare fork is a "
             "plain `os.fork()` child of the master, made just before its workers, that only "
             "sleeps: what a child costs before prefork does anything in it. The sleeper is a "
             "prefork child, set up as every worker is, that sleeps as the bare fork does: "
             "prefork's own cost is its private memory less the bare fork's (before the "
             "sleeper, the idle child's was used; n/a: a probe from before the bare fork). "
             "The idle loop is the idle children's excess over the sleeper.", ""]
    for minor, per in figs.items():
        lines += [f"### Python {minor}", "",
                  f"| configuration | floor RSS | fleet PSS {idle[-1]:g} s | {head} | bare fork "
                  f"{idle[-1]:g} s | sleeper {idle[-1]:g} s | prefork's cost {idle[-1]:g} s "
                  f"| idle loop {idle[-1]:g} s | shared per "
                  f"child {idle[-1]:g} s | working private (median / max) | working fleet PSS "
                  f"| probe, {workers + 3} processes |",
                  "|---|" + "---|" * (10 + len(idle))]
        for config in CONFIGS:
            c = per.get(config.key)
            if c is None:
                lines.append(f"| {config.label} | failed |" + " |" * (9 + len(idle)))
                continue
            lines.append(
                f"| {config.label} | {m(c['floor_rss'])} | {m(c.get(f'fleet_pss_{last}'))} | "
                + " | ".join(m(c.get(f"idle_private_{tag(t)}"), 2) for t in idle)
                + f" | {na(c.get(f'bare_private_{last}'))} | "
                f"{na(c.get(f'sleeper_private_{last}'))} | "
                f"{na(c.get(f'prefork_cost_{last}'), sign='+')} | "
                f"{na(c.get(f'idle_loop_{last}'), sign='+')}"
                + f" | {m(c.get(f'idle_shared_{last}'))} | {m(c.get('working_private_median'), 2)}"
                f" / {m(c.get('working_private_max'), 2)} | {m(c.get('working_prefork_pss'))} | "
                f"{ms(c.get('probe_seconds'))} |")
        g = per.get("gunicorn")
        if g is not None:
            lines.append(
                f"| gunicorn --preload | {m(g.get(f'master_rss_{tag(idle[0])}'))} | "
                f"{m(g.get(f'fleet_pss_{last}'))} | "
                + " | ".join(m(g.get(f"idle_private_{tag(t)}"), 2) for t in idle)
                + f" | - | - | - | - | {m(g.get(f'idle_shared_{last}'))} | - | - | "
                f"{ms(g.get(f'measure_seconds_{last}'))} |")
        f = per.get("freeze")
        if f is not None:
            by_worker = {k[len("working_private["):-1]: v for k, v in f.items()
                         if k.startswith("working_private[") and v is not None}
            if by_worker:
                lines += ["", "Working private by worker (gc.freeze()): " + ", ".join(
                    f"{name} {m(v, 2)}" for name, v in sorted(by_worker.items(),
                                                             key=lambda kv: -kv[1])) + "."]
        lines.append("")
    return lines[:-1]


SEED_SHARED = 71e6
SEED_IDLE_PRIVATE = 1e6
SEED_WORKING = 26e6


def findings_section(figs: dict[str, Json], settings: Json) -> list[str]:
    """The questions the issue asks, answered from this run's numbers."""
    idle = settings["idle"]
    workers = settings["workers"]
    first, last = tag(idle[0]), tag(idle[-1])
    lines = ["## Findings", "", "Generated from the numbers above (gc.freeze() runs unless said "
             "otherwise); a difference under 0.5 MiB per process is called noise.", ""]
    pythons = [(minor, per) for minor, per in figs.items() if "freeze" in per]
    if not pythons:
        return [*lines, "No probe results: nothing to conclude."]

    def compare(gain: float, more: str, less: str, same: str) -> str:
        return more if gain > NOISE else less if gain < -NOISE else same

    def freeze_line(minor: str, per: Json) -> str | None:
        f, n = per.get("freeze"), per.get("no-freeze")
        if f is None or n is None:
            return None
        idle_gain = n[f"idle_private_{last}"] - f[f"idle_private_{last}"]
        work_gain = n["working_private_median"] - f["working_private_median"]
        wpss_gain = n["working_prefork_pss"] - f["working_prefork_pss"]
        idle_verdict = compare(idle_gain, "it matters", "it costs memory",
                               "no measurable difference")
        work_verdict = compare(work_gain, "**it matters**", "**it costs memory**",
                               "**no measurable difference**")
        return (f"{minor}: idle, {idle_verdict}: {m(n[f'idle_private_{last}'], 2)} MiB "
                f"private per child at {idle[-1]:g} s without it, "
                f"{m(f[f'idle_private_{last}'], 2)} with it ({idle_gain / MIB:+.2f}). Working, "
                f"{work_verdict}: {m(n['working_private_median'], 2)} MiB per child without "
                f"it against {m(f['working_private_median'], 2)} ({work_gain / MIB:+.2f}); "
                f"fleet PSS {m(n['working_prefork_pss'])} against "
                f"{m(f['working_prefork_pss'])} MiB ({wpss_gain / MIB:+.1f}). Without it the "
                f"master's own USS goes from {m(n[f'master_uss_{last}'])} idle to "
                f"{m(n['master_uss_working'])} MiB working, though the master ran nothing: "
                "the pages the children copied are now its alone.")

    old = [(mi, pe) for mi, pe in pythons if mi == "3.11"]
    new = [(mi, pe) for mi, pe in pythons if mi != "3.11"]
    for title, group in (("Does gc.freeze() matter on 3.11?", old),
                         ("On 3.12 and 3.13 (immortal objects, PEP 683)?", new)):
        answers = [a for a in (freeze_line(mi, pe) for mi, pe in group) if a]
        if answers:
            lines += [f"**{title}**", ""] + [f"- {a}" for a in answers] + [""]
    idle_same = [abs(pe["no-freeze"][f"idle_private_{last}"] - pe["freeze"][f"idle_private_{last}"])
                 < NOISE for _, pe in pythons if "no-freeze" in pe]
    if idle_same and all(idle_same):
        lines += ["Idle, a probe child only makes short-lived garbage, freed at once, so no "
                  "collection walks the floor within the window: that is why frozen and "
                  "unfrozen children look alike idle. The working figures show what the "
                  "first full collection costs, which a real worker pays sooner or later.", ""]

    # The seed's claim, measured on 3.14 only.
    lines += ["**Does the seed's claim hold here?** It said (CPython 3.14): an idle forked "
              "child keeps ~71 MB shared and dirties ~1 MB private, a working child ~26 MB, "
              "and immortal objects make gc.freeze() unnecessary.", ""]
    for minor, per in pythons:
        f, n = per["freeze"], per.get("no-freeze")
        shared, private = f[f"idle_shared_{last}"], f[f"idle_private_{last}"]
        working = f["working_private_median"]
        near = abs(working - SEED_WORKING) < 0.3 * SEED_WORKING
        parts = [f"an idle child shares {m(shared)} MiB ({shared / 1e6:.0f} MB; "
                 f"{'about' if abs(shared - SEED_SHARED) < 0.15 * SEED_SHARED else 'not'} the "
                 f"seed's 71 MB, and bounded by this floor: the master's RSS is "
                 f"{m(f['floor_rss'])} MiB)",
                 f"it dirties {m(private, 2)} MiB private ({private / 1e6:.1f} MB; "
                 f"{'about' if private < 2 * SEED_IDLE_PRIVATE else 'more than'} the seed's "
                 f"~1 MB)",
                 f"a working child {m(working, 1)} MiB ({'about' if near else 'far from'} the "
                 f"seed's ~26 MB)"]
        if n is not None:
            unfrozen = n["working_private_median"]
            if abs(unfrozen - SEED_WORKING) < 0.3 * SEED_WORKING and not near:
                parts[-1] += (f", but {m(unfrozen, 1)} MiB without gc.freeze(), which is the "
                              "seed's figure")
            gain = max(n[f"idle_private_{last}"] - f[f"idle_private_{last}"],
                       unfrozen - working)
            immortal = minor != "3.11"
            if gain > NOISE:
                parts.append("gc.freeze() is **not** unnecessary: " + (
                    "immortal objects do not spare the floor's pages from the collector"
                    if immortal else "3.11 has no immortal objects"))
            else:
                parts.append("gc.freeze() makes no measurable difference here"
                             + ("" if immortal else ", even without immortal objects"))
        lines.append(f"- {minor}: " + "; ".join(parts) + ".")
    lines.append("")

    times = "/".join(f"{t:g}" for t in idle)
    lines += ["**How does private memory grow over time?**", ""]
    firsts: list[float] = []
    later: list[float] = []
    for minor, per in pythons:
        cells = []
        for key, c in [(c.key, per.get(c.key)) for c in CONFIGS] + [
                ("gunicorn worker", per.get("gunicorn"))]:
            if c is None:
                continue
            series = [c.get(f"idle_private_{tag(t)}") for t in idle]
            if None in series:
                continue
            step = [b - a for a, b in itertools.pairwise(series)]
            firsts.append(step[0])
            later += step[1:]
            cells.append(f"{key} " + " -> ".join(m(v, 2) for v in series)
                         + f" ({(series[-1] - series[0]) / MIB:+.2f})")
        lines.append(f"- {minor}, median child MiB private at {times} s: " + "; ".join(cells)
                     + ".")
    if later and firsts:
        drift = max(abs(s) for s in later)
        lines.append(f"- In short: {min(firsts) / MIB:+.2f} to {max(firsts) / MIB:+.2f} MiB "
                     f"between {idle[0]:g} and {idle[1]:g} s, then at most {drift / MIB:.2f} MiB "
                     f"either way up to {idle[-1]:g} s: an idle child's private memory "
                     + ("settles within seconds." if drift < NOISE / 5 else "keeps moving."))
    for minor, per in pythons:
        g = per.get("gunicorn")
        if g is not None and g.get(f"master_uss_{first}") is not None:
            lines.append(f"- {minor}: gunicorn's master itself goes from "
                         f"{m(g[f'master_uss_{first}'], 2)} to {m(g[f'master_uss_{last}'], 2)} "
                         f"MiB private between {idle[0]:g} and {idle[-1]:g} s.")
    lines.append("")

    lines += ["**What does a working child dirty?**", ""]
    for minor, per in pythons:
        f = per["freeze"]
        by_worker = sorted(((k[len("working_private["):-1], v) for k, v in f.items()
                            if k.startswith("working_private[") and v is not None),
                           key=lambda kv: -kv[1])
        top = (f"; by worker from {by_worker[-1][0]} {m(by_worker[-1][1], 2)} to "
               f"{by_worker[0][0]} {m(by_worker[0][1], 2)}" if by_worker else "")
        lines.append(f"- {minor}: {m(f['working_private_median'], 2)} MiB private (median, "
                     f"max {m(f['working_private_max'], 2)}{top}): "
                     f"{(f['working_private_median'] - f[f'idle_private_{last}']) / MIB:+.2f} MiB "
                     f"over an idle child, "
                     f"{'within' if f['working_private_max'] <= WORKING_PRIVATE_MAX else 'over'}"
                     f" the 4 MiB target. The fleet's PSS goes from {m(f[f'fleet_pss_{last}'])} "
                     f"idle to {m(f['working_prefork_pss'])} MiB working, against "
                     f"{m(f.get('working_baseline_pss'))} for the baseline.")
        split = [(name, per[name].get("working_unshared"), per[name].get("working_new"))
                 for name in ("freeze", "no-freeze", "warm-up") if name in per]
        if all(u is not None and n is not None for _, u, n in split):
            lines.append("  Of that growth, floor pages the child un-shared (its shared "
                         "memory shrank) / memory it allocated anew: " + "; ".join(
                             f"{name} {m(u, 2)} / {m(n, 2)}" for name, u, n in split) + ".")
    lines.append("")

    lines += [f"**Does prefork beat gunicorn --preload for the same floor and {workers} "
              "workers?**", ""]
    for minor, per in pythons:
        f, g = per["freeze"], per.get("gunicorn")
        if g is None:
            lines.append(f"- {minor}: gunicorn did not run.")
            continue
        pss, gp = f[f"fleet_pss_{last}"], g[f"fleet_pss_{last}"]
        diff = gp - pss
        verdict = ("**yes**" if diff > workers * NOISE / 2 else
                   "**no**" if diff < -workers * NOISE / 2 else "**a tie** (within noise)")
        lines.append(f"- {minor}: {verdict}: {m(pss)} MiB against {m(gp)} ({-diff / MIB:+.1f} "
                     f"MiB, {-diff / gp:+.0%}) idle at {idle[-1]:g} s; private per child "
                     f"{m(f[f'idle_private_{last}'], 2)} against "
                     f"{m(g[f'idle_private_{last}'], 2)} per gunicorn worker, master "
                     f"{m(f[f'master_uss_{last}'], 2)} against {m(g[f'master_uss_{last}'], 2)},"
                     f" from the same floor ({m(f['floor_rss'])} against "
                     f"{m(g[f'master_rss_{first}'])} MiB RSS).")
    lines.append("")

    lines += ["**Does warming the master before the fork help a working child?**", ""]
    for minor, per in pythons:
        f, w = per["freeze"], per.get("warm-up")
        if w is None:
            continue
        gain = f["working_private_median"] - w["working_private_median"]
        net = f["working_prefork_pss"] - w["working_prefork_pss"]
        verdict = compare(gain, "**yes, a little**" if gain < 3 * NOISE else "**yes**",
                          "**it hurts**", "**no measurable effect**")
        lines.append(f"- {minor}: {verdict}: a working child dirties "
                     f"{m(w['working_private_median'], 2)} MiB after a warm master against "
                     f"{m(f['working_private_median'], 2)} ({-gain / MIB:+.2f}), for a master "
                     f"{(w['floor_rss'] - f['floor_rss']) / MIB:+.1f} MiB bigger "
                     f"({m(w['floor_rss'])} MiB RSS). Fleet PSS working "
                     f"{m(w['working_prefork_pss'])} against {m(f['working_prefork_pss'])} "
                     f"({-net / MIB:+.1f}), idle {m(w[f'fleet_pss_{last}'])} against "
                     f"{m(f[f'fleet_pss_{last}'])} MiB.")
    return lines


METHOD = """\
## Method

- **prefork**: `prefork probe --fleet cpu --workers {workers} {idle_flags} --json`,
  in a venv per Python (`.venv-measure/X.Y`, `pip install -e '.[measure]'`). The probe
  starts a real `prefork run` master of the cpu fleet, which imports its floor and forks
  {workers} children (the fleet's 4 workers, cycled, each serving the probe instead of
  running its worker), a prefork child that only sleeps (the sleeper) and, just before
  them, a bare `os.fork()` child that only sleeps; it reads every process's
  `/proc/PID/smaps_rollup` from a process of its own (a shell, which maps nothing the
  fleet maps): idle samples at each `--idle` time, then each child runs its worker's
  warm-up and a full `gc.collect()` and is measured again (working). Three
  configurations: `gc.collect(); gc.freeze()` in the master before forking (the default),
  `--no-freeze`, and `--warm-up` (the master runs every worker's warm-up once before
  forking). The first also measures the **baseline**, {workers} fresh interpreters each
  importing the same floor (one systemd unit per worker), after the children are gone,
  so no page is split between the two groups.
- **gunicorn --preload**: `gunicorn --preload --workers {workers} --worker-class sync` on a
  unix socket in a temp dir, app `measurements/gunicorn_app.py`, which imports
  `prefork_workers.cpu.fleet`, the very module the prefork master imports. Each worker
  reports its pid through a pipe from gunicorn's `post_worker_init` hook
  (`gunicorn_conf.py`); once all {workers} have, and are the master's children, master and
  workers are measured by the probe's measuring process at {idle_list} s, then gunicorn is
  stopped with SIGTERM. It runs after the probes, alone; its "probe" time is the driver's
  own time to measure its {workers} workers and master once.
- **Figures**: PSS sums to what the processes cost the machine; USS ("private") is what a
  process alone maps, what it dirtied since the fork; shared = RSS - USS. "floor RSS" is
  the master's RSS when it forked (for gunicorn: its master's RSS at the first sample).
  Per-child figures are medians over the {workers} children; with several runs, each
  figure is then the median over runs. The probe time is the probe's own time to measure
  the master and its children once (median over its samples).
- **Noise**: PSS splits each shared-library page among every process on the machine
  that maps it, so the fleet's PSS moves by a MiB or two with whatever else runs; the
  probe's times move with the machine's load (see the load average above).
- **Targets**: {workers}-worker idle fleet PSS (at {last:g} s) <= floor RSS + 1.5 MiB per
  worker and below gunicorn --preload's; a working child <= 4 MiB private on every Python
  (judged on every child, the median shown beside the max; default and warm-up runs); the
  probe under 20 ms for {workers} children and their master (a configuration's figure is
  the median of its samples, then over runs; judged on all three configurations).
"""


# -- entry point -------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("RUNS") or 1),
                        help="repeat every measurement N times, report medians [$RUNS or 1]")
    parser.add_argument("--python", action="append", choices=PYTHONS,
                        help="only this Python (repeatable) [all of them]")
    parser.add_argument("--idle", action="append", type=float,
                        help="idle sample times in seconds (repeatable) [0, 10, 60]")
    parser.add_argument("--workers", type=int, default=WORKERS, help="[%(default)s]")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite memory.md and memory.png from memory.json")
    parser.add_argument("--chart", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.chart:
        draw_chart(json.loads(Path(args.chart).read_text()), CHART)
        return 0
    if args.render:
        write_outputs(json.loads(RESULTS_JSON.read_text()))
        print(RESULTS_MD.read_text())
        return 0
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    args.idle = sorted(args.idle or IDLE)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        return drive(args)
    except KeyboardInterrupt:
        log("interrupted: stopping what is still running; no report written")
        return 130
    finally:
        stop_all()


if __name__ == "__main__":
    raise SystemExit(main())
