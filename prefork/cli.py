"""The ``prefork`` command: parse, call the library, map outcomes to exit codes.

``run``, ``probe``, ``fleets`` and ``systemd`` are here; ``status``, ``reload`` and
``scale``, which talk to a running master, are in :mod:`prefork.cli_operate`. Every error
the user can cause is one line on stderr, ``prefork: error: ...``, and a non-zero exit
(2 for bad input); never a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from prefork import logs
from prefork.after_fork import DEFAULT_REPORT_AFTER
from prefork.cli_operate import absolute_runtime_dir, metrics, reload, scale, status
from prefork.cli_params import (
    SECONDS,
    SIZE,
    CliError,
    GroupSpec,
    ListenAddress,
    PositiveSeconds,
    groups_of,
    import_from_working_directory,
    run_cli,
)
from prefork.control import ControlError
from prefork.dask_worker import DEFAULT_TIMEOUT as DASK_TIMEOUT
from prefork.dask_worker import arguments_problem, dask_fleet
from prefork.exits import ExitCode
from prefork.fleet import (
    DEFAULT_GRACE,
    DEFAULT_MEMORY_CHECK_INTERVAL,
    MAX_WORKERS,
    RESTART_POLICIES,
    Fleet,
    FleetError,
    StartLimit,
    import_module,
    load_fleet,
    registered_fleets,
)
from prefork.floor import WarmUpError
from prefork.groups import host_groups
from prefork.lock import AlreadyRunning
from prefork.metrics_process import (
    DEFAULT_INTERVAL,
    MetricsError,
    MetricsOptions,
    check_textfile,
    resolve,
)
from prefork.paths import RuntimeDirError, default_runtime_dir
from prefork.reload import (
    ADOPT_OPTION,
    TRIAL_OPTION,
    HandoverError,
    floorless_fleet,
    master_command,
    read_handover,
)
from prefork.threads import ThreadsAtFork
from prefork.unit import (
    DaskUnit,
    UnitError,
    default_venv,
    reachability_warnings,
    render_unit,
)
from prefork.unix_listener import ListenerError
from prefork.version import __version__
from prefork.worker_logs import WorkerLogError, check_directory

if TYPE_CHECKING:
    from prefork.master import Master

__all__ = ["cli", "main", "run_cli"]

log = logging.getLogger("prefork")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prefork")
def cli() -> None:
    """Import a fleet's floor once, fork one child per worker, and supervise them."""


@cli.command()
@click.option("--fleet", "-f", "fleet_spec", required=True, metavar="NAME|module:ATTR",
              help="A registered fleet (see `prefork fleets`) or module:ATTR.")
@click.option("--preload", multiple=True, metavar="MODULE",
              help="Import MODULE into the floor before forking (repeatable).")
@click.option("--grace", type=SECONDS, default=DEFAULT_GRACE, show_default=True,
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
@click.option("--group", "group_specs", type=GroupSpec(), multiple=True,
              metavar="NAME=WORKER,WORKER",
              help="Host these async workers in one process, each under its own "
                   "supervision loop (repeatable); replaces the fleet's own groups.")
@click.option("--freeze/--no-freeze", default=True, show_default=True,
              help="gc.collect() and gc.freeze() in the master before forking.")
@click.option("--warm-up/--no-warm-up", default=False, show_default=True,
              help="Run every worker's warm-up hook in the master before forking.")
@click.option("--strict-fork/--no-strict-fork", default=False, show_default=True,
              help="Refuse to fork when the master has other threads after importing "
                   "the floor, instead of warning.")
@click.option("--learn-floor/--no-learn-floor", default=False, show_default=True,
              help="Keep what the workers import after the fork in the fleet's state "
                   "directory, and import it into the floor at the next start.")
@click.option("--report-imports-after", type=SECONDS, default=DEFAULT_REPORT_AFTER,
              show_default=True, metavar="SECONDS",
              help="Seconds after its fork a worker reports what it imported since "
                   "(0: no reports, no SIGURG).")
@click.option("--max-private-memory", type=SIZE, default=None, metavar="SIZE",
              help="Recycle a worker whose private memory (USS) stays above SIZE "
                   "(512M, 1G) for workers that set none [no limit].")
@click.option("--max-age", type=PositiveSeconds(), default=None, metavar="SECONDS",
              help="Replace a worker gracefully once it has run this long (plus up to a "
                   "tenth more, drawn at random), for workers that set none [never].")
@click.option("--kernel-workers", type=click.IntRange(min=0, max=MAX_WORKERS), default=None,
              metavar="N", help="Fork N kernel processes from the floor that run the "
              "workers' prefork.offload.run_kernel calls (0: run them inline) [the "
              "fleet's kernel_workers, else 0].")
@click.option("--offload", metavar="tcp://HOST:PORT", default=None,
              help="Send the workers' run_kernel calls to this Dask scheduler [the "
                   "fleet's offload; needs the dask extra].")
@click.option("--offload-fallback", type=click.Choice(["local", "error"]), default=None,
              help="While the scheduler cannot be reached, run kernels locally (kernel "
                   "pool or inline) or fail them [the fleet's, local].")
@click.option("--memory-check-interval", type=PositiveSeconds(),
              default=DEFAULT_MEMORY_CHECK_INTERVAL, show_default=True,
              help="Seconds between checks of the workers' private memory.")
@click.option("--runtime-dir", type=click.Path(file_okay=False), default=None,
              callback=absolute_runtime_dir,
              help="Where the fleet's lock lives [$PREFORK_RUNTIME_DIR, $RUNTIME_DIRECTORY, "
                   "$XDG_RUNTIME_DIR/prefork, /tmp/prefork-UID].")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              default="info", show_default=True)
