"""The cpu fleet's warm-ups: each runs its worker's real step, with real work, on a private
copy of a cached sample; never the user's database; the samples are made once, by a
child process (``python -m prefork_workers.cpu prepare-samples``), safely from many
processes at once."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from prefork_workers.cpu import demo_data, kernels, loops
from prefork_workers.cpu import warmup as warmups
from prefork_workers.cpu.db import prepare_database
from prefork_workers.cpu.fleet import WORKERS, make_fleet
from prefork_workers.cpu.loops import Settings
from prefork_workers.cpu.warmup import WarmupError, warmup

HALF = warmups.SAMPLE_OBSERVATIONS // 2

# What each step must have written to its copy: (table, at least this many rows).
RESULTS: dict[str, list[tuple[str, int]]] = {
    "clusterer": [("observation_clusters", warmups.SAMPLE_OBSERVATIONS)],
    "campaign-clusterer": [("campaigns", 1), ("campaign_members", 2)],
    "attribution": [("identities", 1), ("identity_members", 1), ("attributions", 1)],
    "reuse-correlate": [("credential_reuse", 1)],
}
SUMMARIES = {
    # Half the sample was clustered already: the batch links to stored clusters and merges.
    "clusterer": rf"^{HALF} observations -> \d+ clusters touched, [1-9]\d* merged ",
    "campaign-clusterer": r"^[1-9]\d* clusters -> [1-9]\d* campaigns ",
    "attribution": r"^[1-9]\d* sessions -> [1-9]\d* identities, [1-9]\d* across sources ",
    "reuse-correlate": r"^[1-9]\d* credential uses -> [1-9]\d* reused ",
}


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary directory of this test's own, so every test starts with a cold cache
    (``warm`` fills it with the session's samples)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp / f"prefork-cpu-warmup-{os.getuid()}"


@pytest.fixture(scope="session")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The samples, made once for the whole session by the real preparing child; only
    ``warm`` copies them, so no test can change them."""
    made = tmp_path_factory.mktemp("prepared")
    made.chmod(0o700)
    warmups.prepare_samples(made)
    return warmups.sample_paths(made)


@pytest.fixture
def warm(cache: Path, prepared: dict[str, Path]) -> Path:
    """This test's cache as a preparation leaves it (the two samples and the lock), for
    a test about what a warm-up does rather than how the samples are made."""
    cache.mkdir(mode=0o700)
    for path in prepared.values():
        shutil.copyfile(path, cache / path.name)
    (cache / "prepare.lock").touch(mode=0o600)
    assert sorted(os.listdir(cache)) == samples_only(cache)
    return cache


def samples_only(cache: Path) -> list[str]:
    """What the cache must hold between warm-ups: the two samples and the lock, no copy."""
    return sorted([*(p.name for p in warmups.sample_paths(cache).values()), "prepare.lock"])


def watermark(path: Path, worker: str) -> int:
    c = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = c.execute("SELECT last_id FROM worker_watermarks WHERE worker = ?",
                         (worker,)).fetchall()
    finally:
        c.close()
    return rows[0][0] if rows else 0


def fork_all(count: int, work: Callable[[], None]) -> list[int]:
    """Run ``work`` in ``count`` forked children released at once; their exit codes."""
    gate_r, gate_w = os.pipe()
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(gate_w)
                os.read(gate_r, 1)  # wait until every sibling exists
                work()
                code = 0
            except BaseException as exc:
                os.write(2, f"child {os.getpid()}: {exc}\n".encode())
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(gate_r)
    os.write(gate_w, b"x" * count)
    os.close(gate_w)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


