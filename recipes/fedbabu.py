"""FedBABU (Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification",
ICLR 2022): FedAvg that federates the body only, with the head kept at its random initialization.

    each round:  clients train the body, head frozen                  -> LocalTrain(freeze=[head])
                 server averages the updates (the head's are zero)    -> Aggregate(WeightedMean)
    evaluation:  each client fine-tunes the global model on its own   -> PersonalizedEvaluate(epochs=tau)
                 data, then evaluates on its own held-out data

Defaults: 10 clients per round, 10 local epochs, batch 50, lr 0.1 with SGD momentum 0.9 (the paper's CIFAR
setting: E = 10, B = 50; the authors' code always trains with momentum and gives the head a learning rate
of 0); the head is the module named ``head`` (weight and bias); each client holds out 20% of its data for
evaluation and fine-tunes the whole model for ``finetune_epochs = 5`` (the paper's tau) at lr 0.01 (plain
SGD), every ``personalize_every`` rounds (and at the end of a fit). ``finetune=["head"]`` fine-tunes only
the head. ``train_head=True`` trains the head too: FedAvg under the same local optimizer and the same
personalized evaluation, the paper's baseline.

FedBABU's advantage needs heavy local training: on label-skewed data, a FedAvg client's head overfits its
few labels and its body follows; the paper's gap grows with E. ``bench/fedbabu.py`` measures it here
(FedBABU ahead at E = 5 and 10 with momentum 0.9; level or behind at E = 1, or with momentum 0 or 0.5).

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedbabu(clients=10)
    >>> [s.name for s in p], p.stages[2].freeze
    (['select', 'broadcast', 'local-train', 'aggregate', 'personalized-evaluate'], ('head',))
    >>> recipes.fedbabu(clients=10, train_head=True).stages[2].freeze is None  # the FedAvg baseline
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flgraph import stages as st
from flgraph.graph import Pipeline

from .fedavg import fedavg

__all__ = ["fedbabu"]


def fedbabu(
    clients: int = 10,
    *,
    head: str = "head",
    epochs: int = 10,
    batch_size: int = 50,
    lr: float = 0.1,
    momentum: float = 0.9,
    holdout: float = 0.2,
    finetune_epochs: int = 5,
    finetune_lr: float = 0.01,
    finetune: Sequence[str] | None = None,
    personalize_every: int = 10,
    train_head: bool = False,
    **train: Any,
) -> Pipeline:
    """The FedBABU round: FedAvg with the head frozen, evaluated after local fine-tuning.

    ``momentum`` is the local SGD's (0 is plain SGD; ignored when ``optimizer=`` is given). Extra keywords
    go to :class:`~flgraph.stages.LocalTrain`.
    """
    if momentum > 0:
        train.setdefault("optimizer", st.SGD(lr, momentum=momentum))
    p = fedavg(clients, epochs=epochs, batch_size=batch_size, lr=lr, evaluate_every=None,
               freeze=None if train_head else [head], holdout=holdout, **train)
    return p >> st.PersonalizedEvaluate(personalize_every, holdout=holdout, epochs=finetune_epochs,
                                        lr=finetune_lr, finetune=finetune)
