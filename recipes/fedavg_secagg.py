"""FedAvg with secure aggregation (SecAgg+: Bell, Bonawitz, Gascón, Lepoint, Raykova, "Secure
Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020), the server learning only the sum::

    each round t:  S_t <- random set of clients                            -> Select
                   neighbour graph; AdvertiseKeys; ShareKeys (on S_t)      -> SecureSetup
                   for each k in S_t in parallel: w_k <- ClientUpdate(k)   -> Broadcast, LocalTrain
                       y_k <- quantise(clip(w_k - w_t)) + masks  (mod M)   -> SecureMask
                   sum_k y_k mod M; Unmasking; w_{t+1} <- w_t + mean       -> SecureAggregate

A recipe of its own rather than a ``secure=`` switch on :func:`fedavg`: secure aggregation puts a stage at
each of three places of the round and changes what is aggregated (the uniform mean of clipped, quantised
updates, not the sample-weighted mean of raw ones), which the graph should show. Defaults: FedAvg's
(``C = 0.1``, ``E = 1``, the W1 workload's ``B`` and ``lr``); each coordinate clipped to ``[-1, 1]``,
``2**20`` levels, ``M = 2**32``; ``neighbours=None`` gives the logarithmic degree ``2 ceil(log2 n) + 2`` and
``threshold=None`` a majority of them.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedavg_secagg(clients=20, neighbours=6, clip=0.5)
    >>> [s.name for s in p]
    ['select', 'broadcast', 'secure-setup', 'local-train', 'secure-mask', 'secure-aggregate', 'evaluate']
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline
from flgraph.secure import Dropouts, SecAggConfig

from .compose import insert_after, swap
from .fedavg import fedavg

__all__ = ["fedavg_secagg"]


def fedavg_secagg(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    server_lr: float = 1.0,
    neighbours: int | None = None,
    threshold: int | None = None,
    clip: float = 1.0,
    levels: int = 2**20,
    modulus: int = 2**32,
    dropouts: Dropouts | None = None,
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The FedAvg round with SecAgg+ (see the module docstring for the settings); extra keywords go to
    :class:`~flgraph.stages.LocalTrain`, ``dropouts`` (:class:`~flgraph.secure.Dropouts`) simulates clients
    leaving at chosen phases."""
    cfg = SecAggConfig(neighbours=neighbours, threshold=threshold, clip=clip, levels=levels, modulus=modulus)
    p = fedavg(clients, fraction=fraction, epochs=epochs, batch_size=batch_size, lr=lr,
               evaluate_every=evaluate_every, **train)
    p = insert_after(p, st.Broadcast, st.SecureSetup(cfg, dropouts=dropouts))
    p = swap(p, st.Aggregate, st.SecureAggregate(cfg, server_lr=server_lr))
    return insert_after(p, st.LocalTrain, st.SecureMask(cfg))
