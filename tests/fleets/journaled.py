"""Workers that write to their stdout and stderr, for the journal stream tests. The test's
stand-in for journald's stdout socket is ``$PREFORK_TEST_JOURNAL``."""

from __future__ import annotations

import os
import sys

from fleets.common import emit, idle_forever
from prefork import Fleet, Worker, current_worker, journal

if "PREFORK_TEST_JOURNAL" in os.environ:
    journal.STDOUT_SOCKET = os.environ["PREFORK_TEST_JOURNAL"]


def talker() -> None:
    """One line to stdout, one to stderr; then report where they went and idle."""
    me = current_worker()
    assert me is not None
    # One write per line: print() makes two (text, then newline) on an unbuffered stdout,
    # and workers started together share the master's, so their lines could interleave.
    sys.stdout.write(f"out from {me.label}\n")
    sys.stdout.flush()
    sys.stderr.write(f"err from {me.label}\n")
    sys.stderr.flush()
    err = os.fstat(2)
    emit("up", journal_stream=os.environ.get("JOURNAL_STREAM"),
         stderr=f"{err.st_dev}:{err.st_ino}", stdout=os.readlink("/proc/self/fd/1"))
    idle_forever()


journaled = Fleet("journaled", [Worker("clusterer", talker, replicas=2),
                                Worker("mailer", talker)])
