"""Draw available clients from a large population without checking every client (rejection sampling).

:class:`~flgraph.stages.Select` with ``available=`` must draw uniformly among the clients available at the
round's start. Checking every client costs O(population) a round (with a lazy
:class:`~flgraph.sim.DevicePopulation` that has on/off periods: making every device's profile). Here the
candidates come in a seeded, uniformly random order (uniform positions with repeats dropped, which is a
uniformly random permutation read from its start) and the first ``want`` available ones are kept: a uniform
draw without replacement over the available clients, checking about ``want / availability`` clients.

The fraction of checked candidates that were available estimates the available count; when candidates
would cover a large share of the population (few clients available) the caller falls back to the exact
full mask instead.

Example:
    >>> import numpy as np
    >>> ids = np.arange(1_000)
    >>> got = draw_available(ids, 5, np.random.default_rng(0), lambda c: c % 2 == 0)
    >>> got is not None and len(got.ids) == 5 and bool((got.ids % 2 == 0).all())
    True
    >>> 0 < got.checked < 200 and 300 < got.available_estimate < 700
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["AvailableDraw", "draw_available"]

# past this share of the population checked, the full mask is cheaper than drawing on with repeats
_MAX_CHECKED_SHARE = 0.25


@dataclass(frozen=True)
class AvailableDraw:
    """The kept ids (in draw order), how many candidates were checked, and the available count it implies."""

    ids: np.ndarray
    checked: int
    available_estimate: int


def draw_available(ids: np.ndarray, want: int, rng: np.random.Generator,
                   is_available: Callable[[np.ndarray], np.ndarray]) -> AvailableDraw | None:
    """The first ``want`` available clients of ``ids`` in a seeded random order, or None when that would
    check more than a quarter of ``ids`` (the caller then builds the full mask).

    ``is_available(candidates)`` returns a bool mask over ``candidates``; it is called with each batch of
    new candidates only, so every client is checked at most once. The batches depend only on ``rng`` and on
    the answers, so the same seed and availability give the same draw.
    """
    n = len(ids)
    limit = int(n * _MAX_CHECKED_SHARE)
    kept: list[np.ndarray] = []
    n_kept = n_ok = checked = 0
    seen = np.empty(0, np.int64)  # sorted positions already checked
    while n_kept < want:
        rate = (n_ok + 1) / (checked + 1)  # availability so far (1 before any check), sizes the next batch
        batch = min(n, math.ceil(1.2 * (want - n_kept) / rate) + 16)
        if checked + batch > limit:
            return None
        pos = rng.integers(0, n, size=batch)
        _, first = np.unique(pos, return_index=True)
        pos = pos[np.sort(first)]  # repeats within the batch dropped, order kept
        pos = pos[~np.isin(pos, seen)]  # and candidates of earlier batches
        if not len(pos):
            continue
        seen = np.union1d(seen, pos)
        mask = np.asarray(is_available(ids[pos]))
        ok = pos[mask]
        kept.append(ok[: want - n_kept])
        n_kept += len(kept[-1])
        n_ok += len(ok)
        checked += len(pos)
    chosen = ids[np.concatenate(kept)] if kept else ids[:0]
    return AvailableDraw(np.asarray(chosen, np.int64), checked, round(n * n_ok / checked) if checked else 0)
