"""A fleet whose floor is prefork alone and whose four workers import an ORM with 26
tables (SQLModel, SQLAlchemy, pydantic: the cpu fleet's models) only after the fork, as
an application that imports its framework lazily does. For measuring --learn-floor."""

from __future__ import annotations

import importlib
import signal
from collections.abc import Callable

from prefork import Fleet, Worker

LAZY = ("prefork_workers.cpu.models", "sqlalchemy.dialects.sqlite", "email.mime.text",
        "http.cookiejar", "xml.dom.minidom")


def _lazy(name: str) -> Callable[[], None]:
    def run() -> None:
        for module in LAZY:
            importlib.import_module(module)
        while True:
            signal.pause()

    run.__name__ = name
    return run


fleet = Fleet("lazy-heavy", [Worker(f"w{i}", _lazy(f"w{i}")) for i in range(4)])
