"""Warm-ups for the cpu fleet: each runs its worker's real step once, on sample data.

``warmup(name)`` is the zero-argument callable a :class:`prefork.Worker` takes as
``warmup``: ``prefork probe`` calls it in a forked child to see how much memory a
*working* child dirties, and it can run in the master before the fork to pre-warm
(specialize) the bytecode the children will share.

One call copies a cached sample database to a private file, runs ``STEPS[name]`` on the
copy (the same SQL through aiosqlite, the same kernel, the same ``connect()``), deletes
the copy, and returns the step's summary. It never opens the user's database.

The samples: :func:`demo_data.generate` with 5,000 observations and 500 sources, in two
states, made once per machine and user in ``$TMPDIR/prefork-cpu-warmup-UID/``:

- half clustered (the clusterer's watermark at 2,500): the clusterer warms up on the
  second half, which links to stored clusters and merges 7 of them, as in steady state;
- fully clustered: campaign-clusterer needs the clusterer's results to do anything;
  attribution and reuse-correlate, whose watermarks are 0 in both, use it too.

They are never made in the calling process, which may be a master whose memory is being
measured: a child process, ``python -m prefork_workers.cpu prepare-samples``, generates
and clusters, and the calling process does not even import ``demo_data``. That takes
0.71-0.74 s on a shared 2-core VM (Python 3.11, median of 7): 0.16 s of work, the rest
the child's interpreter start-up and imports (SQLModel and SQLAlchemy, 0.35 s). The file
names carry the schema version and the generator's arguments, not the code's: after
changing what ``demo_data`` or the clusterer produce, remove the directory to make them
again.

One warm-up, copy and clean-up included, measured on a shared 2-core VM (Python 3.11):
clusterer 30-50 ms, campaign-clusterer 16-28 ms, attribution 23-40 ms, reuse-correlate
16-30 ms. The copy is 1.2 MB.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from prefork.paths import make_private_dir
from prefork.policy import ExitStatus
from prefork_workers.cpu.db import DatabaseError, connect
from prefork_workers.cpu.loops import STEPS, Settings, Step, cluster_step
from prefork_workers.cpu.models import SCHEMA_VERSION

log = logging.getLogger("prefork_workers.cpu")

SAMPLE_OBSERVATIONS = 5_000
SAMPLE_SOURCES = 500
SAMPLE_SEED = 1
HALF, FULL = "half", "full"
# Which sample each worker warms up on; see the module docstring for why.
SAMPLE_OF = {"clusterer": HALF, "campaign-clusterer": FULL, "attribution": FULL,
             "reuse-correlate": FULL}
PREPARE_TIMEOUT = 60.0  # seconds: preparing takes ~0.7 s, so only a stuck child hits this
LOCK_TIMEOUT = PREPARE_TIMEOUT + 30.0  # waiting for another process's preparation


class WarmupError(Exception):
    """A warm-up could not run. ``str()`` is one line for the user."""


def warmup(name: str, settings: Settings | None = None) -> Callable[[], str]:
    """The warm-up of cpu worker ``name``: run its step once on a copy of a sample.

    The callable returns the step's one-line summary and raises :class:`WarmupError`
    (one line) if it cannot run or the step found nothing to do. ``settings`` are the
    worker's (batch size, windows, busy timeout); their ``db_path`` and ``before_commit``
    (a test's fault-injection hook) are replaced. Call it with no event loop running in
    the thread. Callable any number of times, from many processes at once; it returns
    with no thread of its own left running, so the caller may fork right after.
    """
    if name not in STEPS:
        raise ValueError(f"no cpu worker named {name!r}; expected one of {', '.join(STEPS)}")
    step = STEPS[name]
    chosen = settings or Settings()

    def run() -> str:
        started = time.perf_counter()
        cache = cache_dir()
        sample = ensure_samples(cache)[SAMPLE_OF[name]]
        copy = _private_copy(cache, sample, name)
        try:
            summary = _run_step(step, dataclasses.replace(chosen, db_path=copy,
                                                          before_commit=None))
        except (DatabaseError, sqlite3.Error, OSError) as exc:
            raise WarmupError(f"{name} warm-up on a copy of {sample}: "
                              f"{one_line(exc)}") from None
        finally:
            _remove_database(copy)
        if summary is None:
            raise WarmupError(f"{name} warm-up found nothing to do in a copy of {sample}; "
                              f"remove {cache} to make the samples again")
        log.debug("%s: warm-up: %s in %.0f ms", name, summary,
                  (time.perf_counter() - started) * 1000)
        return summary

    run.__qualname__ = f"cpu.{name}.warmup"
    return run


# -- the cache directory and its samples ------------------------------------------------


def cache_dir() -> Path:
    """``tempfile.gettempdir()/prefork-cpu-warmup-UID``, created 0700 if missing.

    Raises :class:`WarmupError` if it is not a directory of ours that only we can
    write: in a shared /tmp, anyone could have made it first and planted samples.
    """
    path = Path(tempfile.gettempdir()) / f"prefork-cpu-warmup-{os.getuid()}"
    problem = make_private_dir(path, what="the warm-up cache",
                               advice="remove it or set TMPDIR elsewhere", parents=False)
    if problem:
        raise WarmupError(problem)
    return path


def sample_paths(cache: Path) -> dict[str, Path]:
    """The samples' paths in ``cache`` for this module's ``SAMPLE_*`` constants."""
    return _sample_paths(cache, SAMPLE_OBSERVATIONS, SAMPLE_SOURCES, SAMPLE_SEED)


def _sample_paths(cache: Path, observations: int, sources: int, seed: int) -> dict[str, Path]:
    """The samples' file names: everything that shapes their content is in them."""
    stem = (f"cpu-schema{SCHEMA_VERSION}-obs{observations}-src{sources}-seed{seed}"
            f"-clustered")
    return {HALF: cache / f"{stem}{observations // 2}.sqlite3",
            FULL: cache / f"{stem}{observations}.sqlite3"}


def ensure_samples(cache: Path) -> dict[str, Path]:
    """The samples in ``cache``, made first (by a child process) if any is missing.

    Processes that find them missing at once queue on a lock file: one prepares, the
    others then find the samples in place. A sample only ever appears by ``rename``, so
    a reader never sees half a file, even next to a preparation that ignores the lock.
    """
    paths = sample_paths(cache)
    if all(p.exists() for p in paths.values()):
        return paths
    with _lock(cache / "prepare.lock"):
        if not all(p.exists() for p in paths.values()):
            prepare_samples(cache)
    return paths


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise WarmupError(f"cannot open {path}: {exc.strerror}") from None
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:  # polled, not blocking: a stuck preparer must not hang us for ever
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WarmupError(f"another process has held {path} for more than "
                                      f"{LOCK_TIMEOUT:g}s while preparing warm-up "
                                      f"samples") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare_samples(cache: Path) -> None:
    """Make both samples in ``cache``, shaped by this module's ``SAMPLE_*`` constants, in a
    child process, and wait for it (about 0.7 s, most of it the child's imports).

    The child is ``python -m prefork_workers.cpu prepare-samples``: a fresh interpreter,
    so nothing of the work happens here, ``demo_data`` is never imported here, and the
    child inherits none of the caller's descriptors, threads or signal handlers. It is
    killed after :data:`PREPARE_TIMEOUT`. Raises :class:`WarmupError` (one line) with
    the child's own one-line error, or how it ended.
    """
    command = [sys.executable,
               "-P",  # the caller's working directory (anything, for a master) shadows nothing
               "-m", "prefork_workers.cpu", "prepare-samples", str(cache),
               "--observations", str(SAMPLE_OBSERVATIONS), "--sources", str(SAMPLE_SOURCES),
               "--seed", str(SAMPLE_SEED)]
    try:
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=PREPARE_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired:  # run() has killed and reaped the child
        why = f"the preparing process took more than {PREPARE_TIMEOUT:g}s; killed"
    except OSError as exc:
        why = f"cannot run {sys.executable}: {exc.strerror}"
    else:
        why = _failure(done) if done.returncode else _missing(sample_paths(cache))
    if why:
        raise WarmupError(f"cannot prepare the warm-up samples in {cache}: {why}")


# How the cpu CLI (__main__.PROG) begins the one line it writes for an error.
_CLI_ERROR = "prefork-cpu: error: "


def _failure(done: subprocess.CompletedProcess[str]) -> str:
    """The preparing command's one-line error; else how it ended, and its last line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    last = " ".join(lines[-1].split()) if lines else ""
    if last.startswith(_CLI_ERROR):
        return last.removeprefix(_CLI_ERROR)
    code = done.returncode
    ended = (ExitStatus(signal=-code) if code < 0 else ExitStatus(code=code)).describe()
    return f"the preparing process ended: {ended}" + (f"; {last[:500]}" if last else "")


def _missing(paths: dict[str, Path]) -> str | None:
    gone = [str(path) for path in paths.values() if not path.exists()]
    return f"the preparing process succeeded without making {', '.join(gone)}" if gone else None


def make_samples(cache: Path, *, observations: int, sources: int,
                 seed: int) -> dict[str, Path]:
    """Make both samples in ``cache`` here, in this process: generate, cluster half, copy,
    cluster the rest, rename each into place; return their paths.

    What ``prepare-samples`` runs in the child; it imports ``demo_data``. Raises
    ``ValueError`` for sizes the generator refuses, :class:`WarmupError`,
    :class:`DatabaseError`, ``OSError`` or ``sqlite3.Error``, and then leaves no file of
    its own behind.
    """
    # Imported here only: the generator is no part of any worker's code.
    from prefork_workers.cpu.demo_data import generate

    paths = _sample_paths(cache, observations, sources, seed)
    half = _temporary(cache, ".prepare-")
    full = _temporary(cache, ".prepare-")
    try:
        generate(half, observations=observations, sources=sources, seed=seed)
        _cluster(half, observations // 2)
        shutil.copyfile(half, full)
        _cluster(full, observations)
        os.rename(full, paths[FULL])
        os.rename(half, paths[HALF])
    finally:
        _remove_database(half)
        _remove_database(full)
    return paths


def _cluster(path: Path, through: int) -> None:
    """Run the real clusterer on ``path`` up to observation ``through``, then leave the
    file self-contained (no -wal beside it), ready to be renamed and copied."""
    summary = _run_step(cluster_step, Settings(db_path=path, batch_size=through))
    expected = f"(watermark {through})"
    if summary is None or not summary.endswith(expected):
        raise WarmupError(f"clustering {path} up to {through} did not: {summary!r}")
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        connection.execute("PRAGMA journal_mode=DELETE")  # checkpoints and drops the WAL
    finally:
        connection.close()


# -- running a step on a private copy -------------------------------------------------


def _run_step(step: Step, settings: Settings) -> str | None:
    """One step on ``settings.db_path``, as the worker's loop runs it."""
    path = settings.db_path
    assert path is not None

    async def once() -> str | None:
        async with connect(path, settings.busy_timeout) as db:
            return await step(db, settings)

    before = set(threading.enumerate())
    try:
        return asyncio.run(once())
    finally:
        # aiosqlite's connection thread ends just after close(), unjoined: join it, so a
        # master that pre-warms does not fork while it still runs.
        for thread in set(threading.enumerate()) - before:
            thread.join(timeout=5.0)


def _private_copy(cache: Path, sample: Path, name: str) -> Path:
    copy = _temporary(cache, f"{name}-")
    try:
        shutil.copyfile(sample, copy)
    except OSError as exc:
        _remove_database(copy)
        raise WarmupError(f"cannot copy {sample} to {copy}: {exc.strerror}") from None
    return copy


def _temporary(cache: Path, prefix: str) -> Path:
    try:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".sqlite3", dir=cache)
    except OSError as exc:
        raise WarmupError(f"cannot create a file in {cache}: {exc.strerror}") from None
    os.close(fd)
    return Path(name)


def _remove_database(path: Path) -> None:
    """Delete a SQLite file and what SQLite keeps beside it; what is gone already is fine."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(f"{path}{suffix}")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove %s%s: %s", path, suffix, exc.strerror)


def one_line(exc: BaseException) -> str:
    """``exc`` in one line: our own errors as they are, others with their type."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (WarmupError, DatabaseError)) \
        else f"{type(exc).__name__}: {text}"
