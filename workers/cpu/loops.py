"""The cpu fleet's four worker loops: read what is new, run a kernel, write, repeat.

A batch reads past the worker's watermark in a snapshot (WAL: no lock that stops the
other workers), runs its kernel with no transaction open, then writes its results and
the new watermark in one short ``BEGIN IMMEDIATE`` transaction that first checks the
watermark is still the one it read. A batch is all or nothing: a worker killed mid-batch
(even by SIGKILL) loses nothing it committed and redoes the rest after its restart, and
a second copy of a worker writing to the same database is caught, not doubled.

- ``clusterer`` is incremental: it reads at most ``batch_size`` new observations, links
  them with the stored clusters through their indicators, and re-points clusters that the
  batch merged. A cluster's id is its smallest observation id, so the result is the same
  as clustering everything at once.
- ``campaign-clusterer``, ``attribution`` and ``reuse-correlate`` recompute from all the
  data whenever their input moved past their watermark: a new observation can change
  their results anywhere, and their kernels are fast enough to rerun.

The two heaviest kernels, ``cluster_observations`` and ``credential_reuse``, are called
through :func:`prefork.offload.run_kernel`: in the fleet's kernel pool when it has one
(``prefork run --fleet cpu --kernel-workers 2``), inline otherwise.

On SIGTERM (or SIGINT), or its group's stop, a worker finishes the batch it is in, then
ends: its process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from prefork.offload import run_kernel
from prefork_workers.cpu import kernels
from prefork_workers.cpu.db import BUSY_TIMEOUT, Database, DatabaseError, connect, database_path

log = logging.getLogger("prefork_workers.cpu")

BatchHook = Callable[[str], None]


@dataclass(frozen=True)
class Settings:
    """How a cpu worker runs. ``db_path`` ``None`` means :func:`db.database_path` in the
    child. ``before_commit`` is called inside every batch's transaction, after the writes
    (a fault-injection point for tests)."""

    poll_interval: float = 5.0
    batch_size: int = 50_000
    campaign_window: float = 3600.0
    min_targets: int = 2
    min_sources: int = 2
    db_path: Path | None = None
    busy_timeout: float = BUSY_TIMEOUT
    before_commit: BatchHook | None = None


Step = Callable[[Database, Settings], Awaitable[str | None]]


def worker(name: str, settings: Settings | None = None) -> Callable[[], Awaitable[None]]:
    """The zero-argument ``async def`` target prefork runs for worker ``name``: in a
    process of its own, or hosted in a worker group's (:mod:`prefork.groups`)."""
    step = STEPS[name]
    chosen = settings or Settings()

    async def run() -> None:
        try:
            await _poll(name, step, chosen)
        except (DatabaseError, sqlite3.Error) as exc:
            # One line and exit 1 (in a group: this worker's failure, not its siblings');
            # the backoff decides when to retry.
            raise SystemExit(f"{name}: database error: {exc}") from None

    run.__qualname__ = f"cpu.{name}"
    return run


async def _poll(name: str, step: Step, settings: Settings) -> None:
    """Run batches until cancelled (SIGTERM, SIGINT, or the group's stop): a batch under
    way is finished and committed first, then the cancellation goes on."""
    path = settings.db_path or database_path()
    try:
        async with connect(path, settings.busy_timeout) as db:
            log.info("%s: polling %s every %gs", name, path, settings.poll_interval)
            while True:
                started = time.perf_counter()
                summary, stopping = await _whole_batch(step(db, settings))
                if summary is not None:
                    log.info("%s: %s in %.0f ms", name, summary,
                             (time.perf_counter() - started) * 1000)
                if stopping:
                    raise asyncio.CancelledError
                if summary is None:  # else there may be more: poll again at once
                    await asyncio.sleep(settings.poll_interval)
    except asyncio.CancelledError:
        log.info("%s: stopped", name)
        raise


async def _whole_batch(batch: Awaitable[str | None]) -> tuple[str | None, bool]:
    """Run one batch to its end through any cancellation: its summary, and whether a
    cancellation came meanwhile (the caller then stops). Its own exception propagates."""
    task = asyncio.ensure_future(batch)
    stopping = False
    while not task.done():
        try:
            await asyncio.wait([task])  # unlike awaiting it, never cancels the batch
        except asyncio.CancelledError:
            stopping = True
    return task.result(), stopping


# -- watermarks and the write transaction ---------------------------------------------


