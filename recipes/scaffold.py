"""SCAFFOLD (Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging
for Federated Learning", ICML 2020), Algorithm 1 with option II control variates::

    each round r:  S <- sample clients                                   -> Select
                   communicate (x, c) to the clients in S                -> Broadcast("params", "control")
                   on client i:  y <- x;  K steps  y <- y - lr (g_i(y) - c_i + c)
                                 c_i+ <- c_i - c + (x - y) / (K lr)      -> LocalTrain(correction="scaffold")
                                 send (dy_i, dc_i) = (y - x, c_i+ - c_i)    writes "update", "control_delta"
                   x <- x + lr_g mean_S(dy_i)                            -> Aggregate(Mean(), server_lr=lr_g)
                   c <- c + |S|/N mean_S(dc_i)                           -> Aggregate(Mean()) >> ScaffoldControl

Defaults: lr_g = 1 (the paper's experiments), plain SGD on the clients (option II assumes it); the client
lr, epochs and batch size are the W1 workload's (the paper tunes the local step size per setting and does
not fix one that can be checked offline). Each client's c_i lives in per-client state on disk, so a run
resumes exactly.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.scaffold(clients=10)
    >>> print(repr(p).splitlines()[3])
      [reduce] update: aggregate; control_delta: aggregate
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

__all__ = ["scaffold"]


def scaffold(
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
    """The SCAFFOLD round: FedAvg's graph with a second per-client value and the server control variate.

    ``clients`` or ``fraction`` (default ``fraction=0.1``); ``server_lr`` is the paper's global step size
    ``eta_g``; extra keywords go to :class:`~flgraph.stages.LocalTrain`.
    """
    if clients is None and fraction is None:
        fraction = 0.1
    p = (st.Select(clients, fraction=fraction) >> st.Broadcast("params", "control")
         >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, correction="scaffold", **train)
         >> {"update": st.Aggregate(st.Mean(), server_lr=server_lr), "control_delta": st.Aggregate(st.Mean())}
         >> st.ScaffoldControl())
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
