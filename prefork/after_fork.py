"""What each worker imported after the fork, and what it cost: reported once to the master.

A worker that imports modules lazily (a framework on its first request, an ORM's dialect
on its first query) imports them in every child privately, where the floor would have
shared them. Each child reports them once, so ``prefork status`` can name them and
``--learn-floor`` (:mod:`prefork.learned_floor`) can move them into the floor.

When: the master sends the child ``SIGURG`` :data:`DEFAULT_REPORT_AFTER` seconds after
its fork (``--report-imports-after``), and the child's handler writes the report. No
thread and no timer in the child: the handler runs in the worker's main thread between
two bytecodes, sync or async alike, takes no lock (``os.read``/``os.write`` on raw
descriptors and a copy of ``sys.modules``), and is installed with ``SA_RESTART``, so a
system call the signal lands in is restarted by the kernel, never failed with EINTR in
a C library. SIGURG's default action is to ignore it: a worker that set its own handler
gets one harmless SIGURG, and no report. A worker that is still blocked in a restartable
system call reports when it next runs Python code.

What: the ``sys.modules`` keys added since the fork, in insertion order; the
``--preload`` names that import them all (:func:`preload_names`); the child's private
memory (USS, ``/proc/self/smaps_rollup``, ~1 ms) at the report. Not at the fork too: that
read cost each child 1.6 ms before its worker ran, and the pages it dirtied. The transport
is a pipe per fork (as :mod:`prefork.readiness`): one JSON document, at most
:data:`MAX_REPORT` bytes (the child drops the modules that do not fit and says how many);
the master reads it in its loop, a bounded read per wake-up, and drops whatever is larger
or garbled with one warning.
"""

from __future__ import annotations

import _signal
import json
import logging
import os
import selectors
import signal
import sys
from collections.abc import Callable, Sequence
from types import FunctionType, ModuleType
from typing import TYPE_CHECKING, Any

from prefork.fleet import check_seconds
from prefork.slot_pipes import SlotPipes

if TYPE_CHECKING:
    from prefork.slot import Slot

log = logging.getLogger("prefork")

REPORT_SIGNAL = signal.SIGURG
_REPORT_SIGNUM = int(REPORT_SIGNAL)  # for the child: not the enum member's page
MAX_REPORT = 256 * 1024  # bytes: the most the master reads of one child's report
DEFAULT_REPORT_AFTER = 10.0  # seconds after the fork
_READ = 65536  # bytes the master reads of one pipe per wake-up

# -- the child's side ---------------------------------------------------------------------

_channel = -1  # the write end of this child's report pipe, or -1: none, or sent already
_floor: frozenset[str] = frozenset()  # sys.modules' keys at the fork (the master's)


def attach(fd: int, floor: frozenset[str]) -> None:
    """In a child, after its set-up: ``fd`` is its report pipe's write end, ``floor``
    the modules it was forked with. Arms the handler."""
    global _channel, _floor
    _channel, _floor = fd, floor
    # _signal: the C functions the signal module wraps (its enum conversions cost 60 us
    # a signal in a fresh child). siginterrupt(False): SA_RESTART.
    _signal.signal(_REPORT_SIGNUM, _on_signal)
    _signal.siginterrupt(_REPORT_SIGNUM, False)


def _on_signal(signum: int, frame: object) -> None:
    _signal.signal(REPORT_SIGNAL, 0)  # SIG_DFL: SIGURG is ignored again
    send_report()


def send_report() -> None:
    """Write this child's report and close the pipe; only the first call does anything.
    Raises nothing: it runs in a signal handler, anywhere in the worker's code."""
    global _channel
    fd, _channel = _channel, -1
    if fd < 0:
        return
    try:
        view = memoryview(report_now())
        while view:
            view = view[os.write(fd, view):]
    except Exception:  # OSError: the master closed its end (it stops, or had too much)
        pass
    finally:
        os.close(fd)


def report_now() -> bytes:
    """The report as :func:`send_report` would write it if it were asked now (the probe
    asks its children after their warm-up); it closes nothing."""
    modules = _new_modules()
    # Nothing imported, the usual case: bytes made in the master. Encoding them here
    # (json, the USS read) cost an idle child 0.2-0.3 MiB of pages, once.
    return encode_report(modules, private_bytes()) if modules else _NOTHING_NEW


