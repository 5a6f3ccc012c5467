"""The ``prefork`` command: parse, call the library, map outcomes to exit codes.

Every error the user can cause is one line on stderr, ``prefork: error: ...``, and a
non-zero exit (2 for bad input); never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

import click

from prefork import __version__, logs
from prefork.control import (
    EXIT_CONTROL_FAILED,
    EXIT_NO_MASTER,
    ControlError,
    NoMaster,
    check_fleet_name,
    exchange,
    fetch_status,
    format_status,
    request,
    socket_path,
)
from prefork.fleet import (
    RESTART_POLICIES,
    Fleet,
    FleetError,
    StartLimit,
    import_module,
    load_fleet,
    parse_size,
    registered_fleets,
)
from prefork.lock import AlreadyRunning, RuntimeDirError, default_runtime_dir
from prefork.master import EXIT_ALREADY_RUNNING, EXIT_USAGE, Master, WarmUpError
from prefork.unit import UnitError, default_venv, reachability_warnings, render_unit

log = logging.getLogger("prefork")


class CliError(click.ClickException):
    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Seconds(click.ParamType):
    """A finite number of seconds >= 0."""

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefork")
def cli() -> None:
    """Import a fleet's floor once, fork one child per worker, and supervise them."""


@cli.command()
@click.option("--fleet", "-f", "fleet_spec", required=True, metavar="NAME|module:ATTR",
              help="A registered fleet (see `prefork fleets`) or module:ATTR.")
@click.option("--preload", multiple=True, metavar="MODULE",
              help="Import MODULE into the floor before forking (repeatable).")
@click.option("--grace", type=SECONDS, default=15.0, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping.")
@click.option("--max-backoff", type=SECONDS, default=None,
              help="Cap on a worker's restart delay [fleet's setting, 30].")
@click.option("--backoff-reset", type=SECONDS, default=None,
              help="Uptime after which a child counts as healthy and its backoff "
                   "starts again from the first delay [fleet's setting, 60].")
@click.option("--start-limit-burst", type=click.IntRange(min=1), default=None,
              help="Mark a worker failed when it starts more than this many times ...")
@click.option("--start-limit-interval", type=SECONDS, default=None,
              help="... within this many seconds; 0 disables the limit [5 in 60].")
@click.option("--restart", type=click.Choice(RESTART_POLICIES), default=None,
              help="Restart policy for workers that do not set their own [on-failure].")
@click.option("--freeze/--no-freeze", default=True, show_default=True,
              help="gc.collect() and gc.freeze() in the master before forking.")
@click.option("--warm-up/--no-warm-up", default=False, show_default=True,
              help="Run every worker's warm-up hook in the master before forking.")
@click.option("--max-private-memory", type=SIZE, default=None, metavar="SIZE",
              help="Recycle a worker whose private memory (USS) stays above SIZE "
                   "(512M, 1G) for workers that set none [no limit].")
@click.option("--memory-check-interval", type=PositiveSeconds(), default=10.0,
              show_default=True,
              help="Seconds between checks of the workers' private memory.")
@click.option("--runtime-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the fleet's lock lives [$PREFORK_RUNTIME_DIR, $RUNTIME_DIRECTORY, "
                   "$XDG_RUNTIME_DIR/prefork, /tmp/prefork-UID].")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              default="info", show_default=True)
def run(
    fleet_spec: str,
    preload: tuple[str, ...],
    grace: float,
    max_backoff: float | None,
    backoff_reset: float | None,
    start_limit_burst: int | None,
    start_limit_interval: float | None,
    restart: str | None,
    freeze: bool,
    warm_up: bool,
    max_private_memory: int | None,
    memory_check_interval: float,
    runtime_dir: Path | None,
    log_level: str,
) -> int:
    """Run a fleet until SIGTERM or SIGINT (Ctrl-C)."""
    logs.configure(log_level)
    _import_from_working_directory()
    started = time.perf_counter()
    try:
        for module in preload:
            import_module(module, what="preload module")
        fleet = load_fleet(fleet_spec)
        fleet = _with_cli_defaults(fleet, max_backoff, backoff_reset, start_limit_burst,
                                   start_limit_interval, restart)
        if max_private_memory is not None:
            fleet = dataclasses.replace(fleet, max_private_memory=max_private_memory)
        master = Master(fleet, grace=grace, freeze=freeze, warm_up=warm_up,
                        runtime_dir=runtime_dir, memory_check_interval=memory_check_interval)
        master.lock.acquire()
    except FleetError as exc:
        raise CliError(str(exc)) from None
    except AlreadyRunning as exc:
        raise CliError(str(exc), EXIT_ALREADY_RUNNING) from None
    except RuntimeDirError as exc:
        raise CliError(str(exc)) from None
    log.info("prefork %s on Python %s: floor of fleet %s imported in %.0f ms", __version__,
             sys.version.split()[0], fleet.name, (time.perf_counter() - started) * 1000)
    try:
        return master.run()
    except (ControlError, RuntimeDirError, WarmUpError) as exc:  # before any fork
        raise CliError(str(exc)) from None


