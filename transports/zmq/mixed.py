"""``MixedTransport``: some clients simulated on Dask, the others edge agents, in one round."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from flgraph.context import ClientSet
from flgraph.engine.clients import Bundle, Partial, combine_partials

from .transport import ZmqTransport

__all__ = ["MixedTransport"]


class MixedTransport:
    """Some clients on Dask (simulated), the others on edge agents, in the same rounds.

    ``route`` says which clients are edge agents: a collection of ids, a function ``id -> bool``, or
    ``None`` (the clients with an agent connected when the round starts). A round's root is the Dask
    clients' tree combined with the edge clients' tree (in that order), each over its clients in round
    order: deterministic for a given routing.

    Synchronous rounds only: the asynchronous engine orders simulated (Dask) clients on a virtual clock
    and edge clients by real arrival, and the two clocks cannot be mixed. ``fg.Run`` refuses an
    asynchronous pipeline with this transport; run FedBuff on Dask, or on edge agents with ZmqTransport.

    Example:
        >>> from flgraph.transports.zmq import MixedTransport
        >>> MixedTransport.split(np.array([5, 1, 7, 2]), lambda c: c % 2 == 1)
        (array([3]), array([0, 1, 2]))
    """

    def __init__(self, dask: Any, edge: ZmqTransport,
                 route: Collection[int] | Callable[[int], bool] | None = None) -> None:
        self.dask = dask
        self.edge = edge
        self.route = route
        self._reducer: Any = None

    def start(self, bundle: Bundle, flat: np.ndarray) -> float:
        """Start both transports; returns the warm-up seconds."""
        self._reducer = bundle.reducer
        return float(self.dask.start(bundle, flat)) + self.edge.start(bundle, flat)

    @staticmethod
    def split(ids: np.ndarray, on_edge: Callable[[int], bool]) -> tuple[np.ndarray, np.ndarray]:
        """Positions (not ids) of the Dask clients and of the edge clients, each in round order."""
        mask = np.array([bool(on_edge(int(c))) for c in ids], dtype=bool)
        return np.flatnonzero(~mask), np.flatnonzero(mask)

    def _on_edge(self) -> Callable[[int], bool]:
        route = self.route
        if route is None:
            present = set(self.edge.gateway.connected())
            return lambda c: c in present
        if callable(route):
            return route
        members = {int(c) for c in route}
        return lambda c: c in members

    @staticmethod
    def _subset(clients: ClientSet, positions: np.ndarray) -> ClientSet:
        return clients.take(positions)

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Post the edge tasks, run the Dask clients meanwhile, then collect the edge results."""
        on_dask, on_edge = self.split(clients.ids, self._on_edge())
        pending = self.edge.submit(rnd, flat, self._subset(clients, on_edge)) if len(on_edge) else None
        try:
            left = (self.dask.run_round(rnd, flat, self._subset(clients, on_dask), on_error) if len(on_dask)
                    else Partial(None))
        except BaseException:
            if pending is not None:
                self.edge.gateway.end_round()
            raise
        right = self.edge.collect(pending, on_error) if pending is not None else Partial(None)
        return combine_partials(self._reducer, left, right)

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """Client work outside the round's segment: the Dask clients' on Dask, the edge clients' on their
        agents (evaluation stages only, see :meth:`ZmqTransport.map_clients`), in the order of ``ids``."""
        ids = np.asarray(ids, np.int64)
        on_dask, on_edge = self.split(ids, self._on_edge())
        out: list[Any] = [None] * len(ids)
        for pos, part in ((on_dask, self.dask.map_clients(rnd, flat, ids[on_dask], fn) if len(on_dask) else []),
                          (on_edge, self.edge.map_clients(rnd, flat, ids[on_edge], fn) if len(on_edge) else [])):
            for p, value in zip(pos.tolist(), part):
                out[p] = value
        return out

    def places(self) -> int:
        return int(self.dask.places()) + self.edge.places()

    def close(self) -> None:
        try:
            self.dask.close()
        finally:
            self.edge.close()
