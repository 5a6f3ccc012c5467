"""Idle workers on a floor like a real application's: SQLAlchemy with logging set up at
import (:mod:`fleets.app_floor`), the cpu fleet's SQLModel tables (pydantic), and an HTTP
client. Each worker idles exactly as a ``prefork probe`` child does (the same loop, on a
pipe of its own that never speaks; what it says goes to /dev/null), so that `prefork run`
and the probe can be compared."""

from __future__ import annotations

import http.client  # noqa: F401  (an HTTP client, as a real floor has)
import os

import fleets.app_floor  # noqa: F401  (SQLAlchemy; logging configured at import)
import prefork_workers.cpu.models  # noqa: F401  (SQLModel tables)
from prefork import Fleet, Worker
from prefork.probe_run import serve


def idle_like_a_probe_child() -> None:
    silent, _ = os.pipe()  # its write end stays open, and is never written
    serve(QUIET, silent, os.open(os.devnull, os.O_WRONLY))


QUIET = Worker("quiet", idle_like_a_probe_child, replicas=3)
quiet = Fleet("quiet", [QUIET])
