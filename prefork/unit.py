"""Render a hardened systemd unit for a fleet's master (``prefork systemd``).

The unit text comes from ``prefork-fleet.service.in`` in the ``prefork_units`` package
(``systemd/`` in the source tree), filled in with :class:`string.Template`: ``${name}``
placeholders, ``$$`` for a literal ``$``. A placeholder alone on its line that renders
empty drops the line. Values are validated here, so what reaches the template is either
safe as is or quoted for systemd.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from prefork.dask_worker import SUFFIX as DASK_SUFFIX
from prefork.dask_worker import arguments_problem
from prefork.fleet import DEFAULT_GRACE
from prefork.metrics_process import DEFAULT_INTERVAL, MetricsOptions
from prefork.paths import name_for_spec, spec_problem
from prefork.version import __version__

TEMPLATE = "prefork-fleet.service.in"
TEMPLATE_PACKAGE = "prefork_units"

# Seconds systemd waits beyond the master's grace period before its own SIGKILL: the
# master needs a moment after the grace to reap, log and exit.
STOP_MARGIN = 15

# systemd's valid_user_group_name() in its relaxed form, and numeric ids.
_ACCOUNT = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,30}|[0-9]+")
_UNIT_SUFFIXES = ("service", "socket", "target", "timer", "path", "mount", "automount",
                  "swap", "slice", "scope", "device")
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]+\.(?:" + "|".join(_UNIT_SUFFIXES) + ")")
# systemd's parse_size() for MemoryMax=: bytes with an optional 1024-based suffix, a
# percentage of physical memory, or "infinity".
_SIZE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?[KMGTPE]?|infinity|[0-9]+(?:\.[0-9]+)?%)")
# A command path that needs no quoting in ExecStart= (after '%' doubling).
_PLAIN_PATH = re.compile(r"[A-Za-z0-9_@%+=:,./$-]+")
# Where ProtectHome=yes hides things.
_HOME_ROOTS = (Path("/home"), Path("/root"), Path("/run/user"))
# Where the unit writes to a namespace of its own, which node_exporter never sees.
_PRIVATE_ROOTS = ((Path("/tmp"), "PrivateTmp=yes"), (Path("/var/tmp"), "PrivateTmp=yes"),
                  (Path("/dev/shm"), "PrivateDevices=yes"))
# A textfile path that goes into ExecStart= and ReadWritePaths= as it is: no quoting,
# no '%' specifiers, no '$' variables.
_TEXTFILE_PATH = re.compile(r"/[A-Za-z0-9_@+=:,./-]*")
# The words IPAddressAllow= takes besides addresses and prefixes.
_IP_WORDS = ("any", "localhost", "link-local", "multicast")


@dataclass(frozen=True)
class DaskUnit:
    """``prefork dask-worker``'s arguments for a unit that runs Dask workers on a fleet's
    floor instead of the fleet's own workers."""

    scheduler: str
    nworkers: int = 1
    nthreads: int = 1


class UnitError(Exception):
    """An option cannot make a working unit. ``str()`` is one line for the user."""


def unit_name(fleet: str, dask: DaskUnit | None = None) -> str:
    """The file name to install the unit as: ``prefork-NAME.service``, or
    ``prefork-NAME-dask.service`` for its Dask workers."""
    return f"prefork-{_dir_name(fleet, dask)}.service"


def _dir_name(fleet: str, dask: DaskUnit | None) -> str:
    return name_for_spec(fleet) + ("" if dask is None else DASK_SUFFIX)


