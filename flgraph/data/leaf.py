"""LEAF's JSON layout (FEMNIST, Shakespeare, Sent140, CelebA, Reddit): one client per LEAF user.

A LEAF split is a folder of JSON files, each holding some users whole::

    {"users": ["f0000_14", ...], "num_samples": [147, ...],
     "user_data": {"f0000_14": {"x": [[0.0, ...], ...], "y": [4, ...]}, ...}}

Reading is lazy per file. The index (which file holds which user, and how many samples) is built once,
when the dataset is made: JSON cannot be read part way, so each file is parsed once there and everything
but the index is dropped. ``load(k)`` then parses only the file holding user ``k``; a worker keeps the
last file it parsed (as arrays), because LEAF shards hold many users and a worker often trains several
of one shard, while one file is what memory is sized for (a FEMNIST shard is about 100 writers). For
many rounds over a large LEAF split, convert once with ``to_zarr`` and train from the zarr copy, which
reads a client's rows only.

The test split (LEAF writes ``train/`` and ``test/`` folders of the same layout) is the central held-out
set :attr:`LeafDataset.test`: every test user's samples, in user order. With LEAF's sample split
(``-t sample``) the test users are the training users, so :meth:`LeafDataset.load_test` also gives one
user's own held-out samples (for personalised evaluation).

``x`` and ``y`` become arrays through ``transform(x_list, y_list)``; the default converts numbers
(floats to float32, integers to int64) and refuses text with a message naming the transform to give.
:func:`shakespeare_chars` is LEAF's character encoding for Shakespeare.

Example:
    >>> import json, os, tempfile
    >>> from flgraph.data.leaf import LeafDataset
    >>> root = tempfile.mkdtemp()
    >>> doc = {"users": ["u2", "u1"], "num_samples": [1, 2],
    ...        "user_data": {"u2": {"x": [[0.5, 1.0]], "y": [3]}, "u1": {"x": [[0, 0], [1, 1]], "y": [0, 1]}}}
    >>> with open(os.path.join(root, "all_data_0.json"), "w") as f:
    ...     json.dump(doc, f)
    >>> ds = LeafDataset(root)
    >>> ds.keys.tolist(), ds.num_samples(0), ds.load(1).x.tolist()
    (['u1', 'u2'], 2, [[0.5, 1.0]])
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData
from flgraph.data.keyed import KeyedDataset, concat_clients
from flgraph.errors import DataError

__all__ = ["LEAF_LETTERS", "LeafDataset", "leaf_arrays", "shakespeare_chars"]

#: LEAF's Shakespeare vocabulary (``models/utils/language_utils.py``): a character's index is its class.
LEAF_LETTERS = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"

Transform = Callable[[list[Any], list[Any]], tuple[np.ndarray, np.ndarray]]
PathArg = str | os.PathLike[str]


def leaf_arrays(x: list[Any], y: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The default transform: numbers to arrays (floats as float32, integers as int64); text is refused.

    Example:
        >>> x, y = leaf_arrays([[0.25, 1]], [7])
        >>> x.dtype.name, y.dtype.name
        ('float32', 'int64')
    """
    out = []
    for name, values in (("x", x), ("y", y)):
        try:
            arr = np.asarray(values)
        except ValueError as e:
            raise DataError(f"{name} is ragged ({e})", fix="give samples of one shape, or pass transform=") from None
        if arr.dtype.kind in "US" or arr.dtype == object:
            raise DataError(f"{name} holds text (e.g. {values[0]!r})",
                            fix="pass transform=fn(x, y) -> (x, y) arrays, e.g. leaf.shakespeare_chars for "
                                "Shakespeare, or a tokenizer for Sent140")
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        elif arr.dtype.kind in "iub":
            arr = arr.astype(np.int64)
        out.append(arr)
    return out[0], out[1]


def shakespeare_chars(x: list[str], y: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """LEAF's Shakespeare encoding: each character of ``x`` (80-character lines) and the next-character
    label ``y`` become their index in :data:`LEAF_LETTERS` (int64).

    Example:
        >>> x, y = shakespeare_chars(["ab", "b!"], ["c", " "])
        >>> x.tolist(), y.tolist()
        ([[53, 54], [54, 2]], [55, 1])
    """
    table = {c: i for i, c in enumerate(LEAF_LETTERS)}

    def encode(text: str) -> list[int]:
        try:
            return [table[c] for c in text]
        except KeyError as e:
            raise DataError(f"character {e.args[0]!r} is not in LEAF's Shakespeare vocabulary (in {text!r})",
                            fix="encode this text with your own transform=") from None

    if len({len(s) for s in x}) > 1:
        raise DataError("Shakespeare lines differ in length", fix="give lines of one length (LEAF uses 80)")
    return np.array([encode(s) for s in x], np.int64).reshape(len(x), -1), np.array(
        [encode(c)[0] if len(c) == 1 else -1 for c in y], np.int64)


def _files(path: PathArg | Sequence[PathArg], what: str) -> list[Path]:
    if isinstance(path, str | os.PathLike):
        p = Path(path).expanduser()
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.suffix == ".json")
            if not files:
                raise DataError(f"{what}: no .json file in {p}", fix="point at LEAF's train/ or test/ folder")
            return files
        if not p.is_file():
            raise DataError(f"{what}: {p} does not exist", fix="give a LEAF split folder or JSON file")
        return [p]
    return [Path(f).expanduser() for f in path]


