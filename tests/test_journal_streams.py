"""Under journald each worker's stdout and stderr become a journal stream of its own, named
after the worker (prefork.journal). No journal runs here: the master's stdout and stderr are
one end of a socket pair, as systemd's stream is a socket, with ``$JOURNAL_STREAM`` set to
its device and inode; journald's stdout socket is a server of the test's own."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import WAIT, Events, MasterProcess, master_env
from prefork import journal

HEADER_LINES = 7


@dataclass
class Stream:
    """One connection to the stand-in journal: who connected, and the lines it sent."""

    conn: socket.socket
    pid: int
    data: bytes = b""
    eof: bool = False
    lines: list[str] = field(default_factory=list)

    @property
    def header(self) -> list[str]:
        return self.lines[:HEADER_LINES]

    @property
    def body(self) -> list[str]:
        return self.lines[HEADER_LINES:]


class JournalServer:
    """Accepts stdout streams at ``path`` and reads them, in ``select()``, never sleeping."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.streams: list[Stream] = []

    def wait(self, done: Callable[[list[Stream]], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT
        while not done(self.streams):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"timed out waiting for {what}; streams: {self.streams}")
            self._read(remaining)

    def connection_pending(self) -> bool:
        return bool(select.select([self.listener], [], [], 0)[0])

    def _read(self, timeout: float) -> None:
        open_streams = {s.conn: s for s in self.streams if not s.eof}
        ready, _, _ = select.select([self.listener, *open_streams], [], [], timeout)
        for sock in ready:
            if sock is self.listener:
                conn, _ = self.listener.accept()
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                self.streams.append(Stream(conn, struct.unpack("3i", cred)[0]))
                continue
            stream = open_streams[sock]
            chunk = sock.recv(65536)
            stream.eof = not chunk
            *lines, stream.data = (stream.data + chunk).split(b"\n")
            stream.lines.extend(line.decode() for line in lines)

    def close(self) -> None:
        for stream in self.streams:
            stream.conn.close()
        self.listener.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[JournalServer]:
    journal_server = JournalServer(tmp_path / "stdout.sock")
    yield journal_server
    journal_server.close()


@dataclass
class Started:
    master: MasterProcess
    identity: str  # DEV:INODE of the master's stdout and stderr, the "unit's" stream


@pytest.fixture
def start_journaled(events: Events, runtime_dir: Path, tmp_path: Path
                    ) -> Iterator[Callable[..., Started]]:
    """Start the journaled fleet with its stderr (and stdout, unless ``stdout_too=False``)
    on a socket the test reads, ``$JOURNAL_STREAM`` naming that socket unless
    ``journal_stream`` is given, and the journal's socket at ``socket_path``."""
    started: list[MasterProcess] = []

    def start(socket_path: Path, *, journal_stream: str | None = None,
              stdout_too: bool = True) -> Started:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        st = os.fstat(theirs.fileno())
        identity = f"{st.st_dev}:{st.st_ino}"
        env = master_env(events, runtime_dir, PREFORK_TEST_DIR=str(tmp_path),
                         PREFORK_TEST_JOURNAL=str(socket_path),
                         JOURNAL_STREAM=journal_stream or identity)
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "prefork", "run", "--fleet", "fleets.journaled:journaled"],
                stdin=subprocess.DEVNULL, stdout=theirs if stdout_too else subprocess.DEVNULL,
                stderr=theirs, env=env)
        finally:
            theirs.close()
        proc.stderr = ours  # type: ignore[assignment]  # MasterProcess reads it as a pipe
        master = MasterProcess(proc, events)
        started.append(master)
        return Started(master, identity)

    yield start
    for master in started:
        master.close()


