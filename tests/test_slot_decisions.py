"""What an exit, a stop or a scale means for a worker slot, decided without a process.

The master only forks, signals and reaps; these decisions are :class:`prefork.slot.Slot`'s,
the watches' and :mod:`prefork.scaling`'s, so every rule is checked here with plain
values: a time passed in, a random source that always draws 0.
"""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from prefork import Backoff, Fleet, FleetError, StartLimit, Worker
from prefork.memory import MIB
from prefork.policy import ExitStatus
from prefork.scaling import plan_scale, replicas
from prefork.slot import Next, Slot, StopReason, new_slot, slots_for, summary
from prefork.states import WorkerState
from prefork.watches import (
    Add,
    AgeWatch,
    HeartbeatWatch,
    Kill,
    MemoryWatch,
    Remove,
    RollingRestart,
    SlotTimers,
    Start,
    Stop,
)

S = WorkerState
CRASH = ExitStatus(code=1)
CLEAN = ExitStatus(code=0)
TERMINATED = ExitStatus(signal=signal.SIGTERM)
NO_JITTER = Backoff(initial=1.0, factor=2.0, maximum=30.0, jitter=0.0, reset_after=60.0)


class NoSpread(random.Random):
    """Draws 0 every time: the full backoff delay, no jitter."""

    def random(self) -> float:
        return 0.0


RNG = NoSpread()


def work() -> None:
    raise AssertionError("no worker runs in these tests")


def running(restart: str = "on-failure", *, at: float = 100.0, timeout: float | None = None,
            limit: StartLimit | None = None, name: str = "w", max_replicas: int | None = None,
            replica: int = 0, max_private_memory: int | None = None) -> Slot:
    fleet = Fleet("f", [Worker(name, work, restart=restart, timeout=timeout,  # type: ignore[arg-type]
                               max_replicas=max_replicas,
                               max_private_memory=max_private_memory)],
                  backoff=NO_JITTER, start_limit=limit or StartLimit())
    slot = new_slot(fleet, fleet.workers[0], replica)
    slot.started(1000 + replica, at, count_start=True)
    return slot


def test_a_crash_schedules_a_restart_on_the_backoff() -> None:
    slot = running()
    assert slot.exited(CRASH, 105.0, RNG) is Next.NOTHING
    assert slot.state is S.BACKOFF and slot.due == 106.0 and slot.attempt == 1
    assert slot.pid is None and slot.last_exit == CRASH


def test_a_second_crash_waits_twice_as_long_and_a_stable_run_starts_over() -> None:
    slot = running()
    slot.exited(CRASH, 101.0, RNG)
    slot.started(1001, 102.0, count_start=True)
    slot.exited(CRASH, 103.0, RNG)
    assert slot.due == 105.0 and slot.attempt == 2
    slot.started(1002, 105.0, count_start=True)
    slot.exited(CRASH, 105.0 + NO_JITTER.reset_after, RNG)  # up long enough: healthy
    assert slot.attempt == 1 and slot.due == 166.0


@pytest.mark.parametrize(("restart", "status", "final"), [
    ("on-failure", CLEAN, S.EXITED), ("never", CRASH, S.FAILED), ("never", CLEAN, S.EXITED),
])
def test_an_exit_its_policy_does_not_restart_is_final(restart: str, status: ExitStatus,
                                                      final: WorkerState) -> None:
    slot = running(restart)
    assert slot.exited(status, 110.0, RNG) is Next.NOTHING
    assert slot.state is final and slot.due is None


def test_always_restarts_a_clean_exit_too() -> None:
    slot = running("always")
    slot.exited(CLEAN, 110.0, RNG)
    assert slot.state is S.BACKOFF


def test_the_start_limit_marks_a_crash_looping_worker_failed() -> None:
    slot = running(limit=StartLimit(burst=2, interval=60.0))
    slot.exited(CRASH, 100.5, RNG)  # second start at 101.5: 2 starts in 60 s, allowed
    slot.started(1001, 101.5, count_start=True)
    assert slot.exited(CRASH, 102.0, RNG) is Next.NOTHING  # a third would break it
    assert slot.state is S.FAILED


