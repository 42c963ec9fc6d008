"""Federated datasets stored in zarr v3, read one client at a time.

Layout of the group (``format_version`` 1)::

    attrs      {"flgraph_format": "federated-dataset", "format_version": 1}
    x          all clients' samples concatenated on axis 0, chunked on axis 0 only
    y          labels, same rows and chunking as x
    offsets    int64 (num_clients + 1,): client i holds rows offsets[i]:offsets[i+1]
    client_ids int64 (num_clients,), unique, ascending
    test/x, test/y   optional central held-out set

Chunks hold about a median client's rows (capped at 16 MiB of ``x``), so
loading a client reads one or two chunks. The attrs are written last: a write
that stopped part way is not mistaken for a dataset.

Example:
    >>> import numpy as np, tempfile, os
    >>> from flgraph.data import FederatedDataset
    >>> src = FederatedDataset.from_arrays(np.arange(10.0).reshape(5, 2), np.arange(5), [[0, 1], [2, 3, 4]])
    >>> ds = src.to_zarr(os.path.join(tempfile.mkdtemp(), "demo.zarr"))
    >>> ds.load(1).y.tolist()
    [2, 3, 4]
"""

from __future__ import annotations

import os
import threading
from typing import Any, TypeAlias

import numpy as np
import zarr
from zarr.abc.store import Store

from flgraph.data.dataset import ClientData, FederatedDataset, as_client_data
from flgraph.errors import DataError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StoreArg", "ZarrDataset", "write_zarr"]

FORMAT_NAME = "federated-dataset"
FORMAT_VERSION = 1
#: A local path, a URL that zarr/fsspec understands, or a zarr store object.
StoreArg: TypeAlias = str | os.PathLike[str] | Store

_CHUNK_CAP_BYTES = 16 * 2**20
_FLUSH_BYTES = 64 * 2**20
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")


def _normalize(store: StoreArg) -> str | Store:
    """Absolute path for a local path (workers may start elsewhere); URLs and stores unchanged."""
    if isinstance(store, os.PathLike) or (isinstance(store, str) and "://" not in store):
        return os.path.abspath(os.fspath(store))
    if isinstance(store, str | Store):
        return store
    raise DataError(
        f"unsupported zarr store {type(store).__name__}",
        fix="pass a path, a URL, or a zarr.abc.store.Store",
    )


def _is_local(store: str | Store) -> bool:
    return isinstance(store, str) and "://" not in store


class _Opened:
    """What one process holds open for a ZarrDataset (never pickled)."""

    def __init__(self, group: zarr.Group, where: str) -> None:
        self.pid = os.getpid()
        self.x, self.y = _member_array(group, "x", where), _member_array(group, "y", where)
        self.offsets = np.asarray(_member_array(group, "offsets", where)[:], dtype=np.int64)
        self.ids = np.asarray(_member_array(group, "client_ids", where)[:], dtype=np.int64)
        self.ids.flags.writeable = False
        test_group = group.get("test")
        if test_group is not None and not isinstance(test_group, zarr.Group):
            raise DataError(f"{where}: 'test' is not a group", fix="rewrite it with FederatedDataset.to_zarr")
        self.test_group = test_group
        self.test: ClientData | None = None
        n = len(self.ids)
        ok = (
            self.x.ndim >= 1
            and self.y.ndim >= 1
            and self.x.shape[0] == self.y.shape[0]
            and self.offsets.shape == (n + 1,)
            and self.ids.ndim == 1
            and int(self.offsets[0]) == 0
            and int(self.offsets[-1]) == self.x.shape[0]
            and bool(np.all(np.diff(self.offsets) >= 0))
            and bool(np.all(np.diff(self.ids) > 0))
        )
        if not ok:
            raise DataError(
                f"{where}: inconsistent federated dataset (x {self.x.shape}, y {self.y.shape}, "
                f"offsets {self.offsets.shape}, client_ids {self.ids.shape})",
                fix="rewrite it with FederatedDataset.to_zarr",
            )


def _member_array(group: zarr.Group, name: str, where: str) -> zarr.Array:
    node = group.get(name)
    if not isinstance(node, zarr.Array):
        raise DataError(f"{where}: array '{name}' is missing", fix="rewrite it with FederatedDataset.to_zarr")
    return node


