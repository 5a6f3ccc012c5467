"""The client end of the control socket: ``prefork status``, ``reload`` and ``scale`` talk
to a running master through it, and ``status`` is rendered here as a table.

A client connects to ``<runtime dir>/<fleet>.sock``, writes one JSON request line and
reads one reply line (the protocol is in :mod:`prefork.control`). The memory figures of
``status`` are measured here, by the client, so the master never spends milliseconds
reading smaps for it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from prefork.control import ControlError, Peer, one_line, peer_of
from prefork.memory import MIB, MemoryUnavailable, measure
from prefork.tables import align

MAX_REPLY = 16 * 1024 * 1024  # bytes: the client's guard against a runaway reply


class NoMaster(Exception):
    """No master listens on the socket (no file, or a stale one). ``str()`` is one line."""


def request(path: Path, message: dict[str, Any], timeout: float = 5.0, *,
            any_uid: bool = False) -> dict[str, Any]:
    """Send ``message`` to the master listening at ``path``; return its reply.

    Raises :class:`NoMaster` when nothing listens there (no file, or a stale socket of a
    dead master) and :class:`ControlError` for a timeout, a refusal or a broken reply.
    An ``{"error": ...}`` reply is returned like any other. The process that listens must
    run as our uid or root (a master answers nobody else either), unless ``any_uid``:
    root asking the master of a unit that runs as its own user, in a directory named on
    purpose. A default directory in /tmp is anyone's to plant first.
    """
    return exchange(path, message, timeout, any_uid=any_uid)[0]


def exchange(path: Path, message: dict[str, Any], timeout: float = 5.0, *,
             any_uid: bool = False) -> tuple[dict[str, Any], Peer]:
    """:func:`request`, also returning who answered (the process that listens at ``path``)."""
    sock, peer = _connect(path, timeout, any_uid=any_uid)
    try:
        return _ask(sock, path, message, timeout), peer
    finally:
        sock.close()


def _connect(path: Path, timeout: float, *, any_uid: bool) -> tuple[socket.socket, Peer]:
    """A connection to the master at ``path`` and who listens there, checked as
    :func:`request` says; raises NoMaster or ControlError."""
    fleet = path.stem
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, NotADirectoryError):
            raise NoMaster(f"no master of fleet {fleet!r} is running "
                           f"(no socket at {path})") from None
        except ConnectionRefusedError:
            raise NoMaster(f"no master of fleet {fleet!r} is running "
                           f"(stale socket at {path}: nothing listens on it)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as the master's user "
                               "or as root") from None
        except BlockingIOError:  # the listen backlog is full
            raise ControlError(f"master of fleet {fleet!r} is too busy to answer "
                               f"({path})") from None
        except TimeoutError:
            raise ControlError(f"master of fleet {fleet!r} did not answer within "
                               f"{timeout:g}s ({path})") from None
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        peer = peer_of(sock)
        if not any_uid and peer.uid not in (os.getuid(), 0):
            raise ControlError(f"{path} is served by uid {peer.uid} (pid {peer.pid}), not by "
                               f"uid {os.getuid()} or root: not a master of yours; name the "
                               "directory with --runtime-dir to trust it")
    except BaseException:
        sock.close()
        raise
    return sock, peer


def _ask(sock: socket.socket, path: Path, message: dict[str, Any], timeout: float
         ) -> dict[str, Any]:
    """Send ``message`` on a connection to the master at ``path``; its reply."""
    fleet = path.stem
    deadline = time.monotonic() + timeout
    try:
        sock.sendall(json.dumps(message).encode() + b"\n", socket.MSG_NOSIGNAL)
        data = _read_line(sock, deadline)
    except TimeoutError:
        raise ControlError(f"master of fleet {fleet!r} did not answer within "
                           f"{timeout:g}s ({path})") from None
    except OSError as exc:
        raise ControlError(f"master of fleet {fleet!r} broke the connection: "
                           f"{exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ControlError(f"master of fleet {fleet!r} sent a broken reply: "
                           f"{data[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"master of fleet {fleet!r} sent a {type(reply).__name__}, "
                           "not an object")
    return reply


def masters_in(directory: Path, timeout: float = 5.0, *, pid: int | None = None,
               any_uid: bool = False) -> Iterator[tuple[Path, dict[str, Any], Peer]]:
    """Every master with a socket in ``directory`` that answers ``status`` (only the one
    whose process is ``pid``, if given: the others are not asked): its socket, its reply
    and the process that listens there (``SO_PEERCRED``: who really serves the socket,
    whatever its name or its reply say). Stale sockets, masters that do not answer and
    a missing directory are skipped; an unreadable one raises ControlError. This is how
    a fleet is found by its master's pid or by the spec it was started with, without
    importing the fleet or reading a process title."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory)
                       if entry.name.endswith(".sock"))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(f"cannot read runtime directory {directory}: "
                           f"{exc.strerror}") from None
    for name in names:
        path = directory / name
        try:
            sock, peer = _connect(path, timeout, any_uid=any_uid)
        except (NoMaster, ControlError):
            continue
        try:
            if pid is not None and peer.pid != pid:
                continue
            reply = _ask(sock, path, {"command": "status"}, timeout)
        except ControlError:
            continue
        finally:
            sock.close()
        if "error" not in reply:
            yield path, reply, peer