@pytest.mark.usefixtures("warm")
@pytest.mark.parametrize("name", WORKERS)
def test_each_warmup_runs_its_real_step_with_real_work(name: str, cache: Path,
                                                       monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    real = loops.STEPS[name]
    seen: dict[str, object] = {}

    async def step_then_count(db, settings: Settings) -> str | None:
        summary = await real(db, settings)  # the real step, then look at what it wrote
        seen["path"] = db.path
        seen["rows"] = {table: (await db.connection.execute_fetchall(
            f"SELECT count(*) FROM {table}"))[0][0] for table, _ in RESULTS[name]}
        return summary

    monkeypatch.setitem(loops.STEPS, name, step_then_count)
    summary = warmup(name)()

    assert re.search(SUMMARIES[name], summary), summary
    rows = seen["rows"]
    assert isinstance(rows, dict)
    for table, least in RESULTS[name]:
        assert rows[table] >= least, f"{name} wrote {rows[table]} rows to {table}"
    copy = seen["path"]
    assert isinstance(copy, Path)
    assert copy.parent == cache and copy not in warmups.sample_paths(cache).values()
    assert not any(Path(f"{copy}{s}").exists() for s in ("", "-wal", "-shm"))
    assert sorted(os.listdir(cache)) == samples_only(cache)


@pytest.mark.usefixtures("warm")
def test_a_warmup_runs_again_and_again_and_leaves_no_thread(cache: Path) -> None:
    threads = threading.active_count()
    for name in WORKERS:
        run = warmup(name)
        first, second = run(), run()
        assert first == second  # each time on a fresh copy of the same sample
        assert threading.active_count() == threads
    assert sorted(os.listdir(cache)) == samples_only(cache)


def test_samples_are_prepared_in_a_child_not_in_the_caller(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"generate": 0, "cluster": 0}

    def counting(key: str, real: Callable) -> Callable:
        # wraps(): found by the real one's name, as prefork.offload.run_kernel requires
        @functools.wraps(real)
        def wrapper(*args, **kwargs):
            calls[key] += 1  # in the preparing child this wrapper does not exist
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(demo_data, "generate", counting("generate", demo_data.generate))
    monkeypatch.setattr(kernels, "cluster_observations",
                        counting("cluster", kernels.cluster_observations))
    assert not cache.exists()
    warmup("campaign-clusterer")()
    samples = warmups.sample_paths(cache)
    assert watermark(samples["half"], "clusterer") == HALF  # generated and clustered...
    assert watermark(samples["full"], "clusterer") == warmups.SAMPLE_OBSERVATIONS
    assert calls == {"generate": 0, "cluster": 0}  # ...but not here
    warmup("clusterer")()
    assert calls == {"generate": 0, "cluster": 1}  # the counter does see the caller's work


def test_a_fresh_process_running_the_fleets_warmups_never_imports_the_generator(
        tmp_path: Path, cache: Path) -> None:
    code = (
        "import json, sys, threading\n"
        "from prefork_workers.cpu.fleet import fleet\n"
        "done = [w.warmup() for w in fleet.workers]\n"
        "print(json.dumps({'done': len(done), 'threads': threading.active_count(),\n"
        "                  'generator': 'prefork_workers.cpu.demo_data' in sys.modules}))\n")
    env = {**os.environ, "TMPDIR": str(cache.parent), "PREFORK_DB": str(tmp_path / "no.db")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"done": 4, "threads": 1, "generator": False}
    assert sorted(os.listdir(cache)) == samples_only(cache)
    assert not (tmp_path / "no.db").exists()


def test_the_users_database_is_never_touched(tmp_path: Path, cache: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    user_db = tmp_path / "mine.sqlite3"
    prepare_database(user_db)
    before = hashlib.sha256(user_db.read_bytes()).hexdigest()
    monkeypatch.setenv("PREFORK_DB", str(user_db))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    for worker in make_fleet().workers:
        assert worker.warmup is not None
        worker.warmup()
    assert hashlib.sha256(user_db.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.sqlite3", "tmp"]
    monkeypatch.delenv("PREFORK_DB")
    warmup("attribution")()
    assert not (tmp_path / "xdg").exists()


def test_eight_processes_warming_up_on_a_cold_cache_prepare_once(
        tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    preparations = tmp_path / "preparations"
    real = warmups.prepare_samples

    def counted(cache: Path) -> None:  # in the warming-up process, which runs the preparer
        with open(preparations, "a") as f:
            f.write(f"{os.getpid()}\n")
        real(cache)

    monkeypatch.setattr(warmups, "prepare_samples", counted)

    def work() -> None:  # as the probe does: eight children, each its own warm-up
        assert re.search(SUMMARIES["campaign-clusterer"], warmup("campaign-clusterer")())

    assert fork_all(8, work) == [0] * 8
    assert len(preparations.read_text().split()) == 1  # the others waited on the lock
    assert sorted(os.listdir(cache)) == samples_only(cache)


def test_two_preparations_at_once_both_succeed(cache: Path) -> None:
    cache.mkdir(mode=0o700)  # without the lock: each renames its own complete files
    assert fork_all(2, lambda: warmups.prepare_samples(cache)) == [0, 0]
    samples = warmups.sample_paths(cache)
    assert sorted(os.listdir(cache)) == sorted(p.name for p in samples.values())
    for path in samples.values():
        c = sqlite3.connect(path)
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        c.close()
    assert watermark(samples["full"], "clusterer") == warmups.SAMPLE_OBSERVATIONS


@pytest.mark.usefixtures("warm")
def test_the_fleets_warmups_use_its_settings_but_not_its_test_hook() -> None:
    def boom(worker: str) -> None:
        raise AssertionError(f"{worker}'s warm-up ran the fault-injection hook")

    fleet = make_fleet(Settings(batch_size=1_000, before_commit=boom))
    assert [w.name for w in fleet.workers] == list(WORKERS)
    assert all(callable(w.warmup) for w in fleet.workers)
    clusterer = next(w for w in fleet.workers if w.name == "clusterer")
    assert clusterer.warmup is not None
    assert clusterer.warmup().startswith("1000 observations -> ")  # its batch size


@pytest.mark.parametrize("problem", ["other-user", "file", "symlink", "group-writable"])
def test_a_cache_directory_we_cannot_trust_is_a_one_line_error(
        problem: str, cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    expected = {"other-user": "belongs to uid", "file": "is not a directory",
                "symlink": "is not a directory", "group-writable": "is writable by others"}
    if problem == "other-user":
        if os.geteuid() == 0:
            cache.mkdir(mode=0o700)
            os.chown(cache, 65534, 65534)
        else:  # we cannot give a directory away: be someone else instead
            monkeypatch.setattr(os, "getuid", lambda: os.geteuid() + 1)
            cache = cache.with_name(f"prefork-cpu-warmup-{os.geteuid() + 1}")
            cache.mkdir(mode=0o700)
    elif problem == "file":
        cache.write_text("not a directory\n")
    elif problem == "symlink":
        cache.symlink_to(elsewhere)
    else:
        cache.mkdir()
        cache.chmod(0o770)
    with pytest.raises(WarmupError) as caught:
        warmup("reuse-correlate")()
    message = str(caught.value)
    assert "\n" not in message and str(cache) in message and expected[problem] in message
    assert list(elsewhere.iterdir()) == []


def test_a_failed_preparation_is_one_line_and_leaves_nothing_behind(
        cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmups, "SAMPLE_SOURCES", 0)  # passed on; the child's generator refuses
    with pytest.raises(WarmupError) as caught:
        warmup("attribution")()
    assert str(caught.value) == (f"cannot prepare the warm-up samples in {cache}: "
                                 "ValueError: observations and sources must be >= 1")
    assert os.listdir(cache) == ["prepare.lock"]


@pytest.mark.usefixtures("warm")
def test_a_damaged_sample_is_a_one_line_error(cache: Path) -> None:
    run = warmup("reuse-correlate")
    run()
    sample = warmups.sample_paths(cache)["full"]
    sample.write_bytes(b"garbage " * 1000)
    with pytest.raises(WarmupError) as caught:
        run()
    message = str(caught.value)
    assert message.startswith(f"reuse-correlate warm-up on a copy of {sample}: ")
    assert "is not a SQLite database" in message and "\n" not in message
    assert sorted(os.listdir(cache)) == samples_only(cache)  # the copy is gone all the same


@pytest.mark.usefixtures("warm")
def test_a_step_that_finds_nothing_to_do_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def idle(db, settings: Settings) -> None:
        return None

    monkeypatch.setitem(loops.STEPS, "attribution", idle)
    with pytest.raises(WarmupError, match=r"^attribution warm-up found nothing to do in a "
                                          r"copy of .*; remove .* to make the samples again$"):
        warmup("attribution")()


def test_an_unknown_worker_has_no_warmup() -> None:
    with pytest.raises(ValueError, match=r"^no cpu worker named 'nope'; expected one of "
                                         r"clusterer, campaign-clusterer, attribution, "):
        warmup("nope")


@pytest.mark.parametrize(("args", "message"), [
    (["--observations", "10", "--sources", "0", "--seed", "1"],
     "ValueError: observations and sources must be >= 1"),
    (["--observations", "10", "--sources", "5", "--seed", "x"], "'--seed'"),
    (["--sources", "5", "--seed", "1"], "Missing option '--observations'"),
])
def test_prepare_samples_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                                          message: str) -> None:
    target = tmp_path / "samples"
    target.mkdir()
    result = subprocess.run([sys.executable, "-m", "prefork_workers.cpu", "prepare-samples",
                             str(target), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("prefork-cpu: error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert list(target.iterdir()) == []  # no sample, no temporary file


def test_prepare_samples_into_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "prefork_workers.cpu", "prepare-samples",
                             str(tmp_path / "nope"), "--observations", "10", "--sources", "5",
                             "--seed", "1"], capture_output=True, text=True, timeout=30)
    assert (result.returncode, result.stderr) == (
        2, f"prefork-cpu: error: cannot create a file in {tmp_path / 'nope'}: "
           "No such file or directory\n")


def test_a_preparer_that_takes_too_long_is_killed(cache: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warmups, "PREPARE_TIMEOUT", 0.01)  # the interpreter alone takes more
    with pytest.raises(WarmupError) as caught:
        warmup("clusterer")()
    assert str(caught.value) == (f"cannot prepare the warm-up samples in {cache}: "
                                 "the preparing process took more than 0.01s; killed")
    assert os.listdir(cache) == ["prepare.lock"]  # and conftest finds no process left


@pytest.mark.parametrize(("script", "why"), [
    ("exit 0", "the preparing process succeeded without making "),
    ("echo some noise >&2; echo 'KeyError: x' >&2; exit 1",
     "the preparing process ended: exit code 1; KeyError: x"),
    ("kill -9 $$", "the preparing process ended: killed by SIGKILL"),
    (None, "cannot run "),
])
def test_a_preparer_that_ends_otherwise_is_described_in_one_line(
        script: str | None, why: str, cache: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "python"  # stands in for the interpreter the preparer runs on
    if script is not None:
        fake.write_text(f"#!/bin/sh\n{script}\n")
        fake.chmod(0o700)
    monkeypatch.setattr(sys, "executable", str(fake))
    with pytest.raises(WarmupError) as caught:
        warmup("attribution")()
    message = str(caught.value)
    assert message.startswith(f"cannot prepare the warm-up samples in {cache}: {why}"), message
    assert "\n" not in message
