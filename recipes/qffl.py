"""q-FFL / q-FedAvg (Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning",
ICLR 2020), Algorithm 2 q-FedAvg: FedAvg's graph with a fairer server step::

    each round t:  S_t <- m devices, device k with probability p_k        -> Select(weighting="samples")
                   send w^t to the devices of S_t                          -> Broadcast
                   on device k:  wbar_k <- E epochs of SGD from w^t        -> LocalTrain
                                 F_k = f_k(w^t);  Delta w_k = L (w^t - wbar_k)
                                 Delta_k = F_k^q Delta w_k                 -> QFFLUpdate(q, lr)
                                 h_k = q F_k^(q-1) ||Delta w_k||^2 + L F_k^q   writes "qffl_delta", "qffl_h"
                   w^{t+1} <- w^t - sum_k Delta_k / sum_k h_k              -> Aggregate(Mean()) of each
                                                                              >> QFedAvgStep

``L = 1/lr``, the paper's estimate of the Lipschitz constant of the local gradients from the client step
size (so the clients must run plain SGD with that ``lr``). A larger ``q`` weighs the devices with a
higher loss more; ``q = 0`` is FedAvg with every device weighted the same. The sums are taken as means
over the same clients (the same ratio).

Defaults: ``q = 1`` and 10 devices per round, as we recall the paper's synthetic-data setup, and the
sampling by p_k = n_k / n of Algorithm 2; E = 1, batch 32 and lr 0.05 are the W1 workload's. None of the
paper's per-dataset q, lr, batch sizes or sampling details is checked here (no copy of the paper offline);
``Select`` draws without replacement.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.qffl(clients=10, q=1.0)
    >>> print(repr(p).splitlines()[3])
      [reduce] qffl_delta: aggregate; qffl_h: aggregate
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.graph import Pipeline

__all__ = ["qffl"]


def qffl(
    clients: int | None = 10,
    *,
    q: float = 1.0,
    fraction: float | None = None,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    holdout: float = 0.0,
    weighting: str = "samples",
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The q-FedAvg round: FedAvg's select, broadcast and local SGD; q-FFL's values and server step.

    ``clients`` or ``fraction``; ``holdout`` is passed to both client stages, so ``F_k`` is scored on the
    samples the client trains on. Extra keywords go to :class:`~flgraph.stages.LocalTrain`.
    """
    for key in ("optimizer", "loss"):
        if key in train:
            raise ConfigError(f"recipes.qffl({key}=...): q-FedAvg's L = 1/lr assumes plain SGD steps of size "
                              "lr on the cross-entropy F_k that QFFLUpdate scores", fix=f"drop {key}= and give lr=")
    p = (st.Select(clients, fraction=fraction, weighting=weighting) >> st.Broadcast()
         >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, holdout=holdout, **train)
         >> st.QFFLUpdate(q, lr=lr, holdout=holdout)
         >> {"qffl_delta": st.Aggregate(st.Mean()), "qffl_h": st.Aggregate(st.Mean())}
         >> st.QFedAvgStep())
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
