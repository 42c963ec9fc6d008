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
        pos = int(ids.searchsorted(client))  # the method: no dispatch through numpy's Python wrapper
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
        flat, known = arr.ravel(), self.client_ids
        # client_ids are ascending and unique: a binary search per id, O(ids log population), where isin
        # would sort the whole population every round
        at = np.minimum(np.searchsorted(known, flat), max(len(known) - 1, 0))
        unknown = np.unique(flat[known[at] != flat]) if len(known) else np.unique(flat)
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


from flgraph.data.sources import ArrayDataset, FunctionDataset  # noqa: E402  (they subclass FederatedDataset)