def _new_modules() -> list[tuple[str, Any]]:
    """The modules added since the fork, in their order. Walked from the end of
    ``sys.modules``, where imports put them, and only as far as needed: reading an
    entry writes its reference counts, which un-shares its pages, and walking all of
    them cost an idle demo worker 0.8 MiB of private memory."""
    modules = sys.modules
    # Names to find. A worker that deleted floor modules from sys.modules has more new
    # ones than this, and reports only the latest of them (rare: a hack, not an import).
    missing = len(modules) - len(_floor)
    found: list[tuple[str, Any]] = []
    if missing <= 0:
        return found
    for name in reversed(modules):
        if name in _floor:
            continue
        module = modules.get(name)
        if module is not None:
            found.append((name, module))
        missing -= 1
        if missing == 0:
            break
    found.reverse()
    return found


def encode_report(modules: Sequence[tuple[str, Any]], uss: int | None) -> bytes:
    """The report as one JSON document of at most :data:`MAX_REPORT` bytes: the modules
    that do not fit are dropped (``dropped`` counts them), the latest first."""
    names = [name for name, _ in modules]
    preload = preload_names(modules)
    kept, size = 0, 512  # the rest of the document
    for name in names:
        size += 2 * (len(name.encode()) + 4)  # in "modules", and maybe in "preload"
        if size > MAX_REPORT:
            break
        kept += 1
    shown = set(names[:kept])
    return json.dumps({
        "modules": names[:kept],
        "preload": [name for name in preload if name in shown],
        "count": len(names),
        "dropped": len(names) - kept,
        "uss": uss,
    }).encode() + b"\n"  # the end: a grandchild forked with the pipe may keep it open


def preload_names(modules: Sequence[tuple[str, Any]]) -> list[str]:
    """The names to ``--preload``, in import order, that import every module of
    ``modules`` (``sys.modules`` entries, in its order).

    ``sys.modules`` is in the order imports *completed*: Python moves a module to its end
    once the module has run, so what a module imported when it ran comes before it. A
    module is left out when (1) a later one of ``modules`` holds it, a class or function
    of it, or an object of a class of it, in its namespace: that module's import
    statement imports it (a later module only: importing ``xml.dom.minidom`` sets it on
    the earlier ``xml.dom``, which does not import it); or (2) it is a package whose
    submodule is listed: importing ``a.b.c`` imports ``a`` and ``a.b``. So each module
    left out is imported by a listed one, or by a later one left out for (1). Only
    modules the import system made (with a ``__spec__``) are listed: one put into
    ``sys.modules`` by hand cannot be preloaded. ``import a.b`` binds only ``a``, so
    what a module imports that way stays listed: longer, not wrong.
    """
    order = {name: i for i, (name, _) in enumerate(modules)}
    imported: set[str] = set()
    for i, (_, module) in enumerate(modules):
        try:
            namespace = list(vars(module).values())
        except TypeError:
            continue
        for value in namespace:
            try:  # a proxy's __class__ or __module__ may raise anything
                if isinstance(value, ModuleType):
                    target = value.__name__
                elif isinstance(value, (type, FunctionType)):
                    target = value.__module__
                else:
                    target = type(value).__module__  # an object it took, or made, at import
            except Exception:
                continue
            if isinstance(target, str) and order.get(target, i) < i:
                imported.add(target)
    kept = [name for name, module in modules if name not in imported
            and getattr(module, "__spec__", None) is not None]
    packages = {name[:i] for name in kept for i, c in enumerate(name) if c == "."}
    return [name for name in kept if name not in packages]


_NOTHING_NEW = encode_report([], None)  # made in the master, at import


def private_bytes() -> int | None:
    """This process's USS (Private_Clean + Private_Dirty) in bytes, or None."""
    try:
        fd = os.open("/proc/self/smaps_rollup", os.O_RDONLY)
    except OSError:
        return None
    try:
        text = os.read(fd, 8192)
    except OSError:
        return None
    finally:
        os.close(fd)
    total = 0
    for line in text.splitlines():
        if line.startswith((b"Private_Clean:", b"Private_Dirty:")):
            total += int(line.split()[1]) * 1024
    return total


# -- the master's side ---------------------------------------------------------------------


