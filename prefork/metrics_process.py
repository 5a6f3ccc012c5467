"""The master's side of ``--metrics``: the listening socket, and the exporter process it
starts and keeps running (:mod:`prefork.metrics` is the exporter itself).

The master binds ``HOST:PORT`` itself, before any fork, so a port in use is one line and
exit 2 at start, and hands the listening socket to the exporter: a restarted exporter
takes over the same socket, and scrapes wait in its backlog meanwhile. The exporter is
``python -m prefork metrics`` started with ``posix_spawn`` (no floor, no fork of the
master's memory), in a process group of its own, killed by ``PR_SET_PDEATHSIG`` if the
master dies. When it exits the master starts it again on the fleet's backoff; when no
worker is left it is stopped with the rest. Nothing here imports ``prometheus_client``:
the master never needs it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefork import logs
from prefork.fleet import Backoff
from prefork.policy import ExitStatus, backoff_delay, is_stable_run

log = logging.getLogger("prefork")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_INTERVAL = 15.0  # seconds between two writes of the textfile
BACKLOG = 64


class MetricsError(Exception):
    """``--metrics`` cannot be set up as asked. ``str()`` is one line for the user."""


@dataclass(frozen=True)
class MetricsOptions:
    """Where the fleet's metrics go: ``listen`` (host, port) for ``/metrics`` (port 0: any
    free port, which the log names), ``textfile`` for node_exporter, written every
    ``interval`` seconds."""

    listen: tuple[str, int] | None = None
    textfile: Path | None = None
    interval: float = DEFAULT_INTERVAL


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` or ``PORT`` as (host, port); the host is
    127.0.0.1 unless given. Raises ValueError with one line."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = "", text
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT (a port from 0 to 65535)")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r} is not HOST:PORT (whitespace in the host)")
    return host or DEFAULT_HOST, int(port_text)


def check_textfile(path: Path) -> None:
    """Raise MetricsError unless ``path`` is a ``.prom`` file in a writable directory."""
    if path.suffix != ".prom":
        raise MetricsError(f"--metrics-textfile {path}: the name must end in .prom "
                           "(node_exporter's textfile collector reads only those)")
    if not path.parent.is_dir():
        raise MetricsError(f"--metrics-textfile {path}: {path.parent} is not a directory")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise MetricsError(f"--metrics-textfile {path}: {path.parent} is not writable")
    if path.is_dir():
        raise MetricsError(f"--metrics-textfile {path} is a directory")


def resolve(host: str, port: int) -> tuple[int, int, int, tuple[Any, ...]]:
    """(family, type, proto, address) to bind for ``host:port``; MetricsError (one line)
    for a host that does not resolve."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (OSError, UnicodeError) as exc:
        raise MetricsError(f"--metrics {_where(host, port)}: cannot resolve the host: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None
    return family, kind, proto, address


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``; MetricsError (one line) if it cannot be."""
    where = _where(host, port)
    family, kind, proto, address = resolve(host, port)
    listener = None
    try:  # socket() too: a sandbox may deny the address family (EAFNOSUPPORT, EPERM)
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(BACKLOG)
    except OSError as exc:
        if listener is not None:
            listener.close()
        raise MetricsError(f"--metrics {where}: cannot listen there: "
                           f"{exc.strerror or exc}") from None
    return listener


def listen_url(listener: socket.socket) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class ExporterProcess:
    """The exporter the master keeps running: a watch of the master's loop (its restart
    is its deadline). Lifecycle: ``open()`` before the first fork (binds the socket),
    ``start()`` once the workers are forked, ``exited()`` for its pid when reaped,
    ``stop()`` when no worker is left, ``close()`` at the end."""

    def __init__(self, options: MetricsOptions, *, fleet: str, runtime_dir: Path,
                 backoff: Backoff) -> None:
        self.options = options
        self.fleet = fleet
        self.runtime_dir = runtime_dir
        self.backoff = backoff
        self.pid: int | None = None
        self._listener: socket.socket | None = None
        self._started_at = 0.0
        self._attempt = 0
        self._due: float | None = None
        self._retired = False

    def open(self) -> None:
        """Bind the listening socket (MetricsError if it cannot be)."""
        if self.options.listen is not None and self._listener is None:
            self._listener = bind_listener(*self.options.listen)
            self._listener.set_inheritable(True)  # the exporter's; every worker closes it
            log.info("metrics on %s", listen_url(self._listener))

    def handed(self) -> dict[str, object]:
        """The listening socket and the running exporter, for the master's re-exec
        (prefork.reload): the exporter goes on serving, a child of the same pid."""
        return {"listen_fd": None if self._listener is None else self._listener.fileno(),
                "pid": self.pid}

    def adopt(self, handed: dict[str, object], now: float) -> None:
        fd, pid = handed["listen_fd"], handed["pid"]
        if isinstance(fd, int):
            self._listener = socket.socket(fileno=fd)
            self._listener.set_inheritable(True)  # the exporter's; every worker closes it
        self.pid = pid if isinstance(pid, int) else None
        self._started_at = now

    def fds(self) -> list[int]:
        """What a forked worker closes."""
        return [] if self._listener is None else [self._listener.fileno()]

    def owns(self, pid: int) -> bool:
        return pid == self.pid

    def start(self, now: float) -> None:
        """Spawn the exporter; a failure to spawn is logged and retried on the backoff."""
        self._due = None
        if self._retired:
            return
        try:
            self.pid = os.posix_spawn(sys.executable, self._argv(), os.environ,
                                      setpgroup=0, setsigmask=(),
                                      setsigdef=signal.valid_signals() - {signal.SIGKILL,
                                                                         signal.SIGSTOP})
        except OSError as exc:
            log.error("metrics exporter: cannot start %s: %s", sys.executable, exc)
            self._schedule(now, 0.0)
            return
        self._started_at = now
        log.info("metrics exporter started (pid %d)", self.pid)

    def exited(self, status: ExitStatus, now: float) -> None:
        """Its process was reaped: start another on the backoff, unless it was stopped."""
        self.pid = None
        if self._retired:
            log.log(logging.WARNING if status.failed else logging.DEBUG,
                    "metrics exporter stopped: %s", status.describe())
            return
        log.warning("metrics exporter exited: %s", status.describe())
        self._schedule(now, now - self._started_at)

    def send(self, signum: int) -> None:
        """Pass a signal on to a running exporter (SIGUSR1: reopen its log file)."""
        if self.pid is not None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        """No restarts from now on; SIGTERM to a running exporter, once: the master calls
        this at every turn of its loop once no worker is left, and a second SIGTERM would
        cut the exporter's last textfile write short."""
        if self._retired:
            return
        self._retired, self._due = True, None
        self.send(signal.SIGTERM)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- a watch of the master's loop ---------------------------------------------------

    def next_deadline(self) -> float | None:
        return self._due

    def due(self, now: float) -> tuple[()]:
        if self._due is not None and now >= self._due:
            self.start(now)
        return ()

    # -- helpers ------------------------------------------------------------------------

    def _schedule(self, now: float, uptime: float) -> None:
        if is_stable_run(uptime, self.backoff):
            self._attempt = 0
        self._attempt += 1
        delay = backoff_delay(self._attempt, self.backoff, 0.5)
        self._due = now + delay
        log.info("metrics exporter: restart %d in %.3fs", self._attempt, delay)

    def _argv(self) -> list[str]:
        level, log_file = logs.settings()  # it logs as the master does
        argv = [sys.executable, "-m", "prefork", "metrics", "--fleet", self.fleet,
                "--runtime-dir", str(self.runtime_dir), "--parent", str(os.getpid()),
                "--interval", repr(self.options.interval), "--log-level", level]
        if self._listener is not None:
            argv += ["--listen-fd", str(self._listener.fileno())]
        if self.options.textfile is not None:
            argv += ["--textfile", str(self.options.textfile)]
        if log_file is not None:
            argv += ["--log-file", log_file]
        return argv
