"""FedAvgM (Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
Visual Classification", 2019): FedAvg with server momentum.

    v <- beta v + mean delta;   w <- w + server_lr * v               -> ServerOpt("sgd", momentum=beta)

Defaults: server momentum 0.9 and server lr 1.0 (the paper's sweep centres on beta = 0.9 with the
effective lr server_lr / (1 - beta) in mind); the client side is FedAvg's (:func:`~flgraph.recipes.fedavg`).

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedavgm(clients=10)
    >>> p.stages[3].method, p.stages[3].momentum
    ('sgd', 0.9)
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

from .compose import swap
from .fedavg import fedavg

__all__ = ["fedavgm"]


def fedavgm(clients: int | None = None, *, momentum: float = 0.9, server_lr: float = 1.0,
            **fedavg_args: Any) -> Pipeline:
    """FedAvg whose Aggregate is replaced by a server SGD step with momentum."""
    return swap(fedavg(clients, **fedavg_args), st.Aggregate,
                st.ServerOpt(st.WeightedMean(), "sgd", lr=server_lr, momentum=momentum))
