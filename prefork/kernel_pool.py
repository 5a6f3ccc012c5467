"""The fleet's kernel pool: N processes forked from the floor that run kernels for workers.

The master listens on ``<runtime dir>/<fleet>.kernels`` (0600, in the private runtime
directory, :mod:`prefork.unix_listener`) before its first fork, and adds the pool to the
fleet as one more worker, :data:`POOL_WORKER`, with N replicas: forked from the master
like every worker, so the kernels' code and data are the floor's pages, shared
copy-on-write, and supervised like every worker (restart on backoff, start limit,
``max_private_memory`` recycling, rolling restart, status, titles).

Every kernel process inherits the one listening socket and accepts from it. The socket's
accept queue is the pool's queue: a call (:func:`prefork.offload.run_kernel`, from any
worker of the fleet) connects and waits there until a kernel process is free, so the
queue outlives a kernel process that dies, and a restarted one takes the next call.

One call per connection: the kernel process sends its pid, reads the request (a pickle of
the function, by reference, and its arguments), runs it and answers with the pickled
result or exception. Only our own uid (and root) may call: the file's mode, and
``SO_PEERCRED`` on every connection, since what it sends is unpickled.

SIGTERM (or SIGINT) lets a kernel process finish the kernel it runs and answer; then it
exits 0. An idle one exits at once. Once every kernel process has failed (its start
limit), the master closes the socket: calls then fail at once instead of waiting.

After each call a kernel process gives the heap the call freed back to the kernel
(``malloc_trim``): a kernel's input and result come and go, and glibc would otherwise keep
their pages. Measured on the cpu fleet's catch-up (300,000 observations): a kernel
process held 16 MiB private without it, 5 MiB with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import pickle
import select
import signal
import socket
import struct
import traceback
from collections.abc import Sequence
from pathlib import Path

from prefork.control import peer_of
from prefork.fleet import POOL_WORKER, Fleet, Worker
from prefork.slot import Slot
from prefork.states import WorkerState
from prefork.unix_listener import ListenerError, PrivateListener

log = logging.getLogger("prefork")

IO_TIMEOUT = 30.0  # seconds a caller has to send its request, and to take the answer

# Wire format. Request: length (8 bytes) and the pickle of (function, args). Answer: the
# kernel process's pid (4 bytes) at once; then whether it ran (1 byte), the length (8
# bytes) and the pickle of the result, or of (exception or None, its traceback as text).
PID = struct.Struct("!i")
LENGTH = struct.Struct("!Q")
ANSWER = struct.Struct("!BQ")
RAN, RAISED = 0, 1

# The pool's socket path and the master's pid, set in the master before its first fork.
_address: tuple[str, int] | None = None


def address() -> str | None:
    """The pool's socket path in a worker of a fleet that has a kernel pool, else None:
    in the master too, whose warm-up runs before any kernel process exists."""
    if _address is None or _address[1] == os.getpid():
        return None
    return _address[0]


class KernelPool:
    """The master's side: ``open()`` before the first fork, then every kernel process runs
    ``serve()`` (the pool worker's target); ``close()`` at the end."""

    def __init__(self, runtime_dir: Path, fleet: str, processes: int) -> None:
        self.processes = processes
        self._slots: list[Slot] = []
        self._private = PrivateListener(runtime_dir / f"{fleet}.kernels", what="kernel pool socket",
                                        backlog=socket.SOMAXCONN, nonblocking=True,
                                        error=ListenerError)

    def with_pool(self, fleet: Fleet) -> Fleet:
        """``fleet`` with the pool's processes as its last worker, :data:`POOL_WORKER`."""
        # "always": a kernel process that exits 0 (SIGTERM from outside) is still needed.
        pool = Worker(POOL_WORKER, self.serve, replicas=self.processes, restart="always")
        return dataclasses.replace(fleet, workers=(*fleet.workers, pool))

    def watch(self, slots: Sequence[Slot]) -> None:
        """Watch the pool's ``slots`` (a :class:`prefork.watches.Watch` in the master's
        loop): once every one has failed, close the socket, so that a call fails with an
        error instead of waiting in a queue nobody will serve."""
        self._slots = [slot for slot in slots if slot.worker.name == POOL_WORKER]

    def next_deadline(self) -> None:
        return None  # only a slot's exit, an event, can make it due

    def due(self, now: float) -> tuple[()]:
        if self._private.socket is not None and self._slots and all(
                slot.state is WorkerState.FAILED for slot in self._slots):
            log.error("kernel pool: every kernel process has failed; its socket is closed, "
                      "so run_kernel calls fail instead of waiting")
            self.close()
        return ()

    def open(self, handed: dict[str, int] | None = None) -> None:
        """Listen; ``handed``: the socket a re-executed master kept (prefork.reload),
        whose queue the running kernel processes go on serving."""
        global _address
        if handed is None:
            self._private.open()
        else:
            self._private.adopt(handed)
        _address = (str(self._private.path), os.getpid())

    def close(self) -> None:
        global _address
        self._private.close()
        _address = None

    def handed(self) -> dict[str, int] | None:
        return self._private.handed()

    def fds(self) -> list[int]:
        """The listening socket: what every child but a kernel process closes."""
        sock = self._private.socket
        return [] if sock is None else [sock.fileno()]

    def serve(self) -> None:
        """A kernel process's loop: take calls from the shared socket, one at a time,
        until SIGTERM or SIGINT."""
        listener = self._private.socket
        assert listener is not None
        stopping: list[int] = []
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)

        def stop(signum: int, _frame: object) -> None:
            stopping.append(signum)

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, stop)
        while not stopping:
            # The listener is non-blocking (its flags are the master's): every idle kernel
            # process wakes for a call and one accept() wins; the others go back to wait.
            readable, _, _ = select.select([listener, wake_r], [], [])
            if wake_r in readable:
                os.read(wake_r, 64)
                continue
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            with conn:
                _serve_one(conn)
            _malloc_trim(0)


