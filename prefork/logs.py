"""Logging for the master and its children: one line per event on stderr.

prefork logs through its own logger, ``prefork``, and the ``prefork`` command gives it its
own handler and stops its records from reaching the root logger. The root logger and
every other logger belong to the application: prefork never adds a handler to them or
changes their level, so a floor that sets up logging at import (``basicConfig``,
``dictConfig``, its own handlers on root) prints its own lines once, in its own format,
and prefork's lines appear once, in prefork's. Used as a library (``Master`` without the
CLI), prefork's records go to root like any library's.
"""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
LOGGER = "prefork"


class _PreforkHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler :func:`configure` adds, told apart from any the application adds."""


def configure(level: str) -> None:
    """Send the ``prefork`` logger's records at ``level`` and above to stderr, through
    prefork's own handler only. Idempotent."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level.upper())
    logger.propagate = False
    if any(isinstance(h, _PreforkHandler) for h in logger.handlers):
        return
    handler = _PreforkHandler(sys.stderr)
    handler.setFormatter(line_formatter())
    logger.addHandler(handler)


def line_formatter() -> logging.Formatter:
    """prefork's line format, for an application whose workers' lines should look like the
    master's (the bundled fleets use it on their own logger). Under journald
    (``$JOURNAL_STREAM`` set) the timestamp is left to the journal."""
    if os.environ.get("JOURNAL_STREAM"):
        return logging.Formatter("[%(process)d] %(levelname)s %(message)s")
    return logging.Formatter("%(asctime)s.%(msecs)03d [%(process)d] %(levelname)s %(message)s",
                             "%Y-%m-%d %H:%M:%S")


def reclaim() -> None:
    """Undo what an application's ``dictConfig``/``fileConfig`` did to prefork's logger
    without meaning to: by default (``disable_existing_loggers=True``) they disable every
    logger that exists and is not named in their configuration, prefork's included, which
    would silence the master. Call after the floor is imported. A configuration that names
    the ``prefork`` logger (and so replaced prefork's handler) is the application's choice
    and is left as it is.
    """
    logger = logging.getLogger(LOGGER)
    if logger.disabled and any(isinstance(h, _PreforkHandler) for h in logger.handlers):
        logger.disabled = False
