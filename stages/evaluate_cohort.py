"""Client-side evaluation as a client stage, for an evaluation branch with its own cohort (client stage).

``ClientEvaluate`` scores the broadcast global model on the client's data (or on the held-out part that
``LocalTrain(holdout=f)`` never trains on) and writes the per-client value ``evaluation``: an
:class:`~flgraph.context.Update` with no delta whose metrics are ``loss`` and ``accuracy``, weighted by the
samples scored. ``Aggregate(MetricsMean())`` reduces it, and the round's row records the branch's figures
(``eval/accuracy``). Unlike :class:`~flgraph.stages.FederatedEvaluate`, which runs its clients after the
training clients, a branch's clients run side by side with training in the same client pass::

    fg.recipes.fedavg(clients=100) | (st.Select(clients=200) >> st.Broadcast() >> st.ClientEvaluate()
                                      >> st.Aggregate(st.MetricsMean())).named("eval")

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.ClientEvaluate().writes()), sorted(st.Discard("evaluation").drops())
    (['evaluation'], ['evaluation'])
"""

from __future__ import annotations

from typing import ClassVar

from flgraph.context import ClientWork, Update
from flgraph.errors import ClientError, ConfigError
from flgraph.graph import ClientStage

from .evaluate_clients import _score
from .split import check_fraction, heldout

__all__ = ["ClientEvaluate", "Discard"]


class ClientEvaluate(ClientStage):
    """Score the global model on this client's data; write ``evaluation`` (loss, accuracy)."""

    requires: ClassVar[frozenset[str]] = frozenset({"model"})
    provides: ClassVar[frozenset[str]] = frozenset({"evaluation"})

    def __init__(self, *, holdout: float = 0.0, batch_size: int = 256) -> None:
        check_fraction("ClientEvaluate", holdout)
        if batch_size < 1:
            raise ConfigError(f"ClientEvaluate(batch_size={batch_size}): must be >= 1")
        self.holdout = holdout
        self.batch_size = batch_size

    def run(self, work: ClientWork) -> None:
        x, y = work.data.x, work.data.y
        if self.holdout > 0:
            keep = heldout(work.seed, work.client, len(y), self.holdout)
            x, y = x[keep], y[keep]
        if len(y) == 0:
            raise ClientError("the client has no samples to evaluate", client=work.client, stage="ClientEvaluate",
                              round=work.round, fix="raise holdout= or leave out clients without samples")
        bm = work.model_source.bound("cpu")
        bm.load(work.global_params.flat)
        loss, correct = _score(bm.module, x, y, self.batch_size)
        n = len(y)
        work.outputs["evaluation"] = Update(work.client, n, work.round - 1, None,
                                            {"loss": loss / n, "accuracy": correct / n})


class Discard(ClientStage):
    """Drop per-client values on purpose, so that no reducer need consume them (``Discard("metrics")``)."""

    def __init__(self, *names: str, values: tuple[str, ...] | list[str] = ()) -> None:
        values = tuple(names) or tuple(values)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise ConfigError("Discard() names no value", fix="e.g. st.Discard('control_delta')")
        self.values = tuple(values)

    def settings(self) -> dict[str, object]:
        return {"values": list(self.values)}

    def reads(self) -> frozenset[str]:
        return frozenset(self.values)

    def drops(self) -> frozenset[str]:
        return frozenset(self.values)

    def run(self, work: ClientWork) -> None:
        for v in self.values:
            work.outputs.pop(v, None)
            if v == "update":
                work.update = None
