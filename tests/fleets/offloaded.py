"""A worker that calls a kernel through ``run_kernel`` again and again and reports which
process ran it (``test_dask_offload``): its own (inline), or a Dask worker's."""

from __future__ import annotations

import asyncio
import os

from fleets.common import emit
from fleets.kernels import _Unpicklable, whoami
from prefork import Fleet, Worker
from prefork.offload import KernelError, run_kernel


def fail_here() -> None:
    raise ValueError(f"failed in {os.getpid()}")


async def caller() -> None:
    while True:
        try:
            kernel_pid, _, value = await run_kernel(whoami, 5)
            emit("result", kernel_pid=kernel_pid, value=value)
            try:
                await run_kernel(whoami, _Unpicklable())
            except KernelError as exc:  # the caller's fault, wherever the kernel would run
                emit("unpicklable", message=str(exc))
            await run_kernel(fail_here)
        except KernelError as exc:
            emit("failed", message=str(exc))
        except ValueError as exc:  # the kernel's own exception, wherever it ran
            emit("raised", message=str(exc))
        await asyncio.sleep(0.1)  # a worker's own pace between two batches


fleet = Fleet("offloaded", [Worker("caller", caller)])