def test_a_fork_that_failed_counts_as_a_start_and_backs_off() -> None:
    slot = new_slot(Fleet("f", [Worker("w", work)], backoff=NO_JITTER),
                    Worker("w", work), 0)
    slot.fork_failed(50.0, RNG)
    assert slot.state is S.BACKOFF and slot.due == 51.0 and list(slot.start_times) == [50.0]


def test_a_first_fork_that_fails_over_the_start_limit_fails_the_slot() -> None:
    fleet = Fleet("f", [Worker("w", work)], backoff=NO_JITTER,
                  start_limit=StartLimit(burst=1, interval=60.0))
    slot = new_slot(fleet, fleet.workers[0], 0)
    slot.fork_failed(50.0, RNG)  # its one start allowed is spent: FAILED, from STOPPED
    assert slot.state is S.FAILED and slot.due is None


@pytest.mark.parametrize(("reason", "then", "state"), [
    (StopReason.ROLLING_RESTART, Next.START, S.STOPPING),  # the master forks it again
    (StopReason.RECYCLED, Next.START, S.STOPPING),
    (StopReason.SCALED_DOWN, Next.REMOVE, S.STOPPING),  # the master drops the slot
    (StopReason.SHUTDOWN, Next.NOTHING, S.STOPPED),
    (StopReason.HUNG, Next.NOTHING, S.BACKOFF),  # as after a crash
    (StopReason.OVER_MEMORY, Next.NOTHING, S.FAILED),  # a new one would be over it too
])
def test_a_worker_the_master_stopped_goes_where_the_reason_says(
        reason: StopReason, then: Next, state: WorkerState) -> None:
    slot = running()
    slot.stopping(reason, reason.label, kill_at=120.0)
    assert slot.state is S.STOPPING and slot.kill_at == 120.0
    assert slot.exited(TERMINATED, 110.0, RNG) is then
    assert slot.state is state
    assert slot.kill_at is None and slot.stopping_for is None


def test_a_hung_worker_whose_policy_is_never_is_not_restarted() -> None:
    slot = running("never")
    slot.stopping(StopReason.HUNG, "no heartbeat", kill_at=120.0)
    slot.exited(TERMINATED, 110.0, RNG)
    assert slot.state is S.FAILED


def test_a_replacement_does_not_count_towards_the_start_limit() -> None:
    slot = running()
    slot.stopping(StopReason.ROLLING_RESTART, "rolling restart", kill_at=120.0)
    slot.exited(TERMINATED, 110.0, RNG)
    slot.started(1001, 110.0, count_start=False)
    assert slot.state is S.RUNNING and list(slot.start_times) == [100.0]


def test_a_worker_stopping_already_keeps_its_earlier_sigkill_time() -> None:
    slot = running()
    slot.stopping(StopReason.RECYCLED, "recycled", kill_at=115.0)
    slot.stopping(StopReason.SHUTDOWN, "fleet stopping", kill_at=130.0)
    assert slot.kill_at == 115.0 and slot.stopping_for is StopReason.SHUTDOWN


def test_the_fleet_stopping_ends_a_backoff_and_the_summary_says_so() -> None:
    slots = [running(), running(name="x")]
    slots[1].exited(CRASH, 101.0, RNG)
    assert summary(slots, stopping=False) == "1 running, 1 in backoff, 0 failed"
    slots[1].shut_down()
    slots[0].stopping(StopReason.SHUTDOWN, "fleet stopping", kill_at=120.0)
    assert slots[1].state is S.STOPPED and slots[1].due is None
    assert summary(slots, stopping=True) == "stopping: 1 left; 0 running, 0 in backoff, 0 failed"


