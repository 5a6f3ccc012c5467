"""A worker is its whole process tree: what the master does with processes that are not
its workers.

- Each worker leads a process group of its own (:mod:`prefork.child`, and the master sets
  it too); what the worker starts is in it, unless it leaves (``setsid``, ``setpgid``).
- The master is a child subreaper (``PR_SET_CHILD_SUBREAPER``; as PID 1 of a container
  it is one anyway): a descendant whose parent dies is re-parented to the master, not to
  PID 1, so the master's ``waitpid(-1)`` reaps it and the master knows it is there.
- A worker's SIGKILL at the end of its grace period goes to its whole group.
- When a worker is reaped, what is left of its group gets SIGTERM, and SIGKILL when the
  grace period ends: the one running since the master sent the worker SIGTERM, else one
  from the worker's exit.
- When no worker is left (the fleet stops, or has nothing left to run), every child the
  master still has - orphans re-parented to it, daemons that left their worker's group,
  anything the floor started - gets SIGTERM (its group, if it leads one), and when the
  fleet's grace period ends, every descendant SIGKILL. The master exits once it has no
  child left.

A process that left its worker's group while the worker runs is only found at the end,
as a child of the master: between, it is reaped when it dies, never signalled. The
master's own ``SIGKILL`` kills none of this (``PR_SET_PDEATHSIG`` reaches the workers
only): a cgroup is the tool for that, and systemd's ``KillMode=mixed`` uses it.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import psutil

from prefork.prctl import PR_SET_CHILD_SUBREAPER, prctl

log = logging.getLogger("prefork")

RETRY = 0.1  # seconds between SIGKILL rounds once the grace is over and children remain


def become_subreaper() -> None:
    """Make this process the reaper of its descendants' orphans (Linux >= 3.4)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def signal_tree(pid: int, signum: int) -> bool:
    """Send ``signum`` to the process group ``pid`` leads, or to ``pid`` alone if it leads
    none (yet); False if there was no such group or process."""
    try:
        os.killpg(pid, signum)
        return True
    except ProcessLookupError:
        pass
    try:
        os.kill(pid, signum)
        return True
    except ProcessLookupError:
        return False


class WorkerTrees:
    """The master's watch over what its workers leave behind (see the module's text).

    The master calls :meth:`worker_exited` for each worker it reaps, sets
    :attr:`children_left` after each reaping round, and calls :meth:`no_worker_left`
    once no worker runs. ``is_worker(pgid)`` says whether a process group is a live
    worker's: a group that emptied may have its number taken by a new worker, which
    must not get the old one's SIGKILL. ``is_own(pid)``: a child the master started
    itself and stops itself (the metrics exporter), not one left behind; it still gets
    the final SIGKILL if it outlives the grace period.
    """

    def __init__(self, is_worker: Callable[[int], bool],
                 is_own: Callable[[int], bool] = lambda pid: False) -> None:
        self._is_worker = is_worker
        self._is_own = is_own
        self._groups: dict[int, tuple[float, str]] = {}  # pgid -> (SIGKILL at, worker)
        self._final: float | None = None  # no worker left: SIGKILL for everything at
        self._terminated: set[int] = set()
        self.children_left = True  # the master's last waitpid(-1) found a child

    @property
    def ending(self) -> bool:
        """:meth:`no_worker_left` was called: the master is clearing up before it exits."""
        return self._final is not None

    def worker_exited(self, pid: int, label: str, kill_at: float) -> None:
        """The worker ``label`` (pid ``pid``, its group's number) was reaped: SIGTERM what
        is left of its group; SIGKILL at ``kill_at`` if anything is."""
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:  # the usual case: nothing left
            return
        log.warning("worker %s (pid %d) left processes in its group: SIGTERM to them",
                    label, pid)
        self._groups[pid] = (kill_at, label)

    def no_worker_left(self, kill_at: float) -> None:
        """SIGTERM every child of the master; SIGKILL every descendant at ``kill_at``."""
        if self._final is None:
            self._final = kill_at
            self._terminate_children()

    def kill_all(self) -> None:
        """SIGKILL every descendant of the master now (a second stop signal)."""
        self._groups.clear()
        for process in _descendants():
            send(process.pid, signal.SIGKILL)

    def next_deadline(self) -> float | None:
        deadlines = [kill_at for kill_at, _ in self._groups.values()]
        if self._final is not None and self.children_left:
            deadlines.append(self._final)
        return min(deadlines, default=None)

    def due(self, now: float) -> tuple[()]:
        for pgid, (kill_at, label) in list(self._groups.items()):
            if now < kill_at:
                continue
            del self._groups[pgid]
            if self._is_worker(pgid):
                continue  # the number is a new worker's now: the old group is gone
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            log.warning("processes left by worker %s (group %d) still running after the "
                        "grace period: SIGKILL", label, pgid)
        if self._final is not None and self.children_left:
            self._terminate_children()  # orphans re-parented to us since the last look
            if now >= self._final:
                left = _descendants()
                if left:
                    log.warning("%d processes left by workers still running after the grace "
                                "period: SIGKILL (%s)", len(left),
                                ", ".join(str(p.pid) for p in left[:10]))
                for process in left:
                    send(process.pid, signal.SIGKILL)
                self._final = now + RETRY  # in case one forked before its SIGKILL came
        return ()

    def _terminate_children(self) -> None:
        for process in _children():
            pid = process.pid
            if pid in self._terminated or self._is_own(pid):
                continue
            self._terminated.add(pid)
            try:
                leads = os.getpgid(pid) == pid
            except ProcessLookupError:
                continue
            log.info("pid %d (%s), left by a worker: SIGTERM", pid, _name(process))
            if leads:
                signal_tree(pid, signal.SIGTERM)
            else:
                send(pid, signal.SIGTERM)


def _children() -> list[psutil.Process]:
    try:
        return psutil.Process().children()
    except psutil.Error:
        return []


def _descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return "gone"


def send(pid: int, signum: int) -> None:
    """``kill(pid, signum)``; a process already gone (dead, maybe not yet reaped) is fine."""
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
