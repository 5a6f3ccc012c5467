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

Making them takes 0.2-0.3 s (0.56 s at worst on a busy machine), and never in the calling
process, which may be a master whose memory is being measured: a forked child generates
and clusters, and the calling process does not even import ``demo_data``. The file names
carry the schema version and the generator's arguments, not the code's: after changing
what ``demo_data`` or the clusterer produce, remove the directory to make them again.

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
import select
import shutil
import signal
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

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
PREPARE_TIMEOUT = 60.0  # seconds: preparing takes ~0.3 s, so only a stuck child hits this
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
                              f"{_one_line(exc)}") from None
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
    uid = os.getuid()
    path = Path(tempfile.gettempdir()) / f"prefork-cpu-warmup-{uid}"
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise WarmupError(f"cannot create the warm-up cache {path}: {exc.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as exc:
        raise WarmupError(f"cannot use the warm-up cache {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise WarmupError(f"the warm-up cache {path} is not a directory (a symlink or a "
                          f"file); remove it or set TMPDIR elsewhere")
    if info.st_uid != uid:
        raise WarmupError(f"the warm-up cache {path} belongs to uid {info.st_uid}, not to "
                          f"this user ({uid}); remove it or set TMPDIR elsewhere")
    if info.st_mode & 0o022:
        raise WarmupError(f"the warm-up cache {path} is writable by others "
                          f"(mode {stat.S_IMODE(info.st_mode):o}); make it 0700")
    return path


def sample_paths(cache: Path) -> dict[str, Path]:
    """The samples' file names: everything that shapes their content is in them."""
    stem = (f"cpu-schema{SCHEMA_VERSION}-obs{SAMPLE_OBSERVATIONS}-src{SAMPLE_SOURCES}"
            f"-seed{SAMPLE_SEED}-clustered")
    return {HALF: cache / f"{stem}{SAMPLE_OBSERVATIONS // 2}.sqlite3",
            FULL: cache / f"{stem}{SAMPLE_OBSERVATIONS}.sqlite3"}


def ensure_samples(cache: Path) -> dict[str, Path]:
    """The samples in ``cache``, made first (in a forked child) if any is missing.

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
    """Make both samples in ``cache`` in a forked child and wait for it (0.2-0.3 s).

    Nothing of the work happens here: the child imports ``demo_data``, generates and
    clusters, renames the finished files into place, and reports one line through a pipe.
    It is a bare fork, so the caller should have no other thread running (the master and
    the probe's children have none): a lock another thread held at the fork would hang
    the child until the timeout kills it. It keeps the caller's descriptors open for its
    fraction of a second; closing them could let a caller's log handler write into a
    sample that reused the number.
    """
    paths = sample_paths(cache)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        code = 1
        try:
            os.close(read_end)
            _child_signals()
            _make_samples(cache, paths)
            os.write(write_end, b"ok")
            code = 0
        except BaseException as exc:
            try:
                os.write(write_end, _one_line(exc).encode(errors="replace")[:4000])
            except BaseException:
                pass
        finally:
            os._exit(code)  # no atexit handlers, no flush of the caller's buffers
    os.close(write_end)
    try:
        report = _read_report(read_end, pid)
    finally:
        os.close(read_end)
        status = _reap(pid)
    if report == "ok":
        return
    why = report or (f"the preparing process {pid} ended: "
                     f"{ExitStatus.from_wait_status(status).describe()}"
                     if status is not None else f"the preparing process {pid} vanished")
    raise WarmupError(f"cannot prepare the warm-up samples in {cache}: {why}")


def _child_signals() -> None:
    """A master's handlers only queue signals and write to its wake-up pipe: in this
    child, SIGTERM and SIGINT must end it, and must not wake the master."""
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    except (ValueError, OSError):
        pass


def _read_report(fd: int, pid: int) -> str:
    chunks = []
    deadline = time.monotonic() + PREPARE_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return f"the preparing process {pid} took more than {PREPARE_TIMEOUT:g}s; killed"
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def _reap(pid: int) -> int | None:
    try:
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None  # SIGCHLD ignored, or someone else reaped it: the pipe says enough


def _make_samples(cache: Path, paths: dict[str, Path]) -> None:
    """In the preparing child: generate, cluster half, copy, cluster the rest, rename."""
    # Imported here only: the generator is no part of any worker's code.
    from prefork_workers.cpu.demo_data import generate

    half = _temporary(cache, ".prepare-")
    full = _temporary(cache, ".prepare-")
    try:
        generate(half, observations=SAMPLE_OBSERVATIONS, sources=SAMPLE_SOURCES,
                 seed=SAMPLE_SEED)
        _cluster(half, SAMPLE_OBSERVATIONS // 2)
        shutil.copyfile(half, full)
        _cluster(full, SAMPLE_OBSERVATIONS)
        os.rename(full, paths[FULL])
        os.rename(half, paths[HALF])
    finally:
        _remove_database(half)
        _remove_database(full)


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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (WarmupError, DatabaseError)) \
        else f"{type(exc).__name__}: {text}"
