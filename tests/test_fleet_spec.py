"""Fleet specs: what a user may write, and the one-line error for what they may not."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest

from prefork import Backoff, Fleet, FleetError, StartLimit, Worker, as_fleet, load_fleet
from prefork.fleet import parse_size

INF = float("inf")
DAY = 86400.0


def work() -> None:
    pass


async def async_work() -> None:
    pass


def test_a_mapping_of_names_to_callables_is_a_fleet() -> None:
    fleet = as_fleet({"a": work, "b": work}, name="jobs")
    assert fleet.name == "jobs"
    assert [w.name for w in fleet.workers] == ["a", "b"]
    assert fleet.restart == "on-failure"


def test_a_list_of_workers_is_a_fleet() -> None:
    fleet = as_fleet([Worker("a", work, replicas=3)], name="jobs")
    assert fleet.workers[0].replicas == 3


def test_async_targets_are_wrapped_to_run_in_a_fresh_loop() -> None:
    worker = Worker("a", async_work)
    assert worker.target() is None  # ran to completion in its own asyncio.run()


@pytest.mark.parametrize(("obj", "message"), [
    (42, "is a int, not a fleet"),
    ({}, "has no workers"),
    ({"w": 17}, "17 is not callable"),
    ({"w": lambda x: None}, "takes arguments"),
    ({"has space": work}, "must be letters"),
    (Fleet("f", [Worker("w", work, replicas=0)]), "replicas must be an integer >= 1"),
    (Fleet("f", [Worker("w", work, replicas=True)]), "replicas must be an integer >= 1"),
    (Fleet("f", [Worker("w", work, restart="sometimes")]), "restart must be one of"),  # type: ignore[arg-type]
    (Fleet("f", [Worker("w", work), Worker("w", work)]), "two workers are named 'w'"),
    (Fleet("f", [work]), "is not a prefork.Worker"),  # type: ignore[list-item]
    (Fleet("f", [Worker("w", work)], backoff=Backoff(initial=-1)), "initial must be"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(factor=0.5)), "factor must be"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(jitter=1.0)), "jitter must be"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(maximum=float("nan"))), "maximum must be"),
    (Fleet("f", [Worker("w", work)], start_limit=StartLimit(burst=0)), "burst must be"),
    (Fleet("f", [Worker("w", work, start_limit=StartLimit(interval=-2))]), "interval must be"),
    ({"w": Worker("v", work)}, "filed under the key"),
    (Fleet("f", [Worker("w", work)], post_fork=42),  # type: ignore[arg-type]
     "fleet 'f': post_fork: 42 is not callable"),
    (Fleet("f", [Worker("w", work)], pre_fork=work),
     "fleet 'f': pre_fork: work must take 1 positional argument (worker)"),
    (Fleet("f", [Worker("w", work)], worker_exit=lambda w: None),
     "worker_exit: <lambda> must take 2 positional arguments (worker, status)"),
    (Fleet("f", [Worker("w", work)], on_exit=lambda a, b: None),
     "on_exit: <lambda> must take 1 positional argument (fleet)"),
    # Every duration is finite and at most a week; a count of workers at most 1,024.
    (Fleet("f", [Worker("w", work)], backoff=Backoff(initial=INF)), "initial must be"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(maximum=INF)), "maximum must be"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(reset_after=8 * DAY)), "reset_after must"),
    (Fleet("f", [Worker("w", work)], backoff=Backoff(factor=INF)), "factor must be a finite"),
    (Fleet("f", [Worker("w", work, backoff=Backoff(initial=1e10))]),
     "worker 'w': backoff initial must be a number of seconds >= 0 and at most 604800"),
    (Fleet("f", [Worker("w", work)], start_limit=StartLimit(interval=INF)), "interval must be"),
    (Fleet("f", [Worker("w", work, timeout=INF)]), "timeout must be a number of seconds > 0"),
    (Fleet("f", [Worker("w", work, timeout=3e6)]), "at most 604800 (7 days), got 3000000.0"),
    (Fleet("f", [Worker("w", work, replicas=10**9)]), "replicas must be an integer >= 1 and "
                                                      "at most 1024, got 1000000000"),
    (Fleet("f", [Worker("w", work, max_replicas=10**9)]), "max_replicas must be an integer"),
    (Fleet("f", [Worker("a", work, max_replicas=1000), Worker("b", work, replicas=10),
                 Worker("c", work, replicas=2, max_replicas=15)]),
     "fleet 'f' may run 1025 worker processes"),
])
def test_invalid_fleets_raise_one_line(obj: object, message: str) -> None:
    with pytest.raises(FleetError) as caught:
        as_fleet(obj, name="f")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("spec", "message"), [
    ("nosuchfleet", "unknown fleet 'nosuchfleet' (known: "),
    ("no_such_module_xyz:fleet", "fleet module 'no_such_module_xyz' not found"),
    ("fleets.basic:nope", "has no attribute 'nope'"),
    ("fleets.broken_import:fleet", "RuntimeError: database URL is not set (at "),
    ("fleets.odd_import:fleet", "failed to import: Unusual: the floor gave up (at "),
    ("fleets.unreadable:fleet", "cannot be read: RuntimeError: the worker table is not "),
    (":fleet", "must look like package.module:ATTR"),
])
def test_load_fleet_errors_name_the_problem(spec: str, message: str) -> None:
    with pytest.raises(FleetError) as caught:
        load_fleet(spec)
    assert message in str(caught.value)


def test_the_limits_themselves_are_allowed() -> None:
    week = 7 * DAY
    fleet = as_fleet(Fleet("f", [Worker("a", work, timeout=week, max_replicas=1000),
                                 Worker("b", work, replicas=24)],
                           backoff=Backoff(initial=week, maximum=week, reset_after=week),
                           start_limit=StartLimit(interval=week)), name="f")
    assert sum(w.max_replicas or w.replicas for w in fleet.workers) == 1024


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no")


class _Raising(Mapping[str, object]):
    """A mapping whose ``items()`` raises ``error``."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __getitem__(self, key: str) -> object:
        return work

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[str]:
        return iter(["w"])

    def items(self):  # type: ignore[override]
        raise self.error