class WatermarkMoved(DatabaseError):
    """Someone else moved this worker's watermark while it worked: a second copy of it."""


async def _watermark(c: aiosqlite.Connection, worker: str) -> int:
    rows = await c.execute_fetchall(
        "SELECT last_id FROM worker_watermarks WHERE worker = ?", (worker,))
    return next(iter(rows))[0] if rows else 0


Writer = Callable[[aiosqlite.Connection], Awaitable[None]]


async def _commit(db: Database, settings: Settings, worker: str, read_mark: int,
                  new_mark: int, write: Writer) -> None:
    """Write a batch's results and move the watermark from ``read_mark`` to ``new_mark``,
    in one transaction, or raise WatermarkMoved and write nothing."""
    async with db.transaction() as c:
        current = await _watermark(c, worker)
        if current != read_mark:
            raise WatermarkMoved(f"{worker}'s watermark moved from {read_mark} to {current} "
                                 f"while it worked: is another {worker} writing to {db.path}?")
        await write(c)
        await c.execute(
            "INSERT INTO worker_watermarks (worker, last_id, batches, updated_at) "
            "VALUES (?, ?, 1, ?) ON CONFLICT (worker) DO UPDATE SET "
            "last_id = excluded.last_id, batches = batches + 1, "
            "updated_at = excluded.updated_at", (worker, new_mark, time.time()))
        if settings.before_commit is not None:
            settings.before_commit(worker)


async def _observations_past(c: aiosqlite.Connection, worker: str) -> tuple[int, int] | None:
    """(watermark, latest observation id) if observations arrived past ``worker``'s mark."""
    mark = await _watermark(c, worker)
    rows = await c.execute_fetchall("SELECT coalesce(max(id), 0) FROM observations")
    latest = next(iter(rows))[0]
    return (mark, latest) if latest > mark else None


async def _fill_temp(c: aiosqlite.Connection, table: str, values: Iterable[int]) -> None:
    """A temporary one-column table of ids, to join on instead of a huge IN (...)."""
    await c.execute(f"CREATE TEMP TABLE IF NOT EXISTS {table} (id INTEGER PRIMARY KEY)")
    await c.execute(f"DELETE FROM {table}")
    await c.executemany(f"INSERT OR IGNORE INTO {table} (id) VALUES (?)",
                        ((v,) for v in values))


# -- clusterer -----------------------------------------------------------------------

# The stop-list: credentials on public wordlists and stock client fingerprints are
# flagged ``common`` and never link observations or sessions. Without it, every scanner
# that tried root:123456 joins one cluster: on the 300k demo data, 295,309 observations
# of 2,621 sources fell into a single cluster. Flags are read as they are now: changing
# one later does not re-split clusters already linked through it.
STOP_LIST_JOINS = ("LEFT JOIN credentials cr ON cr.id = o.credential_id "
                   "LEFT JOIN fingerprints fp ON fp.id = o.fingerprint_id")
LINKING_CREDENTIAL = "CASE WHEN cr.common THEN NULL ELSE o.credential_id END"
LINKING_FINGERPRINT = "CASE WHEN fp.common THEN NULL ELSE o.fingerprint_id END"


