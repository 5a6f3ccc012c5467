"""A fleet that says who imports it: `prefork status --fleet fleets.announced:fleet` must
find its master without importing it."""

from __future__ import annotations

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker

emit("imported")


def announced_worker() -> None:
    emit("up")
    idle_forever()


fleet = Fleet("announced", [Worker("w", announced_worker)])