def _open_group(store: str | Store) -> zarr.Group:
    where = f"zarr store {store!r}"
    if _is_local(store) and not os.path.exists(str(store)):
        raise DataError(f"{where} does not exist", fix="check the path, or write one with to_zarr(path)")
    try:
        group = zarr.open_group(store, mode="r")
    except zarr.errors.ContainsArrayError as e:
        raise DataError(f"{where} holds a zarr array, not a dataset group", fix="open the group") from e
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"{where} is not a zarr group, so not a federated dataset ({e})",
            fix="open a store written by FederatedDataset.to_zarr",
        ) from e
    attrs = dict(group.attrs)
    if attrs.get("flgraph_format") != FORMAT_NAME:
        found = attrs.get("flgraph_format", "missing")
        raise DataError(
            f"{where} is a zarr group but not a flgraph federated dataset (attr flgraph_format: {found!r})",
            fix="open a store written by FederatedDataset.to_zarr",
        )
    version = attrs.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DataError(f"{where}: bad format_version {version!r}", fix="rewrite it with to_zarr")
    if version > FORMAT_VERSION:
        raise DataError(
            f"{where} was written in format_version {version}; this flgraph reads up to {FORMAT_VERSION}",
            fix="upgrade flgraph to read it",
        )
    return group


class ZarrDataset(FederatedDataset):
    """A federated dataset in a zarr v3 group; ``load(k)`` reads only client k's rows.

    Pickles as just its store (a path or URL), and reopens lazily in each process
    that uses it, keeping the open group per process. An in-memory zarr store
    pickles with its content; use a path or URL for datasets that travel.
    Clients with 0 rows load as empty arrays.

    Example:
        >>> import numpy as np, tempfile, os, pickle
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> _ = FederatedDataset.from_arrays(np.ones((3, 2)), np.arange(3), [[0, 1], [], [2]]).to_zarr(path)
        >>> ds = pickle.loads(pickle.dumps(ZarrDataset(path)))
        >>> [ds.num_samples(k) for k in ds.client_ids], ds.load(1).x.shape
        ([2, 0, 1], (0, 2))
    """

    def __init__(self, store: StoreArg) -> None:
        self._store = _normalize(store)
        self._cache: _Opened | None = None
        self._lock = threading.Lock()
        self._opened()  # check it now, where the caller can see the error

    def __getstate__(self) -> dict[str, Any]:
        return {"_store": self._store}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._store = state["_store"]
        self._cache = None
        self._lock = threading.Lock()

    @property
    def store(self) -> str | Store:
        """The store: an absolute local path, a URL, or the store object given."""
        return self._store

    def _opened(self) -> _Opened:
        cache = self._cache
        if cache is not None and cache.pid == os.getpid():
            return cache
        with self._lock:
            if self._cache is None or self._cache.pid != os.getpid():
                self._cache = _Opened(_open_group(self._store), f"zarr store {self._store!r}")
            return self._cache

    @property
    def client_ids(self) -> np.ndarray:
        return self._opened().ids

    def load(self, client: int) -> ClientData:
        opened = self._opened()
        pos = self._position(client)
        lo, hi = int(opened.offsets[pos]), int(opened.offsets[pos + 1])
        return ClientData(np.asarray(opened.x[lo:hi]), np.asarray(opened.y[lo:hi]))

    def num_samples(self, client: int) -> int:
        offsets = self._opened().offsets
        pos = self._position(client)
        return int(offsets[pos + 1] - offsets[pos])

    @property
    def test(self) -> ClientData | None:
        opened = self._opened()
        if opened.test is None and opened.test_group is not None:
            where = f"zarr store {self._store!r}, test group"
            group = opened.test_group
            x, y = _member_array(group, "x", where), _member_array(group, "y", where)
            opened.test = as_client_data((np.asarray(x[:]), np.asarray(y[:])), where)
        return opened.test

    def __repr__(self) -> str:
        return f"ZarrDataset({self._store!r}, {self.num_clients} clients)"


