"""What the master imports is shared by every worker, but it is memory all the same: a
fleet of plain functions started by module:ATTR gets no asyncio (5.9 MiB alone),
importlib.metadata (3.7) or concurrent.futures (1.2) in its master."""

from __future__ import annotations

import signal

from conftest import Events


def test_a_sync_module_attr_fleet_master_imports_no_asyncio(start_master, events: Events
                                                            ) -> None:
    master = start_master("fleets.lean:fleet")
    [report] = events.wait_kind("master-modules")
    events.wait_kind("up")
    assert report["present"] == []
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_report_imports_after_0_sends_no_sigurg_and_installs_no_handler(
        start_master, events: Events) -> None:
    master = start_master("fleets.lean:fleet", "--report-imports-after", "0")
    [up] = events.wait_kind("up")
    assert up["sigurg"] == "<Handlers.SIG_DFL: 0>"
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
    assert not master.log_matches("imported .* modules after the fork")


def test_by_default_a_worker_has_the_report_handler(start_master, events: Events) -> None:
    master = start_master("fleets.lean:fleet")
    [up] = events.wait_kind("up")
    assert "_on_signal" in up["sigurg"]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
