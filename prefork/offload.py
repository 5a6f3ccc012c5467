"""``run_kernel``: run a heavy function on the fleet's Dask cluster, in its kernel pool, or
inline.

With ``--offload`` (:mod:`prefork.dask_offload`) a call goes to the Dask cluster first,
and runs locally (pool or inline) when the cluster cannot be reached.

In a worker of a fleet run with a kernel pool (``prefork run --kernel-workers N``,
``Fleet(kernel_workers=N)``; :mod:`prefork.kernel_pool`) the call goes to a free kernel
process and the worker's event loop goes on meanwhile; anywhere else (tests, a worker run
by hand, ``offload_if`` false) the function runs inline, as if called directly. Same
call, same result either way.

A kernel process that dies mid-kernel (SIGKILL, out of memory) raises
:class:`KernelLost` in the caller. The call is not retried: a kernel that killed its
process once would likely do it again, and taking a whole second process down with it is
worse than one clear exception the worker can handle. The master restarts the kernel
process on its backoff; until then the pool's other processes take the calls, and calls
wait in the socket's queue while none is up.
"""

from __future__ import annotations

import asyncio
import importlib
import pickle
from collections.abc import Callable
from typing import Any, TypeVar

from prefork import kernel_pool
from prefork.dask_offload import DaskOffload, Unreachable
from prefork.kernel_pool import ANSWER, LENGTH, PID, RAN

T = TypeVar("T")

_cluster: DaskOffload | None = None  # --offload: the Dask cluster (prefork.dask_offload)


class KernelError(Exception):
    """The kernel pool could not run the call. ``str()`` is one line."""


class KernelLost(KernelError):
    """The kernel process died before it answered; the master restarts it."""


async def run_kernel(fn: Callable[..., T], *args: Any, offload_if: bool = True) -> T:
    """``fn(*args)``, when ``offload_if`` holds: on the fleet's Dask cluster if it has one
    (``--offload``), else in a kernel process if it has a pool, else here. ``fn`` must be
    importable by reference (a module-level function): a lambda, a closure or a bound
    method raises TypeError, pool or not. An exception ``fn`` raises in a kernel process
    is raised here, with the kernel's traceback as a note; :class:`KernelLost` if the
    kernel process died first, :class:`KernelError` if the arguments cannot be pickled,
    there is no pool to reach, or the cluster cannot be reached with
    ``--offload-fallback error``."""
    check_by_reference(fn)
    if not offload_if:
        return fn(*args)
    if _cluster is not None and _cluster.usable:
        try:
            return await _cluster.submit(_pickled(fn, args))  # type: ignore[no-any-return]
        except Unreachable as exc:
            if _cluster.fallback == "error":
                raise KernelError(f"kernel {_name(fn)}: {exc}") from None
    where = kernel_pool.address()
    if where is None:
        return fn(*args)
    return await _call(where, fn, args)


def use_cluster(cluster: DaskOffload | None) -> None:
    """Send every ``run_kernel`` of this process's future children to ``cluster`` (the
    master calls it before its first fork, for ``--offload``)."""
    global _cluster
    _cluster = cluster


def check_by_reference(fn: object) -> None:
    """Raise TypeError unless ``fn`` is found again by its module and qualified name,
    which is how a kernel process is told what to run."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not callable(fn) or not isinstance(module, str) or not isinstance(qualname, str):
        raise TypeError(f"run_kernel: {fn!r} is not a function")
    found: object = None
    if "<" not in qualname:  # <lambda>, <locals>
        try:
            found = importlib.import_module(module)
            for part in qualname.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            found = None
    if found is not fn:
        raise TypeError(f"run_kernel: {module}.{qualname} cannot be found by its name in "
                        "another process; pass a function defined at a module's top level")


def _name(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def _pickled(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The call as the pool and the cluster take it; KernelError if it cannot be pickled
    (the caller's arguments, not a fault of where it was to run)."""
    try:
        return pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise KernelError(f"kernel {_name(fn)}: its arguments cannot be pickled: {exc}"
                          ) from None


async def _call(where: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    name = _name(fn)
    request = _pickled(fn, args)
    try:
        reader, writer = await asyncio.open_unix_connection(where)
    except OSError as exc:
        raise KernelError(f"kernel {name}: no kernel pool at {where} ({exc.strerror or exc}): "
                          "its processes failed, or the master is gone") from None
    pid = None
    try:
        writer.write(LENGTH.pack(len(request)))
        writer.write(request)
        del request  # the transport holds what it has not sent yet
        await writer.drain()
        (pid,) = PID.unpack(await reader.readexactly(PID.size))
        kind, length = ANSWER.unpack(await reader.readexactly(ANSWER.size))
        body = await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        who = "its kernel process" if pid is None else f"kernel process {pid}"
        raise KernelLost(f"kernel {name}: {who} died before it answered "
                         f"({type(exc).__name__}); it is not retried") from None
    finally:
        writer.close()
    if kind == RAN:
        return pickle.loads(body)  # type: ignore[no-any-return]
    exc, text = pickle.loads(body)
    if exc is None:
        raise KernelError(f"kernel {name} raised in kernel process {pid}:\n{text}")
    exc.add_note(f"raised in kernel process {pid}:\n{text.rstrip()}")
    raise exc