async def cluster_step(db: Database, settings: Settings) -> str | None:
    """Cluster up to ``batch_size`` new observations into the stored clusters."""
    async with db.snapshot() as c:
        mark = await _watermark(c, "clusterer")
        rows: list[kernels.ObservationKeys] = [tuple(r) for r in await c.execute_fetchall(
            f"SELECT o.id, o.source_id, {LINKING_CREDENTIAL}, {LINKING_FINGERPRINT}, "
            f"o.payload_id FROM observations o {STOP_LIST_JOINS} "
            "WHERE o.id > ? ORDER BY o.id LIMIT ?",
            (mark, settings.batch_size))]  # type: ignore[misc]
        if not rows:
            return None
        await _fill_temp(c, "batch_keys",
                         {k for row in rows for k in kernels.observation_indicators(row)})
        # Only the clusterer writes cluster_indicators, so this stays true until it commits.
        known = dict(await c.execute_fetchall(  # type: ignore[arg-type]
            "SELECT indicator, cluster_id FROM cluster_indicators "
            "JOIN temp.batch_keys ON batch_keys.id = indicator"))
    update = await run_kernel(kernels.cluster_observations, rows, known)
    touched = set(update.assignments.values()) | set(update.merged.values())

    async def write(c: aiosqlite.Connection) -> None:
        for old, new in update.merged.items():
            await c.execute("UPDATE observation_clusters SET cluster_id = ? "
                            "WHERE cluster_id = ?", (new, old))
            await c.execute("UPDATE cluster_indicators SET cluster_id = ? WHERE cluster_id = ?",
                            (new, old))
            await c.execute("DELETE FROM clusters WHERE id = ?", (old,))
        await c.executemany("INSERT INTO observation_clusters (observation_id, cluster_id) "
                            "VALUES (?, ?)", update.assignments.items())
        await c.executemany("INSERT OR REPLACE INTO cluster_indicators (indicator, cluster_id) "
                            "VALUES (?, ?)", update.indicators.items())
        await _fill_temp(c, "batch_clusters", touched)
        await c.execute(
            "INSERT OR REPLACE INTO clusters "
            "(id, observations, sources, decoys, first_seen, last_seen) "
            "SELECT oc.cluster_id, count(*), count(DISTINCT o.source_id), "
            "count(DISTINCT o.decoy_id), min(o.observed_at), max(o.observed_at) "
            "FROM observation_clusters oc JOIN temp.batch_clusters b ON b.id = oc.cluster_id "
            "JOIN observations o ON o.id = oc.observation_id GROUP BY oc.cluster_id")

    last = rows[-1][0]
    await _commit(db, settings, "clusterer", mark, last, write)
    return (f"{len(rows)} observations -> {len(touched)} clusters touched, "
            f"{len(update.merged)} merged (watermark {last})")


# -- campaign-clusterer --------------------------------------------------------------


async def campaign_step(db: Database, settings: Settings) -> str | None:
    """Group the current clusters into campaigns, when the clusterer has moved on."""
    async with db.snapshot() as c:
        mark = await _watermark(c, "campaign-clusterer")
        clustered = await _watermark(c, "clusterer")
        if clustered <= mark:
            return None
        spans = await _cluster_spans(c)
        sizes = dict(await c.execute_fetchall(  # type: ignore[arg-type]
            "SELECT id, observations FROM clusters"))
    campaign_of = kernels.campaigns(spans, settings.campaign_window)
    members: dict[int, list[kernels.ClusterSpan]] = defaultdict(list)
    for span in spans:
        members[campaign_of[span[0]]].append(span)
    campaigns = {cid: group for cid, group in members.items() if len(group) >= 2}

    async def write(c: aiosqlite.Connection) -> None:
        await c.execute("DELETE FROM campaign_members")
        await c.execute("DELETE FROM campaigns")
        await c.executemany(
            "INSERT INTO campaigns (id, clusters, observations, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?)",
            [(cid, len(group), sum(sizes[s[0]] for s in group), min(s[1] for s in group),
              max(s[2] for s in group)) for cid, group in campaigns.items()])
        await c.executemany(
            "INSERT INTO campaign_members (cluster_id, campaign_id) VALUES (?, ?)",
            [(s[0], cid) for cid, group in campaigns.items() for s in group])

    await _commit(db, settings, "campaign-clusterer", mark, clustered, write)
    return f"{len(spans)} clusters -> {len(campaigns)} campaigns (watermark {clustered})"


async def _cluster_spans(c: aiosqlite.Connection) -> list[kernels.ClusterSpan]:
    """Each cluster's time span and targets: the (decoy, source network) pairs it hit."""
    targets: dict[int, set[int]] = defaultdict(set)
    async with c.execute(
            "SELECT DISTINCT oc.cluster_id, o.decoy_id, s.network_id "
            "FROM observation_clusters oc JOIN observations o ON o.id = oc.observation_id "
            "JOIN sources s ON s.id = o.source_id") as cursor:
        async for cluster_id, decoy_id, network_id in cursor:
            targets[cluster_id].add(kernels.target_key(decoy_id, network_id))
    return [(cid, first, last, tuple(sorted(targets[cid])))
            for cid, first, last in await c.execute_fetchall(
                "SELECT id, first_seen, last_seen FROM clusters ORDER BY id")]


# -- attribution ---------------------------------------------------------------------


