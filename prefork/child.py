"""Everything a forked child does between ``fork()`` and its worker's first line, and its exit.

What crosses the fork and what happens to it here:

- signals: the master forks with its handled signals blocked, so a signal sent in the
  window is held, not lost or run by the master's handler in the child. The child puts
  back the dispositions the master found at start-up (a standalone ``python`` worker's:
  SIGINT raises KeyboardInterrupt, SIGTERM kills), drops the master's wake-up fd, and
  only then unblocks, so a held SIGTERM now stops the worker as it would stop it alone.
  (An ``async def`` worker's loop then turns SIGTERM/SIGINT into a cancellation:
  :mod:`prefork.aio`.)
- descriptors: the master's own (wake-up pipe, selector, fleet lock) are closed; a
  child holding the lock would keep the fleet "running" after its master died.
  Descriptors that the fleet's own imports opened are left alone: they are the floor's.
- parent death: ``PR_SET_PDEATHSIG`` SIGKILLs the child when the master dies, and a
  check of ``getppid()`` after setting it covers a master that died before that.
  SIGKILL, not SIGTERM: a master that vanished cannot run a grace period, and a worker
  that ignores SIGTERM must not outlive it.
- process group: the child leads a group of its own (the master sets it too, so neither
  side's order matters), and what it starts joins it: the worker's process tree, which
  the master signals as one (:mod:`prefork.trees`). A terminal's Ctrl-C therefore
  reaches the master only, which stops the workers as it stops them for SIGTERM.
- exit: always ``os._exit`` after flushing stdio, so the master's atexit handlers and
  buffered output never run twice.
"""

from __future__ import annotations

import _signal
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import NamedTuple, NoReturn

from setproctitle import setproctitle, setthreadtitle

from prefork import after_fork, readiness
from prefork.exits import ExitCode
from prefork.fleet import WorkerTarget, replica_label
from prefork.heartbeats import HeartbeatTable
from prefork.journal import JournalStreams
from prefork.prctl import kill_me_when_parent_dies
from prefork.process_settings import SettingsPlan, apply_in_child
from prefork.signals import Disposition

log = logging.getLogger("prefork")

# Resolved at import, in the master: in a child, an enum member is one more object of the
# floor whose reference count it writes, and so one more page it copies (run_child).
_SETUP_FAILED = int(ExitCode.CHILD_SETUP_FAILED)
_SIG_SETMASK = int(signal.SIG_SETMASK)

@dataclass(frozen=True)
class WorkerContext:
    """Which worker: what ``prefork.current_worker()`` returns in a worker, and what the
    fleet's hooks are given. ``pid`` is the worker's process, ``None`` before it is forked
    (in ``pre_fork``)."""

    fleet: str
    name: str
    replica: int
    master_pid: int
    pid: int | None = None

    @property
    def label(self) -> str:
        return replica_label(self.name, self.replica)


_current: WorkerContext | None = None
# In a group's process, the hosted worker whose asyncio task runs (prefork.groups).
hosted_worker: ContextVar[WorkerContext | None] = ContextVar("prefork_hosted_worker",
                                                             default=None)


def current_worker() -> WorkerContext | None:
    """The worker this process runs (in a group's process: the hosted worker whose task
    asks, else the group), or ``None`` in the master or outside prefork."""
    return hosted_worker.get() or _current


class ChildPlan(NamedTuple):
    """Everything a child needs from the master, made in the master before the fork, as
    plain values the child unpacks (:func:`run_child`).

    ``context`` has no pid yet. ``signal_defaults``: the dispositions to put back
    (:class:`prefork.signals.SignalInbox`). ``environ``: the variables the worker finds
    in its environment. ``output``: a descriptor to make the worker's stdout and stderr
    (its log pipe, :mod:`prefork.worker_logs`); else ``journal``: the master's stdio is
    journald's, the worker gets a stream of its own (:mod:`prefork.journal`).
    ``imports``: the write end of its pipe for the report of what it imports after the
    fork, and the modules it was forked with (:mod:`prefork.after_fork`). ``inherit``:
    descriptors the worker keeps of those its master closes in it (the kernel pool's
    socket, :mod:`prefork.kernel_pool`)."""

    context: WorkerContext
    label: str
    target: WorkerTarget
    title: str
    signal_defaults: tuple[tuple[int, Disposition], ...]
    environ: tuple[tuple[bytes, bytes], ...]
    heartbeat: tuple[HeartbeatTable, int, float] | None = None
    post_fork: Callable[[WorkerContext], object] | None = None
    journal: JournalStreams | None = None
    ready_fd: int = -1  # the readiness pipe's write end (prefork.readiness)
    settings: SettingsPlan | None = None
    output: int | None = None
    imports: tuple[int, frozenset[str]] | None = None
    inherit: tuple[int, ...] = ()


def worker_environ(context: WorkerContext) -> tuple[tuple[bytes, bytes], ...]:
    """``PREFORK_WORKER`` and ``PREFORK_REPLICA``, as ``os.environb`` holds them."""
    return ((b"PREFORK_WORKER", os.fsencode(context.name)),
            (b"PREFORK_REPLICA", b"%d" % context.replica))


