"""The settings of a secure-aggregation round, and the dropouts a simulation injects into its phases.

Example:
    >>> cfg = SecAggConfig(neighbours=4, threshold=3, clip=0.5, levels=2**10, modulus=2**32)
    >>> cfg.degree(100), cfg.min_shares(4), cfg.degree(4)
    (4, 3, 3)
    >>> SecAggConfig().degree(1000), SecAggConfig().min_shares(22)
    (22, 12)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from .masks import MAX_MODULUS

__all__ = ["Dropouts", "SecAggConfig"]

PHASES = ("after_keys", "after_shares", "after_masking", "during_unmasking")


@dataclass(frozen=True)
class SecAggConfig:
    """SecAgg+ settings.

    ``neighbours``: the degree ``k`` of the neighbour graph, i.e. how many clients hold shares of each
    client's secrets and share masks with it (even; ``None``: ``2 * ceil(log2 n) + 2``, at most ``n - 1``,
    the logarithmic degree of Bell et al.; ``k >= n - 1`` is the original SecAgg). ``threshold``: the shares
    needed to reconstruct a secret (``None``: a majority of the neighbours, ``k // 2 + 1``, the least with
    which the server cannot learn both secrets of one client). ``clip``: each coordinate of an update is
    clipped to ``[-clip, clip]``; ``levels``: quantisation levels over that range; ``modulus``: the field
    ``Z_M`` the masked sums live in (at most ``2**63``; it must exceed the largest possible sum,
    ``clients * (levels - 1)``).
    """

    neighbours: int | None = None
    threshold: int | None = None
    clip: float = 1.0
    levels: int = 2**20
    modulus: int = 2**32

    def __post_init__(self) -> None:
        if self.neighbours is not None and self.neighbours < 1:
            raise ConfigError(f"SecAgg neighbours={self.neighbours}: must be >= 1", fix="e.g. neighbours=16")
        if self.threshold is not None and self.threshold < 1:
            raise ConfigError(f"SecAgg threshold={self.threshold}: must be >= 1",
                              fix="leave threshold=None (a majority of the neighbours)")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise ConfigError(f"SecAgg clip={self.clip}: must be a positive finite number", fix="e.g. clip=1.0")
        if self.levels < 2:
            raise ConfigError(f"SecAgg levels={self.levels}: need at least 2 quantisation levels",
                              fix="e.g. levels=2**20")
        if not 2 <= self.modulus <= MAX_MODULUS:
            raise ConfigError(f"SecAgg modulus={self.modulus}: must lie in [2, 2**63]", fix="e.g. modulus=2**32")

    def degree(self, n: int) -> int:
        """The neighbour-graph degree for a round of ``n`` clients."""
        k = self.neighbours if self.neighbours is not None else 2 * math.ceil(math.log2(max(n, 2))) + 2
        return min(k, n - 1)

    def min_shares(self, k: int) -> int:
        """The reconstruction threshold for degree ``k``."""
        return self.threshold if self.threshold is not None else k // 2 + 1

    def check_round(self, n: int) -> tuple[int, int]:
        """``(k, t)`` for a round of ``n`` clients, or a ConfigError saying which setting cannot work."""
        if n < 2:
            raise ConfigError(f"secure aggregation over {n} client(s): the sum would be the client's own update",
                              fix="select at least 2 clients a round (SecAgg+ is meant for many)")
        if n * (self.levels - 1) >= self.modulus:
            raise ConfigError(f"SecAgg: {n} clients x {self.levels - 1} (levels - 1) can reach the modulus "
                              f"{self.modulus}: the modular sum would wrap around",
                              fix=f"raise modulus above {n * (self.levels - 1)} (at most 2**63) or lower levels")
        k = self.degree(n)
        if k < n - 1 and k % 2:
            raise ConfigError(f"SecAgg neighbours={k} for {n} clients: the neighbour graph needs an even degree",
                              fix=f"use neighbours={k + 1} or {k - 1}")
        t = self.min_shares(k)
        if t > k:
            raise ConfigError(f"SecAgg threshold={t} exceeds the {k} neighbours holding shares of each client",
                              fix=f"use threshold <= {k}, or more neighbours")
        return k, t


@dataclass(frozen=True)
class Dropouts:
    """Simulated dropouts for tests and studies: how many of a round's clients drop at each phase.

    ``after_keys``: they advertise keys, then leave (no shares); ``after_shares``: they share keys, then
    leave (no masked input: their pairwise masks are removed with their reconstructed keys);
    ``after_masking``: their masked input counts, then they leave before the unmasking request;
    ``during_unmasking``: they receive the request, but their answer never arrives. The clients are drawn
    (disjointly, in that order) from the run's seed and the round; ``rounds`` limits them to some rounds.

    Example:
        >>> Dropouts(after_shares=2, rounds=(3,)).applies(3), Dropouts(after_shares=2, rounds=(3,)).applies(4)
        (True, False)
    """

    after_keys: int = 0
    after_shares: int = 0
    after_masking: int = 0
    during_unmasking: int = 0
    rounds: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if min(self.counts()) < 0:
            raise ConfigError(f"{self!r}: dropout counts must be >= 0")

    def counts(self) -> tuple[int, int, int, int]:
        return self.after_keys, self.after_shares, self.after_masking, self.during_unmasking

    def applies(self, rnd: int) -> bool:
        return self.rounds is None or rnd in self.rounds
