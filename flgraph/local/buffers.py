"""A per-process pool of flat buffers, so that per-client deltas and partial sums reuse memory.

Allocating and freeing a model-sized delta per client makes glibc hand pages back to the kernel and fault
them in again (or mmap/munmap them), which costs about as much as the arithmetic. The client runner takes a
buffer for each client's delta and the reducer gives back the buffers it has combined, so a worker reuses a
handful of buffers for the whole run.

Example:
    >>> import numpy as np
    >>> from flgraph.local.buffers import BufferPool
    >>> pool = BufferPool()
    >>> a = pool.take(100_000, np.float32); pool.give(a)
    >>> pool.take(100_000, np.float32) is a
    True
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["POOL", "BufferPool"]

# Below this size malloc serves a buffer from its own free lists without touching the kernel, faster than
# the pool's lock and lookup: a cross-device client's delta (a few thousand values) is simply allocated.
_SMALL_BYTES = 1 << 16


class BufferPool:
    """Free lists of 1-D buffers by (size, dtype); at most ``per_key`` buffers are kept for each."""

    def __init__(self, per_key: int = 32) -> None:
        self.per_key = per_key
        self._free: dict[tuple[int, str], list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, size: int, dtype: Any) -> np.ndarray:
        """An uninitialised 1-D buffer of ``size`` elements (a reused one when available)."""
        dt = np.dtype(dtype)
        if size * dt.itemsize < _SMALL_BYTES:
            return np.empty(size, dtype=dt)
        key = (int(size), dt.str)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return np.empty(size, dtype=dtype)

    def give(self, arr: np.ndarray) -> None:
        """Return a buffer nobody uses any more (only whole, writable, 1-D arrays are kept)."""
        if (arr.nbytes < _SMALL_BYTES or arr.ndim != 1 or arr.base is not None or not arr.flags.writeable
                or not arr.flags.c_contiguous):
            return
        key = (arr.size, arr.dtype.str)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < self.per_key and not any(f is arr for f in free):
                free.append(arr)


POOL = BufferPool()