@pytest.mark.parametrize(("error", "message"), [
    (RuntimeError("not\nloaded"), "fleet 'f' cannot be read: RuntimeError: not loaded (at "),
    (SystemExit(3), "fleet 'f' cannot be read: SystemExit: 3 (at "),
    (GeneratorExit(), "fleet 'f' cannot be read: GeneratorExit (at "),
    (_Unprintable(), "_Unprintable: (its message cannot be shown) (at "),
])
def test_a_mapping_whose_items_raise_is_one_line(error: BaseException, message: str) -> None:
    with pytest.raises(FleetError) as caught:
        as_fleet(_Raising(error), name="f")
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_ctrl_c_while_a_fleet_is_read_is_still_ctrl_c() -> None:
    with pytest.raises(KeyboardInterrupt):
        as_fleet(_Raising(KeyboardInterrupt()), name="f")
    with pytest.raises(KeyboardInterrupt):
        load_fleet("fleets.interrupted_import:fleet")


def test_registered_fleet_loads_by_name() -> None:
    fleet = load_fleet("demo")
    assert fleet.name == "demo"
    assert {w.name for w in fleet.workers} == {"clock", "primes", "flaky"}


def test_module_attr_fleet_is_named_after_its_spec_when_it_has_no_name() -> None:
    assert load_fleet("fleets.basic:one_sleeper").name == "fleets.basic.one_sleeper"
    assert load_fleet("fleets.basic:sleepers").name == "sleepers"


@pytest.mark.parametrize(("text", "size"), [
    ("4096", 4096), ("512M", 512 * 2**20), ("512MiB", 512 * 2**20), ("1.5G", 3 * 2**29),
    ("64k", 64 * 1024), (" 2 T ", 2 * 2**40),
])
def test_sizes_read_like_systemds(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "-1M", "0", "1.5.2G", "12P"])
def test_bad_sizes_are_refused_in_one_line(text: str) -> None:
    with pytest.raises(ValueError, match=r"is not a size|must be more than 0 bytes"):
        parse_size(text)
