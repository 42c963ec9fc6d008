"""Updates held on disk: where robust reducers put the round's deltas when they would not fit in memory.

A reducer that needs every update (:mod:`flgraph.stages.robust`) normally keeps each client's delta in
memory until the round's end. Streamed to disk instead, each update is appended, where its leaf runs (a
worker on the driver's machine, or the driver), to that process's file in the round's directory
(``<root>/round-00012/<pid>-<thread>-<values>-float32.bin``: one writer per file, so no lock, and one
row length and dtype per file), and the reducer
carries only a reference ``(file, row)``. References concatenate in the engine's fixed tree order, so they
list the round's updates in client order, as the in-memory list does; the driver never holds more than
the references. :func:`column_block` then reads the rows' values for a range of coordinates, so a
coordinate-wise rule runs on clients x block values at a time.

The round's directory is made by the driver before the round and removed after it, whatever happened
(:class:`SpillRoot`); a leaf whose round directory is gone (a task of a round already given up) fails
instead of leaving a file behind.

Example:
    >>> import numpy as np, tempfile
    >>> root = SpillRoot.create(tempfile.gettempdir(), "doc")
    >>> with root.round(3):
    ...     refs = [append_row(root.path, 3, np.array([i, 10 * i], np.float32)) for i in range(3)]
    ...     block = column_block(refs, 1, 2, np.dtype(np.float32))
    >>> block.ravel().tolist(), root.files()
    ([0.0, 10.0, 20.0], [])
    >>> root.remove()
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from flgraph.errors import ConfigError

__all__ = ["Ref", "SpillRoot", "append_row", "block_bounds", "column_block", "layout", "nbytes", "round_dir",
           "stacked_dtype"]

#: One update on disk: its file and its row in that file.
Ref = tuple[str, int]


def round_dir(root: str, rnd: int) -> str:
    """The directory of round ``rnd``'s updates under ``root``."""
    return os.path.join(root, f"round-{rnd:05d}")


def append_row(root: str, rnd: int, delta: np.ndarray) -> Ref:
    """Append ``delta`` to this thread's file of round ``rnd``; returns where it went."""
    delta = np.ascontiguousarray(delta)
    name = f"{os.getpid()}-{threading.get_ident()}-{delta.size}-{delta.dtype.name}.bin"
    path = os.path.join(round_dir(root, rnd), name)
    try:
        with open(path, "ab") as f:  # append mode starts at the end: the row is the file's length so far
            row = f.tell() // max(1, delta.nbytes)
            delta.tofile(f)
    except FileNotFoundError as e:
        raise ConfigError(f"round {rnd}'s directory for updates held on disk is gone ({round_dir(root, rnd)})",
                          fix="the round was given up or the run closed; nothing to do") from e
    return path, row


def layout(path: str) -> tuple[int, np.dtype[Any]]:
    """Values per row and dtype of an update file (both are in its name)."""
    size, dtype = os.path.basename(path)[: -len(".bin")].rsplit("-", 2)[1:]
    return int(size), np.dtype(dtype)


def nbytes(item: Any) -> int:
    """Bytes of one held update (an array or a :data:`Ref`)."""
    if isinstance(item, np.ndarray):
        return int(item.nbytes)
    size, dtype = layout(item[0])
    return size * dtype.itemsize


def _item_dtype(item: Any) -> np.dtype[Any]:
    return item.dtype if isinstance(item, np.ndarray) else layout(item[0])[1]


def stacked_dtype(items: Sequence[Any]) -> np.dtype[Any]:
    """The dtype ``np.stack`` would give the updates (arrays or references)."""
    return np.result_type(*{_item_dtype(it) for it in items})


def column_block(items: Sequence[Any], lo: int, hi: int, dtype: np.dtype[Any]) -> np.ndarray:
    """Coordinates ``lo:hi`` of every update (an array or a :data:`Ref`), as a (updates x (hi-lo)) array in
    ``dtype``, rows in the order of ``items``. Rows on disk are read with one ``pread`` each, into this
    block only: nothing of the files is mapped into the process, so its memory is the block's."""
    out = np.empty((len(items), hi - lo), dtype)
    by_file: dict[str, tuple[list[int], list[int]]] = {}
    for i, it in enumerate(items):
        if isinstance(it, np.ndarray):
            out[i] = it[lo:hi]
        else:
            pos, rows = by_file.setdefault(it[0], ([], []))
            pos.append(i)
            rows.append(it[1])
    for path, (pos, rows) in by_file.items():
        size, stored = layout(path)
        part = out if stored == dtype and len(pos) == len(items) else np.empty((len(rows), hi - lo), stored)
        row_bytes, skip = size * stored.itemsize, lo * stored.itemsize
        fd = os.open(path, os.O_RDONLY)
        try:
            for j, r in enumerate(rows):
                got = os.preadv(fd, [part[j].data], r * row_bytes + skip)
                if got != part[j].nbytes:
                    raise OSError(f"{path}: row {r} is cut short (read {got} of {part[j].nbytes} bytes)")
        finally:
            os.close(fd)
        if part is not out:
            out[pos] = part
    return out


def block_bounds(size: int, width: int) -> list[tuple[int, int]]:
    """Split ``0:size`` into blocks of at most about ``width`` (at least 16) coordinates, as even as
    possible. Never a very narrow block: numpy sums a reduction over one or two columns in another order
    than over a wide block, and the blocks must give the whole stack's bits."""
    count = max(1, -(-size // max(16, width)))
    edges = np.linspace(0, size, count + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges.tolist()) if b > a]


class SpillRoot:
    """A run's directory for updates held on disk: one sub-directory per round, made and removed by the
    driver around the round; the whole directory goes with :meth:`remove` (``Run.close``), or when the
    object is collected."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._cleanup = weakref.finalize(self, shutil.rmtree, path, True)

    @staticmethod
    def create(parent: str, tag: str) -> SpillRoot:
        """A fresh directory under ``parent``."""
        return SpillRoot(tempfile.mkdtemp(prefix=f"flgraph-updates-{tag}-", dir=parent))

    @contextmanager
    def round(self, rnd: int) -> Iterator[str]:
        """Round ``rnd``'s directory for the duration of the block, removed after it (also on errors)."""
        path = round_dir(self.path, rnd)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def files(self) -> list[str]:
        """Every file under the directory (empty between rounds)."""
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(self.path) for f in fs)

    def remove(self) -> None:
        """Remove the directory and all it holds."""
        self._cleanup()
