"""Workload W1 / W1-heavy for flgraph, written from ``WORKLOAD.md`` (the shared definition).

This module is the workload itself (deterministic synthetic data generated on demand, the seeded client
sampler, the 2NN MLP and the CNN, the local SGD step, the test evaluation) plus the adapters that run it
through flgraph (:func:`dataset`, :func:`sampler`, :func:`train_fn`, :func:`pipeline`).
``bench/check_w1.py`` verifies that it does bit-for-bit the same work as the shared reference.

Everything here is a top-level function, so it pickles *by reference*: a Dask worker unpickles it by
importing ``w1``. The embedded cluster's worker processes are spawned with the driver's ``sys.path``, so
this works as long as ``bench/`` is on the driver's path (it is when you run a script in ``bench/``).
For a cluster started by hand (``dask scheduler`` / ``dask worker``), whose workers cannot import ``w1``,
ship the module by value before creating the run::

    import cloudpickle, w1
    cloudpickle.register_pickle_by_value(w1)

Usage (from the repository root)::

    .venv/bin/python -c "import sys; sys.path.insert(0, 'bench'); import w1; print(w1.WORKLOADS)"
    .venv/bin/python bench/check_w1.py        # compare with the shared reference
    .venv/bin/python bench/w1_flgraph.py      # run W1 through flgraph
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flgraph.stages import pure_sampler
from torch import nn

__all__ = [
    "WORKLOADS",
    "class_means",
    "client_data",
    "dataset",
    "evaluate",
    "initial_model",
    "local_train",
    "pipeline",
    "sample_clients",
    "sampler",
    "test_data",
    "train_fn",
]

NUM_CLIENTS = 1000
SAMPLES = 64
FEATURES = 784
CLASSES = 10
ALPHA = 0.5  # Dirichlet concentration of each client's label distribution
SIGNAL = 0.3  # x = SIGNAL * mu[y] + N(0, 1)
TEST_PER_CLASS = 200
LR = 0.05
BATCH = 32

#: name -> (model kind, local epochs, clients per round, rounds), as in WORKLOAD.md's table.
WORKLOADS: dict[str, dict[str, Any]] = {
    "W1": {"model": "mlp", "epochs": 1, "clients": 100, "rounds": 20},
    "W1-heavy": {"model": "cnn", "epochs": 5, "clients": 10, "rounds": 5},
}

_means: np.ndarray | None = None


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
def class_means() -> np.ndarray:
    """The 10 class means, shape (10, 784), float32: ``default_rng(0).standard_normal``."""
    global _means
    if _means is None:
        _means = np.random.default_rng(0).standard_normal((CLASSES, FEATURES)).astype(np.float32)
    return _means


def client_data(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Client ``k``'s 64 samples ``(x float32 (64, 784), y int64 (64,))``, generated on demand."""
    if not 0 <= k < NUM_CLIENTS:
        raise ValueError(f"W1 has clients 0..{NUM_CLIENTS - 1}, not {k}")
    g = np.random.default_rng([1, k])
    label_p = g.dirichlet([ALPHA] * CLASSES)
    y = g.choice(CLASSES, size=SAMPLES, p=label_p).astype(np.int64)
    x = SIGNAL * class_means()[y] + g.standard_normal((SAMPLES, FEATURES), dtype=np.float32)
    return x.astype(np.float32, copy=False), y


def test_data() -> tuple[np.ndarray, np.ndarray]:
    """The balanced 2000-sample test set (200 per class)."""
    g = np.random.default_rng([2])
    y = g.permutation(np.repeat(np.arange(CLASSES), TEST_PER_CLASS)).astype(np.int64)
    x = SIGNAL * class_means()[y] + g.standard_normal((len(y), FEATURES), dtype=np.float32)
    return x.astype(np.float32, copy=False), y