@click.option("--log-file", default=None, metavar="PATH",
              help="Append the master's log to PATH; SIGUSR1 reopens it [stderr].")
@click.option("--worker-log-dir", type=click.Path(path_type=Path), default=None,
              metavar="DIR", help="Append each worker's stdout and stderr to DIR/LABEL.log, "
                                  "one file per replica; SIGUSR1 reopens them [the "
                                  "master's stdout and stderr].")
@click.option("--metrics", "metrics_listen", type=ListenAddress(), default=None,
              metavar="HOST:PORT", help="Serve the fleet's metrics at http://HOST:PORT/metrics "
              "(host 127.0.0.1 unless given), from an exporter process of its own "
              "[needs the metrics extra].")
@click.option("--metrics-textfile", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="PATH", help="Write the metrics to PATH (a .prom file "
              "for node_exporter's textfile collector), replaced whole each interval.")
@click.option("--metrics-interval", type=PositiveSeconds(), default=DEFAULT_INTERVAL,
              show_default=True, help="Seconds between two writes of --metrics-textfile.")
# `prefork probe`'s: its socket, and how many children (prefork.probe_run).
@click.option("--probe-fd", type=click.IntRange(min=3), default=None, hidden=True)
@click.option("--probe-workers", type=click.IntRange(min=1), default=None, hidden=True)
@click.option("--probe-bare", is_flag=True, hidden=True)
@click.option(TRIAL_OPTION, "reload_trial", is_flag=True, hidden=True)
@click.option(ADOPT_OPTION, "adopt_fd", type=click.IntRange(min=0), default=None, hidden=True)
def run(
    fleet_spec: str,
    preload: tuple[str, ...],
    grace: float,
    max_backoff: float | None,
    backoff_reset: float | None,
    start_limit_burst: int | None,
    start_limit_interval: float | None,
    restart: str | None,
    group_specs: tuple[tuple[str, tuple[str, ...]], ...],
    freeze: bool,
    warm_up: bool,
    strict_fork: bool,
    learn_floor: bool,
    report_imports_after: float,
    max_private_memory: int | None,
    max_age: float | None,
    kernel_workers: int | None,
    offload: str | None,
    offload_fallback: str | None,
    memory_check_interval: float,
    runtime_dir: Path | None,
    log_level: str,
    log_file: str | None,
    worker_log_dir: Path | None,
    metrics_listen: tuple[str, int] | None,
    metrics_textfile: Path | None,
    metrics_interval: float,
    probe_fd: int | None,
    probe_workers: int | None,
    probe_bare: bool,
    reload_trial: bool,
    adopt_fd: int | None,
) -> int:
    """Run a fleet until SIGTERM or SIGINT (Ctrl-C); SIGHUP or `prefork reload` imports
    its code afresh from disk and replaces the workers one at a time."""
    from prefork.master import Master  # here: the other commands never need it

    if learn_floor and not report_imports_after:
        raise CliError("--learn-floor learns from the workers' reports: "
                       "--report-imports-after must be more than 0")

    if (probe_workers is not None or probe_bare) and probe_fd is None:
        raise CliError("--probe-workers and --probe-bare need --probe-fd (they are for "
                       "prefork probe alone)")

    metrics = _metrics_options(metrics_listen, metrics_textfile, metrics_interval)
    groups = groups_of(group_specs) if group_specs else None
    # Given by the master's own re-exec (prefork.reload): what the image before handed over.
    handover = None
    if adopt_fd is not None:
        try:
            handover = read_handover(adopt_fd)
        except HandoverError as exc:
            raise CliError(str(exc)) from None
    # The probe's master is the probe's: a reload restarts its workers only.
    command = master_command() if probe_fd is None else None

    try:
        logs.configure(log_level, log_file)
    except OSError as exc:
        raise CliError(f"--log-file {log_file}: {exc.strerror}") from None
    if worker_log_dir is not None:  # the directory now, its files once the fleet is known
        try:
            check_directory(worker_log_dir)
        except WorkerLogError as exc:
            raise CliError(str(exc)) from None
    import_from_working_directory()
    started = time.perf_counter()
    try:
        for module in preload:
            import_module(module, what="preload module")
        fleet = load_fleet(fleet_spec)
        logs.reclaim()  # the floor's logging set-up may have disabled prefork's logger
        if groups is not None:  # a deploy-time choice: no worker's code changes
            fleet = dataclasses.replace(fleet, groups=groups)
        fleet = _with_cli_defaults(fleet, max_backoff, backoff_reset, start_limit_burst,
                                   start_limit_interval, restart, max_private_memory, max_age,
                                   kernel_workers, offload, offload_fallback)
        fleet = host_groups(fleet)  # one worker per group: what the probe forks too
        probe = None
        if probe_fd is not None:
            from prefork.probe_run import ProbeLink

            probe = ProbeLink(probe_fd, fleet, probe_workers, bare=probe_bare)
            fleet = probe.fleet
        master = Master(fleet, grace=grace, freeze=freeze, warm_up=warm_up,
                        runtime_dir=runtime_dir, memory_check_interval=memory_check_interval,
                        strict_fork=strict_fork, worker_log_dir=worker_log_dir,
                        metrics=metrics, learn_floor=learn_floor,
                        report_imports_after=report_imports_after, spec=fleet_spec,
                        before_first_fork=None if probe is None else probe.before_first_fork,
                        reload_command=command, handover=handover)
        if reload_trial:
            return _run_trial(master)
        if handover is not None:
            master.lock.adopt(handover["lock"])
        master.lock.acquire()
    except (FleetError, WorkerLogError) as exc:
        if reload_trial:  # the master logs the trial's output: the whole traceback first
            import traceback

            traceback.print_exception(exc.__cause__ or exc.__context__ or exc)
        if handover is None:
            raise CliError(str(exc)) from None
        # The trial passed, yet the code changed again before the exec: no floor to fork
        # from. Keep the workers running; a reload that passes brings the floor back.
        log.exception("reload: the new code failed after the re-exec; the running workers "
                      "are kept, but none can be restarted until a reload succeeds")
        master = Master(floorless_fleet(handover), grace=grace, runtime_dir=runtime_dir,
                        metrics=metrics, spec=fleet_spec, reload_command=command,
                        handover=handover, reload_error=str(exc))
        master.lock.adopt(handover["lock"])
        return _run_master(master)
    except AlreadyRunning as exc:
        raise CliError(str(exc), ExitCode.ALREADY_RUNNING) from None
    except RuntimeDirError as exc:
        raise CliError(str(exc)) from None
    log.info("prefork %s on Python %s: floor of fleet %s imported in %.0f ms", __version__,
             sys.version.split()[0], fleet.name, (time.perf_counter() - started) * 1000)
    return _run_master(master)


