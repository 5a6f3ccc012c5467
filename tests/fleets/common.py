"""What test workers use to report to the test: JSON lines on the FIFO the test reads."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from prefork import current_worker


def emit(kind: str, **fields: object) -> None:
    """Write one event (under PIPE_BUF, so atomic among many writers) to the test's FIFO."""
    me = current_worker()
    event = {"kind": kind, "pid": os.getpid(), "ppid": os.getppid(), "t": time.monotonic(),
             "label": me.label if me else None, **fields}
    path = os.environ.get("PREFORK_TEST_EVENTS")
    if not path:  # imported outside a test that listens (e.g. a bad-input run)
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # the test stopped listening
        return
    try:
        os.write(fd, json.dumps(event).encode() + b"\n")
    finally:
        os.close(fd)


def bump(counter: str) -> int:
    """Count this start of a worker in a file of the test's directory; return the count."""
    path = Path(os.environ["PREFORK_TEST_DIR"]) / f"{counter}.count"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        count = int(os.pread(fd, 32, 0) or b"0") + 1
        os.pwrite(fd, str(count).encode().ljust(32), 0)
    finally:
        os.close(fd)
    return count


def idle_forever() -> None:
    while True:
        signal.pause()
