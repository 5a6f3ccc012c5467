"""The master: fork one child per worker slot, reap on events, restart on backoff, stop.

The loop sleeps in ``select()`` on one wake-up pipe, the control socket and the
readiness pipes of workers others start after (:mod:`prefork.readiness`), with a
timeout that is the earliest deadline of its watches (:mod:`prefork.watches`: a
scheduled restart, the end of a grace period, a heartbeat timeout, the next memory
check; the control server's and systemd's watchdog's) or none at all, so an idle master
with healthy workers and no limits is never woken by a clock. Signals only queue their
number and wake it (:mod:`prefork.signals`). Each wake-up: handle queued signals, reap
every dead child with ``waitpid(-1, WNOHANG)`` until none is left, then carry out what
each watch says is due. Each slot decides what an exit means (:mod:`prefork.slot`); the
master forks, signals, reaps and removes. A worker is its whole process tree: the master
is a child subreaper, and what a worker leaves behind is stopped too (:mod:`prefork.trees`).
"""

from __future__ import annotations

import _signal
import contextlib
import logging
import os
import random
import selectors
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from setproctitle import setproctitle

from prefork import journal, logs, titles
from prefork.after_fork import DEFAULT_REPORT_AFTER, ImportReports
from prefork.child import ChildPlan, WorkerContext, flush_stdio, run_child, worker_environ
from prefork.control import ControlServer, command_table
from prefork.exits import ExitCode
from prefork.fleet import DEFAULT_GRACE, DEFAULT_MEMORY_CHECK_INTERVAL, POOL_WORKER, Fleet
from prefork.floor import prepare_floor
from prefork.groups import GroupHost, host_groups
from prefork.lock import FleetLock
from prefork.metrics_process import ExporterProcess, MetricsOptions
from prefork.notify import SystemdReporter
from prefork.paths import default_runtime_dir, socket_path
from prefork.policy import ExitStatus
from prefork.readiness import StartOrder
from prefork.reload import (
    HANDOVER_VERSION,
    ReloadState,
    Trial,
    adopt_slots,
    handed_fds,
    handed_workers,
    reexec,
    removed_worker,
    run_trial,
    write_handover,
)
from prefork.scaling import plan_scale, replicas
from prefork.signals import IGNORED, STOP, SignalInbox, signal_name
from prefork.slot import Next, Slot, StopReason, slots_for, summary
from prefork.states import ACTIVE, ALIVE, WorkerState
from prefork.threads import ThreadCheck
from prefork.trees import WorkerTrees, become_subreaper, send, signal_tree
from prefork.watches import (
    Action,
    Add,
    AgeWatch,
    HeartbeatWatch,
    Kill,
    MemoryWatch,
    Remove,
    RollingRestart,
    SlotTimers,
    Start,
    Stop,
    Watch,
)
from prefork.worker_logs import WorkerLogs, reopen_logs

if TYPE_CHECKING:
    from prefork.kernel_pool import KernelPool

log = logging.getLogger("prefork")

# observer(event, slot, time.monotonic()) for each lifecycle event: "forking", "spawned",
# "exited" (slot.pid is the pid that exited, slot.last_exit how), "backoff", "failed",
# "finished", "ready" (all forked but those waiting), "waiting" (for the workers in its
# `after`), "stopping" (the fleet), "stopping-worker" (one worker, slot.reason says why),
# "removed" (scaled down). It runs in the master's loop: keep it quick.
Observer = Callable[[str, "Slot | None", float], None]

MAX_SLEEP = 86400.0  # seconds: the longest the loop sleeps in one select()

# What a slot's state after an exit is called in the observer's events.
_SETTLED_EVENTS = {WorkerState.BACKOFF: "backoff", WorkerState.FAILED: "failed",
                   WorkerState.EXITED: "finished"}


@dataclass
class _Fork:
    """One worker's fork, made ready before a batch forks (:meth:`Master._spawn_all`): the
    plan its child is given, which holds the pipe ends only that child keeps."""

    slot: Slot
    plan: ChildPlan

    def child_fds(self) -> list[int]:
        """The write ends made for this child alone: every other child closes them, or
        this child's EOF would never come."""
        plan = self.plan
        fds = [plan.ready_fd] if plan.ready_fd >= 0 else []
        if plan.imports is not None:
            fds.append(plan.imports[0])
        if plan.output is not None:
            fds.append(plan.output)
        return fds


