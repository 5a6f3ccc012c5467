"""Start order: a worker with ``after=[...]`` starts once each worker it names is ready.

A worker is ready once it has called :func:`ready` or :func:`prefork.heartbeat` (its
first beat), or has ended cleanly for good (exit 0 that its policy does not restart:
the EXITED state, as a ``restart="never"`` migration does). A worker with replicas is
ready once every replica has been ready once. Readiness is about start-up order only: it
is latched for the master's lifetime, so a dependent that started keeps running when its
dependency restarts later, and restarts without waiting again (systemd's ``After=`` is
the same). A dependency that ends FAILED before it was ready leaves its dependents
WAITING, with the failed worker named in their status ("dependency failed: migrate").
Nothing in this master can start them any more, so a master left with only such slots
(and final ones) ends as when every worker ended: exit 5 (a worker failed), logging
them as never started. Under systemd the unit then fails and its ``Restart=`` decides
whether the whole start, migration included, is tried again; a master that stayed up
would look active with nothing to do. While other workers run it stays, and the fleet
stops cleanly: waiting slots just stay stopped. systemd's ``READY=1`` goes out once
every worker that can start is forked, waiting ones aside (a migration may outlast
``TimeoutStartSec=``); ``STATUS=`` then counts them: "..., 1 waiting".

The channel, for workers others wait for and only for them: before forking one, the
master makes a pipe; the child keeps the write end (:func:`attach`), the master closes
it and watches the read end in its selector, so a worker's readiness wakes it at once.
:func:`ready` writes one byte and closes its end. EOF without a byte: the worker closed
it or died first. Every other worker gets no pipe and :func:`ready` is a no-op in it, as
in the master and outside prefork.
"""

from __future__ import annotations

import logging
import os
import selectors
import threading
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from prefork.slot_pipes import SlotPipes
from prefork.states import WorkerState

if TYPE_CHECKING:
    from prefork.fleet import Fleet
    from prefork.slot import Slot

log = logging.getLogger("prefork")

# -- the worker's side ------------------------------------------------------------------

# The write end of this worker's readiness pipe, or -1: none, or used already.
channel = -1
_channel_lock = threading.Lock()  # made at import, never held across a fork


def attach(fd: int) -> None:
    """In a child, right after fork: ``fd`` is its readiness pipe's write end (-1: none)."""
    global channel
    channel = fd


def ready() -> None:
    """Tell the master this worker is ready: the workers that start ``after`` it may start.

    Only the first call does anything; a no-op in a worker nobody waits for, in the
    master and outside prefork. Safe from any thread of the worker.
    """
    global channel
    if channel < 0:
        return
    with _channel_lock:
        fd, channel = channel, -1
    if fd < 0:
        return
    try:
        os.write(fd, b"!")
    except OSError:  # the master is gone: PR_SET_PDEATHSIG ends this worker anyway
        pass
    finally:
        os.close(fd)


# -- decisions, without a process ---------------------------------------------------------