def render_unit(
    fleet: str,
    *,
    venv: Path,
    user: str | None = None,
    group: str | None = None,
    workdir: Path | None = None,
    conflicts: Sequence[str] = (),
    grace: float = DEFAULT_GRACE,
    memory_max: str | None = None,
    watchdog: float = 30.0,
    network: bool = False,
    metrics: MetricsOptions | None = None,
    metrics_allow: Sequence[str] = (),
    learn_floor: bool = False,
    dask: DaskUnit | None = None,
) -> str:
    """The unit text for running ``fleet`` (a registered name or ``module:ATTR``).

    ``venv`` must hold an executable ``bin/prefork``; ``workdir``, if given, must be an
    existing directory. ``watchdog=0`` leaves out ``WatchdogSec=``. Without ``user`` the
    unit runs as a ``DynamicUser=``; ``group`` needs ``user``. ``metrics`` adds the
    master's ``--metrics*`` options and opens the sandbox just enough for the exporter:
    see :func:`_metrics_network` and :func:`_check_textfile`; ``metrics_allow`` is the
    scrapers' addresses (``IPAddressAllow=``) for a listener beyond loopback without
    ``network``. ``learn_floor`` adds ``--learn-floor``: its file goes to the unit's
    ``StateDirectory=`` ($STATE_DIRECTORY). Does not import the fleet: the caller checks it
    loads. Raises :class:`UnitError` for any invalid value.
    """
    _check_fleet(fleet)
    venv = Path(os.path.abspath(venv))
    prefork = venv / "bin" / "prefork"
    if not prefork.is_file() or not os.access(prefork, os.X_OK):
        raise UnitError(f"venv {venv} has no executable bin/prefork (--venv is the "
                        "virtual environment prefork is installed in)")
    if workdir is not None:
        workdir = Path(os.path.abspath(workdir))
        if not workdir.is_dir():
            raise UnitError(f"working directory {workdir} does not exist or is not a directory")
    for what, value in (("user", user), ("group", group)):
        if value is not None and not _ACCOUNT.fullmatch(value):
            raise UnitError(f"{what} {value!r} is not a valid user or group name")
    if group is not None and user is None:
        raise UnitError("--group needs --user: without --user the unit runs as a "
                        "DynamicUser= with a group of its own")
    conflicts = list(dict.fromkeys(conflicts))  # drop repeats, keep the order
    for name in conflicts:
        if not _UNIT_NAME.fullmatch(name):
            raise UnitError(f"{name!r} is not a unit name (e.g. mailer.service: no "
                            f"whitespace or '/', ending in .{', .'.join(_UNIT_SUFFIXES[:3])}, "
                            "...)")
    _check_seconds("grace", grace)
    _check_seconds("watchdog", watchdog)
    if memory_max is not None:
        _check_size(memory_max)
    for path in (venv, workdir):
        if path is not None and any(c in str(path) for c in "\n\r\t"):
            raise UnitError(f"path {str(path)!r} contains a control character")
    metrics_allow = list(dict.fromkeys(metrics_allow))  # drop repeats, keep the order
    _check_metrics(metrics, metrics_allow)
    if dask is not None:
        _check_dask(dask, learn_floor)
        network = True  # the scheduler, its clients and the other workers connect over IP
    listen = None if metrics is None else metrics.listen
    textfile = None if metrics is None else metrics.textfile
    network_lines = _network(network) if listen is None else _metrics_network(
        listen, metrics_allow, network)
    if dask is not None:
        network_summary = ("IPv4 and IPv6: the Dask workers connect to the scheduler and "
                           "listen for it, its clients and the other workers")
    elif network:
        network_summary = "IPv4 and IPv6 for the workers, and local sockets"
    elif listen is not None:
        network_summary = "the metrics listener, and local sockets"
    else:
        network_summary = ("none: local sockets only (the notify socket and the journal "
                           "are AF_UNIX)")

    if dask is None:
        command = ["run", "--fleet", fleet]
        description = f"fleet {fleet}"
    else:
        command = ["dask-worker", dask.scheduler, "--fleet", fleet, "--nworkers",
                   str(dask.nworkers), *(["--nthreads", str(dask.nthreads)]
                                         if dask.nthreads != 1 else [])]
        description = f"Dask workers for {dask.scheduler} on the floor of fleet {fleet}"
    values = {
        "unit_name": unit_name(fleet, dask),
        "fleet": fleet,
        "description": description,
        "dir_name": _dir_name(fleet, dask),
        "version": __version__,
        "exec_start": " ".join([_exec_path(str(prefork)), *command,
                                "--grace", _number(grace), *_metrics_arguments(metrics),
                                *(["--learn-floor"] if learn_floor else [])]),
        # A fleet's master runs its code anew on a reload and the command waits for the
        # outcome, so `systemctl reload` fails when the new code does; a Dask worker
        # master restarts its workers from the floor loaded (SIGHUP).
        "exec_reload": ("/bin/kill -HUP $MAINPID" if dask is not None else
                        f"{_exec_path(str(prefork))} reload --fleet {fleet}"),
        "reload_summary": ("a rolling restart of the workers from the floor already loaded."
                           if dask is not None else
                           "the master imports the fleet's code from disk (in a trial process\n"
                           "# first: new code that fails touches nothing and the reload fails),"
                           " keeps its pid\n# and replaces the workers one at a time."),
        "grace": _number(grace),
        "timeout_stop": f"{math.ceil(grace) + STOP_MARGIN}s",
        "workdir": "" if workdir is None else f"WorkingDirectory={_escape_path(workdir)}",
        "conflicts": _conflicts(conflicts),
        "network_after": ("Wants=network-online.target\nAfter=network-online.target"
                          if network else ""),
        "watchdog": "" if watchdog == 0 else (
            "# The master pings at half this interval; if its loop hangs, systemd kills the\n"
            "# fleet (SIGABRT to the master) and Restart= starts it again.\n"
            f"WatchdogSec={_number(watchdog)}s"),
        "memory_max": "" if memory_max is None else (
            "# A per-fleet limit: it caps the whole cgroup, the master and all its workers\n"
            "# together, not each worker. At the limit the kernel reclaims, then OOM-kills.\n"
            f"MemoryMax={memory_max}"),
        "identity": _identity(user, group),
        "protect_home": _protect_home(venv, workdir,
                                      None if textfile is None else textfile.parent),
        "textfile_paths": "" if textfile is None else (
            "# --metrics-textfile: the exporter writes a temporary file next to it and renames\n"
            "# it over the old one, so the whole directory is writable.\n"
            f"ReadWritePaths={textfile.parent}"),
        "network_summary": network_summary,
        "network": network_lines,
    }
    template = _load_template()
    for key, value in values.items():
        if not value:  # a placeholder that renders empty takes its line with it
            template = template.replace(f"${{{key}}}\n", "")
    return Template(template).substitute(values)


