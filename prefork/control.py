"""The master's control socket, and the client behind ``prefork status``, ``reload``, ``scale``.

The master listens on ``<runtime dir>/<fleet>.sock``, in the same private (0700) directory
as its lock, which it holds before it opens the socket. The protocol is one JSON object
per line each way: the client connects, writes one request line, reads one reply line,
and the server closes the connection.

    {"command": "status"}                              -> the fleet's status (see below)
    {"command": "scale", "worker": NAME, "delta": 1}   -> the master's answer; delta is 1 or -1
    anything wrong                                     -> {"error": "one line"}

The server runs inside the master's single ``select()`` loop, so it never blocks for long:
every socket is non-blocking, a client that does not send a whole request within
``READ_TIMEOUT`` is dropped (``next_deadline()``/``expire()`` let the loop time it), a
request over ``MAX_REQUEST`` bytes is dropped, and the small reply is written with a
``WRITE_TIMEOUT`` at most. Only our own uid and root may talk to it: the socket file is
0600 in a 0700 directory, and ``SO_PEERCRED`` is checked on every connection besides.

The master answers ``status`` from what it knows; the memory figures are measured by the
client (:func:`fetch_status`), so the master never spends milliseconds reading smaps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import selectors
import socket
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prefork.lock import _ensure_private_dir
from prefork.memory import MIB, MemoryUnavailable, measure

log = logging.getLogger("prefork")

# Exit codes of `prefork status`, `reload` and `scale` beyond 0 and 2 (bad input).
EXIT_CONTROL_FAILED = 1  # the master did not answer in time, or answered nonsense
EXIT_NO_MASTER = 3  # no master of the fleet is running

COMMANDS = ("scale", "status")
READ_TIMEOUT = 2.0  # seconds a client has, from connect, to send its whole request line
WRITE_TIMEOUT = 1.0  # seconds a client has to take the reply before it is dropped
MAX_REQUEST = 64 * 1024  # bytes in a request line, newline excluded
MAX_REPLY = 16 * 1024 * 1024  # the client's guard against a runaway reply
MAX_CONNECTIONS = 16  # open at once; more are closed on accept, so the loop cannot stall
BACKLOG = 16
ACCEPT_PAUSE = 1.0  # seconds without accepting after accept() failed for want of resources

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class NoMaster(Exception):
    """No master listens on the socket (no file, or a stale one). ``str()`` is one line."""


class ControlError(Exception):
    """Talking to the master failed (timeout, broken reply, permissions, a socket that
    cannot be created). ``str()`` is one line for the user."""


class Peer(NamedTuple):
    """The credentials of the process on the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


_FLEET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # as prefork.fleet validates it


def socket_path(runtime_dir: Path, fleet_name: str) -> Path:
    """Where the master of ``fleet_name`` listens: ``runtime_dir / "<fleet_name>.sock"``."""
    return runtime_dir / f"{fleet_name}.sock"


def check_fleet_name(name: str) -> str | None:
    """Why ``name`` cannot name a fleet (and so a file in the runtime dir), or None."""
    if _FLEET_NAME.fullmatch(name):
        return None
    return f"fleet name {name!r} must be letters, digits, '.', '_' or '-'"


def peer_of(sock: socket.socket) -> Peer:
    """``SO_PEERCRED`` of a connected Unix socket (for a client: the process that listened)."""
    return Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _PEERCRED.size)))


# -- the server, in the master -------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: Peer
    deadline: float
    buffer: bytearray


