"""The cpu fleet end to end: real master, real workers, a real SQLite file; the results
in the database must equal the kernels run directly on the same data."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import Events, MasterProcess, master_env
from prefork_workers.cpu import kernels
from prefork_workers.cpu.demo_data import generate
from prefork_workers.cpu.fleet import WORKERS

OBSERVATIONS = 8_000  # 4 clusterer batches of 2,000: the incremental path is exercised


@pytest.fixture
def database(tmp_path: Path) -> Path:
    path = tmp_path / "cpu.sqlite3"
    generate(path, observations=OBSERVATIONS, sources=300, seed=7)
    return path


def start_cpu(start_master, events: Events, runtime_dir: Path, tmp_path: Path,
              db: Path | str, fleet: str = "fleet") -> MasterProcess:
    env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path), PREFORK_DB=str(db))
    return start_master(f"fleets.cpu_test:{fleet}", env=env)


def wait_all_caught_up(master: MasterProcess, last_id: int) -> None:
    for worker in WORKERS:
        master.wait_log(rf"\] INFO {worker}: .*\(watermark {last_id}\)", timeout=60)


def expected_results(db: Path) -> dict[str, object]:
    """Every worker's result, computed straight from the kernels on the whole data set."""
    c = sqlite3.connect(db)
    # Common (stop-listed) credentials and fingerprints link nothing.
    rows = c.execute(
        "SELECT o.id, o.source_id, iif(cr.common, NULL, o.credential_id), "
        "iif(fp.common, NULL, o.fingerprint_id), o.payload_id FROM observations o "
        "LEFT JOIN credentials cr ON cr.id = o.credential_id "
        "LEFT JOIN fingerprints fp ON fp.id = o.fingerprint_id ORDER BY o.id").fetchall()
    clusters = kernels.cluster_observations(rows).assignments
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for obs, cluster in clusters.items():
        by_cluster[cluster].append(obs)
    info = {r[0]: r[1:] for r in c.execute(
        "SELECT o.id, o.observed_at, o.decoy_id, s.network_id FROM observations o "
        "JOIN sources s ON s.id = o.source_id")}
    spans = [(cid, min(info[o][0] for o in members), max(info[o][0] for o in members),
              tuple(sorted({kernels.target_key(info[o][1], info[o][2]) for o in members})))
             for cid, members in sorted(by_cluster.items())]
    campaign_of = kernels.campaigns(spans, 3600.0)
    sizes: dict[int, int] = defaultdict(int)
    for campaign in campaign_of.values():
        sizes[campaign] += 1
    credentials: dict[int, set[int]] = defaultdict(set)
    for session_id, credential_id in c.execute(
            "SELECT o.session_id, o.credential_id FROM observations o "
            "JOIN credentials cr ON cr.id = o.credential_id WHERE cr.common = 0"):
        credentials[session_id].add(credential_id)
    sessions = [(sid, src, fp, tuple(sorted(credentials.get(sid, ()))))
                for sid, src, fp in c.execute(
                    "SELECT s.id, s.source_id, iif(fp.common, NULL, s.fingerprint_id) "
                    "FROM sessions s LEFT JOIN fingerprints fp ON fp.id = s.fingerprint_id "
                    "WHERE s.id IN (SELECT session_id FROM observations) ORDER BY s.id")]
    identities = kernels.attribute_sessions(sessions).assignments
    across = kernels.identities_across_sources(identities, {s[0]: s[1] for s in sessions})
    uses = c.execute("SELECT credential_id, decoy_id, source_id, observed_at FROM observations "
                     "WHERE credential_id IS NOT NULL ORDER BY id").fetchall()
    reuse = kernels.credential_reuse(uses, 2)
    c.close()
    return {
        "clusters": clusters,
        "campaigns": {cl: cp for cl, cp in campaign_of.items() if sizes[cp] >= 2},
        "identities": identities,
        "attributions": across,
        "reuse": [tuple(f) for f in reuse],
    }


def stored_results(db: Path) -> dict[str, object]:
    c = sqlite3.connect(db)
    stored = {
        "clusters": dict(c.execute("SELECT observation_id, cluster_id FROM observation_clusters")),
        "campaigns": dict(c.execute("SELECT cluster_id, campaign_id FROM campaign_members")),
        "identities": dict(c.execute("SELECT session_id, identity_id FROM identity_members")),
        "attributions": dict(c.execute("SELECT identity_id, sources FROM attributions")),
        "reuse": [tuple(r) for r in c.execute(
            "SELECT credential_id, decoys, sources, first_seen, last_seen FROM credential_reuse "
            "ORDER BY credential_id")],
    }
    c.close()
    return stored


