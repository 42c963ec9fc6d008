"""The Synthetic(alpha, beta) federated data of the FedProx paper (Li et al., MLSys 2020, Sec. 5.1).

Generated as in the paper's code (``data/synthetic_*/generate_niid.py``): 30 devices, 60 features,
10 classes; device ``k`` has ``int(lognormal(4, 2)) + 50`` samples; a per-device softmax model
``y = argmax(softmax(W_k x + b_k))`` with ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)``, ``u_k ~ N(0, alpha)``,
and features ``x ~ N(v_k, Sigma)`` with ``Sigma = diag(j^-1.2)``, ``v_k ~ N(B_k, 1)``, ``B_k ~ N(0, beta)``.
``alpha`` controls how much the local models differ, ``beta`` how much the local data differ. Each device's
samples are shuffled and split 90% / 10% into training and test data, as in the paper's code.

The generator is seeded by ``seed`` (numpy's ``default_rng``; the paper's code uses the legacy global
``np.random``, so the numbers differ, the distribution is the same).

Example:
    >>> from flgraph.data import fedprox_synthetic
    >>> train, test = fedprox_synthetic(1.0, 1.0, seed=0)
    >>> train.num_clients, train.load(0).x.shape[1], test.num_clients
    (30, 60, 30)
    >>> train.num_samples(0) + test.num_samples(0) >= 50
    True
"""

from __future__ import annotations

import numpy as np

from flgraph.data.dataset import ClientData, FederatedDataset
from flgraph.errors import DataError

__all__ = ["fedprox_synthetic", "generate_synthetic"]


def generate_synthetic(alpha: float, beta: float, *, num_devices: int = 30, dimension: int = 60,
                       num_classes: int = 10, iid: bool = False,
                       seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each device's ``(x float32 (n_k, dimension), y int64 (n_k,))``, in the paper's generative order."""
    if alpha < 0 or beta < 0:
        raise DataError(f"Synthetic(alpha={alpha}, beta={beta}): both are standard deviations, >= 0")
    if num_devices < 1:
        raise DataError(f"num_devices={num_devices}: at least one device")
    rng = np.random.default_rng(seed)
    samples = rng.lognormal(4, 2, num_devices).astype(int) + 50
    mean_w = rng.normal(0, alpha, num_devices)
    mean_b = mean_w
    big_b = rng.normal(0, beta, num_devices)
    cov_diag = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2)
    mean_x = np.empty((num_devices, dimension))
    for k in range(num_devices):
        mean_x[k] = np.full(dimension, big_b[k]) if iid else rng.normal(big_b[k], 1, dimension)
    w_global = rng.normal(0, 1, (dimension, num_classes)) if iid else None
    b_global = rng.normal(0, 1, num_classes) if iid else None
    out = []
    for k in range(num_devices):
        w = w_global if w_global is not None else rng.normal(mean_w[k], 1, (dimension, num_classes))
        b = b_global if b_global is not None else rng.normal(mean_b[k], 1, num_classes)
        # a diagonal covariance: multivariate_normal(mean, diag(c)) is mean + sqrt(c) * N(0, 1)
        x = mean_x[k] + np.sqrt(cov_diag) * rng.standard_normal((int(samples[k]), dimension))
        y = np.argmax(x @ w + b, axis=1)  # argmax of the softmax = argmax of the logits
        out.append((x.astype(np.float32), y.astype(np.int64)))
    return out


def fedprox_synthetic(alpha: float = 1.0, beta: float = 1.0, *, num_devices: int = 30, iid: bool = False,
                      train_fraction: float = 0.9, seed: int = 0) -> tuple[FederatedDataset, FederatedDataset]:
    """Synthetic(alpha, beta) as ``(train, test)`` federated datasets over the same device ids.

    Each device's samples are shuffled, the first ``int(train_fraction * n_k)`` are its training data and the
    rest its test data. ``train.test`` is the union of the devices' test data (for central evaluation, which
    equals the paper's sample-weighted test accuracy over devices).
    """
    if not 0 < train_fraction < 1:
        raise DataError(f"train_fraction={train_fraction} must be in (0, 1)")
    rng = np.random.default_rng([seed, 1])
    xs_tr, ys_tr, xs_te, ys_te = [], [], [], []
    for x, y in generate_synthetic(alpha, beta, num_devices=num_devices, iid=iid, seed=seed):
        order = rng.permutation(len(y))
        cut = int(train_fraction * len(y))
        xs_tr.append(x[order[:cut]])
        ys_tr.append(y[order[:cut]])
        xs_te.append(x[order[cut:]])
        ys_te.append(y[order[cut:]])
    test_all = ClientData(np.concatenate(xs_te), np.concatenate(ys_te))
    train = _from_lists(xs_tr, ys_tr, test=test_all)
    test = _from_lists(xs_te, ys_te, test=test_all)
    return train, test


def _from_lists(xs: list[np.ndarray], ys: list[np.ndarray], test: ClientData) -> FederatedDataset:
    sizes = np.array([len(y) for y in ys])
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    parts = [np.arange(bounds[k], bounds[k + 1]) for k in range(len(ys))]
    return FederatedDataset.from_arrays(np.concatenate(xs), np.concatenate(ys), parts, test=test)
