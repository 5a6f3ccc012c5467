"""Kernels on a Dask cluster: what ``run_kernel`` does in a fleet run with ``--offload``.

``prefork run --offload tcp://HOST:PORT`` (or ``Fleet(offload=...)``): each worker opens
its own asynchronous ``distributed.Client`` on its event loop, at its first
:func:`prefork.offload.run_kernel` call: after the fork, never in the master (a client has
connections and may have threads, which a fork would copy half-made). The master imports
``distributed`` before it forks, so the workers share its 0.6 s and its pages.

The scheduler unreachable, at the first call or later: one warning in the worker's log,
and the call runs locally - in the fleet's kernel pool if it has one, else inline - or,
with ``--offload-fallback error``, raises :class:`prefork.offload.KernelError`. The first
call waits for the first connection (:data:`CONNECT_TIMEOUT` at most); after a failure a
call tries again in the background once :data:`RETRY_INTERVAL` has passed, and calls
meanwhile run locally at once, so submissions resume soon after the scheduler is back.
A call whose connection breaks while the cluster runs it runs locally too (a kernel is a
function of its arguments: running it again gives the same result).
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import time
from typing import Any, Literal

from prefork.fleet import FleetError, exception_line

log = logging.getLogger("prefork")

Fallback = Literal["local", "error"]
FALLBACKS: tuple[Fallback, ...] = ("local", "error")
# Seconds a connection to the scheduler may take: only the first call waits for it, so
# short; a scheduler that answers later is found by the next try.
CONNECT_TIMEOUT = 2.0
RETRY_INTERVAL = 5.0  # seconds after a failed connection before the next call tries again


class Unreachable(Exception):
    """The scheduler cannot be reached now. ``str()`` is one line."""


def import_distributed() -> None:
    """Import Dask's client in the master, before any fork, so every worker shares it.
    Raises FleetError (one line) when the dask extra is not installed."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise FleetError("--offload needs Dask: pip install 'prefork[dask]'") from None


class DaskOffload:
    """One worker's way to the cluster: its client, made at its first call."""

    def __init__(self, address: str, fallback: Fallback) -> None:
        self.address = address
        self.fallback = fallback
        self._master = os.getpid()  # made in the master: its own calls never offload
        self._client: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._tried = False  # the first connection was tried (and waited for)
        self._retry_at = 0.0
        self._warned = False  # about this outage

    @property
    def usable(self) -> bool:
        return os.getpid() != self._master

    async def submit(self, call: bytes) -> Any:
        """The pickled ``(fn, args)`` ``call`` run on the cluster: its result. Raises
        :class:`Unreachable` when it cannot be reached now (the caller runs it locally or
        fails, as ``fallback`` says)."""
        client = await self._connected()
        try:
            # One opaque bytes argument: Dask walks the arguments it is given, looking for
            # futures to wait for (0.5 s for 100,000 tuples); bytes it sends as they are.
            future = client.submit(run_pickled, call, pure=False)
        except Exception as exc:  # the client closed between our check and the submit
            raise self._lost(exc) from None
        try:
            return pickle.loads(await future)
        except (TimeoutError, OSError) as exc:
            raise self._lost(exc) from None
        except Exception as exc:
            if _is_cluster_failure(exc):
                raise self._lost(exc) from None
            raise  # the kernel's own exception, as it would be raised locally

    async def _connected(self) -> Any:
        """The client, connected; raises Unreachable while there is none. The first call
        waits for the first connection (a few ms to a scheduler that is up); after a
        failure, the next try runs in the background when it is due, and calls meanwhile
        run locally at once instead of waiting for it."""
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and (self._loop is not loop
                                   or client.status not in ("running", "connecting")):
            self._client = None
            await _close_quietly(client)
        if self._client is not None:
            return self._client
        if self._connecting is None and time.monotonic() >= self._retry_at:
            self._connecting = loop.create_task(self._connect(loop))
        if self._connecting is not None and not self._tried:
            self._tried = True
            await asyncio.shield(self._connecting)
        if self._client is not None:
            return self._client
        raise Unreachable(f"scheduler {self.address} unreachable")

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        from distributed import Client

        try:
            client = await Client(self.address, asynchronous=True, timeout=CONNECT_TIMEOUT,
                                  set_as_default=False)
        except Exception as exc:  # refused, timed out, resolved to nothing
            self._lost(exc)
        else:
            self._client, self._loop = client, loop
            if self._warned:
                log.warning("offload: scheduler %s reached again: kernels go to the cluster",
                            self.address)
                self._warned = False
        finally:
            self._connecting = None

    def _lost(self, exc: BaseException) -> Unreachable:
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        where = "fail" if self.fallback == "error" else "run locally"
        if not self._warned:
            self._warned = True
            log.warning("offload: scheduler %s unreachable (%s); kernels %s, and it is "
                        "tried again every %gs", self.address, exception_line(exc), where,
                        RETRY_INTERVAL)
        client, self._client = self._client, None
        if client is not None:
            asyncio.get_running_loop().create_task(_close_quietly(client))
        return Unreachable(f"scheduler {self.address} unreachable: {exception_line(exc)}")


def run_pickled(payload: bytes) -> bytes:
    """What a Dask worker runs for ``run_kernel``: the pickled call, its result pickled."""
    fn, args = pickle.loads(payload)
    return pickle.dumps(fn(*args), protocol=pickle.HIGHEST_PROTOCOL)


def _is_cluster_failure(exc: Exception) -> bool:
    """An exception of Dask's own (a lost connection, a cancelled future), not the
    kernel's."""
    return type(exc).__module__.split(".")[0] == "distributed" or (
        type(exc).__name__ in ("CancelledError", "FutureCancelledError"))


async def _close_quietly(client: Any) -> None:
    try:
        await asyncio.wait_for(client.close(), CONNECT_TIMEOUT)
    except Exception:  # closing what is already gone
        pass

