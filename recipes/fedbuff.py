"""FedBuff (Nguyen et al., "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022).

    keep `concurrency` clients training, each from the model current when it started   -> Select(C)
    on each arrival:  delta_i weighted by s(staleness_i), added to the buffer              -> BufferedAggregate
    every K arrivals: x <- x + eta_g * buffer / K; empty the buffer                         (buffer=K)
    a new client starts as each one finishes                                               (async engine)

Defaults as in the paper: K = 10, staleness weight s(t) = 1 / sqrt(1 + t) (polynomial, a = 0.5),
server learning rate 1, uniform weights (1/K). ``max_staleness`` drops (and counts) older updates.
Add ``devices=`` (a :class:`flgraph.sim.DevicePopulation`) to run on the virtual clock of simulated
devices; arrivals are then ordered by simulated finish time.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedbuff(concurrency=100, buffer=10)
    >>> [s.name for s in p]
    ['select', 'broadcast', 'local-train', 'buffered-aggregate', 'evaluate']
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

__all__ = ["fedbuff"]


def fedbuff(
    concurrency: int = 100,
    *,
    buffer: int = 10,
    staleness: Any = None,
    max_staleness: int | None = None,
    server_lr: float = 1.0,
    devices: Any = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    compress: Any = None,
    evaluate_every: int | None = 10,
    **train: Any,
) -> Pipeline:
    """The FedBuff pipeline; run it with :class:`flgraph.Run` like any other (``fit(rounds=server steps)``)."""
    p = st.Select(clients=concurrency) >> (st.Simulate(devices) >> st.Broadcast() if devices is not None
                                          else st.Broadcast())
    p = p >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, **train)
    if compress is not None:
        p = p >> st.Compress(compress)
    p = p >> st.BufferedAggregate(buffer, staleness=staleness if staleness is not None else st.Polynomial(0.5),
                                  max_staleness=max_staleness, server_lr=server_lr)
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
