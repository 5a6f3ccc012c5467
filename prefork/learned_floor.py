"""``--learn-floor``: the modules workers imported after the fork, kept in the fleet's state
directory and imported into the floor at the next start.

The file, ``FLEET.floor`` in ``$STATE_DIRECTORY`` (systemd's, for a unit with
``StateDirectory=``), else ``$XDG_STATE_HOME/prefork``, else ``~/.local/state/prefork``,
is JSON: ``{"fleet": NAME, "modules": [...], "left": {MODULE: WHY}}``. ``modules`` is
the union of what the workers reported (:mod:`prefork.after_fork`), in the order first
seen; ``left``, the modules the master does not import and never tries again: one that
failed to import, or started a thread when imported (a thread in the master makes every
fork unsafe: :mod:`prefork.threads`). The master rewrites it (a temporary file, then a
rename) whenever a report adds a module. An unreadable or garbled file is one warning
and is ignored (and replaced by the next report): it never stops a start.

At start, before the floor is frozen, :func:`import_learned` first imports the listed
modules in a throwaway child of the master (a trial: a failed import may leave a
package half made, and a thread cannot be taken back), then imports into the master
only those the trial imported cleanly, in their order.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from prefork.prctl import PR_SET_PDEATHSIG, prctl

log = logging.getLogger("prefork")

TRIAL_TIMEOUT = 60.0  # seconds the trial may take to import every module
MAX_FILE = 16 * 1024 * 1024  # bytes: a larger file is not one of ours


def floor_file(fleet: str, environ: dict[str, str] | None = None) -> Path:
    """Where fleet ``fleet``'s learned floor is kept."""
    env = os.environ if environ is None else environ
    if env.get("STATE_DIRECTORY"):  # systemd's StateDirectory=; the first of a list
        return Path(env["STATE_DIRECTORY"].split(":")[0]) / f"{fleet}.floor"
    base = Path(env["XDG_STATE_HOME"]) if env.get("XDG_STATE_HOME", "").startswith("/") \
        else Path(env.get("HOME") or os.path.expanduser("~")) / ".local" / "state"
    return base / "prefork" / f"{fleet}.floor"


class LearnedFloor:
    """The learned floor of one fleet, as read from (and written to) ``path``."""

    def __init__(self, fleet: str, path: Path) -> None:
        self.fleet = fleet
        self.path = path
        self.modules: list[str] = []
        self.left: dict[str, str] = {}
        self._known: set[str] = set()
        self._save_failed = False

    @classmethod
    def load(cls, fleet: str, path: Path) -> LearnedFloor:
        """Read ``path``; a missing file is an empty floor, a bad one a warning too."""
        floor = cls(fleet, path)
        try:
            # O_NOFOLLOW: a symlink planted there is not ours to read.
            with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb") as file:
                problem = _not_ours(os.fstat(file.fileno()), os.stat(path.parent))
                data = file.read(MAX_FILE + 1)
        except FileNotFoundError:
            return floor
        except OSError as exc:
            log.warning("learned floor %s unreadable (%s): ignored", path,
                        exc.strerror or exc)
            return floor
        if problem is not None:  # its names would be imported into the master
            log.warning("learned floor %s ignored: %s", path, problem)
            return floor
        problem = floor._take(data)
        if problem is not None:
            log.warning("learned floor %s ignored: %s; it will be written afresh", path,
                        problem)
        return floor

    def _take(self, data: bytes) -> str | None:
        if len(data) > MAX_FILE:
            return f"over {MAX_FILE // (1024 * 1024)} MiB"
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            return "not JSON"
        if not isinstance(doc, dict):
            return "not a JSON object"
        modules, left = doc.get("modules", []), doc.get("left", {})
        if not isinstance(modules, list) or not all(_is_name(m) for m in modules):
            return "\"modules\" is not a list of module names"
        if not isinstance(left, dict) or not all(
                _is_name(k) and isinstance(v, str) for k, v in left.items()):
            return "\"left\" is not an object of module names and reasons"
        self.left = dict(left)
        self.add(modules, save=False)
        return None

    def add(self, modules: Sequence[str], *, save: bool = True) -> list[str]:
        """Add the modules not known yet (in their order); write the file if any was.
        Returns the new ones."""
        new = [m for m in dict.fromkeys(modules) if m not in self._known and _is_name(m)]
        if not new:
            return []
        self.modules += new
        self._known.update(new)
        if save:
            self.save()
        return new

    def leave(self, problems: dict[str, str]) -> None:
        """Mark ``problems`` (module: why) as left to the workers, for good; write."""
        self.left.update(problems)
        self.save()

    def save(self) -> None:
        """Write the file whole: a temporary file beside it, then a rename. A failure is
        one warning (the first; the next ones are debug lines) and the fleet goes on."""
        text = json.dumps({"fleet": self.fleet, "modules": self.modules, "left": self.left},
                          indent=1) + "\n"
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        written = False
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # O_EXCL | O_NOFOLLOW: never through a name someone else planted.
            with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                              | os.O_CLOEXEC, 0o600), "w") as file:
                file.write(text)
            os.replace(temporary, self.path)
            written = True
        except OSError as exc:
            log.log(logging.DEBUG if self._save_failed else logging.WARNING,
                    "learned floor %s: cannot write it: %s", self.path, exc.strerror or exc)
            self._save_failed = True
        finally:
            if not written:
                try:
                    os.unlink(temporary)
                except OSError:
                    pass


