"""One replica more or fewer of a worker (SIGTTIN/SIGTTOU, ``prefork scale``): decided
here, from the fleet and its slots, and carried out by the master like any watch's
actions. Nothing here forks or signals."""

from __future__ import annotations

from collections.abc import Sequence

from prefork.fleet import Fleet
from prefork.policy import is_scale_delta, next_replica
from prefork.slot import Slot, StopReason, new_slot
from prefork.states import WorkerState
from prefork.watches import Action, Add, Remove, Stop


def replicas(slots: Sequence[Slot], name: str) -> list[Slot]:
    """Worker ``name``'s slots, less one being stopped to be removed."""
    return [s for s in slots
            if s.worker.name == name and s.stopping_for is not StopReason.SCALED_DOWN]


def plan_scale(fleet: Fleet, slots: Sequence[Slot], name: str,
               delta: int) -> tuple[str, list[Action]]:
    """What scaling worker ``name`` by ``delta`` (+1 or -1) takes, and the line that says
    so. Raises ValueError (one line) when it cannot be done."""
    worker = next((w for w in fleet.workers if w.name == name), None)
    if worker is None:
        raise ValueError(f"no worker named {name!r}")
    if worker.max_replicas is None:
        raise ValueError(f"worker {name} has a fixed number of replicas (no max_replicas)")
    if not is_scale_delta(delta):
        raise ValueError(f"scale by +1 or -1, not {delta!r}")
    mine = replicas(slots, name)
    if delta == 1:
        if len(mine) >= worker.max_replicas:
            raise ValueError(f"worker {name} already runs {len(mine)} replicas "
                             f"(max_replicas {worker.max_replicas})")
        # One scaled down but not exited yet still counts: the fleet's processes, and so
        # its heartbeat cells, never pass what validation allowed.
        every = [s for s in slots if s.worker.name == name]
        if len(every) >= worker.max_replicas:
            leaving = ", ".join(s.label for s in every if s not in mine)
            raise ValueError(f"worker {name} is at max_replicas {worker.max_replicas} until "
                             f"the replicas scaled down exit ({leaving})")
        slot = new_slot(fleet, worker, next_replica(s.replica for s in every))
        return f"worker {name}: {len(mine) + 1} replicas, started {slot.label}", [Add(slot)]
    if len(mine) <= 1:
        raise ValueError(f"worker {name} runs 1 replica, the fewest it can")
    slot = max(mine, key=lambda s: s.replica)
    done = f"worker {name}: {len(mine) - 1} replicas, stopping {slot.label}"
    if slot.state is WorkerState.RUNNING:
        return done, [Stop(slot, StopReason.SCALED_DOWN, "scaled down")]
    if slot.state is WorkerState.STOPPING:  # going already (recycled, say): not to return
        return done, [Stop(slot, StopReason.SCALED_DOWN, slot.reason or "scaled down")]
    return done, [Remove(slot)]