class ControlServer:
    """The master's end of the control socket, driven by the master's own loop.

    Lifecycle: ``open()`` once (the caller holds the fleet's lock); then, every loop,
    watch ``fds()`` for reading (or let ``attach()`` keep a selector in step), call
    ``handle(fd)`` for each readable one, include ``next_deadline()`` in the loop's
    timeout and call ``expire(time.monotonic())`` after each wake-up; ``close()`` at the
    end. A forked child closes ``own_fds()``. ``handler(request)`` gets a request that
    already passed :func:`check_request` and returns the reply dict; an exception in it
    becomes an ``{"error": ...}`` reply, never an exception in the loop.
    """

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._connections: dict[int, _Connection] = {}
        self._selector: selectors.BaseSelector | None = None
        # Out of descriptors: the listener stays readable while accept() fails, so it is
        # not watched until then (else the loop would spin on it).
        self._paused_until: float | None = None

    # -- lifecycle -------------------------------------------------------------------

    def open(self) -> None:
        """Listen at ``path``; replace a stale socket file left there by a dead master.

        Raises ``RuntimeDirError`` for an unsafe directory and :class:`ControlError` when
        the socket cannot be created (path too long, not a socket in the way, ...).
        """
        if self._listener is not None:
            return
        _ensure_private_dir(self.path.parent)
        try:
            info = self.path.lstat()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ControlError(f"control socket {self.path}: {exc.strerror}") from None
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise ControlError(f"control socket {self.path}: something else than a socket "
                                   "is in the way; remove it")
            # Safe: the caller holds the fleet's lock, so no live master listens here.
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        listener = socket.socket(socket.AF_UNIX,
                                 socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            # Linux creates the socket file with the socket inode's mode (less the umask):
            # set it before bind(), so the file is never open to others, not even briefly.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(os.fspath(self.path))
            os.chmod(self.path, 0o600)
            info = self.path.lstat()
            listener.listen(BACKLOG)
        except OSError as exc:
            listener.close()
            raise ControlError(f"control socket {self.path}: "
                               f"{exc.strerror or exc}") from None
        self._listener = listener
        self._inode = (info.st_dev, info.st_ino)
        if self._selector is not None:
            self._selector.register(listener.fileno(), selectors.EVENT_READ, self)

    def close(self) -> None:
        """Close every socket and remove the socket file, unless it is no longer ours."""
        for fd in list(self._connections):
            self._drop(fd)
        if self._listener is None:
            return
        self._unwatch(self._listener.fileno())
        self._listener.close()
        self._listener = None
        try:
            info = self.path.lstat()
            if (info.st_dev, info.st_ino) == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
        self._inode = None

    def attach(self, selector: selectors.BaseSelector) -> None:
        """Keep ``selector`` registered for exactly ``fds()`` from now on, each with
        ``data=self``: a descriptor is unregistered before it is closed, so a number the
        kernel reuses for the next connection is never mistaken for a registered one."""
        self._selector = selector
        for fd in self.fds():
            selector.register(fd, selectors.EVENT_READ, self)

    # -- the loop's view -------------------------------------------------------------

    def fds(self) -> list[int]:
        """Every descriptor to watch for reading right now: the listener (first) and each
        connection still being read. The list changes after ``handle()`` and ``expire()``."""
        if self._listener is None:
            return []
        if self._paused_until is not None:
            return [*self._connections]
        return [self._listener.fileno(), *self._connections]

    def own_fds(self) -> list[int]:
        """Every descriptor this server holds: what a forked child must close."""
        if self._listener is None:
            return [*self._connections]
        return [self._listener.fileno(), *self._connections]

    def next_deadline(self) -> float | None:
        """The ``time.monotonic()`` at which the oldest waiting client is dropped, or the
        listener is watched again after running out of descriptors, if any."""
        deadlines = [c.deadline for c in self._connections.values()]
        if self._paused_until is not None:
            deadlines.append(self._paused_until)
        return min(deadlines, default=None)

    def expire(self, now: float) -> None:
        """Drop every client whose deadline is at or before ``now``; watch the listener
        again once a pause for want of descriptors is over."""
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._selector is not None and self._listener is not None:
                self._selector.register(self._listener.fileno(), selectors.EVENT_READ, self)
        for fd, connection in list(self._connections.items()):
            if connection.deadline <= now:
                log.debug("control: dropped a client (pid %d) that sent no whole request "
                          "within %gs", connection.peer.pid, READ_TIMEOUT)
                self._drop(fd)

    def handle(self, fd: int) -> None:
        """``fd`` is readable: accept new clients, or read (and maybe answer) one.

        Never blocks, except to write a reply, for ``WRITE_TIMEOUT`` at most. An ``fd``
        that is not (or no longer) ours is ignored.
        """
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
        elif fd in self._connections:
            self._read(fd)

    # -- inside ----------------------------------------------------------------------

    def _accept(self) -> None:
        assert self._listener is not None
        # Bounded, so a flood of connects cannot keep the loop here.
        for _ in range(BACKLOG):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE and the like: keep the master running
                log.warning("control: accept failed: %s; not accepting for %gs", exc,
                            ACCEPT_PAUSE)
                self._paused_until = time.monotonic() + ACCEPT_PAUSE
                self._unwatch(self._listener.fileno())
                return
            try:
                peer = peer_of(sock)
            except OSError:
                sock.close()
                continue
            if peer.uid not in (os.getuid(), 0):
                allowed = "root" if os.getuid() == 0 else f"uid {os.getuid()} and root"
                log.warning("control: refused a connection from uid %d (pid %d): only %s may "
                            "control this master", peer.uid, peer.pid, allowed)
                sock.close()
                continue
            if len(self._connections) >= MAX_CONNECTIONS:
                log.warning("control: %d clients already connected; refused pid %d",
                            MAX_CONNECTIONS, peer.pid)
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self._connections[fd] = _Connection(sock, peer, time.monotonic() + READ_TIMEOUT,
                                                bytearray())
            if self._selector is not None:
                self._selector.register(fd, selectors.EVENT_READ, self)
            self._read(fd)  # the request is often there already

    def _read(self, fd: int) -> None:
        connection = self._connections[fd]
        buffer = connection.buffer
        eof = False
        while b"\n" not in buffer and len(buffer) <= MAX_REQUEST:
            try:
                chunk = connection.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(fd)
                return
            if not chunk:
                eof = True
                break
            buffer += chunk
        end = buffer.find(b"\n")
        if end > MAX_REQUEST or (end < 0 and len(buffer) > MAX_REQUEST):
            log.warning("control: dropped a request over %d bytes from pid %d", MAX_REQUEST,
                        connection.peer.pid)
            self._reply(fd, {"error": f"request over {MAX_REQUEST} bytes"})
            return
        if end >= 0:
            self._reply(fd, self._dispatch(bytes(buffer[:end])))
        elif eof:
            # A client that shut down its side (`nc -N`) sent its whole request.
            if buffer.strip():
                self._reply(fd, self._dispatch(bytes(buffer)))
            else:
                self._drop(fd)

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, ValueError) as exc:
            return {"error": f"request is not JSON: {_one_line(str(exc))}"}
        problem = check_request(request)
        if problem is not None:
            return {"error": problem}
        try:
            reply = self.handler(request)
        except Exception as exc:
            log.exception("control: the %s handler failed", request["command"])
            return {"error": f"internal error: {type(exc).__name__}: {_one_line(str(exc))}"}
        if not isinstance(reply, dict):
            log.error("control: the %s handler returned a %s, not a dict", request["command"],
                      type(reply).__name__)
            return {"error": "internal error: the master's reply is not an object"}
        return reply

    def _reply(self, fd: int, reply: dict[str, Any]) -> None:
        """Write one reply line (blocking, at most WRITE_TIMEOUT) and close the connection."""
        connection = self._connections[fd]
        try:
            data = json.dumps(reply, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            log.error("control: cannot encode the reply: %s", exc)
            data = b'{"error":"internal error: the master\'s reply is not JSON"}\n'
        try:
            connection.sock.settimeout(WRITE_TIMEOUT)
            connection.sock.sendall(data, socket.MSG_NOSIGNAL)
        except OSError as exc:  # including TimeoutError: the client did not read
            log.debug("control: reply to pid %d not delivered: %s", connection.peer.pid, exc)
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        connection = self._connections.pop(fd)
        self._unwatch(fd)
        connection.sock.close()

    def _unwatch(self, fd: int) -> None:
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)


