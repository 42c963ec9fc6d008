"""Stragglers: give a share of the round's clients less local work, or drop them (server stage).

As in the FedProx paper's experiments (Li et al., MLSys 2020, Sec. 5.2 and its code): of the selected
clients, ``round((1 - fraction) * n)`` chosen at random do the full ``epochs``; the others are stragglers.
``policy="partial"`` (FedProx) gives each straggler a random ``1 .. epochs - 1`` epochs through the
ClientSet's ``epochs`` setting, which :class:`~flgraph.stages.LocalTrain` reads; ``policy="drop"`` (FedAvg
in the paper) removes them from the round. Seeded by the stream ``(tag, round)``.

Place it right after Select; ``epochs`` must be LocalTrain's (the recipes wire both).

Example:
    >>> from flgraph import stages as st
    >>> p = st.Select(clients=10) >> st.Stragglers(0.9, epochs=20) >> st.Broadcast() >> st.LocalTrain(20)
    >>> p.stages[1]
    Stragglers(fraction=0.9, epochs=20, policy='partial')
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flgraph.context import RoundContext
from flgraph.errors import ConfigError
from flgraph.graph import ServerStage
from flgraph.rng import stream

__all__ = ["Stragglers"]


class Stragglers(ServerStage):
    """Make ``fraction`` of each round's clients stragglers: less work (``"partial"``) or dropped (``"drop"``)."""

    requires: ClassVar[frozenset[str]] = frozenset({"clients"})

    def __init__(self, fraction: float = 0.5, *, epochs: int = 1, policy: str = "partial") -> None:
        if not 0 <= fraction <= 1:
            raise ConfigError(f"Stragglers(fraction={fraction}): must be in [0, 1]")
        if epochs < 1:
            raise ConfigError(f"Stragglers(epochs={epochs}): the full local work is at least one epoch",
                              fix="pass LocalTrain's epochs")
        if policy not in ("partial", "drop"):
            raise ConfigError(f"Stragglers(policy={policy!r})", fix="use 'partial' (FedProx) or 'drop' (FedAvg)")
        self.fraction = fraction
        self.epochs = epochs
        self.policy = policy

    def run(self, ctx: RoundContext) -> None:
        assert ctx.clients is not None
        cs = ctx.clients
        n = len(cs)
        rng = stream(ctx.seed, self.tag, ctx.round)
        active = np.zeros(n, bool)
        active[rng.choice(n, size=round((1 - self.fraction) * n), replace=False)] = True
        ctx.metrics["stragglers"] = int(n - active.sum())
        if self.policy == "drop":
            if not active.any():
                raise ConfigError(f"round {ctx.round}: Stragglers(fraction={self.fraction}, policy='drop') dropped "
                                  f"all {n} clients", fix="select more clients or lower the straggler fraction")
            ctx.clients = cs.take(active)
            return
        epochs = np.full(n, self.epochs, np.int64)
        epochs[~active] = rng.integers(1, max(self.epochs, 2), size=int((~active).sum()))
        ctx.clients = cs.with_settings(epochs=epochs)
