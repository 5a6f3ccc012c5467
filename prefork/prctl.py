"""``prctl(2)``, for the two process attributes prefork sets: a worker's parent-death
signal and the master's child-subreaper flag."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Resolved once, in the master at import: loading libc again in every child cost ~250 us.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def prctl(option: int, value: int) -> None:
    """``prctl(option, value, 0, 0, 0)``; raises OSError when the kernel refuses."""
    if _prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}): {os.strerror(errno)}")