def reachability_warnings(venv: Path, user: str | None, workdir: Path | None = None,
                          textfile: Path | None = None) -> list[str]:
    """Paths a ``DynamicUser=`` service could not reach, one line each; empty if fine.

    Only for the dynamic user (``user is None``), which owns nothing on the host: every
    directory on the way to the venv, its Python, the working directory and the
    textfile's directory must be searchable by others, as ``/root`` (mode 0700) is not,
    and the textfile's directory writable by others. A named ``user`` may reach them
    through ownership or groups, which this does not try to judge.
    """
    if user is not None:
        return []
    warnings = []
    textfile_dir = None if textfile is None else textfile.parent
    needed = [(path, "a venv and Python") for path in
              _needed_paths(Path(os.path.abspath(venv)), workdir)]
    if textfile_dir is not None:
        needed.append((textfile_dir, "a textfile directory"))
    for path, what in needed:
        blocked = _first_closed_directory(path)
        if blocked is not None:
            warnings.append(f"{path} is not reachable for the unit's dynamic user "
                            f"({blocked} is not searchable by others): pass --user, or "
                            f"use {what} outside it")
    if (textfile_dir is not None and textfile_dir.is_dir()
            and not textfile_dir.stat().st_mode & stat.S_IWOTH):
        warnings.append(f"{textfile_dir} is not writable for the unit's dynamic user (not "
                        "writable by others), so the exporter cannot write the textfile: "
                        "pass --user, one that may write there")
    return warnings


def _load_template() -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE).read_text(encoding="utf-8")


def _check_fleet(fleet: str) -> None:
    # The spec rule also keeps ExecStart= free of quoting and '%', and the unit's
    # directory names free of '/' and "..".
    if spec_problem(fleet) is not None or ".." in fleet:
        raise UnitError(f"fleet {fleet!r} cannot go into a unit: use a registered name or "
                        "module:ATTR (letters, digits, '.', '_', '-', ':')")


def _check_dask(dask: DaskUnit, learn_floor: bool) -> None:
    problem = arguments_problem(dask.scheduler, dask.nworkers, dask.nthreads)
    if problem is not None:
        raise UnitError(problem)
    if learn_floor:
        raise UnitError("--learn-floor is for `prefork run`: prefork dask-worker imports "
                        "what a Dask worker needs into the floor itself")


def _check_seconds(what: str, value: float) -> None:
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < 0):
        raise UnitError(f"--{what} must be a finite number of seconds >= 0, got {value!r}")


def _check_size(size: str) -> None:
    if not _SIZE.fullmatch(size):
        raise UnitError(f"--memory-max {size!r} is not a systemd size: bytes with an optional "
                        "K, M, G, T suffix (512M, 2G), a percentage of RAM (50%), or infinity")
    if size.endswith("%") and not 0 < float(size[:-1]) <= 100:
        raise UnitError(f"--memory-max {size!r}: a percentage must be above 0 and at most 100")
    if size != "infinity" and float(size.rstrip("%KMGTPE")) == 0:
        raise UnitError(f"--memory-max {size!r} would leave the fleet no memory at all")


