"""Backoff, backoff reset, flap limit and restart decisions, checked without a process."""

from __future__ import annotations

import os
import signal

import pytest

from prefork import Backoff, StartLimit
from prefork.policy import (
    ExitStatus,
    backoff_delay,
    exceeds_start_limit,
    is_stable_run,
    memory_recycle_verdict,
    next_replica,
    over_memory_limit,
    should_restart,
)

NO_JITTER = Backoff(initial=1.0, factor=2.0, maximum=30.0, jitter=0.0)


def test_backoff_doubles_from_one_second_up_to_the_cap() -> None:
    delays = [backoff_delay(n, NO_JITTER, 0.0) for n in range(1, 9)]
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_first_delay_never_exceeds_a_cap_below_it() -> None:
    assert backoff_delay(1, Backoff(initial=1.0, maximum=0.25, jitter=0.0), 0.0) == 0.25


def test_huge_attempt_counts_stay_at_the_cap() -> None:
    assert backoff_delay(100_000, NO_JITTER, 0.0) == 30


@pytest.mark.parametrize(("backoff", "expected"), [
    (Backoff(initial=15.0, factor=1.0, jitter=0.0), 15.0),  # constant backoff
    (Backoff(initial=0.0, jitter=0.0), 0.0),  # restart at once
    (Backoff(initial=0.3, factor=3.0, maximum=1.0, jitter=0.0), 1.0),
])
def test_delay_for_a_billionth_attempt_is_computed_not_iterated(backoff: Backoff,
                                                                expected: float) -> None:
    # An earlier version looped once per attempt when the cap was never reached: a worker
    # crash-looping for days made every restart slower. This would hit the test timeout.
    assert backoff_delay(10**9, backoff, 0.0) == expected


@pytest.mark.parametrize(("backoff", "attempt", "expected"), [
    (Backoff(factor=1e200, jitter=0.0), 3, 30.0),  # factor**2 overflowed a float
    (Backoff(factor=2.0, maximum=7 * 86400.0, jitter=0.0), 1100, 7 * 86400.0),
    (Backoff(initial=1e-310, factor=2.0, maximum=1.0, jitter=0.0), 1030, pytest.approx(0.5753,
                                                                                        rel=1e-3)),
])
def test_no_backoff_a_fleet_may_give_overflows(backoff: Backoff, attempt: int,
                                                expected: float) -> None:
    assert backoff_delay(attempt, backoff, 0.0) == expected


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0, 10.0])
def test_closed_form_matches_repeated_multiplication(factor: float) -> None:
    backoff = Backoff(initial=0.1, factor=factor, maximum=30.0, jitter=0.0)
    nominal = 0.1
    for attempt in range(1, 40):
        assert backoff_delay(attempt, backoff, 0.0) == pytest.approx(min(nominal, 30.0))
        nominal *= factor


@pytest.mark.parametrize("attempt", [1, 3, 6, 50])
@pytest.mark.parametrize("spread", [0.0, 0.3, 0.999])
def test_jitter_only_shortens_and_by_at_most_its_fraction(attempt: int, spread: float) -> None:
    backoff = Backoff(jitter=0.1)
    nominal = backoff_delay(attempt, Backoff(jitter=0.0), 0.0)
    delay = backoff_delay(attempt, backoff, spread)
    assert nominal * 0.9 <= delay <= nominal <= backoff.maximum
    assert delay == pytest.approx(nominal * (1 - 0.1 * spread))


def test_jitter_spreads_workers_that_died_together() -> None:
    delays = {backoff_delay(6, Backoff(), s / 10) for s in range(10)}
    assert len(delays) == 10


@pytest.mark.parametrize("bad", [(0, 0.5), (1, 1.0), (1, -0.1)])
def test_backoff_delay_rejects_nonsense(bad: tuple[int, float]) -> None:
    with pytest.raises(ValueError):
        backoff_delay(bad[0], NO_JITTER, bad[1])


def test_stable_run_resets_backoff_at_reset_after() -> None:
    backoff = Backoff(reset_after=60.0)
    assert not is_stable_run(59.9, backoff)
    assert is_stable_run(60.0, backoff)
    assert is_stable_run(86_400.0, backoff)


