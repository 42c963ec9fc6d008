"""What the readers of published formats share: clients named by the source's own keys.

A LEAF user ``"f0000_14"``, a TFF client ``"3334"`` or a FedScale ``client_id`` becomes flgraph client
``k`` = its position in the sorted keys (``np.unique`` order: numbers numerically, text
lexicographically), so ids are ``0..n-1`` whatever the source calls its clients, and
``dataset.keys[k]`` gives the source's name back (the same convention as :func:`flgraph.data.by_key`).

Example:
    >>> import numpy as np
    >>> from flgraph.data.keyed import KeyedDataset
    >>> class Two(KeyedDataset):
    ...     def load(self, client):
    ...         return ClientData(np.zeros((1, 1)), np.array([self._position(client)]))
    >>> ds = Two(np.array(["bob", "amy"]))
    >>> ds.keys.tolist(), ds.client_of("bob"), ds.load(ds.client_of("bob")).y.tolist()
    (['amy', 'bob'], 1, [1])
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData, FederatedDataset
from flgraph.data.partition import Partition
from flgraph.errors import DataError

__all__ = ["KeyedDataset", "PartitionedRows", "concat_clients", "describe_keys"]


def describe_keys(keys: np.ndarray) -> str:
    """A short listing of ``keys`` for error messages (the first five)."""
    shown = ", ".join(repr(k) for k in keys[:5].tolist())
    return f"{len(keys)} clients: {shown}{', ...' if len(keys) > 5 else ''}"


class KeyedDataset(FederatedDataset):
    """Clients ``0..n-1`` named by ``keys`` (sorted on construction; duplicates rejected).

    Subclasses implement ``load``; :meth:`client_of` maps a source key to the flgraph id.
    """

    def __init__(self, keys: np.ndarray | Sequence[Any]) -> None:
        arr = np.asarray(keys)
        if arr.ndim != 1 or arr.size == 0:
            raise DataError("the source holds no clients", fix="check the path: no client was found in it")
        uniq, counts = np.unique(arr, return_counts=True)
        if len(uniq) != len(arr):
            raise DataError(f"client names repeat: {uniq[counts > 1][:10].tolist()}",
                            fix="give every client of the source a distinct name")
        self._keys = uniq
        self._keys.flags.writeable = False
        self._ids = np.arange(len(uniq), dtype=np.int64)
        self._ids.flags.writeable = False

    @property
    def client_ids(self) -> np.ndarray:
        return self._ids

    @property
    def keys(self) -> np.ndarray:
        """The source's name of each client, in id order (``keys[k]`` names client ``k``)."""
        return self._keys

    def client_of(self, key: Any) -> int:
        """The flgraph id of the client the source calls ``key``; DataError when there is none."""
        pos = int(np.searchsorted(self._keys, key))
        if pos >= len(self._keys) or self._keys[pos] != key:
            raise DataError(f"no client named {key!r} ({describe_keys(self._keys)})",
                            fix="use a name from dataset.keys")
        return pos

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_clients} clients)"


def concat_clients(parts: Sequence[ClientData], what: str) -> ClientData:
    """Concatenate clients' data into one (a global test set made of every client's held-out samples)."""
    if not parts:
        raise DataError(f"{what}: no samples", fix="check the test split holds clients")
    try:
        return ClientData(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))
    except ValueError as e:
        raise DataError(f"{what}: the clients' samples do not stack ({e})",
                        fix="give every client the same feature shape") from None


class PartitionedRows(FederatedDataset):
    """Rows of an indexable source split by a :class:`~flgraph.data.Partition`; client ``k`` holds rows
    ``partition.indices[k]`` and ``keys`` is ``partition.keys`` (set by :func:`~flgraph.data.by_key`).

    Subclasses read rows with ``_rows(indices) -> ClientData``; ``num_rows`` checks the partition.
    """

    def __init__(self, partition: Partition, num_rows: int, what: str) -> None:
        if not isinstance(partition, Partition):
            raise DataError(f"{what}: partition must be a flgraph.data.Partition, got {type(partition).__name__}",
                            fix="build one with iid(n, clients, seed=...), dirichlet(labels, ...) or by_key(keys)")
        if len(partition) == 0:
            raise DataError(f"{what}: the partition has no clients", fix="give at least one client")
        for k, ix in enumerate(partition.indices):
            if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= num_rows):
                raise DataError(f"{what}: client {k} holds rows outside 0..{num_rows - 1}",
                                fix="partition this source's own rows (len(source))")
        self.partition = partition
        self._ids = np.arange(len(partition), dtype=np.int64)
        self._ids.flags.writeable = False

    @property
    def client_ids(self) -> np.ndarray:
        return self._ids

    @property
    def keys(self) -> np.ndarray | None:
        """The key of each client when the partition is natural (``by_key``), else None."""
        return self.partition.keys

    def num_samples(self, client: int) -> int:
        return len(self.partition.indices[self._position(client)])

    def load(self, client: int) -> ClientData:
        return self._rows(self.partition.indices[self._position(client)])

    @abc.abstractmethod
    def _rows(self, indices: np.ndarray) -> ClientData:
        """The samples at ``indices`` of the wrapped data set, as one client's arrays."""
