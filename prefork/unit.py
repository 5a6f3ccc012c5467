"""Render a hardened systemd unit for a fleet's master (``prefork systemd``).

The unit text comes from ``prefork-fleet.service.in`` in the ``prefork_units`` package
(``systemd/`` in the source tree), filled in with :class:`string.Template`: ``${name}``
placeholders, ``$$`` for a literal ``$``. A placeholder alone on its line that renders
empty drops the line. Values are validated here, so what reaches the template is either
safe as is or quoted for systemd.
"""

from __future__ import annotations

import math
import os
import re
import stat
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template

from prefork.fleet import DEFAULT_GRACE
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


class UnitError(Exception):
    """An option cannot make a working unit. ``str()`` is one line for the user."""


def unit_name(fleet: str) -> str:
    """The file name to install the unit as: ``prefork-NAME.service``."""
    return f"prefork-{name_for_spec(fleet)}.service"


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
) -> str:
    """The unit text for running ``fleet`` (a registered name or ``module:ATTR``).

    ``venv`` must hold an executable ``bin/prefork``; ``workdir``, if given, must be an
    existing directory. ``watchdog=0`` leaves out ``WatchdogSec=``. Without ``user`` the
    unit runs as a ``DynamicUser=``; ``group`` needs ``user``. Does not import the fleet:
    the caller checks it loads. Raises :class:`UnitError` for any invalid value.
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

    values = {
        "unit_name": unit_name(fleet),
        "fleet": fleet,
        "dir_name": name_for_spec(fleet),
        "version": __version__,
        "exec_start": " ".join([_exec_path(str(prefork)), "run", "--fleet", fleet,
                                "--grace", _number(grace)]),
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
        "protect_home": _protect_home(venv, workdir),
        "network_summary": ("IPv4 and IPv6 for the workers, and local sockets"
                            if network else "none: local sockets only (the notify socket "
                            "and the journal are AF_UNIX)"),
        "network": _network(network),
    }
    template = _load_template()
    for key, value in values.items():
        if not value:  # a placeholder that renders empty takes its line with it
            template = template.replace(f"${{{key}}}\n", "")
    return Template(template).substitute(values)


def reachability_warnings(venv: Path, user: str | None,
                          workdir: Path | None = None) -> list[str]:
    """Paths a ``DynamicUser=`` service could not reach, one line each; empty if fine.

    Only for the dynamic user (``user is None``), which owns nothing on the host: every
    directory on the way to the venv, its Python and the working directory must be
    searchable by others, as ``/root`` (mode 0700) is not. A named ``user`` may reach
    them through ownership or groups, which this does not try to judge.
    """
    if user is not None:
        return []
    warnings = []
    for path in _needed_paths(Path(os.path.abspath(venv)), workdir):
        blocked = _first_closed_directory(path)
        if blocked is not None:
            warnings.append(f"{path} is not reachable for the unit's dynamic user "
                            f"({blocked} is not searchable by others): pass --user, or "
                            "use a venv and Python outside it")
    return warnings


def _load_template() -> str:
    return resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE).read_text(encoding="utf-8")


def _check_fleet(fleet: str) -> None:
    # The spec rule also keeps ExecStart= free of quoting and '%', and the unit's
    # directory names free of '/' and "..".
    if spec_problem(fleet) is not None or ".." in fleet:
        raise UnitError(f"fleet {fleet!r} cannot go into a unit: use a registered name or "
                        "module:ATTR (letters, digits, '.', '_', '-', ':')")


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


def _protect_home(venv: Path, workdir: Path | None) -> str:
    under_home = [p for p in _needed_paths(venv, workdir) if _is_under_home(p)]
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
    resolved = Path(os.path.realpath(path))
    return any(p == root or root in p.parents for p in (path, resolved) for root in _HOME_ROOTS)


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


def default_venv() -> Path:
    """The virtual environment of the running interpreter."""
    return Path(sys.prefix)
