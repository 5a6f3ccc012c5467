"""Workers a group cannot host, for ``test_groups``' validation errors: never run."""

from __future__ import annotations

from fleets.common import idle_forever
from prefork import Fleet, Worker


async def idle() -> None:
    raise AssertionError("a fleet with an invalid group must never run a worker")


fleet = Fleet("group-errors", [
    Worker("a", idle),
    Worker("b", idle),
    Worker("blocking", idle_forever),
    Worker("twin", idle, replicas=2),
    Worker("scalable", idle, max_replicas=3),
    Worker("envy", idle, env={"X": "1"}),
    Worker("niced", idle, nice=5),
    Worker("late", idle, after=["b"]),
    Worker("hungry", idle, max_private_memory=1 << 30),
    Worker("old", idle, max_age=60.0),
])

# Invalid groups as the fleet's own default.
unknown_default = Fleet("unknown-default", [Worker("a", idle)], groups={"g": ["nope"]})