def _parse(file: Path) -> dict[str, Any]:
    """Parse and check one LEAF file; errors name the file and what in it is wrong."""
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
                        fix="regenerate the file with LEAF's scripts") from None
    if not isinstance(doc, dict):
        raise DataError(f"{file}: the top level is a {type(doc).__name__}, not a LEAF object",
                        fix="a LEAF file holds an object with users, num_samples and user_data")
    missing = [k for k in ("users", "num_samples", "user_data") if k not in doc]
    if missing:
        raise DataError(f"{file}: no {', '.join(missing)} (keys present: {sorted(doc)})",
                        fix="a LEAF file holds users, num_samples and user_data")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise DataError(f"{file}: users and num_samples must be lists of one length, got "
                        f"{len(users) if isinstance(users, list) else users!r} users and "
                        f"{len(counts) if isinstance(counts, list) else counts!r} counts",
                        fix="regenerate the file with LEAF's scripts")
    for user, n in zip(users, counts):
        entry = data.get(user) if isinstance(data, dict) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise DataError(f"{file}: user {user!r} has no x and y in user_data",
                            fix="every user listed in users needs user_data[user] = {'x': [...], 'y': [...]}")
        if not (len(entry["x"]) == len(entry["y"]) == n):
            raise DataError(f"{file}: user {user!r} has {len(entry['x'])} x and {len(entry['y'])} y but "
                            f"num_samples says {n}", fix="make num_samples, x and y agree")
    return doc


class _Split:
    """The index of one split (train or test): which file holds each user, and its sample count."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        where: dict[Any, tuple[int, int]] = {}
        for i, file in enumerate(files):
            doc = _parse(file)
            for user, n in zip(doc["users"], doc["num_samples"]):
                if user in where:
                    raise DataError(f"user {user!r} is in both {files[where[user][0]]} and {file}",
                                    fix="each user's samples belong in one file of a split")
                where[user] = (i, int(n))
        self.users = np.array(sorted(where)) if where else np.array([], dtype=str)
        self.file_of = np.array([where[u][0] for u in self.users.tolist()], np.int64)
        self.sizes = np.array([where[u][1] for u in self.users.tolist()], np.int64)


class LeafDataset(KeyedDataset):
    """A LEAF split as a federated dataset: client ``k`` is user ``keys[k]`` (see the module docstring).

    ``train`` and ``test`` are a LEAF split folder (every ``.json`` in it), one file, or a list of files.
    ``transform(x_list, y_list) -> (x, y)`` converts one user's lists (default :func:`leaf_arrays`); it
    must pickle, as the dataset is shipped to the workers.
    """

    def __init__(self, train: PathArg | Sequence[PathArg], test: PathArg | Sequence[PathArg] | None = None, *,
                 transform: Transform = leaf_arrays) -> None:
        self._train = _Split(_files(train, "LEAF train split"))
        super().__init__(self._train.users)
        self._test_files = None if test is None else _files(test, "LEAF test split")
        self._test_split: _Split | None = None
        self.transform = transform
        self._lock = threading.Lock()
        self._cached: tuple[Path, dict[Any, ClientData]] | None = None
        self._test_cache: ClientData | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_lock=None, _cached=None, _test_cache=None)  # a worker parses what it needs
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def num_samples(self, client: int) -> int:
        return int(self._train.sizes[self._position(client)])

    def load(self, client: int) -> ClientData:
        pos = self._position(client)
        return self._user(self._train.files[self._train.file_of[pos]], self.keys[pos].item())

    def _user(self, file: Path, user: Any) -> ClientData:
        with self._lock:
            if self._cached is None or self._cached[0] != file:
                self._cached = None  # free the previous file before parsing the next
                self._cached = (file, self._convert(file))
            found = self._cached[1].get(user)
        if found is None:
            raise DataError(f"{file}: user {user!r} is not in it any more (the file changed after the dataset "
                            "was made)", fix="make the LeafDataset again, or convert it with to_zarr first")
        return found

    def _convert(self, file: Path) -> dict[Any, ClientData]:
        doc = _parse(file)
        out = {}
        for user in doc["users"]:
            entry = doc["user_data"][user]
            try:
                x, y = self.transform(entry["x"], entry["y"])
            except DataError as e:
                raise DataError(f"{file}: user {user!r}: {e.message}", fix=e.fix) from None
            out[user] = ClientData(np.asarray(x), np.asarray(y))
        return out

    @property
    def test_keys(self) -> np.ndarray | None:
        """The users of the test split (None without one)."""
        split = self._test()
        return None if split is None else split.users

    def _test(self) -> _Split | None:
        if self._test_files is not None and self._test_split is None:
            self._test_split = _Split(self._test_files)
        return self._test_split

    def load_test(self, client: int) -> ClientData:
        """Client ``client``'s own held-out samples (its user in the test split)."""
        user = self.keys[self._position(client)].item()
        split = self._test()
        if split is None:
            raise DataError("this LeafDataset has no test split", fix="pass test='.../test'")
        pos = int(np.searchsorted(split.users, user))
        if pos >= len(split.users) or split.users[pos] != user:
            raise DataError(f"user {user!r} has no samples in the test split (LEAF's user split keeps test "
                            "users apart)", fix="evaluate on dataset.test, the whole test split")
        return self._user(split.files[split.file_of[pos]], user)

    @property
    def test(self) -> ClientData | None:
        """Every test user's samples, in user order (parsed once per process)."""
        split = self._test()
        if split is None:
            return None
        if self._test_cache is None:
            found: dict[Any, ClientData] = {}
            for i in np.unique(split.file_of).tolist():  # file by file: each parsed once
                found.update(self._convert(split.files[i]))
            self._test_cache = concat_clients([found[u] for u in split.users.tolist()], "LEAF test split")
        return self._test_cache
