"""The cpu fleet's database layer: where it lives, creating it from many processes at
once, and a second writer caught by the watermark check."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from prefork_workers.cpu import loops
from prefork_workers.cpu.db import DatabaseError, connect, parse_location, prepare_database
from prefork_workers.cpu.demo_data import generate
from prefork_workers.cpu.models import SCHEMA_VERSION, TABLES


@pytest.mark.parametrize(("value", "path"), [
    ("/data/cpu.sqlite3", "/data/cpu.sqlite3"),
    ("sqlite:////data/cpu.sqlite3", "/data/cpu.sqlite3"),
    ("sqlite+aiosqlite:////data/cpu.sqlite3?mode=rwc", "/data/cpu.sqlite3"),
    ("sqlite:///relative.db", "relative.db"),
])
def test_prefork_db_takes_a_path_or_a_sqlite_url(value: str, path: str) -> None:
    assert parse_location(value) == Path(path)


@pytest.mark.parametrize("value", ["postgresql://db/x", "sqlite://", "sqlite:///:memory:"])
def test_prefork_db_rejects_what_is_not_a_sqlite_file(value: str) -> None:
    with pytest.raises(DatabaseError) as caught:
        parse_location(value)
    assert "PREFORK_DB" in str(caught.value)


def test_default_location_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from prefork_workers.cpu.db import database_path
    monkeypatch.delenv("PREFORK_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert database_path() == tmp_path / "prefork" / "cpu.sqlite3"
    monkeypatch.setenv("PREFORK_DB", "sqlite:////srv/x.db")
    assert database_path() == Path("/srv/x.db")


def test_four_processes_creating_the_schema_at_once_agree(tmp_path: Path) -> None:
    path = tmp_path / "new" / "cpu.sqlite3"
    pids = []
    for _ in range(4):  # as the four workers do on a fresh machine
        pid = os.fork()
        if pid == 0:
            try:
                prepare_database(path)
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0, 0, 0]
    c = sqlite3.connect(path)
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= tables
    assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    c.close()


def test_someone_elses_sqlite_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    c.commit()
    c.close()
    before = path.read_bytes()
    with pytest.raises(DatabaseError, match="SQLite database of something else"):
        prepare_database(path)
    assert path.read_bytes() == before


def test_a_second_writer_of_the_same_worker_is_caught(tmp_path: Path) -> None:
    """Two copies of one worker on one database (two masters, two runtime dirs): the one
    that commits second finds the watermark moved and writes nothing."""
    path = tmp_path / "cpu.sqlite3"
    wrote: list[str] = []

    async def scenario() -> None:
        async with connect(path) as db:
            async def write(c: object) -> None:
                wrote.append("first")
            await loops._commit(db, loops.Settings(), "clusterer", 0, 10, write)

            async def write_again(c: object) -> None:
                wrote.append("second")
            with pytest.raises(loops.WatermarkMoved, match="is another clusterer writing"):
                await loops._commit(db, loops.Settings(), "clusterer", 0, 20, write_again)

    asyncio.run(scenario())
    assert wrote == ["first"]
    c = sqlite3.connect(path)
    assert c.execute("SELECT last_id, batches FROM worker_watermarks").fetchone() == (10, 1)
    c.close()


def _cpu(*args: str, file_size_limit: int | None = None,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m prefork_workers.cpu ARGS``; ``file_size_limit``: no file it writes may
    grow past that many bytes (RLIMIT_FSIZE, SIGXFSZ ignored): a disk that fills up."""

    def limit() -> None:
        if file_size_limit is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run([sys.executable, "-m", "prefork_workers.cpu", *args],
                          capture_output=True, text=True, timeout=60, preexec_fn=limit,
                          env={**os.environ, **(env or {})})


def _observations(path: Path) -> tuple[int, str]:
    c = sqlite3.connect(path)
    try:
        return (c.execute("SELECT count(*) FROM observations").fetchone()[0],
                c.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        c.close()


def test_a_disk_full_during_feed_is_reported_as_such_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "cpu.sqlite3"
    generate(path, observations=2000, sources=50)  # here: the command is tested elsewhere
    # The first batch (2,000 observations) needs far more than 64 KiB of WAL.
    result = _cpu("feed", "--db", str(path), "--rate", "2000", "--duration", "5",
                  file_size_limit=64 * 1024)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"prefork-cpu: error: {path}: disk I/O error"]
    assert _observations(path) == (2000, "ok")


def test_a_disk_full_during_generate_leaves_the_database_empty(tmp_path: Path) -> None:
    path = tmp_path / "cpu.sqlite3"
    prepare_database(path)  # the schema: generate's one transaction is what fails
    result = _cpu("generate", "--db", str(path), "--observations", "2000", "--sources", "50",
                  file_size_limit=path.stat().st_size + 64 * 1024)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"prefork-cpu: error: {path}: disk I/O error"]
    assert _observations(path) == (0, "ok")


@pytest.mark.parametrize("command", ["feed", "generate", "info"])
def test_a_path_that_is_not_a_file_is_refused_in_one_line(command: str) -> None:
    result = _cpu(command, env={"PREFORK_DB": "/dev/null"})
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "prefork-cpu: error: /dev/null is not a regular file; point PREFORK_DB or --db at one"]
