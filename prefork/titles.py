"""Process titles: how ``ps`` and ``top`` show a fleet, built and read back in one place.

    prefork: master [FLEET]
    prefork: worker LABEL [FLEET]     (LABEL: indexer, indexer.1, ...)

``setproctitle`` pads the title with spaces to the length of the original command line,
so :func:`parse` strips before it reads.
"""

from __future__ import annotations

from typing import NamedTuple

_PREFIX = "prefork: "


class Title(NamedTuple):
    role: str  # "master" or "worker"
    fleet: str
    label: str | None  # a worker's label; None for a master


def master(fleet: str) -> str:
    return f"{_PREFIX}master [{fleet}]"


def worker(label: str, fleet: str) -> str:
    return f"{_PREFIX}worker {label} [{fleet}]"


def parse(title: str) -> Title | None:
    """What a title built here says, or None for any other process's command line."""
    text = title.strip()
    if not text.startswith(_PREFIX) or not text.endswith("]") or " [" not in text:
        return None
    head, _, fleet = text[len(_PREFIX):-1].rpartition(" [")
    role, _, label = head.partition(" ")
    if (role == "master" and not label) or (role == "worker" and label):
        return Title(role, fleet, label or None)
    return None
