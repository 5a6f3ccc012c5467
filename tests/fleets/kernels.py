"""A fleet whose worker calls kernels through ``prefork.offload.run_kernel``
(``test_kernel_pool``). Each scenario is one fleet attribute; what each call gave is an
event. Kernels that must run "for a while" wait on a FIFO the test writes to."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fleets.common import emit, idle_forever
from prefork import Backoff, Fleet, StartLimit, Worker
from prefork.offload import KernelError, KernelLost, run_kernel


def whoami(x: int) -> tuple[int, int, int]:
    return os.getpid(), os.getppid(), x * 2


def fail(message: str) -> None:
    raise ValueError(message)


def held(name: str) -> str:
    """Tell the test it runs, then wait until the test writes a line to FIFO ``name``."""
    fifo = Path(os.environ["PREFORK_TEST_DIR"]) / name
    emit("kernel-running", fifo=name)
    with open(fifo, "rb") as release:  # blocks until the test opens it to write
        return release.readline().decode().strip()


def _report(kind: str, result: tuple[int, int, int]) -> None:
    emit(kind, kernel_pid=result[0], kernel_ppid=result[1], value=result[2])


async def basic() -> None:
    _report("pooled", await run_kernel(whoami, 21))
    _report("inline", await run_kernel(whoami, 4, offload_if=False))
    try:
        await run_kernel(fail, "bad input")
    except ValueError as exc:
        emit("raised", message=str(exc), notes=getattr(exc, "__notes__", []))
    try:
        await run_kernel(lambda: None)
    except TypeError as exc:
        emit("refused", message=str(exc))
    await asyncio.Event().wait()


async def lost() -> None:
    try:
        await run_kernel(held, "never.fifo")
    except KernelLost as exc:
        emit("lost", message=str(exc))
    _report("pooled", await run_kernel(whoami, 1))  # waits for the restarted one
    await asyncio.Event().wait()


async def graceful() -> None:
    emit("answer", value=await run_kernel(held, "release.fifo"))
    await asyncio.Event().wait()


def unpicklable_result() -> object:
    return _Unpicklable()


async def errors() -> None:
    try:
        await run_kernel(whoami, _Unpicklable())
    except KernelError as exc:
        emit("error", on="arguments", type=type(exc).__name__, message=str(exc))
    try:
        await run_kernel(unpicklable_result)
    except Exception as exc:
        emit("error", on="result", type=type(exc).__name__, message=str(exc),
             notes=getattr(exc, "__notes__", []))
    _report("pooled", await run_kernel(whoami, 2))
    await asyncio.Event().wait()


class _Unpicklable:
    def __reduce__(self) -> object:
        raise TypeError("this argument cannot be pickled")


def _fleet(name: str, target: object, kernel_workers: int) -> Fleet:
    return Fleet(name, [Worker("caller", target)], kernel_workers=kernel_workers)


basic_fleet = _fleet("kbasic", basic, 2)
lost_fleet = _fleet("klost", lost, 1)
graceful_fleet = _fleet("kgraceful", graceful, 1)
errors_fleet = _fleet("kerrors", errors, 1)
no_pool = Fleet("knopool", [Worker("caller", basic)])
idle = Fleet("kidle", [Worker("idle", idle_forever)], kernel_workers=1)
clash = Fleet("kclash", [Worker("kernel-pool", idle_forever)], kernel_workers=1)
not_a_count = Fleet("kcount", [Worker("idle", idle_forever)], kernel_workers="2")  # type: ignore[arg-type]


def _pool_fails(context: object) -> None:
    if getattr(context, "name", None) == "kernel-pool":
        raise RuntimeError("this kernel process cannot start")


async def failing_pool_caller() -> None:
    while True:
        try:
            await run_kernel(whoami, 1)
        except KernelError as exc:
            emit("failed", message=str(exc))
            return
        await asyncio.sleep(0.05)


failing_pool = Fleet("kfailing", [Worker("caller", failing_pool_caller, restart="never")],
                     kernel_workers=1, post_fork=_pool_fails,
                     backoff=Backoff(initial=0.05, maximum=0.1, jitter=0.0),
                     start_limit=StartLimit(burst=2, interval=60.0))
