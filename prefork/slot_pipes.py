"""A pipe per forked child into the master, for what a worker tells it once: that it is
ready (:mod:`prefork.readiness`), what it imported after the fork (:mod:`prefork.after_fork`).

Made before the fork (``arm``), so a batch of forks makes every pipe first; after the fork
the master closes the write end (``forked``), so the child's exit is EOF, and watches the
read end in its selector until it is dropped. The read ends are the master's: every
forked child closes them (``fds``).
"""

from __future__ import annotations

import os
import selectors
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefork.slot import Slot


class SlotPipes:
    """One pipe per slot. ``owner`` is what the selector hands back with a readable read
    end (the loop calls its ``read(fd)``). ``child_blocks``: the child's write end blocks
    (a report the child waits to finish) rather than failing with EAGAIN (one byte that
    must never hold the worker up)."""

    def __init__(self, owner: object, *, child_blocks: bool) -> None:
        self._owner = owner
        self._flags = os.O_CLOEXEC | (0 if child_blocks else os.O_NONBLOCK)
        self._selector: selectors.BaseSelector | None = None
        self._slot_of: dict[int, Slot] = {}  # read end -> slot
        self._read_end_of: dict[Slot, int] = {}
        self._write_end_of: dict[Slot, int] = {}  # only between arm() and forked()

    def attach(self, selector: selectors.BaseSelector) -> None:
        self._selector = selector

    def arm(self, slot: Slot) -> int:
        """Before ``slot`` forks: a new pipe (an earlier child's is closed); returns the
        write end its child keeps."""
        self.drop(slot)
        read_end, write_end = os.pipe2(self._flags)
        os.set_blocking(read_end, False)
        self._slot_of[read_end] = slot
        self._read_end_of[slot] = read_end
        self._write_end_of[slot] = write_end
        return write_end

    def forked(self, slot: Slot, ok: bool) -> None:
        """After the fork: the master closes the write end, and watches the read end, or
        closes it too if the fork failed (``ok`` False)."""
        write_end = self._write_end_of.pop(slot, None)
        if write_end is None:
            return
        os.close(write_end)
        if not ok:
            self.drop(slot)
        elif self._selector is not None:
            self._selector.register(self._read_end_of[slot], selectors.EVENT_READ,
                                    self._owner)

    def slot_of(self, fd: int) -> Slot | None:
        return self._slot_of.get(fd)

    def read_end(self, slot: Slot) -> int | None:
        return self._read_end_of.get(slot)

    def drop(self, slot: Slot) -> None:
        """Close ``slot``'s read end, if it has one."""
        read_end = self._read_end_of.pop(slot, None)
        if read_end is None:
            return
        del self._slot_of[read_end]
        if self._selector is not None and read_end in self._selector.get_map():
            self._selector.unregister(read_end)
        os.close(read_end)

    def fds(self) -> list[int]:
        """The read ends, which a forked child closes (its own too)."""
        return list(self._slot_of)

    def close(self) -> None:
        """The master ends (its selector may be closed already)."""
        self._selector = None
        for slot in list(self._read_end_of):
            self.drop(slot)
