"""Work sharing between the chunks of a round: a worker that runs out of clients takes a slower chunk's last
ones, from that chunk's far end.

A round's clients are split into one chunk per worker, each a node of the round's fixed reduction tree
(:mod:`flgraph.tree`). On a machine whose cores all train, the chunks end several milliseconds apart
(the driver's and the workers' own event loops take turns on the cores at random), and the round waits
for the slowest. With sharing, each chunk's positions are *claimed* one client at a time from a small
table the workers all map: the chunk's own task claims from the front, and one helper, a task that has
finished its own chunk, claims from the back. They meet somewhere in the middle, so the chunks end within
about one client of each other.

The result does not depend on where they meet. Each task returns the maximal tree nodes over the
positions it ran (:class:`flgraph.tree.Incremental`), the driver adds them into the round's tree, and
every addition still happens at the same node of the same tree: the sum is bit-identical to the static
split's, whatever the timing, the cluster size or the order of arrivals. The price is a few more partials
per round (a split range returns the nodes that cover each piece; about 3 per piece for 50 clients). So
that they do not all travel after the round's last client, a task sends what it holds as soon as that
cannot grow any more (``emit`` of :func:`run_shared`): when it claims a chunk's last position, before
running it (all but the nodes that position's leaf will be added to), and when it leaves a chunk. Only one
node is sent after the last client trains: its leaf added to those nodes.

The table is a file in the data plane's private directory (so only for workers on the driver's machine), one
row ``[next front, end of back, helper]`` per chunk, changed under an exclusive ``flock``; a claim costs two
system calls, so a chunk's own task claims a quarter of what is left at a time and single positions near the
end (:meth:`Claims.take_front_some`). ``FLGRAPH_SHARE_WORK=0`` turns sharing off; a ``chunk_size`` given to
``Run`` keeps its chunks as they are. A chunk's own task never waits for a helper and a helper never waits
at all: the table only decides who runs which position, each position exactly once.

Example:
    >>> import tempfile, os
    >>> from flgraph.local.sharing import Claims
    >>> path = os.path.join(tempfile.mkdtemp(), "claims")
    >>> Claims.create(path, [(0, 4), (4, 6)])
    >>> with Claims(path) as w0, Claims(path) as w1:         # two workers' tasks
    ...     mine0 = [w0.take_front(0), w0.take_front(0)]     # worker 0 runs chunk 0 from its front
    ...     mine1 = [w1.take_front(1), w1.take_front(1), w1.take_front(1)]  # worker 1 ends chunk 1
    ...     helped = w1.adopt(me=1)                          # and helps chunk 0 from its back
    ...     back = [w1.take_back(helped), w1.take_back(helped)]
    ...     last = w0.take_front(0)
    >>> mine0, mine1, helped, back, last
    ([0, 1], [4, 5, None], 0, [3, 2], None)
"""

from __future__ import annotations

import contextlib
import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import numpy as np

from ..tree import Incremental
from . import switched_on

try:
    import fcntl
except ImportError:  # Windows: no flock (and no ipc:// data plane either); the chunks stay static
    fcntl = None  # type: ignore[assignment]

__all__ = ["Claims", "Share", "enabled", "run_shared"]

_T = TypeVar("_T")

_FRONT, _BACK, _HELPER = 0, 1, 2
_NONE = -1
FRONT_PART = 4  # a chunk's own task claims a quarter of its unclaimed positions at a time (see take_front_some)


def enabled() -> bool:
    """Whether work sharing is on (the default where ``flock`` exists); ``FLGRAPH_SHARE_WORK=0`` turns it
    off."""
    if fcntl is None:
        return False
    return switched_on("FLGRAPH_SHARE_WORK")


@dataclass(frozen=True)
class Share:
    """A chunk task's job under work sharing: the claims table at ``path`` and its own row ``index``."""

    path: str
    index: int