def _not_ours(file: os.stat_result, directory: os.stat_result) -> str | None:
    """Why a learned floor file may have been written by someone else, or None: it and
    its directory must be ours (or root's) and not writable by group or others."""
    me = os.getuid()
    for what, st in (("the file", file), ("its directory", directory)):
        if st.st_uid not in (me, 0):
            return f"{what} belongs to uid {st.st_uid}, not to us"
        if st.st_mode & 0o022 and not (what == "its directory" and st.st_mode & 0o1000):
            return f"{what} is writable by others (mode {st.st_mode & 0o7777:o})"
    return None


def _is_name(value: object) -> bool:
    """A module name importlib can be asked for (``_sysconfigdata__linux_x86_64-linux-gnu``
    is one): dotted parts, none empty, no path separator, space or control character."""
    return (isinstance(value, str) and 0 < len(value) <= 512 and value.isprintable()
            and all(part and not any(c in part for c in "/\\ ") for part in value.split(".")))


def learn(fleet: str) -> Callable[[Sequence[str]], object]:
    """In a master that learns, before it freezes its floor: read fleet ``fleet``'s
    learned floor and import it; return what adds a report's modules to it."""
    floor = LearnedFloor.load(fleet, floor_file(fleet))
    try:
        import_learned(floor)
    except Exception as exc:  # the trial's fork failed, ...: the start goes on without
        log.warning("learned floor %s not imported: %s: %s", floor.path,
                    type(exc).__name__, exc)
    return floor.add


def import_learned(floor: LearnedFloor) -> None:
    """Import ``floor``'s modules into this process (the master, before it freezes the
    floor and forks); mark and log in one line those left to the workers."""
    todo = [m for m in floor.modules if m not in floor.left]
    if not todo:
        return
    todo = [m for m in todo if m not in sys.modules]
    started = time.perf_counter()
    clean, problems = trial_imports(todo)
    imported = 0
    for module in clean:
        if module in sys.modules:
            continue
        problem = import_one(module)  # the trial said it is fine; the master checks again
        if problem is not None:
            problems[module] = problem
        else:
            imported += 1
    log.info("learned floor: %d modules imported from %s in %.0f ms (%d listed; the "
             "others were in the floor, or imported by those)", imported, floor.path,
             (time.perf_counter() - started) * 1000, len(floor.modules))
    if problems:
        log.warning("learned floor: left to the workers: %s",
                    "; ".join(f"{m} ({why})" for m, why in problems.items()))
        floor.leave(problems)


def import_one(module: str) -> str | None:
    """Import ``module``; what is wrong with it for the floor, or None."""
    before = set(threading.enumerate())
    try:
        importlib.import_module(module)
    except BaseException as exc:  # SystemExit, KeyboardInterrupt from a module too
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    started = [t.name for t in threading.enumerate() if t not in before]
    if started:
        return f"starts a thread: {', '.join(started)}"[:200]
    return None


def trial_imports(modules: Sequence[str], timeout: float = TRIAL_TIMEOUT
                  ) -> tuple[list[str], dict[str, str]]:
    """Import ``modules`` in order in a child of this process; return those it imported
    cleanly, in order, and those that failed or started a thread (module: why). One still
    importing after ``timeout`` is one of them; those after it are not tried this time."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the trial child
        code = 0
        try:
            os.close(read_end)
            prctl(PR_SET_PDEATHSIG, 9)
            for module in modules:
                os.write(write_end, json.dumps([module]).encode() + b"\n")
                problem = import_one(module)
                os.write(write_end, json.dumps([module, problem]).encode() + b"\n")
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    clean: list[str] = []
    problems: dict[str, str] = {}
    trying: str | None = None
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                if trying is not None:
                    problems[trying] = f"still importing after {timeout:g}s"
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                if trying is not None:  # it ended the trial: os._exit, a crash
                    problems[trying] = "ended the process when imported"
                break
            *lines, data = (data + chunk).split(b"\n")
            for line in lines:
                entry = json.loads(line)
                if len(entry) == 1:
                    trying = entry[0]
                else:
                    trying = None
                    if entry[1] is None:
                        clean.append(entry[0])
                    else:
                        problems[entry[0]] = entry[1]
    finally:
        os.close(read_end)
        try:
            os.kill(pid, 9)
        except OSError:
            pass
        os.waitpid(pid, 0)
    return clean, problems
