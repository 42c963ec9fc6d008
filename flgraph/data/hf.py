"""A Hugging Face ``datasets.Dataset`` split among clients, as ``flwr-datasets`` does, without download.

Give the dataset (built or loaded however you like: ``load_dataset``, ``load_from_disk``,
``Dataset.from_dict``...) and a partition of its rows:

- iid: ``iid(len(ds), clients, seed=0)``;
- label skew: ``dirichlet(np.asarray(ds["label"]), clients, alpha=0.5, seed=0)``;
- natural: the name of a key column (writer, speaker, hospital), one client per distinct value, in
  sorted order (``dataset.keys[k]`` is client ``k``'s value), or ``by_key(...)`` yourself.

``load(k)`` selects client ``k``'s rows only (an on-disk dataset is memory-mapped Arrow, so a worker
reads its own rows); ``x`` is one column (each row an array, e.g. an image or a vector) or a list of
scalar columns stacked as features; ``y`` is a column.

Example:
    >>> import numpy as np
    >>> from datasets import Dataset
    >>> from flgraph.data.hf import HuggingFaceDataset
    >>> ds = Dataset.from_dict({"a": [0.0, 1.0, 2.0], "b": [5.0, 6.0, 7.0], "label": [0, 1, 1],
    ...                         "writer": ["w2", "w1", "w2"]})
    >>> fed = HuggingFaceDataset(ds, "writer", x=["a", "b"], y="label")
    >>> fed.keys.tolist(), fed.load(1).x.tolist(), fed.load(1).y.tolist()
    (['w1', 'w2'], [[0.0, 5.0], [2.0, 7.0]], [0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData, as_client_data
from flgraph.data.keyed import PartitionedRows
from flgraph.data.partition import Partition, by_key
from flgraph.errors import DataError

__all__ = ["HuggingFaceDataset"]


class HuggingFaceDataset(PartitionedRows):
    """A ``datasets.Dataset`` and a partition of its rows (a :class:`Partition` or a key column's name).

    ``test`` is another ``datasets.Dataset`` with the same columns: the central held-out set.
    """

    def __init__(self, dataset: Any, partition: Partition | str, *, x: str | Sequence[str], y: str,
                 test: Any = None) -> None:
        columns = list(getattr(dataset, "column_names", None) or [])
        if not columns or not hasattr(dataset, "select"):
            raise DataError(f"expected a datasets.Dataset, got {type(dataset).__name__}",
                            fix="pass a datasets.Dataset (for a DatasetDict, pick a split: ds['train'])")
        self.x_columns = [x] if isinstance(x, str) else list(x)
        self.y_column = y
        for name in [*self.x_columns, y] + ([partition] if isinstance(partition, str) else []):
            if name not in columns:
                raise DataError(f"no column {name!r} in the dataset (columns: {columns})",
                                fix="name columns of the dataset")
        if isinstance(partition, str):
            partition = by_key(np.asarray(dataset[partition]))
        super().__init__(partition, len(dataset), "HuggingFaceDataset")
        self.dataset = dataset
        self._test_source = test
        self._test_cache: ClientData | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_test_cache": None}

    def _convert(self, rows: Any, what: str) -> ClientData:
        table = rows.with_format("numpy")
        if len(self.x_columns) == 1:
            x = np.asarray(table[self.x_columns[0]])
        else:
            x = np.stack([np.asarray(table[c]) for c in self.x_columns], axis=1)
        if x.dtype == object:
            raise DataError(f"{what}: x is ragged or text (column(s) {self.x_columns})",
                            fix="map the dataset to fixed-size numeric features first (ds.map)")
        return as_client_data((x, np.asarray(table[self.y_column])), what)

    def _rows(self, indices: np.ndarray) -> ClientData:
        return self._convert(self.dataset.select(indices), "HuggingFaceDataset")

    @property
    def test(self) -> ClientData | None:
        if self._test_source is None:
            return None
        if self._test_cache is None:
            self._test_cache = self._convert(self._test_source, "HuggingFaceDataset test set")
        return self._test_cache