def parse_report(data: bytes) -> dict[str, Any] | None:
    """A child's report as ``status`` shows it (``imported_after_fork``), or None if it
    is not one: ``count`` modules imported after the fork, ``modules`` (in import order),
    ``preload`` (the names that import them all), ``dropped`` (not reported: over the
    size limit), ``uss`` (the child's private bytes when it reported, or null)."""
    try:
        report = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(report, dict):
        return None
    modules, preload = report.get("modules"), report.get("preload")
    count, dropped = report.get("count"), report.get("dropped")
    if not (_strings(modules) and _strings(preload) and _count(count) and _count(dropped)):
        return None
    uss = report.get("uss")
    return {"count": count, "modules": modules, "preload": preload, "dropped": dropped,
            "uss": uss if _count(uss) else None}


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class ImportReports:
    """The master's half: a pipe per fork, SIGURG to each child ``after`` seconds after
    its fork, and each report read into ``slot.imported_after_fork``; ``learn``, if set,
    is called with each report's modules."""

    def __init__(self, after: float) -> None:
        check_seconds("report_imports_after", after)
        self.after = after  # 0: no reports, no pipe, no SIGURG
        self.learn: Callable[[Sequence[str]], object] | None = None
        self._floor: frozenset[str] = frozenset()
        self._floor_size = -1
        # The child's end blocks: it waits for us to read its report.
        self._pipes = SlotPipes(self, child_blocks=True)
        self._data: dict[int, bytearray] = {}  # read end -> what it brought so far
        self._due: dict[Slot, tuple[float, int]] = {}  # slot -> (when, pid) to ask

    def attach(self, selector: selectors.BaseSelector) -> None:
        self._pipes.attach(selector)

    def arm(self, slot: Slot) -> tuple[int, frozenset[str]] | None:
        """Before ``slot`` forks: the write end and the floor's module names, for the child
        (None when reports are off)."""
        if not self.after:
            return None
        if len(sys.modules) != self._floor_size:  # the master imported something since
            self._floor, self._floor_size = frozenset(sys.modules), len(sys.modules)
        self.drop(slot)  # an earlier child's pipe, if it is still open
        return self._pipes.arm(slot), self._floor

    def forked(self, slot: Slot, pid: int | None, now: float) -> None:
        """After the fork (``pid`` None: it failed): only the child holds the write end."""
        if not self.after:
            return
        self._pipes.forked(slot, pid is not None)
        read_end = self._pipes.read_end(slot)
        if read_end is not None and pid is not None:
            self._data[read_end] = bytearray()
            self._due[slot] = (now + self.after, pid)

    def next_deadline(self) -> float | None:
        return min((when for when, _ in self._due.values()), default=None)

    def due(self, now: float) -> list[Any]:
        for slot, (when, pid) in list(self._due.items()):
            if when <= now:
                del self._due[slot]
                try:
                    os.kill(pid, REPORT_SIGNAL)
                except OSError:  # exited, not reaped yet
                    pass
        return []

    def read(self, fd: int) -> None:
        """The selector found ``fd`` readable: one bounded read; a newline or EOF ends
        the report."""
        slot, data = self._pipes.slot_of(fd), self._data.get(fd)
        if slot is None or data is None:
            return
        try:
            chunk = os.read(fd, _READ)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        data += chunk
        if len(data) > MAX_REPORT:
            log.warning("worker %s: its import report is over %d KiB: dropped",
                        slot.label, MAX_REPORT // 1024)
            self.drop(slot)
        elif b"\n" in chunk or not chunk:  # the whole report, or EOF before its end
            self.drop(slot)
            if data:
                self._take(slot, bytes(data.partition(b"\n")[0]))

    def exited(self, slot: Slot) -> None:
        """``slot``'s child was reaped: what it wrote still counts; it needs no SIGURG."""
        self._due.pop(slot, None)
        fd = self._pipes.read_end(slot)
        while fd is not None and fd in self._data:
            before = len(self._data[fd])
            self.read(fd)
            if fd in self._data and len(self._data[fd]) == before:
                self.drop(slot)  # EAGAIN: what it started holds the write end

    def _take(self, slot: Slot, data: bytes) -> None:
        report = parse_report(data)
        if report is None:
            log.warning("worker %s: its import report is not one: dropped", slot.label)
            return
        slot.imported_after_fork = report
        if self.learn is not None and report["modules"]:
            self.learn(report["modules"])  # before the line: a test waits for it
        log.log(logging.INFO if report["count"] else logging.DEBUG,
                "worker %s imported %d modules after the fork (%s private now)",
                slot.label, report["count"], _mib(report["uss"]))

    def drop(self, slot: Slot) -> None:
        """Close ``slot``'s read end, if it has one."""
        read_end = self._pipes.read_end(slot)
        if read_end is not None:
            self._data.pop(read_end, None)
        self._pipes.drop(slot)

    def fds(self) -> list[int]:
        """The read ends, which a forked child closes (its own too)."""
        return self._pipes.fds()

    def close(self) -> None:
        self._pipes.close()
        self._data.clear()
        self._due.clear()


def _mib(size: int | None) -> str:
    return "?" if size is None else f"{size / (1024 * 1024):.1f} MiB"