def test_fleet_results_equal_the_kernels_run_directly(start_master, events: Events,
                                                      runtime_dir: Path, tmp_path: Path,
                                                      database: Path) -> None:
    master = start_cpu(start_master, events, runtime_dir, tmp_path, database)
    wait_all_caught_up(master, OBSERVATIONS)
    titles = sorted(" ".join(p.cmdline()).strip() for p in master.workers())
    assert titles == sorted(f"prefork: worker {w} [cpu]" for w in WORKERS)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    for worker in WORKERS:  # each finished its batch and left on its own, with exit 0
        master.wait_log(rf"INFO {worker}: stopped")
    assert not master.log_matches(r"killed by SIGKILL|Traceback")

    stored, expected = stored_results(database), expected_results(database)
    assert stored == expected
    assert len(stored["clusters"]) == OBSERVATIONS
    assert stored["campaigns"] and stored["attributions"] and stored["reuse"], \
        "the demo data's planted findings were not found"


def test_sigkill_mid_batch_loses_and_duplicates_nothing(start_master, events: Events,
                                                        runtime_dir: Path, tmp_path: Path,
                                                        database: Path) -> None:
    master = start_cpu(start_master, events, runtime_dir, tmp_path, database, "killable")
    hung = events.wait_kind("in-batch")[0]
    os.kill(hung["pid"], signal.SIGKILL)  # its second batch's writes are not committed
    master.wait_log(rf"worker clusterer \(pid {hung['pid']}\) exited: killed by SIGKILL")
    wait_all_caught_up(master, OBSERVATIONS)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0

    c = sqlite3.connect(database)
    total, distinct = c.execute(
        "SELECT count(*), count(DISTINCT observation_id) FROM observation_clusters").fetchone()
    gaps = c.execute("SELECT count(*) FROM observations o LEFT JOIN observation_clusters oc "
                     "ON oc.observation_id = o.id WHERE oc.observation_id IS NULL").fetchone()[0]
    batches = c.execute("SELECT batches FROM worker_watermarks "
                        "WHERE worker = 'clusterer'").fetchone()[0]
    c.close()
    assert (total, distinct, gaps) == (OBSERVATIONS, OBSERVATIONS, 0)
    assert batches == OBSERVATIONS // 2_000  # the killed batch never counted
    assert stored_results(database) == expected_results(database)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("these are my notes, not a database\n" * 200)
    return path


def _other_version(tmp_path: Path) -> Path:
    path = tmp_path / "future.sqlite3"
    c = sqlite3.connect(path)
    c.execute("CREATE TABLE observations (id INTEGER PRIMARY KEY)")
    c.execute("PRAGMA user_version = 99")
    c.commit()
    c.close()
    return path


@pytest.mark.parametrize(("make_db", "message"), [
    (_not_a_database, r"is not a SQLite database"),
    (_other_version, r"has schema version 99; this cpu fleet uses version 1"),
    (lambda tmp: Path("/proc/no-such-dir/cpu.sqlite3"), r"cannot create /proc/no-such-dir"),
], ids=["not-a-database", "other-version", "unwritable"])
def test_unusable_database_is_one_line_per_worker_and_untouched(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path, make_db,
        message: str) -> None:
    db = make_db(tmp_path)
    before = _sha256(db) if db.exists() else None
    master = start_cpu(start_master, events, runtime_dir, tmp_path, db, "failing")
    for worker in WORKERS:
        master.wait_log(rf"^{worker}: database error: .*{message}")
        master.wait_log(rf"worker {worker} marked failed")  # retried on the backoff, then failed
    assert master.wait_exit() == 5  # nothing left to run
    assert not master.log_matches("Traceback")
    if before is not None:
        assert _sha256(db) == before  # the user's file is exactly as it was


def test_locked_database_fails_cleanly_then_recovers(start_master, events: Events,
                                                     runtime_dir: Path, tmp_path: Path,
                                                     database: Path) -> None:
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another program holds the database
    master = start_cpu(start_master, events, runtime_dir, tmp_path, database)
    master.wait_log(r"^clusterer: database error: .* is locked by another process")
    master.wait_log(r"worker clusterer restart \d+ in")
    holder.execute("ROLLBACK")
    holder.close()
    wait_all_caught_up(master, OBSERVATIONS)  # the backoff did the rest
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert stored_results(database) == expected_results(database)