def test_a_waiting_slot_shows_why_starts_without_it_and_a_stop_leaves_it_stopped() -> None:
    fleet = Fleet("f", [Worker("db", work), Worker("web", work, replicas=2)])
    db, web, web1 = slots_for(fleet)
    web.wait("waiting for db")
    web1.wait("waiting for db")
    record = web.status(100.0)
    assert (record["state"], record["pid"], record["reason"]) == ("waiting", None,
                                                                  "waiting for db")
    assert summary([db, web, web1], stopping=False) == ("0 running, 0 in backoff, 0 failed, "
                                                        "2 waiting")
    web.started(1001, 101.0, count_start=True)
    assert web.state is S.RUNNING and web.reason is None and web.restarts == 0
    web1.shut_down()
    assert web1.state is S.STOPPED and web1.pid is None


def test_status_shows_a_worker_that_has_not_beaten_yet_as_starting() -> None:
    slot = running(timeout=5.0)
    assert slot.status(101.0, last_beat=100.0)["state"] == "starting"  # the fork's own
    record = slot.status(101.0, last_beat=100.5, wall_now=5000.0)
    assert record["state"] == "running" and record["uptime"] == 1.0 and record["pid"] == 1000
    assert record["heartbeat_age"] == 0.5 and record["started"] == 4999.0
    assert slot.status(101.0)["heartbeat_age"] is None  # no timeout: no heartbeat to age


def test_status_counts_recycles_by_kind_and_gives_the_last_exit_as_numbers() -> None:
    slot = running()
    slot.stopping(StopReason.AGED, "aged", kill_at=110.0)
    slot.stopping(StopReason.RECYCLED, "over memory too", kill_at=110.0)  # the same stop
    assert slot.exited(ExitStatus(signal=15), 101.0, RNG) is Next.START
    slot.started(1001, 101.0, count_start=False)
    slot.stopping(StopReason.ROLLING_RESTART, "rolling restart", kill_at=110.0)
    slot.exited(ExitStatus(code=3), 102.0, RNG)
    record = slot.status(102.0)
    assert record["recycles"] == {"age": 1, "heartbeat": 0, "memory": 0, "reload": 1}
    assert (record["exit_code"], record["exit_signal"], record["started"]) == (3, None, None)
    slot.started(1002, 103.0, count_start=False)
    slot.stopping(StopReason.SHUTDOWN, "fleet stopping", kill_at=110.0)
    slot.exited(ExitStatus(signal=9), 104.0, RNG)
    record = slot.status(104.0)
    assert (record["exit_code"], record["exit_signal"]) == (None, 9)
    assert record["recycles"] == {"age": 1, "heartbeat": 0, "memory": 0, "reload": 1}


# -- the watches' deadlines and what they ask for --------------------------------------------


def test_slot_timers_start_what_is_due_and_kill_what_outstayed_its_grace() -> None:
    waiting, stopping = running(), running(name="x")
    waiting.exited(CRASH, 100.0, RNG)  # due at 101
    stopping.stopping(StopReason.RECYCLED, "recycled", kill_at=102.0)
    timers = SlotTimers([waiting, stopping], grace=2.0)
    assert timers.next_deadline() == 101.0
    assert timers.due(100.9) == []
    assert timers.due(101.0) == [Start(waiting)]
    assert timers.due(102.0)[-1] == Kill(stopping, " 2s after SIGTERM")
    stopping.stopping_for = StopReason.SHUTDOWN
    assert timers.due(102.0)[-1] == Kill(stopping, ", grace period of 2s over")


def test_the_heartbeat_watch_stops_a_silent_worker_only_after_its_timeout() -> None:
    slot = running(timeout=4.0)
    watch = HeartbeatWatch([slot])
    watch.open()
    try:
        assert watch.arm(slot, 100.0) is not None  # the fork counts as a beat
        assert watch.next_deadline() == 104.0
        assert watch.due(103.9) == []
        assert watch.last_beat(slot) == 100.0
        assert watch.table is not None and slot.cell is not None
        watch.table.reset(slot.cell, 102.0)  # a beat, as the child's heartbeat() writes
        assert watch.last_beat(slot) == 102.0 and watch.next_deadline() == 106.0
        [stop] = watch.due(106.5)
        assert stop == Stop(slot, StopReason.HUNG, "no heartbeat for 4.5s (timeout 4s)")
        watch.release(slot)
        assert slot.cell is None and watch.next_deadline() is None
    finally:
        watch.close()


