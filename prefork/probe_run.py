"""The side of ``prefork probe`` that runs in a real ``prefork run`` master and its workers.

``prefork probe --fleet SPEC`` starts ``prefork run --fleet SPEC`` with a hidden
``--probe-fd FD``: the master loads the user's fleet as it always does, and
:class:`ProbeLink` swaps each worker's code for :func:`serve`, which answers the probe's
commands (its warm-up on ``w``, its import report on ``r``) instead of running the
worker. Everything else is the master's: the fork, the child's set-up, the titles, the
heartbeats, the import report's signal, the master's own loop. So what the probe
measures is what ``prefork run`` runs (:mod:`prefork.probe` is the other side, which
never imports the floor).

The probe's socket ``FD`` (``SOCK_SEQPACKET``, one message each) carries, from the
master: once, just before its first fork, the fleet's name and the children's (worker,
replica, label), with the probe's ends of one socket pair per child, after one for the
bare child and one for the sleeper (:data:`SLEEPER`) with ``--bare-fork`` (more in ``+``
messages past :data:`MAX_FDS`); then ``exited LABEL: HOW`` for each worker that exits.
From the probe: ``g`` once it has read the floor's memory.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import select
import socket
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from prefork import after_fork
from prefork.child import WorkerContext, current_worker
from prefork.fleet import Fleet, FleetError, Worker, load_fleet, replica_label
from prefork.groups import host_groups
from prefork.heartbeats import heartbeat
from prefork.probe_measure import MAX_FDS

# An idle child wakes this often and leaves some reference cycles behind, as a polling
# loop does (exceptions, futures, frames): only the collector frees those, so its
# collections run as they would in a real worker (gen 0 about every second). Garbage
# freed by reference counting alone would never trigger one.
IDLE_TICK = 0.1
IDLE_CYCLES = 100
# A prefork child that only sleeps, as the bare fork does: the difference between the two
# is what prefork's own set-up of a child costs.
SLEEPER = "prefork-sleeper"

log = logging.getLogger("prefork")


def assignments(workers: Sequence[Worker], count: int) -> list[tuple[Worker, int]]:
    """``count`` children cycling through ``workers``: each one's worker and replica."""
    return [(workers[i % len(workers)], i // len(workers)) for i in range(count)]


class ProbeLink:
    """The master's side of the probe: ``fleet`` is the user's fleet as the probe runs it
    (``count`` children, one per worker by default, each serving the probe with its
    worker's settings, hooks and warm-up; never restarted, no start order, no memory or
    age limit, which would end a child mid-probe); :meth:`before_first_fork` is the
    master's ``before_first_fork``. Raises :class:`FleetError`."""

    def __init__(self, fd: int, fleet: Fleet, count: int | None, *, bare: bool) -> None:
        try:
            self.sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise FleetError(f"--probe-fd {fd}: {exc.strerror} (it is for prefork probe "
                             "alone)") from None
        children = assignments(fleet.workers, len(fleet.workers) if count is None else count)
        self.children = [(worker.name, replica) for worker, replica in children]
        self.ends: dict[tuple[str, int], int] = {}  # (name, replica) -> the child's end
        self.sleeper_end = -1
        self.bare = bare
        replicas: dict[str, int] = {}
        for worker, _ in children:
            replicas[worker.name] = replicas.get(worker.name, 0) + 1
        workers = [dataclasses.replace(
            worker, target=_Target(self, worker), replicas=replicas[worker.name],
            max_replicas=None, restart="never", after=(), max_private_memory=None,
            max_age=None, max_age_jitter=None)
            for worker in fleet.workers if worker.name in replicas]
        if bare:
            if any(worker.name == SLEEPER for worker in workers):
                raise FleetError(f"prefork probe --bare-fork adds a worker named {SLEEPER!r}: "
                                 "the fleet has one already")
            # First: forked right after the bare fork.
            workers.insert(0, Worker(SLEEPER, self._sleep, restart="never"))
        user_exit, user_post_fork = fleet.worker_exit, fleet.post_fork

        def worker_exit(context: WorkerContext, status: Any) -> None:
            self._exited(context, status)
            if user_exit is not None:
                user_exit(context, status)

        def post_fork(context: WorkerContext) -> None:
            if context.name != SLEEPER:  # the user's hook is not prefork's cost
                user_post_fork(context)  # type: ignore[misc]

        # No kernel pool: the probe measures the workers, and serves their commands itself.
        self.fleet = dataclasses.replace(
            fleet, workers=tuple(workers), restart="never", max_private_memory=None,
            max_age=None, kernel_workers=0, worker_exit=worker_exit,
            post_fork=None if user_post_fork is None else post_fork).validate()

    def before_first_fork(self) -> None:
        """Hand the probe its ends, wait until it has read the floor, fork the bare child.
        Everything the first batch needs is made, and nothing is forked yet: the bare
        child is forked with the workers, or what the master writes in between would be
        the bare child's alone."""
        try:
            ours = []
            if self.bare:
                bare_ours, bare_theirs = socket.socketpair()
                sleeper_ours, sleeper_theirs = socket.socketpair()
                self.sleeper_end = sleeper_theirs.detach()
                ours += [bare_ours.detach(), sleeper_ours.detach()]
            for key in self.children:
                mine, child = socket.socketpair()
                self.ends[key] = child.detach()
                ours.append(mine.detach())
            header = json.dumps({
                "fleet": self.fleet.name, "max_report": after_fork.MAX_REPORT,
                "bare": self.bare,
                "children": [(name, replica, replica_label(name, replica))
                             for name, replica in self.children]})
            socket.send_fds(self.sock, [header.encode()], ours[:MAX_FDS])
            for start in range(MAX_FDS, len(ours), MAX_FDS):
                socket.send_fds(self.sock, [b"+"], ours[start:start + MAX_FDS])
            for fd in ours:  # the probe's now; no child may hold them
                os.close(fd)
            if self.sock.recv(16) != b"g":
                raise OSError("the probe went away")
            if self.bare:
                if os.fork() == 0:
                    _bare(bare_theirs.fileno())
                bare_theirs.close()
        except OSError as exc:  # its workers see the probe's ends closed, and exit
            log.error("prefork probe: %s", exc)

    def _sleep(self) -> None:
        """The sleeper's code: the bare fork's, after prefork's set-up of a worker."""
        os.write(self.sleeper_end, b"%d\n" % os.getpid())
        os.read(self.sleeper_end, 1)

    def _exited(self, context: WorkerContext, status: Any) -> None:
        try:
            self.sock.send(f"exited {context.label}: {status.describe()}".encode())
        except OSError:  # the probe has gone: it stops the master next
            pass


def _bare(fd: int) -> NoReturn:
    """A bare ``os.fork()`` child of the master: no prefork set-up at all (its signals
    stay blocked, as the master forks). It says its pid, then sleeps in a read until the
    probe closes the other end. What it holds of its own is what a fork of this floor
    costs by itself."""
    try:
        os.write(fd, b"%d\n" % os.getpid())
        os.read(fd, 1)
    finally:
        os._exit(0)


class _Target:
    """A probe child's code: find its end of the probe's socket pair, then serve."""

    def __init__(self, link: ProbeLink, worker: Worker) -> None:
        self.link, self.worker = link, worker

    def __call__(self) -> None:
        me = current_worker()
        assert me is not None
        fd = self.link.ends[(me.name, me.replica)]
        serve(self.worker, fd, fd)


def serve(worker: Worker, read_fd: int, write_fd: int) -> None:
    """A measured process's loop: say ``ready PID``; on ``w`` run the worker's warm-up and
    a full collection and say ``worked``; on ``r`` write its import report (what it has
    imported since the fork, :mod:`prefork.after_fork`); end on ``q`` or when the probe
    goes away. It beats, as a worker with a heartbeat timeout must."""
    os.write(write_fd, f"ready {os.getpid()}\n".encode())
    while True:
        readable, _, _ = select.select([read_fd], [], [], IDLE_TICK)
        if not readable:
            heartbeat()
            for _ in range(IDLE_CYCLES):
                cycle: list[object] = []
                cycle.append(cycle)
            continue
        command = os.read(read_fd, 1)
        if command in (b"", b"q"):
            return
        if command == b"w":
            try:
                if worker.warmup is not None:
                    worker.warmup()
                gc.collect()
            except Exception as exc:
                message = " ".join(f"{type(exc).__name__}: {exc}".split())
                os.write(write_fd, f"error: {message}\n".encode())
            else:
                os.write(write_fd, b"worked\n")
        elif command == b"r":
            os.write(write_fd, after_fork.report_now())


def baseline_main() -> None:
    """A baseline process: import the fleet from ``argv[1]``, then serve worker ``argv[2]``
    on stdin/stdout."""
    spec, name = sys.argv[1], sys.argv[2]
    # The protocol owns the real stdout; anything the fleet prints goes to stderr.
    out = os.dup(1)
    os.dup2(2, 1)
    try:
        fleet = host_groups(load_fleet(spec))  # a group is one worker, as in the master
        worker = next(w for w in fleet.workers if w.name == name)
    except FleetError as exc:
        os.write(out, f"error: {exc}\n".encode())
        raise SystemExit(1) from None
    except StopIteration:
        os.write(out, f"error: fleet {fleet.name!r} has no worker {name!r}\n".encode())
        raise SystemExit(1) from None
    serve(worker, 0, out)