class Master:
    """Run ``fleet`` until a stop signal, or until no worker is left to supervise.

    ``run()`` returns an exit code: ``ExitCode.OK``, or ``ExitCode.WORKERS_FAILED`` when a
    worker ended in the failed state. It raises ``AlreadyRunning`` when another master
    holds the fleet's lock and ``RuntimeDirError`` when the lock's directory is unsafe.
    Other threads in the master before the first fork are a warning, or with
    ``strict_fork`` a ``ThreadsAtFork`` (:mod:`prefork.threads`). ``run()`` makes the
    calling process a child subreaper for good (``PR_SET_CHILD_SUBREAPER``).
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        grace: float = DEFAULT_GRACE,
        freeze: bool = True,
        runtime_dir: Path | None = None,
        observer: Observer | None = None,
        rng: random.Random | None = None,
        systemd_notify: bool = True,
        memory_check_interval: float = DEFAULT_MEMORY_CHECK_INTERVAL,
        control: bool = True,
        warm_up: bool = False,
        strict_fork: bool = False,
        worker_log_dir: Path | None = None,
        metrics: MetricsOptions | None = None,
        learn_floor: bool = False,
        report_imports_after: float = DEFAULT_REPORT_AFTER,
        spec: str | None = None,
        before_first_fork: Callable[[], None] | None = None,
        reload_command: tuple[list[str], str] | None = None,
        handover: dict[str, Any] | None = None,
        reload_error: str | None = None,
    ) -> None:
        fleet = fleet.validate()
        if fleet.groups:  # from here on each worker group is one worker (prefork.groups)
            fleet = host_groups(fleet).validate()
        if fleet.offload is not None:  # before any fork: Dask's client, shared
            from prefork import dask_offload, offload

            dask_offload.import_distributed()
            offload.use_cluster(dask_offload.DaskOffload(fleet.offload, fleet.offload_fallback))
        directory = runtime_dir or default_runtime_dir()
        self._kernel_pool: KernelPool | None = None
        if fleet.kernel_workers:
            from prefork.kernel_pool import KernelPool  # only a fleet with a pool needs it

            self._kernel_pool = KernelPool(directory, fleet.name, fleet.kernel_workers)
            fleet = self._kernel_pool.with_pool(fleet)
        self.fleet = fleet
        # Called once, after everything the first batch needs is made and with the
        # handled signals blocked, just before its first fork; it must not raise.
        # `prefork probe` forks its bare child there (prefork.probe_run).
        self._before_first_fork = before_first_fork
        self.spec = spec  # the --fleet it was started with: status finds it by that
        self.grace = grace
        self.freeze = freeze
        self.warm_up = warm_up
        self._threads = ThreadCheck(strict=strict_fork)
        self.slots = slots_for(fleet)
        self.lock = FleetLock(directory, fleet.name)
        self.stopping = False
        self._observer = observer
        self._rng = rng or random.Random()
        self._by_pid: dict[int, Slot] = {}
        self._pid = os.getpid()
        self._started = time.monotonic()
        self._stop_started = 0.0
        self._killed_at_stop = 0
        # A code reload (prefork.reload) runs this command line again: first as a trial,
        # then in place of this image; None (a master not started by `prefork run`): a
        # reload restarts the workers from the floor already loaded.
        self._reload_command = reload_command
        self._handover = handover  # what the image before the exec handed over
        self._reload = ReloadState() if handover is None else ReloadState.adopted(
            handover["reloads"], loaded=reload_error is None)
        self._reload_error = reload_error  # the new code failed after the exec: no floor
        self._trial: Trial | None = None
        self._reexec_due = False  # the trial passed: re-execute at the loop's next turn
        if handover is not None:
            self._started = handover["started_at"]  # one monotonic clock across the exec
        self._signals = SignalInbox()
        # The inbox's signals, blocked across each fork. Through _signal, the C function
        # signal.pthread_sigmask wraps: its conversion of the returned mask to enums cost
        # 85 us a fork for 47 signals (real-time ones are no enum members), against 3 us.
        self._blocked: list[int] = []
        self._selector: selectors.BaseSelector | None = None
        self._systemd_notify = systemd_notify
        self._systemd: SystemdReporter | None = None
        self._journal = journal.for_workers()  # each worker its own stream, under journald
        self._timers = SlotTimers(self.slots, grace)
        self._heartbeats = HeartbeatWatch(self.slots)
        self._memory = MemoryWatch(self.slots, fleet.max_private_memory, memory_check_interval)
        self._ages = AgeWatch(self.slots, fleet.max_age, self._rng)
        self._rolling = RollingRestart(self.slots)
        self._start_order = StartOrder(fleet, self.slots)
        # What each child imports after the fork (prefork.after_fork); with learn_floor,
        # kept in the fleet's state directory and imported at the next start.
        self._imports = ImportReports(report_imports_after)
        self._learn_floor = learn_floor
        # The metrics exporter (prefork.metrics_process): a child of the master's own,
        # which WorkerTrees must not take for one a worker left behind.
        self._exporter = None if metrics is None else ExporterProcess(
            metrics, fleet=fleet.name, runtime_dir=directory, backoff=fleet.backoff)
        if self._exporter is not None and not control:
            raise ValueError("metrics need the control socket: the exporter asks it")
        self._trees = WorkerTrees(self._by_pid.__contains__, is_own=self._is_own_child)
        self._supervising: list[Watch] = []  # the loop's watches, made by _open()
        self._while_stopping: list[Watch] = []
        self._control = (ControlServer(socket_path(directory, fleet.name), command_table(
            status=lambda _request: self.status(), scale=self._scale_request,
            reload=self._reload_request))
            if control else None)
        # Each worker's stdout/stderr through a pipe into its own file (prefork.worker_logs);
        # raises WorkerLogError for an unusable directory, before anything forks.
        self._worker_logs = (None if worker_log_dir is None else
                             WorkerLogs(worker_log_dir, [s.label for s in self.slots]))

    # -- the loop ------------------------------------------------------------------

    def run(self) -> int:
        self.lock.acquire()
        try:
            if self._learn_floor:  # before the floor is frozen, and before our handlers
                from prefork.learned_floor import learn  # only for a master that learns

                self._imports.learn = learn(self.fleet.name)
            self._open()
            if self._handover is not None:  # blocked across the exec: what came is due now
                _signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
            setproctitle(titles.master(self.fleet.name))
            if self._handover is None:
                self._run_hook("on_starting", self.fleet)
            prepare_floor(self.fleet, freeze=self.freeze, warm_up=self.warm_up)
            self._threads.check()  # strict: ThreadsAtFork, before any fork
            log.info("master %d: fleet %s, %d workers: %s", self._pid, self.fleet.name,
                     len(self.slots), ", ".join(s.label for s in self.slots))
            # Before the signals: a stop asked for across the exec stops the adopted too.
            adopted = [] if self._handover is None else self._adopt_workers(self._handover)
            self._handle_signals()  # a stop asked for during the import forks nothing
            if not self.stopping and self._reload_error is None:
                self._spawn_all([slot for slot in list(self.slots)
                                 if slot.state is WorkerState.STOPPED and not self._waits(slot)])
            if not self.stopping:
                if self._exporter is not None and self._exporter.pid is None:
                    self._exporter.start(time.monotonic())
                if self._handover is None:
                    self._observe("ready", None)
                    if self._systemd is not None:
                        self._systemd.ready()
                elif self._reload_error is not None:
                    self._end_reload(self._reload_error)
                else:
                    self._roll("reload: new code imported", adopted)
            while True:
                if not self._workers_busy():
                    if self._exporter is not None:
                        self._exporter.stop()  # it reported the fleet to its end
                    if not self._trees.children_left:
                        break
                    # No worker to wait for, only what they left behind (prefork.trees).
                    self._trees.no_worker_left(self._end_of_grace())
                self._wait()
                self._handle_signals()
                self._reap()
                self._start_released()  # before the loop's end is judged: they are work
                now = time.monotonic()
                for watch in self._watches():
                    for action in watch.due(now):
                        self._act(action, now)
                if self._reload.phase == "rolling" and not self._rolling.in_progress:
                    self._end_reload(None)
                if self._reexec_due:
                    self._reexec()  # returns only if a signal must be handled first, or failed
            return self._summarize()
        except BaseException:  # the master itself failed: leave no child, and no zombie
            self._kill_and_reap()
            raise
        finally:
            self._run_hook("on_exit", self.fleet)
            self._close()
            self.lock.release()

    def _watches(self) -> list[Watch]:
        """While the fleet stops: only grace periods, the control socket and systemd (and
        the deadline of a reload's trial, to the end)."""
        watches = self._while_stopping if self.stopping else self._supervising
        return watches if self._trial is None else [*watches, self._trial]

    def _wait(self) -> None:
        assert self._selector is not None
        deadline = min((d for w in self._watches() if (d := w.next_deadline()) is not None),
                       default=None)
        # At most a day: epoll's timeout is an int of milliseconds (24.8 days).
        timeout = None if deadline is None else min(max(0.0, deadline - time.monotonic()),
                                                     MAX_SLEEP)
        for key, _ in self._selector.select(timeout):
            if self._control is not None and key.data is self._control:
                self._control.handle(key.fd)  # a status request: answered at once
            elif key.data is self._start_order:
                self._start_order.read(key.fd)  # a worker others wait for is ready
            elif key.data is self._imports:
                self._imports.read(key.fd)  # what a worker imported after the fork
            elif isinstance(key.data, WorkerLogs):
                key.data.read(key.fd)  # one bounded read: every pipe gets a turn
            elif isinstance(key.data, Trial):
                if not key.data.read():  # EOF: its exit ends it (self._reap)
                    self._selector.unregister(key.fd)
            else:
                self._signals.drain()

    def _workers_busy(self) -> bool:
        """A worker is still to supervise (or, while the fleet stops, to wait for)."""
        busy = ALIVE if self.stopping else ACTIVE
        return any(slot.state in busy for slot in self.slots)

    def _end_of_grace(self) -> float:
        """When what is still running gets SIGKILL: the fleet's grace period, from the
        stop signal, or from now when the workers ended on their own."""
        return (self._stop_started if self.stopping else time.monotonic()) + self.grace

    # -- events --------------------------------------------------------------------

    def _handle_signals(self) -> None:
        ignored: dict[int, int] = {}  # not a Counter: 70 us more on SIGTERM to stopping
        for signum in self._signals.take():
            name = signal_name(signum)
            if signum in STOP:
                if self.stopping:
                    for slot in self.slots:
                        self._kill(slot, f", second {name}")
                    self._trees.kill_all()
                else:
                    self._begin_stop(name)
            elif signum == signal.SIGCHLD:
                continue  # nothing but the wake-up: every wake-up reaps
            elif signum == signal.SIGUSR1:
                reopen_logs(self._worker_logs)
                if self._exporter is not None:
                    self._exporter.send(signal.SIGUSR1)  # it appends to the same file
            elif signum in IGNORED:
                ignored[signum] = ignored.get(signum, 0) + 1
            elif self.stopping:  # nothing but stopping while the fleet stops
                log.info("%s: ignored while the fleet stops", name)
            elif signum == signal.SIGHUP:
                self.reload(workers_only=False, cause="SIGHUP")
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self._scale_all(+1 if signum == signal.SIGTTIN else -1, name)
        for signum, count in ignored.items():  # one line for a burst, not one per signal
            log.warning("%s%s: ignored (it means nothing to a prefork master; see the "
                        "README's signal table)", signal_name(signum),
                        f" x{count}" if count > 1 else "")

    def _reap(self) -> None:
        while True:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self._trees.children_left = False
                return
            if pid == 0:
                self._trees.children_left = True
                return
            slot = self._by_pid.pop(pid, None)
            now = time.monotonic()
            if slot is None and self._trial is not None and pid == self._trial.pid:
                self._trial_ended(ExitStatus.from_wait_status(wait_status))
                continue
            if slot is None and self._is_exporter(pid):
                assert self._exporter is not None
                self._exporter.exited(ExitStatus.from_wait_status(wait_status), now)
                continue
            if slot is None:  # left behind by a worker, re-parented to us (prefork.trees)
                log.debug("reaped pid %d, not a worker", pid)
                continue
            # What it started gets the rest of the grace it was given, or one of its own.
            self._trees.worker_exited(pid, slot.label, slot.kill_at or now + self.grace)
            status = ExitStatus.from_wait_status(wait_status)
            shutdown = slot.stopping_for is StopReason.SHUTDOWN
            log.log(logging.WARNING if status.failed and not shutdown else logging.INFO,
                    "worker %s (pid %s) exited: %s after %.3fs", slot.label, pid,
                    status.describe(), now - slot.started_at)
            self._run_hook("worker_exit", self._context(slot, pid), status)
            self._observe("exited", slot)  # slot.pid is still the pid that exited
            then = slot.exited(status, now, self._rng)
            self._start_order.exited(slot)
            self._imports.exited(slot)
            if then is Next.START:
                slot.restarts += 1
                self._spawn(slot, count_start=False)
            elif then is Next.REMOVE:
                self._remove(slot)
            elif slot.state in _SETTLED_EVENTS:
                self._observe(_SETTLED_EVENTS[slot.state], slot)

    def _act(self, action: Action, now: float) -> None:
        match action:
            case Start(slot):
                slot.restarts += 1
                self._spawn(slot)
            case Stop(slot, reason, detail):
                self._stop(slot, reason, detail, now)
            case Kill(slot, why):
                self._kill(slot, why)
            case Add(slot):
                self.slots.append(slot)
                self._start(slot)
            case Remove(slot):
                self._remove(slot)

    # -- start order ----------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        """Fork ``slot``'s first worker, or leave it WAITING for those in its ``after``."""
        if not self._waits(slot):
            self._spawn(slot)

    def _waits(self, slot: Slot) -> bool:
        """True if ``slot`` must wait for those in its ``after`` (it is now WAITING)."""
        if self._start_order.holds(slot):
            self._observe("waiting", slot)
            return True
        return False

    def _start_released(self) -> None:
        """Fork the WAITING slots whose ``after`` workers have all become ready."""
        released = self._start_order.released()
        for slot in released:
            log.info("worker %s: %s ready, starting it", slot.label, ", ".join(slot.worker.after))
        self._spawn_all(released)

    # -- fork ----------------------------------------------------------------------

    def _spawn(self, slot: Slot, *, count_start: bool = True) -> None:
        """Fork ``slot``'s worker. ``count_start=False``: a replacement the master chose
        (recycling, rolling restart), which must not count towards the start limit."""
        self._spawn_all([slot], count_start=count_start)

    def _spawn_all(self, slots: list[Slot], *, count_start: bool = True) -> None:
        """Fork every slot's worker, back to back: everything a fork needs is made before
        the first, and the bookkeeping (logs included) waits until after the last. A page
        the master writes between two forks stays, in its old version, private to every
        child forked before: doing one worker's bookkeeping between forks cost each
        earlier idle child ~0.3 MiB (measured on the cpu floor)."""
        if not slots:
            return
        forks = [self._prepare_fork(slot) for slot in slots]
        # Each child closes these but its own: the master's, and its siblings' pipe ends.
        close_fds = self._own_fds() + [fd for fork in forks for fd in fork.child_fds()]
        self._threads.check()  # a thread started since the last fork: warned about once
        flush_stdio()  # or the child's exit would never flush, and the master's twice
        results: list[int | OSError] = [0] * len(forks)
        saved_mask = _signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked)  # prefork.child
        try:
            if self._before_first_fork is not None:
                hook, self._before_first_fork = self._before_first_fork, None
                hook()
            for i, fork in enumerate(forks):  # nothing else between two forks
                try:
                    pid = os.fork()
                except OSError as exc:  # EAGAIN/ENOMEM: a failed start, retried on the backoff
                    results[i] = exc
                    continue
                if pid == 0:
                    run_child(fork.plan, close_fds)
                results[i] = pid
        finally:
            _signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)
        for fork, result in zip(forks, results, strict=True):
            self._forked(fork, result, count_start)

    def _prepare_fork(self, slot: Slot) -> _Fork:
        context = self._context(slot)
        self._run_hook("pre_fork", context)
        # Made before the fork: after it, each page either process writes is copied
        # (20 more faults a fork in the master when the child built these itself).
        fork = _Fork(slot, ChildPlan(
            context, slot.label, slot.worker.target, titles.worker(slot.label, self.fleet.name),
            self._signals.defaults, worker_environ(context),
            heartbeat=self._heartbeats.arm(slot, time.monotonic()),
            post_fork=self.fleet.post_fork, journal=self._journal,
            ready_fd=self._start_order.arm(slot), settings=slot.worker.process_plan,
            # The pipe's write end the child makes its stdout and stderr (worker_logs).
            output=None if self._worker_logs is None else self._worker_logs.output_for(
                slot.label),
            imports=self._imports.arm(slot), inherit=self._inherited(slot)))
        self._observe("forking", slot)
        return fork

    def _inherited(self, slot: Slot) -> tuple[int, ...]:
        """The master's descriptors that ``slot``'s child keeps: the kernel pool's socket,
        in the pool's processes."""
        if self._kernel_pool is None or slot.worker.name != POOL_WORKER:
            return ()
        return tuple(self._kernel_pool.fds())

    def _forked(self, fork: _Fork, result: int | OSError, count_start: bool) -> None:
        """The master's half of one fork, once the whole batch is forked."""
        slot, now = fork.slot, time.monotonic()
        pid = None if isinstance(result, OSError) else result
        self._start_order.forked(slot, pid is not None)
        self._imports.forked(slot, pid, now)
        if fork.plan.output is not None:
            # The child's now (EOF comes when its whole tree has exited); after a failed
            # fork the read end sees EOF and is closed by the loop.
            os.close(fork.plan.output)
        if pid is None:
            log.error("worker %s: fork failed: %s", slot.label, result)
            slot.fork_failed(now, self._rng)
            self._observe(_SETTLED_EVENTS[slot.state], slot)
            return
        try:
            os.setpgid(pid, pid)  # the child does it too: whichever runs first (prefork.child)
        except OSError:  # it has exited already
            pass
        slot.started(pid, now, count_start=count_start)
        self._by_pid[pid] = slot
        log.info("worker %s spawned (pid %d)", slot.label, pid)
        self._observe("spawned", slot)

    # -- stop: one worker, or all of them --------------------------------------------

    def _stop(self, slot: Slot, reason: StopReason, detail: str, now: float) -> None:
        """SIGTERM one worker, SIGKILL after the grace period (:class:`SlotTimers`);
        ``reason`` says what follows once it is reaped. A worker already stopping is not
        signalled again: its stop now ends as ``reason`` says."""
        if slot.state is WorkerState.RUNNING and slot.pid is not None:
            log.log(reason.level, "worker %s (pid %d) %s: SIGTERM", slot.label, slot.pid,
                    detail)
            send(slot.pid, signal.SIGTERM)
        slot.stopping(reason, detail, now + self.grace)
        self._observe("stopping-worker", slot)

    def _kill(self, slot: Slot, why: str) -> None:
        slot.kill_at = None
        if slot.state not in ALIVE or slot.pid is None:
            return
        log.warning("worker %s (pid %d) still running%s: SIGKILL", slot.label, slot.pid, why)
        signal_tree(slot.pid, signal.SIGKILL)  # its group: what it started dies with it
        if self.stopping:
            self._killed_at_stop += 1

    def _begin_stop(self, cause: str) -> None:
        self.stopping = True
        now = self._stop_started = time.monotonic()
        self._observe("stopping", None)
        if self._systemd is not None:
            self._systemd.stopping()
        self._rolling.cancel()
        if self._trial is not None:
            self._trial.kill()  # its exit ends the reload (self._trial_ended)
        for slot in self.slots:
            slot.shut_down()
        log.info("stopping on %s: SIGTERM to %d workers, grace %gs", cause,
                 sum(s.state is WorkerState.RUNNING for s in self.slots), self.grace)
        for slot in self.slots:
            if slot.state in ALIVE:
                self._stop(slot, StopReason.SHUTDOWN, f"fleet stopping on {cause}", now)

    def _summarize(self) -> int:
        self._reap()
        failed = [s.label for s in self.slots if s.state is WorkerState.FAILED]
        elapsed = time.monotonic() - self._stop_started if self.stopping else 0.0
        how = f"stopped in {elapsed:.3f}s" if self.stopping else "no worker left to run"
        # Left waiting behind a failed dependency: never started (systemd's "dependency
        # failed"); the failed dependency makes the exit code WORKERS_FAILED.
        never = [f"{s.label} ({s.reason})" for s in self._start_order.waiting()]
        log.info("master %d: %s; %d killed after the grace period; failed: %s%s", self._pid,
                 how, self._killed_at_stop, ", ".join(failed) or "none",
                 f"; never started: {', '.join(never)}" if never else "")
        return ExitCode.WORKERS_FAILED if failed else ExitCode.OK

    # -- scaling ---------------------------------------------------------------------

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
        if self.stopping or self._trees.ending:
            raise ValueError("the fleet is stopping: it scales no more")
        done, actions = plan_scale(self.fleet, self.slots, name, delta)
        for action in actions:
            self._act(action, time.monotonic())
        return done

    def _remove(self, slot: Slot) -> None:
        slot.removed()
        self.slots.remove(slot)
        self._heartbeats.release(slot)
        log.info("worker %s removed", slot.label)
        self._observe("removed", slot)

    # -- reload: new code from disk (prefork.reload), or the workers again ---------------

    def reload(self, *, workers_only: bool, cause: str) -> tuple[int, bool]:
        """Begin a reload, or queue it behind the one under way: its id, and whether it
        was queued. ``workers_only``, or a master without a command line to run again:
        replace the workers from the floor already loaded. Raises ValueError (one line)
        while the fleet stops."""
        if self.stopping or self._trees.ending:
            raise ValueError("the fleet is stopping: it reloads no more")
        kind = "workers" if workers_only or self._reload_command is None else "code"
        if not workers_only and self._reload_command is None:
            log.info("%s: no command line to import new code with (a master not run by "
                     "`prefork run`): the workers restart from the floor loaded", cause)
        reload_id, queued = self._reload.ask(kind)
        if queued:
            log.info("%s: a reload is under way; another follows it", cause)
        else:
            self._begin_reload(kind, cause)
        return reload_id, queued

    def _begin_reload(self, kind: str, cause: str) -> None:
        if self._systemd is not None:
            self._systemd.reloading()
        if kind == "workers":
            self._reload.begin(kind, "rolling")
            self._roll(cause)
            return
        assert self._reload_command is not None and self._selector is not None
        self._reload.begin(kind, "trial")
        argv, cwd = self._reload_command
        try:
            self._trial = Trial(argv, cwd, self._blocked, time.monotonic())
        except OSError as exc:
            self._end_reload(f"cannot start the trial of the new code: {exc.strerror}")
            return
        self._selector.register(self._trial.output_fd, selectors.EVENT_READ, self._trial)
        log.info("%s: importing the fleet's code from disk in a trial process (pid %d)",
                 cause, self._trial.pid)

    def _roll(self, cause: str, only: list[Slot] | None = None) -> None:
        """Begin a rolling restart (of ``only``): its first worker is stopped now, the
        next ones as each comes back (:class:`RollingRestart`)."""
        log.info("%s: rolling restart of %d workers, one at a time", cause,
                 self._rolling.begin(only))
        now = time.monotonic()
        for action in self._rolling.due(now):
            self._act(action, now)

    def _trial_ended(self, status: ExitStatus) -> None:
        trial, self._trial = self._trial, None
        assert trial is not None and self._selector is not None
        with contextlib.suppress(KeyError):
            self._selector.unregister(trial.output_fd)
        output = trial.output().rstrip()
        trial.close()
        if self.stopping:
            self._end_reload("the fleet stopped")
        elif status.failed or trial.timed_out:
            log.error("reload: the new code failed its trial (%s); the fleet runs on, "
                      "unchanged. Its output:\n%s", status.describe(), output or "(none)")
            self._end_reload(trial.error_line(status.describe()))
        else:
            log.info("reload: the new code passed its trial; re-executing the master "
                     "(pid %d stays)", self._pid)
            self._reexec_due = True

    def _reexec(self) -> None:
        """Hand over and exec (:mod:`prefork.reload`); returns only while a signal taken
        but not yet handled must be handled first, or when the exec failed."""
        assert self._reload_command is not None
        # Blocked from here: one that comes now waits for the new image's handlers.
        _signal.pthread_sigmask(signal.SIG_BLOCK, self._blocked)
        if self._signals.queued():
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
            return  # the loop handles it first (SIGTERM: no exec at all)
        self._reexec_due = False
        if self.stopping:
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
            self._end_reload("the fleet stopped")
            return
        env = dict(os.environ)
        if self._systemd is not None:
            env.update(self._systemd.environment())
        handover = self._handed()
        handover_fd = write_handover(handover)
        argv, cwd = self._reload_command
        flush_stdio()
        try:
            reexec(argv, cwd, handover_fd, env, keep=handed_fds(handover))
        except OSError as exc:
            os.close(handover_fd)
            _signal.pthread_sigmask(signal.SIG_UNBLOCK, self._blocked)
            self._end_reload(f"cannot re-execute {argv[0]}: {exc.strerror}")

    def _handed(self) -> dict[str, Any]:
        """What the image after the exec needs (:func:`prefork.reload.read_handover`)."""
        return {"version": HANDOVER_VERSION, "fleet": self.fleet.name,
                "started_at": self._started, "reloads": self._reload.handed(),
                "workers": handed_workers(self.slots),
                "lock": self.lock.fds(),
                "control": None if self._control is None else self._control.handed(),
                "kernels": None if self._kernel_pool is None else self._kernel_pool.handed(),
                "exporter": None if self._exporter is None else self._exporter.handed(),
                "worker_logs": [] if self._worker_logs is None else self._worker_logs.handed()}

    def _adopt_workers(self, handover: dict[str, Any]) -> list[Slot]:
        """Take on the workers the image before the exec ran; returns those to replace.
        One whose worker or replica the new code no longer has is stopped now, for good."""
        now = time.monotonic()
        replace = []
        for slot, was_ready in adopt_slots(handover["workers"], self.fleet, self.slots):
            assert slot.pid is not None
            self._by_pid[slot.pid] = slot
            log.info("worker %s (pid %d): adopted, running the code from before the reload",
                     slot.label, slot.pid)
            if was_ready:
                self._start_order.adopt_ready(slot)
            if slot.worker.target is removed_worker:
                self._stop(slot, StopReason.REMOVED, "not in the reloaded fleet", now)
            elif slot.state is WorkerState.RUNNING:
                replace.append(slot)
        return replace

    def _end_reload(self, error: str | None) -> None:
        kind, follow = self._reload.kind, self._reload.end(error)
        if error is None:
            log.info("reload done: %s", f"code generation {self._reload.generation}"
                     if kind == "code" else "workers restarted from the floor loaded")
        else:
            log.error("reload failed: %s", error)
        if self._systemd is not None and not self.stopping:
            self._systemd.ready()
        if follow is not None and not self.stopping:
            self._begin_reload(follow, "queued reload")

    def trial(self) -> int:
        """In a reload's trial process (``--reload-trial``): prepare the floor as
        :meth:`run` would, then try each worker's ``post_fork`` and warm-up in a forked
        child. Returns the exit code (:func:`prefork.reload.run_trial`)."""
        if self._learn_floor:
            from prefork.learned_floor import learn

            learn(self.fleet.name)
        prepare_floor(self.fleet, freeze=self.freeze, warm_up=self.warm_up)
        return run_trial(self.fleet.workers, self.fleet.post_fork, lambda worker: WorkerContext(
            self.fleet.name, worker.name, 0, self._pid, os.getpid()))

    # -- what the control socket answers -----------------------------------------------

    def _scale_request(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request["worker"]
        try:
            self.scale(name, request["delta"])
        except ValueError as exc:
            return {"error": str(exc)}
        return {"fleet": self.fleet.name, "worker": name,
                "replicas": len(replicas(self.slots, name))}

    def _reload_request(self, request: dict[str, Any]) -> dict[str, Any]:
        workers_only = request.get("workers_only", False)
        try:
            reload_id, queued = self.reload(
                workers_only=workers_only,
                cause="prefork reload" + (" --workers-only" if workers_only else ""))
        except ValueError as exc:
            return {"error": str(exc)}
        return {"fleet": self.fleet.name, "reload": reload_id, "queued": queued}

    def status(self) -> dict[str, Any]:
        """The master and every worker slot, as `prefork status` and the metrics show them
        (the README's "status --json" lists every field)."""
        now, wall_now = time.monotonic(), time.time()
        return {
            "fleet": self.fleet.name,
            "spec": self.spec,
            "master_pid": self._pid,
            "uptime": round(now - self._started, 3),
            "python": sys.version.split()[0],
            "modules": len(sys.modules),  # the floor's size in modules
            "stopping": self.stopping,
            "reloads": self._reload.as_status(),
            "workers": [self._worker_status(s, now, wall_now) for s in self.slots],
        }

    def _worker_status(self, slot: Slot, now: float, wall_now: float) -> dict[str, Any]:
        status = slot.status(now, last_beat=self._heartbeats.last_beat(slot), wall_now=wall_now)
        host = slot.worker.target
        if isinstance(host, GroupHost):  # its hosted workers, as its process last wrote them
            status["hosted"] = [] if slot.pid is None else host.board.read(slot.pid, now)
        return status

    # -- plumbing ------------------------------------------------------------------

    def _open(self) -> None:
        """Everything the loop needs, made before the first fork so children share or
        close it: the signal inbox, the selector, the control socket, the heartbeat
        table, systemd's notify socket."""
        self._signals.open()
        self._blocked = self._signals.handled()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._signals.wake_r, selectors.EVENT_READ)
        handed = self._handover or {}
        if self._control is not None:
            self._control.attach(self._selector)
            self._control.open(handed.get("control"))
        if self._exporter is not None:
            if handed.get("exporter"):
                self._exporter.adopt(handed["exporter"], time.monotonic())
            else:
                self._exporter.open()  # MetricsError for a port in use, before any fork
        self._start_order.attach(self._selector)
        self._imports.attach(self._selector)
        if self._worker_logs is not None:
            self._worker_logs.attach(self._selector)
            self._worker_logs.adopt(handed.get("worker_logs", []))
        self._heartbeats.open()
        if self._kernel_pool is not None:
            self._kernel_pool.open(handed.get("kernels"))  # ListenerError, before any fork
        become_subreaper()
        self._memory.start(time.monotonic())
        if self._systemd_notify:
            self._systemd = SystemdReporter.from_environment(
                lambda: summary(self.slots, stopping=self.stopping))
        if self._systemd is not None:
            self._systemd.due(time.monotonic())  # the first watchdog ping goes out at once
        outside: list[Watch] = [w for w in (self._control, self._systemd, logs.output_watch())
                                if w is not None]
        self._supervising = [self._timers, self._heartbeats, self._memory, self._ages,
                             self._rolling, self._trees, self._imports, *outside]
        if self._exporter is not None:
            self._supervising.append(self._exporter)  # its restart; none while stopping
        if self._kernel_pool is not None:
            self._kernel_pool.watch(self.slots)
            self._supervising.append(self._kernel_pool)  # closed once all its processes failed
        self._while_stopping = [self._timers, self._trees, *outside]

    def _close(self) -> None:
        if self._worker_logs is not None:
            self._worker_logs.close()  # what is left in the pipes, before they close
        self._signals.close()
        if self._control is not None:
            self._control.close()
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        self._heartbeats.close()
        self._start_order.close()
        self._imports.close()
        if self._systemd is not None:
            self._systemd.close()
        if self._exporter is not None:
            self._exporter.close()
        if self._kernel_pool is not None:
            self._kernel_pool.close()

    def _own_fds(self) -> list[int]:
        """The master's descriptors, which a forked child closes."""
        fds = self._signals.fds()
        if self._selector is not None:
            fds.append(self._selector.fileno())  # type: ignore[attr-defined]
        fds.extend(self.lock.fds())
        if self._systemd is not None:
            fds.append(self._systemd.fileno())
        if self._control is not None:
            fds.extend(self._control.own_fds())
        fds.extend(self._start_order.fds())  # other workers' readiness pipes
        fds.extend(self._imports.fds())  # other workers' import reports
        if self._worker_logs is not None:
            fds.extend(self._worker_logs.fds())  # every worker's log pipe and file
        if self._exporter is not None:
            fds.extend(self._exporter.fds())  # the metrics' listening socket
        if self._kernel_pool is not None:
            fds.extend(self._kernel_pool.fds())  # kept by the pool's own processes only
        return fds

    def _is_exporter(self, pid: int) -> bool:
        return self._exporter is not None and self._exporter.owns(pid)

    def _is_own_child(self, pid: int) -> bool:
        """The master's children that are not workers: the metrics exporter, the trial of a
        reload."""
        return self._is_exporter(pid) or (self._trial is not None and pid == self._trial.pid)

    def _context(self, slot: Slot, pid: int | None = None) -> WorkerContext:
        return WorkerContext(self.fleet.name, slot.worker.name, slot.replica, self._pid, pid)

    def _run_hook(self, name: str, *args: object) -> None:
        """Call the fleet's hook ``name``, if it has one; a hook that raises is logged
        with its traceback and the master goes on."""
        hook = getattr(self.fleet, name)
        if hook is None:
            return
        try:
            hook(*args)
        except (Exception, SystemExit) as exc:
            log.exception("%s hook failed (the fleet goes on): %s: %s", name,
                          type(exc).__name__, exc)

    def _kill_and_reap(self) -> None:
        """SIGKILL every worker's tree and every other descendant; reap them all."""
        for pid in list(self._by_pid):
            signal_tree(pid, signal.SIGKILL)
        self._by_pid.clear()
        self._trees.kill_all()
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                return

    def _observe(self, event: str, slot: Slot | None) -> None:
        if self._observer is not None:
            self._observer(event, slot, time.monotonic())

