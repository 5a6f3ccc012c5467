"""``prefork status``, ``reload``, ``scale`` and ``metrics``: talk to a running master.

These never import the fleet's floor (a name is the socket's; a master started with
``module:ATTR`` says so in its status reply), nor the master. Exit codes: 0 done; 1 the
master did not answer properly (and for ``reload``: the reload failed or did not end in
time); 2 bad input, or the master refused; 3 no master of the fleet is running.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from prefork import logs
from prefork.cli_params import (
    CliError,
    Delta,
    ListenAddress,
    PositiveSeconds,
    import_from_working_directory,
)
from prefork.client import (
    NoMaster,
    ReloadResult,
    ended_reload,
    exchange,
    fetch_status,
    format_status,
    masters_in,
    request,
)
from prefork.control import ControlError, one_line, shown
from prefork.exits import ExitCode
from prefork.fleet import FleetError, load_fleet
from prefork.metrics_process import (
    DEFAULT_INTERVAL,
    MetricsError,
    bind_listener,
    check_textfile,
    listen_url,
)
from prefork.paths import (
    RuntimeDirError,
    default_runtime_dir,
    name_problem,
    runtime_dir_problem,
    socket_path,
)
from prefork.prctl import PR_SET_PDEATHSIG, prctl

_control_fleet_option = click.option(
    "--fleet", "-f", "fleet_spec", default=None, metavar="NAME|module:ATTR",
    help="The fleet's name, or the module:ATTR its master was started with "
         "[the only fleet with a socket in the runtime directory].")


def absolute_runtime_dir(ctx: click.Context, param: click.Parameter,
                         value: str | None) -> Path | None:
    """``--runtime-dir``'s check: an absolute path (an empty or relative one would
    silently be the current directory)."""
    if value is None:
        return None
    problem = runtime_dir_problem(value)
    if problem is not None:
        raise click.BadParameter(problem, ctx=ctx, param=param)
    return Path(value)


_control_runtime_dir_option = click.option(
    "--runtime-dir", type=click.Path(file_okay=False), default=None,
    callback=absolute_runtime_dir,
    help="Where the master's socket is, as given to `prefork run` [$PREFORK_RUNTIME_DIR, "
         "$RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/prefork, /tmp/prefork-UID].")

_T = TypeVar("_T")

# ANSI: cursor home, clear the screen, clear to the end of the line, clear below the cursor.
_HOME, _CLEAR_SCREEN, _CLEAR_LINE, _CLEAR_BELOW = "\x1b[H", "\x1b[2J", "\x1b[K", "\x1b[J"


@click.command()
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
    any_uid = runtime_dir is not None  # a directory named on purpose (client.request)
    document = _control_call(lambda: fetch_status(path, any_uid=any_uid))
    if watch is None:
        click.echo(json.dumps(document, indent=2) if as_json else format_status(document))
        return 0
    return _watch_status(path, watch, format_status(document), any_uid=any_uid)


def _watch_status(path: Path, interval: float, first: str, *, any_uid: bool) -> int:
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
                body = format_status(fetch_status(path, any_uid=any_uid))
            except (NoMaster, ControlError) as exc:
                body = f"prefork: {exc}"
    except KeyboardInterrupt:
        return 0


RELOAD_TIMEOUT = 600.0  # seconds `prefork reload` waits for the end, unless --timeout
_RELOAD_POLL = 0.2  # seconds between two status requests while it waits
_STATUS_TIMEOUT = 5.0  # seconds one of those requests may take


@click.command()
@_control_fleet_option
@_control_runtime_dir_option
@click.option("--workers-only", is_flag=True,
              help="Only restart the workers, from the code the master already loaded.")
@click.option("--no-wait", is_flag=True, help="Ask for the reload and return at once.")
@click.option("--timeout", type=PositiveSeconds(), default=RELOAD_TIMEOUT, show_default=True,
              help="Seconds to wait for the reload to end.")
def reload(fleet_spec: str | None, runtime_dir: Path | None, workers_only: bool,
           no_wait: bool, timeout: float) -> int:
    """Load the fleet's code afresh from disk and restart every worker on it, one at a
    time; the master keeps its pid, and new code that fails to load changes nothing.

    Waits for the reload to end unless --no-wait. Exit codes: 0 done (or asked, with
    --no-wait); 1 the reload failed or did not end within --timeout, or the master did
    not answer properly; 2 bad input, or the master refused; 3 no master of the fleet is
    running.
    """

    path = _control_socket(fleet_spec, runtime_dir)
    any_uid = runtime_dir is not None
    # SO_PEERCRED names the master: the one process that listens, whatever its reply says.
    reply, peer = _control_call(lambda: exchange(
        path, {"command": "reload", "workers_only": workers_only}, any_uid=any_uid))
    if "error" in reply:
        raise CliError(f"the master refused the reload: {one_line(str(reply['error']))}")
    ident = reply.get("reload")
    if not isinstance(ident, int) or isinstance(ident, bool):
        raise CliError(f"the master's reply to reload is not understood: reload id "
                       f"{shown(ident)}", ExitCode.CONTROL_FAILED)
    fleet = reply.get("fleet") or path.stem
    queued = ", queued after the reload in progress" if reply.get("queued") is True else ""
    click.echo(f"reload {ident} of fleet {fleet} asked (master pid {peer.pid}{queued})")
    if no_wait:
        return 0
    return _wait_for_reload(path, ident, fleet, timeout, any_uid=any_uid)


def _wait_for_reload(path: Path, ident: int, fleet: str, timeout: float, *,
                     any_uid: bool) -> int:
    """Ask the master's status every ``_RELOAD_POLL`` seconds until reload ``ident`` has
    ended (0 it succeeded, 1 it failed) or ``timeout`` (1). While the master re-execs its
    socket accepts but does not answer, or a request fails: it is asked again."""

    deadline = time.monotonic() + timeout
    trouble = ""  # why the last request failed, for the line at the timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            document = request(path, {"command": "status"},
                               max(0.05, min(_STATUS_TIMEOUT, remaining)), any_uid=any_uid)
        except (NoMaster, ControlError) as exc:
            document, trouble = None, f" (last try: {exc})"
        else:
            trouble = ""
        result = None if document is None else ended_reload(document, ident)
        if result is not None:
            return _reload_outcome(ident, result)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            click.echo(f"prefork: reload {ident} of fleet {fleet} did not end within "
                       f"{timeout:g}s{trouble}", err=True)
            return ExitCode.CONTROL_FAILED
        time.sleep(min(_RELOAD_POLL, remaining))


def _reload_outcome(ident: int, result: ReloadResult) -> int:
    """Print the one line that says how reload ``ident`` ended; its exit code."""
    later = "" if result.id == ident else f" (reload {result.id} followed it)"
    if not result.ok:
        click.echo(f"prefork: reload {ident} failed{later}: {result.error}", err=True)
        return ExitCode.CONTROL_FAILED
    what = {"code": "new code loaded", "workers": "workers restarted"}.get(result.kind,
                                                                          "done")
    generation = "?" if result.generation is None else result.generation
    click.echo(f"reload {ident} done{later}: {what}, code generation {generation}")
    return ExitCode.OK


def _not_an_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    # ignore_unknown_options (for a DELTA of -1) hands a mistyped option over as WORKER.
    if value.startswith("-"):
        raise click.NoSuchOption(value, ctx=ctx)
    return value


@click.command(context_settings={"ignore_unknown_options": True})  # so that DELTA may be -1
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
        path, {"command": "scale", "worker": worker, "delta": delta},
        any_uid=runtime_dir is not None))
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

    A plain name is used as it is (registered fleets are never imported); for
    ``module:ATTR`` the master that was started with it says so (:func:`_socket_of_spec`).
    """

    try:
        directory = runtime_dir or default_runtime_dir()
    except RuntimeDirError as exc:
        raise CliError(str(exc)) from None
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
                           ExitCode.NO_MASTER)
        if len(names) > 1:
            listed = ", ".join(name.removesuffix(".sock") for name in names)
            raise CliError(f"{len(names)} fleets have a socket in {directory} ({listed}): "
                           "choose one with --fleet")
        return directory / names[0]
    if ":" in fleet_spec:
        return _socket_of_spec(fleet_spec, directory, any_uid=runtime_dir is not None)
    name = fleet_spec
    problem = name_problem(name)
    if problem is not None:
        raise CliError(problem)
    return socket_path(directory, name)


