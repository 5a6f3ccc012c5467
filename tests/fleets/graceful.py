"""Async workers with clean-up code, for stopping them gracefully (``test_async_stop``).

Each reports ``up`` once its loop runs, then what its clean-up did. Held workers wait in
their clean-up until the test sends them SIGUSR1, so a test can signal them meanwhile.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker


async def tidy() -> None:
    emit("up")
    try:
        await asyncio.Event().wait()
    finally:
        emit("cleaned")


async def flush_then_reraise() -> None:
    emit("up")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)  # a clean-up that needs the loop: flush a batch
        emit("flushed")
        raise


async def flush_then_return() -> None:
    emit("up")
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        await asyncio.sleep(0.05)
        emit("flushed")


async def failing_cleanup() -> None:
    emit("up")
    try:
        await asyncio.Event().wait()
    finally:
        raise RuntimeError("flush failed: batch 42 lost")


async def own_loop_handler() -> None:
    """Stops on its own terms: its SIGTERM handler ends the wait; nothing cancels it."""
    stop = asyncio.Event()

    def on_sigterm() -> None:
        emit("own-handler")
        stop.set()

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, on_sigterm)
    await _wait_for_own_stop(stop)


async def own_signal_handler() -> None:
    """The same with ``signal.signal``, which the event loop does not know about."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigterm(_signum: int, _frame: object) -> None:
        emit("own-handler")
        loop.call_soon_threadsafe(stop.set)  # a signal handler may interrupt the loop

    signal.signal(signal.SIGTERM, on_sigterm)
    await _wait_for_own_stop(stop)


async def _wait_for_own_stop(stop: asyncio.Event) -> None:
    release = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, release.set)
    emit("up")
    try:
        await stop.wait()
        # The test's SIGUSR1 reaches the loop after the SIGTERM did: a cancellation by
        # our handler would have come by then.
        await release.wait()
    except asyncio.CancelledError:
        emit("cancelled")
        raise
    emit("returned")


async def held() -> None:
    """Clean-up that waits for SIGUSR1 from the test, then reports ``cleaned``."""
    release = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, release.set)
    emit("up")
    try:
        await asyncio.Event().wait()
    finally:
        emit("cleaning")
        await release.wait()
        emit("cleaned")


async def leaves_a_thread_blocked() -> None:
    """After the main task ends, asyncio's shutdown waits for this executor thread."""
    asyncio.get_running_loop().run_in_executor(None, _blocked)
    emit("up")
    await asyncio.Event().wait()


def _blocked() -> None:
    while signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:  # until prefork lets go
        time.sleep(0.001)
    emit("released")
    threading.Event().wait()


async def blocks_its_loop() -> None:
    """A hung worker: synchronous code in the coroutine that never yields to the loop."""
    emit("up")
    try:
        time.sleep(3600)
    finally:
        emit("cleaned")  # never: the loop cannot run the cancellation


def plain() -> None:
    emit("up")
    try:
        idle_forever()
    finally:
        emit("cleaned")  # never: SIGTERM kills a plain worker where it stands


tidying = Fleet("tidying", [Worker("tidy", tidy)])
flushing = Fleet("flushing", [Worker("reraise", flush_then_reraise),
                              Worker("swallow", flush_then_return)])
failing = Fleet("failing", [Worker("failing", failing_cleanup)])
own_handlers = Fleet("own_handlers", [Worker("loop", own_loop_handler),
                                      Worker("signal", own_signal_handler)])
plain_and_async = Fleet("plain_and_async", [Worker("plain", plain), Worker("tidy", tidy)])
# "held" before "sleeper": the master signals workers in this order, so once it logs
# sleeper's SIGTERM, held's has been sent.
holding = Fleet("holding", [Worker("held", held), Worker("sleeper", plain)])
blocking = Fleet("blocking", [Worker("blocking", leaves_a_thread_blocked)], restart="never")
holding_never = Fleet("holding_never", [Worker("held", held)], restart="never")
blocked = Fleet("blocked", [Worker("blocked", blocks_its_loop)], restart="never")
