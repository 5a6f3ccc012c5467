"""The fleet's metrics in the Prometheus text format (and OpenMetrics, when a scraper asks
for it), made by the exporter: a process of its own, never the master.

The exporter (``prefork metrics``; ``prefork run --metrics`` starts and keeps one) is a
fresh interpreter that never imports the floor. For each reading it asks the master's
control socket for ``status`` - one request, answered from what the master knows - and
reads every process's memory from ``/proc`` itself, ~1 ms a process
(:mod:`prefork.memory`). So a scrape costs the master's loop one status request and never
a smaps read, an HTTP client never talks to the master, and a crash of the exporter costs
only metrics. Scrapes closer together than ``MIN_INTERVAL`` share one reading: a scraper
in a loop asks the master at most once a second. The exposition itself is
``prometheus_client``'s.

Every series carries the label ``fleet`` (the master's ``process_*`` too, so textfiles of
several fleets merge in node_exporter); a worker's also ``worker`` and ``replica``. The
README's "Metrics" section lists them all.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from prefork import logs
from prefork.client import NoMaster, fetch_status, hosted_of
from prefork.control import ControlError
from prefork.states import WorkerState

log = logging.getLogger("prefork")

MIN_INTERVAL = 1.0  # seconds: scrapes closer together than this share one reading
STATUS_TIMEOUT = 2.0  # seconds the exporter waits for the master's status reply
CLIENT_TIMEOUT = 10.0  # seconds an HTTP client has for each read or write of its request
MEMORY_TYPES = ("uss", "pss", "rss", "swap")
# Every state a worker row can show: the states, and "starting" (running, not beaten yet).
STATES = (*(str(s) for s in WorkerState), "starting")
HOSTED_STATES = tuple(str(s) for s in WorkerState)  # a hosted worker's slot: no "starting"
RECYCLE_REASONS = ("age", "heartbeat", "memory", "reload")
UP = "1 if the fleet's master answered, else 0."


class FleetCollector(Collector):
    """The fleet's series, from the master behind control socket ``path``: one reading
    (status and memory) at most every ``MIN_INTERVAL`` seconds, shared by the scrapes and
    textfile writes in between. With no answer from the master: ``prefork_up 0`` alone.
    """

    def __init__(self, path: Path, fleet: str, *, any_uid: bool = False,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.fleet = fleet
        self.any_uid = any_uid
        self.master_pid: int | None = None
        self._clock = clock
        self._lock = threading.Lock()  # the HTTP server serves each scrape on a thread
        self._read_at: float | None = None
        self._families: list[Metric] = []
        self._answered = True  # the last reading had the master's answer (log changes only)
        # The master's process_* series, read from /proc/MASTER_PID: outside the master.
        self._master_process = ProcessCollector(pid=lambda: str(self.master_pid),
                                                registry=None)

    def expire(self) -> None:
        """Make the next collect read afresh."""
        with self._lock:
            self._read_at = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = self._clock()
            if self._read_at is None or now - self._read_at >= MIN_INTERVAL:
                self._families = self._read()
                self._read_at = self._clock()
            return iter(self._families)

    def _read(self) -> list[Metric]:
        read = _one(GaugeMetricFamily, "prefork_reading_timestamp_seconds", "When the "
                    "exporter asked the master for its status and read the memory figures "
                    "(scrapes within a second share one reading).", self.fleet, time.time())
        try:
            status = fetch_status(self.path, STATUS_TIMEOUT, any_uid=self.any_uid)
        except (NoMaster, ControlError) as exc:
            if self._answered:
                log.warning("metrics: no status from the master of fleet %s: %s",
                            self.fleet, exc)
            self.master_pid, self._answered = None, False
            return [_one(GaugeMetricFamily, "prefork_up", UP, self.fleet, 0), read]
        if not self._answered:
            log.info("metrics: the master of fleet %s answers again", self.fleet)
        self._answered = True
        self.master_pid = status["master_pid"]
        up = _one(GaugeMetricFamily, "prefork_up", UP, self.fleet, 1)
        return [up, read, *fleet_families(status, self.fleet),
                *worker_families(status, self.fleet),
                *labelled(self._master_process.collect(), fleet=self.fleet)]


def fleet_families(status: dict[str, Any], fleet: str) -> list[Metric]:
    """The fleet-wide series of one :func:`prefork.client.fetch_status` document."""
    workers = status["workers"]
    by_state = GaugeMetricFamily("prefork_workers", "Worker replicas in each state.",
                                 labels=["fleet", "state"])
    for state in STATES:
        by_state.add_metric([fleet, state], sum(w.get("state") == state for w in workers))
    families: list[Metric] = [by_state]
    if isinstance(status.get("modules"), int):
        families.append(_one(GaugeMetricFamily, "prefork_floor_modules", "Modules imported "
                             "in the master: the floor's modules.", fleet, status["modules"]))
    if status.get("memory") is not None:
        floor = GaugeMetricFamily(
            "prefork_floor_bytes", "The master's memory by type: the floor every worker "
            "shares copy-on-write, and what supervising needs.", labels=["fleet", "type"])
        for kind in MEMORY_TYPES:
            floor.add_metric([fleet, kind], status["memory"][kind])
        families.append(floor)
    families.append(_one(GaugeMetricFamily, "prefork_fleet_stopping", "1 once the master "
                         "has begun to stop the fleet.", fleet, int(bool(status.get("stopping")))))
    reloads = status.get("reloads")
    if isinstance(reloads, dict):
        in_progress = bool(reloads.get("in_progress"))
        families += [
            _one(CounterMetricFamily, "prefork_reloads", "Reloads (SIGHUP, prefork reload) the "
                 "master began.", fleet, reloads.get("total", 0)),
            _one(GaugeMetricFamily, "prefork_reload_in_progress", "1 while a reload tries new "
                 "code or replaces workers.", fleet, int(in_progress)),
            _one(GaugeMetricFamily, "prefork_code_generation", "Code reloads that went through "
                 "since the master started.", fleet, reloads.get("generation", 0))]
        if reloads.get("last") is not None:
            families.append(_one(GaugeMetricFamily, "prefork_last_reload_timestamp_seconds",
                                 "When the last reload began, as a Unix time.", fleet,
                                 reloads["last"]))
        result = reloads.get("last_result")
        if isinstance(result, dict):
            families.append(_one(GaugeMetricFamily, "prefork_last_reload_success",
                                 "1 if the last reload that ended went through, 0 if it "
                                 "failed.", fleet, int(result.get("ok") is True)))
    return families


def _one(kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, text: str,
         fleet: str, value: float) -> Metric:
    """A family of one series, labelled with the fleet only."""
    family = kind(name, text, labels=["fleet"])
    family.add_metric([fleet], value)
    return family


def worker_families(status: dict[str, Any], fleet: str) -> list[Metric]:
    """The per-worker series of one status document: labels fleet, worker, replica."""
    labels = ["fleet", "worker", "replica"]

    def gauge(name: str, text: str, extra: Iterable[str] = ()) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, text, labels=[*labels, *extra])

    up = gauge("prefork_worker_up", "1 if the worker's process is running, else 0.")
    state = gauge("prefork_worker_state", "1 for the state the worker is in, 0 for the "
                  "others.", ["state"])
    restarts = CounterMetricFamily("prefork_worker_restarts", "Times the master forked the "
                                   "worker again (after a crash, or to replace it).",
                                   labels=labels)
    recycles = CounterMetricFamily("prefork_worker_recycles", "Workers the master stopped to "
                                   "replace them, by reason.", labels=[*labels, "reason"])
    exit_code = gauge("prefork_worker_last_exit_code", "The exit code of the worker's last "
                      "process, if it exited with one.")
    exit_signal = gauge("prefork_worker_last_exit_signal", "The signal that ended the "
                        "worker's last process, if one did.")
    beat = gauge("prefork_worker_heartbeat_age_seconds", "Seconds since the worker's last "
                 "heartbeat (workers with a heartbeat timeout).")
    started = gauge("prefork_worker_start_time_seconds", "When the running process was "
                    "forked, as a Unix time.")
    pid = gauge("prefork_worker_pid", "The running process's pid.")
    memory = gauge("prefork_worker_memory_bytes", "The running process's memory by type: "
                   "uss is what it alone maps (what its death frees).", ["type"])
    imported = gauge("prefork_worker_imported_after_fork_modules", "Modules the worker "
                     "imported after the fork, as it reported them (see --learn-floor).")
    for w in status["workers"]:
        key = [fleet, str(w.get("name", "?")), str(w.get("replica", 0))]
        up.add_metric(key, int(w.get("pid") is not None and w.get("state") in
                               ("running", "starting", "stopping")))
        for name in STATES:
            state.add_metric([*key, name], int(w.get("state") == name))
        restarts.add_metric(key, w.get("restarts", 0))
        counts = w.get("recycles") or {}
        for reason in RECYCLE_REASONS:
            recycles.add_metric([*key, reason], counts.get(reason, 0))
        for family, field in ((exit_code, "exit_code"), (exit_signal, "exit_signal"),
                              (beat, "heartbeat_age"), (started, "started"), (pid, "pid")):
            if w.get(field) is not None:
                family.add_metric(key, w[field])
        if w.get("memory") is not None:
            for kind in MEMORY_TYPES:
                memory.add_metric([*key, kind], w["memory"][kind])
        report = w.get("imported_after_fork")
        if isinstance(report, dict) and isinstance(report.get("count"), int):
            imported.add_metric(key, report["count"])
    return [up, state, restarts, recycles, exit_code, exit_signal, beat, started, pid, memory,
            imported, *_hosted_families(status, fleet)]


def _hosted_families(status: dict[str, Any], fleet: str) -> list[Metric]:
    """A worker group's hosted workers (:mod:`prefork.groups`): their state and their
    restarts inside the group's process; labels fleet, group, worker. Their process's
    series are the group's."""
    labels = ["fleet", "group", "worker"]
    state = GaugeMetricFamily("prefork_hosted_worker_state", "1 for the state a worker "
                              "hosted in a group is in, 0 for the others.",
                              labels=[*labels, "state"])
    restarts = CounterMetricFamily("prefork_hosted_worker_restarts", "Times the group's "
                                   "process started a hosted worker again.", labels=labels)
    for group in status["workers"]:
        for row in hosted_of(group):
            key = [fleet, str(group.get("name", "?")), str(row.get("name", "?"))]
            for name in HOSTED_STATES:
                state.add_metric([*key, name], int(row.get("state") == name))
            if isinstance(row.get("restarts"), int):
                restarts.add_metric(key, row["restarts"])
    return [state, restarts]