def check_request(request: object) -> str | None:
    """Why ``request`` is not a valid request (one line), or None if it is."""
    if not isinstance(request, dict):
        return "a request must be a JSON object"
    command = request.get("command")
    if not isinstance(command, str):
        return 'a request needs a "command"'
    if command not in COMMANDS:
        return f"unknown command {command!r} (known: {', '.join(COMMANDS)})"
    if command == "scale":
        worker, delta = request.get("worker"), request.get("delta")
        if not isinstance(worker, str) or not worker:
            return 'scale needs a "worker" name'
        if isinstance(delta, bool) or delta not in (1, -1):
            return f'scale needs a "delta" of 1 or -1, got {delta!r}'
    return None


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- the client ----------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send ``message`` to the master listening at ``path``; return its reply.

    Raises :class:`NoMaster` when nothing listens there (no file, or a stale socket of a
    dead master) and :class:`ControlError` for a timeout, a refusal or a broken reply.
    An ``{"error": ...}`` reply is returned like any other.
    """
    return exchange(path, message, timeout)[0]


def exchange(path: Path, message: dict[str, Any],
             timeout: float = 5.0) -> tuple[dict[str, Any], Peer]:
    """:func:`request`, also returning who answered (the process that listens at ``path``)."""
    fleet = path.stem
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, NotADirectoryError):
            raise NoMaster(f"no master of fleet {fleet!r} is running "
                           f"(no socket at {path})") from None
        except ConnectionRefusedError:
            raise NoMaster(f"no master of fleet {fleet!r} is running "
                           f"(stale socket at {path}: nothing listens on it)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as the master's user "
                               "or as root") from None
        except BlockingIOError:  # the listen backlog is full
            raise ControlError(f"master of fleet {fleet!r} is too busy to answer "
                               f"({path})") from None
        except TimeoutError:
            raise ControlError(f"master of fleet {fleet!r} did not answer within "
                               f"{timeout:g}s ({path})") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        peer = peer_of(sock)
        try:
            sock.sendall(json.dumps(message).encode() + b"\n", socket.MSG_NOSIGNAL)
            data = _read_line(sock, deadline)
        except TimeoutError:
            raise ControlError(f"master of fleet {fleet!r} did not answer within "
                               f"{timeout:g}s ({path})") from None
        except OSError as exc:
            raise ControlError(f"master of fleet {fleet!r} broke the connection: "
                               f"{exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ControlError(f"master of fleet {fleet!r} sent a broken reply: "
                           f"{data[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"master of fleet {fleet!r} sent a {type(reply).__name__}, "
                           "not an object")
    return reply, peer


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """One reply line, all of it before ``deadline``; raise TimeoutError or ControlError."""
    data = bytearray()
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                break  # a reply without its newline: still a whole reply
            raise ControlError("the master closed the connection without a reply")
        data += chunk
        if len(data) > MAX_REPLY:
            raise ControlError(f"the master's reply is over {MAX_REPLY} bytes")
    return bytes(data.split(b"\n", 1)[0])


# -- status: the reply plus the memory the client measures -----------------------------


def fetch_status(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """The master's status reply with each process's memory, measured here.

    Adds ``memory`` (``rss``, ``uss``, ``pss``, ``shared``, ``swap`` in bytes, or null for a
    process without a pid or one gone before it was read) to the top level (the master's
    record) and to every worker, and ``total_pss``: the master's and the workers' PSS that
    could be read. Raises NoMaster or ControlError (also for an ``{"error": ...}`` reply
    or one without the documented shape).
    """
    reply = request(path, {"command": "status"}, timeout)
    if "error" in reply:
        raise ControlError(f"the master refused status: {_one_line(str(reply['error']))}")
    problem = _check_status(reply)
    if problem is not None:
        raise ControlError(f"the master's status reply is not understood: {problem}")
    reply["memory"] = _memory_of(reply["master_pid"])
    for worker in reply["workers"]:
        worker["memory"] = None if worker.get("pid") is None else _memory_of(worker["pid"])
    measured = [reply["memory"], *(w["memory"] for w in reply["workers"])]
    reply["total_pss"] = sum(m["pss"] for m in measured if m is not None)
    return reply


def _check_status(reply: dict[str, Any]) -> str | None:
    if not _is_int(reply.get("master_pid")):
        return "no master_pid"
    workers = reply.get("workers")
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        return "no list of workers"
    for worker in workers:
        if worker.get("pid") is not None and not _is_int(worker["pid"]):
            return f"worker pid {worker['pid']!r}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _memory_of(pid: int) -> dict[str, int] | None:
    try:
        return measure(pid).as_dict()
    except MemoryUnavailable:
        return None  # exited since the master answered, or not ours to read


def format_status(status: dict[str, Any]) -> str:
    """:func:`fetch_status`'s document as a header line and a table (memory in MiB)."""
    workers = status["workers"]
    with_pid = [w for w in workers if w.get("pid") is not None]
    measured = [w for w in with_pid if w.get("memory") is not None]
    parts = [f"master {status['master_pid']}"]
    if status.get("uptime") is not None:
        parts.append(f"up {format_duration(status['uptime'])}")
    if status.get("python"):
        parts.append(f"Python {status['python']}")
    # Say what the total covers: a worker that exited before it was measured is not in it.
    who = "master" if status.get("memory") is not None else "master unreadable"
    counted = f"{len(measured)}" if len(measured) == len(with_pid) else (
        f"{len(measured)} of {len(with_pid)}")
    who += f" + {counted} worker{'' if len(with_pid) == 1 else 's'}"
    parts.append(f"total PSS {status['total_pss'] / MIB:.1f} MiB ({who})")
    lines = [f"fleet {status.get('fleet', '?')}: {', '.join(parts)}"]
    header = ("WORKER", "REPLICA", "PID", "STATE", "RESTARTS", "UPTIME", "LAST EXIT",
              "RSS", "USS", "PSS", "SHARED", "REASON")
    rows: list[tuple[str, ...]] = [header]
    for w in workers:
        state = str(w.get("state", "?"))
        if w.get("next_start_in") is not None:
            state += f" {w['next_start_in']:.1f}s"
        memory = w.get("memory")
        sizes = ("-",) * 4 if memory is None else tuple(
            f"{memory[key] / MIB:.1f}" for key in ("rss", "uss", "pss", "shared"))
        rows.append((str(w.get("name", w.get("label", "?"))), str(w.get("replica", "-")),
                     _or_dash(w.get("pid")), state, str(w.get("restarts", "-")),
                     format_duration(w.get("uptime")), _or_dash(w.get("last_exit")),
                     *sizes, _or_dash(w.get("reason"))))
    right = {1, 2, 4, 5, 7, 8, 9, 10}  # numbers line up on the right
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        cells = [cell.rjust(width) if i in right else cell.ljust(width)
                 for i, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    lines.append("(memory in MiB)")
    return "\n".join(lines)


def format_duration(seconds: float | None) -> str:
    """``"-"``, ``"42s"``, ``"3m05s"``, ``"2h07m"`` or ``"3d04h"``."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
