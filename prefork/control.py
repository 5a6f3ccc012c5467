"""The master's control socket: the server end, inside the master's loop.

The master listens on ``<runtime dir>/<fleet>.sock``, in the same private (0700) directory
as its lock, which it holds before it opens the socket. The protocol is one JSON object
per line each way: the client connects, writes one request line, reads one reply line,
and the server closes the connection. A request is ``{"command": NAME, ...}``; anything
wrong with it is answered ``{"error": "one line"}``.

The server runs inside the master's single ``select()`` loop, so it never blocks for long:
every socket is non-blocking, a client that does not send a whole request within
``READ_TIMEOUT`` is dropped (``next_deadline()``/``due()`` let the loop time it), a
request over ``MAX_REQUEST`` bytes is dropped, and the small reply is written with a
``WRITE_TIMEOUT`` at most. Only our own uid and root may talk to it: the socket file is
0600 in a 0700 directory, and ``SO_PEERCRED`` is checked on every connection besides.

No byte sequence from a client raises out of the server: a request that is not UTF-8
JSON, nests too deeply, holds a number too long to convert or cannot be parsed in the
memory left is answered with an error, and any other exception while serving one
connection is logged with its traceback and drops that connection only. Warnings a
client can cause again and again (refused connections, oversized requests) are
rate-limited by :class:`Throttle`, so they cannot flood the log.

The commands are one table, :func:`command_table`: each name with the check of its
arguments and the master's handler for it. The master answers ``status`` from what it
knows; the memory figures are measured by the client (:mod:`prefork.client`), so the
master never spends milliseconds reading smaps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prefork.policy import is_scale_delta
from prefork.unix_listener import PrivateListener

log = logging.getLogger("prefork")

READ_TIMEOUT = 2.0  # seconds a client has, from connect, to send its whole request line
WRITE_TIMEOUT = 1.0  # seconds a client has to take the reply before it is dropped
MAX_REQUEST = 64 * 1024  # bytes in a request line, newline excluded
MAX_CONNECTIONS = 16  # open at once; more are closed on accept, so the loop cannot stall
BACKLOG = 16
ACCEPT_PAUSE = 1.0  # seconds without accepting after accept() failed for want of resources
WARNING_INTERVAL = 10.0  # seconds between two log lines about one kind of hostile client
SHOWN = 40  # characters of a client's value quoted back in an error reply

_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[dict[str, Any]], dict[str, Any]]
Check = Callable[[dict[str, Any]], "str | None"]


class ControlError(Exception):
    """Talking to the master failed (timeout, broken reply, permissions, a socket that
    cannot be created). ``str()`` is one line for the user."""


@dataclass(frozen=True)
class Command:
    """One command of the protocol: ``check(request)`` says why its arguments are wrong
    (one line) or None; ``run(request)`` is the master's handler, given only requests
    that passed the check, returning the reply object."""

    run: Handler
    check: Check | None = None


def command_table(*, status: Handler, scale: Handler, reload: Handler
                  ) -> dict[str, Command]:
    """Every command the master answers, bound to its handlers: the one list of them.

        {"command": "status"}                              -> the fleet's status
        {"command": "scale", "worker": NAME, "delta": 1}   -> delta is 1 or -1
        {"command": "reload", "workers_only": false}       -> {"fleet": NAME, "reload": ID,
                                                               "queued": BOOL}

    ``reload`` imports the fleet's code afresh and rolls every worker over to it; with
    ``workers_only`` (optional, false by default) it only restarts the workers from the
    code already loaded. Its reply comes at once: the reload has ended when the status's
    ``reloads.last_result.id`` is ``ID`` or more; ``queued`` says it waits for the reload
    in progress. Any command may be answered ``{"error": "one line"}`` instead.
    """
    return {"status": Command(status), "scale": Command(scale, _check_scale),
            "reload": Command(reload, _check_reload)}


def _check_scale(request: dict[str, Any]) -> str | None:
    worker, delta = request.get("worker"), request.get("delta")
    if not isinstance(worker, str) or not worker:
        return 'scale needs a "worker" name'
    if not is_scale_delta(delta):
        return f'scale needs a "delta" of 1 or -1, got {shown(delta)}'
    return None


def _check_reload(request: dict[str, Any]) -> str | None:
    workers_only = request.get("workers_only", False)
    if not isinstance(workers_only, bool):
        return f'reload\'s "workers_only" must be true or false, got {shown(workers_only)}'
    return None


def shown(value: object) -> str:
    """A client's JSON value quoted in a reply: the repr of a scalar, cut to ``SHOWN``
    characters; only the kind of an array or object (whose repr may nest too deeply)."""
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[:SHOWN - 3]}..."


class Throttle:
    """When to log a warning that a client can cause again and again: the first of a kind
    at once, then at most one line per ``interval`` seconds, with how many were held back.

    Pure: the caller passes the clock and logs what it is told to. Kinds are a few fixed
    strings, so the state stays small whatever clients do.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._quiet_until: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def note(self, kind: str, now: float) -> int:
        """One more event of ``kind`` at ``now``: how many to report in a line now (this
        one and those held back before it), or 0 to hold it back."""
        if now < self._quiet_until.get(kind, now):
            self._held[kind] = self._held.get(kind, 0) + 1
            return 0
        self._quiet_until[kind] = now + self.interval
        return self._held.pop(kind, 0) + 1

    def next_deadline(self) -> float | None:
        """When the events held back are due to be reported, if any are."""
        return min((self._quiet_until[kind] for kind in self._held), default=None)

    def due(self, now: float) -> Iterator[tuple[str, int]]:
        """Each ``(kind, count)`` of events held back whose quiet time is over at ``now``:
        report one line for each."""
        for kind in [k for k in self._held if self._quiet_until[k] <= now]:
            self._quiet_until[kind] = now + self.interval
            yield kind, self._held.pop(kind)