# Resolved in the master, like prefork.prctl's: not once per kernel process.
_malloc_trim = ctypes.CDLL(None).malloc_trim
_malloc_trim.argtypes = [ctypes.c_size_t]
_malloc_trim.restype = ctypes.c_int


def _serve_one(conn: socket.socket) -> None:
    """Answer one call; a caller that breaks off or is not ours costs only its call."""
    conn.setblocking(True)
    conn.settimeout(IO_TIMEOUT)
    try:
        peer = peer_of(conn)
        if peer.uid not in (os.getuid(), 0):
            log.warning("kernel pool: refused a call from pid %d (uid %d)", peer.pid, peer.uid)
            return
        conn.sendall(PID.pack(os.getpid()))
        (length,) = LENGTH.unpack(_receive(conn, LENGTH.size))
        kind, body = _answer(_receive(conn, length))
        conn.sendall(ANSWER.pack(kind, len(body)))
        conn.sendall(body)  # apart: a header joined to it would copy the whole answer
    except (OSError, EOFError) as exc:  # the caller went away, or timed out
        log.debug("kernel pool: a call broke off: %s", exc)


def _answer(request: bytearray) -> tuple[int, bytes]:
    """Run the call ``request`` holds: whether it ran, and the pickled result (or
    exception). The request's bytes are dropped before the kernel runs."""
    try:
        fn, args = pickle.loads(request)
        request.clear()
        body = pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)
        return RAN, body
    except Exception as exc:
        return RAISED, _pickled_exception(exc)


def _pickled_exception(exc: Exception) -> bytes:
    """The exception and its traceback as text; an exception that cannot be pickled (or
    unpickled: the caller's loads() reruns its constructor) goes as its text alone."""
    text = "".join(traceback.format_exception(exc))
    try:
        body = pickle.dumps((exc, text), protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(body)
        return body
    except Exception:
        return pickle.dumps((None, text), protocol=pickle.HIGHEST_PROTOCOL)


def _receive(conn: socket.socket, size: int) -> bytearray:
    """Exactly ``size`` bytes, read into one buffer (no chunks joined: no second copy).
    Grown as the bytes come, so a length a client announces but never sends costs
    nothing."""
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(min(size - len(data), 1 << 20))
        if not chunk:
            raise EOFError(f"the caller closed after {len(data)} of {size} bytes")
        data += chunk
    return data