def find_cycle(after: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A cycle in who waits for whom (``after[name]``: the names ``name`` waits for), as
    the names along it with the first one again at the end, or None if there is none.
    Names that are not keys are taken to wait for nothing."""
    done: set[str] = set()
    for root in after:
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root}
        todo = [iter(after.get(root, ()))]
        while todo:  # depth first, without recursion: a fleet may chain 1024 workers
            name = next(todo[-1], None)
            if name is None:
                todo.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif name in on_path:
                return [*path[path.index(name):], name]
            elif name not in done:
                path.append(name)
                on_path.add(name)
                todo.append(iter(after.get(name, ())))
    return None


def not_ready(after: Iterable[str], ready: Collection[str]) -> list[str]:
    """The names in ``after`` not ready yet, in their order."""
    return [name for name in after if name not in ready]


def failed_roots(name: str, slots: Sequence[Slot], ready: Collection[str]) -> set[str]:
    """The FAILED workers that keep worker ``name`` from ever being ready: ``{name}`` if a
    replica of it failed before it was ready, those its waiting replicas wait behind, or
    an empty set while it may still become ready."""
    return set(FailedRoots(slots, ready).of(name))


class FailedRoots:
    """:func:`failed_roots` for every worker a pass asks about: one pass over the slots,
    and each worker's roots found once (a fleet may chain 1,024 workers, and every
    waiting slot asks: walking the chain again for each was quadratic)."""

    def __init__(self, slots: Sequence[Slot], ready: Collection[str]) -> None:
        self._ready = ready
        self._unready_of: dict[str, list[Slot]] = {}
        self._any_failed = False  # the usual case, the start-up's: nothing to walk
        for slot in slots:
            if not slot.ready:
                self._unready_of.setdefault(slot.worker.name, []).append(slot)
                self._any_failed |= slot.state is WorkerState.FAILED
        self._roots: dict[str, frozenset[str]] = {}

    def of(self, name: str) -> frozenset[str]:
        if not self._any_failed:
            return frozenset()
        # Depth first without recursion: a name is finished once those it waits for are.
        todo, open_ = [name], set()
        while todo:
            current = todo[-1]
            if current in self._roots:
                todo.pop()
                continue
            after = self._waits_for(current)
            if after is None:  # failed itself: the root
                self._roots[current] = frozenset((current,))
                todo.pop()
                continue
            unfinished = [n for n in after if n not in self._roots and n not in open_]
            if unfinished and current not in open_:
                open_.add(current)
                todo.extend(unfinished)
                continue
            open_.discard(current)
            todo.pop()
            self._roots[current] = frozenset().union(
                *(self._roots.get(n, frozenset()) for n in after))
        return self._roots[name]

    def _waits_for(self, name: str) -> list[str] | None:
        """None if a replica of ``name`` failed before it was ready; else the workers its
        waiting replica waits for (none while it may still become ready on its own)."""
        if name in self._ready:
            return []
        unready = self._unready_of.get(name, [])
        if any(s.state is WorkerState.FAILED for s in unready):
            return None
        waiting = next((s for s in unready if s.state is WorkerState.WAITING), None)
        return [] if waiting is None else not_ready(waiting.worker.after, self._ready)


def waiting_reason(slot: Slot, slots: Sequence[Slot], ready: Collection[str],
                   roots: FailedRoots | None = None) -> str:
    """What status says of a WAITING slot: whom it waits for, or which failure it waits
    behind (systemd's "dependency failed"). ``roots``: one made for the whole pass."""
    missing = not_ready(slot.worker.after, ready)
    if roots is None:
        roots = FailedRoots(slots, ready)
    failed: set[str] = set()
    for name in missing:
        failed |= roots.of(name)
    if failed:
        return f"dependency failed: {', '.join(sorted(failed))}"
    return f"waiting for {', '.join(missing)}"


# -- the master's side --------------------------------------------------------------------


class StartOrder:
    """The master's half: which slots wait, the pipes of the slots others wait for, and
    which workers are ready (for good). Costs nothing to a fleet without ``after``."""

    def __init__(self, fleet: Fleet, slots: Sequence[Slot]) -> None:
        self.slots = slots
        self.awaited = frozenset(name for w in fleet.workers for name in w.after)
        self.ready: set[str] = set()  # awaited workers every replica of which was ready
        self._pipes = SlotPipes(self, child_blocks=False)  # one byte must never block
        self._changed = False  # a worker became ready since released() last looked

    def attach(self, selector: selectors.BaseSelector) -> None:
        self._pipes.attach(selector)

    def holds(self, slot: Slot) -> bool:
        """Before ``slot`` first starts: True if it must wait (it is now WAITING)."""
        if not slot.worker.after or not not_ready(slot.worker.after, self.ready):
            return False
        slot.wait(waiting_reason(slot, self.slots, self.ready))
        log.info("worker %s %s", slot.label, slot.reason)
        return True

    def arm(self, slot: Slot) -> int:
        """Before ``slot`` forks: the write end its child keeps (-1: nobody waits for it,
        or it was ready once already)."""
        if slot.worker.name not in self.awaited or slot.ready or slot.worker.name in self.ready:
            return -1
        return self._pipes.arm(slot)

    def forked(self, slot: Slot, ok: bool) -> None:
        """After the fork (``ok`` False: it failed): only the child holds the write end,
        so its exit is EOF; the master watches the read end."""
        self._pipes.forked(slot, ok)

    def read(self, fd: int) -> None:
        """The selector found ``fd`` readable: one byte is readiness, EOF is not."""
        slot = self._pipes.slot_of(fd)
        if slot is None:
            return
        try:
            byte = os.read(fd, 1)
        except BlockingIOError:
            return
        except OSError:
            byte = b""
        self.drop(slot)
        if byte:
            self._mark_ready(slot, "is ready")

    def exited(self, slot: Slot) -> None:
        """``slot``'s child was reaped (and ``slot.exited`` decided): a byte left in its
        pipe still counts; a clean end for good counts as ready; a failure may leave
        dependents waiting for ever."""
        read_end = self._pipes.read_end(slot)
        if read_end is not None:
            try:
                byte = os.read(read_end, 1)
            except OSError:  # EAGAIN: what it started holds the write end; no byte
                byte = b""
            self.drop(slot)
            if byte:
                self._mark_ready(slot, "was ready")
        if slot.worker.name not in self.awaited or slot.ready:
            return
        if slot.state is WorkerState.EXITED:
            self._mark_ready(slot, "ended cleanly")
        elif slot.state is WorkerState.FAILED:
            self._explain()

    def adopt_ready(self, slot: Slot) -> None:
        """``slot``'s worker, adopted across a reload's exec, had been ready."""
        self._mark_ready(slot, "was ready before the reload")

    def released(self) -> list[Slot]:
        """The WAITING slots whose dependencies are all ready now (to start)."""
        if not self._changed:
            return []
        self._changed = False
        free = [s for s in self.slots if s.state is WorkerState.WAITING
                and not not_ready(s.worker.after, self.ready)]
        self._explain()
        return free

    def waiting(self) -> list[Slot]:
        return [s for s in self.slots if s.state is WorkerState.WAITING]

    def drop(self, slot: Slot) -> None:
        """Close ``slot``'s read end, if it has one."""
        self._pipes.drop(slot)

    def fds(self) -> list[int]:
        """The read ends, which a forked child closes."""
        return self._pipes.fds()

    def close(self) -> None:
        """The master ends (its selector may be closed already)."""
        self._pipes.close()

    def _mark_ready(self, slot: Slot, how: str) -> None:
        slot.ready = True
        name = slot.worker.name
        log.info("worker %s %s", slot.label, how)
        if name not in self.ready and all(s.ready for s in self.slots if s.worker.name == name):
            self.ready.add(name)
            self._changed = True

    def _explain(self) -> None:
        """Bring each waiting slot's reason up to date; log one that now waits behind a
        failure, once."""
        roots = FailedRoots(self.slots, self.ready)
        for slot in self.waiting():
            reason = waiting_reason(slot, self.slots, self.ready, roots)
            if reason != slot.reason and reason.startswith("dependency failed"):
                log.error("worker %s will not start: %s", slot.label, reason)
            slot.reason = reason