def _run_trial(master: Master) -> int:
    """The trial of a reload (prefork.reload): the floor prepared, each worker's post_fork
    and warm-up tried; the errors of :func:`_run_master` as one line."""
    try:
        return master.trial()
    except WarmUpError as exc:
        raise CliError(str(exc)) from None


def _run_master(master: Master) -> int:
    """``master.run()``, with what it raises before any fork as one line."""
    try:
        return master.run()
    except (ControlError, RuntimeDirError, WarmUpError, MetricsError,
            ListenerError) as exc:
        raise CliError(str(exc)) from None
    except ThreadsAtFork as exc:
        raise CliError(f"--strict-fork: {exc}") from None


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
@click.option("--bare-fork/--no-bare-fork", default=False, show_default=True,
              help="Also measure a bare os.fork() child of the master and a prefork child "
                   "that sleeps (prefork's own cost per child); the two share the floor "
                   "with the children, whose USS then reads a little lower.")
@click.option("--baseline/--no-baseline", default=True, show_default=True,
              help="Also measure the same workers as fresh interpreters, one per worker.")
@click.option("--pid", "master_pid", type=click.IntRange(min=1), default=None,
              metavar="MASTER_PID", help="Measure a running fleet instead; reads /proc only.")
@click.option("--runtime-dir", type=click.Path(file_okay=False), default=None,
              callback=absolute_runtime_dir,
              help="Where --pid's master has its control socket, as given to `prefork run` "
                   "[$PREFORK_RUNTIME_DIR, $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/prefork, "
                   "/tmp/prefork-UID].")
