"""Keep Python's cyclic garbage collector off the long-lived heap while rounds run.

A driver or worker process that imported torch, numpy and distributed holds a few hundred thousand
objects that live as long as the process. Python's oldest-generation collection walks all of them, with
the GIL held, every few dozen rounds in each process, and the round it lands in takes up to twice as long
as the others. :func:`gc.freeze` moves the objects that exist now to a permanent generation that collections
skip; objects created later are collected as usual.

:func:`frozen` does that for the duration of a ``with`` block (``Run.fit``) and gives the objects back to the
collector when the last such block ends, so garbage cycles among them are still collected after the run
(a notebook that makes many runs does not leak). Worker processes freeze once their run's bundle is in
place (:func:`freeze`, after the warm-up) and thaw when the run closes (:func:`thaw`).

Example:
    >>> import gc
    >>> from flgraph.local.heap import frozen
    >>> with frozen():
    ...     gc.get_freeze_count() > 0
    True
    >>> gc.get_freeze_count()
    0
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["freeze", "frozen", "thaw"]

_lock = threading.Lock()
_depth = 0


@contextmanager
def frozen() -> Iterator[None]:
    """Freeze the objects alive now for the block; thaw when the outermost block ends (thread-safe)."""
    global _depth
    with _lock:
        _depth += 1
        gc.freeze()
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()


def freeze() -> int:
    """Freeze this process's objects alive now (a worker, after its run's warm-up); returns how many."""
    gc.freeze()
    return gc.get_freeze_count()


def thaw() -> int:
    """Give this process's frozen objects back to the collector (a worker, when its run closes)."""
    with _lock:
        if _depth == 0:
            gc.unfreeze()
    return gc.get_freeze_count()