def _number(seconds: float) -> str:
    """``15.0`` -> ``15``, ``2.5`` -> ``2.5``: never an exponent, which systemd rejects."""
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def _exec_path(path: str) -> str:
    """ExecStart='s command: ``%`` escaped, double-quoted if it has to be.

    systemd expands ``$VAR`` in the arguments but not in the command itself, so a ``$``
    in the path stays as it is.
    """
    argument = path.replace("%", "%%")
    if _PLAIN_PATH.fullmatch(argument):
        return argument
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _escape_path(path: Path) -> str:
    """A path as the whole value of a setting such as WorkingDirectory=."""
    return str(path).replace("%", "%%")


def _conflicts(units: Sequence[str]) -> str:
    if not units:
        return ""
    listed = " ".join(units)
    return ("# The units this fleet replaces: never run their workers twice. After= makes\n"
            "# them stop before the master starts.\n"
            f"Conflicts={listed}\nAfter={listed}")


def _identity(user: str | None, group: str | None) -> str:
    if user is None:
        return ("# A uid and gid allocated for this unit while it runs: it owns nothing on the\n"
                "# host but its own state and runtime directories.\n"
                "DynamicUser=yes")
    return f"User={user}" + ("" if group is None else f"\nGroup={group}")


def _protect_home(venv: Path, workdir: Path | None, textfile_dir: Path | None) -> str:
    needed = _needed_paths(venv, workdir) + ([] if textfile_dir is None else [textfile_dir])
    under_home = [p for p in needed if _is_under_home(p)]
    if not under_home:
        return "ProtectHome=yes"
    return (f"# read-only, not yes: the unit needs {under_home[0]}, under a home directory.\n"
            "ProtectHome=read-only")


def _needed_paths(venv: Path, workdir: Path | None) -> list[Path]:
    """The venv, the Python it runs (a venv's bin/python links to its base), the workdir."""
    paths = [venv]
    python = venv / "bin" / "python"
    if python.exists():
        base = Path(os.path.realpath(python))
        if base != python:
            paths.append(base)
    if workdir is not None:
        paths.append(workdir)
    return paths


def _is_under_home(path: Path) -> bool:
    return any(_is_under(path, root) for root in _HOME_ROOTS)


def _is_under(path: Path, root: Path) -> bool:
    """``path`` is ``root`` or in it, as written or with its symbolic links resolved."""
    resolved = Path(os.path.realpath(path))
    return any(p == root or root in p.parents for p in (path, resolved))


def _first_closed_directory(path: Path) -> Path | None:
    """The first directory on the way to ``path`` that others cannot search, if any."""
    resolved = Path(os.path.realpath(path))
    for directory in [*reversed(resolved.parents), resolved]:
        if directory.is_dir() and not directory.stat().st_mode & stat.S_IXOTH:
            return directory
    return None


