"""Each worker's stdout and stderr as a journal stream of its own, named after the worker.

Under systemd a unit's stdout and stderr are usually one stream to journald, and every line
on it carries the unit's identifier (the executable's name: ``python3``). Workers inherit
it, so ``journalctl -t NAME`` could not pick out one worker. When a descriptor of the
master's is the journal's stream, each forked child connects a stream of its own in its
place, with the worker's name as identifier.

Whether that applies is decided once, in the master, by :func:`for_workers`: systemd sets
``$JOURNAL_STREAM`` to ``DEV:INODE`` of the stream it connected (systemd.exec(5)), and a
descriptor is that stream only if its ``fstat()`` has that device and inode (the variable
alone may be inherited from an ancestor whose output was redirected). A master not under
journald gets ``None`` and its fork path does nothing more.

The protocol is journald's stdout stream protocol, as ``sd_journal_stream_fd(3)`` speaks it
(systemd ``src/libsystemd/sd-journal/journal-send.c`` writes the header;
``src/journal/journald-stream.c``, ``stdout_stream_line()``, reads it one state per line):
connect an ``AF_UNIX`` ``SOCK_STREAM`` socket to ``/run/systemd/journal/stdout``, shut down
its reading side, and send seven newline-terminated lines - the identifier
(``SYSLOG_IDENTIFIER=``), the unit id (honoured from root only; empty), the priority of a
line without a prefix (0-7), level prefix (1: a line starting ``<N>`` has priority N), and
forward to syslog, to kmsg, to the console (0 each: journald's own settings decide). What
follows is log lines. journald takes ``_PID``, ``_UID`` and the unit from the peer's
credentials, so the worker itself connects, after the fork.

What was decided, and why:

- identifier: the worker's name, not its replica's label: ``journalctl -t clusterer``
  shows every replica of ``clusterer``; ``_PID`` tells them apart (the master logs which
  pid each replica has).
- one stream per worker, on both its stdout and stderr, at priority 6 (info) with level
  prefixes: what systemd itself gives a unit (``StandardError=inherit`` shares the stream,
  ``SyslogLevel=info``, ``SyslogLevelPrefix=yes``). Python's ``logging`` writes every
  level to stderr by default, so stderr at priority 3 would make every INFO line an
  error; one stream also keeps stdout's and stderr's lines in the order they were written.
  A worker that wants levels prefixes its lines ``<3>`` etc.
- only the descriptors that are the journal's stream in the master are replaced: a unit
  with ``StandardOutput=null`` or ``file:`` keeps its workers' stdout there.
- in the worker ``$JOURNAL_STREAM`` then names its own stream, so code that checks it (as
  systemd.exec(5) says to) still finds its stderr is the journal.
- a journal that cannot be reached (gone, refusing): one warning line, and the worker
  starts with the descriptors it inherited. A worker never fails to start for its log.

Cost: in the child only (the master's fork path passes one attribute), 47 us a start for
connect, header and ``dup2`` to a local server (2-core VM, Python 3.11, median of 500).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("prefork")

# journald's stdout socket. A module attribute, not an environment variable, so nothing
# outside the program can point workers' output elsewhere; tests set it (before the master
# is made) to a server of their own.
STDOUT_SOCKET = "/run/systemd/journal/stdout"

PRIORITY_INFO = 6
LEVEL_PREFIX = True
SEND_BUFFER = 8 * 1024 * 1024  # as sd_journal_stream_fd asks for; the kernel may give less


def header(identifier: str, priority: int = PRIORITY_INFO, level_prefix: bool = LEVEL_PREFIX
           ) -> bytes:
    """The seven lines that open a stdout stream to journald (see the module's docstring).
    ``identifier`` has no newline (worker names cannot), ``priority`` is 0-7."""
    return f"{identifier}\n\n{priority}\n{int(level_prefix)}\n0\n0\n0\n".encode()


def stream_identity(value: str) -> tuple[int, int] | None:
    """``$JOURNAL_STREAM``'s ``DEV:INODE`` as two integers, or ``None`` if it is not that."""
    dev, sep, ino = value.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return None
    return int(dev), int(ino)


@dataclass(frozen=True)
class JournalStreams:
    """What a forked child needs to give its worker a stream of its own: which of its
    descriptors (1, 2) to replace, and the socket to connect to."""

    fds: tuple[int, ...]
    socket_path: str

    def connect(self, identifier: str, label: str) -> bool:
        """In the child, before the worker's code: connect a stream named ``identifier``
        and make it the child's ``fds``; the caller has flushed Python's stdio, whose
        buffers belong to the old descriptors. True if done; on failure one warning line
        (naming ``label``) goes to the inherited stderr, the descriptors stay as they were,
        and False is returned."""
        try:
            stream = _open_stream(self.socket_path, header(identifier))
        except OSError as exc:
            log.warning("worker %s: no journal stream of its own (%s: %s); its output goes "
                        "to the master's", label, self.socket_path,
                        exc.strerror or type(exc).__name__)
            return False
        with stream:
            for fd in self.fds:
                os.dup2(stream.fileno(), fd)  # inheritable: the worker's children share it
            st = os.fstat(stream.fileno())
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        return True


def for_workers(environ: Mapping[str, str] | None = None) -> JournalStreams | None:
    """Decided once, in the master: which of its stdout and stderr are the journal's stream
    named by ``$JOURNAL_STREAM``, as :class:`JournalStreams` for the children; ``None`` when
    neither is (not under journald, or the output was redirected)."""
    env = os.environ if environ is None else environ
    identity = stream_identity(env.get("JOURNAL_STREAM", ""))
    if identity is None:
        return None
    fds = tuple(fd for fd in (1, 2) if _identity_of(fd) == identity)
    return JournalStreams(fds, STDOUT_SOCKET) if fds else None


def _identity_of(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _open_stream(path: str, opening: bytes) -> socket.socket:
    """A blocking stream socket to ``path``, write-only, its header sent (blocking as
    ``sd_journal_stream_fd`` is: a non-blocking one would make the worker's writes fail)."""
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stream.connect(path)
        stream.shutdown(socket.SHUT_RD)
        try:
            if stream.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
                stream.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        except OSError:
            pass  # a smaller buffer only means a worker's burst waits sooner
        stream.sendall(opening)
    except BaseException:
        stream.close()
        raise
    return stream