def run_child(plan: ChildPlan, close_fds: Iterable[int]) -> NoReturn:
    """Become the worker ``plan`` describes, apply its process settings, call the
    fleet's ``post_fork`` hook, and run its target; never returns, whatever happens.
    Settings that cannot be applied, or a ``post_fork`` that raises, end the process
    with ``ExitCode.CHILD_SETUP_FAILED`` before the worker's code runs: a failed start.
    ``close_fds``: the master's descriptors, closed but for the plan's own.

    What an idle child holds of its own is mostly pages it copied because it wrote to
    an object of the floor, if only to count a reference to it. So this is one function,
    not five; the plan is unpacked, not looked up; constants are resolved at import; the
    master's 50 signal handlers are one object. That took prefork's own cost per idle
    child, over a bare ``os.fork()`` child of the same master, from 45 pages to 15 (0.18
    to 0.06 MiB; cpu floor, Python 3.11, median of 7 runs of
    ``measurements/child_pages.py``; 24 and 26 pages on 3.12 and 3.13)."""
    global _current
    code = _SETUP_FAILED
    (context, label, target, title, signal_defaults, environ, heartbeat, post_fork, journal,
     ready_fd, settings, output, imports, inherit) = plan
    try:
        os.setpgid(0, 0)
        # Signals. The master's wake-up fd goes first, then its handlers, and only then
        # are signals unblocked: one held since the fork now meets the worker's handling.
        _signal.set_wakeup_fd(-1)
        for signum, handler in signal_defaults:
            _signal.signal(signum, handler)  # not signal.signal: its enum conversions
        _signal.pthread_sigmask(_SIG_SETMASK, ())
        if settings is not None:  # before PR_SET_PDEATHSIG, which a change of uid clears
            apply_in_child(settings, label)
        if kill_me_when_parent_dies() != 0:
            raise OSError("prctl(PR_SET_PDEATHSIG) refused")
        # The master may have died between fork() and prctl(): then no signal will come.
        if os.getppid() != context.master_pid:
            os._exit(code)
        # Its own pipe ends may be listed with the master's (a batch: prefork.master).
        keep = (ready_fd, -1 if output is None else output, -1 if imports is None else imports[0],
                *inherit)
        for fd in close_fds:
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if output is not None:  # after the closes: one of them may have been fd 1 or 2
            _redirect_output(output)
        elif journal is not None:  # before any line of the worker's, post_fork's included
            flush_stdio()  # what Python buffered for the old descriptors goes there
            journal.connect(context.name, label)
        setproctitle(title)
        # The kernel's 15-byte comm is what top shows by default: make it the worker's name.
        setthreadtitle(label)
        if heartbeat is not None:
            table, cell, interval = heartbeat
            table.attach(cell, interval)
        readiness.attach(ready_fd)  # the pipe prefork.ready() writes to, for an awaited worker
        # Not dataclasses.replace(): 80 us more in a fresh child.
        _current = context = WorkerContext(context.fleet, context.name, context.replica,
                                           context.master_pid, os.getpid())
        for key, value in environ:
            # What os.environ's __setitem__ does, without its two Python functions of the
            # os module on pages of the floor: 5 pages less. _data is the mapping
            # os.environ and os.environb share (CPython since 3.2).
            os.putenv(key, value)
            os.environ._data[key] = value  # type: ignore[attr-defined]
        if imports is not None:  # last: its USS at the fork is that of a set-up child
            after_fork.attach(*imports)
        # The hook and the worker; how they ended becomes the exit code (or death by SIGINT).
        try:
            if post_fork is not None:
                try:
                    post_fork(context)
                except Exception as exc:
                    log.exception("worker %s: post_fork hook failed: %s: %s", label,
                                  type(exc).__name__, exc)
                    return  # a failed start: the exit below, with CHILD_SETUP_FAILED
            code = 0
            target()
        except SystemExit as exc:
            code = _system_exit_code(exc)
        except KeyboardInterrupt:
            # Die by SIGINT as CPython itself does, so the master sees the real cause.
            flush_stdio()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            code = 128 + signal.SIGINT
        except BaseException:  # a worker's crash is logged, then exit 1
            log.exception("worker %s crashed", label)
            code = 1
    except BaseException:  # must never unwind into the master's code
        try:
            log.exception("worker %s: prefork failed to start it", label)
        except BaseException:
            pass
    finally:
        flush_stdio()
        os._exit(code)


def _redirect_output(fd: int) -> None:
    """``fd`` as stdout and stderr: one description, so the two keep their order, and
    ``sys.stdout`` line-buffered as on a terminal, or its lines would come late."""
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    if fd > 2:
        os.close(fd)
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        reconfigure(line_buffering=True)


def _system_exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code & 0xFF
    # One write of message and newline together: print() makes two, and the workers
    # share the master's stderr, so two exiting at once interleaved their lines.
    sys.stderr.write(f"{exc.code}\n")
    return 1


def flush_stdio() -> None:
    """Flush Python's stdio buffers: before fork (or both processes would write them) and
    before ``os._exit`` (which skips the interpreter's own flush)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            pass
