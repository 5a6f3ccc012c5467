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
