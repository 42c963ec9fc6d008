"""The SecAgg+ communication graph: a random k-regular graph over the round's clients (Bell et al.,
CCS 2020, a Harary graph over a random ordering).

Clients are placed on a ring in a random order; each is joined to the ``k / 2`` clients on either side of it
(``k`` even). With ``k >= n - 1`` every client is every other's neighbour: the original SecAgg (Bonawitz et
al., CCS 2017). The graph is public: it is drawn from the run's seed and the round, like the selection.

Example:
    >>> import numpy as np
    >>> g = neighbour_graph(6, 2, np.random.default_rng(0))
    >>> sorted(len(n) for n in g), all(i in g[j] for i in range(6) for j in g[i])
    ([2, 2, 2, 2, 2, 2], True)
"""

from __future__ import annotations

import numpy as np

__all__ = ["neighbour_graph"]


def neighbour_graph(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """For each of ``n`` positions, its neighbours' positions (sorted): a symmetric ``min(k, n-1)``-regular
    graph. ``k`` must be even unless it reaches ``n - 1`` (a ring of ``n`` with an odd degree has no
    regular circulant shape for odd ``n``)."""
    if n < 1:
        raise ValueError("a neighbour graph needs at least one client")
    if k < 1:
        raise ValueError(f"neighbours={k}: each client needs at least one neighbour")
    if k >= n - 1:
        everyone = np.arange(n)
        return [np.delete(everyone, i) for i in range(n)]
    if k % 2:
        raise ValueError(f"neighbours={k} must be even (or at least the number of clients less one)")
    order = rng.permutation(n)
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)
    half = k // 2
    steps = np.concatenate([np.arange(-half, 0), np.arange(1, half + 1)])
    return [np.sort(order[(where[i] + steps) % n]) for i in range(n)]
