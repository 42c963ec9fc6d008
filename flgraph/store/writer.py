"""Snapshots written in the background: one thread, never two writes at once, old snapshots pruned.

Example:
    >>> import numpy as np, zarr
    >>> from flgraph.store.checkpoint import RunDirectory, Snapshot
    >>> from flgraph.store.schedule import CheckpointPolicy
    >>> rd = RunDirectory.create(zarr.storage.MemoryStore(), meta={"seed": 0}, blobs={})
    >>> w = SnapshotWriter(rd, CheckpointPolicy(keep_last=1))
    >>> for r in (1, 2):
    ...     w.submit(Snapshot(round=r, target_round=2, params=np.ones(2, np.float32), states={}, rows=[]))
    >>> w.close(); rd.snapshot_rounds()
    [2]
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from .checkpoint import RunDirectory, Snapshot
from .schedule import CheckpointPolicy

__all__ = ["SnapshotWriter"]


class SnapshotWriter:
    """Writes snapshots in one background thread: never two at once, errors surface on the next call."""

    def __init__(self, directory: RunDirectory, policy: CheckpointPolicy) -> None:
        self.directory = directory
        self.policy = policy
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flgraph-checkpoint")
        self._pending: Future[float] | None = None
        self._lock = threading.Lock()
        self.last_time = time.monotonic()
        self.last_round = 0
        self.write_seconds: list[float] = []

    def submit(self, snap: Snapshot) -> None:
        """Queue ``snap`` after waiting for the previous write (which re-raises its error, if any)."""
        self.wait()
        self.last_time = time.monotonic()
        self._pending = self._pool.submit(self._write, snap)

    def _write(self, snap: Snapshot) -> float:
        t0 = time.perf_counter()
        self.directory.write(snap)
        self.directory.prune(self.policy)
        self.last_round = snap.round
        dt = time.perf_counter() - t0
        self.write_seconds.append(dt)
        return dt

    def wait(self) -> None:
        """Wait for the write in flight; raise its CheckpointError if it failed."""
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
