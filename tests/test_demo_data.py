"""The cpu fleet's demo data: deterministic, consistent, with the findings planted, and a
command line whose bad input is one line and exit status 2."""

from __future__ import annotations

import hashlib
import itertools
import re
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from prefork_workers.cpu import demo_data
from prefork_workers.cpu.db import DatabaseError

OBSERVATIONS = 5_000
SOURCES = 400
START = 1_767_225_600.0
BASE_TABLES = ["sites", "sensors", "decoys", "services", "lures", "tags", "decoy_tags",
               "networks", "sources", "credentials", "fingerprints", "payloads", "sessions",
               "observations", "alerts", "ingest_batches"]


def _generate(path: Path, seed: int = 1) -> dict[str, int]:
    return demo_data.generate(path, observations=OBSERVATIONS, sources=SOURCES, seed=seed)


def _digest(path: Path) -> str:
    """A hash of every base table's rows, in primary key order."""
    digest = hashlib.sha256()
    for table in BASE_TABLES:
        for row in _query(path, f"SELECT * FROM {table} ORDER BY 1, 2"):
            digest.update(repr(row).encode())
    return digest.hexdigest()


def _query(path: Path, sql: str) -> list[tuple]:
    connection = sqlite3.connect(path)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """One generated database the read-only tests share."""
    path = tmp_path_factory.mktemp("demo") / "base.sqlite3"
    return path, _generate(path)


def test_same_seed_same_content_other_seed_differs(base: tuple[Path, dict[str, int]],
                                                    tmp_path: Path) -> None:
    path, _counts = base
    _generate(tmp_path / "same.sqlite3")
    _generate(tmp_path / "other.sqlite3", seed=2)
    assert _digest(tmp_path / "same.sqlite3") == _digest(path)
    assert _digest(tmp_path / "other.sqlite3") != _digest(path)


def test_row_counts_as_asked(base: tuple[Path, dict[str, int]]) -> None:
    path, counts = base
    assert list(counts) == BASE_TABLES
    for table, rows in counts.items():
        assert _query(path, f"SELECT count(*) FROM {table}") == [(rows,)], table
    assert counts["observations"] == OBSERVATIONS
    assert counts["sources"] == SOURCES
    assert 50 <= counts["decoys"] <= 70
    assert counts["fingerprints"] >= 300
    assert counts["alerts"] > 0
    assert counts["sessions"] < counts["observations"]
    # Every decoy offers services; every source did something.
    assert _query(path, "SELECT count(*) FROM decoys WHERE id NOT IN "
                        "(SELECT decoy_id FROM services)") == [(0,)]
    assert _query(path, "SELECT count(*) FROM sources WHERE id NOT IN "
                        "(SELECT source_id FROM sessions)") == [(0,)]


def test_consistent(base: tuple[Path, dict[str, int]]) -> None:
    path, _counts = base
    assert _query(path, "PRAGMA foreign_key_check") == []
    # Append order: ids ascend with time, for observations and sessions alike.
    for table, column in (("observations", "observed_at"), ("sessions", "started_at")):
        assert _query(path, f"SELECT count(*) FROM {table} a JOIN {table} b ON b.id = a.id + 1 "
                            f"WHERE b.{column} < a.{column}") == [(0,)], table
    assert _query(path, "SELECT min(id), max(id) FROM observations") == [(1, OBSERVATIONS)]
    first, last = _query(path, "SELECT min(observed_at), max(observed_at) FROM observations")[0]
    assert first >= START and last <= START + (demo_data.SPAN_DAYS + 1) * 86_400
    assert last - first > 14 * 86_400  # a few weeks
    # An observation agrees with its session; a session spans its observations.
    assert _query(path, "SELECT count(*) FROM observations o JOIN sessions s "
                        "ON s.id = o.session_id WHERE o.source_id != s.source_id OR "
                        "o.decoy_id != s.decoy_id OR o.service_id != s.service_id OR "
                        "o.observed_at < s.started_at OR o.observed_at > s.ended_at") == [(0,)]
    assert _query(path, "SELECT count(*) FROM services v JOIN observations o "
                        "ON o.service_id = v.id WHERE v.decoy_id != o.decoy_id") == [(0,)]
    # The ingest batches cover the observations, in order, without gaps.
    batches = _query(path, "SELECT first_observation_id, last_observation_id "
                           "FROM ingest_batches ORDER BY id")
    assert batches[0][0] == 1 and batches[-1][1] == OBSERVATIONS
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(batches))
    # Sources' first and last sightings are their observations'.
    assert _query(path, "SELECT count(*) FROM sources n JOIN (SELECT source_id, "
                        "min(observed_at) f, max(observed_at) l FROM observations "
                        "GROUP BY source_id) o ON o.source_id = n.id "
                        "WHERE n.first_seen != o.f OR n.last_seen != o.l") == [(0,)]