@click.option("--json", "as_json", is_flag=True, help="One JSON document (see the README).")
# --pid's second step: the figures a shell wrote to this descriptor (prefork.probe).
@click.option("--rollups-fd", type=click.IntRange(min=3), default=None, hidden=True)
# A new fleet's second step: what the measuring process measured (prefork.probe).
@click.option("--figures-fd", type=click.IntRange(min=3), default=None, hidden=True)
@click.pass_context
def probe(
    ctx: click.Context,
    fleet_spec: str,
    workers: int | None,
    idle: tuple[float, ...],
    freeze: bool,
    warm_up: bool,
    bare_fork: bool,
    baseline: bool,
    master_pid: int | None,
    runtime_dir: Path | None,
    as_json: bool,
    rollups_fd: int | None,
    figures_fd: int | None,
) -> None:
    """Measure how much of each worker's memory is shared with the master and how much
    is its own (RSS, USS, PSS, shared, swap), against one fresh interpreter per worker."""
    from prefork.probe import (
        FIGURES_FD,
        ROLLUPS_FD,
        ProbeError,
        exec_measure,
        exec_snapshot,
        probe_running,
        report_from,
    )
    from prefork.probe_report import format_report

    try:
        if master_pid is not None:
            given = [f"--{name.replace('_', '-')}" for name in
                     ("fleet", "workers", "idle", "freeze", "warm_up", "bare_fork", "baseline")
                     if ctx.get_parameter_source(name if name != "fleet" else "fleet_spec")
                     is click.core.ParameterSource.COMMANDLINE]
            if given:
                raise CliError(f"--pid measures a running fleet as it is: "
                               f"{', '.join(given)} cannot be used with it")
            try:
                directory = runtime_dir or default_runtime_dir()
            except RuntimeDirError as exc:
                raise CliError(str(exc)) from None
            if rollups_fd is None:  # read the figures with no Python alive, then come back
                exec_snapshot(master_pid, [
                    sys.executable, "-m", "prefork", "probe", "--pid", str(master_pid),
                    "--rollups-fd", str(ROLLUPS_FD), *(["--json"] if as_json else []),
                    *([] if runtime_dir is None else ["--runtime-dir", str(runtime_dir)])])
            report, warning = probe_running(master_pid, rollups_fd, directory,
                                            any_uid=runtime_dir is not None)
            if warning is not None:
                click.echo(f"prefork: warning: {warning}", err=True)
        else:
            if runtime_dir is not None:
                raise CliError("--runtime-dir is where --pid's master listens: it needs --pid")
            if figures_fd is None:  # measure with nothing of ours alive, then come back
                import_from_working_directory()  # the baseline imports from here too
                exec_measure(fleet_spec, workers=workers, idle=idle or (1.0,), freeze=freeze,
                             warm_up=warm_up, bare=bare_fork, baseline=baseline, argv=[
                                 sys.executable, "-m", "prefork", "probe",
                                 "--figures-fd", str(FIGURES_FD),
                                 "--freeze" if freeze else "--no-freeze",
                                 "--warm-up" if warm_up else "--no-warm-up",
                                 *(["--json"] if as_json else [])])
            report = report_from(figures_fd, freeze=freeze, warm_up=warm_up)
    except ProbeError as exc:
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
@click.option("--grace", type=SECONDS, default=DEFAULT_GRACE, show_default=True,
              help="The master's --grace; TimeoutStopSec= is 15 s longer.")
