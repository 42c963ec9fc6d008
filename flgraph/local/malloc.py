"""Keep freed memory for reuse in flgraph's processes, instead of giving it back to the OS every round.

Each round, the driver receives one model-sized message per chunk and the workers receive the params.
With glibc's defaults, buffers that large are either mapped fresh from the OS (above the mmap threshold)
or come from a heap whose free top is trimmed as soon as it exceeds twice that threshold; both ways the
next round's buffers are new pages, and every 4 KB page is a fault that zeroes it. In the driver most of
these faults come while the last partials arrive, so they sit on the round's critical path.

The settings are the ones glibc's own dynamic policy settles at when it sees large blocks freed (mmap
threshold 32 MiB, its maximum; trim threshold twice that): allocations up to 32 MiB come from the heap,
and up to 64 MiB of freed heap is kept. :func:`tune_this_process` applies them to the running process
(the driver, through ``mallopt``); :func:`child_environ` gives the environment variables that apply them
to a process about to start (the embedded cluster's workers). Neither does anything when the user set
``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (their choice stands), when
``FLGRAPH_TUNE_MALLOC=0``, or where the C library is not glibc.

Example:
    >>> from flgraph.local.malloc import child_environ, tune_this_process
    >>> sorted(child_environ()) in ([], ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
    True
    >>> tune_this_process() in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

from . import switched_on

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "child_environ", "enabled", "tune_this_process"]

MMAP_THRESHOLD = 32 << 20
"""Blocks up to this size come from the heap (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit systems)."""
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
"""Freed heap kept at the top before it is given back to the OS."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_lock = threading.Lock()
_tuned = False


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only (not musl)
        return libc
    except (OSError, AttributeError):
        return None


def enabled() -> bool:
    """Whether flgraph sets the allocator: on unless ``FLGRAPH_TUNE_MALLOC=0`` or the user set glibc's
    own variables."""
    if not switched_on("FLGRAPH_TUNE_MALLOC"):
        return False
    return not any(v in os.environ for v in _USER_VARS)


def tune_this_process() -> bool:
    """Apply the settings to this process (once); True when they are in effect."""
    global _tuned
    with _lock:
        if _tuned:
            return True
        if not enabled():
            return False
        libc = _glibc()
        if libc is None:
            return False
        _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _tuned


def child_environ() -> dict[str, str]:
    """Environment variables that apply the settings to a process started from this one (empty when
    :func:`enabled` is false or the C library is not glibc)."""
    if not enabled() or _glibc() is None:
        return {}
    return {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}
