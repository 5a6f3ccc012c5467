"""One master per fleet: an exclusive ``flock`` on ``<runtime dir>/<fleet>.lock``.

The kernel drops the lock when the master's descriptor closes, however the master dies,
so a stale file never blocks a restart. Children close the descriptor right after fork.
While held, the file holds the master's pid; a released lock leaves it empty.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path


class AlreadyRunning(Exception):
    """Another master holds this fleet's lock. ``str()`` is one line for the user."""


class RuntimeDirError(Exception):
    """The runtime directory cannot be used safely. ``str()`` is one line for the user."""


def default_runtime_dir() -> Path:
    """``$PREFORK_RUNTIME_DIR``, else systemd's ``$RUNTIME_DIRECTORY``, else
    ``$XDG_RUNTIME_DIR/prefork``, else ``/tmp/prefork-<uid>``."""
    for variable in ("PREFORK_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        if os.environ.get(variable):
            return Path(os.environ[variable].split(":")[0])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "prefork"
    return Path("/tmp") / f"prefork-{os.getuid()}"


class FleetLock:
    """Hold the fleet's lock while the master runs; the file records the master's pid."""

    def __init__(self, runtime_dir: Path, fleet_name: str) -> None:
        self.path = runtime_dir / f"{fleet_name}.lock"
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op if held); raise AlreadyRunning or RuntimeDirError."""
        if self.fd is not None:
            return
        _ensure_private_dir(self.path.parent)
        # No O_TRUNC: the running master's pid must survive a refused second master.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"fleet {self.path.stem!r} is already running (master pid {holder}, "
                f"lock {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            # Empty the file but never unlink it: a newcomer that opened the old path and
            # one that created a new file could otherwise both hold "the" lock.
            os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None


def _ensure_private_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.stat()
    except OSError as exc:
        raise RuntimeDirError(f"runtime directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(f"runtime directory {path} is not a directory")
    if info.st_uid != os.getuid():
        raise RuntimeDirError(f"runtime directory {path} belongs to uid {info.st_uid}, not to us")
    if info.st_mode & 0o022:
        raise RuntimeDirError(f"runtime directory {path} is writable by others; "
                              "use a private one (--runtime-dir)")
