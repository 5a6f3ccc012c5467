"""A worker that calls a kernel through ``run_kernel`` again and again and reports which
process ran it (``test_dask_offload``): its own (inline), or a Dask worker's."""

from __future__ import annotations

import asyncio

from fleets.common import emit
from fleets.kernels import whoami
from prefork import Fleet, Worker
from prefork.offload import KernelError, run_kernel


async def caller() -> None:
    while True:
        try:
            kernel_pid, _, value = await run_kernel(whoami, 5)
            emit("result", kernel_pid=kernel_pid, value=value)
        except KernelError as exc:
            emit("failed", message=str(exc))
        await asyncio.sleep(0.1)  # a worker's own pace between two batches


fleet = Fleet("offloaded", [Worker("caller", caller)])
