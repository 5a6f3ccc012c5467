"""Fleets for operating a live fleet: heartbeats, memory recycling, rolling restart,
scaling and status."""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from fleets.common import bump, emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker, current_worker, heartbeat

MIB = 1024 * 1024
QUICK = Backoff(initial=0.1, factor=2.0, maximum=0.4, jitter=0.0, reset_after=60)
# A floor every child shares: ~30 MiB of objects made at import, in the master.
FLOOR = [str(i) * 8 for i in range(800_000)]
_kept: list[bytearray] = []


def _label() -> str:
    me = current_worker()
    assert me is not None
    return me.label


def beats_then_hangs() -> None:
    """Beat 20 times, 50 ms apart (twice the timeout in all), then hang without beating
    (first start only)."""
    attempt = bump("hanger")
    emit("up", attempt=attempt)
    beats = 20 if attempt == 1 else 10**9
    for _ in range(beats):
        heartbeat()
        emit("beat", attempt=attempt, at=time.monotonic())
        time.sleep(0.05)
    idle_forever()


def hangs_deaf_to_sigterm() -> None:
    """Ignore SIGTERM, beat once, then hang (first start only)."""
    attempt = bump("deaf")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    emit("up", attempt=attempt)
    heartbeat()
    if attempt == 1:
        idle_forever()
    while True:
        heartbeat()
        time.sleep(0.05)


async def async_then_blocks() -> None:
    """Let the event loop beat on its own for 3 timeouts, then block it (first start)."""
    attempt = bump("async-blocker")
    emit("up", attempt=attempt)
    await asyncio.sleep(1.5)
    emit("still-up", attempt=attempt)
    if attempt == 1:
        time.sleep(3600)  # blocks the loop: no more beats
    await asyncio.Event().wait()


def deaf_to_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    emit("up")
    idle_forever()


def grows_private() -> None:
    """On its first start, dirty 40 MiB of its own; later starts stay small."""
    attempt = bump(f"leak-{_label()}")
    if attempt == 1:
        block = bytearray(40 * MIB)
        for offset in range(0, len(block), 4096):
            block[offset] = 1
        _kept.append(block)
    emit("up", attempt=attempt)
    idle_forever()


def shares_the_floor() -> None:
    """Maps the whole large floor, shared, and leaves it alone: its RSS is big, its USS
    small. (Reading every object would not do: on 3.11 each read writes a refcount, and
    the pages it touched become its own.)"""
    emit("up")
    idle_forever()


def graceful() -> None:
    """Report SIGTERM, then leave cleanly."""
    def on_term(signum: int, frame: object) -> None:
        emit("term")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    emit("up")
    idle_forever()


def slow_to_stop() -> None:
    """Report SIGTERM, then take 0.2 s to finish (a batch to flush) and leave cleanly."""
    def on_term(signum: int, frame: object) -> None:
        emit("term")
        time.sleep(0.2)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    emit("up")
    idle_forever()


def crash_soon() -> None:
    emit("up")
    sys.exit(3)


hanging = Fleet("hanging", [Worker("hanger", beats_then_hangs, timeout=0.5),
                            Worker("sleeper", idle_forever)],
                backoff=QUICK, start_limit=StartLimit(interval=0))
deaf = Fleet("deaf", [Worker("deaf", hangs_deaf_to_sigterm, timeout=0.3)],
             backoff=QUICK, start_limit=StartLimit(interval=0))
async_hanging = Fleet("async-hanging", [Worker("blocker", async_then_blocks, timeout=0.5)],
                      backoff=QUICK, start_limit=StartLimit(interval=0))
leaking = Fleet("leaking", [Worker("leaker", grows_private, replicas=2,
                                   max_private_memory=20 * MIB),
                            Worker("reader", shares_the_floor, max_private_memory=20 * MIB)])
rolling = Fleet("rolling", [Worker("a", graceful), Worker("b", graceful, replicas=2),
                            Worker("c", graceful)])
scalable = Fleet("scalable", [Worker("w", graceful, max_replicas=3), Worker("fixed", graceful)])
# Each takes 0.2 s to stop, so the others come of age while one is being replaced.
aging = Fleet("aging", [Worker("a", slow_to_stop, replicas=3, max_age=0.3,
                               max_age_jitter=0.05)])
# Its stop lasts the grace period: "deaf" ignores SIGTERM.
stalling = Fleet("stalling", [Worker("deaf", deaf_to_sigterm), Worker("w", graceful,
                                                                      max_replicas=3)])
troubled = Fleet("troubled", [
    Worker("steady", idle_forever),
    Worker("crasher", crash_soon, backoff=Backoff(initial=30, maximum=30, jitter=0)),
    Worker("doomed", crash_soon, restart="never"),
])
