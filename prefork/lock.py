"""One master per fleet: an exclusive ``flock`` on ``<runtime dir>/<fleet>.lock``.

The kernel drops the lock when the master's descriptor closes, however the master dies,
so a stale file never blocks a restart. Children close the descriptor right after fork.
While held, the file holds the master's pid; a released lock leaves it empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from prefork.paths import RuntimeDirError, lock_path, open_runtime_dir


class AlreadyRunning(Exception):
    """Another master holds this fleet's lock. ``str()`` is one line for the user."""


class FleetLock:
    """Hold the fleet's lock while the master runs; the file records the master's pid."""

    def __init__(self, runtime_dir: Path, fleet_name: str) -> None:
        self.path = lock_path(runtime_dir, fleet_name)
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock (a no-op if held); raise AlreadyRunning or RuntimeDirError."""
        if self.fd is not None:
            return
        # In the directory checked, not through its path, which may name another by now.
        directory = open_runtime_dir(self.path.parent)
        # No O_TRUNC: the running master's pid must survive a refused second master.
        try:
            fd = os.open(self.path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=directory)
        except OSError as exc:
            raise RuntimeDirError(f"lock {self.path}: {exc.strerror}") from None
        finally:
            os.close(directory)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"fleet {self.path.stem!r} is already running (master pid {holder}, "
                f"lock {self.path})"
            ) from None
        except OSError as exc:  # a file system without flock (ENOLCK)
            os.close(fd)
            raise RuntimeDirError(f"lock {self.path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as exc:  # a full disk
            os.close(fd)
            raise RuntimeDirError(f"lock {self.path}: {exc.strerror}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            # Empty the file but never unlink it: a newcomer that opened the old path and
            # one that created a new file could otherwise both hold "the" lock.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
