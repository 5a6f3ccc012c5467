"""``prctl(2)``, for the two process attributes prefork sets: a worker's parent-death
signal and the master's child-subreaper flag."""

from __future__ import annotations

import ctypes
import functools
import os
import signal

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Resolved once, in the master at import: loading libc again in every child cost ~250 us.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int

# prctl(PR_SET_PDEATHSIG, SIGKILL) as a forked child calls it: one C-level object, with
# the arguments made here, in the master, at the widths the variadic prctl reads, and
# without ctypes' errno copy. Each object a child touches is a page it copies: about 3
# pages less than prctl() on 3.12 and 3.13 (measurements/child_pages.py; noisy).
# Returns prctl's result (0, or -1 if refused).
kill_me_when_parent_dies = functools.partial(
    ctypes.CDLL(None).prctl, ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL),
    ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))


def prctl(option: int, value: int) -> None:
    """``prctl(option, value, 0, 0, 0)``; raises OSError when the kernel refuses."""
    if _prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