def _socket_of_spec(spec: str, directory: Path, *, any_uid: bool) -> Path:
    """The socket of the master started with ``--fleet spec`` (``module:ATTR``): each
    master in ``directory`` says its spec in its status reply, so the fleet is never
    imported here (1.4 s for a real floor, and the floor's libraries mapped by this
    process would change the master's PSS it reports). A master too old to say its spec
    is the one reason left to import the fleet and match it by name."""
    try:
        masters = list(masters_in(directory, any_uid=any_uid))
    except ControlError as exc:
        raise CliError(str(exc)) from None
    found = [path for path, reply, _ in masters if reply.get("spec") == spec]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise CliError(f"{len(found)} masters in {directory} were started with --fleet "
                       f"{spec}: choose one by its name")
    if any("spec" not in reply for _, reply, _ in masters):
        import_from_working_directory()
        try:
            return socket_path(directory, load_fleet(spec).name)
        except FleetError as exc:
            raise CliError(str(exc)) from None
    raise CliError(f"no master started with --fleet {spec} is running (none of the "
                   f"{len(masters)} answering in {directory} was)", ExitCode.NO_MASTER)


def _control_call(call: Callable[[], _T]) -> _T:
    """``call()``, with NoMaster as exit 3 and ControlError as exit 1, one line each."""

    try:
        return call()
    except NoMaster as exc:
        raise CliError(str(exc), ExitCode.NO_MASTER) from None
    except ControlError as exc:
        raise CliError(str(exc), ExitCode.CONTROL_FAILED) from None