def _read_line(sock: socket.socket, deadline: float) -> bytes:
    """One reply line, all of it before ``deadline``; raise TimeoutError or ControlError."""
    data = bytearray()
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            if data:
                break  # a reply without its newline: still a whole reply
            raise ControlError("the master closed the connection without a reply")
        data += chunk
        if len(data) > MAX_REPLY:
            raise ControlError(f"the master's reply is over {MAX_REPLY} bytes")
    return bytes(data.split(b"\n", 1)[0])


# -- status: the reply, the memory measured here, and the table ------------------------


def fetch_status(path: Path, timeout: float = 5.0, *, any_uid: bool = False
                 ) -> dict[str, Any]:
    """The master's status reply with each process's memory, measured here.

    Adds ``memory`` (``rss``, ``uss``, ``pss``, ``shared``, ``swap`` in bytes, or null for a
    process without a pid or one gone before it was read) to the top level (the master's
    record) and to every worker, and ``total_pss``: the master's and the workers' PSS that
    could be read. Raises NoMaster or ControlError (also for an ``{"error": ...}`` reply
    or one without the documented shape). ``any_uid`` as for :func:`request`.
    """
    reply = request(path, {"command": "status"}, timeout, any_uid=any_uid)
    if "error" in reply:
        raise ControlError(f"the master refused status: {one_line(str(reply['error']))}")
    problem = _check_status(reply)
    if problem is not None:
        raise ControlError(f"the master's status reply is not understood: {problem}")
    reply["memory"] = _memory_of(reply["master_pid"])
    for worker in reply["workers"]:
        worker["memory"] = None if worker.get("pid") is None else _memory_of(worker["pid"])
    measured = [reply["memory"], *(w["memory"] for w in reply["workers"])]
    reply["total_pss"] = sum(m["pss"] for m in measured if m is not None)
    return reply


def _check_status(reply: dict[str, Any]) -> str | None:
    if not _is_int(reply.get("master_pid")):
        return "no master_pid"
    workers = reply.get("workers")
    if not isinstance(workers, list) or not all(isinstance(w, dict) for w in workers):
        return "no list of workers"
    for worker in workers:
        if worker.get("pid") is not None and not _is_int(worker["pid"]):
            return f"worker pid {worker['pid']!r}"
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _memory_of(pid: int) -> dict[str, int] | None:
    try:
        return measure(pid).as_dict()
    except MemoryUnavailable:
        return None  # exited since the master answered, or not ours to read


# The most characters of a hosted worker's last exception the table shows (--json: all).
_HOSTED_EXCEPTION_WIDTH = 60


