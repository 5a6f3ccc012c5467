"""gunicorn settings for the peer ``make measure`` runs (``gunicorn -c gunicorn_conf.py``).

Each worker, once booted, writes its pid and a newline to the pipe whose write end
``$MEASURE_READY_FD`` names (inherited through the fork; a line is far below PIPE_BUF, so
every write is atomic): the driver waits on that pipe for all workers instead of sleeping.
"""

from __future__ import annotations

import os
from typing import Any


def post_worker_init(worker: Any) -> None:
    """gunicorn's hook, called in the worker once it has initialised: report in."""
    fd = os.environ.get("MEASURE_READY_FD")
    if fd is not None:
        os.write(int(fd), f"{os.getpid()}\n".encode())
