"""Broadcast: send the global model to the round's clients (server stage).

The transport ships the global params once per round to every place clients run (each Dask worker, each
edge agent), never once per client; this stage marks the round as broadcast and accounts the downlink
bytes a real deployment would move (params size x clients).

Example:
    >>> from flgraph import stages as st
    >>> st.Broadcast().name
    'broadcast'
"""

from __future__ import annotations

from typing import ClassVar

from flgraph.context import RoundContext
from flgraph.graph import ServerStage

__all__ = ["Broadcast"]


class Broadcast(ServerStage):
    """Make the global model available to the selected clients."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})
    provides: ClassVar[frozenset[str]] = frozenset({"model"})

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        ctx.broadcast = True
        ctx.metrics["bytes_down"] = ctx.params.nbytes * len(ctx.clients)
