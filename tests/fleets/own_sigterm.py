"""An application that sets its SIGTERM handler at import, as some frameworks do: the
master puts it back in every child, and prefork must not install its own over it.
(A module of its own: the handler is process-wide.)"""

from __future__ import annotations

import asyncio
import signal

from fleets.common import emit
from prefork import Fleet, Worker

_stop: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None


def _on_sigterm(_signum: int, _frame: object) -> None:
    emit("own-handler")
    if _stop is not None:
        loop, stop = _stop
        loop.call_soon_threadsafe(stop.set)


signal.signal(signal.SIGTERM, _on_sigterm)


async def stops_itself() -> None:
    global _stop
    _stop = (asyncio.get_running_loop(), asyncio.Event())
    emit("up")
    try:
        await _stop[1].wait()
    except asyncio.CancelledError:
        emit("cancelled")
        raise
    emit("returned")


fleet = Fleet("own_sigterm", [Worker("own", stops_itself)])