class Peer(NamedTuple):
    """The credentials of the process on the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int


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
    timeout and call ``due(time.monotonic())`` after each wake-up; ``close()`` at the end.
    A forked child closes ``own_fds()``. ``commands`` is :func:`command_table`: a request
    is checked against it, then given to its command's handler; an exception in a handler
    becomes an ``{"error": ...}`` reply, never an exception in the loop.
    """

    def __init__(self, path: Path, commands: dict[str, Command]) -> None:
        self.path = path
        self.commands = commands
        self._private = PrivateListener(path, what="control socket", backlog=BACKLOG,
                                        nonblocking=True, error=ControlError)
        self._listener: socket.socket | None = None
        self._connections: dict[int, _Connection] = {}
        self._selector: selectors.BaseSelector | None = None
        # Out of descriptors: the listener stays readable while accept() fails, so it is
        # not watched until then (else the loop would spin on it).
        self._paused_until: float | None = None
        self._warnings = Throttle(WARNING_INTERVAL)

    # -- lifecycle -------------------------------------------------------------------

    def open(self, handed: dict[str, int] | None = None) -> None:
        """Listen at ``path``; replace a stale socket file left there by a dead master.
        ``handed``: the listener a re-executed master kept (:meth:`handed`), with the
        requests queued in it meanwhile.

        Raises ``RuntimeDirError`` for an unsafe directory and :class:`ControlError` when
        the socket cannot be created (path too long, not a socket in the way, ...).
        """
        if self._listener is not None:
            return
        self._listener = (self._private.open() if handed is None
                          else self._private.adopt(handed))
        if self._selector is not None:
            self._selector.register(self._listener.fileno(), selectors.EVENT_READ, self)

    def close(self) -> None:
        """Close every socket and remove the socket file, unless it is no longer ours.
        Warnings still held back are logged now."""
        for fd in list(self._connections):
            self._drop(fd)
        self._log_held_back(float("inf"))
        if self._listener is None:
            return
        self._unwatch(self._listener.fileno())
        self._private.close()
        self._listener = None

    def handed(self) -> dict[str, int] | None:
        """The listener, kept across the master's re-exec (prefork.reload); connections
        being read are dropped (their clients see EOF and may ask again)."""
        return self._private.handed()

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
        connection still being read. The list changes after ``handle()`` and ``due()``."""
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
        if (held := self._warnings.next_deadline()) is not None:
            deadlines.append(held)
        return min(deadlines, default=None)

    def due(self, now: float) -> tuple[()]:
        """Drop every client whose deadline is at or before ``now``; watch the listener
        again once a pause for want of descriptors is over; log how many warnings were
        held back, when their time comes. Nothing for the master to do (the loop's
        :class:`prefork.watches.Watch` interface)."""
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._selector is not None and self._listener is not None:
                self._selector.register(self._listener.fileno(), selectors.EVENT_READ, self)
        for fd, connection in list(self._connections.items()):
            if connection.deadline <= now:
                log.debug("control: dropped a client (pid %d) that sent no whole request "
                          "within %gs", connection.peer.pid, READ_TIMEOUT)
                self._drop(fd)
        self._log_held_back(now)
        return ()

    def handle(self, fd: int) -> None:
        """``fd`` is readable: accept new clients, or read (and maybe answer) one.

        Never blocks, except to write a reply, for ``WRITE_TIMEOUT`` at most. An ``fd``
        that is not (or no longer) ours is ignored. Never raises: a failure while serving
        one connection is logged and drops that connection.
        """
        if self._listener is not None and fd == self._listener.fileno():
            self._accept()
        elif (connection := self._connections.get(fd)) is not None:
            try:
                self._read(fd)
            except Exception:
                self._failed(connection.sock)

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
                self._admit(sock)
            except Exception:
                self._failed(sock)

    def _admit(self, sock: socket.socket) -> None:
        """Keep a new connection if its peer may talk to us and there is room."""
        try:
            peer = peer_of(sock)
        except OSError:
            sock.close()
            return
        if peer.uid not in (os.getuid(), 0):
            allowed = "root" if os.getuid() == 0 else f"uid {os.getuid()} and root"
            self._warn("uid", "refused a connection from uid %d (pid %d): only %s may "
                       "control this master", peer.uid, peer.pid, allowed)
            sock.close()
            return
        if len(self._connections) >= MAX_CONNECTIONS:
            self._warn("busy", "%d clients already connected; refused pid %d",
                       MAX_CONNECTIONS, peer.pid)
            sock.close()
            return
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
            self._warn("large", "dropped a request over %d bytes from pid %d", MAX_REQUEST,
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
            # Decoded here: given bytes, json.loads would guess UTF-16 or -32 from NULs.
            request = json.loads(line.decode())
        except RecursionError:
            return {"error": "request is not JSON this master reads: it nests too deeply"}
        except MemoryError:  # the master is short of memory: refuse, and let it go on
            return {"error": "request is not JSON this master reads: out of memory"}
        except ValueError as exc:  # UnicodeDecodeError too; and ints over 4300 digits
            return {"error": f"request is not JSON: {one_line(str(exc))[:200]}"}
        try:
            problem = self.check(request)
        except Exception as exc:
            log.exception("control: checking a request failed")
            return {"error": f"internal error: {type(exc).__name__}: {one_line(str(exc))}"}
        if problem is not None:
            return {"error": problem}
        try:
            reply = self.commands[request["command"]].run(request)
        except Exception as exc:
            log.exception("control: the %s handler failed", request["command"])
            return {"error": f"internal error: {type(exc).__name__}: {one_line(str(exc))}"}
        if not isinstance(reply, dict):
            log.error("control: the %s handler returned a %s, not a dict", request["command"],
                      type(reply).__name__)
            return {"error": "internal error: the master's reply is not an object"}
        return reply

    def check(self, request: object) -> str | None:
        """Why ``request`` is not a valid request (one line), or None if it is."""
        if not isinstance(request, dict):
            return "a request must be a JSON object"
        command = request.get("command")
        if not isinstance(command, str):
            return 'a request needs a "command"'
        if command not in self.commands:
            return (f"unknown command {shown(command)} "
                    f"(known: {', '.join(sorted(self.commands))})")
        check = self.commands[command].check
        return None if check is None else check(request)

    def _reply(self, fd: int, reply: dict[str, Any]) -> None:
        """Write one reply line (blocking, at most WRITE_TIMEOUT) and close the connection."""
        connection = self._connections[fd]
        try:
            data = json.dumps(reply, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        except (TypeError, ValueError, RecursionError) as exc:
            log.error("control: cannot encode the reply: %s", one_line(str(exc)))
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
        with contextlib.suppress(OSError):
            connection.sock.close()

    def _failed(self, sock: socket.socket) -> None:
        """The last line of defence: serving ``sock`` raised what nothing above expected.
        Log it with its traceback (rate-limited) and drop that connection only."""
        if self._warnings.note("failed", time.monotonic()):
            log.exception("control: internal error while serving a client; dropped its "
                          "connection")
        fd = sock.fileno()  # -1 once closed
        connection = self._connections.get(fd)
        if connection is not None and connection.sock is sock:
            self._drop(fd)
        else:
            with contextlib.suppress(OSError):
                sock.close()

    def _log_held_back(self, now: float) -> None:
        for kind, count in self._warnings.due(now):
            log.warning("control: %s", _HELD_BACK[kind].format(count=count))

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """Log a warning a client can cause at will, unless ``kind`` is being held back."""
        count = self._warnings.note(kind, time.monotonic())
        if count:
            more = f" ({count - 1} more since the last line)" if count > 1 else ""
            log.warning("control: " + message + "%s", *args, more)

    def _unwatch(self, fd: int) -> None:
        if self._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)


_HELD_BACK = {  # the line for warnings held back by the Throttle, by kind
    "uid": "refused {count} more connection(s) from other uids",
    "busy": f"refused {{count}} more connection(s): {MAX_CONNECTIONS} clients already connected",
    "large": f"dropped {{count}} more request(s) over {MAX_REQUEST} bytes",
    "failed": "{count} more internal error(s) while serving clients; connections dropped",
}


def one_line(text: str) -> str:
    """``text`` on one line, its runs of whitespace (newlines too) made single spaces."""
    return " ".join(text.split())
