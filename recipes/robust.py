"""Robust FedAvg (Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards
Optimal Statistical Rates", ICML 2018): FedAvg whose mean is replaced by a coordinate-wise median or a
coordinate-wise beta-trimmed mean, which tolerate a minority of arbitrary (Byzantine) updates.

    w <- w + server_lr * median_k(delta_k)     or   w <- w + server_lr * trmean_beta_k(delta_k)

Defaults: ``aggregator="median"``; ``byzantine_fraction=0.1`` is the share of attackers the run assumes,
and ``"trimmed_mean"`` trims ``beta = byzantine_fraction`` from each side unless told otherwise (Yin et al.'s
guarantee needs ``beta >= byzantine_fraction``; the smallest such beta discards the fewest honest values);
``server_lr=1.0`` and the client side are :func:`~flgraph.recipes.fedavg`'s.

What to expect (``bench/robust_w1.py``): both rules keep the model learning where the plain mean collapses,
but they are not free. Their error bound has a term of order ``byzantine_fraction`` times the spread of
one client's update per coordinate (Yin et al.'s ``alpha / sqrt(n)``, for IID clients). With non-IID
clients that spread is large next to the mean update, so each round makes less progress than clean FedAvg,
and a sign-flipping minority shifts every coordinate by a quantile of the honest values (Karimireddy, He
and Jaggi, ICLR 2022, on robust aggregation with heterogeneous data). More rounds close the gap.

``momentum=0.9`` closes it: the server steps with momentum on the robust aggregate (as FedAvgM, Hsu et al.
2019, does on the mean), ``v <- momentum * v + median_k(delta_k); w <- w + server_lr * v``. Averaging the
robust aggregate over rounds cancels much of its per-round error, the reason Karimireddy, He and Jaggi
(ICML 2021, "Learning from History for Byzantine Robust Optimization") add momentum to robust
aggregation. On W1 with 20% sign-flipping clients it turns median / trimmed mean from 0.50 / 0.53 into
0.9995 / 1.00 after 20 rounds, equal to the clean run with the same momentum (1.00), while the mean with
momentum diverges (``bench/robust_w1.py --momentum 0.9``). The default stays 0 (Yin et al.'s rule as
published).

Example:
    >>> from flgraph import recipes
    >>> recipes.robust_fedavg(clients=10, aggregator="trimmed_mean", byzantine_fraction=0.2).stages[3].reducer
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


def robust_fedavg(clients: int | None = None, *, aggregator: str = "median", byzantine_fraction: float = 0.1,
                  beta: float | None = None, server_lr: float = 1.0, momentum: float = 0.0,
                  **fedavg_args: Any) -> Pipeline:
    """FedAvg with a robust aggregate: ``"median"`` or ``"trimmed_mean"`` (``beta`` trimmed per side).

    ``byzantine_fraction`` is the share of Byzantine clients to tolerate; ``beta`` defaults to it and may
    not be smaller. ``server_lr`` scales the aggregated step; ``momentum > 0`` makes it a server SGD step
    with momentum (:class:`~flgraph.stages.ServerOpt`); the other keywords go to
    :func:`~flgraph.recipes.fedavg`.

    Example:
        >>> from flgraph import recipes
        >>> recipes.robust_fedavg(10, server_lr=2.0).stages[3].server_lr
        2.0
        >>> recipes.robust_fedavg(10, momentum=0.9).stages[3]
        ServerOpt(reducer=Median(), method='sgd', lr=1.0, momentum=0.9, beta1=0.9, beta2=0.99, tau=0.001)
    """
    if not 0 <= byzantine_fraction < 0.5:
        raise ConfigError(f"robust_fedavg(byzantine_fraction={byzantine_fraction}): must be in [0, 0.5)",
                          fix="no coordinate-wise rule tolerates half of the clients or more being Byzantine")
    reducer: Reducer
    if aggregator == "median":
        if beta is not None:
            raise ConfigError("robust_fedavg(aggregator='median', beta=...): the median trims nothing",
                              fix="drop beta, or use aggregator='trimmed_mean'")
        reducer = st.Median()
    elif aggregator == "trimmed_mean":
        beta = byzantine_fraction if beta is None else beta
        if beta < byzantine_fraction:
            raise ConfigError(f"robust_fedavg(beta={beta}, byzantine_fraction={byzantine_fraction}): trimming "
                              "less than the Byzantine share per side lets attackers through (Yin et al. 2018)",
                              fix=f"beta >= {byzantine_fraction}, or leave beta out")
        reducer = st.TrimmedMean(beta)
    else:
        raise ConfigError(f"robust_fedavg(aggregator={aggregator!r})", fix="use 'median' or 'trimmed_mean'")
    if not 0 <= momentum < 1:
        raise ConfigError(f"robust_fedavg(momentum={momentum}): must be in [0, 1)", fix="e.g. momentum=0.9")
    agg = (st.ServerOpt(reducer, "sgd", lr=server_lr, momentum=momentum) if momentum
           else st.Aggregate(reducer, server_lr=server_lr))
    return swap(fedavg(clients, **fedavg_args), st.Aggregate, agg)
