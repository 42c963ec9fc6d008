"""Typed contracts between the engine and the server stages that take part in more than their round.

A stage that keeps a virtual clock (:class:`~flgraph.stages.Simulate`) tells the round its start time and
advances its clock once the clients are back (:class:`KeepsClock`); a stage that can choose the next
round's clients while this one trains (:class:`~flgraph.stages.Select`) says so (:class:`ChoosesAhead`).
The engine checks these with ``isinstance``, not by looking attributes up.

Example:
    >>> from flgraph import stages as st
    >>> isinstance(st.Select(clients=3), ChoosesAhead), isinstance(st.Broadcast(), KeepsClock)
    (True, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..context import ClientSet, RoundContext
    from .stage import Stage

__all__ = ["ChoosesAhead", "KeepsClock", "SeesPipeline"]


@runtime_checkable
class KeepsClock(Protocol):
    """A server stage with a virtual clock: the round's start time, then the round's simulated time."""

    def clock(self, state: dict[str, Any]) -> float:
        """The virtual time at the round's start, from the stage's state."""
        ...

    def after_clients(self, ctx: RoundContext, root: Any) -> None:
        """Advance the clock by the round's simulated time (``root``: the round's root partial)."""
        ...


@runtime_checkable
class ChoosesAhead(Protocol):
    """A server stage that can choose round ``rnd``'s clients ahead of it and keep them for it."""

    def lookahead(self, rnd: int, seed: int, dataset: Any) -> ClientSet | None:
        """Choose round ``rnd``'s clients now; ``None`` when the choice may depend on more than the round."""
        ...


@runtime_checkable
class SeesPipeline(Protocol):
    """A stage that reads other stages of its pipeline (a privacy accountant reads the sampling of Select and
    the noise of the DP aggregate, so the run holds one copy of each setting). :class:`flgraph.Run` calls
    ``see_pipeline`` once, after the pipeline check and before any stage's ``prepare``."""

    def see_pipeline(self, stages: tuple[Stage, ...]) -> None:
        """Find the stages this one reads; refuse (ConfigError) a pipeline it cannot work with."""
        ...