@click.option("--memory-max", metavar="SIZE", default=None,
              help="MemoryMax= for the whole fleet, master and workers together "
                   "(512M, 2G, 50%, infinity).")
@click.option("--watchdog", type=SECONDS, default=30.0, show_default=True,
              help="WatchdogSec=; 0 leaves the watchdog off.")
@click.option("--network/--no-network", default=False, show_default=True,
              help="Let the workers use IPv4/IPv6 [no: local sockets only].")
@click.option("--metrics", "metrics_listen", type=ListenAddress(), default=None,
              metavar="HOST:PORT", help="The master's --metrics (host 127.0.0.1 unless given, "
              "an IP address or localhost); the unit lets the exporter listen there.")
@click.option("--metrics-allow", multiple=True, metavar="ADDRESS",
              help="IPAddressAllow= for --metrics on a host beyond loopback without "
                   "--network: the Prometheus server (address or prefix; 'any' for every "
                   "host; repeatable).")
@click.option("--metrics-textfile", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="PATH", help="The master's --metrics-textfile: an "
              "absolute .prom path, not under /tmp; its directory becomes ReadWritePaths=.")
@click.option("--metrics-interval", type=PositiveSeconds(), default=DEFAULT_INTERVAL,
              show_default=True, help="The master's --metrics-interval.")
@click.option("--learn-floor/--no-learn-floor", default=False, show_default=True,
              help="The master's --learn-floor (its file in the unit's StateDirectory=).")
@click.option("--dask-scheduler", metavar="tcp://HOST:PORT", default=None,
              help="Run `prefork dask-worker tcp://HOST:PORT` on the fleet's floor instead "
                   "of the fleet (unit prefork-NAME-dask.service, network open).")
@click.option("--nworkers", type=int, default=None,
              help="dask-worker's --nworkers [1] (needs --dask-scheduler).")
@click.option("--nthreads", type=int, default=None,
              help="dask-worker's --nthreads [1] (needs --dask-scheduler).")
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
    metrics_listen: tuple[str, int] | None,
    metrics_allow: tuple[str, ...],
    metrics_textfile: Path | None,
    metrics_interval: float,
    learn_floor: bool,
    dask_scheduler: str | None,
    nworkers: int | None,
    nthreads: int | None,
) -> None:
    """Print a hardened systemd unit that runs the fleet's master.

    Save it as /etc/systemd/system/prefork-NAME.service (its first line names it).
    """
    venv = default_venv() if venv is None else venv
    metrics = None
    if metrics_listen is not None or metrics_textfile is not None:
        metrics = MetricsOptions(listen=metrics_listen, textfile=metrics_textfile,
                                 interval=metrics_interval)
    dask = None
    if dask_scheduler is not None:
        dask = DaskUnit(dask_scheduler, 1 if nworkers is None else nworkers,
                        1 if nthreads is None else nthreads)
    elif nworkers is not None or nthreads is not None:
        raise CliError("--nworkers and --nthreads are dask-worker's: they need "
                       "--dask-scheduler tcp://HOST:PORT")
    try:
        text = render_unit(fleet_spec, venv=venv, user=user, group=group, workdir=workdir,
                           conflicts=conflicts, grace=grace, memory_max=memory_max,
                           watchdog=watchdog, network=network, metrics=metrics,
                           metrics_allow=metrics_allow, learn_floor=learn_floor, dask=dask)
        if (dask is not None and os.path.abspath(venv) == sys.prefix
                and importlib.util.find_spec("distributed") is None):
            raise CliError("--dask-scheduler needs distributed: pip install 'prefork[dask]'")
        # Only this interpreter's venv can be asked cheaply; another venv is the user's word.
        if (metrics is not None and os.path.abspath(venv) == sys.prefix
                and importlib.util.find_spec("prometheus_client") is None):
            raise CliError("--metrics needs prometheus-client: pip install 'prefork[metrics]'")
        import_from_working_directory()
        load_fleet(fleet_spec)  # after the cheap checks: this imports the fleet's floor
    except (UnitError, FleetError) as exc:
        raise CliError(str(exc)) from None
    for warning in reachability_warnings(venv, user, workdir, metrics_textfile):
        click.echo(f"prefork: warning: {warning}", err=True)
    click.echo(text, nl=False)


