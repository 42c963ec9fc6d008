"""RandomEpochs: heterogeneous local work, each client's epochs drawn uniformly per round (server stage).

FedNova's experiments (Wang et al., NeurIPS 2020, Sec. 6) let every client run a number of local epochs
drawn afresh each round (their ``E_i ~ U[2, 5]``; unchecked offline). This stage draws, for each of the
round's clients, ``epochs`` uniformly in ``low..high`` (both included) from the stream ``(tag, round)``
and sets the ClientSet's ``epochs`` setting, which :class:`~flgraph.stages.LocalTrain` reads. Unlike
:class:`~flgraph.stages.Stragglers`, every client's work is drawn, and the range says what it is.

Place it after Select (and after any stage that narrows the clients).

Example:
    >>> from flgraph import stages as st
    >>> p = st.Select(clients=10) >> st.RandomEpochs(1, 5) >> st.Broadcast() >> st.LocalTrain()
    >>> p.stages[1]
    RandomEpochs(low=1, high=5)
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.rng import stream

__all__ = ["RandomEpochs"]


class RandomEpochs(ServerStage):
    """Give each of the round's clients ``low..high`` local epochs, drawn uniformly (seeded per round)."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})

    def __init__(self, low: int = 1, high: int = 5) -> None:
        if not (isinstance(low, int | np.integer) and isinstance(high, int | np.integer) and 1 <= low <= high):
            raise ConfigError(f"RandomEpochs(low={low}, high={high}): need integers with 1 <= low <= high",
                              fix="e.g. RandomEpochs(2, 5), the FedNova paper's range")
        self.low = int(low)
        self.high = int(high)

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        epochs = stream(ctx.seed, self.tag, ctx.round).integers(self.low, self.high + 1, size=len(ctx.clients))
        ctx.clients = ctx.clients.with_settings(epochs=epochs.astype(np.int64))
        ctx.metrics["epochs_mean"] = float(epochs.mean()) if len(epochs) else 0.0
