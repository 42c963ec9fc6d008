"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020), Algorithm 2: FedAvg with two changes.

    each round t:  S_t <- K devices at random                           -> Select
                   each device k does a gamma-inexact amount of work    -> Stragglers(policy="partial")
                   w_k <- argmin_w F_k(w) + mu/2 ||w - w_t||^2          -> LocalTrain(mu=mu)
                   w_{t+1} <- mean of the w_k                           -> Aggregate(WeightedMean)

FedAvg drops the devices that cannot finish their epochs in time; FedProx keeps their partial work and
the proximal term limits how far any device drifts from the global model.

Defaults, the paper's synthetic-data setup: 10 devices per round, 20 local epochs, batch 10, lr 0.01, and
mu = 1 (the paper tunes mu over {0.001, 0.01, 0.1, 1}; 1 is its choice for Synthetic(1,1)). ``stragglers``
is the share of devices doing partial work (the paper's 0, 0.5, 0.9); 0 by default.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedprox(stragglers=0.9)
    >>> [s.name for s in p]
    ['select', 'stragglers', 'broadcast', 'local-train', 'aggregate', 'evaluate']
    >>> p.stages[3].mu, p.stages[1].epochs
    (1.0, 20)
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

from .compose import insert_after
from .fedavg import fedavg

__all__ = ["fedprox"]


def fedprox(
    clients: int = 10,
    *,
    mu: float = 1.0,
    epochs: int = 20,
    batch_size: int = 10,
    lr: float = 0.01,
    stragglers: float = 0.0,
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The FedProx round: FedAvg's, with the proximal term ``mu`` and partial work from ``stragglers``."""
    p = fedavg(clients, epochs=epochs, batch_size=batch_size, lr=lr, evaluate_every=evaluate_every,
               mu=mu, **train)
    if stragglers > 0:
        p = insert_after(p, st.Select, st.Stragglers(stragglers, epochs=epochs, policy="partial"))
    return p
