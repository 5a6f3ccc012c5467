"""Crashed workers come back on a growing, capped, jittered backoff that resets after a
stable run; the delays are read from the master's log and checked against the clock."""

from __future__ import annotations

import os
import signal
from itertools import pairwise

import pytest

from conftest import Events

FAST_JITTER = 0.1
LOG_DIGITS = 3  # the master logs delays as "%.3f": a logged value is round(delay, 3)


def restart_delays(master, count: int) -> list[tuple[int, float]]:
    master.wait_log(r"worker \S+ restart \d+ in", count=count)
    return [(int(m[1]), float(m[2]))
            for m in master.log_matches(r"worker \S+ restart (\d+) in ([\d.]+)s")][:count]


def test_crashes_restart_with_growing_capped_backoff(start_master, events: Events) -> None:
    master = start_master("fleets.basic:crashing")  # initial 0.1 s, factor 2, cap 0.4 s
    ups = events.wait_kind("up", count=5)
    delays = restart_delays(master, 4)
    assert [n for n, _ in delays] == [1, 2, 3, 4]
    for (_, delay), nominal in zip(delays, [0.1, 0.2, 0.4, 0.4], strict=True):
        # Rounding is monotonic, so the bounds on the true delay hold for the rounded ones.
        low, high = round(nominal * (1 - FAST_JITTER), LOG_DIGITS), round(nominal, LOG_DIGITS)
        assert low <= delay <= high
    # The clock agrees: each start comes no sooner than the delay the master announced
    # (less the half of the last logged digit that rounding may have added).
    for (earlier, later), (_, delay) in zip(pairwise(ups), delays, strict=False):
        assert later["t"] - earlier["t"] >= delay - 0.5 * 10**-LOG_DIGITS
    assert len({e["pid"] for e in ups}) == 5
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


def test_backoff_resets_after_a_stable_run(start_master, events: Events) -> None:
    # Starts 1-3 die at once (delays 0.1, 0.2, 0.4); start 4 stays up 0.6 s, longer than
    # reset_after=0.5, then dies: its restart must be "restart 1" at 0.1 s again.
    master = start_master("fleets.basic:resetting")
    events.wait_kind("up", attempt=5)
    delays = restart_delays(master, 4)
    assert [n for n, _ in delays] == [1, 2, 3, 1]
    assert delays[3][1] <= 0.1 < delays[2][1]
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSEGV])
def test_a_worker_killed_by_a_signal_is_restarted(start_master, events: Events,
                                                  signum: int) -> None:
    # The default first backoff (~1 s) is not what this is about: the backoff tests are.
    master = start_master("fleets.basic:one_sleeper", "--max-backoff", "0.1")
    first = events.wait_kind("up")[0]
    os.kill(first["pid"], signum)
    second = events.wait_kind("up", count=2)[1]
    assert second["pid"] != first["pid"]
    master.wait_log(rf"worker sleeper \(pid {first['pid']}\) exited: killed by "
                    rf"{signal.Signals(signum).name}")
    master.signal(signal.SIGTERM)
    assert master.wait_exit() == 0
