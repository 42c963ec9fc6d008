"""What an edge agent that runs no client segment (no ``caps.segment``) would leave out of a round's stages.

Such an agent (an older one, or a task function of the device's own) reads only the ``LocalTrain``
settings the round's config carries (``epochs``, ``steps``, ``batch_size``, ``lr``, ``mu``, ``holdout``).
A client stage or setting the config does not carry (a custom optimizer or loss, a ``train_fn``,
``freeze``, SCAFFOLD's correction, a lossy ``Compress`` codec, ``Byzantine``, any other client stage)
would be silently left out on it: the transport refuses such a round for it (:mod:`.segment` says what
agents that run the segment can run).

Example:
    >>> from flgraph import stages as st
    >>> unsupported([st.LocalTrain(epochs=2, lr=0.1), st.Compress("lz4")])
    []
    >>> for refused in unsupported([st.LocalTrain(freeze=["head"]), st.Compress("int8")]):
    ...     print(refused)
    LocalTrain(freeze=('head',))
    Compress(codec=Int8(...)): a lossy codec
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["WIRE_SETTINGS", "unsupported"]

#: The LocalTrain settings the round's config carries to an agent.
WIRE_SETTINGS = frozenset({"epochs", "steps", "batch_size", "lr", "mu", "holdout", "device"})


def unsupported(stages: Sequence[Any]) -> list[str]:
    """The client stages (and settings) that an agent would not run as a Dask worker does."""
    out: list[str] = []
    for s in stages:
        name = type(s).__name__
        if name == "LocalTrain":
            extra = {k: v for k, v in s.settings().items() if k not in WIRE_SETTINGS and not _default(s, k, v)}
            if extra:
                out.append(f"LocalTrain({', '.join(f'{k}={v!r}' for k, v in extra.items())})")
        elif name == "Compress":
            if getattr(s.codec, "name", "") != "lz4":
                out.append(f"Compress(codec={type(s.codec).__name__}(...)): a lossy codec")
        else:
            out.append(f"{name}: a client stage agents do not run")
    return out


def _default(stage: Any, key: str, value: Any) -> bool:
    """Settings whose value is what the agent does anyway (plain SGD at the stage's lr, cross-entropy)."""
    if value is None:
        return True
    return (key == "optimizer" and type(value).__name__ == "SGD" and not getattr(value, "momentum", 0.0)
            and getattr(value, "lr", None) == stage.lr)
