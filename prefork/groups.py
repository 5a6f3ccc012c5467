"""Worker groups: several ``async def`` workers hosted in one process, each under its own
supervision loop.

A fleet's ``groups`` (``Fleet(groups={"batch": ["a", "b"]})``, or ``prefork run --group
batch=a,b``) are turned once, before any fork, into a fleet where each group is one worker
named after the group (:func:`host_groups`): its target, a :class:`GroupHost`, runs the
group's workers as tasks of one event loop. The master forks, restarts, recycles, beats
and stops that process as it does any worker's; only its ``status()`` knows of groups.

In the group's process each hosted worker has a :class:`prefork.slot.Slot` of its own, the
master's bookkeeping and its pure policy (:mod:`prefork.policy`): restart policy, backoff,
reset after a stable run, start limit, and the master's log lines. A hosted worker's
exception is that worker's failure alone: its siblings' tasks are never touched (an
``asyncio.TaskGroup`` would cancel them all). A worker over its start limit stays failed
while the others go on; once every hosted worker has ended for good the process exits,
0 if none failed, else 1, and the master's policy takes over. SIGTERM/SIGINT cancel every
hosted task at once (:mod:`prefork.aio`): their clean-up runs, then the process exits 0.

What the master's ``status`` shows of them comes through a :class:`HostedBoard`, a small
shared mapping per group made in the master before the fork: the group's process
rewrites it on each hosted state change, the master reads it only when asked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import mmap
import os
import random
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prefork.child import WorkerContext, current_worker, hosted_worker
from prefork.fleet import (
    Fleet,
    FleetError,
    Worker,
    asyncio_worker,
    coroutine_of,
    exception_line,
)
from prefork.paths import MAX_NAME, name_problem
from prefork.policy import ExitStatus
from prefork.slot import Slot
from prefork.states import WorkerState

log = logging.getLogger("prefork")

# Settings of a worker's own process: a hosted worker shares its group's.
PER_PROCESS = ("env", "cwd", "user", "group", "umask", "nice", "rlimits")
# Limits that recycle a whole process: the fleet's apply to the group's process.
PER_GROUP_PROCESS = ("max_private_memory", "max_age", "max_age_jitter")
# The most characters of a hosted worker's last exception that status shows.
MAX_EXCEPTION = 200


def check_groups(fleet: Fleet) -> None:
    """Raise :class:`FleetError` (one line) unless every group of ``fleet`` can be hosted.

    Refused: a group that is no list of worker names, is empty, is named like a worker
    or not as a name must be; a name that is no worker of the fleet, or is in two groups;
    a hosted worker that is not ``async def``, has more than one replica, process settings
    (:data:`PER_PROCESS`), limits of its own that recycle a process
    (:data:`PER_GROUP_PROCESS`: the fleet's apply to the group's process), or an
    ``after``; and any worker whose ``after`` names a hosted one.
    """
    where = f"fleet {fleet.name!r}"
    groups = fleet.groups
    if not isinstance(groups, Mapping):
        raise FleetError(f"{where}: groups must map a group name to a list of worker names, "
                         f"got {groups!r}")
    workers = {w.name: w for w in fleet.workers}
    home: dict[str, str] = {}
    for group, names in groups.items():
        problem = name_problem(group, "group")
        if problem is not None:
            raise FleetError(f"{where}: {problem}")
        if group in workers:
            raise FleetError(f"{where}: group {group!r} has the name of a worker; "
                             "a group needs a name of its own")
        if isinstance(names, str | bytes) or not isinstance(names, Sequence):
            raise FleetError(f"{where}: group {group!r} must be a list of worker names, "
                             f"got {names!r}")
        if not names:
            raise FleetError(f"{where}: group {group!r} has no workers")
        for name in names:
            if not isinstance(name, str) or name not in workers:
                raise FleetError(f"{where}: group {group!r} names {name!r}, which is not a "
                                 "worker of the fleet")
            if name in home:
                raise FleetError(f"{where}: group {group!r} names worker {name!r} twice"
                                 if home[name] == group else
                                 f"{where}: worker {name!r} is in two groups, "
                                 f"{home[name]!r} and {group!r}")
            home[name] = group
            _check_hosted(workers[name], group)
    for worker in fleet.workers:
        for name in worker.after:
            if name in home:
                raise FleetError(f"worker {worker.name!r}: after names {name!r}, which is "
                                 f"hosted in group {home[name]!r}; start order cannot wait "
                                 "for one worker of a group")


def _check_hosted(worker: Worker, group: str) -> None:
    where = f"worker {worker.name!r} in group {group!r}"
    if coroutine_of(worker.target) is None:
        raise FleetError(f"{where} is not an async def worker: a group hosts coroutines on "
                         "one event loop, where a blocking function would stop its siblings")
    if worker.replicas != 1 or worker.max_replicas is not None:
        raise FleetError(f"{where}: replicas and max_replicas count processes; a group "
                         "hosts one copy of each of its workers")
    for setting in PER_PROCESS:
        if getattr(worker, setting) is not None:
            raise FleetError(f"{where}: {setting} is a process setting, and the workers of "
                             "a group share one process")
    for setting in PER_GROUP_PROCESS:
        if getattr(worker, setting) is not None:
            raise FleetError(f"{where}: {setting} recycles a whole process; the fleet's "
                             "applies to the group's process")
    if worker.after:
        raise FleetError(f"{where}: after is not supported in a group (its workers start "
                         "together)")


def host_groups(fleet: Fleet) -> Fleet:
    """``fleet`` (validated) with each group as one worker named after it, where the first
    of its workers was; the fleet itself if it has no groups.

    The group's worker takes the shortest ``timeout`` of its workers (its event loop beats
    for them all) and a ``warmup`` that runs each of theirs in turn; its restart policy,
    backoff, start limit and memory and age limits are the fleet's.
    """
    if not fleet.groups:
        return fleet
    by_name = {w.name: w for w in fleet.workers}
    home = {name: group for group, names in fleet.groups.items() for name in names}
    workers: list[Worker] = []
    for worker in fleet.workers:
        group = home.get(worker.name)
        if group is None:
            workers.append(worker)
        elif not any(w.name == group for w in workers):
            workers.append(_group_worker(fleet, group,
                                         [by_name[n] for n in fleet.groups[group]]))
    return dataclasses.replace(fleet, workers=tuple(workers), groups={})


def _group_worker(fleet: Fleet, group: str, hosted: list[Worker]) -> Worker:
    timeouts = [w.timeout for w in hosted if w.timeout is not None]
    warmups = [w.warmup for w in hosted if w.warmup is not None]
    return Worker(group, GroupHost(group, fleet, hosted),
                  timeout=min(timeouts) if timeouts else None,
                  warmup=_in_turn(warmups) if warmups else None)


def _in_turn(warmups: list[Callable[[], object]]) -> Callable[[], list[object]]:
    def warm_up() -> list[object]:
        return [warmup() for warmup in warmups]

    return warm_up


class GroupHost:
    """The target of a group's process: each hosted worker under its own supervision loop.

    Made in the master (with its :attr:`board`); called in the forked child. Returns once
    SIGTERM/SIGINT stopped the group, or every hosted worker ended and none failed; raises
    ``SystemExit(1)`` once every one has ended and some failed.
    """

    def __init__(self, group: str, fleet: Fleet, hosted: Sequence[Worker]) -> None:
        self.group = group
        self.hosted = tuple(hosted)
        self._defaults = (fleet.restart, fleet.backoff, fleet.start_limit)
        self.board = HostedBoard(len(self.hosted))
        self._slots: list[Slot] = []
        self._errors: dict[str, str] = {}  # each hosted worker's last exception, one line

    def __repr__(self) -> str:
        return f"<group {self.group}: {', '.join(w.name for w in self.hosted)}>"

    def __call__(self) -> None:
        failed = asyncio_worker(self._host)()
        if failed:
            log.error("group %s: every worker has ended; failed: %s", self.group,
                      ", ".join(failed))
            raise SystemExit(1)

    async def _host(self) -> list[str]:
        """Run every hosted worker until all have ended; the names of those that failed."""
        import asyncio  # imported already: this runs in its event loop

        restart, backoff, start_limit = self._defaults
        self._slots = [Slot(worker=w, replica=0, restart=w.restart or restart,
                            backoff=w.backoff or backoff,
                            start_limit=w.start_limit or start_limit) for w in self.hosted]
        group = current_worker()
        tasks = [asyncio.create_task(self._supervise(slot, group),
                                     name=f"prefork worker {slot.worker.name}")
                 for slot in self._slots]
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:  # the group stops: every hosted worker, at once
            for task in tasks:
                task.cancel()
            while not all(task.done() for task in tasks):
                try:
                    await asyncio.wait(tasks)
                except asyncio.CancelledError:
                    continue  # a second stop: their clean-up goes on; SIGKILL bounds it
            raise
        return [s.worker.name for s in self._slots if s.state is WorkerState.FAILED]

    async def _supervise(self, slot: Slot, group: WorkerContext | None) -> None:
        """One hosted worker: run it, and again on its backoff, until its policy, its start
        limit or the group's stop ends it."""
        import asyncio

        main = coroutine_of(slot.worker.target)
        assert main is not None  # check_groups refused any other
        pid, rng = os.getpid(), random.Random()
        if group is not None:  # in this task's context alone: current_worker() names it
            hosted_worker.set(WorkerContext(group.fleet, slot.worker.name, 0,
                                            group.master_pid, pid))
        while True:
            slot.started(pid, time.monotonic(), count_start=True)
            self._publish()
            status = await self._run_once(slot, main, pid)
            slot.exited(status, time.monotonic(), rng)
            self._publish()
            if slot.state is not WorkerState.BACKOFF or slot.due is None:
                return
            await asyncio.sleep(max(0.0, slot.due - time.monotonic()))
            slot.restarts += 1

    async def _run_once(self, slot: Slot, main: Callable[[], Any], pid: int) -> ExitStatus:
        """Run the worker once; how it ended, as its process's exit would say it. Raises
        CancelledError when the group stops."""
        import asyncio

        name, started = slot.worker.name, time.monotonic()
        task = asyncio.current_task()
        exc_info: BaseException | None = None
        try:
            await main()
            status, how = ExitStatus(code=0), "exit code 0"
        except asyncio.CancelledError as exc:
            if task is not None and task.cancelling():
                raise  # the group stops
            status, how, exc_info = ExitStatus(code=1), "exception CancelledError", exc
            self._errors[name] = "CancelledError (not from a stop)"
        except SystemExit as exc:  # sys.exit(): that worker's exit, as in a process
            status, message = _system_exit(exc)
            how = status.describe() + (f": {message}" if message else "")
            if message:
                self._errors[name] = message
        except Exception as exc:
            status, exc_info = ExitStatus(code=1), exc
            self._errors[name] = _clip(exception_line(exc))
            how = f"exception {self._errors[name]}"
        if task is not None and task.cancelling():  # it ended while the group stops
            log.log(logging.WARNING if status.failed else logging.INFO,
                    "worker %s (pid %d, group %s) exited while stopping: %s", name, pid,
                    self.group, how, exc_info=exc_info)
            raise asyncio.CancelledError
        log.log(logging.WARNING if status.failed else logging.INFO,
                "worker %s (pid %d, group %s) exited: %s after %.3fs", name, pid, self.group,
                how, time.monotonic() - started, exc_info=exc_info)
        return status

    def _publish(self) -> None:
        rows = [{"name": s.worker.name, "state": str(s.state), "restarts": s.restarts,
                 "started": s.started_at, "due": s.due,
                 "last_exception": self._errors.get(s.worker.name)} for s in self._slots]
        self.board.write(os.getpid(), rows)


