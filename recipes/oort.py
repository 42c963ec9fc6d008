"""Oort (Lai, Zhu, Madhyastha, Chowdhury, "Oort: Efficient Federated Learning via Guided Participant
Selection", OSDI 2021), Algorithm 1 on FedAvg's round, with FedScale's defaults::

    each round R:  util(i) <- (U_i - min)/range + sqrt(0.1 ln R / L_i)        (clipped, UCB staleness)
                   util(i) *= (T / t_i)^alpha  where t_i > T                 -> OortSelect
                   pick (1 - eps) 1.3K by util among the top, eps 1.3K unseen by size
                   eps <- max(0.98 eps, 0.3); T relaxed by the pacer when utility stalls
                   train the 1.3K, keep the first K to finish                -> Broadcast >> LocalTrain
                   U_i <- |B_i| sqrt(mean_k loss_k^2), t_i <- its duration   -> OortUtility
                   w <- sum_k n_k / n * w_k                                  -> Aggregate(WeightedMean)
                   record (U_i, t_i, L_i = R) of the counted clients         -> Aggregate(Collect) >> OortFeedback

Defaults: FedScale's (exploration 0.9, decay 0.98, floor 0.3, pacer step 20 and delta 5 from the 30th
percentile, alpha = 2, over-commitment 1.3, clip at the 0.9 quantile, blacklisting off); the paper's own
settings per task are not all given and are unchecked offline. Client training as in :func:`fedavg`. Put
``st.Simulate(devices)`` after the selection (``simulate=``) so that durations are simulated.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.oort(clients=10)
    >>> [s.name for s in p][:4]
    ['oort-select', 'broadcast', 'local-train', 'oort-utility']
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

__all__ = ["oort"]


def oort(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    simulate: st.Simulate | None = None,
    over_select: float = 1.3,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    evaluate_every: int | None = 1,
    select: dict[str, Any] | None = None,
    **train: Any,
) -> Pipeline:
    """The Oort round: FedAvg's graph with Oort's selection and the utilities fed back to it.

    ``simulate``: a :class:`~flgraph.stages.Simulate` placed right after the selection; ``select``: more
    :class:`~flgraph.stages.OortSelect` settings; extra keywords go to :class:`~flgraph.stages.LocalTrain`.
    """
    if clients is None and fraction is None:
        fraction = 0.1
    if simulate is not None:  # every client's duration estimated from its device until it reports one
        select = {"devices": simulate.devices, "epochs": epochs, **(select or {})}
    p: Any = st.OortSelect(clients, fraction=fraction, over_select=over_select, **(select or {}))
    if simulate is not None:
        p = p >> simulate
    p = (p >> st.Broadcast() >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, **train) >> st.OortUtility()
         >> {"update": st.Aggregate(st.WeightedMean()), "utility": st.Aggregate(st.Collect())}
         >> st.OortFeedback())
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
