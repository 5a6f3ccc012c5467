"""A fleet of plain functions: its master must not import what only async workers, named
fleets or memory limits need."""

from __future__ import annotations

import signal
import sys

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker

HEAVY = ("asyncio", "importlib.metadata", "concurrent.futures")


def report_modules(fleet: Fleet) -> None:
    emit("master-modules", present=[m for m in HEAVY if m in sys.modules])


def worker() -> None:
    emit("up", sigurg=repr(signal.getsignal(signal.SIGURG)))  # the import report's handler?
    idle_forever()


fleet = Fleet("lean", [Worker("w", worker)], on_starting=report_modules)