def _system_exit(exc: SystemExit) -> tuple[ExitStatus, str | None]:
    """How ``sys.exit(code)`` would end a process: its status, and the message it prints."""
    if exc.code is None:
        return ExitStatus(code=0), None
    if isinstance(exc.code, int):
        return ExitStatus(code=exc.code & 0xFF), None
    return ExitStatus(code=1), _clip(str(exc.code))


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_EXCEPTION else text[:MAX_EXCEPTION - 3] + "..."


# -- the board: hosted workers' states, from the group's process to the master ----------

# Sequence number (odd while a write is under way) and the payload's length in bytes.
_HEAD = struct.Struct("QI")
# Room per hosted worker: its name (at most MAX_NAME), numbers, and an exception of
# MAX_EXCEPTION characters escaped as JSON (\uXXXX: 6 bytes each, 12 beyond the BMP).
_ROW_BYTES = MAX_NAME + 160 + 12 * MAX_EXCEPTION
_READ_TRIES = 8
_STATES = frozenset(str(s) for s in WorkerState)


class HostedBoard:
    """One group's hosted workers as its process last wrote them: an anonymous shared
    mapping the master makes before the fork, holding a bounded JSON document behind a
    sequence number that is odd while a write is under way (a seqlock), so the master
    never takes half of one write with half of another. The master reads it only for
    status, and trusts nothing in it: what does not parse as the rows it expects gives
    no rows, never an exception."""

    def __init__(self, hosted: int) -> None:
        self.capacity = 256 + hosted * _ROW_BYTES
        self._map = mmap.mmap(-1, _HEAD.size + self.capacity)  # MAP_SHARED | MAP_ANONYMOUS

    def write(self, pid: int, rows: list[dict[str, object]]) -> None:
        """In the group's process: replace the document (the event loop is its only
        writer)."""
        payload = json.dumps({"pid": pid, "hosted": rows}, separators=(",", ":")).encode()
        if len(payload) > self.capacity:  # cannot happen with names and texts clipped
            payload = json.dumps({"pid": pid, "hosted": []}).encode()
        sequence, _ = _HEAD.unpack_from(self._map, 0)
        sequence |= 1  # odd: a write is under way (still odd if a killed writer left it so)
        _HEAD.pack_into(self._map, 0, sequence, 0)
        self._map[_HEAD.size:_HEAD.size + len(payload)] = payload
        _HEAD.pack_into(self._map, 0, sequence + 1, len(payload))

    def read(self, pid: int, now: float) -> list[dict[str, object]]:
        """In the master: the rows process ``pid`` wrote, as ``status`` shows them (with
        ``uptime`` and ``next_start_in`` at monotonic time ``now``); [] for anything else."""
        try:
            for _ in range(_READ_TRIES):
                sequence, length = _HEAD.unpack_from(self._map, 0)
                if sequence % 2 or length > self.capacity:
                    continue
                data = self._map[_HEAD.size:_HEAD.size + length]
                if _HEAD.unpack_from(self._map, 0)[0] == sequence:
                    return hosted_rows(json.loads(data), pid, now)
        except Exception:  # RecursionError from a hostile nesting, bad UTF-8, ...
            return []
        return []


def hosted_rows(document: object, pid: int, now: float) -> list[dict[str, object]]:
    """What ``status`` shows of a board's ``document`` written by process ``pid``; [] unless
    it is exactly the rows a group's process writes."""
    if not isinstance(document, dict) or document.get("pid") != pid:
        return []
    rows = document.get("hosted")
    if not isinstance(rows, list):
        return []
    shown = []
    for row in rows:
        if not isinstance(row, dict):
            return []
        name, state, restarts = row.get("name"), row.get("state"), row.get("restarts")
        started, due, error = row.get("started"), row.get("due"), row.get("last_exception")
        if (not isinstance(name, str) or name_problem(name, "worker") is not None
                or state not in _STATES or not _is_count(restarts)
                or not _is_time(started) or not (due is None or _is_time(due))
                or not (error is None or isinstance(error, str))):
            return []
        shown.append({
            "name": name,
            "state": state,
            "restarts": restarts,
            "uptime": round(max(now - started, 0.0), 3) if state == "running" else None,
            "next_start_in": (round(max(due - now, 0.0), 3)
                              if state == "backoff" and due is not None else None),
            "last_exception": None if error is None else _clip(error),
        })
    return shown


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_time(value: object) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and 0 <= value < 1e12)