@cli.command("dask-worker")
@click.argument("scheduler", metavar="tcp://HOST:PORT")
@click.option("--fleet", "-f", "fleet_spec", required=True, metavar="NAME|module:ATTR",
              help="The fleet whose floor (its modules: the kernels) the workers share; "
                   "its own workers are not run.")
@click.option("--nworkers", type=int, default=1, show_default=True,
              help="Dask worker processes to fork.")
@click.option("--nthreads", type=int, default=1, show_default=True,
              help="Threads of each Dask worker.")
@click.option("--name-prefix", default=None, metavar="PREFIX",
              help="Each worker is named PREFIX-REPLICA [HOSTNAME-FLEET].")
@click.option("--preload", multiple=True, metavar="MODULE",
              help="Import MODULE into the floor before forking (repeatable).")
@click.option("--grace", type=SECONDS, default=DEFAULT_GRACE, show_default=True,
              help="Seconds between SIGTERM and SIGKILL when stopping.")
@click.option("--timeout", type=SECONDS, default=DASK_TIMEOUT, show_default=True,
              help="Replace a worker whose event loop is blocked this long (0: never).")
@click.option("--max-backoff", type=SECONDS, default=None,
              help="Cap on a worker's restart delay [the fleet's, 30].")
@click.option("--start-limit-burst", type=click.IntRange(min=1), default=None,
              help="Mark a worker failed when it starts more than this many times ...")
@click.option("--start-limit-interval", type=SECONDS, default=None,
              help="... within this many seconds; 0 disables the limit [5 in 60].")
@click.option("--max-private-memory", type=SIZE, default=None, metavar="SIZE",
              help="Recycle a worker whose private memory (USS) stays above SIZE.")
@click.option("--max-age", type=PositiveSeconds(), default=None, metavar="SECONDS",
              help="Replace a worker gracefully once it has run this long.")
@click.option("--memory-check-interval", type=PositiveSeconds(),
              default=DEFAULT_MEMORY_CHECK_INTERVAL, show_default=True,
              help="Seconds between checks of the workers' private memory.")
@click.option("--runtime-dir", type=click.Path(file_okay=False), default=None,
              callback=absolute_runtime_dir, help="Where the fleet's lock lives.")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              default="info", show_default=True, help="prefork's and Dask's.")
@click.option("--log-file", default=None, metavar="PATH",
              help="Append the master's log to PATH [stderr].")
@click.option("--metrics", "metrics_listen", type=ListenAddress(), default=None,
              metavar="HOST:PORT", help="Serve the fleet's metrics at http://HOST:PORT/metrics.")
@click.option("--metrics-textfile", type=click.Path(path_type=Path, dir_okay=False),
              default=None, metavar="PATH", help="Write the metrics to PATH (.prom).")
@click.option("--metrics-interval", type=PositiveSeconds(), default=DEFAULT_INTERVAL,
              show_default=True, help="Seconds between two writes of --metrics-textfile.")
