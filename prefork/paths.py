"""Where a master keeps its files, and what a fleet may be called.

A fleet's name becomes two file names in its runtime directory, ``NAME.lock`` (the lock a
master holds while it runs) and ``NAME.sock`` (its control socket), and a process title.
So the naming rule, the mapping from a ``--fleet`` spec to a name, the runtime directory
and the check that a directory is private to us are written here, once; the master, the
control client, the unit renderer and the bundled fleets' caches all take them from here.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

# A fleet's or a worker's name: a file name in the runtime directory, never hidden, never
# "." or "..", no '/', no whitespace.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Characters in a name: NAME.lock and NAME.sock must fit Linux's NAME_MAX of 255 bytes (a
# name is ASCII). The socket's whole path must also fit sun_path (107 bytes): the control
# server checks that, since it depends on the directory too.
MAX_NAME = 255 - len(".lock")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*"
# What --fleet takes: a registered name, or module:ATTR (both parts dotted identifiers).
SPEC = re.compile(rf"{NAME.pattern}|{_DOTTED}:{_DOTTED}")


class RuntimeDirError(Exception):
    """The runtime directory cannot be used safely. ``str()`` is one line for the user."""


def name_problem(name: object, what: str = "fleet") -> str | None:
    """Why ``name`` cannot name a fleet (or a worker: ``what="worker"``), or None."""
    if isinstance(name, str) and NAME.fullmatch(name):
        if len(name) > MAX_NAME:
            return (f"{what} name {name[:20]}... is {len(name)} characters long; "
                    f"at most {MAX_NAME} fit in a file name")
        return None
    return f"{what} name {name!r} must be letters, digits, '.', '_' or '-'"


def spec_problem(spec: str) -> str | None:
    """Why ``spec`` is neither a fleet name nor ``module:ATTR``, or None."""
    if SPEC.fullmatch(spec):
        return None
    return (f"fleet {spec!r} is neither a fleet name (letters, digits, '.', '_', '-') "
            "nor module:ATTR")


def name_for_spec(spec: str) -> str:
    """The fleet name a spec stands for when its object does not name itself:
    ``pkg.mod:fleet`` -> ``pkg.mod.fleet``; a registered name is its own."""
    return spec.replace(":", ".")


def runtime_dir_problem(path: str) -> str | None:
    """Why ``path`` cannot be given as a runtime directory, or None: it must be absolute
    (an empty or relative one would silently be the current directory)."""
    if os.path.isabs(path):
        return None
    return f"must be an absolute path, not {path!r}"


def default_runtime_dir() -> Path:
    """``$PREFORK_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY``, else
    ``$XDG_RUNTIME_DIR/prefork``, else ``/tmp/prefork-<uid>``.

    An empty variable counts as unset; a relative ``$PREFORK_RUNTIME_DIR`` or
    ``$RUNTIME_DIRECTORY`` raises :class:`RuntimeDirError`; a relative ``$XDG_RUNTIME_DIR``
    is ignored, as the XDG Base Directory specification says it must be.
    """
    for variable in ("PREFORK_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if os.environ.get(variable):
            path = os.environ[variable].split(":")[0]
            problem = runtime_dir_problem(path)
            if problem is not None:
                raise RuntimeDirError(f"${variable} {problem}")
            return Path(path)
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "prefork"
    return Path("/tmp") / f"prefork-{os.getuid()}"


def lock_path(runtime_dir: Path, fleet: str) -> Path:
    """The lock the master of ``fleet`` holds: ``runtime_dir / "<fleet>.lock"``."""
    return runtime_dir / f"{fleet}.lock"


def socket_path(runtime_dir: Path, fleet: str) -> Path:
    """Where the master of ``fleet`` listens: ``runtime_dir / "<fleet>.sock"``."""
    return runtime_dir / f"{fleet}.sock"


def make_private_dir(path: Path, *, what: str, advice: str, parents: bool = True) -> str | None:
    """Create directory ``path`` (mode 0700) if it is missing; then return why it cannot be
    trusted, in one line that ends with ``advice``, or None if it is ours alone.

    Ours alone: a real directory, not a symlink to one (the last component is opened with
    ``O_NOFOLLOW``: in a shared /tmp anyone may have made the name first), owned by our
    uid, and writable by nobody else. What is checked is the directory as opened: to use
    it safely afterwards, through a path that may since name something else, take
    :func:`open_private_dir`'s descriptor instead.
    """
    opened = open_private_dir(path, what=what, advice=advice, parents=parents)
    if isinstance(opened, str):
        return opened
    os.close(opened)
    return None


def open_private_dir(path: Path, *, what: str, advice: str, parents: bool = True) -> int | str:
    """:func:`make_private_dir`, returning an ``O_DIRECTORY`` descriptor of the directory
    it checked (the caller closes it) instead of None."""
    try:
        path.mkdir(mode=0o700, parents=parents, exist_ok=True)
    except FileExistsError:
        pass  # something else than a directory has the name: the open below says what
    except OSError as exc:
        return f"{what} {path}: {exc.strerror}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        # O_NOFOLLOW with O_DIRECTORY fails a symlink with ENOTDIR (ELOOP without it).
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            link = " (a symlink)" if path.is_symlink() else ""
            return f"{what} {path} is not a directory{link}; {advice}"
        return f"{what} {path}: {exc.strerror}"
    info = os.fstat(fd)
    problem = None
    if info.st_uid != os.getuid():
        problem = f"{what} {path} belongs to uid {info.st_uid}, not to uid {os.getuid()}; {advice}"
    elif info.st_mode & 0o022:
        problem = f"{what} {path} is writable by others; {advice}"
    if problem is not None:
        os.close(fd)
        return problem
    return fd


def open_runtime_dir(path: Path) -> int:
    """:func:`open_private_dir` for the runtime directory: the descriptor of the directory
    it checked, through which the lock and the socket are then made, so that a path
    swapped for a symlink after the check cannot lead them elsewhere. Raises
    :class:`RuntimeDirError`."""
    opened = open_private_dir(path, what="runtime directory",
                              advice="use a private one (--runtime-dir)")
    if isinstance(opened, str):
        raise RuntimeDirError(opened)
    return opened


def in_dir(dir_fd: int, name: str) -> str:
    """A path to ``name`` in the directory open as ``dir_fd``, for the calls that take no
    ``dir_fd`` (``bind()``): through /proc's link to the descriptor, never re-walking the
    directory's own path, which may name another directory by now."""
    return f"/proc/self/fd/{dir_fd}/{name}"

