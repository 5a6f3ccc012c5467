"""Every exit code a ``prefork`` command or a worker's process ends with, defined once.

The README's table of exit codes is this enum; ``run_fleet`` returns its first members.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    # status, reload, scale: the master did not answer, or answered nonsense. (`prefork run`
    # exits 1 only if prefork itself failed, with a traceback: a bug to report.)
    CONTROL_FAILED = 1
    USAGE = 2  # bad input: options, the fleet, the runtime directory; a restart cannot help
    NO_MASTER = 3  # status, reload, scale: no master of that fleet is running
    ALREADY_RUNNING = 4  # run: another master holds the fleet's lock
    WORKERS_FAILED = 5  # run: the master stopped and a worker had ended failed
    # A worker's process: prefork, or the fleet's post_fork hook, failed in the child
    # before the worker's code ran (sysexits.h EX_SOFTWARE).
    CHILD_SETUP_FAILED = 70
    INTERRUPTED = 130  # Ctrl-C before the master took over its signals (128 + SIGINT)
