"""Blocks of clients trained at once by a vectorising client stage, each client still its own tree leaf.

A client stage that sets ``clients_at_once = B > 1`` and has ``run_block(works) -> errors`` (``LocalTrain``
does: :mod:`flgraph.stages.vectorised`) is handed a block of clients together. The stages before it run
per client first; the stages after it, the device simulation and the reducer's leaf run per client as
always (:func:`flgraph.engine.clients.client_leaf`), so every update enters the round's fixed reduction
tree on its own.

A block is a node of that same tree: the shallowest nodes holding at most ``B`` positions
(:func:`block_of`). It depends on the round's size and ``B`` only, never on the chunking or the worker
count, so a client's result (whose floating-point rounding may depend on its block's shapes) is the same
with 1 or 100 workers. The default chunks are tree nodes too, so a chunk is a whole number of blocks;
where a chunk boundary or work sharing cuts a block, each task trains the whole block and keeps the
positions it owns (the same result, a little work done twice).

Example:
    >>> from flgraph.engine.blocks import block_of
    >>> [block_of(10, p, 4) for p in (0, 2, 4, 9)]
    [(0, 2), (2, 5), (2, 5), (7, 10)]
    >>> block_of(10, 7, 1), block_of(3, 2, 64)
    ((7, 8), (0, 3))
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..context import ClientSet, ClientWork
from ..graph import ClientStage
from ..params import Params

if TYPE_CHECKING:
    import numpy as np

    from .clients import Bundle

__all__ = ["BlockRunner", "Started", "block_of", "block_stage"]


def block_of(n: int, pos: int, size: int) -> tuple[int, int]:
    """The block ``[lo, hi)`` of position ``pos``: the shallowest node of the round's tree over ``[0, n)``
    (split at ``(lo + hi) // 2``, as :mod:`flgraph.tree`) that contains ``pos`` and holds at most ``size``
    positions."""
    if not 0 <= pos < n:
        raise ValueError(f"position {pos} is not inside [0, {n})")
    lo, hi = 0, n
    while hi - lo > size:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if pos < mid else (mid, hi)
    return lo, hi


def block_stage(stages: Sequence[ClientStage]) -> int | None:
    """The index of the first stage that trains blocks of clients at once, or None."""
    for i, s in enumerate(stages):
        if getattr(s, "clients_at_once", 1) > 1 and hasattr(s, "run_block"):
            return i
    return None


@dataclass
class Started:
    """A client whose stages up to and including the block stage have run (or failed)."""

    work: ClientWork
    sums: dict[str, float]
    next_stage: int
    t_start: float
    error: BaseException | None = None
    failed: ClientStage | None = None


class BlockRunner:
    """Runs the round's blocks on demand for one chunk task and hands out their clients one at a time."""

    def __init__(self, bundle: Bundle, gp: Params, values: dict[str, np.ndarray] | None, rnd: int,
                 clients: ClientSet, index: int) -> None:
        self.bundle, self.gp, self.values, self.rnd, self.clients = bundle, gp, values, rnd, clients
        self.index = index
        self.stage: Any = bundle.stages[index]
        self.size = int(getattr(self.stage, "clients_at_once", 1))
        self._ready: dict[int, Started] = {}

    def take(self, pos: int) -> Started:
        """The started client at ``pos`` (its block is trained first if this task has not yet)."""
        got = self._ready.pop(pos, None)
        if got is None:
            self._run_block(*block_of(len(self.clients), pos, self.size))
            got = self._ready.pop(pos)
        return got

    def _run_block(self, lo: int, hi: int) -> None:
        b = self.bundle
        pre = b.stages[: self.index]
        ok: list[Started] = []
        for pos in range(lo, hi):
            work = ClientWork(self.rnd, int(self.clients.ids[pos]), pos, b.seed, self.gp, b.dataset, self.clients,
                              b.model_source)
            if self.values:
                work.values = self.values
            st = Started(work, {}, self.index + 1, time.perf_counter())
            stage: ClientStage = self.stage
            try:
                work.state = b.view(self.clients, pos, self.rnd)
                for stage in pre:
                    work.tag = stage.tag
                    t0 = time.perf_counter()
                    stage.run(work)
                    st.sums[f"time_{stage.name}"] = time.perf_counter() - t0
            except Exception as e:
                st.error, st.failed = e, stage
            else:
                work.tag = self.stage.tag
                ok.append(st)
            self._ready[pos] = st
        if not ok:
            return
        t0 = time.perf_counter()
        errors = self.stage.run_block([s.work for s in ok])
        share = (time.perf_counter() - t0) / len(ok)
        for s, err in zip(ok, errors):
            s.sums[f"time_{self.stage.name}"] = share
            if err is not None:
                s.error, s.failed = err, self.stage
