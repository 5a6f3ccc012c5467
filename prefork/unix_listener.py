"""A listening Unix socket in the runtime directory that only our uid can reach.

The master's control socket and its kernel pool's socket are both made here: the file is
0600 in the private (0700) runtime directory, reached through the directory's checked
descriptor, never through a path that may name another directory by now. The caller
holds the fleet's lock, so a socket file already at the path is a dead master's and is
replaced; at ``close()`` the file is removed only if it is still the one we bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from pathlib import Path

from prefork.paths import in_dir, open_runtime_dir

MAX_PATH = 108  # bytes in sun_path: clients connect by this path


class ListenerError(Exception):
    """A socket that cannot be made, when its owner names no error of its own."""


class PrivateListener:
    """``open()`` listens at ``path`` and returns the socket; ``close()`` closes it and
    removes the file. Errors are ``error(one line)``, the line starting with ``what`` and
    the path; an unsafe runtime directory is ``RuntimeDirError``."""

    def __init__(self, path: Path, *, what: str, backlog: int, nonblocking: bool,
                 error: type[Exception]) -> None:
        self.path = path
        self._what, self._backlog, self._error = what, backlog, error
        self._flags = socket.SOCK_STREAM | socket.SOCK_CLOEXEC
        if nonblocking:
            self._flags |= socket.SOCK_NONBLOCK
        self.socket: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound

    def open(self) -> socket.socket:
        if self.socket is not None:
            return self.socket
        directory = open_runtime_dir(self.path.parent)
        try:
            self.socket, info = self._bind(in_dir(directory, self.path.name))
        finally:
            os.close(directory)
        self._inode = (info.st_dev, info.st_ino)
        return self.socket

    def handed(self) -> dict[str, int] | None:
        """The listening socket, for the master's re-exec (prefork.reload): its
        descriptor and the file it is bound to, for :meth:`adopt`."""
        if self.socket is None or self._inode is None:
            return None
        return {"fd": self.socket.fileno(), "dev": self._inode[0], "ino": self._inode[1]}

    def adopt(self, handed: dict[str, int]) -> socket.socket:
        """The socket :meth:`handed` kept, in the re-executed master: connections
        queued meanwhile are still there."""
        self.socket = socket.socket(fileno=handed["fd"])
        self.socket.set_inheritable(False)
        self._inode = (handed["dev"], handed["ino"])
        return self.socket

    def _bind(self, here: str) -> tuple[socket.socket, os.stat_result]:
        where = f"{self._what} {self.path}"
        if len(os.fsencode(self.path)) >= MAX_PATH:
            raise self._error(f"{where}: AF_UNIX path too long")
        try:
            info = os.lstat(here)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise self._error(f"{where}: {exc.strerror}") from None
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise self._error(f"{where}: something else than a socket is in the way; "
                                  "remove it")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(here)
        listener = socket.socket(socket.AF_UNIX, self._flags)
        try:
            # Linux creates the socket file with the socket inode's mode (less the umask):
            # set it before bind(), so the file is never open to others, not even briefly.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(here)
            os.chmod(here, 0o600)
            info = os.lstat(here)
            listener.listen(self._backlog)
        except OSError as exc:
            listener.close()
            raise self._error(f"{where}: {exc.strerror or exc}") from None
        return listener, info

    def close(self) -> None:
        if self.socket is None:
            return
        self.socket.close()
        self.socket = None
        try:
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None
