"""Federated datasets: a population of clients, each loaded on its own.

A worker loads only the clients it trains, so datasets are cheap to pickle
(shipped once per worker process) and load one client at a time.

Example:
    >>> import numpy as np
    >>> from flgraph.data import FederatedDataset
    >>> ds = FederatedDataset.from_arrays(np.arange(12.0).reshape(6, 2), np.arange(6), [[0, 1], [2, 3, 4, 5]])
    >>> ds.num_clients, ds.load(1).num_samples, ds.load(0).y.tolist()
    (2, 4, [0, 1])
"""

from __future__ import annotations

import abc
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np

from flgraph.data.partition import Partition
from flgraph.errors import DataError

if TYPE_CHECKING:
    from flgraph.data.zarr_store import StoreArg, ZarrDataset

__all__ = ["ArrayDataset", "ClientData", "FederatedDataset", "FunctionDataset"]


class ClientData(NamedTuple):
    """One client's samples: features ``x`` (first axis = samples) and labels ``y``.

    ``num_samples`` is the number of samples. Being a tuple, ``len(data)`` is 2
    (the fields), so ``x, y = data`` unpacks; use ``data.num_samples`` for the size.

    Example:
        >>> import numpy as np
        >>> d = ClientData(np.zeros((3, 4), np.float32), np.array([0, 1, 1]))
        >>> d.num_samples, d.x.shape
        (3, (3, 4))
    """

    x: np.ndarray
    y: np.ndarray

    @property
    def num_samples(self) -> int:
        """Number of samples (length of the first axis of ``x``)."""
        return int(self.x.shape[0])


#: What a data function or a ``test=`` argument may give: a ClientData or an ``(x, y)`` pair.
ClientDataLike: TypeAlias = ClientData | tuple[np.ndarray, np.ndarray]


def as_client_data(value: object, what: str) -> ClientData:
    """Check and convert ``(x, y)`` into :class:`ClientData`; ``what`` names it in errors.

    Example:
        >>> as_client_data(([[1.0], [2.0]], [0, 1]), "client 3").num_samples
        2
    """
    if not isinstance(value, tuple) or len(value) != 2:
        raise DataError(
            f"{what}: expected an (x, y) pair or ClientData, got {type(value).__name__}",
            fix="return ClientData(x, y) or a tuple (x, y) of arrays",
        )
    x, y = np.asarray(value[0]), np.asarray(value[1])
    if x.ndim < 1 or y.ndim < 1:
        raise DataError(
            f"{what}: x and y need a sample axis, got shapes {x.shape} and {y.shape}",
            fix="give x of shape (n, ...) and y of shape (n,)",
        )
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{what}: x has {x.shape[0]} samples but y has {y.shape[0]} (shapes {x.shape}, {y.shape})",
            fix="give x and y the same length along the first axis",
        )
    return ClientData(x, y)


def _describe_ids(ids: np.ndarray) -> str:
    n = len(ids)
    if n == 0:
        return "it holds no clients"
    if n <= 10:
        return f"it holds {n} client{'s' if n != 1 else ''}, ids {ids.tolist()}"
    if int(ids[-1]) - int(ids[0]) + 1 == n:
        return f"it holds {n} clients, ids {int(ids[0])}..{int(ids[-1])}"
    return f"it holds {n} clients, ids between {int(ids[0])} and {int(ids[-1])} (not contiguous)"


def _check_client_ids(ids: Any, expected: int | None = None) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.ndim != 1 or arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(
            f"client_ids must be a 1-D integer array, got dtype {arr.dtype} and shape {arr.shape}",
            fix="pass client ids as integers, e.g. np.arange(num_clients)",
        )
    if expected is not None and len(arr) != expected:
        raise DataError(
            f"{len(arr)} client_ids given for {expected} clients",
            fix="give exactly one id per client",
        )
    if len(np.unique(arr)) != len(arr):
        uniq, counts = np.unique(arr, return_counts=True)
        raise DataError(
            f"client_ids repeat: {uniq[counts > 1][:10].tolist()}",
            fix="give every client a distinct id",
        )
    return arr.astype(np.int64)


