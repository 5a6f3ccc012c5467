"""The master: fork one child per worker slot, reap on events, restart on backoff, stop.

The loop sleeps in ``select()`` on one wake-up pipe and the control socket, with a
timeout that is the next deadline it owns (a scheduled restart, the end of a grace
period, a heartbeat timeout, the next memory check) or none at all, so an idle master
with healthy workers and no limits is never woken by a clock. Signal handlers only queue
the signal number; ``signal.set_wakeup_fd`` makes the kernel-level handler write a byte
to the pipe, which wakes ``select()``. Each wake-up: answer the control socket, handle
queued signals, reap every dead child with ``waitpid(-1, WNOHANG)`` until none is left,
start what is due, then supervise (heartbeats, memory, the rolling restart).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import selectors
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from setproctitle import setproctitle

from prefork.child import WorkerContext, flush_stdio, run_child
from prefork.control import ControlServer, socket_path
from prefork.fleet import Backoff, Fleet, RestartPolicy, StartLimit, Worker, replica_label
from prefork.heartbeats import HeartbeatTable
from prefork.lock import FleetLock, default_runtime_dir
from prefork.memory import MIB, MemoryUnavailable, measure
from prefork.notify import Notifier
from prefork.policy import (
    ExitStatus,
    backoff_delay,
    exceeds_start_limit,
    is_stable_run,
    next_replica,
    over_memory_limit,
    should_restart,
)
from prefork.states import ACTIVE, ALIVE, WorkerState, check_transition

log = logging.getLogger("prefork")

# Exit codes of `prefork run` / `run_fleet` (documented in the README).
EXIT_OK = 0
EXIT_USAGE = 2
EXIT_ALREADY_RUNNING = 4
EXIT_WORKERS_FAILED = 5

HANDLED_SIGNALS: tuple[signal.Signals, ...] = (
    signal.SIGTERM, signal.SIGINT, signal.SIGCHLD, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU)
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

# observer(event, slot, time.monotonic()) for each lifecycle event: "forking", "spawned",
# "exited" (slot.pid is the pid that exited, slot.last_exit how), "backoff", "failed",
# "finished", "ready" (all forked), "stopping" (the fleet), "stopping-worker" (one worker,
# slot.reason says why), "removed" (scaled down). It runs in the master's loop: keep it quick.
Observer = Callable[[str, "Slot | None", float], None]


@dataclass(eq=False)
class Slot:
    """One replica of one worker, and everything the master knows about it."""

    worker: Worker
    replica: int
    restart: RestartPolicy
    backoff: Backoff
    start_limit: StartLimit
    state: WorkerState = WorkerState.STOPPED
    pid: int | None = None
    started_at: float = 0.0
    due: float | None = None  # when a BACKOFF slot restarts
    attempt: int = 0  # restarts since the last stable run
    restarts: int = 0
    last_exit: ExitStatus | None = None
    start_times: deque[float] = field(default_factory=deque)
    cell: int | None = None  # its heartbeat cell, for a worker with a timeout
    # A worker the master stops on its own: what happens once it is reaped ("backoff",
    # "replace" at once, "remove"), and when SIGKILL follows the SIGTERM.
    stop_then: str | None = None
    kill_at: float | None = None
    reason: str | None = None  # why the master last stopped it, for the log and status
    over_since: float | None = None  # its USS is above its limit since then

    @property
    def label(self) -> str:
        return replica_label(self.worker.name, self.replica)

    def move(self, new: WorkerState) -> None:
        check_transition(self.state, new)
        self.state = new


def slots_for(fleet: Fleet) -> list[Slot]:
    return [new_slot(fleet, worker, replica)
            for worker in fleet.workers for replica in range(worker.replicas)]


def new_slot(fleet: Fleet, worker: Worker, replica: int) -> Slot:
    return Slot(worker=worker, replica=replica, restart=worker.restart or fleet.restart,
                backoff=worker.backoff or fleet.backoff,
                start_limit=worker.start_limit or fleet.start_limit)


class Master:
    """Run ``fleet`` until a stop signal, or until no worker is left to supervise.

    ``run()`` returns an exit code: ``EXIT_OK``, or ``EXIT_WORKERS_FAILED`` when a worker
    ended in the failed state. It raises ``AlreadyRunning`` when another master holds
    the fleet's lock and ``RuntimeDirError`` when the lock's directory is unsafe.
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        grace: float = 15.0,
        freeze: bool = True,
        runtime_dir: Path | None = None,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        systemd_notify: bool = True,
        memory_check_interval: float = 10.0,
        control: bool = True,
        warm_up: bool = False,
    ) -> None:
        self.fleet = fleet.validate()
        self.grace = grace
        self.freeze = freeze
        self.slots = slots_for(fleet)
        self.lock = FleetLock(runtime_dir or default_runtime_dir(), fleet.name)
        self._observer = observer
        self._rng = rng or random.Random()
        self._by_pid: dict[int, Slot] = {}
        self._signals: deque[int] = deque()
        self._stopping = False
        self._stop_deadline: float | None = None
        self._stop_started = 0.0
        self._killed_stragglers = 0
        self._pid = os.getpid()
        self._signal_defaults: dict[int, object] = {}
        self._wake_r = self._wake_w = -1
        self._selector: selectors.BaseSelector | None = None
        self._systemd_notify = systemd_notify
        self._notifier: Notifier | None = None
        self._next_ping: float | None = None
        self._status = ""
        self.memory_check_interval = memory_check_interval
        self.warm_up = warm_up
        self._next_memory_check: float | None = None
        self._beats: HeartbeatTable | None = None
        self._rolling: deque[Slot] = deque()
        self._replacing: Slot | None = None  # the rolling restart's current worker
        self._recycling: Slot | None = None  # the one worker being recycled, if any
        self._control = (ControlServer(socket_path(self.lock.path.parent, fleet.name),
                                       self._handle_request) if control else None)
        self._started = time.monotonic()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self.lock.acquire()
        try:
            self._open_wakeup()
            self._install_signal_handlers()
            if self._control is not None:
                assert self._selector is not None
                self._control.attach(self._selector)
                self._control.open()
            self._beats = HeartbeatTable(capacity=1024)
            if any(self._memory_limit(s) for s in self.slots):
                self._next_memory_check = time.monotonic() + self.memory_check_interval
            if self._systemd_notify:
                self._notifier = Notifier.from_environment()
            self._tell_systemd(time.monotonic())  # the first watchdog ping goes out at once
            setproctitle(f"prefork: master [{self.fleet.name}]")
            prepare_floor(self.fleet, freeze=self.freeze, warm_up=self.warm_up)
            log.info("master %d: fleet %s, %d workers: %s", self._pid, self.fleet.name,
                     len(self.slots), ", ".join(s.label for s in self.slots))
            for slot in self.slots:
                self._handle_signals()  # a stop during start-up forks no more workers
                if self._stopping:
                    break
                self._spawn(slot)
            else:
                self._observe("ready", None)
                if self._notifier is not None:
                    self._status = self.summary()
                    self._notifier.send("READY=1", f"STATUS={self._status}")
            while not self._finished():
                self._wait()
                self._handle_signals()
                self._reap()
                self._run_due()
                self._supervise(time.monotonic())
                self._tell_systemd(time.monotonic())
            return self._summarize()
        except BaseException:
            self._kill_everything()
            raise
        finally:
            self._restore_signal_handlers()
            if self._control is not None:
                self._control.close()
            self._close_wakeup()
            if self._beats is not None:
                self._beats.close()
            if self._notifier is not None:
                self._notifier.close()
            self.lock.release()

    def _wait(self) -> None:
        assert self._selector is not None
        timeout = self._next_deadline()
        if timeout is not None:
            timeout = max(0.0, timeout - time.monotonic())
        for key, _ in self._selector.select(timeout):
            if self._control is not None and key.data is self._control:
                self._control.handle(key.fd)  # a status request: answered at once
                continue
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        if self._control is not None:
            self._control.expire(time.monotonic())

    def _next_deadline(self) -> float | None:
        deadlines = [self._next_ping]
        if self._stopping:
            deadlines.append(self._stop_deadline)
        else:
            deadlines.extend(s.due for s in self.slots)
            deadlines.extend(s.kill_at for s in self.slots)
            deadlines.extend(self._heartbeat_deadline(s) for s in self.slots)
            deadlines.append(self._next_memory_check)
        if self._control is not None:
            deadlines.append(self._control.next_deadline())
        return min((d for d in deadlines if d is not None), default=None)

    def _finished(self) -> bool:
        busy = ALIVE if self._stopping else ACTIVE
        return not any(slot.state in busy for slot in self.slots)

    # -- events --------------------------------------------------------------------

    def _handle_signals(self) -> None:
        while self._signals:
            signum = self._signals.popleft()
            if signum in STOP_SIGNALS:
                name = signal.Signals(signum).name
                if self._stopping:
                    self._kill_stragglers(f"second {name}")
                else:
                    self._begin_stop(name)
            elif self._stopping:
                continue  # nothing but stopping while the fleet stops
            elif signum == signal.SIGHUP:
                self._begin_rolling_restart()
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self._scale_all(+1 if signum == signal.SIGTTIN else -1,
                                signal.Signals(signum).name)
            # SIGCHLD needs nothing here: every wake-up reaps.

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = self._by_pid.pop(pid, None)
            if slot is None:
                log.debug("reaped pid %d, not a worker", pid)
                continue
            self._on_exit(slot, pid, ExitStatus.from_wait_status(status), time.monotonic())

    def _on_exit(self, slot: Slot, pid: int | None, status: ExitStatus, now: float) -> None:
        uptime = now - slot.started_at
        slot.last_exit = status
        level = logging.WARNING if status.failed and not self._stopping else logging.INFO
        log.log(level, "worker %s (pid %s) exited: %s after %.3fs",
                slot.label, pid, status.describe(), uptime)
        self._observe("exited", slot)  # slot.pid is still the pid that exited
        slot.pid = None
        if self._stopping:
            slot.move(WorkerState.STOPPED)
            return
        then, slot.stop_then, slot.kill_at = slot.stop_then, None, None
        if then == "remove":
            self._remove(slot)
            return
        if then == "replace":
            slot.restarts += 1
            self._spawn(slot, count_start=False)
            return
        if then == "backoff" and slot.restart != "never":
            self._schedule_restart(slot, now, uptime)
            return
        if not should_restart(slot.restart, status) or then is not None:
            slot.move(WorkerState.FAILED if status.failed else WorkerState.EXITED)
            log.log(logging.ERROR if status.failed else logging.INFO,
                    "worker %s %s (restart=%s)", slot.label,
                    "failed" if status.failed else "finished", slot.restart)
            self._observe("failed" if status.failed else "finished", slot)
            return
        self._schedule_restart(slot, now, uptime)

    def _schedule_restart(self, slot: Slot, now: float, uptime: float) -> None:
        """BACKOFF with the next delay, or FAILED if that start would break the limit."""
        if is_stable_run(uptime, slot.backoff):
            slot.attempt = 0
        slot.attempt += 1
        delay = backoff_delay(slot.attempt, slot.backoff, self._rng.random())
        limit = slot.start_limit
        _forget_before(slot.start_times, now + delay - limit.interval)
        if exceeds_start_limit(slot.start_times, now + delay, limit):
            slot.move(WorkerState.FAILED)
            log.error("worker %s marked failed: started %d times within %gs "
                      "(start limit %d); not restarting it",
                      slot.label, len(slot.start_times), limit.interval, limit.burst)
            self._observe("failed", slot)
            return
        slot.due = now + delay
        slot.move(WorkerState.BACKOFF)
        log.info("worker %s restart %d in %.3fs", slot.label, slot.attempt, delay)
        self._observe("backoff", slot)

    def _run_due(self) -> None:
        now = time.monotonic()
        if self._stopping:
            if self._stop_deadline is not None and now >= self._stop_deadline:
                self._kill_stragglers(f"grace period of {self.grace:g}s over")
            return
        for slot in self.slots:
            if slot.due is not None and now >= slot.due:
                slot.due = None
                slot.restarts += 1
                self._spawn(slot)

    # -- systemd -------------------------------------------------------------------

    def summary(self) -> str:
        """One line for systemd's STATUS=: "4 running, 0 in backoff, 1 failed"."""
        count = {state: 0 for state in WorkerState}
        for slot in self.slots:
            count[slot.state] += 1
        text = (f"{count[WorkerState.RUNNING]} running, {count[WorkerState.BACKOFF]} in "
                f"backoff, {count[WorkerState.FAILED]} failed")
        if self._stopping:
            text = f"stopping: {count[WorkerState.STOPPING]} left; " + text
        return text

    def _tell_systemd(self, now: float) -> None:
        """Ping the watchdog when due and report a changed summary (no-op without systemd)."""
        notifier = self._notifier
        if notifier is None:
            return
        if notifier.watchdog_interval is not None and (
                self._next_ping is None or now >= self._next_ping):
            notifier.send("WATCHDOG=1")
            self._next_ping = now + notifier.watchdog_interval / 2
        status = self.summary()
        if status != self._status and self._status:  # the first STATUS goes with READY=1
            self._status = status
            notifier.send(f"STATUS={status}")

    # -- fork ----------------------------------------------------------------------

    def _spawn(self, slot: Slot, *, count_start: bool = True) -> None:
        """Fork ``slot``'s worker. ``count_start=False``: a replacement the master chose
        (recycling, rolling restart), which must not count towards the start limit."""
        flush_stdio()  # or the child's exit would never flush, and the master's twice
        context = WorkerContext(self.fleet.name, slot.worker.name, slot.replica, self._pid)
        heartbeat = None
        if slot.worker.timeout is not None and self._beats is not None:
            if slot.cell is None:
                slot.cell = self._beats.take()
            self._beats.reset(slot.cell, time.monotonic())  # the fork counts as a beat
            heartbeat = (self._beats, slot.cell, slot.worker.timeout / 4)
        self._observe("forking", slot)
        saved_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # EAGAIN/ENOMEM: a failed start, retried on the backoff
            signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
            now = time.monotonic()
            log.error("worker %s: fork failed: %s", slot.label, exc)
            slot.start_times.append(now)
            self._schedule_restart(slot, now, uptime=0.0)
            return
        if pid == 0:
            run_child(
                context,
                slot.worker.target,
                title=f"prefork: worker {slot.label} [{self.fleet.name}]",
                signal_defaults=self._signal_defaults,
                close_fds=self._own_fds(),
                heartbeat=heartbeat,
            )
        signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        slot.started_at = time.monotonic()
        slot.pid = pid
        if count_start:
            slot.start_times.append(slot.started_at)
        slot.move(WorkerState.RUNNING)
        self._by_pid[pid] = slot
        log.info("worker %s spawned (pid %d)", slot.label, pid)
        self._observe("spawned", slot)

    # -- supervising running workers: heartbeats, memory, rolling restart, scaling -----

    def _supervise(self, now: float) -> None:
        if self._stopping:
            return
        for slot in self.slots:
            if slot.kill_at is not None and now >= slot.kill_at and slot.pid is not None:
                log.warning("worker %s (pid %d) still running %gs after SIGTERM: SIGKILL",
                            slot.label, slot.pid, self.grace)
                _send(slot.pid, signal.SIGKILL)
                slot.kill_at = None
            deadline = self._heartbeat_deadline(slot)
            if deadline is not None and now >= deadline:
                assert self._beats is not None and slot.cell is not None
                silent = now - self._beats.last(slot.cell)
                self._stop_worker(slot, f"no heartbeat for {silent:.1f}s (timeout "
                                  f"{slot.worker.timeout:g}s)", "backoff", now)
        self._check_memory(now)
        self._advance_rolling_restart(now)

    def _heartbeat_deadline(self, slot: Slot) -> float | None:
        if (slot.state is not WorkerState.RUNNING or slot.cell is None
                or slot.worker.timeout is None or self._beats is None):
            return None
        return self._beats.last(slot.cell) + slot.worker.timeout

    def _memory_limit(self, slot: Slot) -> int | None:
        return slot.worker.max_private_memory or self.fleet.max_private_memory

    def _check_memory(self, now: float) -> None:
        """Every ``memory_check_interval``: read each limited worker's USS (about 1 ms a
        worker) and recycle one that stayed above its limit for a whole interval - only
        one at a time, so a fleet-wide leak is not a fleet-wide restart."""
        if self._next_memory_check is None or now < self._next_memory_check:
            return
        self._next_memory_check = now + self.memory_check_interval
        if self._recycling is not None and self._recycling.state is not WorkerState.STOPPING:
            self._recycling = None
        for slot in self.slots:
            limit = self._memory_limit(slot)
            if limit is None or slot.state is not WorkerState.RUNNING or slot.pid is None:
                continue
            try:
                uss = measure(slot.pid).uss
            except MemoryUnavailable:
                continue  # it just exited: the reaper will see it
            slot.over_since, recycle = over_memory_limit(uss, limit, slot.over_since, now,
                                                         self.memory_check_interval)
            if recycle and self._recycling is None:
                self._recycling = slot
                self._stop_worker(slot, f"recycled: private memory {uss / MIB:.0f} MiB > "
                                  f"{limit / MIB:.0f} MiB", "replace", now)

    def _stop_worker(self, slot: Slot, reason: str, then: str, now: float) -> None:
        """SIGTERM one worker, SIGKILL after the grace period; ``then`` says what follows."""
        assert slot.pid is not None
        slot.reason, slot.stop_then, slot.kill_at = reason, then, now + self.grace
        slot.over_since = None
        level = logging.WARNING if then == "backoff" else logging.INFO
        log.log(level, "worker %s (pid %d) %s: SIGTERM", slot.label, slot.pid, reason)
        _send(slot.pid, signal.SIGTERM)
        slot.move(WorkerState.STOPPING)
        self._observe("stopping-worker", slot)

    def _begin_rolling_restart(self) -> None:
        queued = [s for s in self.slots if s.state in (WorkerState.RUNNING, WorkerState.BACKOFF)
                  and s not in self._rolling and s is not self._replacing]
        self._rolling.extend(queued)
        log.info("SIGHUP: rolling restart of %d workers, one at a time", len(self._rolling))

    def _advance_rolling_restart(self, now: float) -> None:
        """Replace the next worker once the previous one is back: never two copies of a
        worker at once, and never more than one worker of the fleet down for it."""
        if self._replacing is not None and self._replacing.state is WorkerState.STOPPING:
            return
        in_progress = self._replacing is not None or bool(self._rolling)
        self._replacing = None
        while self._rolling:
            slot = self._rolling.popleft()
            if slot.state is WorkerState.RUNNING and slot in self.slots:
                self._replacing = slot
                self._stop_worker(slot, "rolling restart", "replace", now)
                return
            # In backoff, it will start from the same floor when due; gone: nothing to do.
        if in_progress:
            log.info("rolling restart done")

    def _scale_all(self, delta: int, cause: str) -> None:
        scalable = [w for w in self.fleet.workers if w.max_replicas is not None]
        if not scalable:
            log.warning("%s: no worker allows replicas (set max_replicas)", cause)
        for worker in scalable:
            try:
                log.info("%s: %s", cause, self.scale(worker.name, delta))
            except ValueError as exc:
                log.warning("%s: %s", cause, exc)

    def scale(self, name: str, delta: int) -> str:
        """One replica more (``delta=1``) or fewer (``-1``) of worker ``name``; returns
        what was done, raises ValueError (one line) when it cannot."""
        worker = next((w for w in self.fleet.workers if w.name == name), None)
        if worker is None:
            raise ValueError(f"no worker named {name!r}")
        if worker.max_replicas is None:
            raise ValueError(f"worker {name} has a fixed number of replicas (no max_replicas)")
        if delta not in (1, -1):
            raise ValueError(f"scale by +1 or -1, not {delta!r}")
        mine = self._replicas(name)
        if delta == 1:
            if len(mine) >= worker.max_replicas:
                raise ValueError(f"worker {name} already runs {len(mine)} replicas "
                                 f"(max_replicas {worker.max_replicas})")
            slot = new_slot(self.fleet, worker, next_replica(s.replica for s in mine))
            self.slots.append(slot)
            self._spawn(slot)
            return f"worker {name}: {len(mine) + 1} replicas, started {slot.label}"
        if len(mine) <= 1:
            raise ValueError(f"worker {name} runs 1 replica, the fewest it can")
        slot = max(mine, key=lambda s: s.replica)
        if slot.state is WorkerState.RUNNING:
            self._stop_worker(slot, "scaled down", "remove", time.monotonic())
        elif slot.state is WorkerState.STOPPING:
            slot.stop_then = "remove"  # already going (recycled, say): do not replace it
        else:
            self._remove(slot)
        return f"worker {name}: {len(mine) - 1} replicas, stopping {slot.label}"

    def _replicas(self, name: str) -> list[Slot]:
        """Worker ``name``'s slots, less one being stopped to be removed."""
        return [s for s in self.slots if s.worker.name == name and s.stop_then != "remove"]

    def _remove(self, slot: Slot) -> None:
        if slot.state in (WorkerState.BACKOFF, WorkerState.STOPPING):
            slot.due = None
            slot.move(WorkerState.STOPPED)
        self.slots.remove(slot)
        if slot.cell is not None and self._beats is not None:
            self._beats.give_back(slot.cell)
        log.info("worker %s removed", slot.label)
        self._observe("removed", slot)

    # -- the control socket ----------------------------------------------------------

    def _handle_request(self, request: dict[str, object]) -> dict[str, object]:
        command = request.get("command")
        if command == "status":
            return self.status()
        if command == "scale":
            name = str(request.get("worker"))
            try:
                self.scale(name, request.get("delta"))  # type: ignore[arg-type]
            except ValueError as exc:
                return {"error": str(exc)}
            return {"fleet": self.fleet.name, "worker": name,
                    "replicas": len(self._replicas(name))}
        return {"error": f"unknown command {command!r}"}

    def status(self) -> dict[str, object]:
        """The master and every worker slot, as `prefork status` shows them."""
        now = time.monotonic()
        return {
            "fleet": self.fleet.name,
            "master_pid": self._pid,
            "uptime": round(now - self._started, 3),
            "python": sys.version.split()[0],
            "workers": [self._slot_status(slot, now) for slot in self.slots],
        }

    def _slot_status(self, slot: Slot, now: float) -> dict[str, object]:
        state = str(slot.state)
        if (slot.state is WorkerState.RUNNING and slot.cell is not None
                and self._beats is not None and self._beats.last(slot.cell) <= slot.started_at):
            state = "starting"  # forked, but it has not sent its first heartbeat yet
        alive = slot.state in ALIVE
        return {
            "name": slot.worker.name,
            "replica": slot.replica,
            "label": slot.label,
            "pid": slot.pid,
            "state": state,
            "restarts": slot.restarts,
            "uptime": round(now - slot.started_at, 3) if alive else None,
            "last_exit": slot.last_exit.describe() if slot.last_exit else None,
            "reason": slot.reason,
            "next_start_in": round(max(slot.due - now, 0.0), 3) if slot.due else None,
        }

    # -- stop ----------------------------------------------------------------------

    def _begin_stop(self, reason: str) -> None:
        self._stopping = True
        self._stop_started = time.monotonic()
        self._stop_deadline = self._stop_started + self.grace
        self._observe("stopping", None)
        if self._notifier is not None:
            self._notifier.send("STOPPING=1")
        self._rolling.clear()
        for slot in self.slots:
            slot.kill_at = slot.stop_then = None  # the fleet's grace period rules now
            if slot.state is WorkerState.BACKOFF:
                slot.due = None
                slot.move(WorkerState.STOPPED)
        running = [s for s in self.slots if s.state is WorkerState.RUNNING]
        log.info("stopping on %s: SIGTERM to %d workers, grace %gs", reason, len(running),
                 self.grace)
        for slot in running:
            assert slot.pid is not None
            _send(slot.pid, signal.SIGTERM)
            slot.move(WorkerState.STOPPING)

    def _kill_stragglers(self, reason: str) -> None:
        self._stop_deadline = None
        for slot in self.slots:
            if slot.state in ALIVE and slot.pid is not None:
                log.warning("worker %s (pid %d) still running, %s: SIGKILL", slot.label,
                            slot.pid, reason)
                _send(slot.pid, signal.SIGKILL)
                self._killed_stragglers += 1

    def _kill_everything(self) -> None:
        """The master itself failed: leave no child behind, and no zombie."""
        for pid in list(self._by_pid):
            _send(pid, signal.SIGKILL)
        for pid in list(self._by_pid):
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._by_pid.clear()

    def _summarize(self) -> int:
        self._reap()
        failed = [s.label for s in self.slots if s.state is WorkerState.FAILED]
        elapsed = time.monotonic() - self._stop_started if self._stopping else 0.0
        how = f"stopped in {elapsed:.3f}s" if self._stopping else "no worker left to run"
        log.info("master %d: %s; %d killed after the grace period; failed: %s", self._pid,
                 how, self._killed_stragglers, ", ".join(failed) or "none")
        return EXIT_WORKERS_FAILED if failed else EXIT_OK

    # -- plumbing ------------------------------------------------------------------

    def _open_wakeup(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def _close_wakeup(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def _own_fds(self) -> list[int]:
        fds = [self._wake_r, self._wake_w]
        if self._selector is not None:
            fds.append(self._selector.fileno())  # type: ignore[attr-defined]
        if self.lock.fd is not None:
            fds.append(self.lock.fd)
        if self._notifier is not None:
            fds.append(self._notifier.fileno())
        if self._control is not None:
            fds.extend(self._control.own_fds())
        return fds

    def _install_signal_handlers(self) -> None:
        for signum in HANDLED_SIGNALS:
            previous = signal.getsignal(signum)
            self._signal_defaults[signum] = signal.SIG_DFL if previous is None else previous
            signal.signal(signum, self._on_signal)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _restore_signal_handlers(self) -> None:
        if not self._signal_defaults:
            return
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        for signum, handler in self._signal_defaults.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._signal_defaults.clear()

    def _on_signal(self, signum: int, _frame: object) -> None:
        # Only record: no logging or I/O here (a handler can interrupt a log call).
        self._signals.append(signum)

    def _observe(self, event: str, slot: Slot | None) -> None:
        if self._observer is not None:
            self._observer(event, slot, time.monotonic())


class WarmUpError(Exception):
    """A worker's warm-up failed in the master. ``str()`` is one line for the user."""


def prepare_floor(fleet: Fleet, *, freeze: bool, warm_up: bool = False) -> None:
    """Make the floor ready to fork: optionally run every worker's warm-up once, then
    collect and freeze every object the floor made, so a child's own collections never
    write to the floor's pages (make measure, cpu fleet, 59 MiB floor: a working child
    holds 25-27 MiB private unfrozen against 6-7 MiB frozen, on 3.11, 3.12 and 3.13).

    A warm-up that raises is a :class:`WarmUpError`: the master has not forked yet.
    """
    if warm_up:
        for worker in fleet.workers:
            if worker.warmup is not None:
                started = time.perf_counter()
                try:
                    worker.warmup()
                except Exception as exc:
                    raise WarmUpError(f"worker {worker.name}: warm-up failed: "
                                      f"{type(exc).__name__}: {exc}") from exc
                log.debug("worker %s: warmed up in the master in %.0f ms", worker.name,
                          (time.perf_counter() - started) * 1000)
    if not freeze:
        return
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug("gc: froze %d objects in %.1f ms", gc.get_freeze_count(),
              (time.perf_counter() - started) * 1000)


def _forget_before(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # already dead, not yet reaped: the reaper will see it
        pass
