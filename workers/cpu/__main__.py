"""``python -m prefork_workers.cpu``: make, feed and inspect the cpu fleet's database, and
make the warm-ups' sample databases (``prepare-samples``, which the warm-ups run).

Every error the user can cause is one line on stderr, ``prefork-cpu: error: ...``, and exit
status 2; never a traceback. The database modules (SQLModel, SQLAlchemy) are imported by
the commands, not here, so that a usage error answers at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from prefork.cli import run_cli

PROG = "prefork-cpu"
EXIT_USAGE = 2

_RESULT_TABLES = ["clusters", "campaigns", "identities", "attributions", "credential_reuse"]


class CliError(click.ClickException):
    exit_code = EXIT_USAGE


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn what the user can get wrong in the database or arguments into a CliError."""
    from prefork_workers.cpu.db import DatabaseError

    try:
        yield
    except DatabaseError as exc:
        raise CliError(str(exc)) from None


def _path(value: str | None) -> Path:
    from prefork_workers.cpu import db

    if value is None:
        return db.database_path()
    try:
        return db.parse_location(value)
    except db.DatabaseError as exc:
        # parse_location() names the environment variable; here the value came from --db.
        raise db.DatabaseError(str(exc).replace(f"{db.ENV_VAR}=", "--db ", 1)) from None


_DB_OPTION = click.option("--db", "location", metavar="PATH",
                          help="SQLite file or sqlite:/// URL [default: $PREFORK_DB, else "
                               "$XDG_DATA_HOME/prefork/cpu.sqlite3]")


def _finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number", ctx, param)
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """The cpu fleet's demo database: generate a data set, feed it live, look inside."""


@cli.command()
@_DB_OPTION
@click.option("--observations", type=click.IntRange(min=1), default=300_000, show_default=True,
              help="How many observations to generate.")
@click.option("--sources", type=click.IntRange(min=1), default=3_000, show_default=True,
              help="How many attacker addresses.")
@click.option("--seed", type=int, default=1, show_default=True,
              help="Same seed, same data set.")
@click.option("--if-empty", is_flag=True,
              help="Do nothing (exit 0) if the database already holds observations.")
def generate(location: str | None, observations: int, sources: int, seed: int,
             if_empty: bool) -> None:
    """Fill an empty database with a generated data set (with planted findings)."""
    with _user_errors():
        from prefork_workers.cpu import demo_data

        path = _path(location)
        started = time.perf_counter()
        counts = demo_data.generate(path, observations=observations, sources=sources,
                                    seed=seed, if_empty=if_empty)
    seconds = time.perf_counter() - started
    if not counts:
        click.echo(f"{path}: already holds observations; left as it is")
        return
    rows = sum(counts.values())
    click.echo(f"{path}: {counts['observations']} observations, {counts['sessions']} "
               f"sessions, {counts['sources']} sources, {rows} rows in {seconds:.1f} s")


@cli.command()
@_DB_OPTION
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=50.0,
              show_default=True, callback=_finite, help="Observations per second.")
@click.option("--duration", type=click.FloatRange(min=0), default=None, callback=_finite,
              help="Stop after this many seconds [default: run until SIGINT/SIGTERM].")
@click.option("--seed", type=int, default=None, help="Seed for reproducible traffic.")
def feed(location: str | None, rate: float, duration: float | None, seed: int | None) -> None:
    """Append live observations to a generated database, as running sensors would."""
    with _user_errors():
        from prefork_workers.cpu import demo_data

        path = _path(location)
        started = time.perf_counter()
        added = demo_data.feed(path, rate=rate, duration=duration, seed=seed)
    click.echo(f"{path}: {added} observations added in {time.perf_counter() - started:.1f} s")


@cli.command("prepare-samples")
@click.argument("cache", type=click.Path(file_okay=False, path_type=Path))
# Plain ints: the generator checks the sizes, and its error is what a warm-up reports.
@click.option("--observations", type=int, required=True, help="Observations in each sample.")
@click.option("--sources", type=int, required=True, help="Attacker addresses in each sample.")
@click.option("--seed", type=int, required=True, help="The generator's seed.")
def prepare_samples(cache: Path, observations: int, sources: int, seed: int) -> None:
    """Make the warm-ups' two sample databases in the existing directory CACHE.

    The cpu warm-ups run this in a child process when their samples are missing.
    """
    import sqlite3

    from prefork_workers.cpu import warmup
    from prefork_workers.cpu.db import DatabaseError

    try:
        paths = warmup.make_samples(cache, observations=observations, sources=sources,
                                    seed=seed)
    except (warmup.WarmupError, DatabaseError, ValueError, OSError, sqlite3.Error) as exc:
        raise CliError(warmup.one_line(exc)) from None
    for state, path in paths.items():
        click.echo(f"{state}: {path}")


@cli.command()
@_DB_OPTION
def info(location: str | None) -> None:
    """Row counts of the observations and of what the workers derived."""
    import sqlite3

    with _user_errors():
        from prefork_workers.cpu import db

        path = _path(location)
        if not path.exists():
            raise db.DatabaseError(f"{path} does not exist; run `generate` first")
        db.prepare_database(path)  # checks that it is a database, and ours
        try:
            connection = sqlite3.connect(path, timeout=db.BUSY_TIMEOUT)
            try:
                count = connection.execute("SELECT count(*), min(id), max(id) "
                                           "FROM observations").fetchone()
                results = {table: connection.execute(f"SELECT count(*) FROM {table}")
                           .fetchone()[0] for table in _RESULT_TABLES}
                marks = connection.execute("SELECT worker, last_id, batches FROM "
                                           "worker_watermarks ORDER BY worker").fetchall()
            finally:
                connection.close()
        except sqlite3.Error as exc:
            raise db.DatabaseError(f"{path}: {exc}") from None
    click.echo(str(path))
    ids = f"  (ids {count[1]}..{count[2]})" if count[0] else ""
    click.echo(f"  {'observations':<20}{count[0]:>10}{ids}")
    for table, rows in results.items():
        click.echo(f"  {table:<20}{rows:>10}")
    if not marks:
        click.echo("  worker_watermarks: none (no worker has run)")
    for worker, last_id, batches in marks:
        behind = f", {count[2] - last_id} behind" if count[0] else ""
        click.echo(f"  watermark {worker:<16}last_id {last_id} ({batches} batches{behind})")


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every user error is one line and exit status 2."""
    run_cli(cli, PROG, argv)


if __name__ == "__main__":
    main()
