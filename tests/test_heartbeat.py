"""The heartbeat table: a child's beat is visible to the master with no system call."""

from __future__ import annotations

import os
import time

import prefork.heartbeats as hb
from prefork import heartbeat
from prefork.heartbeats import HeartbeatTable


def test_a_beat_in_a_forked_child_is_seen_by_the_parent() -> None:
    table = HeartbeatTable(capacity=4)
    first, second = table.take(), table.take()
    table.reset(first, 1.0)
    table.reset(second, 1.0)
    pid = os.fork()
    if pid == 0:  # the child: attach as prefork.child does, then beat once
        table.attach(second, interval=0.1)
        heartbeat()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.last(first) == 1.0  # another worker's cell is untouched
    assert 1.0 < table.last(second) <= time.monotonic()
    table.close()


def test_heartbeat_is_a_no_op_outside_a_worker_with_a_timeout() -> None:
    assert hb._table is None
    heartbeat()  # must not raise
    assert hb.beat_interval() is None


def test_cells_are_given_out_once_and_reused_when_given_back() -> None:
    table = HeartbeatTable(capacity=2)
    a, b = table.take(), table.take()
    assert {a, b} == {0, 1}
    try:
        table.take()
    except IndexError:
        pass
    else:
        raise AssertionError("a full table gave out a third cell")
    table.give_back(a)
    assert table.take() == a
    table.close()
