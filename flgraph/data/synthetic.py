"""A synthetic label-skewed classification population, generated per client on demand.

Example:
    >>> from flgraph.data import synthetic_classification
    >>> ds = synthetic_classification(num_clients=10, samples_per_client=8, num_features=5, test_samples=20)
    >>> ds.load(3).x.shape, ds.test.y.shape
    ((8, 5), (20,))
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from flgraph.data.dataset import ClientData, FunctionDataset
from flgraph.errors import DataError

__all__ = ["SyntheticClients", "SyntheticTest", "synthetic_classification"]


@functools.lru_cache(maxsize=8)
def _class_means(seed: int, num_classes: int, num_features: int) -> np.ndarray:
    """Class means ``mu``, computed once per process per (seed, shape); read-only."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    mu = rng.standard_normal((num_classes, num_features)).astype(np.float32)
    mu.flags.writeable = False
    return mu


@dataclass(frozen=True)
class SyntheticClients:
    """Picklable generator of one client's data: ``SyntheticClients(...)(k)``.

    Pickles as its few numbers; the class means are recomputed (and cached) in
    each process. See :func:`synthetic_classification` for the scheme.

    Example:
        >>> gen = SyntheticClients(
        ...     seed=0, num_classes=3, num_features=4, samples_per_client=5, alpha=1.0, signal=0.3
        ... )
        >>> gen(7).x.shape, gen(7).y.dtype
        ((5, 4), dtype('int64'))
    """

    seed: int
    num_classes: int
    num_features: int
    samples_per_client: int
    alpha: float
    signal: float

    def __call__(self, client: int) -> ClientData:
        mu = _class_means(self.seed, self.num_classes, self.num_features)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(1, int(client))))
        p = rng.dirichlet([self.alpha] * self.num_classes)
        n = self.samples_per_client
        y = rng.choice(self.num_classes, size=n, p=p).astype(np.int64)
        noise = rng.standard_normal((n, self.num_features), dtype=np.float32)
        x = (self.signal * mu[y] + noise).astype(np.float32)
        return ClientData(x, y)


@dataclass(frozen=True)
class SyntheticTest:
    """Picklable generator of the balanced central test set (made where it is used).

    Example:
        >>> t = SyntheticTest(seed=0, num_classes=2, num_features=3, test_samples=7, signal=0.3)()
        >>> t.y.tolist().count(0), t.y.tolist().count(1)
        (3, 3)
    """

    seed: int
    num_classes: int
    num_features: int
    test_samples: int
    signal: float

    def __call__(self) -> ClientData:
        mu = _class_means(self.seed, self.num_classes, self.num_features)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(2,)))
        per_class = self.test_samples // self.num_classes
        y = rng.permutation(np.repeat(np.arange(self.num_classes, dtype=np.int64), per_class))
        noise = rng.standard_normal((len(y), self.num_features), dtype=np.float32)
        return ClientData((self.signal * mu[y] + noise).astype(np.float32), y)


def _check(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(
            f"{name} must be an integer >= {minimum}, got {value!r}", fix=f"pass {name}>={minimum}"
        )
    return int(value)


def synthetic_classification(
    num_clients: int = 1000,
    samples_per_client: int = 64,
    num_features: int = 784,
    num_classes: int = 10,
    alpha: float = 0.5,
    seed: int = 0,
    *,
    signal: float = 0.3,
    test_samples: int = 2000,
) -> FunctionDataset:
    """Gaussian class clusters with Dirichlet(alpha) label skew per client, made on demand.

    Nothing is pre-generated: ``load(k)`` computes client k, so a million
    clients cost no memory. The exact scheme (numpy ``Generator`` streams):

    * class means: ``mu = default_rng(SeedSequence(seed, spawn_key=(0,)))
      .standard_normal((num_classes, num_features)).astype(float32)``;
    * client k (ids ``0..num_clients-1``): ``rng = default_rng(SeedSequence(seed,
      spawn_key=(1, k)))``, ``p = rng.dirichlet([alpha] * num_classes)``,
      ``y = rng.choice(num_classes, size=samples_per_client, p=p).astype(int64)``,
      ``x = (signal * mu[y] + rng.standard_normal((n, num_features),
      dtype=float32)).astype(float32)``;
    * test set (None when ``test_samples == 0``): ``rng = default_rng(SeedSequence(seed,
      spawn_key=(2,)))``, ``y = rng.permutation(repeat(arange(num_classes),
      test_samples // num_classes))`` (balanced), then ``x`` as for a client.

    ``num_samples(k)`` is ``samples_per_client`` without generating anything.
    The dataset pickles in a few hundred bytes; the test set is generated at
    most once per process, on first use. The generator is ``dataset.fn``
    (a :class:`SyntheticClients`).

    Example:
        >>> ds = synthetic_classification(num_clients=4, samples_per_client=16, num_features=8, seed=1)
        >>> bool((ds.load(2).x == ds.load(2).x).all()), ds.num_samples(3), len(ds.test.y)
        (True, 16, 2000)
    """
    num_clients = _check("num_clients", num_clients, 1)
    samples_per_client = _check("samples_per_client", samples_per_client, 1)
    num_features = _check("num_features", num_features, 1)
    num_classes = _check("num_classes", num_classes, 1)
    seed = _check("seed", seed, 0)
    test_samples = _check("test_samples", test_samples, 0)
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"alpha must be > 0, got {alpha!r}", fix="pass alpha > 0, e.g. 0.5")
    if not np.isfinite(signal):
        raise DataError(f"signal must be a finite number, got {signal!r}", fix="pass e.g. signal=0.3")
    if 0 < test_samples < num_classes:
        raise DataError(
            f"test_samples={test_samples} < num_classes={num_classes} leaves the balanced test set empty",
            fix=f"pass test_samples >= {num_classes}, or 0 for no test set",
        )
    gen = SyntheticClients(seed, num_classes, num_features, samples_per_client, float(alpha), float(signal))
    test = (
        SyntheticTest(seed, num_classes, num_features, test_samples, float(signal)) if test_samples else None
    )
    return FunctionDataset(gen, num_clients, num_samples=samples_per_client, test=test)