@cli.command()
@click.option("--fleet", "-f", "fleet_spec", default="cpu", show_default=True,
              metavar="NAME|module:ATTR", help="The fleet whose floor to measure.")
@click.option("--workers", "-w", type=click.IntRange(min=1), default=None,
              help="Children to fork; more than the fleet's workers cycles through them "
                   "[one per worker].")
@click.option("--idle", type=SECONDS, multiple=True, metavar="SECONDS",
              help="Measure the idle children this long after they are up "
                   "(repeatable: one sample each) [1].")
@click.option("--freeze/--no-freeze", default=True, show_default=True,
              help="gc.collect() and gc.freeze() before forking, as `prefork run` does.")
@click.option("--warm-up/--no-warm-up", default=False, show_default=True,
              help="Run every worker's warm-up in the master before forking.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also measure the same workers as fresh interpreters, one per worker.")
@click.option("--pid", "master_pid", type=click.IntRange(min=1), default=None,
              metavar="MASTER_PID", help="Measure a running fleet instead; reads /proc only.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see the README).")
@click.pass_context
def probe(
    ctx: click.Context,
    fleet_spec: str,
    workers: int | None,
    idle: tuple[float, ...],
    freeze: bool,
    warm_up: bool,
    baseline: bool,
    master_pid: int | None,
    as_json: bool,
) -> None:
    """Measure how much of each worker's memory is shared with the master and how much
    is its own (RSS, USS, PSS, shared, swap), against one fresh interpreter per worker."""
    from prefork.probe import ProbeError, format_report, probe_fleet, probe_running

    try:
        if master_pid is not None:
            given = [f"--{name.replace('_', '-')}" for name in
                     ("fleet", "workers", "idle", "freeze", "warm_up", "baseline")
                     if ctx.get_parameter_source(name if name != "fleet" else "fleet_spec")
                     is click.core.ParameterSource.COMMANDLINE]
            if given:
                raise CliError(f"--pid measures a running fleet as it is: "
                               f"{', '.join(given)} cannot be used with it")
            report = probe_running(master_pid)
        else:
            _import_from_working_directory()
            fleet = load_fleet(fleet_spec)
            report = probe_fleet(fleet, fleet_spec, workers=workers, idle=idle or (1.0,),
                                 freeze=freeze, warm_up=warm_up, baseline=baseline)
    except (FleetError, ProbeError) as exc:
        raise CliError(str(exc)) from None
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        click.echo(format_report(report))


@cli.command()
def fleets() -> None:
    """List the registered fleets (entry point group prefork.fleets)."""
    for name, entry_point in sorted(registered_fleets().items()):
        click.echo(f"{name}\t{entry_point.value}")


@cli.command()
@click.option("--fleet", "-f", "fleet_spec", required=True, metavar="NAME|module:ATTR",
              help="A registered fleet (see `prefork fleets`) or module:ATTR.")
@click.option("--user", metavar="USER", default=None,
              help="Run as USER (and its group) [a DynamicUser= of the unit's own].")
@click.option("--group", metavar="GROUP", default=None, help="Run with GROUP (needs --user).")
@click.option("--venv", type=click.Path(path_type=Path), default=None,
              help="The virtual environment with prefork and the fleet installed "
                   "[this one's, sys.prefix].")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="WorkingDirectory= of the master and its workers.")
@click.option("--conflicts", multiple=True, metavar="UNIT",
              help="A unit this fleet replaces, stopped before it starts (repeatable).")
@click.option("--grace", type=SECONDS, default=15.0, show_default=True,
              help="The master's --grace; TimeoutStopSec= is 15 s longer.")
@click.option("--memory-max", metavar="SIZE", default=None,
              help="MemoryMax= for the whole fleet, master and workers together "
                   "(512M, 2G, 50%, infinity).")
@click.option("--watchdog", type=SECONDS, default=30.0, show_default=True,
              help="WatchdogSec=; 0 leaves the watchdog off.")
@click.option("--network/--no-network", default=False, show_default=True,
              help="Let the workers use IPv4/IPv6 [no: local sockets only].")
