"""FedScale's client-partition CSV over a folder of sample files: one client per ``client_id``.

FedScale ships each data set as sample files plus ``client_data_mapping/<split>.csv``::

    client_id,sample_path,label_name,label_id
    0,f0000_14/img_0.png,4,4

The CSV (paths and labels only) is indexed once, when the dataset is made; ``load(k)`` reads client
``k``'s sample files and nothing else, through ``loader(path) -> array``. The default loader reads
``.npy`` files with numpy and common image files (png, jpg, bmp, gif, tif, webp) with Pillow, as uint8
arrays (height, width[, channels]); give ``loader=`` for other files (e.g. raw bytes decoded your way).
``y`` is ``label_id`` (int64); ``label_names`` maps ids back. A ``test`` CSV (``client_data_mapping/
test.csv``) gives the central held-out set: every row of it.

Example:
    >>> import numpy as np, os, tempfile
    >>> from flgraph.data.fedscale_csv import FedScaleDataset
    >>> root = tempfile.mkdtemp()
    >>> for i in range(3):
    ...     np.save(os.path.join(root, f"s{i}.npy"), np.full(2, i, np.float32))
    >>> rows = ["client_id,sample_path,label_name,label_id", "7,s0.npy,cat,0", "3,s1.npy,dog,1", "7,s2.npy,dog,1"]
    >>> with open(os.path.join(root, "train.csv"), "w") as f:
    ...     _ = f.write("\\n".join(rows))
    >>> ds = FedScaleDataset(os.path.join(root, "train.csv"), root)
    >>> ds.keys.tolist(), ds.load(ds.client_of(7)).x.tolist(), ds.label_names
    ([3, 7], [[0.0, 0.0], [2.0, 2.0]], {0: 'cat', 1: 'dog'})
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData
from flgraph.data.keyed import KeyedDataset
from flgraph.errors import DataError

__all__ = ["COLUMNS", "FedScaleDataset", "load_sample"]

#: The columns of FedScale's client_data_mapping CSV, in order.
COLUMNS = ("client_id", "sample_path", "label_name", "label_id")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}

Loader = Callable[[Path], Any]
PathArg = str | os.PathLike[str]


def load_sample(path: Path) -> np.ndarray:
    """The default loader: ``.npy`` with numpy, image files with Pillow (uint8 array); others refused.

    Example:
        >>> import numpy as np, os, tempfile, pathlib
        >>> from PIL import Image
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.fromarray(np.full((2, 3), 9, np.uint8)).save(p)
        >>> load_sample(p).tolist()
        [[9, 9, 9], [9, 9, 9]]
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in IMAGE_SUFFIXES:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im)
    raise DataError(f"no loader for {path.name!r} (suffix {suffix!r})",
                    fix="pass loader=fn(path) -> array, e.g. lambda p: np.frombuffer(p.read_bytes(), np.uint8)")


def _int_keys(values: list[str]) -> np.ndarray:
    """Client ids as integers when every one is an integer (FedScale's usual case), else as text."""
    try:
        return np.array([int(v) for v in values], np.int64)
    except ValueError:
        return np.array(values)


def _read_csv(path: Path) -> tuple[np.ndarray, list[str], np.ndarray, dict[int, str]]:
    if not path.is_file():
        raise DataError(f"{path} does not exist", fix="give FedScale's client_data_mapping/<split>.csv")
    clients: list[str] = []
    paths: list[str] = []
    labels: list[int] = []
    names: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != COLUMNS:
            raise DataError(f"{path}: line 1 is {header!r}, expected the header {','.join(COLUMNS)}",
                            fix="give FedScale's client_data_mapping CSV")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 4:
                raise DataError(f"{path}, line {line}: {len(row)} fields, expected 4 ({','.join(COLUMNS)})",
                                fix="quote fields that hold commas")
            client, sample, label_name, label_id = (v.strip() for v in row)
            try:
                label = int(label_id)
            except ValueError:
                raise DataError(f"{path}, line {line}: label_id {label_id!r} is not an integer",
                                fix="label_id holds the class index") from None
            if names.setdefault(label, label_name) != label_name:
                raise DataError(f"{path}, line {line}: label_id {label} is named {label_name!r} here but "
                                f"{names[label]!r} before", fix="give each label_id one label_name")
            clients.append(client)
            paths.append(sample)
            labels.append(label)
    if not clients:
        raise DataError(f"{path}: no samples after the header", fix="give the CSV of a non-empty split")
    return _int_keys(clients), paths, np.array(labels, np.int64), names


class FedScaleDataset(KeyedDataset):
    """FedScale's partition CSV over the sample folder ``root``; client ``k`` is ``client_id`` ``keys[k]``.

    ``sample_path`` is read relative to ``root``. ``loader(path) -> array`` reads one sample (default
    :func:`load_sample`); every sample of a client must give one shape and dtype. ``loader`` must pickle
    (a module-level function does), as the dataset is shipped to the workers.
    """

    def __init__(self, csv_path: PathArg, root: PathArg, *, test: PathArg | None = None,
                 loader: Loader = load_sample) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"sample folder {self.root} does not exist", fix="give the folder the CSV's "
                                                                           "sample_path values are relative to")
        clients, paths, labels, names = _read_csv(Path(csv_path).expanduser())
        super().__init__(np.unique(clients))
        order = np.argsort(clients, kind="stable")  # a client's rows keep the CSV's order
        bounds = [*np.searchsorted(clients[order], self.keys, side="left").tolist(), len(order)]
        self._rows = [order[a:b] for a, b in itertools.pairwise(bounds)]
        self._paths, self._labels = np.array(paths, dtype=object), labels
        self.label_names = names
        self.loader = loader
        self._test_csv = None if test is None else Path(test).expanduser()
        self._test_cache: ClientData | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_test_cache": None}

    def num_samples(self, client: int) -> int:
        return len(self._rows[self._position(client)])

    def load(self, client: int) -> ClientData:
        pos = self._position(client)
        rows = self._rows[pos]
        x = self._stack(self._paths[rows].tolist(), f"client {self.keys[pos].item()!r}")
        return ClientData(x, self._labels[rows])

    def _stack(self, paths: list[str], what: str) -> np.ndarray:
        samples = []
        for rel in paths:
            file = self.root / rel
            if not file.is_file():
                raise DataError(f"{what}: sample file {file} does not exist", fix="check root= and sample_path")
            try:
                samples.append(np.asarray(self.loader(file)))
            except DataError as e:
                raise DataError(f"{what}: {e.message}", fix=e.fix) from None
            first = samples[0]
            if samples[-1].shape != first.shape or samples[-1].dtype != first.dtype:
                raise DataError(f"{what}: {file} gives shape {samples[-1].shape} {samples[-1].dtype} but "
                                f"{self.root / paths[0]} gives {first.shape} {first.dtype}",
                                fix="give every sample one shape (resize images first, or in loader=)")
        return np.stack(samples)

    @property
    def test(self) -> ClientData | None:
        """Every row of the test CSV, in its order (read once per process)."""
        if self._test_csv is None:
            return None
        if self._test_cache is None:
            _, paths, labels, _ = _read_csv(self._test_csv)
            self._test_cache = ClientData(self._stack(paths, f"test CSV {self._test_csv}"), labels)
        return self._test_cache