def test_start_limit_allows_burst_starts_in_the_interval_and_not_one_more() -> None:
    limit = StartLimit(burst=5, interval=60.0)
    starts = [0.0, 1.0, 3.0, 7.0]
    assert not exceeds_start_limit(starts, 15.0, limit)  # the 5th start
    assert exceeds_start_limit([*starts, 15.0], 31.0, limit)  # a 6th within 60 s


def test_start_limit_forgets_starts_older_than_the_interval() -> None:
    limit = StartLimit(burst=2, interval=10.0)
    assert exceeds_start_limit([0.0, 5.0], 9.9, limit)
    assert not exceeds_start_limit([0.0, 5.0], 10.0, limit)  # 0.0 left the window


def test_start_limit_with_zero_interval_never_trips() -> None:
    assert not exceeds_start_limit([0.0] * 1000, 0.0, StartLimit(burst=1, interval=0))


def test_default_backoff_and_limit_fail_an_instant_crasher_after_five_starts() -> None:
    """With the defaults, a worker that dies at once is started 5 times, then failed."""
    backoff, limit = Backoff(jitter=0.0), StartLimit()
    starts: list[float] = [0.0]
    attempt = 0
    while True:
        attempt += 1
        nxt = starts[-1] + backoff_delay(attempt, backoff, 0.0)
        if exceeds_start_limit(starts, nxt, limit):
            break
        starts.append(nxt)
    assert starts == [0.0, 1.0, 3.0, 7.0, 15.0]


def test_exit_status_from_a_real_wait_status() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert ExitStatus.from_wait_status(status) == ExitStatus(code=7)
    pid = os.fork()
    if pid == 0:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = ExitStatus.from_wait_status(status)
    assert killed == ExitStatus(signal=signal.SIGKILL)
    assert killed.describe() == "killed by SIGKILL"
    assert ExitStatus(code=7).describe() == "exit code 7"


@pytest.mark.parametrize(
    ("policy", "status", "restart"),
    [
        ("on-failure", ExitStatus(code=0), False),
        ("on-failure", ExitStatus(code=1), True),
        ("on-failure", ExitStatus(signal=signal.SIGKILL), True),
        ("on-failure", ExitStatus(signal=signal.SIGTERM), True),
        ("always", ExitStatus(code=0), True),
        ("always", ExitStatus(code=2), True),
        ("never", ExitStatus(code=1), False),
        ("never", ExitStatus(signal=signal.SIGSEGV), False),
    ],
)
def test_should_restart(policy: str, status: ExitStatus, restart: bool) -> None:
    assert should_restart(policy, status) is restart  # type: ignore[arg-type]


def test_memory_recycling_needs_the_limit_exceeded_for_a_whole_hold() -> None:
    # Under the limit: nothing, and any earlier excess is forgotten.
    assert over_memory_limit(100, 200, over_since=5.0, now=9.0, hold=2.0) == (None, False)
    # First time over: remember when, do not recycle on one spike.
    assert over_memory_limit(300, 200, over_since=None, now=10.0, hold=2.0) == (10.0, False)
    assert over_memory_limit(300, 200, over_since=10.0, now=11.9, hold=2.0) == (10.0, False)
    assert over_memory_limit(300, 200, over_since=10.0, now=12.0, hold=2.0) == (10.0, True)
    # Exactly at the limit is not over it.
    assert over_memory_limit(200, 200, over_since=None, now=1.0, hold=0.0) == (None, False)


def test_a_worker_over_its_memory_limit_from_its_start_burst_times_in_a_row_fails() -> None:
    limit = StartLimit(burst=3, interval=60.0)
    assert memory_recycle_verdict(0, seen_under=False, limit=limit) == (1, False)
    assert memory_recycle_verdict(1, seen_under=False, limit=limit) == (2, False)
    assert memory_recycle_verdict(2, seen_under=False, limit=limit) == (3, True)
    # A run once under its limit grew past it: a leak, which recycling is for.
    assert memory_recycle_verdict(2, seen_under=True, limit=limit) == (0, False)
    # No start limit: recycled for ever, as a crash-looping worker restarts for ever.
    assert memory_recycle_verdict(9, seen_under=False,
                                  limit=StartLimit(burst=3, interval=0)) == (10, False)


def test_next_replica_reuses_the_lowest_free_number() -> None:
    assert next_replica([]) == 0
    assert next_replica([0, 1, 2]) == 3
    assert next_replica([0, 2]) == 1