def hosted_of(worker: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the workers a status entry's group hosts (:mod:`prefork.groups`): none
    for a worker of its own, and none that is not a mapping."""
    hosted = worker.get("hosted")
    if not isinstance(hosted, list):
        return []
    return [row for row in hosted if isinstance(row, dict)]


def _with_hosted_rows(document_workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The table's rows: each worker group's hosted workers as rows of their own right
    under the group's: no pid nor memory (theirs are the group process's), the in-process
    restarts, and the last exception as LAST EXIT."""
    workers: list[dict[str, Any]] = []
    for worker in document_workers:
        workers.append(worker)
        for row in hosted_of(worker):
            error = row.get("last_exception")
            if isinstance(error, str) and len(error) > _HOSTED_EXCEPTION_WIDTH:
                error = error[:_HOSTED_EXCEPTION_WIDTH - 3] + "..."
            due = row.get("next_start_in")
            uptime = row.get("uptime")
            workers.append({
                "name": f"  {row.get('name', '?')}", "state": row.get("state", "?"),
                "restarts": row.get("restarts", "-"), "last_exit": error,
                "uptime": uptime if isinstance(uptime, int | float) else None,
                "next_start_in": due if isinstance(due, int | float) else None,
                "reason": f"in group {worker.get('name', '?')}"})
    return workers


def format_status(status: dict[str, Any]) -> str:
    """:func:`fetch_status`'s document as a header line, a line about reloads when there
    is something to say (:func:`reload_line`), and a table (memory in MiB)."""
    workers = status["workers"]
    with_pid = [w for w in workers if w.get("pid") is not None]
    measured = [w for w in with_pid if w.get("memory") is not None]
    parts = [f"master {status['master_pid']}"]
    if status.get("uptime") is not None:
        parts.append(f"up {format_duration(status['uptime'])}")
    if status.get("python"):
        parts.append(f"Python {status['python']}")
    # Say what the total covers: a worker that exited before it was measured is not in it.
    who = "master" if status.get("memory") is not None else "master unreadable"
    counted = f"{len(measured)}" if len(measured) == len(with_pid) else (
        f"{len(measured)} of {len(with_pid)}")
    who += f" + {counted} worker{'' if len(with_pid) == 1 else 's'}"
    parts.append(f"total PSS {status['total_pss'] / MIB:.1f} MiB ({who})")
    lines = [f"fleet {status.get('fleet', '?')}: {', '.join(parts)}"]
    reloads = reload_line(status)
    if reloads is not None:
        lines.append(reloads)
    header = ("WORKER", "REPLICA", "PID", "STATE", "RESTARTS", "UPTIME", "LAST EXIT",
              "RSS", "USS", "PSS", "SHARED", "AFTER FORK", "REASON")
    rows: list[tuple[str, ...]] = [header]
    for w in _with_hosted_rows(workers):
        state = str(w.get("state", "?"))
        if w.get("next_start_in") is not None:
            state += f" {w['next_start_in']:.1f}s"
        memory = w.get("memory")
        sizes = ("-",) * 4 if memory is None else tuple(
            f"{memory[key] / MIB:.1f}" for key in ("rss", "uss", "pss", "shared"))
        rows.append((str(w.get("name", w.get("label", "?"))), str(w.get("replica", "-")),
                     _or_dash(w.get("pid")), state, str(w.get("restarts", "-")),
                     format_duration(w.get("uptime")), _or_dash(w.get("last_exit")),
                     *sizes, _imported(w.get("imported_after_fork")),
                     _or_dash(w.get("reason"))))
    lines += align(rows, right={1, 2, 4, 5, 7, 8, 9, 10, 11})  # numbers on the right
    lines.append("(memory in MiB; AFTER FORK: modules the worker imported after the fork, "
                 "and its USS when it reported them)")
    preload = preload_line(workers)
    if preload:
        lines += ["To import them into the floor instead, add to `prefork run` "
                  "(or run it with --learn-floor):", f"  {preload}"]
    return "\n".join(lines)


class ReloadResult(NamedTuple):
    """How a reload ended, from a status document's ``reloads``."""

    id: int
    kind: str | None  # "code" or "workers"
    ok: bool
    error: str | None  # one line, when not ok
    generation: int | None  # the code generation running since


def ended_reload(status: dict[str, Any], ident: int) -> ReloadResult | None:
    """The last reload's result if reload ``ident`` has ended (the last result's id is
    ``ident`` or more), else None; None too for a document without that part."""
    reloads = status.get("reloads")
    last = reloads.get("last_result") if isinstance(reloads, dict) else None
    if not isinstance(last, dict) or not _is_count(last.get("id")) or last["id"] < ident:
        return None
    assert isinstance(reloads, dict)
    ok = last.get("ok") is True
    kind, generation = last.get("kind"), reloads.get("generation")
    return ReloadResult(
        last["id"], kind if isinstance(kind, str) else None, ok,
        None if ok else one_line(str(last.get("error") or "no reason given")),
        generation if _is_count(generation) else None)


_PHASES = {"trial": "trial of the new code", "rolling": "rolling the workers"}


def reload_line(status: dict[str, Any]) -> str | None:
    """The status's line about reloads, if there is something to say: one in progress, the
    last one failed, or the code generation running after a code reload. None for a
    fleet never reloaded, and for an older master's document that has none of it."""
    reloads = status.get("reloads")
    if not isinstance(reloads, dict):
        return None
    if reloads.get("in_progress") is True:
        phase = reloads.get("phase")
        phase = _PHASES.get(phase) if isinstance(phase, str) else None
        queued = " (another one queued)" if reloads.get("pending") is True else ""
        return f"reload in progress{f': {phase}' if phase else ''}{queued}"
    last = reloads.get("last_result")
    if isinstance(last, dict) and last.get("ok") is False:
        error = one_line(str(last.get("error") or "no reason given"))
        return f"reload failed{_at(last.get('at'))}: {error}"
    generation = reloads.get("generation")
    if _is_count(generation) and generation > 0:
        return f"code generation {generation}, loaded{_at(reloads.get('code_loaded'))}"
    return None


def _at(when: object) -> str:
    """`` at 14:03:07`` for a Unix time (with the date unless today), or ""."""
    if not isinstance(when, int | float) or isinstance(when, bool):
        return ""
    try:
        moment, today = time.localtime(when), time.localtime()
    except (OverflowError, OSError, ValueError):  # out of range, or NaN
        return ""
    same_day = moment[:3] == today[:3]
    return f" at {time.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S', moment)}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _imported(report: object) -> str:
    """``"12 (3.4)"``: modules imported after the fork and the USS (MiB) the worker had
    when it reported them; ``"-"``: no report."""
    if not isinstance(report, dict) or not isinstance(report.get("count"), int):
        return "-"
    uss = report.get("uss")
    return (f"{report['count']}" if not isinstance(uss, int)
            else f"{report['count']} ({uss / MIB:.1f})")


def preload_names(workers: list[dict[str, Any]]) -> list[str]:
    """The names that import what every worker reported, in the order first reported:
    the union of each report's ``preload`` (each of which imports its own worker's)."""
    names: dict[str, None] = {}
    for worker in workers:
        report = worker.get("imported_after_fork")
        if isinstance(report, dict) and isinstance(report.get("preload"), list):
            names.update(dict.fromkeys(n for n in report["preload"] if isinstance(n, str)))
    return list(names)


def preload_line(workers: list[dict[str, Any]]) -> str:
    """``--preload a --preload b``, or "" when no worker imported anything."""
    return " ".join(f"--preload {name}" for name in preload_names(workers))


def format_duration(seconds: float | None) -> str:
    """``"-"``, ``"42s"``, ``"3m05s"``, ``"2h07m"`` or ``"3d04h"``."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _or_dash(value: object) -> str:
    return "-" if value is None else str(value)