def dask_worker(
    scheduler: str,
    fleet_spec: str,
    nworkers: int,
    nthreads: int,
    name_prefix: str | None,
    preload: tuple[str, ...],
    grace: float,
    timeout: float,
    max_backoff: float | None,
    start_limit_burst: int | None,
    start_limit_interval: float | None,
    max_private_memory: int | None,
    max_age: float | None,
    memory_check_interval: float,
    runtime_dir: Path | None,
    log_level: str,
    log_file: str | None,
    metrics_listen: tuple[str, int] | None,
    metrics_textfile: Path | None,
    metrics_interval: float,
) -> int:
    """Fork Dask workers from a fleet's floor, connected to the scheduler at
    tcp://HOST:PORT; prefork is their nanny."""
    from prefork.master import Master

    # Everything that needs no import first: a bad address forks nothing and imports nothing.
    problem = arguments_problem(scheduler, nworkers, nthreads)
    if problem is not None:
        raise CliError(problem)
    if importlib.util.find_spec("distributed") is None:
        raise CliError("dask-worker needs distributed: pip install 'prefork[dask]'")
    metrics = _metrics_options(metrics_listen, metrics_textfile, metrics_interval)
    try:
        logs.configure(log_level, log_file)
    except OSError as exc:
        raise CliError(f"--log-file {log_file}: {exc.strerror}") from None
    import_from_working_directory()
    started = time.perf_counter()
    try:
        for module in preload:
            import_module(module, what="preload module")
        floor = _with_cli_defaults(load_fleet(fleet_spec), max_backoff, None,
                                   start_limit_burst, start_limit_interval, None,
                                   max_private_memory, max_age)
        fleet = dask_fleet(floor, scheduler, nworkers=nworkers, nthreads=nthreads,
                           name_prefix=name_prefix, timeout=timeout or None)
        logs.reclaim()  # the floor's (and Dask's) logging set-up may have disabled ours
        logging.getLogger("distributed").setLevel(log_level.upper())
        master = Master(fleet, grace=grace, runtime_dir=runtime_dir,
                        memory_check_interval=memory_check_interval, metrics=metrics)
        master.lock.acquire()
    except (FleetError, RuntimeDirError) as exc:
        raise CliError(str(exc)) from None
    except AlreadyRunning as exc:
        raise CliError(str(exc), ExitCode.ALREADY_RUNNING) from None
    log.info("prefork %s on Python %s: floor of fleet %s and distributed imported in %.0f "
             "ms; %d Dask workers for %s", __version__, sys.version.split()[0], floor.name,
             (time.perf_counter() - started) * 1000, nworkers, scheduler)
    return _run_master(master)


def _metrics_options(listen: tuple[str, int] | None, textfile: Path | None,
                     interval: float) -> MetricsOptions | None:
    """``--metrics*`` checked before the floor is imported; None without them."""
    if listen is None and textfile is None:
        return None
    if importlib.util.find_spec("prometheus_client") is None:
        raise CliError("--metrics needs prometheus-client: pip install 'prefork[metrics]'")
    if textfile is not None:
        textfile = Path(os.path.abspath(textfile))  # the exporter may start elsewhere
    try:
        if listen is not None:
            resolve(*listen)  # the port is bound later, once the fleet's lock is held
        if textfile is not None:
            check_textfile(textfile)
    except MetricsError as exc:
        raise CliError(str(exc)) from None
    return MetricsOptions(listen=listen, textfile=textfile, interval=interval)


def _with_cli_defaults(
    fleet: Fleet,
    max_backoff: float | None,
    backoff_reset: float | None,
    burst: int | None,
    interval: float | None,
    restart: str | None,
    max_private_memory: int | None,
    max_age: float | None,
    kernel_workers: int | None = None,
    offload: str | None = None,
    offload_fallback: str | None = None,
) -> Fleet:
    """``fleet`` with the defaults given on the command line (its workers' own settings
    still win over them)."""
    backoff = fleet.backoff
    if max_backoff is not None:
        backoff = dataclasses.replace(backoff, maximum=max_backoff)
    if backoff_reset is not None:
        backoff = dataclasses.replace(backoff, reset_after=backoff_reset)
    start_limit = StartLimit(
        burst=fleet.start_limit.burst if burst is None else burst,
        interval=fleet.start_limit.interval if interval is None else interval,
    )
    return dataclasses.replace(
        fleet, backoff=backoff, start_limit=start_limit, restart=restart or fleet.restart,
        max_private_memory=max_private_memory or fleet.max_private_memory,
        max_age=max_age or fleet.max_age,
        kernel_workers=fleet.kernel_workers if kernel_workers is None else kernel_workers,
        offload=offload or fleet.offload,
        offload_fallback=offload_fallback or fleet.offload_fallback,
    ).validate()


def main(argv: list[str] | None = None) -> None:
    """The ``prefork`` console entry point."""
    run_cli(cli, "prefork", argv)


for _command in (status, reload, scale, metrics):
    cli.add_command(_command)
