"""What every ``prefork`` command shares: option types, the one-line error, running a
click command as a program.

Every error the user can cause is one line on stderr, ``PROG: error: ...``, and a non-zero
exit (:class:`prefork.exits.ExitCode`; 2 for bad input); never a traceback.
"""

from __future__ import annotations

import math
import os
import sys
from typing import NoReturn

import click

from prefork.exits import ExitCode
from prefork.fleet import MAX_SECONDS, parse_size
from prefork.metrics_process import parse_listen
from prefork.policy import is_scale_delta


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Seconds(click.ParamType):
    """A number of seconds from 0 to :data:`prefork.fleet.MAX_SECONDS` (a week)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            seconds = float(str(value))
        except ValueError:
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds) or seconds < 0:
            self.fail(f"{value!r} must be a finite number of seconds >= 0", param, ctx)
        if seconds > MAX_SECONDS:
            self.fail(f"{value!r} is more than {MAX_SECONDS:g} seconds (7 days), the "
                      "longest prefork accepts", param, ctx)
        return seconds


SECONDS = Seconds()


class PositiveSeconds(Seconds):
    """A finite number of seconds > 0."""

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        seconds = super().convert(value, param, ctx)
        if seconds <= 0:
            self.fail(f"{value!r} must be more than 0 seconds", param, ctx)
        return seconds


class Size(click.ParamType):
    """A size in bytes: 4096, 512M, 1.5G (powers of 1024)."""

    name = "size"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = Size()


class ListenAddress(click.ParamType):
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` (host 127.0.0.1)."""

    name = "host:port"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        try:
            return parse_listen(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class Delta(click.ParamType):
    """+1 or -1 (1 means +1)."""

    name = "delta"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if is_scale_delta(value):
            return value  # type: ignore[return-value]
        try:
            delta = int(str(value))
        except ValueError:
            delta = 0
        if not is_scale_delta(delta):
            self.fail(f"{value!r} must be +1 or -1", param, ctx)
        return delta


class GroupSpec(click.ParamType):
    """``NAME=WORKER,WORKER``: a worker group (:mod:`prefork.groups`), as ``(NAME, names)``;
    whether those are workers the fleet can host is the fleet's check."""

    name = "name=worker,worker"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> tuple[str, tuple[str, ...]]:
        if isinstance(value, tuple):
            return value  # type: ignore[return-value]
        name, equals, workers = str(value).partition("=")
        if not equals or not name.strip():
            self.fail(f"{value!r} is not NAME=WORKER,WORKER", param, ctx)
        names = tuple(n.strip() for n in workers.split(",")) if workers.strip() else ()
        return name.strip(), names


def groups_of(specs: tuple[tuple[str, tuple[str, ...]], ...]) -> dict[str, tuple[str, ...]]:
    """``--group`` options as a fleet's ``groups``; raises CliError for a name given twice."""
    groups: dict[str, tuple[str, ...]] = {}
    for name, workers in specs:
        if name in groups:
            raise CliError(f"--group {name} is given twice")
        groups[name] = workers
    return groups


def import_from_working_directory() -> None:
    """Let ``--fleet module:ATTR`` and ``--preload`` find modules in the current directory,
    as gunicorn and ``python -m`` do; the installed ``prefork`` script alone would not."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def run_cli(command: click.Command, prog: str, argv: list[str] | None = None) -> NoReturn:
    """Run a click command as a program: every user error is one line, ``PROG: error: ...``,
    with click's exit code (2 for bad input); a command's int result is the exit code."""
    try:
        result = command.main(args=argv, prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        no_command = type(exc).__name__ == "NoArgsIsHelpError"  # a UsageError since click 8.2
        if no_command and isinstance(exc, click.UsageError) and exc.ctx is not None:
            click.echo(exc.ctx.get_help(), err=True)  # no command at all: the help, as click does
        else:
            click.echo(f"{prog}: error: {' '.join(exc.format_message().split())}", err=True)
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        # Ctrl-C before the master took over its signals (e.g. while importing the floor).
        sys.exit(ExitCode.INTERRUPTED)
    sys.exit(result if isinstance(result, int) else 0)