def sample_clients(rnd: int, n: int) -> list[int]:
    """The ``n`` clients of round ``rnd`` (1-based): uniform without replacement, seeded by ``[3, rnd]``."""
    return np.random.default_rng([3, rnd]).choice(NUM_CLIENTS, size=n, replace=False).tolist()


# ------------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------------
class TwoNN(nn.Module):
    """McMahan et al.'s "2NN": 784-200-200-10 with ReLUs (199,210 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = nn.Linear(FEATURES, 200)
        self.hidden2 = nn.Linear(200, 200)
        self.out = nn.Linear(200, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.hidden1(x.reshape(x.shape[0], -1)))
        return self.out(F.relu(self.hidden2(h)))


class ConvNet(nn.Module):
    """The W1-heavy CNN: two 5x5 conv + 2x2 max-pool blocks (32, 64 channels), fc 512, fc 10 (582,026)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 32, 5)
        self.c2 = nn.Conv2d(32, 64, 5)
        self.f1 = nn.Linear(64 * 4 * 4, 512)
        self.f2 = nn.Linear(512, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, 28, 28)
        h = F.max_pool2d(F.relu(self.c1(h)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return self.f2(F.relu(self.f1(h.flatten(1))))


def initial_model(kind: str) -> nn.Module:
    """The initial global model, ``"mlp"`` (W1) or ``"cnn"`` (W1-heavy), built right after ``manual_seed(0)``."""
    cls = {"mlp": TwoNN, "cnn": ConvNet}.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}: use 'mlp' or 'cnn'")
    torch.manual_seed(0)
    return cls()


# ------------------------------------------------------------------------------------------------------
# Local training and evaluation
# ------------------------------------------------------------------------------------------------------
def local_train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, rnd: int, k: int) -> float:
    """Plain SGD (lr 0.05) over ``epochs`` passes in batches of 32; returns the mean batch loss.

    Epoch ``e`` visits the samples in the order ``default_rng([4, rnd, k, e]).permutation(n)``.
    """
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    n = len(y)
    losses: list[float] = []
    for e in range(epochs):
        order = torch.from_numpy(np.random.default_rng([4, rnd, k, e]).permutation(n))
        for start in range(0, n, BATCH):
            batch = order[start : start + BATCH]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs[batch]), ys[batch])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return sum(losses) / max(len(losses), 1)


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)``."""
    model.eval()
    logits = model(torch.from_numpy(x))
    loss = F.cross_entropy(logits, torch.from_numpy(y)).item()
    acc = float((logits.argmax(1).numpy() == y).mean())
    return acc, float(loss)


# ------------------------------------------------------------------------------------------------------
# flgraph adapters
# ------------------------------------------------------------------------------------------------------
def dataset() -> Any:
    """W1's 1000 clients as a flgraph FunctionDataset (generated on demand, never cached) with its test set."""
    from flgraph.data import FederatedDataset

    return FederatedDataset.from_function(client_data, num_clients=NUM_CLIENTS, num_samples=SAMPLES,
                                          test=test_data)


@pure_sampler
def sampler(round: int, population: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """flgraph ``Select(sampler=...)``: W1's seeded choice (ignores flgraph's own stream ``rng``), pure: it
    depends on the round and count only, so flgraph may choose a round's clients ahead."""
    return sample_clients(round, count)


def train_fn(model: nn.Module, data: Any, ctx: Any) -> float:
    """flgraph ``LocalTrain(train_fn=...)``: W1's local step on the client's data."""
    return local_train(model, data.x, data.y, ctx.epochs, ctx.round, ctx.client)


def pipeline(clients: int = 100, epochs: int = 1) -> Any:
    """The W1 round: W1's sampler, broadcast, W1's local step, sample-weighted FedAvg."""
    from flgraph import stages as st

    return (st.Select(clients=clients, sampler=sampler) >> st.Broadcast()
            >> st.LocalTrain(epochs, train_fn=train_fn) >> st.Aggregate(st.WeightedMean()))
