"""Robust aggregation: coordinate-wise median, trimmed mean, Krum and multi-Krum (reducers).

These are not sums, so they cannot reduce to a partial sum as the mean does: they declare
``needs_all = True``. Each ``leaf`` keeps its client's decoded delta, ``combine`` concatenates in the
engine's fixed tree order (so the list is in the round's client order, whatever the chunking) and
``finalize`` computes on the stacked updates. The memory is paid openly: clients x model values in the
driver at the end of a round, stated before the run starts (:attr:`flgraph.Run.holding`). When that would
not fit the driver's memory budget, the run streams the updates to disk as they arrive and finalizes over
blocks of coordinates (:mod:`flgraph.stages.holding`, :mod:`flgraph.stages.spill`): the same bits for the
median and the trimmed mean, the same choice for Krum.

* :class:`Median` — coordinate-wise median (Yin et al., ICML 2018).
* :class:`TrimmedMean` — per coordinate, drop the ``floor(beta * n)`` largest and smallest values and
  average the rest (Yin et al., ICML 2018).
* :class:`Krum` — Blanchard et al., NeurIPS 2017: score each update by the summed squared distances to
  its ``n - f - 2`` nearest others; Krum returns the best-scored update, multi-Krum (``m > 1``) the mean of
  the ``m`` best.

All three are unweighted (one vote per client, as in the papers: a sample-weighted rule would let one
client claim a majority by reporting many samples); the returned weight is the total sample count of the
round's updates, as for the mean. ``TrimmedMean``'s guarantee needs ``beta`` at least the share of Byzantine
updates in the round, and Krum's ``f`` at least their number: with client sampling that share varies from
round to round around the population's. With non-IID clients the coordinate-wise rules also make less
progress per round than the mean, attack or not (``bench/robust_w1.py``).

Example:
    >>> import numpy as np
    >>> from flgraph.context import Update
    >>> from flgraph.params import ParamSpec
    >>> from flgraph.stages.robust import Median
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(2, np.float32)})
    >>> med = Median()
    >>> leaves = [med.leaf(Update(i, 1, 0, np.array(v, np.float32)), spec)
    ...           for i, v in enumerate([[1, 5], [2, -100], [3, 6]])]
    >>> delta, weight = med.finalize(med.combine(med.combine(leaves[0], leaves[1]), leaves[2]), spec)
    >>> delta.tolist(), weight
    ([2.0, 5.0], 3.0)
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from flgraph.context import Update
from flgraph.errors import ConfigError
from flgraph.graph import Reducer
from flgraph.params import ParamSpec

from . import spill

__all__ = ["Krum", "Median", "Stacked", "TrimmedMean"]

#: What a needs-all reducer carries: the updates' deltas and sample counts, in client order.
Stacked = tuple[list[np.ndarray], list[float]]


class _AllUpdates(Reducer):
    """Keeps every update (``needs_all``): leaf -> one-element lists, combine -> concatenation.

    Held in memory by default. After :meth:`hold_on_disk` (the run decides it before it starts, see
    :mod:`flgraph.stages.holding`), each client's leaf appends its delta to the round's files on disk
    (:mod:`flgraph.stages.spill`) and carries only a reference, and :meth:`finalize` computes over blocks
    of coordinates: memory O(block x clients + model) instead of O(clients x model).
    """

    needs_all: ClassVar[bool] = True
    _spill: str | None = None  # the run's directory for updates held on disk (None: in memory)
    _block: int = 1 << 16  # coordinates per block when finalizing from disk
    _held: tuple[int, str] | None = None  # bytes the driver's finalizes held since take_held, and where

    def hold_on_disk(self, root: str | None, block: int = 1 << 16) -> None:
        """Hold the updates under ``root`` (None: in memory), finalizing ``block`` coordinates at a time."""
        self._spill = root
        self._block = max(2, int(block))

    def take_held(self) -> tuple[int, str] | None:
        """Bytes of updates the finalizes since the last call held, and where ("memory" or "disk")."""
        held, self._held = self._held, None
        return held

    def leaf(self, update: Update, spec: ParamSpec) -> Stacked:
        delta = update.decoded(spec)
        if self._spill is not None and update.base_round >= 0:  # a client's update (a group's result: memory)
            ref = spill.append_row(self._spill, update.base_round + 1, delta)
            update.delta = None
            return [ref], [float(update.num_samples)]  # type: ignore[list-item]
        if update.delta is delta:
            update.delta = None  # consumed: keep the buffer itself, no copy
        else:
            delta = np.array(delta, copy=True)
        return [delta], [float(update.num_samples)]

    def combine(self, left: Any, right: Any) -> Stacked:
        left[0].extend(right[0])
        left[1].extend(right[1])
        out: Stacked = left
        return out

    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[np.ndarray, float]:
        deltas, weights = acc
        if not deltas:
            raise ConfigError(f"{type(self).__name__} got no update this round")
        w = np.asarray(weights, np.float64)
        on_disk = any(not isinstance(d, np.ndarray) for d in deltas)
        out = self.compute_blocks(deltas, w) if on_disk else self.compute(np.stack(deltas), w)
        before, place = self._held or (0, "memory")
        self._held = (before + sum(spill.nbytes(d) for d in deltas), "disk" if on_disk else place)
        return out.astype(spec.carrier, copy=False), float(sum(weights))

    @abstractmethod
    def compute(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """The aggregate of ``stack`` (clients x values); each robust reducer defines it."""

    def compute_blocks(self, items: list[Any], weights: np.ndarray) -> np.ndarray:
        """:meth:`compute` over updates held on disk, one block of coordinates at a time (coordinate-wise
        rules: each block's result is exactly that of the whole stack's columns)."""
        return _blockwise(items, self._block, lambda block: self.compute(block, weights))

    def peak_bytes(self, clients: int, values: int, itemsize: int, block: int) -> tuple[int, int]:
        """Estimated peak bytes of a round of ``clients`` updates of ``values`` values: held in memory
        (the updates, their stack and the partition's copy), and held on disk (``block`` coordinates of
        every update as read, as stacked and as partitioned, and the result)."""
        held = clients * values * itemsize
        streamed = 3 * clients * min(block, values) * itemsize + values * itemsize
        return 3 * held, streamed

    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"


def _blockwise(items: list[Any], width: int, rule: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """``rule`` (a coordinate-wise reduction over axis 0) applied to blocks of about ``width`` coordinates of
    the stacked ``items``, read one block at a time."""
    dtype = spill.stacked_dtype(items)
    size = _size(items)
    out: np.ndarray | None = None
    for lo, hi in spill.block_bounds(size, width):
        part = rule(spill.column_block(items, lo, hi, dtype))
        if out is None:
            out = np.empty(size, part.dtype)
        out[lo:hi] = part
    assert out is not None
    return out


def _size(items: list[Any]) -> int:
    first = items[0]
    return int(first.size) if isinstance(first, np.ndarray) else spill.layout(first[0])[0]


class Median(_AllUpdates):
    """Coordinate-wise median of the client deltas (unweighted, as in Yin et al. 2018)."""

    def compute(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return np.median(stack, axis=0)


class TrimmedMean(_AllUpdates):
    """Coordinate-wise ``beta``-trimmed mean: per coordinate, drop the ``floor(beta * n)`` smallest and the as
    many largest values, average the rest (unweighted)."""

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ConfigError(f"TrimmedMean(beta={beta}): trim a fraction in [0, 0.5) from each side",
                              fix="e.g. TrimmedMean(beta=0.1) drops the top and bottom 10% per coordinate")
        self.beta = beta

    def compute(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        n = stack.shape[0]
        t = math.floor(self.beta * n)
        if n - 2 * t < 1:
            raise ConfigError(f"TrimmedMean(beta={self.beta}) trims all {n} updates of the round",
                              fix="select more clients or lower beta")
        if t == 0:
            return stack.mean(axis=0)
        part = np.partition(stack, (t, n - t - 1), axis=0) if n - t - 1 > t else np.sort(stack, axis=0)
        return part[t : n - t].mean(axis=0)


class Krum(_AllUpdates):
    """Krum (``m=1``) and multi-Krum (``m > 1``) of Blanchard et al. 2017, robust to ``f`` Byzantine clients.

    Needs ``n > 2f + 2`` updates in a round. The score of update ``i`` is the sum of its squared Euclidean
    distances to its ``n - f - 2`` nearest other updates; the ``m`` lowest scores (ties: the earlier client)
    are averaged, unweighted.
    """

    def __init__(self, f: int = 1, *, m: int = 1) -> None:
        if f < 0:
            raise ConfigError(f"Krum(f={f}): the number of Byzantine clients tolerated must be >= 0")
        if m < 1:
            raise ConfigError(f"Krum(m={m}): select at least one update", fix="m=1 is Krum; m>1 multi-Krum")
        self.f = f
        self.m = m

    def _check(self, n: int) -> None:
        if n <= 2 * self.f + 2:
            raise ConfigError(f"Krum(f={self.f}) needs more than 2f+2 = {2 * self.f + 2} updates, got {n}",
                              fix=f"select at least {2 * self.f + 3} clients per round, or lower f")
        if self.m > n:
            raise ConfigError(f"Krum(m={self.m}) selects more updates than the round has ({n})",
                              fix="lower m or select more clients")

    def scores(self, stack: np.ndarray) -> np.ndarray:
        """Each update's Krum score (float64)."""
        self._check(stack.shape[0])
        x = stack.astype(np.float64)
        return self._from_gram(np.einsum("ij,ij->i", x, x), x @ x.T)

    def _from_gram(self, sq: np.ndarray, gram: np.ndarray) -> np.ndarray:
        """Scores from the squared norms and the Gram matrix (float64), which becomes the distances in place.

        The distances ``sq_i + sq_j - 2 g_ij`` are made row block by row block inside ``gram`` (``-2 g`` is
        exact and IEEE addition commutes, so each is the bits of that expression), and each block of rows
        is sorted on its own: the Gram matrix is the one n x n matrix at the peak, where the expression
        written whole made two more (2.4 GB in all at 10,000 clients, against 0.8 GB and two blocks).
        """
        n = len(sq)
        k = n - self.f - 2
        gram *= -2.0
        scores = np.empty(n, np.float64)
        rows = max(1, (1 << 22) // max(1, n))  # about 32 MB of float64 a block
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            d = gram[lo:hi]
            d += sq[lo:hi, None] + sq[None, :]
            np.maximum(d, 0.0, out=d)
            d[np.arange(hi - lo), np.arange(lo, hi)] = np.inf
            scores[lo:hi] = np.sort(d, axis=1)[:, :k].sum(axis=1)
        return scores

    def compute(self, stack: np.ndarray, weights: np.ndarray) -> np.ndarray:
        self._check(stack.shape[0])
        chosen = np.argsort(self.scores(stack), kind="stable")[: self.m]
        return stack[np.sort(chosen)].mean(axis=0)

    def compute_blocks(self, items: list[Any], weights: np.ndarray) -> np.ndarray:
        """Krum over updates held on disk: the Gram matrix and squared norms accumulate in float64 over blocks
        of coordinates (so the distances sum in another order than in memory: equal within float64
        rounding, the same choice unless two scores tie that closely); then the chosen updates are averaged
        block by block, which gives the bits of the in-memory mean of the same choice."""
        n = len(items)
        self._check(n)
        size = _size(items)
        gram = np.zeros((n, n), np.float64)
        sq = np.zeros(n, np.float64)
        for lo, hi in spill.block_bounds(size, self._block):
            x = spill.column_block(items, lo, hi, np.dtype(np.float64))
            gram += x @ x.T
            sq += np.einsum("ij,ij->i", x, x)
        chosen = np.argsort(self._from_gram(sq, gram), kind="stable")[: self.m]
        picked = [items[i] for i in np.sort(chosen).tolist()]
        return _blockwise(picked, self._block, lambda block: block.mean(axis=0))

    def peak_bytes(self, clients: int, values: int, itemsize: int, block: int) -> tuple[int, int]:
        """As the other rules, with the float64 copy of the stack (in memory) or of a block (on disk), and
        the pairwise matrices."""
        held = clients * values * itemsize
        pairs = clients * clients * 8 + 3 * min(clients, (1 << 22) // max(1, clients)) * clients * 8
        in_memory = 2 * held + clients * values * 8 + pairs
        streamed = 3 * clients * min(block, values) * 8 + pairs + values * itemsize
        return in_memory, streamed
