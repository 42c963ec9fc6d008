"""A ``torch.utils.data.Dataset`` (map-style: ``len`` and ``ds[i] -> (x, y)``) split among clients.

``load(k)`` calls ``dataset[i]`` for client ``k``'s rows only and stacks them (tensors or arrays), so a
worker decodes only its own samples. Partition the rows with the flgraph partitioners:
``iid(len(ds), clients, seed=0)``, ``dirichlet(labels_of(ds), clients, alpha=0.5, seed=0)`` or
``by_key(keys)``. No torch import happens here: samples are converted with ``numpy.asarray``.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from flgraph.data import iid
    >>> from flgraph.data.torch_dataset import TorchDataset, labels_of
    >>> ds = TensorDataset(torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]))
    >>> fed = TorchDataset(ds, iid(len(ds), 3, seed=0))
    >>> fed.num_clients, fed.load(0).x.shape, labels_of(ds).tolist()
    (3, (2, 2), [0, 1, 0, 1, 0, 1])
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData, as_client_data
from flgraph.data.keyed import PartitionedRows
from flgraph.data.partition import Partition
from flgraph.errors import DataError

__all__ = ["TorchDataset", "labels_of"]


def _item(dataset: Any, i: int) -> tuple[np.ndarray, Any]:
    item = dataset[i]
    if not isinstance(item, tuple | list) or len(item) != 2:
        raise DataError(f"dataset[{i}] is a {type(item).__name__}, not an (x, y) pair",
                        fix="give a dataset whose items are (sample, label), or wrap it to return them")
    return np.asarray(item[0]), np.asarray(item[1])


def labels_of(dataset: Any) -> np.ndarray:
    """Every sample's label, for :func:`~flgraph.data.dirichlet` or :func:`~flgraph.data.shards`:
    ``dataset.targets`` when the dataset has it (torchvision's do), else ``dataset[i][1]`` for every ``i``
    (which reads every sample once)."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return np.asarray(targets)
    return np.array([_item(dataset, i)[1] for i in range(len(dataset))])


class TorchDataset(PartitionedRows):
    """A map-style torch dataset and a :class:`Partition` of its rows; ``test`` (optional) is a torch
    dataset read whole as the central held-out set. The dataset must pickle (it goes to the workers)."""

    def __init__(self, dataset: Any, partition: Partition, *, test: Any = None) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise DataError(f"expected a map-style dataset (len and [i]), got {type(dataset).__name__}",
                            fix="an IterableDataset has no rows to partition: materialise it first")
        super().__init__(partition, len(dataset), "TorchDataset")
        self.dataset = dataset
        self._test_source = test
        self._test_cache: ClientData | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_test_cache": None}

    @staticmethod
    def _read(dataset: Any, indices: Any, what: str) -> ClientData:
        items = [_item(dataset, int(i)) for i in indices]
        if not items:
            raise DataError(f"{what}: no samples", fix="give every client at least one sample")
        try:
            x = np.stack([a for a, _ in items])
        except ValueError as e:
            raise DataError(f"{what}: the samples differ in shape ({e})",
                            fix="transform samples to one shape (e.g. a resize in the dataset)") from None
        return as_client_data((x, np.stack([b for _, b in items])), what)

    def _rows(self, indices: np.ndarray) -> ClientData:
        return self._read(self.dataset, indices, "TorchDataset")

    @property
    def test(self) -> ClientData | None:
        if self._test_source is None:
            return None
        if self._test_cache is None:
            self._test_cache = self._read(self._test_source, range(len(self._test_source)), "test set")
        return self._test_cache