@click.command()
@_control_fleet_option
@_control_runtime_dir_option
@click.option("--listen", type=ListenAddress(), default=None, metavar="HOST:PORT",
              help="Serve http://HOST:PORT/metrics (host 127.0.0.1 unless given).")
@click.option("--textfile", type=click.Path(path_type=Path, dir_okay=False), default=None,
              metavar="PATH", help="Write the metrics to PATH (.prom) every --interval.")
@click.option("--interval", type=PositiveSeconds(), default=DEFAULT_INTERVAL,
              show_default=True, help="Seconds between two writes of --textfile.")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              default="info", show_default=True)
@click.option("--log-file", default=None, metavar="PATH", help="Append the log to PATH.")
# From a master's --metrics: the socket it listens on, and its pid (this dies with it).
@click.option("--listen-fd", type=click.IntRange(min=3), default=None, hidden=True)
@click.option("--parent", type=click.IntRange(min=1), default=None, hidden=True)
def metrics(fleet_spec: str | None, runtime_dir: Path | None, listen: tuple[str, int] | None,
            textfile: Path | None, interval: float, log_level: str, log_file: str | None,
            listen_fd: int | None, parent: int | None) -> int:
    """Serve a running fleet's metrics (Prometheus/OpenMetrics) until SIGTERM or Ctrl-C.

    What `prefork run --metrics` starts on its own; run it yourself for a master started
    without. Reads the master's status and each process's memory, never the fleet's code.
    """

    if parent is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the master died before PDEATHSIG was armed
            return 0
    if listen is None and listen_fd is None and textfile is None:
        raise CliError("nothing to do: give --listen HOST:PORT, --textfile PATH or both")
    try:
        import prefork.metrics as exporter
    except ImportError as exc:
        raise CliError(f"prefork metrics needs prometheus-client ({exc}): "
                       "pip install 'prefork[metrics]'") from None
    try:
        logs.configure(log_level, log_file)
    except OSError as exc:
        raise CliError(f"--log-file {log_file}: {exc.strerror}") from None
    path = _control_socket(fleet_spec, runtime_dir)
    try:
        if textfile is not None:
            textfile = Path(os.path.abspath(textfile))
            check_textfile(textfile)
        listener = (socket.socket(fileno=listen_fd) if listen_fd is not None
                    else None if listen is None else bind_listener(*listen))
    except MetricsError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"--listen-fd {listen_fd}: {exc.strerror}") from None
    if listener is not None and listen_fd is None:
        click.echo(f"metrics of fleet {path.stem} on {listen_url(listener)}", err=True)
    collector = exporter.FleetCollector(path, path.stem, any_uid=runtime_dir is not None)
    exporter.serve(collector, listener=listener, textfile=textfile, interval=interval)
    return 0
