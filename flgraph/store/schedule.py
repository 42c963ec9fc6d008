"""When a run writes snapshots and which it keeps: :class:`Checkpoints` (public, with the place) and the
:class:`CheckpointPolicy` the snapshot writer follows.

Example:
    >>> sorted(CheckpointPolicy(every=5, keep_last=2, keep_every=10).keep([5, 10, 15, 20, 25]))
    [10, 20, 25]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointError

__all__ = ["CheckpointPolicy", "Checkpoints"]


@dataclass(frozen=True)
class Checkpoints:
    """Where a run keeps its snapshots, how often it writes them, and which it keeps:
    ``Run(..., checkpoint=Checkpoints("runs/exp.zarr", every=10, keep_last=3, keep_every=100))``.

    ``path``: a directory path or a zarr store (``Run(checkpoint=path)`` is ``Checkpoints(path)``; on
    :func:`flgraph.resume`, leave it out: the run continues in its own directory). ``every``: rounds between
    snapshots (the last round of each ``fit`` always gets one; ``None``: only by time); ``minutes``: also
    write when this much time passed since the last one; ``keep_last``: newest snapshots kept;
    ``keep_every``: also keep every round divisible by it (milestones).

    Example:
        >>> Checkpoints("runs/exp.zarr", every=10, keep_every=100).policy
        CheckpointPolicy(every=10, minutes=None, keep_last=3, keep_every=100)
    """

    path: Any = None
    every: int | None = 1
    minutes: float | None = None
    keep_last: int = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        self.policy  # noqa: B018 - checks the settings now, not at the first snapshot

    @property
    def policy(self) -> CheckpointPolicy:
        """When to write and what to keep (without the place)."""
        return CheckpointPolicy(self.every, self.minutes, self.keep_last, self.keep_every)

    @staticmethod
    def of(value: Any) -> Checkpoints | None:
        """``Run(checkpoint=...)``'s value as Checkpoints: None, a path or store, or Checkpoints itself."""
        if value is None or isinstance(value, Checkpoints):
            return value
        return Checkpoints(value)


@dataclass
class CheckpointPolicy:
    """When to write snapshots and which to keep.

    ``every``: rounds between snapshots (None: only by time); ``minutes``: also write when this much time
    passed since the last one; ``keep_last``: newest snapshots kept; ``keep_every``: also keep every
    round divisible by it (milestones).
    """

    every: int | None = 1
    minutes: float | None = None
    keep_last: int = 3
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.every is None and self.minutes is None:
            raise CheckpointError("Checkpoints(every=None, minutes=None) would never write a snapshot",
                                  fix="give every= rounds or minutes=")
        if self.every is not None and self.every < 1:
            raise CheckpointError(f"Checkpoints(every={self.every}): must be >= 1")
        if self.keep_last < 1:
            raise CheckpointError(f"Checkpoints(keep_last={self.keep_last}): keep at least the newest snapshot")

    def due(self, rnd: int, last: bool, since_last_s: float) -> bool:
        """Whether round ``rnd`` ends with a snapshot."""
        if last:
            return True
        if self.every is not None and rnd % self.every == 0:
            return True
        return self.minutes is not None and since_last_s >= self.minutes * 60

    def keep(self, rounds: list[int]) -> set[int]:
        """The rounds to keep among committed snapshot rounds."""
        kept = set(sorted(rounds)[-self.keep_last:])
        if self.keep_every:
            kept |= {r for r in rounds if r % self.keep_every == 0}
        return kept