def labelled(families: Iterable[Metric], **labels: str) -> list[Metric]:
    """``families`` with ``labels`` added to every sample."""
    families = list(families)
    for family in families:
        family.samples = [sample._replace(labels={**sample.labels, **labels})
                          for sample in family.samples]
    return families


def fleet_registry(collector: FleetCollector) -> CollectorRegistry:
    """A registry of the fleet's series only (not the exporter's own process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


# -- where the series go: HTTP and a textfile ---------------------------------------------


class _QuietHandler(WSGIRequestHandler):
    """No line per request; a client that stalls for ``CLIENT_TIMEOUT`` is dropped."""

    timeout = CLIENT_TIMEOUT

    def log_message(self, format: str, *args: object) -> None:
        pass


def http_server(listener: socket.socket, registry: CollectorRegistry) -> ThreadingWSGIServer:
    """A thread-per-request server of ``registry`` on ``listener``, a socket that is bound
    and listening already (the master binds it once and hands it to each exporter, so a
    restart never loses the port)."""
    host, port = listener.getsockname()[:2]
    server = ThreadingWSGIServer((host, port), _QuietHandler, bind_and_activate=False)
    server.socket.close()
    server.socket = listener
    # What server_bind() would set, without its reverse DNS lookup of the host.
    server.server_address = (host, port)
    server.server_name, server.server_port = host, port
    server.setup_environ()
    server.set_app(make_wsgi_app(registry))
    return server


def write_textfile(path: Path, registry: CollectorRegistry) -> None:
    """Replace ``path`` with the registry's text at once (rename), so node_exporter never
    reads half a file: the new text goes to a temporary file in the same directory, made
    with O_EXCL (a name planted in a shared directory is never followed). Mode 0644, for
    node_exporter's user. Raises OSError."""
    body = generate_latest(registry)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(body)
            os.fchmod(out.fileno(), 0o644)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def keep_writing(path: Path, registry: CollectorRegistry, interval: float,
                 stop: threading.Event) -> None:
    """Write the textfile every ``interval`` seconds until ``stop`` is set. A failed write
    is logged once (with its traceback if it is not an OSError, a bug) and tried again each
    interval: nothing ends this thread but ``stop``."""
    failing = False
    while True:
        try:
            write_textfile(path, registry)
            if failing:
                log.info("metrics: writing %s works again", path)
            failing = False
        except Exception as exc:
            if not failing:
                log.error("metrics: cannot write %s: %s (retrying every %gs)", path,
                          getattr(exc, "strerror", None) or exc, interval,
                          exc_info=not isinstance(exc, OSError))
            failing = True
        if stop.wait(interval):
            return


