"""The metrics exporter (``prefork run --metrics``, ``prefork metrics``): scraped over real
HTTP, parsed with prometheus_client's own parser, against real masters and workers."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from conftest import WAIT, Events, MasterProcess, master_env, wait_gone
from prefork import metrics
from prefork.client import request
from prefork.memory import smaps_rollup
from prefork.metrics_process import check_textfile, parse_listen
from prefork.paths import socket_path
from prefork.states import WorkerState

MAX_RSS_SKEW = 3 * 64 * 4096  # /proc/PID/stat's RSS: per-CPU counters, folded in late


# -- helpers -----------------------------------------------------------------------------


def parse(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def get(url: str, *, accept: str | None = None) -> tuple[str, str]:
    """(body, content type) of a GET by a real HTTP client."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=WAIT) as reply:
        return reply.read().decode(), reply.headers["Content-Type"]


def pick(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The value of the one sample ``name`` with ``labels`` (among others), or None."""
    found = [s.value for s in samples if s.name == name
             and all(s.labels.get(key) == value for key, value in labels.items())]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def scrape_after(url: str, moment: float) -> list[Sample]:
    """A scrape whose reading was made after ``moment`` (time.time()). Scrapes within
    MIN_INTERVAL share a reading, so this waits for the shared one to expire: a known
    deadline, not a guess."""
    deadline = time.monotonic() + WAIT
    while True:
        samples = parse(get(url)[0])
        read_at = pick(samples, "prefork_reading_timestamp_seconds")
        if read_at is not None and read_at > moment:
            return samples
        assert time.monotonic() < deadline, f"no reading after {moment} within {WAIT}s"
        wait = (read_at or time.time()) + metrics.MIN_INTERVAL - time.time()
        time.sleep(min(max(wait, 0.01), metrics.MIN_INTERVAL))


def kernel_figures(pid: int) -> dict[str, int]:
    rollup = smaps_rollup(pid)
    return {"pss": rollup["Pss"], "swap": rollup["Swap"], "rss": rollup["Rss"],
            "uss": rollup["Private_Clean"] + rollup["Private_Dirty"] + rollup["Private_Hugetlb"]}


def metrics_url(master: MasterProcess) -> str:
    return master.wait_log(r"metrics on (http://\S+)").group(1)


def exporter_of(master: MasterProcess) -> psutil.Process:
    master.wait_log(r"metrics exporter started \(pid \d+\)")
    pid = int(master.log_matches(r"metrics exporter started \(pid (\d+)\)")[-1].group(1))
    return psutil.Process(pid)


def worker_pids(master: MasterProcess) -> dict[str, int]:
    """Label -> pid of the running workers (not the exporter)."""
    return {p.cmdline()[0].split()[2]: p.pid for p in master.workers()
            if p.cmdline()[0].startswith("prefork: worker")}


def stop(master: MasterProcess) -> None:
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0, master.log


@pytest.fixture
def metered(start_master, events: Events) -> Iterator[tuple[MasterProcess, str]]:
    master = start_master("fleets.metered:metered", "--metrics", "127.0.0.1:0")
    events.wait_kind("up", count=2)
    yield master, metrics_url(master)


# -- against a real master -----------------------------------------------------------------


def test_a_scrape_shows_every_worker_and_a_killed_one_restarted(metered, events: Events
                                                                 ) -> None:
    master, url = metered
    pids = worker_pids(master)
    samples = scrape_after(url, time.time())
    victim = {"fleet": "metered", "worker": "victim", "replica": "0"}
    beating = {**victim, "worker": "beating"}
    assert pick(samples, "prefork_up", fleet="metered") == 1
    assert pick(samples, "prefork_workers", state="running") == 2
    assert pick(samples, "prefork_worker_pid", **victim) == pids["victim"]
    assert pick(samples, "prefork_worker_up", **victim) == 1
    assert pick(samples, "prefork_worker_state", **victim, state="running") == 1
    assert pick(samples, "prefork_worker_state", **victim, state="backoff") == 0
    assert pick(samples, "prefork_worker_restarts_total", **victim) == 0
    assert pick(samples, "prefork_worker_last_exit_signal", **victim) is None
    assert pick(samples, "prefork_worker_recycles_total", **victim, reason="memory") == 0
    assert 0 <= pick(samples, "prefork_worker_heartbeat_age_seconds", **beating) < 2.0
    assert pick(samples, "prefork_worker_heartbeat_age_seconds", **victim) is None
    started = pick(samples, "prefork_worker_start_time_seconds", **victim)
    assert started is not None and abs(started - time.time()) < 60
    assert pick(samples, "process_start_time_seconds", fleet="metered") is not None
    assert pick(samples, "prefork_floor_modules", fleet="metered") > 100
    assert pick(samples, "prefork_reloads_total", fleet="metered") == 0

    os.kill(pids["victim"], signal.SIGKILL)
    events.wait_kind("up", label="victim", count=2)
    samples = scrape_after(url, time.time())
    new_pid = worker_pids(master)["victim"]
    assert new_pid != pids["victim"]
    assert pick(samples, "prefork_worker_restarts_total", **victim) == 1
    assert pick(samples, "prefork_worker_pid", **victim) == new_pid
    assert pick(samples, "prefork_worker_last_exit_signal", **victim) == signal.SIGKILL
    assert pick(samples, "prefork_worker_last_exit_code", **victim) is None
    assert pick(samples, "prefork_worker_start_time_seconds", **victim) > started
    assert pick(samples, "prefork_worker_restarts_total", **beating) == 0
    assert pick(samples, "prefork_worker_pid", **beating) == pids["beating"]

    os.kill(master.pid, signal.SIGHUP)  # a reload: counted, and each worker recycled once
    master.wait_log(r"reload done")  # the exporter, adopted across the exec, goes on
    samples = scrape_after(url, time.time())
    assert pick(samples, "prefork_reloads_total", fleet="metered") == 1
    assert pick(samples, "prefork_last_reload_success", fleet="metered") == 1
    assert pick(samples, "prefork_code_generation", fleet="metered") == 1
    assert pick(samples, "prefork_worker_recycles_total", **victim, reason="reload") == 1
    assert pick(samples, "prefork_worker_restarts_total", **victim) == 2
    stop(master)


def test_memory_series_agree_with_smaps_rollup(metered, runtime_dir: Path) -> None:
    master, url = metered
    pids = {"master": master.pid, **worker_pids(master)}
    # The master's first status answers still allocate, un-sharing pages its children map,
    # so the windows after them were seldom quiet (9-13 readings, a second each): have
    # them answered first (then 3 readings, ~0.1 s for the requests).
    for _ in range(100):
        request(socket_path(runtime_dir, "metered"), {"command": "status"}, WAIT)
    quiet = dict.fromkeys(pids, 0)
    read_at = 0.0  # nothing has scraped yet: the first reading is a fresh one
    for _ in range(40):
        # Wait for the shared reading to expire, so the scrape below reads afresh. PSS moves
        # whenever any process maps or unmaps a page this one shares, so compare a process
        # only where the kernel's figures are the same just before and just after the scrape.
        time.sleep(max(read_at + metrics.MIN_INTERVAL - time.time(), 0.0))
        moment = time.time()
        before = {name: kernel_figures(pid) for name, pid in pids.items()}
        samples = parse(get(url)[0])
        after = {name: kernel_figures(pid) for name, pid in pids.items()}
        read_at = pick(samples, "prefork_reading_timestamp_seconds") or moment
        if read_at <= moment:
            continue  # a shared reading after all: not measured in this window
        for name, figures in before.items():
            if figures != after[name]:
                continue
            quiet[name] += 1
            labels = {"worker": name} if name != "master" else {}
            family = "prefork_worker_memory_bytes" if labels else "prefork_floor_bytes"
            seen = {kind: pick(samples, family, **labels, type=kind)
                    for kind in ("uss", "pss", "rss", "swap")}
            assert (seen["uss"], seen["swap"]) == (figures["uss"], figures["swap"]), (
                name, figures, seen)
            # The window spans a whole scrape (tens of ms, three processes read): a process
            # that maps a page this one shares and unmaps it again within it (any Python
            # starting on the machine: libpython) moves PSS there and back. The probe's
            # tolerance, 1%, covers that; private pages and swap cannot move so.
            assert abs(seen["pss"] - figures["pss"]) <= figures["pss"] / 100, (
                name, figures, seen)
            assert abs(seen["rss"] - figures["rss"]) <= MAX_RSS_SKEW, (name, figures, seen)
        if min(quiet.values()) >= 2:
            break
    assert min(quiet.values()) >= 2, f"quiet windows in 40 readings: {quiet}"
    stop(master)


def test_openmetrics_when_the_scraper_asks_for_it(metered) -> None:
    master, url = metered
    body, kind = get(url, accept="application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text") and body.endswith("# EOF\n")
    body, kind = get(url)
    assert kind.startswith("text/plain") and "prefork_worker_up{" in body
    stop(master)


def test_hostile_http_clients_cost_neither_the_exporter_nor_the_master(metered) -> None:
    master, url = metered
    host, port = parse_listen(url.removeprefix("http://").removesuffix("/metrics"))
    silent = [socket.create_connection((host, port), timeout=WAIT) for _ in range(20)]
    for junk in (b"\x00\xff garbage\r\n\r\n", b"POST /metrics HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 99999999\r\n\r\nabc", b"GET /" + b"a" * 70000 + b"\r\n\r\n"):
        with socket.create_connection((host, port), timeout=WAIT) as client:
            client.sendall(junk)
            client.shutdown(socket.SHUT_WR)
            reply = client.recv(4096)
            # A status line, http.server's bare error page (a request line it cannot
            # parse), or a closed connection.
            assert reply.startswith((b"HTTP/1.", b"<!DOCTYPE HTML>")) or reply == b"", reply
    samples = scrape_after(url, time.time())
    assert pick(samples, "prefork_up", fleet="metered") == 1
    assert pick(samples, "prefork_workers", state="running") == 2
    for client in silent:
        client.close()
    stop(master)


def test_a_killed_exporter_is_started_again_on_the_same_port(metered) -> None:
    master, url = metered
    first = exporter_of(master)
    assert first.ppid() == master.pid and os.getpgid(first.pid) == first.pid
    first.kill()
    master.wait_log(r"metrics exporter exited: killed by SIGKILL")
    master.wait_log(r"metrics exporter started", count=2)
    samples = scrape_after(url, time.time())
    assert pick(samples, "prefork_up", fleet="metered") == 1
    stop(master)
    assert not master.log_matches(r"left by a worker"), master.log


def test_operator_signals_to_the_whole_unit_leave_the_exporter_running(
        start_master, events: Events, tmp_path: Path) -> None:
    log_file = tmp_path / "master.log"
    master = start_master("fleets.metered:metered", "--metrics", "127.0.0.1:0",
                          "--log-file", str(log_file))
    events.wait_kind("up", count=2)
    url = re.search(r"metrics on (http://\S+)", log_file.read_text()).group(1)
    assert pick(scrape_after(url, time.time()), "prefork_up", fleet="metered") == 1
    exporter = psutil.Process(int(re.search(r"metrics exporter started \(pid (\d+)\)",
                                            log_file.read_text()).group(1)))
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1):  # systemctl kill -s ...
        exporter.send_signal(signum)
    log_file.rename(tmp_path / "master.log.1")  # logrotate, then its postrotate
    master.signal(signal.SIGUSR1)
    # The exporter serves this scrape only after the signals were delivered to it (a
    # signal's default action would have ended it first; a new one would have another pid).
    assert pick(scrape_after(url, time.time()), "prefork_up", fleet="metered") == 1
    assert exporter.is_running() and exporter.status() != psutil.STATUS_ZOMBIE
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert wait_gone([exporter.pid]) == []
    logged = (tmp_path / "master.log.1").read_text() + log_file.read_text()
    assert "metrics exporter exited" not in logged and "stopped in" in log_file.read_text()


def test_the_exporter_dies_with_a_killed_master(metered) -> None:
    master, _ = metered
    exporter = exporter_of(master)
    workers = [p.pid for p in master.workers()]
    master.proc.kill()
    master.proc.wait()
    assert wait_gone([exporter.pid, *workers]) == []


def test_the_textfile_is_replaced_whole_and_written_once_more_at_the_end(
        start_master, events: Events, tmp_path: Path) -> None:
    textfile = tmp_path / "fleet.prom"
    master = start_master("fleets.metered:metered", "--metrics-textfile", str(textfile),
                          "--metrics-interval", "0.02")
    events.wait_kind("up", count=2)
    exporter_of(master)
    versions = set()  # a freed inode number is soon reused: count (inode, mtime) pairs
    deadline = time.monotonic() + WAIT
    while len(versions) < 20:  # 20 replacements seen, each read whole
        assert time.monotonic() < deadline, f"only {len(versions)} versions in {WAIT}s"
        try:
            with open(textfile) as text:
                seen = os.fstat(text.fileno())
                versions.add((seen.st_ino, seen.st_mtime_ns))
                body = text.read()
        except FileNotFoundError:  # before the first write
            continue
        samples = parse(body)
        assert body.endswith("\n") and pick(samples, "prefork_up", fleet="metered") == 1
        assert pick(samples, "process_max_fds", fleet="metered") is not None, body[-300:]
    assert oct(textfile.stat().st_mode & 0o777) == "0o644"
    stop(master)
    final = parse(textfile.read_text())
    assert pick(final, "prefork_fleet_stopping", fleet="metered") == 1
    assert pick(final, "prefork_workers", state="running") == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".fleet.prom")] == []


def test_prefork_metrics_serves_a_master_started_without_it(
        start_master, events: Events, runtime_dir: Path) -> None:
    master = start_master("fleets.metered:metered")
    events.wait_kind("up", count=2)
    exporter = subprocess.Popen(
        [sys.executable, "-m", "prefork", "metrics", "--fleet", "metered", "--listen",
         "127.0.0.1:0"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, env=master_env(events, runtime_dir), text=True)
    try:
        assert exporter.stderr is not None
        line = exporter.stderr.readline()
        url = line.split(" on ")[-1].strip()
        assert line.startswith("metrics of fleet metered on http://127.0.0.1:"), line
        samples = scrape_after(url, time.time())
        assert pick(samples, "prefork_up", fleet="metered") == 1
        assert pick(samples, "prefork_worker_up", worker="victim") == 1
        stop(master)
        samples = scrape_after(url, time.time())
        assert [s.name for s in samples] == ["prefork_up", "prefork_reading_timestamp_seconds"]
        assert samples[0].value == 0
        exporter.send_signal(signal.SIGTERM)
        assert exporter.wait(WAIT) == 0
    finally:
        exporter.kill()
        exporter.wait()
        if exporter.stderr is not None:
            exporter.stderr.close()


def test_a_port_in_use_is_one_line_and_exit_2_before_any_fork(start_master, events: Events
                                                               ) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        master = start_master("fleets.metered:metered", "--metrics", f"127.0.0.1:{port}")
        assert master.wait_exit() == 2
    assert master.lines[-1] == (f"prefork: error: --metrics 127.0.0.1:{port}: cannot "
                                "listen there: Address already in use"), master.log
    assert not master.log_matches("spawned") and events.of("up") == []


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--fleet", "fleets.metered:metered", "--metrics", "nonsense"],
     "Invalid value for '--metrics': 'nonsense' is not HOST:PORT (a port from 0 to 65535)"),
    (["run", "--fleet", "fleets.metered:metered", "--metrics", "[::1]:65536"],
     "Invalid value for '--metrics': '[::1]:65536' is not HOST:PORT (a port from 0 to "
     "65535)"),
    (["run", "--fleet", "fleets.metered:metered", "--metrics", "no.such.host.invalid:0"],
     "--metrics no.such.host.invalid:0: cannot resolve the host:"),
    (["run", "--fleet", "fleets.metered:metered", "--metrics-textfile", "{tmp}/m.txt"],
     "--metrics-textfile {tmp}/m.txt: the name must end in .prom (node_exporter's textfile "
     "collector reads only those)"),
    (["run", "--fleet", "fleets.metered:metered", "--metrics-textfile", "{tmp}/no/m.prom"],
     "--metrics-textfile {tmp}/no/m.prom: {tmp}/no is not a directory"),
    (["run", "--fleet", "fleets.metered:metered", "--metrics", ":0",
      "--metrics-interval", "0"], "Invalid value for '--metrics-interval': '0' must be more "
     "than 0 seconds"),
    (["metrics", "--fleet", "metered"],
     "nothing to do: give --listen HOST:PORT, --textfile PATH or both"),
])
def test_bad_metrics_options_are_one_line_and_exit_2(args: list[str], message: str,
                                                      events: Events, runtime_dir: Path,
                                                      tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "prefork",
                           *(a.replace("{tmp}", str(tmp_path)) for a in args)],
                          env=master_env(events, runtime_dir), capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("prefork: error: " + message.replace("{tmp}", str(tmp_path))), line


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("9100", ("127.0.0.1", 9100)), (":0", ("127.0.0.1", 0)),
    ("0.0.0.0:9100", ("0.0.0.0", 9100)), ("[::1]:9100", ("::1", 9100)),
    ("localhost:65535", ("localhost", 65535)),
])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "host:port", "1.2.3.4:-1", "a b:80", ":70000"])
def test_bad_listen_addresses(text: str) -> None:
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        parse_listen(text)


def status_document() -> dict[str, Any]:
    worker = {"name": "w", "replica": 1, "pid": 42, "state": "running", "restarts": 3,
              "exit_code": 2, "exit_signal": None, "heartbeat_age": 0.25, "started": 1e9,
              "recycles": {"age": 1, "heartbeat": 0, "memory": 2, "reload": 0},
              "memory": {"uss": 1, "pss": 2, "rss": 3, "swap": 4, "shared": 2},
              "imported_after_fork": {"count": 7, "modules": [], "preload": [], "dropped": 0,
                                      "uss": 5},
              # w is a worker group's process: its hosted workers (prefork.groups).
              "hosted": [{"name": "a", "state": "backoff", "restarts": 4, "uptime": None,
                          "next_start_in": 0.5, "last_exception": "ValueError: no"},
                         {"name": "b", "state": "running", "restarts": 0, "uptime": 9.0,
                          "next_start_in": None, "last_exception": None}]}
    gone = {"name": "g", "replica": 0, "pid": None, "state": "failed", "restarts": 0,
            "exit_code": None, "exit_signal": 9, "heartbeat_age": None, "started": None,
            "recycles": {}, "memory": None}
    return {"master_pid": 7, "modules": 300, "stopping": False,
            "reloads": {"total": 2, "last": 1.5e9, "in_progress": False, "generation": 1,
                        "last_result": {"id": 2, "kind": "code", "ok": True, "error": None,
                                        "at": 1.5e9}},
            "memory": {"uss": 10, "pss": 20, "rss": 30, "swap": 0, "shared": 20},
            "workers": [worker, gone]}


def test_every_status_field_becomes_its_series() -> None:
    registry = CollectorRegistry()
    document = status_document()

    class Fixed:
        def collect(self) -> list[Any]:
            return [*metrics.fleet_families(document, "f"),
                    *metrics.worker_families(document, "f")]

    registry.register(Fixed())  # type: ignore[arg-type]
    from prometheus_client import generate_latest
    samples = parse(generate_latest(registry).decode())
    w = {"fleet": "f", "worker": "w", "replica": "1"}
    g = {"fleet": "f", "worker": "g", "replica": "0"}
    assert pick(samples, "prefork_worker_restarts_total", **w) == 3
    assert pick(samples, "prefork_worker_last_exit_code", **w) == 2
    assert pick(samples, "prefork_worker_last_exit_signal", **g) == 9
    assert pick(samples, "prefork_worker_recycles_total", **w, reason="memory") == 2
    assert pick(samples, "prefork_worker_recycles_total", **g, reason="memory") == 0
    assert pick(samples, "prefork_worker_heartbeat_age_seconds", **w) == 0.25
    assert pick(samples, "prefork_worker_memory_bytes", **w, type="swap") == 4
    assert pick(samples, "prefork_worker_memory_bytes", **g, type="uss") is None
    assert pick(samples, "prefork_worker_up", **g) == 0
    assert pick(samples, "prefork_worker_imported_after_fork_modules", **w) == 7
    assert pick(samples, "prefork_worker_imported_after_fork_modules", **g) is None
    assert pick(samples, "prefork_workers", state="failed") == 1
    assert pick(samples, "prefork_floor_bytes", type="pss") == 20
    assert pick(samples, "prefork_reloads_total") == 2
    assert pick(samples, "prefork_last_reload_success") == 1
    assert pick(samples, "prefork_code_generation") == 1
    hosted = {"fleet": "f", "group": "w"}
    assert pick(samples, "prefork_hosted_worker_restarts_total", **hosted, worker="a") == 4
    assert pick(samples, "prefork_hosted_worker_state", **hosted, worker="a",
                state="backoff") == 1
    assert pick(samples, "prefork_hosted_worker_state", **hosted, worker="b",
                state="backoff") == 0
    assert pick(samples, "prefork_hosted_worker_state", worker="g") is None  # no group
    states = {s.labels["state"] for s in samples if s.name == "prefork_worker_state"}
    assert states == {str(s) for s in WorkerState} | {"starting"}


def test_scrapes_within_the_interval_share_one_reading(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    asked: list[Path] = []

    def fake_status(path: Path, timeout: float, *, any_uid: bool) -> dict[str, Any]:
        asked.append(path)
        return status_document()

    monkeypatch.setattr(metrics, "fetch_status", fake_status)
    now = [100.0]
    collector = metrics.FleetCollector(Path("/nonexistent/f.sock"), "f", clock=lambda: now[0])
    first = list(collector.collect())
    now[0] += metrics.MIN_INTERVAL / 2
    assert list(collector.collect()) == first and len(asked) == 1
    now[0] += metrics.MIN_INTERVAL / 2
    list(collector.collect())
    assert len(asked) == 2
    collector.expire()
    list(collector.collect())
    assert len(asked) == 3


def test_no_master_is_prefork_up_0_alone_and_one_log_line(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    collector = metrics.FleetCollector(tmp_path / "gone.sock", "gone")
    for _ in range(3):
        collector.expire()
        up, read = list(collector.collect())
        assert up.name == "prefork_up" and [s.value for s in up.samples] == [0]
        assert read.name == "prefork_reading_timestamp_seconds"
    assert [r.getMessage().split(":")[:2] for r in caplog.records] == [
        ["metrics", " no status from the master of fleet gone"]]


def test_the_textfile_writer_survives_any_failure(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefork")
    path, calls = tmp_path / "f.prom", []
    stop = threading.Event()

    class Flaky:  # a bug on the first two writes, then fine
        def collect(self) -> list[Any]:
            calls.append(1)
            if len(calls) <= 2:
                raise KeyError("bug")
            stop.set()
            return []

    registry = CollectorRegistry()
    registry.register(Flaky())  # type: ignore[arg-type]
    metrics.keep_writing(path, registry, 0.001, stop)
    assert len(calls) == 3 and path.exists()
    assert [r.levelname for r in caplog.records] == ["ERROR", "INFO"]


def test_a_failed_textfile_write_keeps_the_old_file_and_leaves_no_temporary(
        tmp_path: Path) -> None:
    path = tmp_path / "f.prom"
    path.write_text("old\n")

    class Broken:
        def collect(self) -> list[Any]:
            raise OSError(28, "No space left on device")

    broken = CollectorRegistry()
    broken.register(Broken())  # type: ignore[arg-type]
    with pytest.raises(OSError):
        metrics.write_textfile(path, broken)
    assert path.read_text() == "old\n"
    taken = tmp_path / "sub.prom"  # the rename fails after the temporary file is written
    taken.mkdir()
    with pytest.raises(IsADirectoryError):
        metrics.write_textfile(taken, CollectorRegistry())
    assert sorted(tmp_path.iterdir()) == [path, taken]
    with pytest.raises(Exception, match="is a directory"):
        check_textfile(taken)
