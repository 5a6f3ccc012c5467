"""The control socket (``prefork.control``) and the commands built on it: ``prefork status``,
``reload`` and ``scale``.

The server is driven here either in-process, by calling ``handle()``/``due()`` the way the
master's loop does, or in a forked helper process with a canned handler (``served``), so a
blocking client and the CLI can talk to it. Nothing waits by sleeping: every wait is a
``select()`` on a socket or pipe, bounded by ``WAIT``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import select
import selectors
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Events, MasterProcess
from prefork.cli import main
from prefork.client import NoMaster, exchange, format_duration, format_status, request
from prefork.control import (
    MAX_CONNECTIONS,
    MAX_REQUEST,
    READ_TIMEOUT,
    WARNING_INTERVAL,
    Command,
    ControlError,
    ControlServer,
    Throttle,
    command_table,
)
from prefork.paths import socket_path

WAIT = 5.0
NOBODY = 65534
MEMORY_KEYS = {"rss", "uss", "pss", "shared", "swap"}
STATUS_KEYS = {"fleet", "master_pid", "uptime", "python", "workers"}
WORKER_KEYS = {"name", "replica", "label", "pid", "state", "restarts", "uptime", "last_exit",
               "reason", "next_start_in", "imported_after_fork"}

as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to take another uid")


# -- helpers -----------------------------------------------------------------------------


class Recorder:
    """A handler that records each request and answers with ``reply``."""

    def __init__(self, reply: dict[str, Any] | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = reply if reply is not None else {"ok": True}

    def __call__(self, message: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(message)
        return self.reply


def answering(handler: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Command]:
    """The master's command table with ``handler`` answering every command."""
    return command_table(status=handler, scale=handler, reload=handler)


def requests_of(server: ControlServer) -> list[dict[str, Any]]:
    """What the server's Recorder handler was asked."""
    recorder = server.commands["status"].run
    assert isinstance(recorder, Recorder)
    return recorder.requests


@pytest.fixture
def server(runtime_dir: Path) -> Iterator[ControlServer]:
    """An open in-process server answering ``{"ok": true}``; its Recorder records."""
    control = ControlServer(socket_path(runtime_dir, "demo"), answering(Recorder()))
    control.open()
    yield control
    control.close()


