"""Restart policy as pure functions of times, counts and exit statuses.

Nothing here forks, sleeps or reads a clock: the master passes ``now`` in, and tests
check every rule without a process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

from prefork.fleet import Backoff, RestartPolicy, StartLimit
from prefork.signals import signal_name


@dataclass(frozen=True)
class ExitStatus:
    """How a child ended: an exit ``code``, or the ``signal`` that killed it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        if os.WIFSIGNALED(status):
            return cls(signal=os.WTERMSIG(status))
        return cls(code=os.waitstatus_to_exitcode(status))

    @property
    def failed(self) -> bool:
        """Any signal or a non-zero code is a failure (supervisord's view, not systemd's)."""
        return self.signal is not None or self.code != 0

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        return f"exit code {self.code}"


def should_restart(policy: RestartPolicy, status: ExitStatus) -> bool:
    """systemd's ``Restart=`` semantics for the three policies a fleet may name."""
    if policy == "always":
        return True
    if policy == "on-failure":
        return status.failed
    return False


def backoff_delay(attempt: int, backoff: Backoff, spread: float) -> float:
    """Seconds before restart number ``attempt`` (1 for the first after a healthy run).

    ``spread`` in [0, 1) picks how much of the jitter to take off; the master draws it at
    random, tests pass it. The result is never above ``backoff.maximum``.
    """
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if not 0 <= spread < 1:
        raise ValueError(f"spread must be in [0, 1), got {spread}")
    initial, factor, maximum = backoff.initial, backoff.factor, backoff.maximum
    if initial <= 0 or factor == 1 or initial >= maximum:
        nominal = min(initial, maximum)
    elif (attempt - 1) * math.log(factor) >= math.log(maximum) - math.log(initial):
        # Decided on logarithms, in constant time for any attempt: a power past the cap
        # could overflow a float (factor 1e200 at the third attempt, 2.0 near the 1025th).
        nominal = maximum
    else:
        try:
            nominal = min(maximum, initial * factor ** (attempt - 1))
        except OverflowError:  # below the cap, from a subnormal initial: the same in logs
            nominal = min(maximum, math.exp(math.log(initial) + (attempt - 1) * math.log(factor)))
    return nominal * (1.0 - backoff.jitter * spread)


def is_stable_run(uptime: float, backoff: Backoff) -> bool:
    """A child that stayed up ``reset_after`` seconds resets its worker's backoff."""
    return uptime >= backoff.reset_after


def exceeds_start_limit(start_times: Iterable[float], next_start: float,
                        limit: StartLimit) -> bool:
    """Would starting again at ``next_start`` make more than ``limit.burst`` starts within
    the ``limit.interval`` seconds that end there? ``interval == 0`` never limits."""
    if limit.interval == 0:
        return False
    window_start = next_start - limit.interval
    recent = sum(1 for t in start_times if t > window_start)
    return recent + 1 > limit.burst


def over_memory_limit(uss: int, limit: int, over_since: float | None, now: float,
                      hold: float) -> tuple[float | None, bool]:
    """One memory check of a worker: ``(over_since, recycle)``.

    ``over_since`` is when its USS was first seen above ``limit`` in the current run of
    checks (``None`` once it is back under). It is recycled only when it *stays* above for
    ``hold`` seconds, so one allocation spike in a batch does not restart it.
    """
    if uss <= limit:
        return None, False
    since = now if over_since is None else over_since
    return since, now - since >= hold


def memory_recycle_verdict(runs_over: int, seen_under: bool,
                           limit: StartLimit) -> tuple[int, bool]:
    """A worker is to be recycled for its private memory: ``(runs_over, fail)``.

    ``runs_over`` counts the runs in a row that were over the limit at every check
    (``seen_under``: this one was once under it). At ``limit.burst`` such runs the worker
    is failed, not recycled again: it is over its limit from its start, and a new one from
    the same floor will be too. Recycles do not count in the start limit's window: each
    takes two memory checks at least (20 s by default), so 5 in 60 s could never happen.
    ``limit.interval == 0`` (no start limit) recycles it for ever.
    """
    runs = 0 if seen_under else runs_over + 1
    return runs, limit.interval != 0 and runs >= limit.burst


def age_deadline(started_at: float, max_age: float, jitter: float | None,
                 draw: float) -> float:
    """When a run started at ``started_at`` is due to be replaced for its age: after
    ``max_age`` plus ``draw`` (uniform in [0, 1)) times the jitter, a tenth of ``max_age``
    unless given (gunicorn's ``max_requests_jitter``, circus's ``max_age_variance``)."""
    spread = max_age / 10 if jitter is None else jitter
    return started_at + max_age + draw * spread


def next_replica(taken: Iterable[int]) -> int:
    """The lowest replica number not in use: a fleet scaled down then up reuses names."""
    used = set(taken)
    return next(n for n in range(len(used) + 1) if n not in used)


def is_scale_delta(value: object) -> bool:
    """A replica count moves by +1 or -1 at a time, nothing else (and a bool is no number)."""
    return isinstance(value, int) and not isinstance(value, bool) and value in (1, -1)
