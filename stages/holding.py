"""What the reducers that need every update (median, trimmed mean, Krum) hold in a round, and where.

Such a reducer keeps every client's delta until the round's end: clients per round x model values x
itemsize, plus what its finalize needs on top (the stack, a partition's copy, Krum's float64 copy and
pairwise matrices). A run works this out before it starts (:attr:`flgraph.Run.holding`, logged at INFO)
from its ``Select`` stages and the model's size, and compares it with a memory budget: by default half of
the memory the driver's machine has available (``psutil``); the environment variable
``FLGRAPH_ROBUST_MEMORY`` sets another (``"2G"``, ``"512M"``, a byte count, or a share such as ``"25%"``;
see the docs' *Advanced* page). Over the budget, the updates are streamed to disk (:mod:`flgraph.stages.spill`,
under ``FLGRAPH_SPILL_DIR`` or the system's temporary directory) and finalized over blocks of coordinates;
if the disk has no room for them either, the run is refused before it starts. Each round's history row
reports ``updates_held_bytes`` and ``updates_held_in`` (``"memory"`` or ``"disk"``).

Example:
    >>> import numpy as np
    >>> from flgraph.graph import Pipeline
    >>> from flgraph.params import ParamSpec
    >>> from flgraph import stages as st
    >>> graph = (st.Select(clients=1000) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.Median())).check()
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(250_000, np.float32)})
    >>> plan = HoldingPlan.of(graph, 100_000, spec, "doc", budget=4 << 30)
    >>> [(h.clients, h.held_bytes, h.place) for h in plan.holdings]
    [(1000, 1000000000, 'memory')]
    >>> disk = HoldingPlan.of(graph, 100_000, spec, "doc", budget=1 << 30, free=2 << 30)
    >>> disk.holdings[0].place, disk.streams
    ('disk', True)
    >>> disk.close()
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np

from flgraph.errors import ConfigError
from flgraph.graph import Reducer, RoundGraph
from flgraph.params import ParamSpec

from .robust import _AllUpdates
from .select import Select
from .spill import SpillRoot

__all__ = ["Holding", "HoldingPlan", "disk_free", "memory_budget"]

log = logging.getLogger("flgraph")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# A finalize block's size: a quarter of the budget, within these bounds (large enough that reading a block
# costs little beyond its bytes, small next to any machine's memory).
_MIN_BLOCK_BYTES = 16 << 20
_MAX_BLOCK_BYTES = 32 << 20


def memory_budget() -> int:
    """Bytes the updates held in a round may take in the driver's memory: ``FLGRAPH_ROBUST_MEMORY``
    (``"2G"``, ``"512M"``, bytes, or ``"25%"`` of the available memory), else half the available memory."""
    import psutil

    available = int(psutil.virtual_memory().available)
    raw = os.environ.get("FLGRAPH_ROBUST_MEMORY", "").strip().upper()
    if not raw:
        return available // 2
    if raw.endswith("%"):
        try:
            share = float(raw[:-1])
        except ValueError:
            share = -1.0
        if not 0 <= share <= 100:
            raise ConfigError(f"FLGRAPH_ROBUST_MEMORY={raw!r}: a share must be between 0% and 100%")
        return int(available * share / 100)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?", raw)
    if m is None:
        raise ConfigError(f"FLGRAPH_ROBUST_MEMORY={raw!r} is not a size",
                          fix="give bytes or a size such as '512M', '2G', or a share such as '25%'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def spill_parent() -> str:
    """Where runs put updates held on disk: ``FLGRAPH_SPILL_DIR``, else the system's temporary directory."""
    return os.environ.get("FLGRAPH_SPILL_DIR") or tempfile.gettempdir()


def disk_free(path: str) -> int:
    """Free bytes on the file system of ``path``."""
    return int(shutil.disk_usage(path).free)


