"""A floor like a real application's: a well-known library, and logging set up at import.

``APP_LOGGING`` picks how the application configures logging, as applications do:
``basic`` (``logging.basicConfig``), ``handler`` (its own handler on the root logger) or
``dictconfig`` (``logging.config.dictConfig``, which by default disables every logger that
already exists - prefork's included). Each sets root to WARNING in its own format,
``APP <logger> <level> <message>``. ``APP_SIGUSR2=1``: the application handles SIGUSR2
itself (a debug dump, say) and must keep that handler under prefork.
"""

from __future__ import annotations

import logging
import logging.config
import os
import signal
import sys

import sqlalchemy  # noqa: F401  (a real floor's weight: other people's modules)

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker

APP_FORMAT = "APP %(name)s %(levelname)s %(message)s"

_how = os.environ.get("APP_LOGGING", "basic")
if _how == "basic":
    logging.basicConfig(format=APP_FORMAT, level=logging.WARNING)
elif _how == "handler":
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(logging.Formatter(APP_FORMAT))
    logging.getLogger().addHandler(_handler)
    logging.getLogger().setLevel(logging.WARNING)
elif _how == "dictconfig":
    logging.config.dictConfig({
        "version": 1,
        "formatters": {"app": {"format": APP_FORMAT}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "app",
                                "stream": "ext://sys.stderr"}},
        "root": {"level": "WARNING", "handlers": ["stderr"]},
    })
else:
    raise ValueError(f"APP_LOGGING={_how!r}")

log = logging.getLogger("app")
log.warning("floor imported")


def _on_usr2(signum: int, _frame: object) -> None:
    emit("usr2", signal=signum)


if os.environ.get("APP_SIGUSR2") == "1":
    signal.signal(signal.SIGUSR2, _on_usr2)


def chatty() -> None:
    """Logs through the application's logging, once at each level."""
    log.info("info from the worker: root is at WARNING, so never shown")
    log.warning("hello from the worker")
    emit("up")
    idle_forever()


def polite() -> None:
    """Ends on SIGTERM with exit 0 after saying so: a stop that came with its grace."""
    def on_term(signum: int, _frame: object) -> None:
        emit("term", signal=signum)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    emit("up")
    idle_forever()


app = Fleet("app", [Worker("chatty", chatty)])
politeness = Fleet("politeness", [Worker("polite", polite, replicas=2)])