class FederatedDataset(abc.ABC):
    """A population of clients; a worker loads only the clients it trains.

    Subclasses give ``client_ids`` (int64, 1-D, unique, ascending) and
    ``load(client)``; they override ``num_samples`` when it is cheap and
    ``test`` when there is a central held-out set. Build one with
    :meth:`from_arrays`, :meth:`from_function` or :meth:`open_zarr`.

    Example:
        >>> import numpy as np
        >>> ds = FederatedDataset.from_function(lambda k: (np.full((k, 2), k), np.zeros(k, np.int64)), 4)
        >>> 3 in ds, 9 in ds, ds.num_samples(3)
        (True, False, 3)
    """

    @property
    @abc.abstractmethod
    def client_ids(self) -> np.ndarray:
        """All client ids: int64, 1-D, unique, sorted ascending."""

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_ids)

    @abc.abstractmethod
    def load(self, client: int) -> ClientData:
        """Load one client's samples; an unknown id raises :class:`DataError`."""

    def num_samples(self, client: int) -> int:
        """Number of samples of ``client`` (this default loads it; subclasses override when cheap)."""
        return self.load(client).num_samples

    @property
    def test(self) -> ClientData | None:
        """The central held-out set, or None."""
        return None

    def with_attributes(self, **attributes: Any) -> FederatedDataset:
        """Give the clients attributes (site, region, device class...) that tiers group by
        (``st.Aggregate(..., by="site")``): each an array aligned with :attr:`client_ids`, or a function
        ``ids -> values`` (a million clients need no table). Returns this dataset.

        Example:
            >>> import numpy as np
            >>> ds = FederatedDataset.from_function(lambda k: (np.ones((2, 1)), np.zeros(2, np.int64)), 6)
            >>> ds.with_attributes(site=lambda ids: ids % 3).attribute("site", np.array([4, 5])).tolist()
            [1, 2]
        """
        table = dict(getattr(self, "_attributes", {}))
        for name, values in attributes.items():
            if not callable(values):
                values = np.asarray(values)
                if values.shape != (self.num_clients,):
                    raise DataError(f"attribute {name!r} has shape {values.shape}; the dataset has "
                                    f"{self.num_clients} clients", fix="give one value per client, in "
                                                                       "client_ids order, or a function of the ids")
            table[name] = values
        self._attributes = table
        return self

    def attribute(self, name: str, ids: np.ndarray) -> np.ndarray:
        """The values of attribute ``name`` for clients ``ids`` (KeyError when the clients have none)."""
        values = getattr(self, "_attributes", {})[name]
        ids = np.asarray(ids, np.int64)
        if callable(values):
            out = np.asarray(values(ids))
            if out.shape != ids.shape:
                raise DataError(f"attribute {name!r}'s function returned shape {out.shape} for {ids.shape} ids")
            return out
        return values[np.searchsorted(self.client_ids, ids)]

    def __contains__(self, client: object) -> bool:
        if isinstance(client, bool) or not isinstance(client, int | np.integer):
            return False
        ids = self.client_ids
        pos = int(np.searchsorted(ids, client))
        return pos < len(ids) and int(ids[pos]) == int(client)

    def _position(self, client: int) -> int:
        """Index of ``client`` in ``client_ids``; DataError naming the id when it is not there."""
        if isinstance(client, bool) or not isinstance(client, int | np.integer):
            raise DataError(
                f"client id must be an integer, got {type(client).__name__} {client!r}",
                fix="pass an id from dataset.client_ids",
            )
        ids = self.client_ids
        pos = int(np.searchsorted(ids, client))
        if pos >= len(ids) or int(ids[pos]) != int(client):
            raise DataError(
                f"client {int(client)} is not in this dataset ({_describe_ids(ids)})",
                fix="use an id from dataset.client_ids",
            )
        return pos

    def check_ids(self, ids: np.ndarray | Sequence[int]) -> None:
        """Raise :class:`DataError` listing (up to 10) ids this dataset does not hold.

        Example:
            >>> import numpy as np
            >>> ds = FederatedDataset.from_arrays(np.zeros((4, 1)), np.zeros(4, np.int64), [[0, 1], [2, 3]])
            >>> ds.check_ids([0, 1])
            >>> try:
            ...     ds.check_ids([1, 5, 7])
            ... except Exception as e:
            ...     print(e.message)
            2 client ids are not in this dataset: [5, 7] (it holds 2 clients, ids [0, 1])
        """
        arr = np.asarray(ids)
        if arr.size == 0:
            return
        if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(
                f"client ids must be integers, got dtype {arr.dtype}",
                fix="pass integer client ids",
            )
        unknown = np.unique(arr.ravel()[~np.isin(arr.ravel(), self.client_ids)])
        if len(unknown) == 0:
            return
        shown = ", ".join(str(i) for i in unknown[:10].tolist()) + (", ..." if len(unknown) > 10 else "")
        many = len(unknown) != 1
        raise DataError(
            f"{len(unknown)} client id{'s' if many else ''} {'are' if many else 'is'} not in this dataset: "
            f"[{shown}] ({_describe_ids(self.client_ids)})",
            fix="select clients from dataset.client_ids",
        )

    def to_zarr(self, store: StoreArg, *, overwrite: bool = False) -> ZarrDataset:
        """Write every client (and the test set) into a zarr v3 group; return it opened.

        See :mod:`flgraph.data.zarr_store` for the layout. ``overwrite=True``
        replaces an existing zarr group at ``store``.

        Example:
            >>> import numpy as np, tempfile, os
            >>> ds = FederatedDataset.from_arrays(np.ones((3, 2)), np.arange(3), [[0], [1, 2]])
            >>> z = ds.to_zarr(os.path.join(tempfile.mkdtemp(), "d.zarr"))
            >>> z.num_clients, z.load(1).x.shape
            (2, (2, 2))
        """
        from flgraph.data.zarr_store import write_zarr

        return write_zarr(self, store, overwrite=overwrite)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_clients} clients)"

    @staticmethod
    def from_arrays(
        x: np.ndarray,
        y: np.ndarray,
        partition: Partition | Mapping[int, Any] | Sequence[Any],
        *,
        test: ClientDataLike | None = None,
        client_ids: np.ndarray | Sequence[int] | None = None,
    ) -> ArrayDataset:
        """In-memory arrays split among clients by ``partition``; see :class:`ArrayDataset`.

        Example:
            >>> import numpy as np
            >>> ds = FederatedDataset.from_arrays(np.eye(3), np.arange(3), {10: [0], 20: [1, 2]})
            >>> ds.client_ids.tolist(), ds.load(20).y.tolist()
            ([10, 20], [1, 2])
        """
        return ArrayDataset(x, y, partition, test=test, client_ids=client_ids)

    @staticmethod
    def from_function(
        fn: Callable[[int], ClientDataLike],
        num_clients: int | None = None,
        *,
        client_ids: np.ndarray | Sequence[int] | None = None,
        num_samples: int | Callable[[int], int] | None = None,
        test: ClientDataLike | Callable[[], ClientDataLike] | None = None,
    ) -> FunctionDataset:
        """Clients generated on demand by ``fn(client)``; see :class:`FunctionDataset`.

        Example:
            >>> import numpy as np
            >>> ds = FederatedDataset.from_function(lambda k: (np.zeros((2, 3)), np.array([k, k])), 5)
            >>> ds.load(4).y.tolist()
            [4, 4]
        """
        return FunctionDataset(fn, num_clients, client_ids=client_ids, num_samples=num_samples, test=test)

    @staticmethod
    def open_zarr(store: StoreArg) -> ZarrDataset:
        """Open a dataset written by :meth:`to_zarr`; DataError when ``store`` is not one.

        Example:
            >>> import numpy as np, tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
            >>> _ = FederatedDataset.from_arrays(np.ones((2, 1)), np.arange(2), [[0, 1]]).to_zarr(path)
            >>> FederatedDataset.open_zarr(path).num_samples(0)
            2
        """
        from flgraph.data.zarr_store import ZarrDataset

        return ZarrDataset(store)


