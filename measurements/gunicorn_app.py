"""The peer ``make measure`` runs beside prefork: gunicorn ``--preload`` on the cpu fleet's floor.

Importing this module imports ``prefork_workers.cpu.fleet``, the very module (and so the
very floor: SQLModel, SQLAlchemy, pydantic and 26 tables) that the prefork master imports
for ``--fleet cpu``. With ``--preload`` gunicorn imports it once in its master and forks
its workers from there, so the two are compared on the same floor and the same count.
The app itself is trivial: the measurement is of idle workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import prefork_workers.cpu.fleet  # noqa: F401 - the floor, as the prefork master imports it

BODY = b"ok\n"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A WSGI app that answers every request with ``ok``."""
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