def _size(n: int) -> str:
    """``n`` bytes for a person: ``512 B``, ``4.6 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


@dataclass(frozen=True)
class Holding:
    """One reducer's holding in a round: ``clients`` updates of ``values`` values of ``itemsize`` bytes
    (``held_bytes``), the peak memory of its round held in memory (``memory_peak_bytes``: the updates and
    what finalize needs) or on disk (``streamed_peak_bytes``: a block of coordinates of every update), and
    where this run holds them (``place``: ``"memory"`` or ``"disk"``)."""

    reducer: str
    clients: int
    values: int
    itemsize: int
    held_bytes: int
    memory_peak_bytes: int
    streamed_peak_bytes: int
    place: str

    def __str__(self) -> str:
        peak = self.memory_peak_bytes if self.place == "memory" else self.streamed_peak_bytes
        return (f"{self.reducer} holds {self.clients} updates x {self.values} values = {_size(self.held_bytes)} "
                f"a round, {'in memory' if self.place == 'memory' else 'on disk'} (peak memory about {_size(peak)})")


def _needs_all(reducer: Reducer) -> Iterator[_AllUpdates]:
    """The reducers that keep every update inside ``reducer`` (itself, or one it wraps, as ClipNorm does)."""
    if isinstance(reducer, _AllUpdates):
        yield reducer
        return
    for v in vars(reducer).values():
        if isinstance(v, Reducer):
            yield from _needs_all(v)


def _clients_per_round(stages: tuple[Any, ...], population: int) -> int:
    """The most clients a round reduces, from the branch's Select stages (the population without one)."""
    selects = [s for s in stages if isinstance(s, Select)]
    if not selects:
        return population
    n = 0
    for s in selects:
        count = s.count(population)
        if s.sampling == "poisson":  # a random count: its mean plus four standard deviations
            count = math.ceil(count + 4 * math.sqrt(count) + 1)
        n += min(population, count)
    return n


class HoldingPlan:
    """A run's needs-all reducers, their holdings, and the directory of those streamed to disk."""

    def __init__(self, holdings: tuple[Holding, ...], reducers: tuple[_AllUpdates, ...],
                 root: SpillRoot | None) -> None:
        self.holdings = holdings
        self.reducers = reducers
        self.root = root

    @staticmethod
    def of(graph: RoundGraph, population: int, spec: ParamSpec, tag: str, *, budget: int | None = None,
           free: int | None = None) -> HoldingPlan:
        """Plan ``graph``'s holdings for ``population`` clients and a model of ``spec``; streams to disk
        over ``budget`` bytes of memory (default :func:`memory_budget`) and refuses when the disk's
        ``free`` bytes (default: measured) cannot take the updates."""
        found: list[tuple[_AllUpdates, int]] = []
        for branch in graph.branches:
            clients = _clients_per_round(branch.before, population)
            for r in branch.reductions:
                found += [(red, clients) for red in _needs_all(r.tiers[0].reducer)]  # upper tiers: groups
        if not found:
            return HoldingPlan((), (), None)
        budget = memory_budget() if budget is None else budget
        itemsize = np.dtype(spec.carrier).itemsize
        values = spec.size
        in_memory = sum(red.peak_bytes(n, values, itemsize, values)[0] for red, n in found)
        on_disk = in_memory > budget
        root = None
        if on_disk:
            need = sum(n * values * itemsize for _, n in found)
            parent = spill_parent()
            free = disk_free(parent) if free is None else free
            if need > free:
                raise ConfigError(
                    f"the round's updates do not fit: {' and '.join(repr(r) for r, _ in found)} hold "
                    f"{_size(need)} a round ({found[0][1]} clients x {values} values x {itemsize} bytes), over the "
                    f"memory budget ({_size(budget)}) and the free disk space in {parent} ({_size(free)})",
                    fix="select fewer clients per round, use a mean-based reducer (st.WeightedMean, with "
                        "ClipNorm for robustness), or give the driver more memory (FLGRAPH_ROBUST_MEMORY) or "
                        "more disk (FLGRAPH_SPILL_DIR)")
            root = SpillRoot.create(parent, tag)
        holdings = []
        for red, n in found:
            block_bytes = min(_MAX_BLOCK_BYTES, max(_MIN_BLOCK_BYTES, budget // 4))
            block = max(16, block_bytes // max(1, n * 8))
            red.hold_on_disk(root.path if root is not None else None, block)
            mem, streamed = red.peak_bytes(n, values, itemsize, block)
            holdings.append(Holding(repr(red), n, values, itemsize, n * values * itemsize, mem, streamed,
                                    "disk" if on_disk else "memory"))
        for h in holdings:
            log.info("flgraph: %s%s", h, f"; streamed to {root.path}" if root is not None else "")
        return HoldingPlan(tuple(holdings), tuple(r for r, _ in found), root)

    @property
    def streams(self) -> bool:
        """Whether the updates go to disk."""
        return self.root is not None

    def round(self, rnd: int) -> Any:
        """Around one round: its directory for updates held on disk, removed afterwards (also on errors)."""
        for red in self.reducers:
            red.take_held()  # what a failed round's finalizes counted
        return self.root.round(rnd) if self.root is not None else nullcontext()

    def row(self) -> dict[str, Any]:
        """The round's figures: bytes of updates held and where."""
        held = [h for red in self.reducers if (h := red.take_held()) is not None]
        if not held:
            return {}
        return {"updates_held_bytes": sum(b for b, _ in held),
                "updates_held_in": "disk" if any(p == "disk" for _, p in held) else "memory"}

    def close(self) -> None:
        """Remove the directory of updates held on disk."""
        if self.root is not None:
            self.root.remove()
