"""The master as a Type=notify service: a real AF_UNIX datagram socket stands in for
systemd and receives READY=1, STATUS= updates, WATCHDOG=1 pings and STOPPING=1."""

from __future__ import annotations

import os
import select
import signal
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path

import pytest

from conftest import WAIT, Events, master_env
from prefork.notify import Notifier


class FakeSystemd:
    """Receives notification datagrams, each with the time it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[tuple[float, dict[str, str]]] = []

    def wait(self, predicate: Callable[[dict[str, str]], bool], timeout: float = WAIT
             ) -> dict[str, str]:
        for _, message in self.received:
            if predicate(message):
                return message
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if ready:
                data = self.sock.recv(4096).decode()
                message = dict(line.split("=", 1) for line in data.splitlines())
                self.received.append((time.monotonic(), message))
                if predicate(message):
                    return message
        raise AssertionError(f"systemd never got it; received: {self.received}")

    def times_of(self, key: str) -> list[float]:
        return [t for t, message in self.received if key in message]


@pytest.fixture
def systemd() -> Iterator[FakeSystemd]:
    directory = tempfile.mkdtemp(prefix="pf-", dir="/tmp")  # AF_UNIX paths: 108 bytes at most
    fake = FakeSystemd(os.path.join(directory, "notify"))
    yield fake
    fake.sock.close()
    os.unlink(fake.address)
    os.rmdir(directory)


def start(start_master, events: Events, runtime_dir: Path, tmp_path: Path, fleet: str,
          **env: str):
    return start_master(fleet, env=master_env(events, runtime_dir,
                                              PREFORK_TEST_DIR=str(tmp_path), **env))


def test_ready_status_watchdog_and_stopping(start_master, events: Events, runtime_dir: Path,
                                            tmp_path: Path, systemd: FakeSystemd) -> None:
    master = start(start_master, events, runtime_dir, tmp_path, "fleets.basic:sleepers",
                   NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="1000000")
    ready = systemd.wait(lambda m: "READY" in m)
    assert ready == {"READY": "1", "STATUS": "4 running, 0 in backoff, 0 failed"}
    # The first ping went out at start-up, before READY=1: a slow start is not a hang.
    assert systemd.times_of("WATCHDOG")[0] < systemd.times_of("READY")[0]

    pid = events.wait_kind("up", count=4)[0]["pid"]
    os.kill(pid, signal.SIGKILL)
    systemd.wait(lambda m: m.get("STATUS") == "3 running, 1 in backoff, 0 failed")
    systemd.wait(lambda m: m.get("STATUS") == "4 running, 0 in backoff, 0 failed")
    # Measure the rhythm only on pings read while this test sat in select(): earlier ones
    # may have queued while it was busy and been stamped together when read.
    first = len(systemd.times_of("WATCHDOG")) + 1
    for _ in range(6):
        count = len(systemd.times_of("WATCHDOG"))
        systemd.wait(lambda m, c=count: len(systemd.times_of("WATCHDOG")) > c)
    pings = systemd.times_of("WATCHDOG")[first:]
    gaps = [b - a for a, b in pairwise(pings)]
    assert len(gaps) >= 4
    assert min(gaps) >= 0.45  # never before half the interval is up ...
    assert statistics.median(gaps) < 0.9  # ... and well inside the 1 s watchdog

    master.signal(signal.SIGTERM)
    systemd.wait(lambda m: m == {"STOPPING": "1"})
    assert master.wait_exit() == 0


def test_abstract_socket_and_workers_do_not_inherit_the_variables(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path) -> None:
    fake = FakeSystemd(f"@prefork-test-{uuid.uuid4().hex}")
    try:
        master = start(start_master, events, runtime_dir, tmp_path, "fleets.basic:inspect",
                       NOTIFY_SOCKET=fake.address, WATCHDOG_USEC="5000000")
        assert fake.wait(lambda m: "READY" in m)["STATUS"] == "1 running, 0 in backoff, 0 failed"
        assert events.wait_kind("inspect")[0]["env_notify"] == []
        master.signal(signal.SIGTERM)
        assert master.wait_exit() == 0
    finally:
        fake.sock.close()


def test_watchdog_of_another_pid_is_not_pinged(start_master, events: Events,
                                               runtime_dir: Path, tmp_path: Path,
                                               systemd: FakeSystemd) -> None:
    master = start(start_master, events, runtime_dir, tmp_path, "fleets.basic:one_sleeper",
                   NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="200000", WATCHDOG_PID="1")
    systemd.wait(lambda m: "READY" in m)
    # A worker death and its restart (backoff of about 1 s, five would-be pings) happen ...
    os.kill(events.wait_kind("up")[0]["pid"], signal.SIGKILL)
    systemd.wait(lambda m: m.get("STATUS", "").startswith("0 running, 1 in backoff"))
    systemd.wait(lambda m: m.get("STATUS", "").startswith("1 running"))
    master.signal(signal.SIGTERM)
    systemd.wait(lambda m: "STOPPING" in m)
    assert master.wait_exit() == 0
    assert systemd.times_of("WATCHDOG") == []  # ... and not one ping for someone else's pid


def test_notifier_reads_and_removes_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42",
           "HOME": "/root"}
    notifier = Notifier.from_environment(env, pid=42)
    assert notifier is not None
    assert notifier.address == "\0x" and notifier.watchdog_interval == 30.0
    assert env == {"HOME": "/root"}
    other = Notifier.from_environment({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "9",
                                       "WATCHDOG_PID": "7"}, pid=42)
    assert other is not None and other.watchdog_interval is None
    assert Notifier.from_environment({}, pid=42) is None
    notifier.close()
    other.close()


def test_a_vanished_systemd_never_stops_the_master(start_master, events: Events,
                                                   runtime_dir: Path, tmp_path: Path) -> None:
    master = start(start_master, events, runtime_dir, tmp_path, "fleets.basic:sleepers",
                   NOTIFY_SOCKET="/tmp/no-such-dir-for-prefork/notify")
    events.wait_kind("up", count=4)
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert len(master.log_matches(r"systemd notify to .* failed")) == 1  # said once, not spammed


def test_a_reload_is_reloading_then_ready_and_the_watchdog_goes_on_across_the_exec(
        start_master, events: Events, runtime_dir: Path, tmp_path: Path,
        systemd: FakeSystemd) -> None:
    master = start(start_master, events, runtime_dir, tmp_path, "fleets.basic:sleepers",
                   NOTIFY_SOCKET=systemd.address, WATCHDOG_USEC="2000000")
    systemd.wait(lambda m: "READY" in m)
    events.wait_kind("up", count=4)
    asked = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    master.signal(signal.SIGHUP)  # Type=notify-reload: what systemd itself would send
    reloading = systemd.wait(lambda m: "RELOADING" in m)
    assert reloading["RELOADING"] == "1"
    assert 0 <= int(reloading["MONOTONIC_USEC"]) - asked < WAIT * 1_000_000
    events.wait_kind("up", count=8)  # the new generation
    master.wait_log(r"reload done")
    ready = systemd.wait(lambda m: "READY" in m and systemd.times_of("RELOADING")[0]
                         < systemd.times_of("READY")[-1])
    assert ready == {"READY": "1", "STATUS": "4 running, 0 in backoff, 0 failed"}
    # The new image pings the same systemd (the variables were handed on to it).
    count = len(systemd.times_of("WATCHDOG"))
    systemd.wait(lambda m: len(systemd.times_of("WATCHDOG")) > count)
    master.signal(signal.SIGTERM)
    systemd.wait(lambda m: m == {"STOPPING": "1"})
    assert master.wait_exit() == 0