def stop(master: MasterProcess) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_each_worker_writes_to_a_stream_of_its_own_named_after_it(
        start_journaled: Callable[..., Started], server: JournalServer, events: Events,
        tmp_path: Path) -> None:
    started = start_journaled(tmp_path / "stdout.sock")
    ups = events.wait_kind("up", count=3)
    server.wait(lambda streams: len(streams) == 3
                and all(len(s.body) == 2 for s in streams), "3 streams with 2 lines each")
    by_pid = {s.pid: s for s in server.streams}
    assert sorted(by_pid) == sorted(up["pid"] for up in ups)  # each worker connected itself
    for up in ups:
        label = up["label"]
        stream = by_pid[up["pid"]]
        # identifier (the worker, not the replica), no unit id, info, level prefixes on,
        # no forwarding: sd_journal_stream_fd's header.
        assert stream.header == [label.split(".")[0], "", "6", "1", "0", "0", "0"]
        assert stream.body == [f"out from {label}", f"err from {label}"]  # in order
        # The worker's $JOURNAL_STREAM names its own stream, no longer the master's.
        assert up["journal_stream"] == up["stderr"] != started.identity
    assert sorted(s.header[0] for s in server.streams) == ["clusterer", "clusterer", "mailer"]
    assert not server.connection_pending()  # the master kept its own stream
    stop(started.master)
    assert "worker mailer spawned" in started.master.log
    assert " from " not in started.master.log  # no worker line went to the master's stream


def test_a_worker_keeps_stdout_that_is_not_the_journal(
        start_journaled: Callable[..., Started], server: JournalServer, events: Events,
        tmp_path: Path) -> None:
    started = start_journaled(tmp_path / "stdout.sock", stdout_too=False)
    ups = events.wait_kind("up", count=3)
    server.wait(lambda streams: len(streams) == 3 and all(s.body for s in streams),
                "3 streams with a line each")
    for up in ups:
        assert up["stdout"] == "/dev/null"  # StandardOutput=null stays null
        assert {s.pid: s.body for s in server.streams}[up["pid"]] == [f"err from {up['label']}"]
    stop(started.master)


def test_journal_stream_of_another_descriptor_gives_no_streams(
        start_journaled: Callable[..., Started], server: JournalServer, events: Events,
        tmp_path: Path) -> None:
    """$JOURNAL_STREAM inherited from an ancestor, the output redirected since: no match."""
    elsewhere = os.stat(tmp_path)
    started = start_journaled(tmp_path / "stdout.sock",
                              journal_stream=f"{elsewhere.st_dev}:{elsewhere.st_ino}")
    ups = events.wait_kind("up", count=3)
    for up in ups:
        started.master.wait_log(f"^err from {up['label']}$")
        started.master.wait_log(f"^out from {up['label']}$")
        assert up["stderr"] == started.identity  # inherited
    # Each worker connects before its first line: none has, or one would be waiting.
    assert not server.connection_pending() and not server.streams
    stop(started.master)


def test_a_journal_that_is_gone_costs_a_warning_not_the_worker(
        start_journaled: Callable[..., Started], events: Events, tmp_path: Path) -> None:
    started = start_journaled(tmp_path / "no-such.sock")
    ups = events.wait_kind("up", count=3)
    for up in ups:
        label = up["label"]
        warning = started.master.wait_log(f"WARNING worker {label}: no journal stream of its "
                                          "own .*no-such.sock: (.*)\\); its output goes to "
                                          "the master's$")
        assert warning.group(1) == "No such file or directory"
        started.master.wait_log(f"^out from {label}$")
        started.master.wait_log(f"^err from {label}$")
        assert up["stderr"] == up["journal_stream"] == started.identity
    stop(started.master)
    assert len(started.master.log_matches("no journal stream")) == 3  # one line per start


@pytest.mark.parametrize("value", ["", "12", "12:", ":34", "a:b", "1:2:3", " 1:2", "-1:2"])
def test_a_malformed_journal_stream_means_no_journal(value: str) -> None:
    assert journal.for_workers({"JOURNAL_STREAM": value}) is None


def test_the_header_is_sd_journal_stream_fds() -> None:
    assert journal.header("clusterer") == b"clusterer\n\n6\n1\n0\n0\n0\n"
