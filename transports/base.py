"""The typed contracts between the engine, the transports and the Dask executor's accelerator.

:class:`Transport` is what the synchronous engine calls to run the client segment of rounds;
:class:`PlansAhead` and :class:`RunsGraphs` are optional capabilities a transport declares (the engine
checks them with ``isinstance``, never with ``getattr``); the three live in
:mod:`flgraph.engine.contracts`, which the engine imports without importing Dask. :class:`RoundAccelerator` is what
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

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from flgraph.engine.contracts import PlansAhead, RunsGraphs, Transport
from flgraph.errors import ClusterError

if TYPE_CHECKING:
    from flgraph.context import ClientSet
    from flgraph.engine.clients import Partial

__all__ = ["Chunks", "LostWork", "PlansAhead", "RoundAccelerator", "RunsGraphs", "Transport"]

Chunks = list[list[tuple[int, int]]]
"""A round's chunk plan: per chunk, the nodes ``(a, b)`` of the round's fixed tree that it covers."""


class LostWork(ClusterError):
    """A round's client work was lost (a worker left holding data it needed): run the round again."""


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
