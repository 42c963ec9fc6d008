"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017), Algorithm 1 FederatedAveraging::

    each round t:  S_t <- random set of max(C*K, 1) clients      -> Select
                   for each k in S_t in parallel:                 -> Broadcast
                       w_k <- ClientUpdate(k, w_t)  (E epochs, B) -> LocalTrain
                   w_{t+1} <- sum_k n_k / n * w_k                 -> Aggregate(WeightedMean)

Defaults: C = 0.1 of the clients per round and E = 1 as in the paper's MNIST experiments; B = 32 and
lr = 0.05 (the W1 workload's; the paper tunes lr per setting and also reports B = 10).

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedavg(clients=100, epochs=1, batch_size=32, lr=0.05)
    >>> [s.name for s in p]
    ['select', 'broadcast', 'local-train', 'aggregate', 'evaluate']
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

__all__ = ["fedavg"]


def fedavg(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    server_lr: float = 1.0,
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The FedAvg round: uniform selection, local SGD, sample-weighted mean of the updates.

    ``clients`` or ``fraction`` (default ``fraction=0.1``, the paper's C); ``evaluate_every=None`` leaves
    out the per-round central evaluation. Extra keywords go to :class:`~flgraph.stages.LocalTrain`.
    """
    if clients is None and fraction is None:
        fraction = 0.1
    p = (st.Select(clients, fraction=fraction) >> st.Broadcast()
         >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, **train)
         >> st.Aggregate(st.WeightedMean(), server_lr=server_lr))
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
