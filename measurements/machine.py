"""What every measurement report records about where its numbers came from."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def describe_machine() -> dict[str, Any]:
    """Date, Python, kernel, CPU model, cores, memory, load and the commit measured."""
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": sys.version,
        "implementation": platform.python_implementation(),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "cpu": cpu,
        "nproc": len(os.sched_getaffinity(0)),
        "mem_total_kib": memory_kib,
        "loadavg_at_start": os.getloadavg(),
        "commit": commit,
    }
