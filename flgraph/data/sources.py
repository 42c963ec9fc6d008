"""Two ways to hold a population: arrays split by a partition, and a function that makes a client's data
on demand (a million clients need no table).

Example:
    >>> import numpy as np
    >>> from flgraph.data import FederatedDataset, iid
    >>> ds = FederatedDataset.from_arrays(np.zeros((6, 2)), np.arange(6) % 2, iid(6, 3, seed=0))
    >>> ds.num_clients, type(ds).__name__
    (3, 'ArrayDataset')
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flgraph.data.dataset import ClientData, ClientDataLike, FederatedDataset, _check_client_ids, as_client_data
from flgraph.data.partition import Partition
from flgraph.errors import DataError

__all__ = ["ArrayDataset", "FunctionDataset"]


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
        self._ids = ids if client_ids is None else np.sort(ids)  # arange is sorted: no second 8 MB at 1M
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
