"""A floor that starts a thread at import, as a metrics exporter or a pool does: the
master then has a second thread when it forks. ``--fleet fleets.threaded:fleet``."""

from __future__ import annotations

import sys
import threading

from fleets.basic import FAST, sleeper
from fleets.common import bump, emit, idle_forever
from prefork import Fleet, StartLimit, Worker

THREAD_NAME = "metrics-flusher"

_stop = threading.Event()  # never set: the thread waits as long as the process lives


def flush_forever() -> None:
    _stop.wait()


threading.Thread(target=flush_forever, name=THREAD_NAME, daemon=True).start()


def crash_once() -> None:
    """The first start exits 1 (so the master forks it again), the next ones idle."""
    attempt = bump("crash_once")
    emit("up", attempt=attempt)
    if attempt == 1:
        sys.exit(1)
    idle_forever()


fleet = Fleet("threaded", [Worker("sleeper", sleeper, replicas=3),
                           Worker("crashy", crash_once)],
              backoff=FAST, start_limit=StartLimit(interval=0))
