"""The typed contracts between the engines and the transports.

:class:`Transport` runs a round's client pass where the clients live; :class:`PlansAhead` (prepare the
next round while one runs), :class:`RunsGraphs` (which round-graph features it runs, beyond a chain) and
:class:`KnowsClients` (attributes of its clients that tiers group by) are capabilities a transport
declares. The engines check them with ``isinstance``; a transport that does not declare ``RunsGraphs``
runs chains only, and ``Run`` refuses a larger graph on it before the run starts.

Example:
    >>> class Chains:
    ...     supports = frozenset()
    >>> isinstance(Chains(), RunsGraphs), isinstance(object(), PlansAhead)
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..context import ClientSet
    from .clients import Partial

__all__ = ["KnowsClients", "PlansAhead", "ReachesWorkers", "RunsGraphs", "Transport", "refuse_unsupported"]


@runtime_checkable
class Transport(Protocol):
    """Runs the client segment of rounds where the clients live (Dask workers, edge agents)."""

    def start(self, bundle: Any, flat: np.ndarray) -> float:
        """Ship what does not change between rounds (a :class:`~flgraph.engine.clients.Bundle`) and warm up;
        returns the warm-up seconds."""
        ...

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Run the client segment for ``clients``; the round's root partial (the fixed tree)."""
        ...

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """``fn(work)`` for each client of ``ids``, where it lives; results in the order of ``ids``."""
        ...

    def places(self) -> int:
        """Distinct places the broadcast goes to (workers, agents)."""
        ...

    def close(self) -> None:
        """Release what :meth:`start` shipped."""
        ...


@runtime_checkable
class PlansAhead(Protocol):
    """A transport that prepares the next round while one runs."""

    def plan_ahead(self, next_round: int | None, prepare: Callable[[], None] | None = None) -> None:
        """Called before each ``run_round`` with the round that follows it at once (None: none, or not known)
        and a function that prepares that round in the driver (called at most once, while this round's
        clients train)."""
        ...

    def cancel_ahead(self) -> None:
        """Drop what was prepared for a round that does not follow now (``fit`` ended, whatever the reason)."""
        ...




@runtime_checkable
class KnowsClients(Protocol):
    """A transport that knows attributes of its clients, e.g. what an edge agent announced when it joined
    (its site, its gateway): tiers can group by them (``st.Aggregate(..., by="site")``)."""

    def client_attribute(self, name: str, ids: np.ndarray) -> np.ndarray | None:
        """Attribute ``name`` of clients ``ids`` (``None`` for a client that did not say), or ``None`` when no
        client announced such an attribute."""
        ...


@runtime_checkable
class ReachesWorkers(Protocol):
    """A transport whose clients run in worker processes it can address one by one: secure aggregation
    keeps each simulated client's secrets between phases sealed under a key only those processes hold
    (:mod:`flgraph.secure.ring`). A function given here takes a ``dask_worker`` keyword (the worker)."""

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """``fn(*args)`` in every worker process, by worker address."""
        ...

    def on_one_worker(self, worker: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker process at address ``worker``."""
        ...


@runtime_checkable
class RunsGraphs(Protocol):
    """A transport that runs rounds beyond a chain: ``supports`` names the features (the keys of
    :meth:`flgraph.graph.RoundGraph.feature_stages`: ``"parallel branches"``, ``"several per-client values"``,
    ``"tiers"``, ``"server values broadcast besides the params"``, ``"secure aggregation"``)."""

    supports: frozenset[str]


def refuse_unsupported(graph: Any, transport: Any) -> None:
    """Refuse, before the run starts, a graph that ``transport`` cannot run (it declares ``supports``)."""
    have = transport.supports if isinstance(transport, RunsGraphs) else frozenset()
    missing = {f: where for f, where in graph.feature_stages().items() if f not in have}
    if missing:
        said = "; ".join(f"{f} ({'; '.join(where)})" for f, where in missing.items())
        raise ConfigError(f"{type(transport).__name__} cannot run this round: it has {said}",
                          fix="run it on Dask (the default transport), or compose a chain "
                              "Select >> Broadcast >> client stages >> Aggregate")