class ArrayDataset(FederatedDataset):
    """In-memory ``x``, ``y`` and a partition of their rows among clients.

    ``partition`` is a :class:`Partition` (client id = position), a mapping
    ``{client_id: indices}``, or a sequence of index arrays (client id =
    position). ``client_ids`` renames the clients of a Partition or sequence
    (e.g. ``client_ids=part.keys`` after :func:`by_key`). Indices must be
    integers in ``0..len(x)-1`` (negative indices are rejected); a sample may
    belong to several clients (overlap is allowed), and each client sees its
    samples in the order its indices list them. Pickles with its arrays.

    Example:
        >>> import numpy as np
        >>> ds = ArrayDataset(np.arange(8).reshape(4, 2), np.array([0, 1, 0, 1]), [[3, 0], [1]])
        >>> ds.load(0).x.tolist(), ds.num_samples(1)
        ([[6, 7], [0, 1]], 1)
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        partition: Partition | Mapping[int, Any] | Sequence[Any],
        *,
        test: ClientDataLike | None = None,
        client_ids: np.ndarray | Sequence[int] | None = None,
    ) -> None:
        data = as_client_data((x, y), "from_arrays")
        if isinstance(partition, Mapping):
            if client_ids is not None:
                raise DataError(
                    "from_arrays: client_ids given together with a mapping partition",
                    fix="the mapping's keys are the client ids: drop client_ids",
                )
            pairs = list(partition.items())
            keys = _check_client_ids([k for k, _ in pairs])
            parts = Partition(tuple(ix for _, ix in pairs))
        else:
            parts = partition if isinstance(partition, Partition) else Partition(tuple(partition))
            keys = (
                np.arange(len(parts), dtype=np.int64)
                if client_ids is None
                else _check_client_ids(client_ids, len(parts))
            )
        if len(parts) == 0:
            raise DataError("from_arrays: the partition has no clients", fix="give at least one client")
        n = data.num_samples
        for k, ix in zip(keys.tolist(), parts.indices):
            if len(ix) and (int(ix.min()) < 0 or int(ix.max()) >= n):
                bad = ix[(ix < 0) | (ix >= n)]
                raise DataError(
                    f"client {k}: sample indices out of range 0..{n - 1}: {bad[:10].tolist()}",
                    fix="index rows of x (negative indices are not allowed)",
                )
        order = np.argsort(keys, kind="stable")
        self._x, self._y = data
        self._ids = keys[order]
        self._ids.flags.writeable = False
        self._indices = tuple(parts.indices[i] for i in order.tolist())
        self._sizes = np.array([len(ix) for ix in self._indices], dtype=np.int64)
        self._test = None if test is None else as_client_data(test, "test set")

    @property
    def client_ids(self) -> np.ndarray:
        return self._ids

    def load(self, client: int) -> ClientData:
        ix = self._indices[self._position(client)]
        return ClientData(self._x[ix], self._y[ix])

    def num_samples(self, client: int) -> int:
        return int(self._sizes[self._position(client)])

    @property
    def test(self) -> ClientData | None:
        return self._test


class FunctionDataset(FederatedDataset):
    """Clients generated on demand: ``load(k)`` calls ``fn(k)`` and checks the result.

    Give ``num_clients`` (ids ``0..num_clients-1``) or ``client_ids`` (or both,
    agreeing). ``fn`` returns ``(x, y)`` or ClientData with ``len(x) == len(y)``.
    ``num_samples`` (an int for all clients, or ``callable(client)``) makes
    :meth:`num_samples` cheap; without it, num_samples loads the client.
    ``test`` is the held-out set or a zero-argument callable making it, called
    at most once per process (not pickled). ``fn`` and ``test`` must pickle
    (cloudpickle handles lambdas) since the dataset is shipped to workers.

    Example:
        >>> import numpy as np
        >>> fn = lambda k: (np.ones((k + 1, 2)), np.zeros(k + 1, np.int64))
        >>> ds = FunctionDataset(fn, 3, num_samples=lambda k: k + 1)
        >>> ds.num_samples(2), ds.load(2).x.shape
        (3, (3, 2))
    """

    def __init__(
        self,
        fn: Callable[[int], ClientDataLike],
        num_clients: int | None = None,
        *,
        client_ids: np.ndarray | Sequence[int] | None = None,
        num_samples: int | Callable[[int], int] | None = None,
        test: ClientDataLike | Callable[[], ClientDataLike] | None = None,
    ) -> None:
        if not callable(fn):
            raise DataError(f"from_function: fn is not callable ({type(fn).__name__})", fix="pass fn(client)")
        if num_clients is None and client_ids is None:
            raise DataError(
                "from_function: neither num_clients nor client_ids given", fix="pass num_clients=N"
            )
        if num_clients is not None and (
            isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer) or num_clients < 1
        ):
            raise DataError(
                f"num_clients must be an integer >= 1, got {num_clients!r}", fix="pass num_clients>=1"
            )
        ids = (
            np.arange(int(num_clients or 0), dtype=np.int64)
            if client_ids is None
            else _check_client_ids(client_ids, None if num_clients is None else int(num_clients))
        )
        if len(ids) == 0:
            raise DataError("from_function: client_ids is empty", fix="give at least one client id")
        if isinstance(num_samples, bool) or (isinstance(num_samples, int | np.integer) and num_samples < 0):
            raise DataError(f"num_samples must be >= 0, got {num_samples!r}", fix="pass a sample count")
        if not (num_samples is None or callable(num_samples) or isinstance(num_samples, int | np.integer)):
            raise DataError(
                f"num_samples must be an int or a callable, got {type(num_samples).__name__}",
                fix="pass num_samples=64 or num_samples=lambda k: ...",
            )
        self.fn = fn
        self._ids = np.sort(ids)
        self._ids.flags.writeable = False
        self._ids_are_range = client_ids is None  # pickled as a count, rebuilt on arrival
        self._num_samples = num_samples
        self._test_source = test
        self._test_cache: ClientData | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_lock"] = None
        if self._ids_are_range:
            state["_ids"] = len(self._ids)
        if callable(self._test_source):
            state["_test_cache"] = None  # regenerated where needed, never shipped
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if self._ids_are_range:
            self._ids = np.arange(state["_ids"], dtype=np.int64)
            self._ids.flags.writeable = False
        self._lock = threading.Lock()

    @property
    def client_ids(self) -> np.ndarray:
        return self._ids

    def load(self, client: int) -> ClientData:
        self._position(client)
        return as_client_data(self.fn(int(client)), f"client {int(client)}")

    def num_samples(self, client: int) -> int:
        self._position(client)
        if self._num_samples is None:
            return self.load(client).num_samples
        n = self._num_samples(int(client)) if callable(self._num_samples) else self._num_samples
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise DataError(f"client {int(client)}: num_samples gave {n!r}", fix="return a count >= 0")
        return int(n)

    @property
    def test(self) -> ClientData | None:
        if self._test_source is None:
            return None
        with self._lock:
            if self._test_cache is None:
                source = self._test_source
                self._test_cache = as_client_data(source() if callable(source) else source, "test set")
            return self._test_cache
