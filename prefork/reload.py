"""Code reload: import the fleet's code afresh from disk, keep the master's pid.

A reload (SIGHUP, ``prefork reload``, systemd's ``ExecReload=``) goes in three steps:

1. A *trial*: the master starts its own command line again as a separate process with
   ``--reload-trial``. It imports the fleet from disk exactly as the master would, checks
   it, prepares the floor, and calls each worker's ``post_fork`` and warm-up in a forked
   child; then it exits. Anything that fails there fails the reload and touches nothing:
   its last line is the error, its whole output goes to the master's log.
2. The master re-executes itself in place (``execve``: same pid, same children, same
   parent), handing over in a memfd what it must keep (:class:`Handover`): its workers'
   pids and counters, the fleet's lock, its listening sockets, the workers' log pipes.
   The signals it handles stay blocked across the exec, so none is lost or fatal.
3. The new image imports the new code, adopts the running workers and replaces them one
   at a time with the rolling restart (:class:`prefork.watches.RollingRestart`).

Why a re-exec and not a second "mold" process that forks the new generation: the master
itself holds the floor it forks from, so a mold would leave the master's old floor in
memory for good; the exec drops every page of the old image at once, and once the last
old worker has exited nothing holds the old code. See the README's design section.
"""

from __future__ import annotations

import _signal
import contextlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from prefork.fleet import Fleet, Worker
from prefork.prctl import PR_SET_PDEATHSIG, prctl
from prefork.slot import Slot, StopReason, new_slot

log = logging.getLogger("prefork")

TRIAL_OPTION = "--reload-trial"
ADOPT_OPTION = "--adopt-fd"
HANDOVER_VERSION = 1
# Seconds a trial may take (the floor's import, the warm-ups) before it is killed and the
# reload fails: far beyond a real floor's import, short enough that a hung warm-up is told.
TRIAL_TIMEOUT = 300.0
MAX_TRIAL_OUTPUT = 64 * 1024  # bytes of the trial's output kept for the log: the tail
MAX_HANDOVER = 16 * 1024 * 1024


class HandoverError(Exception):
    """What a re-executed master was handed cannot be used. ``str()`` is one line."""


def master_command() -> tuple[list[str], str]:
    """The command line this process was started with, without the reload's own options,
    and the working directory it was started in: what a trial and a re-exec run."""
    argv = [sys.executable, *_without_reload_options(sys.orig_argv[1:])]
    return argv, os.getcwd()


def _without_reload_options(args: Sequence[str]) -> list[str]:
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == TRIAL_OPTION or arg.startswith(ADOPT_OPTION + "="):
            pass
        elif arg == ADOPT_OPTION:
            skip = True
        else:
            kept.append(arg)
    return kept


# -- what status shows --------------------------------------------------------------------


@dataclass
class ReloadState:
    """The reloads of one master, as ``status`` shows them (the README lists the fields).

    A request gets an id; requests that come while a reload runs are coalesced into the
    one that follows it (``pending``): a deploy during a reload is never lost, and never
    reloaded twice. ``last_result["id"] >= id`` tells a client its reload has ended.
    """

    total: int = 0
    last: float | None = None
    phase: str | None = None  # "trial" | "rolling"
    kind: str | None = None  # "code" | "workers"
    pending: str | None = None  # the kind of the reload that follows, if one was asked for
    generation: int = 0
    code_loaded: float = field(default_factory=time.time)
    last_result: dict[str, Any] | None = None

    @property
    def in_progress(self) -> bool:
        return self.phase is not None

    def ask(self, kind: str) -> tuple[int, bool]:
        """A reload of ``kind`` is asked for: its id, and whether it waits for the one in
        progress (True) or the caller must begin it now (False)."""
        if not self.in_progress:
            return self.total + 1, False
        if self.pending != "code":  # a code reload restarts the workers too
            self.pending = kind
        return self.total + 1, True

    def begin(self, kind: str, phase: str) -> int:
        self.total, self.last = self.total + 1, time.time()
        self.kind, self.phase = kind, phase
        return self.total

    def end(self, error: str | None) -> str | None:
        """The reload in progress ended (``error``: why it failed); returns the kind of
        the reload that must begin next, if one was asked for meanwhile."""
        self.last_result = {"id": self.total, "kind": self.kind, "ok": error is None,
                            "error": error, "at": round(time.time(), 3)}
        self.phase = self.kind = None
        follow, self.pending = self.pending, None
        return follow

    def as_status(self) -> dict[str, Any]:
        return {"total": self.total, "last": self.last, "in_progress": self.in_progress,
                "phase": self.phase, "kind": self.kind, "pending": self.pending is not None,
                "generation": self.generation, "code_loaded": round(self.code_loaded, 3),
                "last_result": self.last_result}

    def handed(self) -> dict[str, Any]:
        return {"total": self.total, "last": self.last, "pending": self.pending,
                "generation": self.generation, "last_result": self.last_result}

    @classmethod
    def adopted(cls, data: dict[str, Any], *, loaded: bool) -> ReloadState:
        """The state handed over by the image before the exec: its code reload goes on,
        now rolling, as generation + 1 (``loaded``: the new code imported)."""
        return cls(total=data["total"], last=data["last"], phase="rolling", kind="code",
                   pending=data["pending"], generation=data["generation"] + loaded,
                   last_result=data["last_result"])