class Claims:
    """The claims table of one round attempt, mapped by every task of it (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        except BaseException:
            os.close(self._fd)
            raise
        self._rows = np.frombuffer(self._map, dtype=np.int64).reshape(-1, 3)

    @staticmethod
    def create(path: str, ranges: Sequence[tuple[int, int]]) -> None:
        """Write the table for chunks ``ranges`` (positions ``[a, b)`` each, in order) to ``path``."""
        if not ranges:
            raise ValueError("a claims table needs at least one range")
        rows = np.array([(a, b, _NONE) for a, b in ranges], dtype=np.int64)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(rows.tobytes())
        os.replace(tmp, path)  # a task that opens it sees the whole table or no file

    def __len__(self) -> int:
        return len(self._rows)

    def _locked(self, fn: Callable[[np.ndarray], _T]) -> _T:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            return fn(self._rows)
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def take_front(self, j: int) -> int | None:
        """Claim the next position of chunk ``j`` from its front (its own task); None when none is left."""
        got = self.take_front_some(j, 0)
        return None if got is None else got.start

    def take_front_some(self, j: int, part: int = FRONT_PART) -> range | None:
        """Claim the next ``max(1, unclaimed // part)`` positions of chunk ``j`` from its front (its own
        task, which runs them in order); None when none is left.

        A claim is two system calls under the table's lock, so the chunk's task takes several positions at
        once while many are left: with
        ``part=4``, a 50-client chunk needs about 14 claims instead of 50. It holds at most a quarter of
        what was left, and single positions once fewer than ``2 * part`` are, so a helper still meets it
        within one client of the middle. ``part=0`` claims one position."""

        def take(rows: np.ndarray) -> range | None:
            front, back = int(rows[j, _FRONT]), int(rows[j, _BACK])
            if front >= back:
                return None
            left = back - front
            end = front + (left // part if part > 0 and left >= 2 * part else 1)
            rows[j, _FRONT] = end
            return range(front, end)

        return self._locked(take)

    def take_back(self, j: int) -> int | None:
        """Claim the last unclaimed position of chunk ``j`` (its helper); None when none is left."""

        def take(rows: np.ndarray) -> int | None:
            front, back = int(rows[j, _FRONT]), int(rows[j, _BACK])
            if front >= back:
                return None
            rows[j, _BACK] = back - 1
            return back - 1

        return self._locked(take)

    def exhausted(self, j: int) -> bool:
        """Whether every position of chunk ``j`` is claimed (read without the lock: once true it stays
        true, so True is final; False may already be stale)."""
        return bool(self._rows[j, _FRONT] >= self._rows[j, _BACK])

    def adopt(self, me: int) -> int | None:
        """Become the helper of the chunk (not ``me``) with the most unclaimed positions and no helper yet;
        its index, or None when no chunk needs one. A chunk gets at most one helper, so its positions
        split into two pieces at most (a front piece and a back piece) and its partials stay few."""

        def pick(rows: np.ndarray) -> int | None:
            left = rows[:, _BACK] - rows[:, _FRONT]
            open_ = (left > 0) & (rows[:, _HELPER] == _NONE)
            open_[me] = False
            if not open_.any():
                return None
            j = int(np.argmax(np.where(open_, left, -1)))
            rows[j, _HELPER] = me
            return j

        return self._locked(pick)

    def close(self) -> None:
        """Unmap the table and close its file.

        A view of the table may outlive this call (a frame in a reference cycle that the next garbage
        collection frees): then the map stays until that view goes, and is unmapped with it, instead of
        the close failing a round that has finished its work."""
        del self._rows
        with contextlib.suppress(BufferError):
            self._map.close()
        os.close(self._fd)

    def __enter__(self) -> Claims:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def run_shared(share: Share, n: int, leaf: Callable[[int], Any], combine: Callable[[Any, Any], Any],
               emit: Callable[[list[tuple[tuple[int, int], Any]]], bool] | None = None,
               ) -> list[tuple[tuple[int, int], Any]]:
    """Run chunk ``share.index``'s positions from its front, then help other chunks from their backs.

    ``leaf(position)`` is one client's value and ``combine(left, right)`` the reducer's combine. Returns
    the finished tree nodes (of the tree over ``[0, n)``) that cover the positions this task ran and that
    it did not ``emit``, with their values, left to right. A table that no longer exists (the driver gave
    the round up and removed it) means nothing to claim.

    ``emit(nodes)``, if given, sends finished nodes on early (True when it did; False keeps them here). It
    is called whenever what this task holds can no longer grow: when it claims a chunk's last position
    (before running it: all but the nodes that position's leaf will be added to) and when it leaves a
    chunk. So the task that runs a round's last client sends one node at the end (that client's leaf
    added to its finished siblings, the additions the driver would otherwise make after it); its other
    nodes, and the other tasks' nodes, travel while that client trains. The driver adds them into the
    round's tree as they arrive (:meth:`~flgraph.tree.Incremental.add_node`), at the same tree nodes as
    before.
    """
    inc = Incremental(n, combine)
    try:
        claims = Claims(share.path)
    except FileNotFoundError:
        return []

    def flush(last: int | None = None) -> None:
        """Send what is held, except (``last``: the piece's last position, about to run) the nodes that
        position's leaf will be added to: they travel as one node with it instead of one each."""
        keep = inc.partners(last) if last is not None else set()
        send = [(node, value) for node, value in sorted(inc.done.items()) if node not in keep]
        if emit is not None and send and emit(send):
            for node, _ in send:
                del inc.done[node]

    with claims:
        while (some := claims.take_front_some(share.index)) is not None:
            last = claims.exhausted(share.index)  # this claim took the chunk's last position
            for mine in some:
                if last and mine == some[-1]:
                    flush(mine)
                inc.add(mine, leaf(mine))
        flush()
        while (other := claims.adopt(share.index)) is not None:
            while (pos := claims.take_back(other)) is not None:
                if claims.exhausted(other):
                    flush(pos)
                inc.add(pos, leaf(pos))
            flush()
    return sorted(inc.done.items())
