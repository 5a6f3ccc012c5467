"""The systemd notify protocol (sd_notify(3)), for a master run as a ``Type=notify`` unit.

A notification is one datagram of ``KEY=VALUE`` lines sent to the ``AF_UNIX`` socket named
by ``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace). The master sends
``READY=1`` once every worker is forked, ``STATUS=...`` whenever its one-line summary
changes, ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` (the first one at once, so a slow
start never looks like a hang), and ``STOPPING=1`` when it begins to stop.

Notifying is best effort: a socket that is gone or full drops the message, never the
master. Ten lines do not need a library.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("prefork")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class Notifier:
    """Sends notifications to systemd; ``watchdog_interval`` is ``None`` without a watchdog."""

    def __init__(self, address: str, watchdog_interval: float | None = None) -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = watchdog_interval
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                                     | socket.SOCK_NONBLOCK)
        self._warned = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None,
                         pid: int | None = None) -> Notifier | None:
        """A notifier for ``$NOTIFY_SOCKET``, or ``None`` when not started by systemd.

        Removes the variables (as sd_notify's ``unset_environment`` does) so the workers,
        which are not the unit's main process, do not inherit them. The watchdog applies
        only if ``$WATCHDOG_PID`` is unset or names this process.
        """
        env = os.environ if environ is None else environ
        values = {name: env.pop(name, "") for name in _VARIABLES}
        if not values["NOTIFY_SOCKET"]:
            return None
        interval = None
        watchdog_pid = values["WATCHDOG_PID"]
        if values["WATCHDOG_USEC"].isdigit() and int(values["WATCHDOG_USEC"]) > 0 and (
                not watchdog_pid or watchdog_pid == str(os.getpid() if pid is None else pid)):
            interval = int(values["WATCHDOG_USEC"]) / 1_000_000
        return cls(values["NOTIFY_SOCKET"], interval)

    def send(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one datagram."""
        try:
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:  # systemd gone, or its queue full: drop, never block
            if not self._warned:
                log.warning("systemd notify to %r failed: %s (further failures not logged)",
                            self.address.replace("\0", "@"), exc)
                self._warned = True

    def fileno(self) -> int:
        return self._socket.fileno()

    def close(self) -> None:
        self._socket.close()


class SystemdReporter:
    """What the master tells systemd, as one of its loop's watches: ``READY=1`` with the
    first ``STATUS=`` once every worker is forked, ``STATUS=`` again whenever
    ``summary()`` changes, ``WATCHDOG=1`` every half watchdog interval (the first one at
    once), ``STOPPING=1`` when the fleet begins to stop."""

    def __init__(self, notifier: Notifier, summary: Callable[[], str]) -> None:
        self.notifier = notifier
        self.summary = summary
        self._status = ""  # what STATUS= said last; empty until READY=1
        self._next_ping: float | None = None

    @classmethod
    def from_environment(cls, summary: Callable[[], str]) -> SystemdReporter | None:
        """A reporter if systemd started us (``$NOTIFY_SOCKET``), else None."""
        notifier = Notifier.from_environment()
        return None if notifier is None else cls(notifier, summary)

    def ready(self) -> None:
        self._status = self.summary()
        self.notifier.send("READY=1", f"STATUS={self._status}")

    def stopping(self) -> None:
        self.notifier.send("STOPPING=1")

    def reloading(self) -> None:
        """A reload begins (``Type=notify-reload``); :meth:`ready` says when it ended."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def environment(self) -> dict[str, str]:
        """The variables that made this reporter, for the master's re-exec
        (prefork.reload): the new image reports to the same systemd."""
        env = {"NOTIFY_SOCKET": self.notifier.address.replace("\0", "@", 1)}
        if self.notifier.watchdog_interval is not None:
            env["WATCHDOG_USEC"] = str(round(self.notifier.watchdog_interval * 1_000_000))
            env["WATCHDOG_PID"] = str(os.getpid())
        return env

    def next_deadline(self) -> float | None:
        return self._next_ping

    def due(self, now: float) -> tuple[()]:
        """Ping the watchdog when due; report a changed summary."""
        interval = self.notifier.watchdog_interval
        if interval is not None and (self._next_ping is None or now >= self._next_ping):
            self.notifier.send("WATCHDOG=1")
            self._next_ping = now + interval / 2
        if self._status:  # the first STATUS= goes with READY=1
            status = self.summary()
            if status != self._status:
                self._status = status
                self.notifier.send(f"STATUS={status}")
        return ()

    def fileno(self) -> int:
        return self.notifier.fileno()

    def close(self) -> None:
        self.notifier.close()