class _Records(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.records.append(record)


@pytest.fixture
def prefork_log() -> Iterator[list[logging.LogRecord]]:
    """The warnings and errors the ``prefork`` logger emits during the test (caught on the
    logger itself: ``prefork run`` in-process stops its records from reaching root)."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("prefork")
    handler = _Records(records)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def connect(path: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(WAIT)
    client.connect(str(path))  # completes in the backlog, before the server accepts
    return client


def pump(server: ControlServer, done: Callable[[], bool], wake: tuple[int, ...] = ()) -> None:
    """Run the server as the master's loop would until ``done()``; fail after WAIT.
    ``done()`` is checked after each wake-up: of the server, or of a descriptor in ``wake``."""
    deadline = time.monotonic() + WAIT
    while not done():
        remaining = deadline - time.monotonic()
        assert remaining > 0, "the server did not get there in time"
        ready, _, _ = select.select([*server.fds(), *wake], [], [], remaining)
        for fd in ready:
            if fd not in wake:
                server.handle(fd)


def readable(sock: socket.socket) -> Callable[[], bool]:
    return lambda: bool(select.select([sock], [], [], 0)[0])


def ask(server: ControlServer, raw: bytes, *, shut: bool = False) -> bytes:
    """Send ``raw`` on a new connection, serve it, return all the server wrote."""
    client = connect(server.path)
    client.sendall(raw)
    if shut:
        client.shutdown(socket.SHUT_WR)
    pump(server, readable(client))
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    client.close()
    return data


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def in_child(body: Callable[[], str], serving: ControlServer | None = None) -> str:
    """Run ``body`` in a forked child; return the line it produced (or its exception).
    With ``serving``, run that server here, as the master would, until the child reports."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            result = body()
        except BaseException as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(w, result.encode())
        os._exit(0)
    os.close(w)
    try:
        if serving is not None:
            pump(serving, lambda: bool(select.select([r], [], [], 0)[0]), wake=(r,))
        ready, _, _ = select.select([r], [], [], WAIT)
        assert ready, "the child did not report"
        return os.read(r, 4096).decode()
    finally:
        os.close(r)
        os.waitpid(pid, 0)


@dataclass
class Served:
    """A ControlServer running in a forked process (see :func:`served`)."""

    pid: int
    path: Path
    _reports: int
    _buffer: bytes = b""

    def report(self) -> str:
        """The next line the server process reported: a request's JSON, or "SIGHUP"."""
        deadline = time.monotonic() + WAIT
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([self._reports], [], [], max(0.0, remaining))
            assert ready, "the server process reported nothing"
            chunk = os.read(self._reports, 4096)
            assert chunk, "the server process ended"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()


@contextmanager
def served(path: Path, answer: Callable[[dict[str, Any]], dict[str, Any]]) -> Iterator[Served]:
    """Fork a process that serves ``path`` with ``answer`` (called in that process, so
    ``os.getpid()`` there is the master's pid) and reports each request and SIGHUP."""
    stop_r, stop_w = os.pipe()
    ready_r, ready_w = os.pipe()
    report_r, report_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            for fd in (stop_w, ready_r, report_r):
                os.close(fd)
            signal.signal(signal.SIGHUP, lambda *_: os.write(report_w, b"SIGHUP\n"))

            def handler(message: dict[str, Any]) -> dict[str, Any]:
                os.write(report_w, json.dumps(message).encode() + b"\n")
                return answer(message)

            control = ControlServer(path, answering(handler))
            control.open()
            os.write(ready_w, b"ready")
            while True:
                deadline = control.next_deadline()
                timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([stop_r, *control.fds()], [], [], timeout)
                if stop_r in ready:
                    break
                for fd in ready:
                    control.handle(fd)
                control.due(time.monotonic())
            control.close()
        except BaseException:
            traceback.print_exc()
            code = 1
        os._exit(code)
    for fd in (stop_r, ready_w, report_w):
        os.close(fd)
    try:
        ready, _, _ = select.select([ready_r], [], [], WAIT)
        assert ready and os.read(ready_r, 16) == b"ready", "the server process did not start"
        yield Served(pid, path, report_r)
    finally:
        os.close(stop_w)  # EOF: the server's loop ends
        _, status = os.waitpid(pid, 0)
        for fd in (ready_r, report_r):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0, "the server process failed"


def prefork(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the ``prefork`` CLI in-process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    code = exited.value.code
    assert isinstance(code, int), code
    return code, out, err


def prefork_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "prefork", *args], capture_output=True,
                          text=True, timeout=30)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A runtime dir another uid can traverse (0711, under /tmp), unlike pytest's tmp_path."""
    path = Path(tempfile.mkdtemp(prefix="prefork-control-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    for entry in path.iterdir():
        entry.unlink()
    path.rmdir()


# -- the server ----------------------------------------------------------------------------


def test_round_trip(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "demo")
    assert path == runtime_dir / "demo.sock"

    def answer(message: dict[str, Any]) -> dict[str, Any]:
        return {"pid": os.getpid(), "echo": message}

    with served(path, answer) as master:
        reply, peer = exchange(path, {"command": "status"})
        assert reply == {"pid": master.pid, "echo": {"command": "status"}}
        assert peer.pid == master.pid and peer.uid == os.getuid()
        scale = {"command": "scale", "worker": "mailer", "delta": -1}
        assert request(path, scale)["echo"] == scale
        assert [json.loads(master.report()) for _ in range(2)] == [{"command": "status"}, scale]


def test_socket_is_0600_in_a_0700_dir_and_not_inherited(tmp_path: Path) -> None:
    directory = tmp_path / "fresh" / "run"
    control = ControlServer(socket_path(directory, "demo"), answering(Recorder()))
    control.open()
    try:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        mode = control.path.lstat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
        client = connect(control.path)
        pump(control, lambda: len(control.fds()) == 2)  # accepted, waiting for the request
        assert control.own_fds() == control.fds()
        assert not any(os.get_inheritable(fd) for fd in control.own_fds())  # CLOEXEC
        client.close()
    finally:
        control.close()
    assert control.fds() == [] and control.own_fds() == []


@as_root
def test_other_uid_is_refused_by_the_socket_files_mode(open_dir: Path) -> None:
    control = ControlServer(socket_path(open_dir, "demo"), answering(Recorder()))
    control.open()
    try:
        def as_nobody() -> str:
            os.setuid(NOBODY)
            try:
                socket.socket(socket.AF_UNIX).connect(str(control.path))
            except OSError as exc:
                return errno.errorcode.get(exc.errno or 0, str(exc))
            return "connected"

        # The directory lets uid 65534 through (0711): the socket's 0600 alone stops it.
        assert in_child(as_nobody) == "EACCES"
        assert not select.select(control.fds(), [], [], 0)[0], "nothing reached the listener"
    finally:
        control.close()


@as_root
def test_other_uid_is_refused_by_peercred(open_dir: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    control = ControlServer(socket_path(open_dir, "demo"), answering(Recorder()))
    control.open()
    try:
        control.path.chmod(0o666)  # as if the file's mode had been loosened: SO_PEERCRED holds

        def as_nobody() -> str:
            os.setuid(NOBODY)
            client = connect(control.path)
            try:  # the server may close it before, while or after the request is sent
                client.sendall(b'{"command": "status"}\n')
                reply = client.recv(4096)
            except (BrokenPipeError, ConnectionResetError):
                reply = b""
            return f"connected, then closed with {reply!r}"

        # The child's connect succeeds (the file lets it), so the listener becomes readable.
        result = in_child(as_nobody, serving=control)
        assert result == "connected, then closed with b''"
        assert requests_of(control) == []
        assert control.fds() == control.fds()[:1]  # no connection kept
        assert f"refused a connection from uid {NOBODY}" in caplog.text
    finally:
        control.close()


def test_silent_client_is_dropped_at_its_deadline_without_blocking_others(
        server: ControlServer) -> None:
    before = time.monotonic()
    silent = connect(server.path)
    pump(server, lambda: len(server.fds()) == 2)
    deadline = server.next_deadline()
    assert deadline is not None
    assert before + READ_TIMEOUT <= deadline <= time.monotonic() + READ_TIMEOUT
    silent_fd = server.fds()[1]

    started = time.perf_counter()
    server.handle(silent_fd)  # a spurious wake-up: nothing to read, so back at once
    assert time.perf_counter() - started < 0.5

    # While the silent client waits, another is answered.
    assert json.loads(ask(server, b'{"command": "status"}\n')) == {"ok": True}
    assert server.fds() == [server.fds()[0], silent_fd]

    server.due(deadline - 0.001)  # the loop's clock, driven by hand
    assert server.fds()[1:] == [silent_fd]
    server.due(deadline)
    assert server.fds()[1:] == [] and server.next_deadline() is None
    assert silent.recv(4096) == b""  # dropped: EOF, no reply
    silent.close()


def test_partial_line_then_the_rest(server: ControlServer) -> None:
    client = connect(server.path)
    client.sendall(b'{"command": "sta')
    pump(server, lambda: len(server.fds()) == 2)
    server.handle(server.fds()[1])
    assert not readable(client)(), "answered half a request"
    client.sendall(b'tus"}\n')
    pump(server, readable(client))
    assert client.recv(4096) == b'{"ok":true}\n'
    assert requests_of(server) == [{"command": "status"}]
    client.close()


def test_request_ended_by_shutdown_instead_of_newline(server: ControlServer) -> None:
    assert ask(server, b'{"command": "status"}', shut=True) == b'{"ok":true}\n'


BAD_REQUESTS = [
    (b"not json\n", "request is not JSON"),
    (b"\xff\xfe\n", "request is not JSON"),
    (b"[1, 2]\n", "a request must be a JSON object"),
    (b"{}\n", 'a request needs a "command"'),
    (b'{"command": "frobnicate"}\n', "unknown command 'frobnicate' (known: reload, scale, status)"),
    (b'{"command": "scale", "delta": 1}\n', 'scale needs a "worker" name'),
    (b'{"command": "scale", "worker": "w", "delta": 2}\n', 'scale needs a "delta" of 1 or -1'),
    (b'{"command": "scale", "worker": "w", "delta": true}\n', 'needs a "delta" of 1 or -1'),
    (b'{"command": "reload", "workers_only": 1}\n',
     'reload\'s "workers_only" must be true or false, got 1'),
    (b'{"command": "reload", "workers_only": null}\n', '"workers_only" must be true or false'),
    (b'{"command": "reload", "workers_only": "yes"}\n', "must be true or false, got 'yes'"),
]


@pytest.mark.parametrize(("raw", "message"), BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_request_gets_an_error_line(server: ControlServer, raw: bytes, message: str) -> None:
    reply = ask(server, raw)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert message in json.loads(reply)["error"]
    assert requests_of(server) == []


@pytest.mark.parametrize("raw", [b'{"command": "reload"}\n',
                                 b'{"command": "reload", "workers_only": false}\n',
                                 b'{"command": "reload", "workers_only": true}\n'])
def test_reload_request_reaches_its_handler(server: ControlServer, raw: bytes) -> None:
    assert json.loads(ask(server, raw)) == {"ok": True}
    assert requests_of(server) == [json.loads(raw)]


def test_handler_exception_is_an_error_reply_and_the_server_goes_on(runtime_dir: Path) -> None:
    calls = 0

    def flaky(message: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ZeroDivisionError("division by zero")
        return {"ok": True}

    control = ControlServer(socket_path(runtime_dir, "demo"), answering(flaky))
    control.open()
    try:
        error = json.loads(ask(control, b'{"command": "status"}\n'))["error"]
        assert error == "internal error: ZeroDivisionError: division by zero"
        assert json.loads(ask(control, b'{"command": "status"}\n')) == {"ok": True}
    finally:
        control.close()


def test_oversized_request_is_dropped(server: ControlServer) -> None:
    client = connect(server.path)
    client.sendall(b"x" * (MAX_REQUEST + 1))
    pump(server, readable(client))
    try:
        reply = client.recv(4096)
    except ConnectionResetError:  # closed with our bytes unread: the kernel may say so
        reply = b""
    assert reply in (b"", f'{{"error":"request over {MAX_REQUEST} bytes"}}\n'.encode())
    assert requests_of(server) == []
    assert server.fds() == server.fds()[:1]
    client.close()


SCALE = b'{"command": "scale", "worker": "w", "delta": '
HOSTILE_REQUESTS = [
    (b"[" * 60000, "nests too deeply"),
    (b'{"a":' * 12000, "nests too deeply"),
    (b'{"command": ' + b"[" * 30000, "nests too deeply"),
    (SCALE + b"[" * 500 + b"]" * 500 + b"}", 'needs a "delta" of 1 or -1, got an array'),
    (SCALE + b"1" * 5000 + b"}", "request is not JSON: Exceeds the limit (4300 digits)"),
    (SCALE + b"1e999999}", 'needs a "delta" of 1 or -1, got inf'),
    (SCALE + b'"' + b"9" * 60000 + b'"}', "got '" + "9" * 36 + "..."),
    (b'{"command": ["status"]}', 'a request needs a "command"'),
    (b'{"command": {"status": 1}}', 'a request needs a "command"'),
    (b'{"command": "' + b"x" * 60000 + b'"}', "unknown command '" + "x" * 36 + "..."),
    (b'{"command": "\\ud800"}', "unknown command '\\ud800' (known: reload, scale, status)"),
    # Given bytes, json.loads would take these for UTF-16 and UTF-32 and run the command.
    ('{"command": "status"}'.encode("utf-16-le"), "request is not JSON"),
    ('{"command": "status"}'.encode("utf-32"), "request is not JSON"),
    (b'{"command": "status", "x": "\xc3\x28"}', "request is not JSON: 'utf-8' codec can't"),
    (b"\x00" * 1000, "request is not JSON"),
    (b"-Infinity", "a request must be a JSON object"),
]


@pytest.mark.parametrize("shut", [False, True], ids=["newline", "eof"])
@pytest.mark.parametrize(("raw", "message"), HOSTILE_REQUESTS,
                         ids=[f"{raw[:12]!r}-{len(raw)}" for raw, _ in HOSTILE_REQUESTS])
def test_hostile_request_gets_one_short_error_line_and_the_server_goes_on(
        server: ControlServer, raw: bytes, message: str, shut: bool) -> None:
    assert len(raw) <= MAX_REQUEST and b"\n" not in raw
    reply = ask(server, raw if shut else raw + b"\n", shut=shut)
    assert reply.endswith(b"\n") and reply.count(b"\n") == 1
    assert len(reply) < 300, reply[:300]  # nothing of the request is echoed at length
    assert message in json.loads(reply)["error"]
    assert requests_of(server) == []
    assert json.loads(ask(server, b'{"command": "status"}\n')) == {"ok": True}
    assert server.fds() == server.fds()[:1]  # nothing left open


def failing(exc: Exception) -> Callable[..., Any]:
    def fail(*args: object) -> Any:
        raise exc
    return fail


def test_an_unexpected_failure_drops_only_that_connection(
        server: ControlServer, monkeypatch: pytest.MonkeyPatch,
        prefork_log: list[logging.LogRecord]) -> None:
    # The last line of defence, for bugs not yet made: in reading, dispatching, accepting.
    client = connect(server.path)
    with monkeypatch.context() as patch:
        patch.setattr(server, "_dispatch", failing(KeyError("bug")))
        client.sendall(b'{"command": "status"}\n')
        pump(server, readable(client))
    assert client.recv(4096) == b""  # dropped: EOF, no reply
    client.close()
    assert server.fds() == server.fds()[:1]
    [record] = prefork_log
    assert record.getMessage() == ("control: internal error while serving a client; dropped "
                                   "its connection")
    assert record.exc_info is not None and record.exc_info[0] is KeyError

    with monkeypatch.context() as patch:
        patch.setattr("prefork.control.peer_of", failing(RuntimeError("bug")))
        client = connect(server.path)
        pump(server, readable(client))
    assert client.recv(4096) == b""
    client.close()
    assert server.fds() == server.fds()[:1]
    assert len(prefork_log) == 1  # the second failure within WARNING_INTERVAL: held back
    assert json.loads(ask(server, b'{"command": "status"}\n')) == {"ok": True}
    server.due(time.monotonic() + WARNING_INTERVAL)
    assert [r.getMessage() for r in prefork_log[1:]] == [
        "control: 1 more internal error(s) while serving clients; connections dropped"]


def test_a_check_that_fails_is_an_error_reply(runtime_dir: Path) -> None:
    commands = {"status": Command(Recorder(), failing(TypeError("unhashable type: 'list'")))}
    control = ControlServer(socket_path(runtime_dir, "demo"), commands)
    control.open()
    try:
        reply = json.loads(ask(control, b'{"command": "status"}\n'))
        assert reply == {"error": "internal error: TypeError: unhashable type: 'list'"}
    finally:
        control.close()


def test_throttle_logs_the_first_then_one_line_per_interval_with_the_count() -> None:
    throttle = Throttle(10.0)
    assert throttle.next_deadline() is None
    assert throttle.note("busy", 100.0) == 1  # the first: at once
    assert throttle.next_deadline() is None  # nothing held back: no wake-up needed
    assert [throttle.note("busy", t) for t in (100.0, 101.0, 109.9)] == [0, 0, 0]
    assert throttle.note("uid", 105.0) == 1  # each kind on its own
    assert throttle.next_deadline() == 110.0
    assert list(throttle.due(109.9)) == []
    assert list(throttle.due(110.0)) == [("busy", 3)]
    assert throttle.next_deadline() is None
    assert throttle.note("busy", 115.0) == 0  # quiet until 120: the summary was a line
    assert throttle.note("busy", 121.0) == 2  # no due() in between: told with this one
    assert throttle.note("busy", 140.0) == 1  # long quiet: at once again
    assert list(throttle.due(1e9)) == []


def test_refused_connections_are_logged_once_then_counted(
        server: ControlServer, prefork_log: list[logging.LogRecord]) -> None:
    silent = [connect(server.path) for _ in range(MAX_CONNECTIONS)]
    pump(server, lambda: len(server.fds()) == 1 + MAX_CONNECTIONS)
    refused = []
    for _ in range(40):
        refused.append(connect(server.path))
        pump(server, readable(refused[-1]))  # closed by the server: EOF is readable
    assert [r.getMessage() for r in prefork_log] == [
        f"control: {MAX_CONNECTIONS} clients already connected; refused pid {os.getpid()}"]
    deadline = server.next_deadline()
    assert deadline is not None
    server.due(time.monotonic() + WARNING_INTERVAL)
    assert [r.getMessage() for r in prefork_log[1:]] == [
        f"control: refused 39 more connection(s): {MAX_CONNECTIONS} clients already connected"]
    for client in silent + refused:
        client.close()


def test_oversized_requests_are_logged_once_then_counted_at_close(
        server: ControlServer, prefork_log: list[logging.LogRecord]) -> None:
    for _ in range(3):
        reply = ask(server, b"x" * (MAX_REQUEST + 1))  # all read: no reset on close
        assert json.loads(reply) == {"error": f"request over {MAX_REQUEST} bytes"}
    server.close()  # what is held back is not lost when the master stops
    assert [r.getMessage() for r in prefork_log] == [
        f"control: dropped a request over {MAX_REQUEST} bytes from pid {os.getpid()}",
        f"control: dropped 2 more request(s) over {MAX_REQUEST} bytes"]


@as_root
def test_refused_uids_are_logged_once_then_counted(
        open_dir: Path, prefork_log: list[logging.LogRecord]) -> None:
    control = ControlServer(socket_path(open_dir, "demo"), answering(Recorder()))
    control.open()
    try:
        control.path.chmod(0o666)

        def as_nobody() -> str:
            os.setuid(NOBODY)
            for _ in range(30):
                client = connect(control.path)
                client.recv(1)  # EOF once the server has refused it
                client.close()
            return "done"

        assert in_child(as_nobody, serving=control) == "done"
        pump(control, lambda: len(control.fds()) == 1)
        messages = [r.getMessage() for r in prefork_log]
        assert len(messages) == 1 and f"refused a connection from uid {NOBODY}" in messages[0]
        control.due(time.monotonic() + WARNING_INTERVAL)
        assert [r.getMessage() for r in prefork_log[1:]] == [
            "control: refused 29 more connection(s) from other uids"]
    finally:
        control.close()


def test_a_request_that_crashed_the_master_gets_an_error_and_the_fleet_runs_on(
        start_master: Callable[..., MasterProcess], events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.basic:one_sleeper")
    worker = events.wait_kind("up")[0]["pid"]
    path = socket_path(runtime_dir, "fleets.basic.one_sleeper")
    client = connect(path)
    client.sendall(b"[" * 60000 + b"\n")  # json.loads raised RecursionError in the master
    reply = b""
    while chunk := client.recv(65536):
        reply += chunk
    client.close()
    assert reply, f"no reply; the master's log:\n{master.log}"
    assert json.loads(reply) == {
        "error": "request is not JSON this master reads: it nests too deeply"}
    status = request(path, {"command": "status"})
    assert status["master_pid"] == master.pid
    assert [w["pid"] for w in status["workers"]] == [worker]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


def test_attach_keeps_a_selector_in_step_when_fd_numbers_are_reused(
        runtime_dir: Path) -> None:
    control = ControlServer(socket_path(runtime_dir, "demo"), answering(Recorder()))
    selector = selectors.DefaultSelector()
    control.attach(selector)
    control.open()
    try:
        served_fds = []
        for _ in range(3):
            client = connect(control.path)
            client.sendall(b'{"command": "status"}\n')
            deadline = time.monotonic() + WAIT
            while not readable(client)():
                assert time.monotonic() < deadline, "a request was never served"
                for key, _ in selector.select(deadline - time.monotonic()):
                    assert key.data is control
                    served_fds.extend(control.fds()[1:])
                    control.handle(key.fd)
            assert client.recv(4096) == b'{"ok":true}\n'
            client.close()
            assert set(selector.get_map()) == set(control.fds())
        assert len(requests_of(control)) == 3
    finally:
        control.close()
        assert not selector.get_map()
        selector.close()


# -- open and close ------------------------------------------------------------------------


def stale_socket(path: Path) -> None:
    """Leave a socket file that nothing listens on, as a killed master does."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.listen(1)
    dead.close()


def test_missing_or_stale_socket_is_no_master(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "cpu")
    with pytest.raises(NoMaster) as missing:
        request(path, {"command": "status"})
    assert str(missing.value) == f"no master of fleet 'cpu' is running (no socket at {path})"
    stale_socket(path)
    with pytest.raises(NoMaster) as stale:
        request(path, {"command": "status"})
    assert str(stale.value) == (f"no master of fleet 'cpu' is running "
                                f"(stale socket at {path}: nothing listens on it)")


def test_open_replaces_a_stale_socket_and_close_removes_it(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "demo")
    stale_socket(path)
    control = ControlServer(path, answering(Recorder()))
    control.open()
    assert json.loads(ask(control, b'{"command": "status"}\n')) == {"ok": True}
    control.close()
    assert not path.exists()
    control.close()  # twice is harmless


def test_close_leaves_a_socket_that_is_no_longer_ours(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "demo")
    control = ControlServer(path, answering(Recorder()))
    control.open()
    path.unlink()
    stale_socket(path)  # someone else's file at the same path now
    control.close()
    assert path.exists()


def test_open_refuses_to_remove_something_else(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "demo")
    path.write_text("not a socket")
    with pytest.raises(ControlError, match="something else than a socket is in the way"):
        ControlServer(path, answering(Recorder())).open()
    assert path.read_text() == "not a socket"


def test_client_timeout_and_broken_reply_are_control_errors(runtime_dir: Path) -> None:
    path = socket_path(runtime_dir, "demo")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    try:
        with pytest.raises(ControlError, match=r"did not answer within 0.2s"):
            request(path, {"command": "status"}, timeout=0.2)  # nobody accepts
        listener.accept()[0].close()  # the timed-out client's connection

        for reply, shown in [(b"<html>", "b'<html>'"), (b"[" * 60000, "b'[[[[[[")]:
            def garbage(reply: bytes = reply) -> None:
                connection, _ = listener.accept()
                with connection:
                    connection.recv(4096)
                    connection.sendall(reply + b"\n")

            thread = threading.Thread(target=garbage)
            thread.start()
            try:
                with pytest.raises(ControlError, match=f"sent a broken reply: {re.escape(shown)}"):
                    request(path, {"command": "status"})
            finally:
                thread.join(WAIT)
    finally:
        listener.close()


# -- the CLI -------------------------------------------------------------------------------


NO_MASTER_ARGS = [["status"], ["status", "--json"], ["reload"], ["scale", "mailer", "-1"]]


@pytest.mark.parametrize("args", NO_MASTER_ARGS, ids=" ".join)
def test_no_master_is_one_line_and_exit_3(args: list[str], runtime_dir: Path) -> None:
    result = prefork_process(args[0], "--fleet", "cpu", "--runtime-dir", str(runtime_dir),
                             *args[1:])
    assert result.returncode == 3, result.stderr
    assert result.stderr.splitlines() == [
        f"prefork: error: no master of fleet 'cpu' is running "
        f"(no socket at {runtime_dir}/cpu.sock)"
    ]
    assert result.stdout == ""


def test_without_fleet_the_only_socket_is_used(runtime_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = prefork(capsys, "status", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (3, f"prefork: error: no prefork master is running "
                              f"(no socket in {runtime_dir})\n")
    missing = tmp_path / "never-made"
    code, _, err = prefork(capsys, "reload", "--runtime-dir", str(missing))
    assert (code, err) == (3, f"prefork: error: no prefork master is running "
                              f"(no socket in {missing})\n")
    stale_socket(runtime_dir / "alpha.sock")
    code, _, err = prefork(capsys, "status", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (3, f"prefork: error: no master of fleet 'alpha' is running (stale "
                              f"socket at {runtime_dir}/alpha.sock: nothing listens on it)\n")
    stale_socket(runtime_dir / "beta.sock")
    code, _, err = prefork(capsys, "status", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (2, f"prefork: error: 2 fleets have a socket in {runtime_dir} "
                              "(alpha, beta): choose one with --fleet\n")


def test_fleet_given_as_module_attr_is_not_imported(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The masters say the spec they were started with (tests/test_operate.py); with none
    # running, nothing is imported: a missing module is no error of its own.
    for spec in ("fleets.basic:sleepers", "no_such_module_q:fleet"):
        code, _, err = prefork(capsys, "status", "--fleet", spec,
                               "--runtime-dir", str(runtime_dir))
        assert (code, err) == (3, f"prefork: error: no master started with --fleet {spec} "
                                  f"is running (none of the 0 answering in {runtime_dir} "
                                  "was)\n")


BAD_CLI = [
    (["status", "--watch", "0"], "Invalid value for '--watch': '0' must be more than 0 seconds"),
    (["status", "--watch", "soon"], "'soon' is not a number of seconds"),
    (["status", "--watch", "--json"], "--watch and --json cannot be used together"),
    (["status", "--fleet", "../etc"], "fleet name '../etc' must be letters, digits"),
    (["reload", "--fleet", ""], "fleet name '' must be letters, digits"),
    (["scale", "mailer", "+2"], "Invalid value for 'DELTA': '+2' must be +1 or -1"),
    (["scale", "mailer", "x"], "Invalid value for 'DELTA': 'x' must be +1 or -1"),
    (["scale", "mailer"], "Missing argument 'DELTA'"),
    (["scale", "--bogus", "mailer", "-1"], "--bogus"),  # "No such option", worded per click
]


@pytest.mark.parametrize(("args", "message"), BAD_CLI, ids=[" ".join(a) for a, _ in BAD_CLI])
def test_bad_input_is_one_line_and_exit_2(args: list[str], message: str, runtime_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = prefork(capsys, *args, "--runtime-dir", str(runtime_dir))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("prefork: error: "), err
    assert message in err


def reloads(last_id: int | None = None, ok: bool = True, **more: Any) -> dict[str, Any]:
    """A status document's ``reloads``: none in progress, and the last result's ``id``."""
    last = None if last_id is None else {
        "id": last_id, "kind": "code", "ok": ok, "at": time.time(),
        "error": None if ok else "SyntaxError: invalid syntax (app.py, line 3)"}
    return {"total": last_id or 0, "last": None, "in_progress": False, "phase": None,
            "kind": None, "pending": False, "generation": 0, "code_loaded": time.time() - 60,
            "last_result": last, **more}


IN_PROGRESS = {"in_progress": True, "phase": "rolling", "kind": "code"}


def canned_status(test_pid: int, gone_pid: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A master's status reply: the server process is the master; one worker is this test
    process (alive), one a reaped pid, one waits in backoff."""
    def answer(message: dict[str, Any]) -> dict[str, Any]:
        worker = dict.fromkeys(WORKER_KEYS)
        return {
            "fleet": "demo", "master_pid": os.getpid(), "uptime": 3725.2, "python": "3.11.7",
            "workers": [
                {**worker, "name": "alpha", "replica": 0, "label": "alpha", "pid": test_pid,
                 "state": "running", "restarts": 0, "uptime": 65.4,
                 "imported_after_fork": {"count": 12, "modules": [], "dropped": 0,
                                         "preload": ["a.b", "c"], "uss": 3 << 20}},
                {**worker, "name": "beta", "replica": 1, "label": "beta.1", "pid": gone_pid,
                 "state": "running", "restarts": 2, "uptime": 0.5, "last_exit": "exit code 1",
                 "imported_after_fork": {"count": 3, "modules": [], "dropped": 0,
                                         "preload": ["c", "d"], "uss": None}},
                {**worker, "name": "beta", "replica": 2, "label": "beta.2", "state": "backoff",
                 "restarts": 5, "last_exit": "killed by SIGKILL", "next_start_in": 2.5,
                 "reason": "recycled: private memory 412 MiB > 256 MiB"},
            ],
        }
    return answer


def test_status_table(runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = dead_pid()
    with served(socket_path(runtime_dir, "demo"), canned_status(os.getpid(), gone)) as master:
        code, out, err = prefork(capsys, "status", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (0, ""), err
    header, columns, alpha, beta1, beta2, note, advice, preload = out.splitlines()
    assert re.fullmatch(rf"fleet demo: master {master.pid}, up 1h02m, Python 3\.11\.7, "
                        r"total PSS \d+\.\d MiB \(master \+ 1 of 2 workers\)", header), header
    assert columns.split() == ["WORKER", "REPLICA", "PID", "STATE", "RESTARTS", "UPTIME",
                               "LAST", "EXIT", "RSS", "USS", "PSS", "SHARED", "AFTER", "FORK",
                               "REASON"]
    assert re.fullmatch(rf"alpha +0 +{os.getpid()} +running +0 +1m05s +- +"
                        r"(\d+\.\d +){4}12 \(3\.0\) +-", alpha), alpha
    assert beta1.split() == ["beta", "1", str(gone), "running", "2", "0s", "exit", "code", "1",
                             "-", "-", "-", "-", "3", "-"]
    assert beta2.split() == ["beta", "2", "-", "backoff", "2.5s", "5", "-", "killed", "by",
                             "SIGKILL", "-", "-", "-", "-", "-", "recycled:", "private",
                             "memory", "412", "MiB", ">", "256", "MiB"]
    assert note.startswith("(memory in MiB; AFTER FORK: modules the worker imported after")
    assert "--learn-floor" in advice
    assert preload == "  --preload a.b --preload c --preload d"  # each once, as first seen
    # The columns line up: every row is as wide as the header before its free-text reason.
    assert alpha.index(str(os.getpid())) + len(str(os.getpid())) == columns.index("PID") + 3


def clock(when: float) -> str:
    """How the status shows a Unix time: with its date unless that is today."""
    moment = time.localtime(when)
    today = moment[:3] == time.localtime()[:3]
    return time.strftime("%H:%M:%S" if today else "%Y-%m-%d %H:%M:%S", moment)


NOW = time.time()
FAILED = {"id": 2, "kind": "code", "ok": False, "at": NOW - 5,
          "error": "ModuleNotFoundError: No module named 'app'"}
RELOAD_LINES = [  # the status's reloads, and the line under the header (None: no line)
    (None, None),  # an older master: no reloads at all
    ({"total": 0, "last": None, "in_progress": False}, None),  # an older master's
    ({"total": 1, "last": NOW, "in_progress": True}, "reload in progress"),  # ...mid-restart
    (reloads(), None),  # never reloaded
    (reloads(1, generation=0, total=1), None),  # only workers restarts, all fine
    (reloads(**{**IN_PROGRESS, "phase": "trial"}), "reload in progress: trial of the new code"),
    (reloads(2, **IN_PROGRESS, pending=True, last_result=FAILED),
     "reload in progress: rolling the workers (another one queued)"),
    (reloads(2, generation=3, last_result=FAILED),
     f"reload failed at {clock(NOW - 5)}: ModuleNotFoundError: No module named 'app'"),
    (reloads(2, generation=3, last_result={**FAILED, "at": None, "error": "a\n  b"}),
     "reload failed: a b"),
    (reloads(4, generation=3, code_loaded=NOW - 7), f"code generation 3, loaded at "
                                                      f"{clock(NOW - 7)}"),
    (reloads(4, generation=1, code_loaded=1e300), "code generation 1, loaded"),
    (reloads(4, generation=1, code_loaded=NOW - 3 * 86400),
     f"code generation 1, loaded at {clock(NOW - 3 * 86400)}"),
    ("not an object", None), ({"in_progress": "yes", "generation": True}, None),
]


@pytest.mark.parametrize(("reloads_", "line"), RELOAD_LINES)
def test_status_says_how_reloads_went(reloads_: object, line: str | None) -> None:
    document: dict[str, Any] = {"fleet": "demo", "master_pid": 4321, "workers": [],
                                "memory": None, "total_pss": 0}
    if reloads_ is not None:
        document["reloads"] = reloads_
    header, second, *_ = format_status(document).splitlines()
    assert header.startswith("fleet demo: master 4321")
    if line is None:
        assert second.split()[:2] == ["WORKER", "REPLICA"]  # the table comes next
    else:
        assert second == line


def test_status_json(runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gone = dead_pid()
    with served(socket_path(runtime_dir, "demo"), canned_status(os.getpid(), gone)) as master:
        code, out, err = prefork(capsys, "status", "--fleet", "demo", "--json",
                                 "--runtime-dir", str(runtime_dir))
    assert (code, err) == (0, "")
    document = json.loads(out)
    assert set(document) == STATUS_KEYS | {"memory", "total_pss"}
    assert document["master_pid"] == master.pid
    assert set(document["memory"]) == MEMORY_KEYS
    alpha, beta1, beta2 = document["workers"]
    assert all(set(w) == WORKER_KEYS | {"memory"} for w in document["workers"])
    assert set(alpha["memory"]) == MEMORY_KEYS
    assert all(isinstance(v, int) and v >= 0 for v in alpha["memory"].values())
    assert alpha["memory"]["pss"] > 0
    assert beta1["memory"] is None and beta2["memory"] is None
    assert document["total_pss"] == document["memory"]["pss"] + alpha["memory"]["pss"]


def test_status_watch_redraws_until_ctrl_c(runtime_dir: Path) -> None:
    with served(socket_path(runtime_dir, "demo"), canned_status(os.getpid(), dead_pid())):
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefork", "status", "--watch", "0.05", "--runtime-dir",
             str(runtime_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            # A shell starts background jobs with SIGINT ignored, and an ignored SIGINT is
            # inherited: give the command the terminal's default, as Ctrl-C would find it.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        assert proc.stdout is not None and proc.stderr is not None
        try:
            output = b""
            deadline = time.monotonic() + WAIT * 4  # includes the interpreter's start
            while output.count(b"\x1b[H") < 3:  # two whole frames, and a third begun
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"not 2 frames: {output[-600:]!r}"
                if select.select([proc.stdout], [], [], remaining)[0]:
                    chunk = os.read(proc.stdout.fileno(), 65536)
                    assert chunk, f"status ended: {output[-600:]!r} {proc.stderr.read()!r}"
                    output += chunk
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=WAIT * 2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0 and err == b""
    frames = output.split(b"\x1b[H")
    assert frames[0] == b"" and frames[1].startswith(b"\x1b[2J")  # cleared once, at first
    assert not frames[2].startswith(b"\x1b[2J")  # then overwritten in place
    for frame in frames[1:3]:
        assert b"fleet demo: master " in frame and b"recycled: private memory" in frame
        assert frame.endswith(b"\x1b[J")


def reloading_master(statuses: list[dict[str, Any]], reply: dict[str, Any] | None = None
                     ) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A fake master: answers the reload request ``reply`` (reload 3 asked), then each
    status request with the next of ``statuses``' ``reloads`` (the last one over again)."""
    answered = 0

    def answer(message: dict[str, Any]) -> dict[str, Any]:
        nonlocal answered
        if message["command"] == "reload":
            return reply or {"fleet": "demo", "reload": 3, "queued": False}
        answered += 1
        return {"fleet": "demo", "master_pid": os.getpid(), "workers": [],
                "reloads": statuses[min(answered, len(statuses)) - 1]}
    return answer


def test_reload_asks_the_master_then_waits_for_its_result(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # An earlier reload's result (id 2) does not end the wait for reload 3.
    statuses = [reloads(2, ok=False, **IN_PROGRESS), reloads(2, ok=False),
                reloads(3, generation=4)]
    elsewhere = dead_pid()  # a pid in the reply is not taken: the listener's is
    with served(socket_path(runtime_dir, "demo"), reloading_master(
            statuses, {"fleet": "demo", "reload": 3, "master_pid": elsewhere})) as master:
        code, out, err = prefork(capsys, "reload", "--fleet", "demo", "--runtime-dir",
                                 str(runtime_dir))
        assert (code, err) == (0, "")
        assert out == (f"reload 3 of fleet demo asked (master pid {master.pid})\n"
                       "reload 3 done: new code loaded, code generation 4\n")
        assert json.loads(master.report()) == {"command": "reload", "workers_only": False}
        for _ in statuses:
            assert json.loads(master.report()) == {"command": "status"}


def test_reload_that_failed_is_one_line_and_exit_1(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reply = {"fleet": "demo", "reload": 3, "queued": True}
    with served(socket_path(runtime_dir, "demo"),
                reloading_master([reloads(3, ok=False)], reply)) as master:
        code, out, err = prefork(capsys, "reload", "--workers-only", "--runtime-dir",
                                 str(runtime_dir))
        assert json.loads(master.report()) == {"command": "reload", "workers_only": True}
    assert code == 1
    assert out == (f"reload 3 of fleet demo asked (master pid {master.pid}, queued after "
                   "the reload in progress)\n")
    assert err == "prefork: reload 3 failed: SyntaxError: invalid syntax (app.py, line 3)\n"


def test_reload_followed_by_another_says_so(runtime_dir: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    done = reloads(4, generation=2)
    done["last_result"]["kind"] = "workers"
    with served(socket_path(runtime_dir, "demo"), reloading_master([done])):
        code, out, err = prefork(capsys, "reload", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == ("reload 3 done (reload 4 followed it): workers restarted, "
                                   "code generation 2")


def test_reload_that_never_ends_times_out(runtime_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with served(socket_path(runtime_dir, "demo"),
                reloading_master([reloads(2, **IN_PROGRESS)])):
        began = time.monotonic()
        code, out, err = prefork(capsys, "reload", "--timeout", "0.5", "--runtime-dir",
                                 str(runtime_dir))
        waited = time.monotonic() - began
    assert code == 1 and out.startswith("reload 3 of fleet demo asked")
    assert err == "prefork: reload 3 of fleet demo did not end within 0.5s\n"
    assert 0.5 <= waited < WAIT


def test_reload_no_wait_returns_once_asked(runtime_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # With the reload never ending, a command that waited would time out: exit 1.
    with served(socket_path(runtime_dir, "demo"),
                reloading_master([reloads(2, **IN_PROGRESS)])) as master:
        code, out, err = prefork(capsys, "reload", "--no-wait", "--timeout", "0.5",
                                 "--runtime-dir", str(runtime_dir))
        assert json.loads(master.report())["command"] == "reload"
    assert (code, out, err) == (0, f"reload 3 of fleet demo asked (master pid {master.pid})\n",
                                "")


@pytest.mark.parametrize(("reply", "expected"), [
    ({"error": "the fleet is stopping"},
     (2, "prefork: error: the master refused the reload: the fleet is stopping\n")),
    ({"fleet": "demo", "reload": "3"},
     (1, "prefork: error: the master's reply to reload is not understood: reload id '3'\n")),
])
def test_reload_refused_or_not_understood(reply: dict[str, Any], expected: tuple[int, str],
                                          runtime_dir: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    with served(socket_path(runtime_dir, "demo"), lambda message: reply):
        code, out, err = prefork(capsys, "reload", "--runtime-dir", str(runtime_dir))
    assert (code, err) == expected and out == ""


def test_reload_waits_through_a_master_that_does_not_answer(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # While the master re-execs, a status request fails in every way; each is tried again.
    path = socket_path(runtime_dir, "demo")
    answers: list[Any] = [NoMaster("gone"), ControlError("did not answer within 5s"),
                          {"error": "internal error"}, {"workers": []},
                          {"reloads": reloads(3)}]
    asked: list[dict[str, Any]] = []

    def polled(at: Path, message: dict[str, Any], timeout: float = 5.0, *,
               any_uid: bool = False) -> dict[str, Any]:
        assert at == path and 0 < timeout <= 5.0
        asked.append(message)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr("prefork.cli_operate.request", polled)
    with served(path, reloading_master([])):
        code, out, err = prefork(capsys, "reload", "--runtime-dir", str(runtime_dir))
    assert (code, err) == (0, ""), err
    assert out.endswith("reload 3 done: new code loaded, code generation 0\n")
    assert asked == [{"command": "status"}] * 5 and answers == []


def test_reload_timeout_says_why_the_last_request_failed(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def gone(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise NoMaster("no master of fleet 'demo' is running (stale socket)")

    monkeypatch.setattr("prefork.cli_operate.request", gone)
    with served(socket_path(runtime_dir, "demo"), reloading_master([])):
        code, _, err = prefork(capsys, "reload", "--timeout", "0.3", "--runtime-dir",
                               str(runtime_dir))
    assert code == 1
    assert err == ("prefork: reload 3 of fleet demo did not end within 0.3s (last try: no "
                   "master of fleet 'demo' is running (stale socket))\n")


def test_scale_sends_the_request_and_shows_the_answer(
        runtime_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def answer(message: dict[str, Any]) -> dict[str, Any]:
        if message["worker"] != "mailer":
            return {"error": f"unknown worker {message['worker']!r}"}
        return {"fleet": "demo", "worker": "mailer", "replicas": 2}

    with served(socket_path(runtime_dir, "demo"), answer) as master:
        code, out, err = prefork(capsys, "scale", "--runtime-dir", str(runtime_dir),
                                 "mailer", "-1")
        assert (code, out, err) == (0, "mailer: 2 replicas after -1 (fleet demo)\n", "")
        assert json.loads(master.report()) == {"command": "scale", "worker": "mailer",
                                               "delta": -1}
        code, out, err = prefork(capsys, "scale", "--fleet", "demo", "--runtime-dir",
                                 str(runtime_dir), "nobody", "+1")
        assert (code, out, err) == (2, "", "prefork: error: unknown worker 'nobody'\n")
        assert json.loads(master.report())["delta"] == 1


def test_a_master_that_answers_nonsense_is_exit_1(runtime_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with served(socket_path(runtime_dir, "demo"), lambda message: {"workers": "many"}):
        code, out, err = prefork(capsys, "status", "--runtime-dir", str(runtime_dir))
    assert (code, out) == (1, "")
    assert err == ("prefork: error: the master's status reply is not understood: "
                   "no master_pid\n")


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0.4, "0s"), (59.9, "59s"), (65, "1m05s"), (3725.2, "1h02m"),
    (2 * 86400 + 7200, "2d02h"),
])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text


class _ExhaustedListener:
    """The real listener's descriptor, but accept() fails as when out of descriptors."""

    def __init__(self, real: socket.socket) -> None:
        self.real = real

    def fileno(self) -> int:
        return self.real.fileno()

    def accept(self) -> tuple[socket.socket, Any]:
        raise OSError(errno.EMFILE, "Too many open files")


def test_out_of_descriptors_pauses_the_listener_instead_of_spinning(
        server: ControlServer) -> None:
    selector = selectors.DefaultSelector()
    server.attach(selector)
    real = server._listener
    assert real is not None
    listener_fd = real.fileno()
    client = connect(server.path)  # waits in the backlog: the listener stays readable
    server._listener = _ExhaustedListener(real)  # type: ignore[assignment]
    before = time.monotonic()
    server.handle(listener_fd)
    # Not watched while paused, so a select() loop does not wake on it again and again.
    assert listener_fd not in server.fds() and listener_fd in server.own_fds()
    assert not selector.select(0)
    deadline = server.next_deadline()
    assert deadline is not None and before < deadline <= time.monotonic() + 1.0
    server._listener = real
    server.due(deadline)
    assert listener_fd in server.fds()
    assert [key.fd for key, _ in selector.select(0)] == [listener_fd]  # the waiting client
    client.sendall(b'{"command": "status"}\n')
    pump(server, readable(client))
    assert json.loads(client.recv(65536)) == {"ok": True}
    client.close()
    selector.close()


@as_root
def test_client_refuses_a_socket_served_by_another_uid(tmp_path: Path) -> None:
    """A socket planted in a default runtime directory (one in /tmp is anyone's to make
    first) must not pass for our master: its listener's uid is neither ours nor root.
    Named on purpose (``--runtime-dir``: ``any_uid``), root may ask another user's master."""
    path = tmp_path / "planted.sock"
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            listener = socket.socket(socket.AF_UNIX)
            listener.bind(str(path))
            path.chmod(0o666)
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            listener.listen()  # SO_PEERCRED gives the credentials at listen()
            os.write(ready_w, b"x")
            for _ in range(2):
                connection, _ = listener.accept()
                try:
                    if connection.recv(4096):
                        connection.sendall(b'{"fleet": "planted"}\n')
                except OSError:
                    pass
                connection.close()
        finally:
            os._exit(0)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"x"
        with pytest.raises(ControlError, match=rf"served by uid {NOBODY} \(pid {pid}\), not by "
                                               r"uid 0 or root: not a master of yours"):
            request(path, {"command": "status"})
        assert request(path, {"command": "status"}, any_uid=True) == {"fleet": "planted"}
    finally:
        os.close(ready_r)
        os.waitpid(pid, 0)