def _network(network: bool) -> str:
    if network:
        return ("# AF_NETLINK stays out: getaddrinfo() does without it. Narrow the peers with\n"
                "# IPAddressAllow=/IPAddressDeny= in a drop-in if you know them.\n"
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6")
    return ("PrivateNetwork=yes\n"
            "RestrictAddressFamilies=AF_UNIX\n"
            "IPAddressDeny=any")


def _check_metrics(metrics: MetricsOptions | None, allow: Sequence[str]) -> None:
    if allow and (metrics is None or metrics.listen is None):
        raise UnitError("--metrics-allow names who may scrape --metrics HOST:PORT: it needs "
                        "--metrics")
    if metrics is None:
        return
    if metrics.listen is None and metrics.textfile is None:
        raise UnitError("metrics need a listen address (--metrics) or a textfile "
                        "(--metrics-textfile)")
    interval = metrics.interval
    if (isinstance(interval, bool) or not isinstance(interval, int | float)
            or not math.isfinite(interval) or interval <= 0):
        raise UnitError(f"--metrics-interval must be a finite number of seconds > 0, "
                        f"got {interval!r}")
    if metrics.textfile is not None:
        _check_textfile(metrics.textfile)


def _check_textfile(path: Path) -> None:
    """What ``prefork run`` checks of a textfile, less writability (the unit's user writes
    it, not the caller), plus what the unit's sandbox needs."""
    if not path.is_absolute():
        raise UnitError(f"--metrics-textfile {path}: a unit needs an absolute path")
    if not _TEXTFILE_PATH.fullmatch(str(path)):
        raise UnitError(f"--metrics-textfile {str(path)!r}: a unit takes only letters, digits "
                        "and _ @ + = : , . - / in it (no whitespace, quotes, '%' or '$')")
    if path.suffix != ".prom":
        raise UnitError(f"--metrics-textfile {path}: the name must end in .prom "
                        "(node_exporter's textfile collector reads only those)")
    for root, setting in _PRIVATE_ROOTS:
        if _is_under(path.parent, root):
            raise UnitError(f"--metrics-textfile {path}: the unit has {setting}, so a file "
                            f"under {root} is private to it and node_exporter would never "
                            "see it; use its textfile directory")
    if not path.parent.is_dir():
        raise UnitError(f"--metrics-textfile {path}: {path.parent} is not a directory")
    if path.is_dir():
        raise UnitError(f"--metrics-textfile {path} is a directory")


def _metrics_arguments(metrics: MetricsOptions | None) -> list[str]:
    """The master's ``--metrics*`` options for ExecStart= (checked already)."""
    if metrics is None:
        return []
    arguments = []
    if metrics.listen is not None:
        host, port = metrics.listen
        arguments += ["--metrics", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if metrics.textfile is not None:
        arguments += ["--metrics-textfile", str(metrics.textfile)]
    if metrics.interval != DEFAULT_INTERVAL:
        arguments += ["--metrics-interval", _number(metrics.interval)]
    return arguments


def _metrics_network(listen: tuple[str, int], allow: list[str], network: bool) -> str:
    """The network settings with the exporter's listener in the unit.

    PrivateNetwork= goes whatever the host: a network namespace of the unit's own has a
    loopback of its own, which no scraper on the host reaches. The address families are
    those the host can be (a name is refused: which families, and whether it is loopback,
    would depend on resolving it at boot). Without ``network`` every IP peer but the
    scrapers stays denied: loopback for a loopback host, else those ``allow`` names.
    """
    host, port = listen
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if host == "localhost":
        families, loopback = "AF_INET AF_INET6", True
    else:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            raise UnitError(f"--metrics {where}: a unit needs an IP address or localhost "
                            "as the host (a name would be resolved only at boot)") from None
        families = "AF_INET" if address.version == 4 else "AF_INET6"
        loopback = address.is_loopback
    for peer in allow:
        _check_ip_peer(peer)
    if network:
        if allow:
            raise UnitError("--metrics-allow is for a unit without --network: with --network "
                            "no IP peer is denied, so there is nothing to allow")
        reach = ("only this host reaches them" if loopback else
                 "every host that routes here reaches them too")
        return ("# AF_NETLINK stays out: getaddrinfo() does without it. Narrow the peers with\n"
                "# IPAddressAllow=/IPAddressDeny= in a drop-in if you know them.\n"
                f"# The metrics on {where}: {reach}.\n"
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6")
    if loopback:
        if allow:
            raise UnitError(f"--metrics-allow: --metrics {where} is on loopback, which no "
                            "other host reaches; give the address to listen on instead")
        return (f"# --metrics {where}: the host's own loopback, so no PrivateNetwork= (it would\n"
                "# give the unit a loopback of its own). Every IP peer but this host stays\n"
                "# denied; the workers, too, may now reach services on this host's loopback.\n"
                f"RestrictAddressFamilies=AF_UNIX {families}\n"
                "IPAddressDeny=any\n"
                "IPAddressAllow=localhost")
    if not allow:
        raise UnitError(f"--metrics {where} listens beyond this host, and the unit denies every "
                        "IP peer: name the Prometheus server with --metrics-allow ADDRESS "
                        "(or --metrics-allow any), or pass --network")
    return (f"# --metrics {where}: IPAddressAllow= must name the Prometheus server(s), the\n"
            "# only peers that may connect (from --metrics-allow; edit it if they move).\n"
            "# \"any\" would open the port, and the workers' IP, to every host. No\n"
            "# PrivateNetwork=: a network namespace of the unit's own has no route from them.\n"
            "# The workers may reach the same peers, and nothing else over IP.\n"
            f"RestrictAddressFamilies=AF_UNIX {families}\n"
            "IPAddressDeny=any\n"
            f"IPAddressAllow={' '.join(allow)}")


def _check_ip_peer(peer: str) -> None:
    if peer in _IP_WORDS:
        return
    try:
        ipaddress.ip_network(peer, strict=False)
    except ValueError:
        raise UnitError(f"--metrics-allow {peer!r} is not an IP address, a prefix "
                        f"(192.0.2.0/24) or one of {', '.join(_IP_WORDS)}") from None


def default_venv() -> Path:
    """The virtual environment of the running interpreter."""
    return Path(sys.prefix)
