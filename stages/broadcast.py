"""Broadcast: send the global model (and server values the clients need) to the round's clients (server stage).

The transport ships the broadcast values once per round to every place clients run (each Dask worker,
each edge agent), never once per client; this stage marks the round as broadcast and accounts the
downlink bytes a real deployment would move (size x clients). ``Broadcast("params", "control")`` also
ships the server value ``control`` (kept by a stage such as :class:`~flgraph.stages.ScaffoldControl`);
client stages read it as ``work.values["control"]``.

Example:
    >>> from flgraph import stages as st
    >>> st.Broadcast().name, sorted(st.Broadcast("params", "control").writes())
    ('broadcast', ['model', 'on-clients:control'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.graph.values import on_clients

__all__ = ["Broadcast"]


class Broadcast(ServerStage):
    """Make the global model, and the named server values, available to the selected clients."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})
    provides: ClassVar[frozenset[str]] = frozenset({"model"})

    def __init__(self, *names: str, values: Sequence[str] = ()) -> None:
        values = tuple(names) or tuple(values) or ("params",)
        if "params" not in values:
            raise ConfigError(f"Broadcast{values!r} leaves out the model", fix="list 'params' first")
        if len(set(values)) != len(values) or not all(isinstance(v, str) and v for v in values):
            raise ConfigError(f"Broadcast{values!r}: name each server value once")
        self.values = tuple(values)

    def settings(self) -> dict[str, Any]:
        return {} if self.values == ("params",) else {"values": list(self.values)}

    def __repr__(self) -> str:
        return "Broadcast()" if self.values == ("params",) else f"Broadcast{self.values!r}"

    def reads(self) -> frozenset[str]:
        return frozenset({"clients", *self.values})

    def reads_kept(self) -> frozenset[str]:
        return frozenset(self.values) - {"params"}

    def writes(self) -> frozenset[str]:
        return frozenset(on_clients(v) for v in self.values)

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        ctx.broadcast = True
        extra = sum(int(ctx.values[v].nbytes) for v in self.values if v != "params")
        ctx.metrics["bytes_down"] = (ctx.params.nbytes + extra) * len(ctx.clients)