def test_realistic_mix(base: tuple[Path, dict[str, int]]) -> None:
    path, _counts = base
    no_credential, with_payload = _query(
        path, "SELECT avg(credential_id IS NULL), avg(payload_id IS NOT NULL) "
              "FROM observations")[0]
    assert 0.15 <= no_credential <= 0.45
    assert 0.04 <= with_payload <= 0.2
    actions = {row[0] for row in _query(path, "SELECT DISTINCT action FROM observations")}
    assert {"login", "command", "scan", "exploit", "upload"} <= actions
    assert _query(path, "SELECT count(*) FROM credentials WHERE honeytoken")[0][0] > 0


def test_planted_findings(base: tuple[Path, dict[str, int]]) -> None:
    path, _counts = base
    # Credential reuse: a honeytoken tried against 2..10 distinct decoys.
    reused = _query(path, "SELECT o.credential_id, count(DISTINCT o.decoy_id) FROM observations"
                          " o JOIN credentials c ON c.id = o.credential_id WHERE c.honeytoken "
                          "GROUP BY o.credential_id")
    assert reused and all(2 <= decoys <= 10 for _, decoys in reused)
    # One actor behind many addresses: a fingerprint from >= 10 sources, one or two
    # credentials, many networks.
    actors = _query(path, "SELECT o.fingerprint_id FROM observations o JOIN sources n "
                          "ON n.id = o.source_id WHERE o.fingerprint_id IS NOT NULL "
                          "GROUP BY o.fingerprint_id HAVING count(DISTINCT o.source_id) >= 10 "
                          "AND count(DISTINCT o.credential_id) BETWEEN 1 AND 2 "
                          "AND count(DISTINCT n.network_id) >= 5")
    assert actors
    # Campaigns: >= 5 sources from <= 4 networks with one fingerprint on a shared decoy,
    # all within a few hours.
    campaigns = _query(path, "SELECT s.fingerprint_id, s.decoy_id FROM sessions s JOIN sources n"
                             " ON n.id = s.source_id WHERE s.fingerprint_id IS NOT NULL "
                             "GROUP BY s.fingerprint_id, s.decoy_id "
                             "HAVING count(DISTINCT s.source_id) >= 5 "
                             "AND count(DISTINCT n.network_id) <= 4 "
                             "AND max(s.started_at) - min(s.started_at) <= 4 * 3600")
    assert len({fingerprint for fingerprint, _ in campaigns}) >= 3


def test_refuses_a_database_with_observations(base: tuple[Path, dict[str, int]]) -> None:
    path, _counts = base
    before = _digest(path)
    with pytest.raises(DatabaseError, match="already holds 5000 observations") as caught:
        _generate(path, seed=3)
    assert "\n" not in str(caught.value)
    assert demo_data.generate(path, observations=10, sources=5, if_empty=True) == {}
    assert _digest(path) == before


def test_sizes_below_one_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        demo_data.generate(tmp_path / "x.sqlite3", observations=0)
    with pytest.raises(ValueError):
        demo_data.feed(tmp_path / "x.sqlite3", rate=-1.0, duration=0.1)


