"""One master per fleet: an exclusive ``flock`` on ``<runtime dir>/<fleet>.lock``, and an
abstract Unix socket name bound for as long as the master runs.

The kernel drops both when the master's descriptors close, however the master dies, so
nothing stale ever blocks a restart. Children close the descriptors right after fork
(:meth:`FleetLock.fds`). While held, the file holds the master's pid; a released lock
leaves it empty.

Why two: a file can be deleted from under its lock. With the runtime directory removed
(``rm -rf``, a tmp cleaner), a second master would create a new file, lock it too, and
run the same fleet alongside the first. An abstract socket name (Linux) cannot be
deleted by anyone and vanishes with the last descriptor, so it is the guard that holds;
it is derived from the runtime directory's resolved path and the fleet's name, which a
directory made again at the same path keeps. The file stays because abstract names are
per network namespace (two masters in two namespaces sharing a directory still meet at
the file), and because it records the master's pid where anyone can read it. The name is
visible to every process of the namespace, and any of them could bind it first: a holder
that is neither of our uid nor root is named in the error, not taken for a master.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import socket
from pathlib import Path

from prefork.control import peer_of
from prefork.paths import RuntimeDirError, lock_path, open_runtime_dir

# Refused masters that learn the holder's pid; each one's connection stays queued, never
# accepted, so later ones are told only that the name is held.
_BACKLOG = 16


class AlreadyRunning(Exception):
    """Another master holds this fleet's lock. ``str()`` is one line for the user."""


class FleetLock:
    """Hold the fleet's lock while the master runs; the file records the master's pid."""

    def __init__(self, runtime_dir: Path, fleet_name: str) -> None:
        self.path = lock_path(runtime_dir, fleet_name)
        self.fleet = fleet_name
        self.fd: int | None = None
        self._guard: socket.socket | None = None

    def fds(self) -> list[int]:
        """Every descriptor the lock holds: what a forked child must close, or it would
        keep the fleet "running" after its master died."""
        if self.fd is None or self._guard is None:
            return []
        return [self.fd, self._guard.fileno()]

    def acquire(self) -> None:
        """Take the lock (a no-op if held); raise AlreadyRunning or RuntimeDirError."""
        if self.fd is not None:
            return
        directory = open_runtime_dir(self.path.parent)
        try:
            fd = self._lock_file(directory)
            try:
                self._guard = _bind_guard(_guard_name(directory, self.fleet), self.fleet,
                                          self.path)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:  # a full disk, say
                self._close_guard()
                os.close(fd)
                raise RuntimeDirError(f"lock {self.path}: {exc.strerror or exc}") from None
            except BaseException:
                self._close_guard()
                os.close(fd)
                raise
        finally:
            os.close(directory)
        self.fd = fd

    def adopt(self, fds: list[int]) -> None:
        """Hold the lock through the descriptors :meth:`fds` gave the image before a
        re-exec (prefork.reload): the flock and the guard stay the same process's."""
        self.fd, guard = fds
        self._guard = socket.socket(fileno=guard)
        for fd in fds:
            os.set_inheritable(fd, False)

    def _lock_file(self, directory: int) -> int:
        """The lock file, opened in ``directory`` and flocked."""
        # No O_TRUNC: the running master's pid must survive a refused second master.
        try:
            fd = os.open(self.path.name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=directory)
        except OSError as exc:
            raise RuntimeDirError(f"lock {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"fleet {self.fleet!r} is already running (master pid {holder}, "
                f"lock {self.path})"
            ) from None
        except OSError as exc:  # a file system without flock (ENOLCK)
            os.close(fd)
            raise RuntimeDirError(f"lock {self.path}: {exc.strerror}") from None
        return fd

    def _close_guard(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None

    def release(self) -> None:
        if self.fd is not None:
            # Empty the file but never unlink it: a newcomer that opened the old path and
            # one that created a new file could otherwise both hold "the" lock.
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None
        self._close_guard()


def _guard_name(directory: int, fleet: str) -> bytes:
    """The abstract socket name of ``fleet`` in the runtime directory open as
    ``directory``: readable when it fits in sun_path, else a hash of the same text."""
    where = os.fsencode(os.readlink(f"/proc/self/fd/{directory}"))
    name = b"\0prefork:" + where + b"/" + fleet.encode()
    if len(name) > 107:  # sun_path is 108 bytes; Python adds no NUL to an abstract name
        name = b"\0prefork:sha256:" + hashlib.sha256(name[1:]).hexdigest().encode()
    return name


def _bind_guard(name: bytes, fleet: str, path: Path) -> socket.socket:
    """Bind and listen on the abstract ``name``; raise AlreadyRunning with the holder's pid
    when a master of ours has it, RuntimeDirError when another user's process has it."""
    guard = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        guard.bind(name)
        guard.listen(_BACKLOG)  # so that a refused master can ask who holds it
    except OSError as exc:
        guard.close()
        if exc.errno != errno.EADDRINUSE:
            raise
    else:
        return guard
    label = name[1:].decode(errors="replace")
    holder = _holder(name)
    if holder is None:
        raise AlreadyRunning(f"fleet {fleet!r} is already running (master pid unknown: "
                             f"{label} is held; lock {path})")
    pid, uid = holder
    if uid not in (os.getuid(), 0):
        raise RuntimeDirError(f"fleet {fleet!r}: pid {pid} of uid {uid} holds {label}, the "
                              "name that keeps a second master out; stop that process")
    raise AlreadyRunning(f"fleet {fleet!r} is already running (master pid {pid}; its lock "
                         f"{path} was removed while it ran)")


def _holder(name: bytes) -> tuple[int, int] | None:
    """(pid, uid) of the process that listens on the abstract ``name``, or None when it
    cannot be told (its queue is full, or it has just let go)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)
    try:
        probe.connect(name)
        peer = peer_of(probe)
        return peer.pid, peer.uid
    except OSError:
        return None
    finally:
        probe.close()