def _chunk_rows(sizes: np.ndarray, row_bytes: int) -> int:
    """Rows per chunk: the median non-empty client size, at least 1, at most 16 MiB of rows."""
    nonzero = sizes[sizes > 0]
    rows = int(np.median(nonzero)) if len(nonzero) else 1
    return max(1, min(rows, _CHUNK_CAP_BYTES // max(1, row_bytes)))


class _RowWriter:
    """Appends row blocks to a zarr array, writing whole chunks at chunk-aligned offsets."""

    def __init__(self, array: zarr.Array, chunk_rows: int, row_bytes: int) -> None:
        self.array, self.chunk_rows = array, chunk_rows
        self.flush_rows = chunk_rows * max(1, _FLUSH_BYTES // max(1, chunk_rows * row_bytes))
        self.pos, self.pending, self.buf = 0, 0, list[np.ndarray]()

    def add(self, block: np.ndarray) -> None:
        if len(block):
            self.buf.append(block)
            self.pending += len(block)
        if self.pending >= self.flush_rows:
            self.flush(final=False)

    def flush(self, *, final: bool) -> None:
        if not self.buf:
            return
        data = self.buf[0] if len(self.buf) == 1 else np.concatenate(self.buf)
        n = len(data) if final else len(data) // self.chunk_rows * self.chunk_rows
        if n:
            self.array[self.pos : self.pos + n] = data[:n]
            self.pos += n
        rest = data[n:]
        self.buf, self.pending = ([rest] if len(rest) else []), len(rest)


def _create_group(store: str | Store, overwrite: bool) -> zarr.Group:
    where = f"zarr store {store!r}"
    if _is_local(store) and os.path.exists(str(store)):
        path = str(store)
        if not os.path.isdir(path):
            raise DataError(f"{where} is a file, not a directory", fix="choose another path")
        entries = os.listdir(path)
        if entries and not any(m in entries for m in _ZARR_MARKERS):
            raise DataError(
                f"{where} is a non-empty directory that is not a zarr store; flgraph will not delete it",
                fix="choose a new or empty path",
            )
        if entries and not overwrite:
            raise DataError(f"{where} already holds zarr data", fix="pass overwrite=True, or another path")
    try:
        return zarr.open_group(store, mode="w" if overwrite else "w-", zarr_format=3)
    except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError) as e:
        raise DataError(f"{where} already holds zarr data", fix="pass overwrite=True") from e


def _create_rows(group: zarr.Group, name: str, first: np.ndarray, rows: int, chunk_rows: int) -> zarr.Array:
    return group.create_array(
        name, shape=(rows, *first.shape[1:]), chunks=(chunk_rows, *first.shape[1:]), dtype=first.dtype
    )


def write_zarr(dataset: FederatedDataset, store: StoreArg, *, overwrite: bool = False) -> ZarrDataset:
    """Write every client of ``dataset`` (and its test set) to ``store``; see the module layout.

    Each client is loaded once, in id order; ``num_samples`` is asked first to
    size the arrays, so it should be cheap (it is for the datasets here with
    ``num_samples`` known). Same as ``dataset.to_zarr(store)``.

    Example:
        >>> import numpy as np, tempfile, os
        >>> src = FederatedDataset.from_arrays(np.zeros((4, 3)), np.arange(4), [[0], [1, 2, 3]])
        >>> write_zarr(src, os.path.join(tempfile.mkdtemp(), "w.zarr")).num_samples(1)
        3
    """
    target = _normalize(store)
    if isinstance(dataset, ZarrDataset) and _is_local(target) and dataset.store == target:
        raise DataError(f"cannot write {dataset!r} onto its own store", fix="write to another path")
    ids = np.asarray(dataset.client_ids, dtype=np.int64)
    if len(ids) == 0:
        raise DataError("the dataset has no clients; nothing to write", fix="give it at least one client")
    sizes = np.array([dataset.num_samples(int(k)) for k in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    group = _create_group(target, overwrite)
    first = dataset.load(int(ids[0]))
    row_bytes = first.x.dtype.itemsize * int(np.prod(first.x.shape[1:]))
    chunk = _chunk_rows(sizes, row_bytes)
    total = int(offsets[-1])
    xw = _RowWriter(_create_rows(group, "x", first.x, total, chunk), chunk, row_bytes)
    yw = _RowWriter(_create_rows(group, "y", first.y, total, chunk), chunk, first.y.dtype.itemsize)
    for i, k in enumerate(ids.tolist()):
        data = first if i == 0 else dataset.load(k)
        if data.num_samples != sizes[i]:
            raise DataError(
                f"client {k}: num_samples says {sizes[i]} but load gave {data.num_samples} samples",
                fix="make num_samples(k) agree with load(k)",
            )
        for got, want, name in ((data.x, first.x, "x"), (data.y, first.y, "y")):
            if got.shape[1:] != want.shape[1:] or got.dtype != want.dtype:
                raise DataError(
                    f"client {k}: {name} has row shape {got.shape[1:]} and dtype {got.dtype}, but client "
                    f"{int(ids[0])} has {want.shape[1:]} and {want.dtype}",
                    fix="give every client the same feature shape and dtype",
                )
        xw.add(data.x)
        yw.add(data.y)
    xw.flush(final=True)
    yw.flush(final=True)
    group.create_array("offsets", data=offsets)
    group.create_array("client_ids", data=ids)
    test = dataset.test
    if test is not None:
        tg = group.create_group("test")
        test_bytes = test.x.dtype.itemsize * int(np.prod(test.x.shape[1:]))
        test_chunk = max(1, min(test.num_samples, _CHUNK_CAP_BYTES // max(1, test_bytes)))
        for name, arr in (("x", test.x), ("y", test.y)):
            _create_rows(tg, name, arr, len(arr), test_chunk)[...] = arr
    group.attrs.update({"flgraph_format": FORMAT_NAME, "format_version": FORMAT_VERSION})
    return ZarrDataset(target)