@pytest.mark.parametrize("make", [
    lambda: SlotTimers([], grace=3_000_000),  # OverflowError in select() at the stop
    lambda: SlotTimers([], grace=float("inf")),
    lambda: MemoryWatch([], None, interval=1e10),
    lambda: MemoryWatch([], None, interval=0),
])
def test_the_watches_refuse_a_duration_past_a_week_or_none(make: Callable[[], object]) -> None:
    with pytest.raises(FleetError, match=r"must be a number of seconds .* at most 604800"):
        make()


class _FakeUss:
    """Stands in for prefork.memory.measure: each pid's USS is what the test sets."""

    def __init__(self) -> None:
        self.uss: dict[int, int] = {}

    def __call__(self, pid: int) -> SimpleNamespace:
        return SimpleNamespace(uss=self.uss[pid])


def test_a_worker_over_its_memory_limit_from_every_start_ends_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    uss = _FakeUss()
    monkeypatch.setattr("prefork.watches.measure", uss)
    slot = running(limit=StartLimit(burst=2, interval=60.0), max_private_memory=20 * MIB)
    watch = MemoryWatch([slot], None, interval=1.0)
    watch.start(100.0)
    uss.uss[1000] = 40 * MIB  # over from its first check
    assert watch.due(101.0) == []  # over once: not yet
    [stop] = watch.due(102.0)
    assert stop == Stop(slot, StopReason.RECYCLED, "recycled: private memory 40 MiB > 20 MiB")
    slot.stopping(stop.reason, stop.detail, kill_at=120.0)
    assert slot.exited(TERMINATED, 102.5, RNG) is Next.START
    slot.started(1001, 102.5, count_start=False)
    uss.uss[1001] = 41 * MIB  # the replacement is over its limit at once too
    assert watch.due(103.0) == []
    [stop] = watch.due(104.0)
    assert stop == Stop(slot, StopReason.OVER_MEMORY,
                        "private memory 41 MiB > 20 MiB at every check of 2 runs in a row")
    slot.stopping(stop.reason, stop.detail, kill_at=124.0)
    assert slot.exited(TERMINATED, 104.5, RNG) is Next.NOTHING
    assert slot.state is S.FAILED and slot.reason == stop.detail


def test_a_worker_that_was_under_its_memory_limit_first_is_recycled_as_often_as_it_leaks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    uss = _FakeUss()
    monkeypatch.setattr("prefork.watches.measure", uss)
    slot = running(limit=StartLimit(burst=1, interval=60.0), max_private_memory=20 * MIB)
    watch = MemoryWatch([slot], None, interval=1.0)
    watch.start(100.0)
    for run in range(3):
        pid = 1000 + run
        uss.uss[pid] = 10 * MIB
        assert watch.due(101.0 + 3 * run) == []  # under its limit: then it leaks
        uss.uss[pid] = 30 * MIB
        assert watch.due(102.0 + 3 * run) == []
        [stop] = watch.due(103.0 + 3 * run)
        assert stop.reason is StopReason.RECYCLED
        slot.stopping(stop.reason, stop.detail, kill_at=200.0)
        assert slot.exited(TERMINATED, 103.5 + 3 * run, RNG) is Next.START
        slot.started(pid + 1, 103.5 + 3 * run, count_start=False)


def test_a_rolling_restart_replaces_one_worker_at_a_time(caplog: pytest.LogCaptureFixture) -> None:
    slots = [running(name=n) for n in ("a", "b", "c")]
    slots[2].exited(CRASH, 1.0, RNG)  # c is in backoff: it starts from the same floor when due
    rolling = RollingRestart(slots)
    assert rolling.begin() == 3
    assert rolling.begin() == 3  # a second SIGHUP queues nothing twice
    for slot in slots[:2]:
        assert rolling.due(0.0) == [Stop(slot, StopReason.ROLLING_RESTART, "rolling restart")]
        slot.stopping(StopReason.ROLLING_RESTART, "rolling restart", kill_at=10.0)
        assert rolling.due(1.0) == []  # not back yet: the next one waits
        assert slot.exited(TERMINATED, 2.0, RNG) is Next.START
        slot.started(2000, 2.0, count_start=False)
    with caplog.at_level("INFO", logger="prefork"):
        assert rolling.due(3.0) == []
    assert [r.getMessage() for r in caplog.records] == ["rolling restart done"]
    assert rolling.next_deadline() is None and slots[2].state is S.BACKOFF


