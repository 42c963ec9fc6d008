"""The small population, model and fixed client draws that the recipe tests share.

Each test keeps its own reference implementation, written from its paper; only this setup is common.
Client 5 is drawn every round and clients 0 and 9 twice, so per-client state carries over between rounds.
"""

from __future__ import annotations

import numpy as np
import torch

import flgraph as fg

NUM_CLIENTS, PER_ROUND = 12, 4
CHOSEN = {1: [0, 5, 7, 9], 2: [1, 5, 8, 11], 3: [0, 2, 5, 9]}


def choose(rnd, population, count, rng):
    """A sampler giving round ``rnd`` the clients of ``CHOSEN``."""
    return np.array(CHOSEN[rnd])


def population() -> fg.data.FederatedDataset:
    return fg.data.synthetic_classification(num_clients=NUM_CLIENTS, samples_per_client=20, num_features=6,
                                            num_classes=3, alpha=0.3, seed=3)


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return fg.models.mlp(6, [8], 3)
