"""A Dask scheduler on 127.0.0.1 for the tests: ``python -m fleets.dask_scheduler PORT``
prints its address on stdout once it listens, and runs until it is killed."""

from __future__ import annotations

import asyncio
import sys

from distributed import Scheduler


async def main(port: int) -> None:
    async with Scheduler(host="127.0.0.1", port=port, dashboard=False) as scheduler:
        print(scheduler.address, flush=True)
        await scheduler.finished()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
