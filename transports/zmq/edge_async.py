"""The asynchronous engine's handles on edge clients: a published params version, one client's job as a
future, and the futures yielded as they complete (what :class:`~.transport.ZmqTransport`'s ``publish``,
``submit_client`` and ``completion`` return).

Example:
    >>> from flgraph.transports.zmq.edge_async import EdgeFuture
    >>> EdgeFuture.done.__doc__
    'Whether its result or failure has been received.'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from flgraph.engine.clients import Partial
from flgraph.errors import ClusterError

from .gateway import EncodedParams

if TYPE_CHECKING:
    from .transport import ZmqTransport

__all__ = ["EdgeCompletion", "EdgeFuture", "EdgeVersion"]


@dataclass
class EdgeVersion:
    """A global params version published for the asynchronous engine: its values (a private copy, the
    base of ``weights`` results) and its task frame, encoded once and sent with each of its clients' tasks."""

    version: int
    flat: np.ndarray
    encoded: EncodedParams


class EdgeFuture:
    """One client of the asynchronous engine, running on its agent as one gateway job.

    ``result()`` is the client's leaf :class:`~flgraph.engine.clients.Partial` (its ``maxes["finish"]``:
    real seconds from dispatch to arrival), or raises the client's
    :class:`~flgraph.errors.ClientError` (``on_client_error="raise"``). It is settled by the transport's
    :meth:`ZmqTransport.completion`.
    """

    def __init__(self, job: int, rnd: int, client: int, version: EdgeVersion, on_error: str, started: float,
                 end: float) -> None:
        self.job = job
        self.rnd = rnd
        self.client = client
        self.version = version
        self.on_error = on_error
        self.started = started
        self.end = end  # the latest time its event may come (deadline + grace), time.monotonic()
        self.released = False
        self._value: Partial | None = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """Whether its result or failure has been received."""
        return self._value is not None or self._error is not None

    def result(self) -> Partial:
        """The leaf Partial; raises the client's error, or ClusterError if it has not completed yet."""
        if self._error is not None:
            raise self._error
        if self._value is None:
            raise ClusterError(f"client {self.client}'s edge job has not completed",
                               fix="wait for it with the transport's completion() before asking its result")
        return self._value

    def __repr__(self) -> str:
        state = "error" if self._error is not None else "finished" if self._value is not None else "pending"
        return f"EdgeFuture(job {self.job}, round {self.rnd}, client {self.client}, {state})"


class EdgeCompletion:
    """The edge futures added to it, yielded as they complete (like ``distributed.as_completed``).

    ``next()`` blocks until one of them completes; it never waits past the latest deadline of those still
    pending: a gateway that fails to close a job raises :class:`~flgraph.errors.ClusterError`. Futures
    released meanwhile are skipped; ``StopIteration`` when none is pending.
    """

    def __init__(self, transport: ZmqTransport) -> None:
        self._transport = transport
        self._pending: dict[int, EdgeFuture] = {}

    def add(self, future: EdgeFuture) -> None:
        """Watch ``future`` (from :meth:`ZmqTransport.submit_client`)."""
        self._pending[future.job] = future

    def __iter__(self) -> EdgeCompletion:
        return self

    def __next__(self) -> EdgeFuture:
        while True:
            self._pending = {j: f for j, f in self._pending.items() if not f.released}
            if not self._pending:
                raise StopIteration
            first = min(self._pending.values(), key=lambda f: f.end)
            ev = self._transport._next_event(first)
            if ev is None:
                continue  # nothing yet: look again at what is still pending
            fut = self._pending.pop(ev.job, None)
            if fut is None or fut.released:
                continue  # a released job's late event
            self._transport._settle(fut, ev)
            return fut