async def attribution_step(db: Database, settings: Settings) -> str | None:
    """Assign every session to an identity; report identities seen from several sources."""
    async with db.snapshot() as c:
        moved = await _observations_past(c, "attribution")
        if moved is None:
            return None
        mark, latest = moved
        sessions = await session_keys(c, latest)
        times = {row[0]: (row[1], row[2]) for row in await c.execute_fetchall(
            "SELECT id, started_at, coalesce(ended_at, started_at) FROM sessions "
            "WHERE id IN (SELECT DISTINCT session_id FROM observations WHERE id <= ?)",
            (latest,))}
    members = kernels.attribute_sessions(sessions).assignments
    source_of = {s[0]: s[1] for s in sessions}
    across = kernels.identities_across_sources(members, source_of, settings.min_sources)
    identities: dict[int, list[int]] = defaultdict(list)
    for session_id, identity_id in members.items():
        identities[identity_id].append(session_id)

    async def write(c: aiosqlite.Connection) -> None:
        await c.execute("DELETE FROM attributions")
        await c.execute("DELETE FROM identity_members")
        await c.execute("DELETE FROM identities")
        await c.executemany(
            "INSERT INTO identities (id, sessions, sources, first_seen, last_seen) "
            "VALUES (?, ?, ?, ?, ?)",
            [(iid, len(sids), len({source_of[s] for s in sids}),
              min(times[s][0] for s in sids), max(times[s][1] for s in sids))
             for iid, sids in identities.items()])
        await c.executemany("INSERT INTO identity_members (session_id, identity_id) "
                            "VALUES (?, ?)", members.items())
        await c.executemany("INSERT INTO attributions (identity_id, sources, sessions) "
                            "VALUES (?, ?, ?)",
                            [(iid, n, len(identities[iid])) for iid, n in across.items()])

    await _commit(db, settings, "attribution", mark, latest, write)
    return (f"{len(sessions)} sessions -> {len(identities)} identities, {len(across)} "
            f"across sources (watermark {latest})")


async def session_keys(c: aiosqlite.Connection, latest: int) -> list[kernels.SessionKeys]:
    """Every session with an observation up to ``latest``: its source, fingerprint and the
    credentials its observations used, less the stop-list's common ones."""
    credentials: dict[int, set[int]] = defaultdict(set)
    async with c.execute(
            "SELECT DISTINCT o.session_id, o.credential_id FROM observations o "
            "JOIN credentials cr ON cr.id = o.credential_id "
            "WHERE o.id <= ? AND NOT cr.common", (latest,)) as cursor:
        async for session_id, credential_id in cursor:
            credentials[session_id].add(credential_id)
    return [(sid, source_id, fingerprint_id, tuple(sorted(credentials.get(sid, ()))))
            for sid, source_id, fingerprint_id in await c.execute_fetchall(
                "SELECT s.id, s.source_id, CASE WHEN fp.common THEN NULL "
                "ELSE s.fingerprint_id END FROM sessions s "
                "LEFT JOIN fingerprints fp ON fp.id = s.fingerprint_id WHERE s.id IN "
                "(SELECT DISTINCT session_id FROM observations WHERE id <= ?) ORDER BY s.id",
                (latest,))]


# -- reuse-correlate -----------------------------------------------------------------


async def reuse_step(db: Database, settings: Settings) -> str | None:
    """Find credentials tried against at least ``min_targets`` distinct decoys."""
    async with db.snapshot() as c:
        moved = await _observations_past(c, "reuse-correlate")
        if moved is None:
            return None
        mark, latest = moved
        uses = await credential_uses(c, latest)
    findings = await run_kernel(kernels.credential_reuse, uses, settings.min_targets)

    async def write(c: aiosqlite.Connection) -> None:
        await c.execute("DELETE FROM credential_reuse")
        await c.executemany(
            "INSERT INTO credential_reuse (credential_id, decoys, sources, first_seen, "
            "last_seen) VALUES (?, ?, ?, ?, ?)", findings)

    await _commit(db, settings, "reuse-correlate", mark, latest, write)
    return f"{len(uses)} credential uses -> {len(findings)} reused (watermark {latest})"


async def credential_uses(c: aiosqlite.Connection, latest: int) -> list[kernels.CredentialUse]:
    return [tuple(row) for row in await c.execute_fetchall(  # type: ignore[misc]
        "SELECT credential_id, decoy_id, source_id, observed_at FROM observations "
        "WHERE id <= ? AND credential_id IS NOT NULL ORDER BY id", (latest,))]


STEPS: dict[str, Step] = {
    "clusterer": cluster_step,
    "campaign-clusterer": campaign_step,
    "attribution": attribution_step,
    "reuse-correlate": reuse_step,
}