def test_tiny_data_sets_are_exact(tmp_path: Path) -> None:
    counts = demo_data.generate(tmp_path / "tiny.sqlite3", observations=50, sources=3)
    assert counts["observations"] == 50 and counts["sources"] == 3
    assert _query(tmp_path / "tiny.sqlite3", "PRAGMA foreign_key_check") == []


def test_feed_appends_after_the_last_id(tmp_path: Path) -> None:
    path = tmp_path / "fed.sqlite3"
    _generate(path)
    last_time = _query(path, "SELECT max(observed_at) FROM observations")[0][0]
    added = demo_data.feed(path, rate=200.0, duration=1.5, seed=7)
    assert 150 <= added <= 400
    rows = _query(path, f"SELECT id, observed_at FROM observations WHERE id > {OBSERVATIONS} "
                        f"ORDER BY id")
    assert len(rows) == added
    assert [row[0] for row in rows] == list(range(OBSERVATIONS + 1, OBSERVATIONS + added + 1))
    times = [row[1] for row in rows]
    assert times == sorted(times) and times[0] >= last_time
    assert _query(path, "PRAGMA foreign_key_check") == []
    assert _query(path, "SELECT count(*) FROM sessions s WHERE NOT EXISTS "
                        "(SELECT 1 FROM observations o WHERE o.session_id = s.id)") == [(0,)]


def test_feed_needs_a_generated_database(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="run generate first"):
        demo_data.feed(tmp_path / "empty.sqlite3", duration=0.1)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork_workers.cpu", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(("args", "message"), [
    (["generate", "--observations", "0"], "'--observations'"),
    (["generate", "--sources", "-3"], "'--sources'"),
    (["feed", "--rate", "-1"], "'--rate'"),
    (["feed", "--duration", "soon"], "'--duration'"),
    (["generate", "--db", "mysql://db/x"], "only SQLite databases"),
    (["bogus"], "No such command"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str],
                                              message: str) -> None:
    if "--db" not in args and args[0] != "bogus":
        args = [*args, "--db", str(tmp_path / "x.sqlite3")]
    result = _cli(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("prefork-cpu: error: ")
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert not (tmp_path / "x.sqlite3").exists()  # refused before touching anything


def test_cli_not_a_database(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"this is no database, just some bytes\n" * 100)
    result = _cli("generate", "--db", str(junk))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("prefork-cpu: error: ")
    assert result.stderr.count("\n") == 1 and "not a SQLite database" in result.stderr


def test_cli_generate_feed_until_sigterm_info(tmp_path: Path) -> None:
    path = tmp_path / "cli.sqlite3"
    result = _cli("generate", "--db", str(path), "--observations", "2000", "--sources", "200")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "2000 observations" in result.stdout
    result = _cli("generate", "--db", str(path), "--if-empty")
    assert result.returncode == 0, result.stderr
    feeder = subprocess.Popen([sys.executable, "-m", "prefork_workers.cpu", "feed", "--db",
                               str(path), "--rate", "100"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        # The feeder reports its first committed batch at once: wait for that line.
        assert feeder.stderr is not None
        ready, _, _ = select.select([feeder.stderr], [], [], 20)
        assert ready, "the feeder reported nothing in 20 s"
        first = feeder.stderr.readline()
        assert "observations added" in first, first
        assert _query(path, "SELECT max(id) FROM observations")[0][0] > 2000
        feeder.send_signal(signal.SIGTERM)
        out, err = feeder.communicate(timeout=10)
    finally:
        feeder.kill()
        feeder.wait()
    assert feeder.returncode == 0, err
    assert "observations added" in out and "Traceback" not in first + err
    result = _cli("info", "--db", f"sqlite:///{path}")
    assert result.returncode == 0, result.stderr
    last = re.search(r"observations +\d+ +\(ids 1\.\.(\d+)\)", result.stdout)
    assert last is not None and int(last.group(1)) > 2000, result.stdout
    assert "credential_reuse" in result.stdout
