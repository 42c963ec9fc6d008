"""Byzantine clients for robustness experiments: corrupt the updates of a fixed share of the population.

:class:`Byzantine` (a client stage, after LocalTrain and before Compress) replaces the delta of every
client in a deterministic ``fraction`` of the population (the first ``round(fraction * N)`` ids of a
permutation seeded by the run seed) with ``-scale * delta`` (``attack="sign_flip"``) or ``scale * delta``
(``attack="scale"``). The update's ``byzantine`` metric is 1 for them, 0 otherwise. The set is fixed for
the run; a round's share of Byzantine clients is then hypergeometric around ``fraction`` (W1: 13 to 25 of
each round's 100 clients at ``fraction=0.2``).

Example:
    >>> import numpy as np
    >>> from flgraph.stages.byzantine import Byzantine
    >>> ids = Byzantine(0.2).attackers(seed=0, population=np.arange(10))
    >>> len(ids), ids == Byzantine(0.2).attackers(seed=0, population=np.arange(10))
    (2, True)
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from flgraph.context import ClientWork
from flgraph.errors import ConfigError
from flgraph.graph import ClientStage
from flgraph.rng import stage_tag, stream

__all__ = ["Byzantine"]


class Byzantine(ClientStage):
    """Corrupt the updates of a deterministic ``fraction`` of the clients (sign flip or scaling by ``scale``)."""

    requires: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(self, fraction: float = 0.2, *, attack: str = "sign_flip", scale: float = 10.0) -> None:
        if not 0 <= fraction <= 1:
            raise ConfigError(f"Byzantine(fraction={fraction}): must be in [0, 1]")
        if attack not in ("sign_flip", "scale"):
            raise ConfigError(f"Byzantine(attack={attack!r})", fix="use 'sign_flip' or 'scale'")
        self.fraction = fraction
        self.attack = attack
        self.scale = scale
        self._cache: tuple[int, int, frozenset[int]] | None = None

    def attackers(self, seed: int, population: np.ndarray) -> frozenset[int]:
        """The ids of the Byzantine clients of ``population`` under run seed ``seed``."""
        if self._cache is None or self._cache[:2] != (seed, len(population)):
            k = round(self.fraction * len(population))
            order = stream(seed, stage_tag("Byzantine")).permutation(len(population))
            self._cache = (seed, len(population), frozenset(int(c) for c in np.asarray(population)[order[:k]]))
        return self._cache[2]

    def run(self, work: ClientWork) -> None:
        upd = work.update
        assert upd is not None
        if upd.delta is None:
            raise ConfigError("Byzantine needs the raw update, but it is already encoded",
                              fix="put Byzantine(...) before Compress(...)")
        bad = work.client in self.attackers(work.seed, work.dataset.client_ids)
        upd.metrics["byzantine"] = float(bad)
        if bad:
            factor = -self.scale if self.attack == "sign_flip" else self.scale
            upd.delta *= upd.delta.dtype.type(factor)
