"""Partitions: which samples of a central array each client holds.

A :class:`Partition` maps client id (its position) to an int64 array of sample
indices. The partitioners here are seeded and reproducible: the same arguments
and ``seed`` give the same partition on every machine.

Example:
    >>> import numpy as np
    >>> from flgraph.data import iid
    >>> part = iid(10, 3, seed=0)
    >>> part.sizes().tolist()
    [4, 3, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from flgraph.errors import DataError

__all__ = ["Partition", "by_key", "dirichlet", "iid", "shards"]


@dataclass(frozen=True, eq=False)
class Partition:
    """Client id -> sample indices; the client id is the position in ``indices``.

    ``indices`` holds one 1-D int64 array per client (sorted ascending by the
    partitioners here; any order is accepted). ``keys`` optionally holds one
    value per client, e.g. the writer id each client came from (see :func:`by_key`).
    ``len(partition)`` is the number of clients. Two partitions compare equal
    when they hold the same indices and keys.

    Example:
        >>> import numpy as np
        >>> part = Partition((np.array([0, 2]), np.array([1])))
        >>> len(part), part.sizes().tolist()
        (2, [2, 1])
    """

    indices: tuple[np.ndarray, ...]
    keys: np.ndarray | None = None

    def __post_init__(self) -> None:
        arrays = tuple(_as_index_array(ix, client) for client, ix in enumerate(self.indices))
        object.__setattr__(self, "indices", arrays)
        if self.keys is not None:
            keys = np.asarray(self.keys)
            if keys.shape != (len(arrays),):
                raise DataError(
                    f"Partition.keys has shape {keys.shape}, expected ({len(arrays)},): one key per client",
                    fix="pass one key per client, in client order, or keys=None",
                )
            object.__setattr__(self, "keys", keys)

    def __len__(self) -> int:
        return len(self.indices)

    def sizes(self) -> np.ndarray:
        """Number of samples of each client, as an int64 array.

        Example:
            >>> Partition((np.arange(3), np.arange(0))).sizes().tolist()
            [3, 0]
        """
        return np.array([len(ix) for ix in self.indices], dtype=np.int64)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition) or len(self) != len(other):
            return False
        if self.keys is None or other.keys is None:
            if (self.keys is None) != (other.keys is None):
                return False
        elif not np.array_equal(self.keys, other.keys):
            return False
        return all(np.array_equal(a, b) for a, b in zip(self.indices, other.indices))

    __hash__ = None  # type: ignore[assignment]  # holds arrays: mutable content, not hashable

    def __repr__(self) -> str:
        sizes = self.sizes()
        if len(sizes) == 0:
            return "Partition(0 clients)"
        return (
            f"Partition({len(sizes)} clients, {int(sizes.sum())} samples, "
            f"sizes {int(sizes.min())}..{int(sizes.max())})"
        )


def _as_index_array(ix: Any, client: int) -> np.ndarray:
    arr = np.asarray(ix)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"client {client}: sample indices have dtype {arr.dtype}, expected integers",
            fix="pass integer index arrays (for a boolean mask use np.flatnonzero(mask))",
        )
    if arr.ndim != 1:
        raise DataError(
            f"client {client}: sample indices have shape {arr.shape}, expected a 1-D array",
            fix="pass one flat index array per client",
        )
    return arr.astype(np.int64, copy=False)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise DataError(
            f"{name} must be an integer >= {minimum}, got {value!r}", fix=f"pass {name}>={minimum}"
        )
    return int(value)


def _check_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(
            f"labels must be a non-empty 1-D array, got shape {arr.shape}",
            fix="pass one class label per sample",
        )
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"labels must be integer class labels, got dtype {arr.dtype}",
            fix="pass labels.astype(np.int64)",
        )
    return arr


def _sorted_parts(parts: list[np.ndarray]) -> Partition:
    return Partition(tuple(np.sort(p.astype(np.int64, copy=False)) for p in parts))


def iid(num_samples: int, num_clients: int, *, seed: int) -> Partition:
    """Shuffle ``num_samples`` indices and deal them into near-equal clients (sizes differ by <= 1).

    Every sample goes to exactly one client; each client's indices are sorted.

    Example:
        >>> part = iid(100, 8, seed=1)
        >>> sorted(set(part.sizes().tolist())), int(part.sizes().sum())
        ([12, 13], 100)
    """
    num_samples = _check_count("num_samples", num_samples, 1)
    num_clients = _check_count("num_clients", num_clients, 1)
    if num_clients > num_samples:
        raise DataError(
            f"iid: {num_samples} samples cannot give each of {num_clients} clients at least one",
            fix="use fewer clients or more samples",
        )
    perm = np.random.default_rng(seed).permutation(num_samples)
    return _sorted_parts(np.array_split(perm, num_clients))


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> Partition:
    """Label-skewed partition (Hsu et al. 2019): per class, Dirichlet(alpha) shares across clients.

    For each class c (in sorted order) the samples of c are shuffled, a vector
    ``p ~ Dirichlet([alpha] * num_clients)`` is drawn, and the samples are cut at
    ``floor(cumsum(p) * n_c)``, so client k gets a share ``p[k]`` of class c.
    Small ``alpha`` gives few classes per client; large ``alpha`` approaches iid.
    The draw is repeated (same generator, so still reproducible) until every
    client has at least ``min_size`` samples, at most ``max_tries`` times.
    Every sample goes to exactly one client; each client's indices are sorted.

    Example:
        >>> labels = np.repeat(np.arange(5), 40)
        >>> part = dirichlet(labels, 4, alpha=0.5, seed=0)
        >>> len(part), int(part.sizes().sum()), bool(part.sizes().min() >= 1)
        (4, 200, True)
    """
    labels = _check_labels(labels)
    num_clients = _check_count("num_clients", num_clients, 1)
    min_size = _check_count("min_size", min_size, 0)
    max_tries = _check_count("max_tries", max_tries, 1)
    if not np.isfinite(alpha) or alpha <= 0:
        raise DataError(f"dirichlet: alpha must be > 0, got {alpha!r}", fix="pass alpha > 0, e.g. 0.5")
    if min_size * num_clients > len(labels):
        raise DataError(
            f"dirichlet: {len(labels)} samples cannot give each of {num_clients} clients "
            f"min_size={min_size} samples",
            fix="use fewer clients, a smaller min_size, or more samples",
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    smallest = 0
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            p = rng.dirichlet(np.full(num_clients, float(alpha)))
            cuts = (np.cumsum(p) * len(members)).astype(np.int64)[:-1]
            for k, piece in enumerate(np.split(members, cuts)):
                parts[k].append(piece)
        merged = [np.concatenate(pieces) for pieces in parts]
        smallest = min(len(m) for m in merged)
        if smallest >= min_size:
            return _sorted_parts(merged)
    raise DataError(
        f"dirichlet: after {max_tries} tries some client still had {smallest} samples "
        f"(< min_size={min_size}) with alpha={alpha} and {num_clients} clients",
        fix="use fewer clients, a larger alpha, a larger max_tries, or min_size=0 to allow empty clients",
    )


def shards(labels: np.ndarray, num_clients: int, *, shards_per_client: int = 2, seed: int) -> Partition:
    """Pathological non-iid partition (McMahan et al. 2017): deal label-sorted shards.

    Samples are shuffled, stably sorted by label, cut into
    ``num_clients * shards_per_client`` near-equal contiguous shards, and each
    client gets ``shards_per_client`` shards chosen by a seeded permutation. A
    client therefore sees about ``shards_per_client`` labels (one more when a
    shard straddles a label boundary, fewer when two shards share a label).
    Every sample goes to exactly one client; each client's indices are sorted.

    Example:
        >>> labels = np.repeat(np.arange(10), 20)
        >>> part = shards(labels, 10, shards_per_client=2, seed=0)
        >>> part.sizes().tolist() == [20] * 10
        True
    """
    labels = _check_labels(labels)
    num_clients = _check_count("num_clients", num_clients, 1)
    shards_per_client = _check_count("shards_per_client", shards_per_client, 1)
    num_shards = num_clients * shards_per_client
    if num_shards > len(labels):
        raise DataError(
            f"shards: {len(labels)} samples cannot fill {num_clients} clients x "
            f"{shards_per_client} shards = {num_shards} shards",
            fix="use fewer clients, fewer shards_per_client, or more samples",
        )
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(labels))
    ordered = shuffled[np.argsort(labels[shuffled], kind="stable")]
    pieces = np.array_split(ordered, num_shards)
    deal = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return _sorted_parts([np.concatenate([pieces[s] for s in row]) for row in deal])


def by_key(keys: np.ndarray) -> Partition:
    """Natural partition: one client per distinct key (e.g. writer id), in sorted key order.

    Client ``k`` holds the samples whose key equals ``partition.keys[k]``.

    Example:
        >>> part = by_key(np.array(["bob", "amy", "bob", "cy"]))
        >>> part.keys.tolist(), [ix.tolist() for ix in part.indices]
        (['amy', 'bob', 'cy'], [[1], [0, 2], [3]])
    """
    arr = np.asarray(keys)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(
            f"by_key: keys must be a non-empty 1-D array, got shape {arr.shape}",
            fix="pass one key (e.g. writer id) per sample",
        )
    if np.issubdtype(arr.dtype, np.floating) and bool(np.isnan(arr).any()):
        raise DataError("by_key: keys contain NaN", fix="replace missing keys with a real value first")
    uniq, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
    order = np.argsort(inverse.ravel(), kind="stable")
    parts = np.split(order, np.cumsum(counts)[:-1])
    return Partition(tuple(p.astype(np.int64) for p in parts), keys=uniq)