# -- scaling ---------------------------------------------------------------------------------


def test_scaling_up_adds_the_lowest_free_replica_and_stops_at_the_maximum() -> None:
    fleet = Fleet("f", [Worker("w", work, replicas=2, max_replicas=3)])
    slots = slots_for(fleet)
    done, [add] = plan_scale(fleet, slots, "w", 1)
    assert isinstance(add, Add) and add.slot.replica == 2
    assert done == "worker w: 3 replicas, started w.2"
    slots.append(add.slot)
    with pytest.raises(ValueError, match=r"^worker w already runs 3 replicas \(max_replicas 3\)$"):
        plan_scale(fleet, slots, "w", 1)


def test_scaling_down_stops_the_highest_replica_and_never_the_last() -> None:
    fleet = Fleet("f", [Worker("w", work, replicas=2, max_replicas=3)])
    slots = slots_for(fleet)
    for slot in slots:
        slot.started(1000 + slot.replica, 1.0, count_start=True)
    done, [stop] = plan_scale(fleet, slots, "w", -1)
    assert stop == Stop(slots[1], StopReason.SCALED_DOWN, "scaled down")
    assert done == "worker w: 1 replicas, stopping w.1"
    slots[1].stopping(StopReason.SCALED_DOWN, "scaled down", kill_at=5.0)
    assert replicas(slots, "w") == [slots[0]]
    with pytest.raises(ValueError, match=r"^worker w runs 1 replica, the fewest it can$"):
        plan_scale(fleet, slots, "w", -1)


def test_scaling_down_a_replica_in_backoff_removes_it_and_one_stopping_is_not_replaced() -> None:
    fleet = Fleet("f", [Worker("w", work, replicas=3, max_replicas=3)])
    slots = slots_for(fleet)
    for slot in slots:
        slot.started(1000 + slot.replica, 1.0, count_start=True)
    slots[2].exited(CRASH, 2.0, RNG)
    assert plan_scale(fleet, slots, "w", -1)[1] == [Remove(slots[2])]
    slots.remove(slots[2])
    slots[1].stopping(StopReason.RECYCLED, "recycled: private memory 9 MiB > 8 MiB", 9.0)
    [stop] = plan_scale(fleet, slots, "w", -1)[1]
    assert stop.reason is StopReason.SCALED_DOWN
    assert stop.detail == "recycled: private memory 9 MiB > 8 MiB"


def test_a_replica_scaled_down_counts_until_it_has_exited() -> None:
    """Its process and its heartbeat cell are there until it exits: scaling up again in
    its grace period must not take the fleet past what validation allowed."""
    fleet = Fleet("f", [Worker("w", work, replicas=2, max_replicas=3)])
    slots = slots_for(fleet)
    for slot in slots:
        slot.started(1000 + slot.replica, 1.0, count_start=True)
    [stop] = plan_scale(fleet, slots, "w", -1)[1]
    slots[1].stopping(StopReason.SCALED_DOWN, stop.detail, kill_at=20.0)
    done, [add] = plan_scale(fleet, slots, "w", 1)  # 2 processes: one more fits
    assert add.slot.replica == 2 and done == "worker w: 2 replicas, started w.2"
    slots.append(add.slot)
    with pytest.raises(ValueError) as caught:
        plan_scale(fleet, slots, "w", 1)
    assert str(caught.value) == ("worker w is at max_replicas 3 until the replicas scaled "
                                 "down exit (w.1)")


