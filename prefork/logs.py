"""Logging for the master and its children: one line per event on stderr."""

from __future__ import annotations

import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")


def configure(level: str) -> None:
    """Send the root logger to stderr at ``level`` unless the program already set it up.

    Under journald (``$JOURNAL_STREAM`` set) the timestamp is left to the journal.
    """
    root = logging.getLogger()
    root.setLevel(level.upper())
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        fmt, datefmt = "[%(process)d] %(levelname)s %(message)s", None
    else:
        fmt = "%(asctime)s.%(msecs)03d [%(process)d] %(levelname)s %(message)s"
        datefmt = "%Y-%m-%d %H:%M:%S"
    handler.setFormatter(logging.Formatter(fmt, datefmt))
    root.addHandler(handler)
