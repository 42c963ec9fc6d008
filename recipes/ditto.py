"""Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through Personalization",
ICML 2021), Algorithm 1 with FedAvg as the global solver::

    each round t:  S_t <- sample clients                                  -> Select
                   send w^t to the clients in S_t                          -> Broadcast
                   on client k:  w_k^t <- UPDATE_GLOBAL(w^t, grad F_k)     -> LocalTrain   writes "update"
                                 v_k <- v_k - eta (grad F_k(v_k)
                                               + lam (v_k - w^t))  s steps -> DittoPersonal  v_k: per-client
                   w^{t+1} <- sum_k n_k / n * w_k^t                        -> Aggregate(WeightedMean)
                   mean personalised accuracy of the v_k on held-out data  -> Aggregate(MetricsMean)

``v_k`` starts at ``w^t`` the first time client k is selected and lives in per-client state, so a run
resumes exactly. The round's row records ``ditto_accuracy``/``ditto_loss``: the held-out figures of the
selected clients' new personal models (LocalTrain trains on the same clients' other samples).

Defaults: lam = 0.1 (within the paper's grid {0.05, 0.1, 0.2, 0.5, 1, 2}; the paper tunes it per data set
and it is not checked offline here); the personal solver takes as many passes as the global one
(``personal_epochs = epochs``) at the same step size; client lr, epochs and batch size are the W1
workload's, as in :func:`fedavg`.

With 20% Byzantine clients (sign flip x4) the benign clients' personal models beat the global model and
fine-tuning it on every reported seed (``bench/ditto.py --attack sign_flip``, lam 0.1).

Example:
    >>> from flgraph import recipes
    >>> p = recipes.ditto(clients=10, lam=0.5)
    >>> print(repr(p).splitlines()[3])
      [reduce] update: aggregate; evaluation: aggregate
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

__all__ = ["ditto"]


def ditto(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    lam: float = 0.1,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    personal_epochs: int | None = None,
    personal_lr: float | None = None,
    holdout: float = 0.2,
    server_lr: float = 1.0,
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The Ditto round: FedAvg's graph with the personal step after LocalTrain and its evaluation reduced.

    ``clients`` or ``fraction`` (default ``fraction=0.1``); ``lam`` is Ditto's lambda; ``personal_epochs``
    and ``personal_lr`` (default: ``epochs`` and ``lr``) set the personal solver; ``holdout`` is the share
    of each client's samples neither model trains on, where ``v_k`` is scored. Extra keywords go to
    :class:`~flgraph.stages.LocalTrain`.
    """
    if clients is None and fraction is None:
        fraction = 0.1
    reduce: dict[str, Any] = {"update": st.Aggregate(st.WeightedMean(), server_lr=server_lr)}
    if holdout > 0:  # the personal models' held-out figures, into the round's row
        reduce["evaluation"] = st.Aggregate(st.MetricsMean())
    p = (st.Select(clients, fraction=fraction) >> st.Broadcast()
         >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, holdout=holdout, **train)
         >> st.DittoPersonal(lam, lr=lr if personal_lr is None else personal_lr, batch_size=batch_size,
                             epochs=epochs if personal_epochs is None else personal_epochs, holdout=holdout,
                             evaluate=holdout > 0)
         >> reduce)
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
