"""FedAdagrad (Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated
Optimization", ICLR 2021), Algorithm 2 with the adagrad server optimizer:

    delta_t <- mean of the client deltas (FedAvg's client side)     -> LocalTrain, WeightedMean
    m_t <- beta1 m + (1 - beta1) delta_t, v_t per adagrad               -> ServerOpt("adagrad")
    w <- w + server_lr * m_t / (sqrt(v_t) + tau)

Defaults: beta1 = 0.9, beta2 = 0.99, tau = 1e-3 (the paper's defaults), server lr 0.1 (the paper tunes
the server and client learning rates per task on a log grid); the client side is
:func:`~flgraph.recipes.fedavg`'s.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedadagrad(clients=10)
    >>> p.stages[3].method, p.stages[3].lr
    ('adagrad', 0.1)
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

from .compose import swap
from .fedavg import fedavg

__all__ = ["fedadagrad"]


def fedadagrad(clients: int | None = None, *, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
            tau: float = 1e-3, **fedavg_args: Any) -> Pipeline:
    """FedAvg whose Aggregate is replaced by a FedAdagrad server step."""
    return swap(fedavg(clients, **fedavg_args), st.Aggregate,
                st.ServerOpt(st.WeightedMean(), "adagrad", lr=server_lr, beta1=beta1, beta2=beta2, tau=tau))
