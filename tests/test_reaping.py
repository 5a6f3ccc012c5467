"""Deaths are noticed on events, several at once, and no zombie is left behind."""

from __future__ import annotations

import os
import signal

import psutil

from conftest import Events


def test_simultaneous_deaths_are_all_reaped_and_restarted(start_master,
                                                         events: Events) -> None:
    master = start_master("fleets.basic:sleepers")  # 4 replicas
    first = events.wait_kind("up", count=4)
    for event in first:
        os.kill(event["pid"], signal.SIGKILL)
    master.wait_log(r"exited: killed by SIGKILL", count=4)
    again = events.wait_kind("up", count=8)[4:]
    assert {e["label"] for e in again} == {e["label"] for e in first}
    assert not {e["pid"] for e in again} & {e["pid"] for e in first}
    master.wait_log(r"spawned", count=8)
    assert all(p.status() != psutil.STATUS_ZOMBIE for p in master.workers())
    assert len(master.workers()) == 4
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_no_zombie_while_a_worker_waits_in_backoff(start_master, events: Events) -> None:
    master = start_master("fleets.basic:crashing", "--max-backoff", "60")
    events.wait_kind("up", count=3)
    master.wait_log(r"worker crasher restart 3 in")
    children = master.workers()
    assert all(p.status() != psutil.STATUS_ZOMBIE for p in children), children
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_workers_show_in_ps_by_name(start_master, events: Events) -> None:
    master = start_master("fleets.basic:sleepers")
    events.wait_kind("up", count=4)
    titles = sorted(" ".join(p.cmdline()).strip() for p in master.workers())
    assert titles == [f"prefork: worker sleeper{s} [sleepers]" for s in ("", ".1", ".2", ".3")]
    assert " ".join(psutil.Process(master.pid).cmdline()).strip() == "prefork: master [sleepers]"
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