@pytest.mark.parametrize(("name", "delta", "message"), [
    ("nobody", 1, "no worker named 'nobody'"),
    ("fixed", 1, "worker fixed has a fixed number of replicas (no max_replicas)"),
    ("w", 2, "scale by +1 or -1, not 2"),
    ("w", True, "scale by +1 or -1, not True"),
])
def test_scaling_refuses_in_one_line(name: str, delta: int, message: str) -> None:
    fleet = Fleet("f", [Worker("w", work, max_replicas=2), Worker("fixed", work)])
    with pytest.raises(ValueError) as caught:
        plan_scale(fleet, slots_for(fleet), name, delta)
    assert str(caught.value) == message


class Draws(random.Random):
    """Draws ``value`` every time."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def aging(replicas: int = 3, *, max_age: float | None = 10.0,
          jitter: float | None = 0.0) -> list[Slot]:
    fleet = Fleet("f", [Worker("w", work, replicas=replicas, max_age=max_age,
                               max_age_jitter=jitter)])
    slots = slots_for(fleet)
    for number, slot in enumerate(slots):
        slot.started(1000 + number, 100.0, count_start=True)
    return slots


def test_aged_workers_are_replaced_one_at_a_time() -> None:
    slots = aging()
    watch = AgeWatch(slots, None, RNG)
    assert watch.next_deadline() == 110.0
    assert watch.due(109.9) == []
    [stop] = watch.due(110.0)
    assert stop == Stop(slots[0], StopReason.AGED, "recycled: older than 10s (max_age)")
    slots[0].stopping(stop.reason, stop.detail, kill_at=125.0)
    assert watch.next_deadline() is None  # woken by the reap and the fork, not a clock
    assert watch.due(111.0) == []  # two more are due, but one is being replaced
    assert slots[0].exited(TERMINATED, 111.0, RNG) is Next.START
    slots[0].started(2000, 111.0, count_start=False)
    [stop] = watch.due(111.0)
    assert stop.slot is slots[1]
    assert watch.next_deadline() == 110.0  # slots[2]'s, overdue: it goes next


def test_each_run_draws_its_own_jitter_up_to_a_tenth_by_default() -> None:
    slots = aging(1, jitter=None)
    watch = AgeWatch(slots, None, Draws(0.5))
    assert watch.next_deadline() == 100.0 + 10.0 + 0.5
    slots[0].stopping(StopReason.AGED, "aged", kill_at=130.0)
    slots[0].exited(TERMINATED, 120.0, RNG)
    slots[0].started(2000, 120.0, count_start=False)
    watch._rng = Draws(0.25)
    assert watch.next_deadline() == 120.0 + 10.0 + 0.25


def test_ageing_waits_while_another_worker_is_recycled_for_its_memory() -> None:
    slots = aging(2)
    watch = AgeWatch(slots, None, RNG)
    slots[1].stopping(StopReason.RECYCLED, "recycled: private memory", kill_at=130.0)
    assert watch.due(200.0) == []
    slots[1].stopping(StopReason.HUNG, "hung", kill_at=130.0)  # not a replacement
    assert [a.slot for a in watch.due(200.0)] == [slots[0]]


def test_the_fleets_max_age_is_the_default_and_none_costs_nothing() -> None:
    slots = aging(1, max_age=None, jitter=None)
    assert AgeWatch(slots, None, RNG).next_deadline() is None
    assert AgeWatch(slots, 5.0, Draws(0.5)).next_deadline() == 105.0 + 0.5 * 0.5


@pytest.mark.parametrize(("settings", "message"), [
    ({"max_age": 0}, "worker 'w': max_age must be a number of seconds > 0"),
    ({"max_age": float("inf")}, "worker 'w': max_age must be a number of seconds > 0"),
    ({"max_age": 60, "max_age_jitter": -1},
     "worker 'w': max_age_jitter must be a number of seconds >= 0"),
])
def test_bad_max_age_is_refused_at_load(settings: dict[str, float], message: str) -> None:
    with pytest.raises(FleetError, match=re.escape(message)):
        Fleet("f", [Worker("w", work, **settings)]).validate()  # type: ignore[arg-type]
