"""The typed contracts between the engine, the transports and the Dask executor's accelerator.

:class:`Transport` is what the synchronous engine calls to run the client segment of rounds;
:class:`PlansAhead` is an optional capability a transport declares (the engine checks it with
``isinstance``, never with ``getattr``). :class:`RoundAccelerator` is what
:class:`~flgraph.transports.dask.DaskTransport` calls to run a round's chunks faster when it can
(:mod:`flgraph.local` implements it for workers on the driver's machine); it raises :class:`LostWork` when
the round must run again.

Example:
    >>> from flgraph.transports.base import PlansAhead, Transport
    >>> from flgraph.transports.dask import DaskTransport
    >>> issubclass(DaskTransport, Transport) and issubclass(DaskTransport, PlansAhead)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from flgraph.errors import ClusterError

if TYPE_CHECKING:
    from flgraph.client_runner import Partial
    from flgraph.context import ClientSet

__all__ = ["Chunks", "LostWork", "PlansAhead", "RoundAccelerator", "Transport"]

Chunks = list[list[tuple[int, int]]]
"""A round's chunk plan: per chunk, the nodes ``(a, b)`` of the round's fixed tree that it covers."""


class LostWork(ClusterError):
    """A round's client work was lost (a worker left holding data it needed): run the round again."""


@runtime_checkable
class Transport(Protocol):
    """Runs the client segment of rounds where the clients live (Dask workers, edge agents)."""

    def start(self, bundle: Any, flat: np.ndarray) -> float:
        """Ship what does not change between rounds (a :class:`~flgraph.client_runner.Bundle`) and warm up;
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


class RoundAccelerator(Protocol):
    """A faster way to run a round's chunks, behind :class:`~flgraph.transports.dask.DaskTransport`.

    The executor asks :meth:`takes` for each round; when it does, the round runs as
    ``handle = submit(...)``, then ``submit_ahead(...)`` when the next round follows at once, then
    ``collect(handle)``. The result is bit-identical to the executor's own path: the same chunks, the same
    fixed tree. A round whose work was lost raises :class:`LostWork` (the executor runs it again).
    """

    def takes(self, n: int, plan: Chunks) -> bool:
        """Whether it runs a round of ``n`` clients split as ``plan``."""
        ...

    def submit(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str, plan: Chunks,
               slots: list[str]) -> Any:
        """Start the round's chunk tasks (``slots``: one worker address per worker thread); a handle."""
        ...

    def submit_ahead(self, rnd: int, plan: Chunks, slots: list[str]) -> None:
        """Prepare round ``rnd``, expected to be split like ``plan``, while the current one runs."""
        ...

    def collect(self, handle: Any) -> Partial:
        """The root partial of the round :meth:`submit` started; its tasks are stopped if this raises."""
        ...

    def cancel_ahead(self) -> None:
        """Drop what :meth:`submit_ahead` prepared."""
        ...

    def close(self) -> None:
        """Release everything (the run ends)."""
        ...
