"""FedBABU (Oh, Kim, Yun, "FedBABU: Toward Enhanced Representation for Federated Image Classification",
ICLR 2022): FedAvg that federates the body only, with the head kept at its random initialization.

    each round:  clients train the body, head frozen                  -> LocalTrain(freeze=[head])
                 server averages the updates (the head's are zero)    -> Aggregate(WeightedMean)
    evaluation:  each client fine-tunes the global model on its own   -> PersonalizedEvaluate(epochs=tau)
                 data, then evaluates on its own held-out data

Defaults: 10 clients per round, 10 local epochs, batch 50, lr 0.1 (the paper's CIFAR setting: E = 10,
B = 50); the head is the module named ``head``; each client holds out 20% of its data for evaluation and
fine-tunes the whole model for ``finetune_epochs = 5`` (the paper's tau) at lr 0.01, every
``personalize_every`` rounds (and at the end of a fit). ``finetune=["head"]`` fine-tunes only the head.

Example:
    >>> from flgraph import recipes
    >>> p = recipes.fedbabu(clients=10)
    >>> [s.name for s in p], p.stages[2].freeze
    (['select', 'broadcast', 'local-train', 'aggregate', 'personalized-evaluate'], ('head',))
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
    holdout: float = 0.2,
    finetune_epochs: int = 5,
    finetune_lr: float = 0.01,
    finetune: Sequence[str] | None = None,
    personalize_every: int = 10,
    **train: Any,
) -> Pipeline:
    """The FedBABU round: FedAvg with the head frozen, evaluated after local fine-tuning."""
    p = fedavg(clients, epochs=epochs, batch_size=batch_size, lr=lr, evaluate_every=None,
               freeze=[head], holdout=holdout, **train)
    return p >> st.PersonalizedEvaluate(personalize_every, holdout=holdout, epochs=finetune_epochs,
                                        lr=finetune_lr, finetune=finetune)