def _reopen_log(signum: int, frame: object) -> None:
    try:
        logs.reopen()
    except OSError as exc:
        log.error("metrics: SIGUSR1: cannot reopen the log file (%s): still writing to the "
                  "old one", exc.strerror)


def serve(collector: FleetCollector, *, listener: socket.socket | None,
          textfile: Path | None, interval: float) -> None:
    """Serve ``/metrics`` on ``listener`` and/or keep ``textfile`` up to date until
    SIGTERM or SIGINT; then write the textfile a last time and return."""
    registry = fleet_registry(collector)
    stop = threading.Event()

    def end(signum: int, frame: object) -> None:
        raise SystemExit(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, end)
    # An operator's signal for the whole unit (`systemctl kill -s HUP`) must not end it;
    # SIGUSR1 (the master passes its own on) reopens the log file after logrotate.
    signal.signal(signal.SIGUSR1, _reopen_log)
    for signum in (signal.SIGHUP, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
    writer = None
    if textfile is not None:
        writer = threading.Thread(target=keep_writing, name="prefork-textfile", daemon=True,
                                  args=(textfile, registry, interval, stop))
        writer.start()
    try:
        if listener is not None:
            # No shutdown() is ever called (SIGTERM raises SystemExit out of select()),
            # so there is no flag to poll: the default 0.5 s would wake it twice a second.
            http_server(listener, registry).serve_forever(poll_interval=3600.0)
        else:
            while not stop.wait(3600.0):
                pass
    except SystemExit:
        pass
    finally:
        stop.set()
        if writer is not None:
            writer.join(STATUS_TIMEOUT + 1.0)
    if textfile is not None:
        collector.expire()
        try:
            write_textfile(textfile, registry)  # what the fleet looks like as it ends
        except OSError as exc:
            log.error("metrics: cannot write %s: %s", textfile, exc.strerror or exc)
