"""The cpu fleet's SQLite database: where it lives, its schema, and safe connections.

A connection is opened in the process that uses it, after fork, and never crosses a
fork: two processes sharing one SQLite connection corrupt its state. Every connection
uses WAL (readers never block the writer), a busy timeout (writers queue instead of
failing at once) and explicit transactions.

Every problem a user can cause (an unwritable path, a file that is not a database, a
database held locked, a schema from another version) is a :class:`DatabaseError` whose
``str()`` is one line naming the file.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiosqlite
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.schema import CreateIndex, CreateTable
from sqlmodel import SQLModel

from prefork_workers.cpu.models import SCHEMA_VERSION

ENV_VAR = "PREFORK_DB"
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another's transaction before giving up


class DatabaseError(Exception):
    """The database cannot be used. ``str()`` is one line for the user."""


def database_path() -> Path:
    """``$PREFORK_DB`` (a path or a SQLite URL), else ``$XDG_DATA_HOME/prefork/cpu.sqlite3``
    (``~/.local/share/prefork/cpu.sqlite3``)."""
    value = os.environ.get(ENV_VAR)
    if value:
        return parse_location(value)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "prefork" / "cpu.sqlite3"


def parse_location(value: str) -> Path:
    """A file path, or ``sqlite:///relative``, ``sqlite:////absolute`` (any sqlite+driver)."""
    if "://" not in value:
        return Path(value).expanduser()
    scheme, _, rest = value.partition("://")
    if scheme.split("+")[0] != "sqlite":
        raise DatabaseError(f"{ENV_VAR}={value!r}: only SQLite databases are supported")
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        raise DatabaseError(f"{ENV_VAR}={value!r}: expected sqlite:///PATH")
    return Path(rest[1:].split("?")[0]).expanduser()


def schema_statements() -> list[str]:
    """The DDL of every table and index, for SQLite, idempotent (IF NOT EXISTS)."""
    dialect = sqlite_dialect.dialect()
    statements = []
    for table in SQLModel.metadata.sorted_tables:
        statements.append(str(CreateTable(table, if_not_exists=True).compile(dialect=dialect)))
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index, if_not_exists=True)
                                  .compile(dialect=dialect)))
    return statements


def prepare_database(path: Path, busy_timeout: float = BUSY_TIMEOUT) -> None:
    """Create the file and its schema on first use; otherwise check it is ours.

    Safe to call from several processes at once: creation happens under an IMMEDIATE
    transaction, and whoever comes second finds the schema in place.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create {path.parent}: {exc.strerror}") from None
    if path.exists() and not path.is_file():  # /dev/null: SQLite reads it, then cannot write
        raise DatabaseError(f"{path} is not a regular file; point {ENV_VAR} or --db at one")
    try:
        connection = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise _describe(path, exc, busy_timeout) from None
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            _create_schema(connection, path)
        elif version != SCHEMA_VERSION:
            raise DatabaseError(f"{path} has schema version {version}; this cpu fleet "
                                f"uses version {SCHEMA_VERSION}")
        _use_wal(connection, busy_timeout)
    except sqlite3.Error as exc:
        raise _describe(path, exc, busy_timeout) from None
    finally:
        connection.close()


def _use_wal(connection: sqlite3.Connection, busy_timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the write lock.

    The switch takes a shared lock, then needs an exclusive one. If another connection
    holds the reserved lock meanwhile (the next process in its creation transaction),
    SQLite answers "database is locked" at once, without waiting in the busy handler,
    since waiting could deadlock; the way out is to let go and try again. Four processes
    preparing a new file at once hit this about once in a hundred starts.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(0.01)  # the holder commits within milliseconds


def _create_schema(connection: sqlite3.Connection, path: Path) -> None:
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = connection.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            foreign = connection.execute(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%'").fetchone()[0]
            if foreign:
                raise DatabaseError(f"{path} is a SQLite database of something else "
                                    f"({foreign} tables, no prefork schema); "
                                    f"point {ENV_VAR} at a new file")
            for statement in schema_statements():
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        rollback(connection)
        raise


def rollback(connection: sqlite3.Connection) -> None:
    """Roll back the transaction under way, if SQLite has not already: after a full disk or
    an I/O error it has, and a ROLLBACK then would raise "cannot rollback - no transaction
    is active" in place of the error that says what went wrong. A ROLLBACK that fails
    leaves the same to the journal (the next connection rolls it back): nothing committed
    is lost either way, and the error under way is the one to report."""
    if connection.in_transaction:
        try:
            connection.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _describe(path: Path, exc: sqlite3.Error,
              busy_timeout: float = BUSY_TIMEOUT) -> DatabaseError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return DatabaseError(f"{path} is not a SQLite database ({text})")
    if "locked" in text or "busy" in text:
        return DatabaseError(f"{path} is locked by another process "
                             f"(waited {busy_timeout:g}s): {text}")
    if "readonly" in text or "unable to open" in text or "disk I/O" in text:
        return DatabaseError(f"cannot write {path}: {text}")
    return DatabaseError(f"{path}: {text}")


class Database:
    """One process's connection to the fleet's database."""

    def __init__(self, path: Path, connection: aiosqlite.Connection,
                 busy_timeout: float) -> None:
        self.path = path
        self.connection = connection
        self.busy_timeout = busy_timeout

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[aiosqlite.Connection]:
        """A read transaction: one consistent view, and no lock that stops a writer (WAL)."""
        try:
            await self.connection.execute("BEGIN")
        except sqlite3.Error as exc:
            raise _describe(self.path, exc, self.busy_timeout) from None
        try:
            yield self.connection
        finally:
            if self.connection.in_transaction:  # not after an error that ended it
                await self.connection.execute("COMMIT")

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (cancellation too).

        IMMEDIATE takes the write lock up front, so a batch never fails half-way with
        SQLITE_BUSY after it has read: it waits up to the busy timeout before it starts.
        """
        try:
            await self.connection.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _describe(self.path, exc, self.busy_timeout) from None
        try:
            yield self.connection
        except BaseException:
            if self.connection.in_transaction:  # as rollback() says
                try:
                    await self.connection.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        try:
            await self.connection.execute("COMMIT")
        except sqlite3.Error as exc:
            raise _describe(self.path, exc, self.busy_timeout) from None


@asynccontextmanager
async def connect(path: Path, busy_timeout: float = BUSY_TIMEOUT) -> AsyncIterator[Database]:
    """Prepare the database and open this process's connection to it. Call after fork."""
    prepare_database(path, busy_timeout)
    try:
        connection = await aiosqlite.connect(path, timeout=busy_timeout, isolation_level=None)
    except sqlite3.Error as exc:
        raise _describe(path, exc, busy_timeout) from None
    try:
        await connection.execute("PRAGMA foreign_keys = ON")
        await connection.execute("PRAGMA synchronous = NORMAL")  # durable enough under WAL
        yield Database(path, connection, busy_timeout)
    finally:
        await connection.close()
