"""TensorFlow Federated's ``ClientData`` h5 files (EMNIST, Shakespeare, StackOverflow, CIFAR-100 of
``tff.simulation.datasets``): one client per group under ``examples``::

    examples/<client id>/<feature>     one dataset per feature, the samples on axis 0
                                       (EMNIST: pixels (n, 28, 28) float32, label (n,) int32)

``x`` and ``y`` name the features to read. The index (client names and sample counts) is read from the
file's metadata only; ``load(k)`` reads client ``k``'s two datasets and nothing else (h5 reads by
offset, so a worker touches only its own clients). The file is opened once per process, on first use.
A test file (TFF ships ``*_test.h5`` beside ``*_train.h5``) gives the central held-out set
:attr:`TffH5Dataset.test` (every test client, in name order) and :meth:`TffH5Dataset.load_test`.
Text features (bytes) are refused unless ``transform(x, y) -> (x, y)`` encodes them.

Example:
    >>> import h5py, numpy as np, os, tempfile
    >>> from flgraph.data.tff_h5 import TffH5Dataset
    >>> path = os.path.join(tempfile.mkdtemp(), "emnist_train.h5")
    >>> with h5py.File(path, "w") as f:
    ...     f["examples/f0001/pixels"] = np.ones((3, 2, 2), np.float32)
    ...     f["examples/f0001/label"] = np.array([1, 2, 3], np.int32)
    >>> ds = TffH5Dataset(path, x="pixels", y="label")
    >>> ds.keys.tolist(), ds.num_samples(0), ds.load(0).y.tolist()
    (['f0001'], 3, [1, 2, 3])
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData
from flgraph.data.keyed import KeyedDataset, concat_clients
from flgraph.errors import DataError

__all__ = ["TffH5Dataset"]

Transform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
PathArg = str | os.PathLike[str]


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise DataError("reading TFF h5 files needs h5py", fix="pip install 'flgraph[h5]'") from None
    return h5py


class _H5Split:
    """One h5 file's index: client names and sample counts, from metadata only."""

    def __init__(self, path: PathArg, x: str, y: str) -> None:
        self.path = Path(path).expanduser()
        h5py = _h5py()
        if not self.path.is_file():
            raise DataError(f"{self.path} does not exist", fix="give the path of a TFF ClientData .h5 file")
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise DataError(f"{self.path}: not an h5 file ({e})", fix="give a TFF ClientData .h5 file") from None
        with f:
            examples = f.get("examples")
            if not isinstance(examples, h5py.Group):
                raise DataError(f"{self.path}: no 'examples' group (top level: {sorted(f.keys())})",
                                fix="a TFF ClientData file holds examples/<client>/<feature>")
            names, sizes = [], []
            for name, group in examples.items():
                for feature in (x, y):
                    if not isinstance(group, h5py.Group) or not isinstance(group.get(feature), h5py.Dataset):
                        have = sorted(group.keys()) if isinstance(group, h5py.Group) else "not a group"
                        raise DataError(f"{self.path}: client {name!r} has no feature {feature!r} "
                                        f"(it has {have})", fix="choose x= and y= among the features")
                nx, ny = len(group[x]), len(group[y])
                if nx != ny:
                    raise DataError(f"{self.path}: client {name!r} has {nx} {x!r} but {ny} {y!r}",
                                    fix="every feature of a client needs one entry per sample")
                names.append(name)
                sizes.append(ny)
        order = np.argsort(np.array(names), kind="stable")
        self.names = np.array(names)[order] if names else np.array([], dtype=str)
        self.sizes = np.array(sizes, np.int64)[order]


class TffH5Dataset(KeyedDataset):
    """A TFF ``ClientData`` h5 file as a federated dataset; client ``k`` is ``examples/<keys[k]>``.

    ``x`` and ``y`` name the features (e.g. ``"pixels"`` and ``"label"`` for EMNIST); ``test`` is the
    matching test file. ``transform`` (optional, must pickle) converts one client's two arrays.
    """

    def __init__(self, path: PathArg, *, x: str, y: str, test: PathArg | None = None,
                 transform: Transform | None = None) -> None:
        self._train = _H5Split(path, x, y)
        super().__init__(self._train.names)
        self._test_split = None if test is None else _H5Split(test, x, y)
        self.x_name, self.y_name, self.transform = x, y, transform
        self._lock = threading.Lock()
        self._files: dict[Path, Any] = {}
        self._test_cache: ClientData | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _files={}, _test_cache=None)  # open files stay in their process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def num_samples(self, client: int) -> int:
        return int(self._train.sizes[self._position(client)])

    def load(self, client: int) -> ClientData:
        return self._read(self._train.path, str(self.keys[self._position(client)]))

    def _read(self, path: Path, name: str) -> ClientData:
        with self._lock:  # h5py handles are not shared between threads safely
            f = self._files.get(path)
            if f is None:
                f = self._files[path] = _h5py().File(path, "r")
            group = f["examples"][name]
            x, y = group[self.x_name][()], group[self.y_name][()]
        if self.transform is not None:
            x, y = self.transform(x, y)
        x, y = np.asarray(x), np.asarray(y)
        for feature, arr in ((self.x_name, x), (self.y_name, y)):
            if arr.dtype.kind in "SUO":
                raise DataError(f"{path}: client {name!r}: feature {feature!r} holds text",
                                fix="pass transform=fn(x, y) -> (x, y) that encodes it as numbers")
        return ClientData(x, y)

    def load_test(self, client: int) -> ClientData:
        """Client ``client``'s own held-out samples (the same name in the test file)."""
        name = self.keys[self._position(client)]
        split = self._test_split
        if split is None:
            raise DataError("this TffH5Dataset has no test file", fix="pass test='..._test.h5'")
        if name not in set(split.names.tolist()):
            raise DataError(f"client {name!r} is not in the test file {split.path}",
                            fix="evaluate on dataset.test, the whole test file")
        return self._read(split.path, str(name))

    @property
    def test(self) -> ClientData | None:
        """Every client of the test file, in name order (read once per process)."""
        split = self._test_split
        if split is None:
            return None
        if self._test_cache is None:
            parts = [self._read(split.path, str(n)) for n in split.names.tolist()]
            self._test_cache = concat_clients(parts, f"TFF test file {split.path}")
        return self._test_cache