def systemd(
    fleet_spec: str,
    user: str | None,
    group: str | None,
    venv: Path | None,
    workdir: Path | None,
    conflicts: tuple[str, ...],
    grace: float,
    memory_max: str | None,
    watchdog: float,
    network: bool,
) -> None:
    """Print a hardened systemd unit that runs the fleet's master.

    Save it as /etc/systemd/system/prefork-NAME.service (its first line names it).
    """
    venv = default_venv() if venv is None else venv
    try:
        text = render_unit(fleet_spec, venv=venv, user=user, group=group, workdir=workdir,
                           conflicts=conflicts, grace=grace, memory_max=memory_max,
                           watchdog=watchdog, network=network)
        _import_from_working_directory()
        load_fleet(fleet_spec)  # after the cheap checks: this imports the fleet's floor
    except (UnitError, FleetError) as exc:
        raise CliError(str(exc)) from None
    for warning in reachability_warnings(venv, user, workdir):
        click.echo(f"prefork: warning: {warning}", err=True)
    click.echo(text, nl=False)


# -- operating a running fleet: status, reload, scale ------------------------------------


class Delta(click.ParamType):
    """+1 or -1 (1 means +1)."""

    name = "delta"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int) and value in (1, -1):
            return value
        try:
            delta = int(str(value))
        except ValueError:
            delta = 0
        if delta not in (1, -1):
            self.fail(f"{value!r} must be +1 or -1", param, ctx)
        return delta


_control_fleet_option = click.option(
    "--fleet", "-f", "fleet_spec", default=None, metavar="NAME|module:ATTR",
    help="The fleet's name, or module:ATTR (imported to learn its name) "
         "[the only fleet with a socket in the runtime directory].")
_control_runtime_dir_option = click.option(
    "--runtime-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the master's socket is, as given to `prefork run` [$PREFORK_RUNTIME_DIR, "
         "$RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/prefork, /tmp/prefork-UID].")

_T = TypeVar("_T")

# ANSI: cursor home, clear the screen, clear to the end of the line, clear below the cursor.
_HOME, _CLEAR_SCREEN, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


@cli.command()
@_control_fleet_option
@click.option("--json", "as_json", is_flag=True,
              help="One JSON document: the master's status, with memory in bytes.")
@click.option("--watch", type=PositiveSeconds(), is_flag=False, flag_value=2.0, default=None,
              metavar="[SECONDS]", help="Refresh in place every SECONDS [2] until Ctrl-C.")
@_control_runtime_dir_option
def status(fleet_spec: str | None, as_json: bool, watch: float | None,
           runtime_dir: Path | None) -> int:
    """Show each worker of a running fleet: state, restarts, uptime, last exit, memory.

    Exit codes: 0 shown; 1 the master did not answer properly; 2 bad input; 3 no master
    of the fleet is running.
    """

    if watch is not None and as_json:
        raise CliError("--watch and --json cannot be used together")
    path = _control_socket(fleet_spec, runtime_dir)
    document = _control_call(lambda: fetch_status(path))
    if watch is None:
        click.echo(json.dumps(document, indent=2) if as_json else format_status(document))
        return 0
    return _watch_status(path, watch, format_status(document))


def _watch_status(path: Path, interval: float, first: str) -> int:
    """Redraw the status every ``interval`` seconds, as ``top`` does, until Ctrl-C (exit 0).

    Only the first request's failure ends the command; later ones (a master restarting,
    say) show in the frame, and the next refresh tries again.
    """

    body, clear = first, _CLEAR_SCREEN
    try:
        while True:
            frame = f"every {interval:g}s, {time.strftime('%H:%M:%S')}\n\n{body}"
            # Overwrite in place rather than clear first, so the table never flickers.
            # Not click.echo: it strips the ANSI codes whenever stdout is not a terminal.
            sys.stdout.write(_HOME + clear + frame.replace("\n", _CLEAR_LINE + "\n")
                             + _CLEAR_LINE + "\n" + _CLEAR_BELOW)
            sys.stdout.flush()
            clear = ""
            time.sleep(interval)
            try:
                body = format_status(fetch_status(path))
            except (NoMaster, ControlError) as exc:
                body = f"prefork: {exc}"
    except KeyboardInterrupt:
        return 0


@cli.command()
@_control_fleet_option
@_control_runtime_dir_option
def reload(fleet_spec: str | None, runtime_dir: Path | None) -> int:
    """Send the fleet's master SIGHUP: a rolling restart of its workers.

    The master's pid comes from its control socket; exit codes as for `prefork status`.
    """

    path = _control_socket(fleet_spec, runtime_dir)
    reply, peer = _control_call(lambda: exchange(path, {"command": "status"}))
    if "error" in reply:
        raise CliError(f"the master refused status: {reply['error']}", EXIT_CONTROL_FAILED)
    pid, fleet = reply.get("master_pid"), reply.get("fleet") or path.stem
    # Signal only the process that really listens on the socket, whatever its reply says.
    if pid != peer.pid:
        raise CliError(f"the reply on {path} names master pid {pid!r}, but pid {peer.pid} "
                       "listens there; not sending SIGHUP", EXIT_CONTROL_FAILED)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CliError(f"no master of fleet {fleet!r} is running (pid {pid} exited)",
                       EXIT_NO_MASTER) from None
    except PermissionError:
        raise CliError(f"not allowed to signal master {pid}: run as its user or as root",
                       EXIT_CONTROL_FAILED) from None
    click.echo(f"sent SIGHUP to master {pid} (fleet {fleet})")
    return 0