# -- the trial ---------------------------------------------------------------------------


class Trial:
    """The master's side of one trial process: its pid, its output (a pipe the loop
    reads) and its deadline (a watch of the loop: SIGKILL to its process group)."""

    def __init__(self, argv: list[str], cwd: str, blocked: Sequence[int],
                 now: float, timeout: float = TRIAL_TIMEOUT) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        self.output_fd = read_end
        self.timeout = timeout
        self.deadline: float | None = now + timeout
        self.timed_out = False
        self._output = bytearray()
        # Blocked across the fork, as for a worker (prefork.child): until the child has
        # put back the defaults, a signal must not run the master's handler in it.
        saved = _signal.pthread_sigmask(signal.SIG_BLOCK, list(blocked))
        try:
            pid = os.fork()
        except OSError:
            _signal.pthread_sigmask(signal.SIG_SETMASK, saved)
            os.close(read_end)
            os.close(write_end)
            raise
        if pid == 0:  # pragma: no cover - replaced by exec at once
            _become_trial([*argv, TRIAL_OPTION], cwd, write_end, blocked)
        _signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        self.pid = pid
        os.close(write_end)
        os.set_blocking(read_end, False)

    def read(self) -> bool:
        """Take what the pipe holds; False at EOF."""
        while True:
            try:
                chunk = os.read(self.output_fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self._output += chunk
            del self._output[:-MAX_TRIAL_OUTPUT]

    def output(self) -> str:
        self.read()  # what it wrote before its exit
        return self._output.decode(errors="replace")

    def error_line(self, failed_how: str) -> str:
        """The last line it wrote, without the ``prefork: `` of a CLI error, or how it
        ended when it wrote nothing."""
        if self.timed_out:
            return f"the trial of the new code took more than {self.timeout:g}s: killed"
        lines = [line.strip() for line in self.output().splitlines() if line.strip()]
        if not lines:
            return f"the trial of the new code {failed_how}"
        return lines[-1].removeprefix("prefork: ").removeprefix("error: ")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def close(self) -> None:
        if self.output_fd >= 0:
            os.close(self.output_fd)
            self.output_fd = -1

    def next_deadline(self) -> float | None:
        return self.deadline

    def due(self, now: float) -> tuple[()]:
        if self.deadline is not None and now >= self.deadline:
            self.deadline, self.timed_out = None, True
            self.kill()
        return ()


def _become_trial(argv: list[str], cwd: str, output: int, blocked: Sequence[int]) -> NoReturn:
    """In the forked child: a process group of its own (so a timeout kills what it
    started), killed if the master dies, its output into the pipe, the master's signals
    back to their defaults and unblocked, exec."""
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        os.chdir(cwd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(output, 1)
        os.dup2(output, 2)
        signal.set_wakeup_fd(-1)  # the master's pipe
        for signum in blocked:
            _signal.signal(signum, _signal.SIG_DFL)
        _signal.pthread_sigmask(signal.SIG_UNBLOCK, list(blocked))
        os.execv(argv[0], argv)
    except BaseException as exc:  # nothing may return into the master's code
        with contextlib.suppress(OSError):
            os.write(2, f"cannot start the trial: {exc}\n".encode())
    os._exit(127)


def run_trial(workers: Sequence[Any], post_fork: Callable[[Any], object] | None,
              context: Callable[[Any], Any]) -> int:
    """In the trial process, once the floor is imported and prepared: call ``post_fork``
    and the warm-up of each worker in a forked child, one worker at a time. Returns 0, or
    1 with the failure's traceback written and its one line last."""
    for worker in workers:
        if post_fork is None and worker.warmup is None:
            continue
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code, step = 1, "post_fork"
            try:
                if post_fork is not None:
                    post_fork(context(worker))
                step = "warm-up"
                if worker.warmup is not None:
                    worker.warmup()
                code = 0
            except BaseException as exc:  # told, as one line, at the end
                traceback.print_exc()
                print(f"worker {worker.name}: {step} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
            sys.stderr.flush()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if status != 0:
            if os.WIFSIGNALED(status):
                print(f"worker {worker.name}: post_fork or warm-up killed by signal "
                      f"{os.WTERMSIG(status)}", file=sys.stderr)
            return 1
    return 0


def removed_worker() -> None:
    """The target of a worker adopted across a reload that the new code no longer has: it
    is only stopped, never started."""
    raise RuntimeError("this worker was removed from the fleet by a reload")


def no_code_loaded() -> None:
    """The target of every worker of :func:`floorless_fleet`."""
    raise RuntimeError("no code loaded: the reload's new code failed to import after the "
                       "master re-executed; reload again once it is fixed")


def floorless_fleet(handover: dict[str, Any]) -> Fleet:
    """The fleet of a master whose new code failed to import after the exec (it changed
    on disk after the trial): the workers it was handed, which it keeps running and
    cannot restart."""
    replicas: dict[str, int] = {}
    for entry in handover["workers"]:
        replicas[entry["name"]] = max(replicas.get(entry["name"], 0), entry["replica"] + 1)
    return Fleet(handover["fleet"], tuple(Worker(name, no_code_loaded, replicas=count)
                                          for name, count in replicas.items()),
                 restart="never")


def handed_workers(slots: Sequence[Slot]) -> list[dict[str, Any]]:
    """Every slot with a live child, as the image after the exec adopts it
    (:func:`adopt_slots`). Times are ``time.monotonic()``'s: one clock for the whole
    boot, which the exec does not change."""
    return [{"name": slot.worker.name, "replica": slot.replica, "pid": slot.pid,
             "started_at": slot.started_at, "restarts": slot.restarts,
             "recycles": slot.recycles, "ready": slot.ready, "kill_at": slot.kill_at}
            for slot in slots if slot.pid is not None]


def adopt_slots(handed: Sequence[dict[str, Any]], fleet: Fleet,
                slots: list[Slot]) -> list[tuple[Slot, bool]]:
    """The running workers :func:`handed_workers` listed, each put into the slot of the
    same worker and replica of ``fleet`` (RUNNING; STOPPING with its SIGKILL time if it
    was being stopped), or into a new slot appended to ``slots`` whose target is
    :func:`removed_worker` when the new code has no such worker or replica. Returns each
    slot and whether its worker had been ready (:mod:`prefork.readiness`)."""
    free = {(slot.worker.name, slot.replica): slot for slot in slots}
    adopted = []
    for entry in handed:
        slot = free.pop((entry["name"], entry["replica"]), None)
        if slot is None:
            slot = new_slot(fleet, Worker(entry["name"], removed_worker, restart="never"),
                            entry["replica"])
            slots.append(slot)
        slot.started(entry["pid"], entry["started_at"], count_start=False)
        slot.restarts, slot.recycles = entry["restarts"], dict(entry["recycles"])
        if entry["kill_at"] is not None and slot.worker.target is not removed_worker:
            # SIGTERM went out before the exec: what follows is a replacement.
            slot.stopping(StopReason.ROLLING_RESTART, "stopping across the reload",
                          entry["kill_at"])
        adopted.append((slot, bool(entry["ready"])))
    return adopted


# -- the handover across the exec ----------------------------------------------------------


def write_handover(data: dict[str, Any]) -> int:
    """``data`` as JSON in a memfd that the exec keeps open; returns its descriptor."""
    fd = os.memfd_create("prefork-handover", os.MFD_CLOEXEC)
    payload = json.dumps(data).encode()
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)
    return fd


def read_handover(fd: int) -> dict[str, Any]:
    """What the previous image handed over through descriptor ``fd``, which is closed.
    Raises :class:`HandoverError` (one line) for anything that is not a handover."""
    try:
        info = os.fstat(fd)
        if info.st_size > MAX_HANDOVER:
            raise HandoverError(f"{ADOPT_OPTION} {fd}: {info.st_size} bytes is no handover")
        data = os.pread(fd, info.st_size, 0)
    except OSError as exc:
        raise HandoverError(f"{ADOPT_OPTION} {fd}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    try:
        handover = json.loads(data)
    except ValueError:
        raise HandoverError(f"{ADOPT_OPTION} {fd}: not a handover of a prefork master "
                            "(it is for prefork's own re-exec)") from None
    if not isinstance(handover, dict) or handover.get("version") != HANDOVER_VERSION:
        raise HandoverError(f"{ADOPT_OPTION} {fd}: not a handover of this prefork version")
    problem = _handover_problem(handover)
    if problem is not None:
        raise HandoverError(f"{ADOPT_OPTION} {fd}: a broken handover: {problem}")
    return handover


_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))
_HANDOVER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "fleet": str, "started_at": _NUMBER, "reloads": dict, "workers": list, "lock": list,
    "control": (dict, type(None)), "kernels": (dict, type(None)),
    "exporter": (dict, type(None)), "worker_logs": list}
