"""Robust FedAvg (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018): FedAvg whose mean is replaced by a coordinate-wise median or a
coordinate-wise beta-trimmed mean, which tolerate a minority of arbitrary (Byzantine) updates.

    w <- w + median_k(delta_k)          or   w <- w + trmean_beta_k(delta_k)    -> Aggregate(Median | TrimmedMean)

Defaults: ``aggregator="median"``; ``"trimmed_mean"`` trims ``beta = 0.1`` from each side (beta must exceed
the Byzantine share); the client side is :func:`~flgraph.recipes.fedavg`'s.

Example:
    >>> from flgraph import recipes
    >>> recipes.robust_fedavg(clients=10, aggregator="trimmed_mean", beta=0.2).stages[3].reducer
    TrimmedMean(beta=0.2)
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.graph import Pipeline, Reducer

from .compose import swap
from .fedavg import fedavg

__all__ = ["robust_fedavg"]


def robust_fedavg(clients: int | None = None, *, aggregator: str = "median", beta: float = 0.1,
                  **fedavg_args: Any) -> Pipeline:
    """FedAvg with a robust aggregate: ``"median"`` or ``"trimmed_mean"`` (``beta`` trimmed per side)."""
    reducer: Reducer
    if aggregator == "median":
        reducer = st.Median()
    elif aggregator == "trimmed_mean":
        reducer = st.TrimmedMean(beta)
    else:
        raise ConfigError(f"robust_fedavg(aggregator={aggregator!r})", fix="use 'median' or 'trimmed_mean'")
    return swap(fedavg(clients, **fedavg_args), st.Aggregate, st.Aggregate(reducer))