def _not_an_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # ignore_unknown_options (for a DELTA of -1) hands a mistyped option over as WORKER.
    if value.startswith("-"):
        raise click.NoSuchOption(value, ctx=ctx)
    return value


@cli.command(context_settings={"ignore_unknown_options": True})  # so that DELTA may be -1
@_control_fleet_option
@_control_runtime_dir_option
@click.argument("worker", callback=_not_an_option)
@click.argument("delta", type=Delta())
def scale(fleet_spec: str | None, runtime_dir: Path | None, worker: str, delta: int) -> int:
    """Start (+1) or stop (-1) one replica of WORKER in a running fleet.

    Exit codes: 0 done; 1 the master did not answer properly; 2 bad input, or the master
    refused (e.g. an unknown worker); 3 no master of the fleet is running.
    """

    path = _control_socket(fleet_spec, runtime_dir)
    reply = _control_call(lambda: request(
        path, {"command": "scale", "worker": worker, "delta": delta}))
    if "error" in reply:
        raise CliError(str(reply["error"]))
    fleet = reply.get("fleet") or path.stem
    replicas = reply.get("replicas")
    if isinstance(replicas, int) and not isinstance(replicas, bool):
        click.echo(f"{worker}: {replicas} replicas after {delta:+d} (fleet {fleet})")
    else:
        click.echo(f"{worker}: {delta:+d} replica asked of the master (fleet {fleet})")
    return 0


def _control_socket(fleet_spec: str | None, runtime_dir: Path | None) -> Path:
    """The socket of the fleet ``--fleet`` names, or of the only fleet that has one.

    A plain name is used as it is (registered fleets are never imported); ``module:ATTR``
    is imported to learn its fleet's name.
    """

    directory = runtime_dir or default_runtime_dir()
    if fleet_spec is None:
        try:
            names = sorted(entry.name for entry in os.scandir(directory)
                           if entry.name.endswith(".sock"))
        except FileNotFoundError:
            names = []
        except OSError as exc:
            raise CliError(f"cannot read runtime directory {directory}: {exc.strerror}"
                           ) from None
        if not names:
            raise CliError(f"no prefork master is running (no socket in {directory})",
                           EXIT_NO_MASTER)
        if len(names) > 1:
            listed = ", ".join(name.removesuffix(".sock") for name in names)
            raise CliError(f"{len(names)} fleets have a socket in {directory} ({listed}): "
                           "choose one with --fleet")
        return directory / names[0]
    if ":" in fleet_spec:
        _import_from_working_directory()
        try:
            name = load_fleet(fleet_spec).name
        except FleetError as exc:
            raise CliError(str(exc)) from None
    else:
        name = fleet_spec
        problem = check_fleet_name(name)
        if problem is not None:
            raise CliError(problem)
    return socket_path(directory, name)


def _control_call(call: Callable[[], _T]) -> _T:
    """``call()``, with NoMaster as exit 3 and ControlError as exit 1, one line each."""

    try:
        return call()
    except NoMaster as exc:
        raise CliError(str(exc), EXIT_NO_MASTER) from None
    except ControlError as exc:
        raise CliError(str(exc), EXIT_CONTROL_FAILED) from None


def _import_from_working_directory() -> None:
    """Let ``--fleet module:ATTR`` and ``--preload`` find modules in the current directory,
    as gunicorn and ``python -m`` do; the installed ``prefork`` script alone would not."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def _with_cli_defaults(
    fleet: Fleet,
    max_backoff: float | None,
    backoff_reset: float | None,
    burst: int | None,
    interval: float | None,
    restart: str | None,
) -> Fleet:
    backoff = fleet.backoff
    if max_backoff is not None:
        backoff = dataclasses.replace(backoff, maximum=max_backoff)
    if backoff_reset is not None:
        backoff = dataclasses.replace(backoff, reset_after=backoff_reset)
    start_limit = StartLimit(
        burst=fleet.start_limit.burst if burst is None else burst,
        interval=fleet.start_limit.interval if interval is None else interval,
    )
    return dataclasses.replace(fleet, backoff=backoff, start_limit=start_limit,
                               restart=restart or fleet.restart).validate()


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
        sys.exit(130)
    sys.exit(result if isinstance(result, int) else 0)


def main(argv: list[str] | None = None) -> None:
    """The ``prefork`` console entry point."""
    run_cli(cli, "prefork", argv)