_RELOADS_FIELDS: dict[str, type | tuple[type, ...]] = {
    "total": int, "last": _OPTIONAL_NUMBER, "pending": (str, type(None)), "generation": int,
    "last_result": (dict, type(None))}
_WORKER_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str, "replica": int, "pid": int, "started_at": _NUMBER, "restarts": int,
    "recycles": dict, "ready": bool, "kill_at": _OPTIONAL_NUMBER}
_LISTENER_FIELDS: dict[str, type | tuple[type, ...]] = {"fd": int, "dev": int, "ino": int}


def _handover_problem(handover: dict[str, Any]) -> str | None:
    """What is missing or of the wrong type in a handover, or None. Only prefork writes
    one, but the option is on a command line anyone can type."""
    checks: list[tuple[str, object, dict[str, type | tuple[type, ...]]]] = [
        ("handover", handover, _HANDOVER_FIELDS),
        ("reloads", handover.get("reloads"), _RELOADS_FIELDS)]
    checks += [(f"workers[{i}]", w, _WORKER_FIELDS) for i, w in enumerate(
        handover.get("workers") or ())]
    checks += [(key, handover[key], _LISTENER_FIELDS) for key in ("control", "kernels")
               if handover.get(key) is not None]
    for where, value, fields in checks:
        if not isinstance(value, dict):
            return f"{where} is not an object"
        for key, kind in fields.items():
            if not isinstance(value.get(key), kind) or (
                    kind is int and isinstance(value.get(key), bool)):
                return f"{where}.{key} is missing or not of type {_kind_name(kind)}"
    lock = handover["lock"]
    if len(lock) != 2 or not all(isinstance(fd, int) for fd in lock):
        return "lock is not two descriptors"
    return None


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def handed_fds(handover: dict[str, Any]) -> list[int]:
    """Every descriptor ``handover`` names: what the exec must keep open."""
    fds = [*handover["lock"], *(entry["fd"] for entry in handover["worker_logs"])]
    fds += [handover[key]["fd"] for key in ("control", "kernels") if handover[key]]
    if handover["exporter"] and handover["exporter"]["listen_fd"] is not None:
        fds.append(handover["exporter"]["listen_fd"])
    return fds


def reexec(argv: list[str], cwd: str, handover_fd: int, env: dict[str, str],
           keep: Sequence[int]) -> None:
    """Replace this process's image with ``argv`` + the handover, ``keep`` open across
    the exec; returns only if the exec failed (OSError raised), with ``keep`` as it was
    (or the next process spawned would hold the fleet's lock)."""
    for handler in logging.getLogger().handlers + log.handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    before = {fd: os.get_inheritable(fd) for fd in keep}
    for fd in keep:
        os.set_inheritable(fd, True)
    os.chdir(cwd)
    try:
        os.execve(argv[0], [*argv, ADOPT_OPTION, str(handover_fd)], env)
    finally:  # reached only when the exec failed
        for fd, inheritable in before.items():
            os.set_inheritable(fd, inheritable)
