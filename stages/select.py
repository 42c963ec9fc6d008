"""Select: choose the round's clients (server stage).

Uniform without replacement by default, a count or a fraction of the population, seeded per round from
the run seed (stream ``(tag, round)``). Bring your own sampler with ``sampler=``.

Example:
    >>> import numpy as np
    >>> from flgraph import stages as st
    >>> sel = st.Select(clients=3)
    >>> sel.count(10), st.Select(fraction=0.25).count(10)
    (3, 3)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np

from flgraph.context import ClientSet, RoundContext
from flgraph.errors import ClientError, ConfigError, DataError
from flgraph.graph import ServerStage
from flgraph.rng import stream

__all__ = ["Sampler", "Select"]

Sampler = Callable[[int, np.ndarray, int, np.random.Generator], "Sequence[int] | np.ndarray | ClientSet"]


class Select(ServerStage):
    """Choose ``clients`` (a count) or ``fraction`` of the population each round.

    ``sampler(round, population, count, rng)`` replaces the uniform choice; it returns client ids (or a
    :class:`~flgraph.context.ClientSet` with per-client settings). ``rng`` is this round's seeded stream.
    """

    provides: ClassVar[frozenset[str]] = frozenset({"clients"})

    def __init__(
        self,
        clients: int | None = None,
        *,
        fraction: float | None = None,
        sampler: Sampler | None = None,
    ) -> None:
        if (clients is None) == (fraction is None):
            raise ConfigError("Select needs exactly one of clients= or fraction=",
                              fix="e.g. st.Select(clients=100) or st.Select(fraction=0.1)")
        if clients is not None and clients < 1:
            raise ConfigError(f"Select(clients={clients}): the count must be >= 1")
        if fraction is not None and not 0 < fraction <= 1:
            raise ConfigError(f"Select(fraction={fraction}): the fraction must be in (0, 1]")
        self.clients = clients
        self.fraction = fraction
        self.sampler = sampler

    def count(self, population: int) -> int:
        """How many clients a round selects from a population of ``population``."""
        if self.clients is not None:
            return self.clients
        assert self.fraction is not None
        return max(1, math.ceil(self.fraction * population))

    def prepare(self, dataset: Any, model_source: Any) -> None:
        if self.sampler is None and self.count(dataset.num_clients) > dataset.num_clients:
            raise ConfigError(
                f"Select(clients={self.clients}) asks for more clients than the dataset holds "
                f"({dataset.num_clients})",
                fix=f"select at most {dataset.num_clients} clients",
            )

    def run(self, ctx: RoundContext) -> None:
        population = ctx.dataset.client_ids
        count = self.count(len(population))
        rng = stream(ctx.seed, self.tag, ctx.round)
        if self.sampler is None:
            chosen: Any = rng.choice(population, size=count, replace=False)
        else:
            chosen = self.sampler(ctx.round, population, count, rng)
        clients = chosen if isinstance(chosen, ClientSet) else ClientSet(np.asarray(chosen, dtype=np.int64))
        if len(clients) == 0:
            raise ConfigError(f"round {ctx.round}: Select chose no client", fix="check the sampler")
        try:
            ctx.dataset.check_ids(clients.ids)
        except DataError as e:
            unknown = [int(c) for c in clients.ids if int(c) not in ctx.dataset]
            raise ClientError(e.message, client=unknown[0], stage="Select", round=ctx.round,
                              fix="the sampler must return ids of the dataset (dataset.client_ids)") from None
        ctx.clients = clients
        ctx.metrics["clients_selected"] = len(clients)
