"""FedNova (Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous
Federated Optimization", NeurIPS 2020), with plain local SGD::

    each round t:  S <- sample clients                                   -> Select
                   (clients do heterogeneous work tau_i)                 -> RandomEpochs(low, high), optional
                   communicate x to the clients in S                     -> Broadcast
                   on client i:  y_i <- tau_i local SGD steps from x     -> LocalTrain
                                 d_i <- (y_i - x) / tau_i                -> FedNovaNormalize
                                 send (d_i, tau_i)                          writes "normalized_update", "tau"
                   tau_eff <- sum_i p_i tau_i,  p_i = n_i / n            -> Aggregate(WeightedMean()) of "tau"
                   x <- x + lr_g tau_eff sum_i p_i d_i                   -> Aggregate(WeightedMean()) of d,
                                                                            FedNovaStep

FedAvg's graph with the update normalised on the client and the model stepped by ``tau_eff`` times the
mean normalised update: FedAvg's ``sum_i p_i (y_i - x)`` weights client i's objective by ``p_i tau_i``, so
with unequal ``tau_i`` it converges to the stationary point of another objective; FedNova's by ``p_i``.
With equal ``tau_i`` the two are the same step.

Defaults: lr_g = 1 and plain SGD (the paper's vanilla-SGD case; momentum or a proximal term change the
normalisation and are refused); ``epochs=(low, high)`` draws each client's epochs per round, as the
paper's ``E_i ~ U[2, 5]`` (unchecked offline); ``p_i`` is renormalised over the round's clients, as
FedAvg's weighted mean. Client lr and batch size are the W1 workload's (the paper tunes them per setting).

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fednova(clients=10, epochs=(2, 5))
    >>> print(repr(p).splitlines()[3])
      [reduce] normalized_update: aggregate; tau: aggregate
"""

from __future__ import annotations

from typing import Any

from flgraph import stages as st
from flgraph.errors import ConfigError
from flgraph.graph import Pipeline

__all__ = ["fednova"]


def fednova(
    clients: int | None = None,
    *,
    fraction: float | None = None,
    epochs: int | tuple[int, int] = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    server_lr: float = 1.0,
    evaluate_every: int | None = 1,
    **train: Any,
) -> Pipeline:
    """The FedNova round: FedAvg's, with normalised client updates and the ``tau_eff`` server step.

    ``clients`` or ``fraction`` (default ``fraction=0.1``); ``epochs`` a number, or ``(low, high)`` to draw
    each client's epochs per round; ``server_lr`` is the paper's global step size. Extra keywords go to
    :class:`~flgraph.stages.LocalTrain`.
    """
    if train.get("mu", 0.0) or float(getattr(train.get("optimizer"), "momentum", 0.0) or 0.0):
        raise ConfigError("fednova(mu=... or optimizer=SGD(momentum=...)): the normalisation d_i = (y_i - x) / "
                          "tau_i holds for plain SGD steps", fix="drop mu= and momentum; give lr=")
    if train.get("optimizer") is not None and type(train["optimizer"]).__name__ != "SGD":
        raise ConfigError("fednova(optimizer=...): the normalisation assumes plain SGD steps",
                          fix="drop optimizer= and give lr=")
    if clients is None and fraction is None:
        fraction = 0.1
    head = st.Select(clients, fraction=fraction)
    if isinstance(epochs, tuple):  # heterogeneous work: LocalTrain's own epochs are the range's top
        head, epochs = head >> st.RandomEpochs(*epochs), epochs[1]
    p = (head >> st.Broadcast()
         >> st.LocalTrain(epochs, batch_size=batch_size, lr=lr, **train)
         >> st.FedNovaNormalize()
         >> {"normalized_update": st.Aggregate(st.WeightedMean()), "tau": st.Aggregate(st.WeightedMean())}
         >> st.FedNovaStep(server_lr))
    return p >> st.Evaluate(every=evaluate_every) if evaluate_every else p
