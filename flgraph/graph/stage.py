"""Stages: the steps of a round, each declaring the named values it reads and writes.

Three kinds of stage, told apart by where they run:

* **server** stages run once per round in the driver (select clients, evaluate, server steps);
* **client** stages run once per participating client, where that client lives (local train, compress);
* **reduce** stages combine one per-client value across clients associatively (aggregate).

A stage reads and writes **named values** (:mod:`flgraph.graph.values`): round values (``clients``,
``params``, a server control variate), per-client values (``update``, ``control_delta``) and the
aggregates of per-client values. The pipeline check (:mod:`flgraph.graph.check`) verifies, before
anything runs, that every value read has a writer upstream.

Example:
    >>> from flgraph import stages as st
    >>> sorted(st.Broadcast().writes()), sorted(st.LocalTrain().reads())
    (['model'], ['model'])
"""

from __future__ import annotations

import functools
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..context import ClientWork, RoundContext, Update
from ..params import Params, ParamSpec

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["ClientStage", "ReduceStage", "Reducer", "ServerStage", "Stage"]

Kind = Literal["server", "client", "reduce"]


@functools.cache
def _kebab(name: str) -> str:
    """``LocalTrain`` -> ``local-train`` (cached: a stage's name is read once per client)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class Stage(ABC):
    """Base of every stage. Subclass :class:`ServerStage`, :class:`ClientStage` or :class:`ReduceStage`.

    A stage declares the named values it reads and writes (:meth:`reads`, :meth:`writes`; by default the
    class attributes ``requires`` and ``provides``), and ``keeps``: the entries of its explicit state that
    are server values other stages may read (e.g. SCAFFOLD's ``control``, which ``Broadcast("params",
    "control")`` ships to the clients). :meth:`flgraph.Pipeline.check` verifies them before anything runs.
    ``name`` is the task-key prefix in the Dask dashboard (lower-case words joined by ``-``).
    """

    kind: ClassVar[Kind]
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    keeps: ClassVar[frozenset[str]] = frozenset()
    # a round-graph feature the transport must declare it supports to run this stage (e.g. "secure
    # aggregation", whose phases talk to the clients several times a round); None: any transport runs it
    feature: ClassVar[str | None] = None
    tag: int = 0

    @property
    def name(self) -> str:
        return _kebab(type(self).__name__)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        """Check, before anything runs, that this stage can work with the run's data and model."""

    def reads(self) -> frozenset[str]:
        """The named values this stage reads (see :mod:`flgraph.graph.values`)."""
        return self.requires

    def writes(self) -> frozenset[str]:
        """The named values this stage writes; a value it also reads is transformed in place."""
        return self.provides

    def reads_kept(self) -> frozenset[str]:
        """The server values among :meth:`reads` that some stage of the round keeps from round to round
        (it may stand anywhere in the round: this round reads the value the last round left)."""
        return frozenset()

    def settings(self) -> dict[str, Any]:
        """The stage's settings, shown in ``repr`` and saved in the pipeline spec."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "tag"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def __rshift__(self, other: Any) -> Pipeline:
        from .pipeline import Pipeline

        return Pipeline([self]) >> other

    def __or__(self, other: Any) -> Pipeline:
        from .pipeline import Pipeline

        return Pipeline([self]) | other


def _short(v: Any) -> str:
    if callable(v) and hasattr(v, "__qualname__"):
        return str(v.__qualname__)
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


class ServerStage(Stage):
    """Runs once per round in the driver: ``run(ctx)`` reads and updates the :class:`RoundContext`."""

    kind: ClassVar[Kind] = "server"

    def init_state(self, params: Params) -> dict[str, Any]:
        """This stage's explicit state at the start of a run (saved in checkpoints)."""
        return {}

    @abstractmethod
    def run(self, ctx: RoundContext) -> None: ...


class ClientStage(Stage):
    """Runs once per participating client where the client lives: ``run(work)`` updates the work."""

    kind: ClassVar[Kind] = "client"

    def client_fields(self, spec: ParamSpec) -> dict[str, tuple[str, int]]:
        """Per-client state this stage keeps between a client's rounds: name -> (dtype, size). Read and
        written in ``run`` with ``work.load_state(name)`` / ``work.save_state(name, value)``; stored by
        :mod:`flgraph.store.client_state` (on disk, in snapshots' terms: resumed exactly). Default: none."""
        return {}

    def drops(self) -> frozenset[str]:
        """Per-client values this stage discards on purpose (so that no reducer need consume them)."""
        return frozenset()

    def place(self, cuda_by_worker: Mapping[str, int]) -> None:
        """Settle where the stage computes, once per run before it is shipped: ``cuda_by_worker`` maps each
        worker's address to its CUDA device count. Raise ConfigError to refuse the cluster. Default: nothing
        (see :mod:`flgraph.stages.placement` for LocalTrain's ``device="auto"``)."""

    @abstractmethod
    def run(self, work: ClientWork) -> None: ...


class Reducer(ABC):
    """Combines client updates associatively: ``leaf`` -> ``combine`` (a tree) -> ``finalize``.

    ``combine`` may reuse (mutate) its left argument. The engine combines leaves in one fixed binary
    tree over the round's client order, so the result does not depend on chunking or worker count.
    """

    needs_all: ClassVar[bool] = False
    yields_metrics: ClassVar[bool] = False  # finalize gives {metric: value}: the round's row records them

    def merges(self, inner: Reducer) -> bool:
        """Whether this reducer, as the tier above ``inner``, may combine ``inner``'s partial results as they
        are instead of its finalized group results (a weighted mean of weighted means is one weighted
        mean). Default: no."""
        return False

    @abstractmethod
    def leaf(self, update: Update, spec: ParamSpec) -> Any: ...

    @abstractmethod
    def combine(self, left: Any, right: Any) -> Any: ...

    @abstractmethod
    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        """The aggregated delta (flat, carrier dtype) and the total weight."""


class ReduceStage(Stage):
    """Across clients: holds a :class:`Reducer` over one per-client value.

    Over the model ``update`` it turns the result into new global params (:meth:`apply`). Over another
    value (``control_delta``, a metric) it writes that value's aggregate, which server stages after it read
    from ``ctx.aggregates`` (only stages with ``any_value = True``, such as ``Aggregate``, may reduce
    values other than the update). ``by`` (a client attribute such as ``"site"``) reduces per group:
    the next reduce stage then combines the groups (tiers).
    """

    kind: ClassVar[Kind] = "reduce"
    requires: ClassVar[frozenset[str]] = frozenset({"update"})
    provides: ClassVar[frozenset[str]] = frozenset({"aggregate"})
    any_value: ClassVar[bool] = False
    asynchronous: ClassVar[bool] = False  # steps the model as updates arrive (FedBuff): the asynchronous engine
    reducer: Reducer
    by: str | None = None

    def init_state(self, params: Params) -> dict[str, Any]:
        return {}

    @abstractmethod
    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        """Update ``ctx.params`` in place from the aggregated ``delta``."""


