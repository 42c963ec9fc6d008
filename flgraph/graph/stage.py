"""Stages and pipelines: a federated round as a small dataflow graph.

Three kinds of stage, told apart by where they run:

* **server** stages run once per round in the driver (select clients, evaluate, server optimizer);
* **client** stages run once per participating client, where that client lives (local train, compress);
* **reduce** stages combine client outputs associatively (aggregate).

``a >> b`` composes stages into a :class:`Pipeline`; :meth:`Pipeline.check` verifies, before anything
runs, that every stage gets what it needs from the stages before it.

Example:
    >>> from flgraph import stages as st
    >>> p = st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
    >>> [s.name for s in p.stages]
    ['select', 'broadcast', 'local-train', 'aggregate']
    >>> st.Select(clients=10) >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flgraph.errors.PipelineError: stage 2 (LocalTrain) needs the global model on the clients, but no stage ...
      fix: insert st.Broadcast() before LocalTrain, e.g. Select(...) >> Broadcast() >> LocalTrain(...)
"""

from __future__ import annotations

import functools
import html
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from .context import ClientWork, RoundContext, Update
from .errors import PipelineError
from .params import Params, ParamSpec
from .rng import stage_tag

__all__ = ["ClientStage", "Pipeline", "ReduceStage", "Reducer", "ServerStage", "Stage"]

Kind = Literal["server", "client", "reduce"]

# What each capability means, and which stage provides it: used to word the errors.
CAPABILITIES: dict[str, tuple[str, str]] = {
    "clients": ("the round's clients", "st.Select(clients=...)"),
    "model": ("the global model on the clients", "st.Broadcast()"),
    "update": ("a client update", "st.LocalTrain(...)"),
}


@functools.cache
def _kebab(name: str) -> str:
    """``LocalTrain`` -> ``local-train`` (cached: a stage's name is read once per client)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


class Stage(ABC):
    """Base of every stage. Subclass :class:`ServerStage`, :class:`ClientStage` or :class:`ReduceStage`.

    Class attributes declare the contract that :meth:`Pipeline.check` verifies:
    ``requires`` (capabilities a stage before it must provide) and ``provides``.
    ``name`` is the task-key prefix in the Dask dashboard (lower-case words joined by ``-``).
    """

    kind: ClassVar[Kind]
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    tag: int = 0

    @property
    def name(self) -> str:
        return _kebab(type(self).__name__)

    def prepare(self, dataset: Any, model_source: Any) -> None:
        """Check, before anything runs, that this stage can work with the run's data and model."""

    def settings(self) -> dict[str, Any]:
        """The stage's settings, shown in ``repr`` and saved in the pipeline spec."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_") and k != "tag"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.settings().items())
        return f"{type(self).__name__}({args})"

    def __rshift__(self, other: Stage | Pipeline) -> Pipeline:
        return Pipeline([self]) >> other


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
        :mod:`flgraph.client_state` (on disk, in snapshots' terms: resumed exactly). Default: none."""
        return {}

    @abstractmethod
    def run(self, work: ClientWork) -> None: ...


class Reducer(ABC):
    """Combines client updates associatively: ``leaf`` -> ``combine`` (a tree) -> ``finalize``.

    ``combine`` may reuse (mutate) its left argument. The engine combines leaves in one fixed binary
    tree over the round's client order, so the result does not depend on chunking or worker count.
    """

    needs_all: ClassVar[bool] = False

    @abstractmethod
    def leaf(self, update: Update, spec: ParamSpec) -> Any: ...

    @abstractmethod
    def combine(self, left: Any, right: Any) -> Any: ...

    @abstractmethod
    def finalize(self, acc: Any, spec: ParamSpec) -> tuple[Any, float]:
        """The aggregated delta (flat, carrier dtype) and the total weight."""


class ReduceStage(Stage):
    """Across client outputs: holds a :class:`Reducer` and turns its result into new global params."""

    kind: ClassVar[Kind] = "reduce"
    requires: ClassVar[frozenset[str]] = frozenset({"update"})
    provides: ClassVar[frozenset[str]] = frozenset({"aggregate"})
    reducer: Reducer

    def init_state(self, params: Params) -> dict[str, Any]:
        return {}

    @abstractmethod
    def apply(self, ctx: RoundContext, delta: Any, weight: float) -> None:
        """Update ``ctx.params`` in place from the aggregated ``delta``."""


@dataclass(frozen=True)
class Segments:
    """A checked pipeline split by where stages run."""

    before: tuple[ServerStage, ...]
    clients: tuple[ClientStage, ...]
    reduce: ReduceStage | None
    after: tuple[ServerStage, ...]


class Pipeline:
    """An ordered composition of stages, checked when it is built.

    Example:
        >>> from flgraph import stages as st
        >>> p = st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
        >>> print(p)  # doctest: +NORMALIZE_WHITESPACE
        Pipeline: Select(clients=5, ...) >> Broadcast() >> LocalTrain(...) >> Aggregate(...)
        ...
    """

    def __init__(self, stages: Iterable[Stage]) -> None:
        self.stages: tuple[Stage, ...] = tuple(stages)
        for s in self.stages:
            if not isinstance(s, Stage):
                raise PipelineError(
                    f"{s!r} is not a stage",
                    fix="compose flgraph stages with >>, e.g. st.Select(clients=10) >> st.Broadcast()",
                )
        self.segments = self._check()
        counts: dict[str, int] = {}
        for s in self.stages:
            cls = type(s).__name__
            s.tag = stage_tag(cls, counts.get(cls, 0))
            counts[cls] = counts.get(cls, 0) + 1

    def __rshift__(self, other: Stage | Pipeline) -> Pipeline:
        more = other.stages if isinstance(other, Pipeline) else (other,)
        return Pipeline(self.stages + tuple(more))

    def _check(self, final: bool = False) -> Segments:
        # A pipeline under construction may be a fragment (``a >> (b >> c)`` builds ``b >> c`` first): it
        # assumes that what its first stage needs comes from upstream. The final check assumes nothing.
        have: set[str] = set() if final or not self.stages else set(self.stages[0].requires)
        before: list[ServerStage] = []
        clients: list[ClientStage] = []
        after: list[ServerStage] = []
        reduce: ReduceStage | None = None
        for i, s in enumerate(self.stages, 1):
            where = f"stage {i} ({type(s).__name__})"
            for need in sorted(s.requires - have):
                what, provider = CAPABILITIES.get(need, (repr(need), "a stage that provides it"))
                example = {
                    "model": "Select(...) >> Broadcast() >> LocalTrain(...)",
                    "clients": "Select(clients=10) >> Broadcast() >> ...",
                    "update": "... >> Broadcast() >> LocalTrain(...) >> Aggregate(...)",
                }.get(need)
                fix = f"insert {provider} before {type(s).__name__}"
                raise PipelineError(
                    f"{where} needs {what}, but no stage before it provides it",
                    fix=fix + (f", e.g. {example}" if example else ""),
                )
            dup = s.provides & have & {"clients", "model", "aggregate"}
            if dup:
                raise PipelineError(
                    f"{where} provides {sorted(dup)[0]!r} a second time (a round has one "
                    f"{ {'clients': 'Select', 'model': 'Broadcast', 'aggregate': 'Aggregate'}[sorted(dup)[0]] })",
                    fix=f"remove one of the two {type(s).__name__} stages",
                )
            if isinstance(s, ClientStage):
                if reduce is not None:
                    raise PipelineError(
                        f"{where} is a client stage after the Aggregate stage",
                        fix="a round has one client segment: put client stages before Aggregate",
                    )
                clients.append(s)
            elif isinstance(s, ReduceStage):
                reduce = s
            elif isinstance(s, ServerStage):
                if clients and reduce is None:
                    raise PipelineError(
                        f"{where} is a server stage between client stages and the Aggregate stage",
                        fix="server stages run before the client stages or after Aggregate",
                    )
                (after if reduce is not None else before).append(s)
            else:
                raise PipelineError(f"{where} is neither a server, a client nor a reduce stage",
                                    fix="subclass flgraph.ServerStage, flgraph.ClientStage or flgraph.ReduceStage")
            have |= s.provides
        if final:
            if not clients:
                raise PipelineError(
                    "the pipeline has no client stage, so no client ever trains",
                    fix="add st.Broadcast() >> st.LocalTrain(...) after Select",
                )
            if reduce is None:
                raise PipelineError(
                    "nothing aggregates the client updates",
                    fix="end the client stages with st.Aggregate(st.WeightedMean())",
                )
        return Segments(tuple(before), tuple(clients), reduce, tuple(after))

    def check(self) -> Segments:
        """Check that the pipeline is a complete round (it has client stages and an aggregate)."""
        return self._check(final=True)

    def __iter__(self) -> Any:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        seg = self.segments
        lines = ["Pipeline: " + " >> ".join(repr(s) for s in self.stages)]
        for label, group in (
            ("server, before", seg.before),
            ("client", seg.clients),
            ("reduce", (seg.reduce,) if seg.reduce else ()),
            ("server, after", seg.after),
        ):
            if group:
                lines.append(f"  [{label}] " + " -> ".join(s.name for s in group))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colors = {"server": "#dbeafe", "client": "#dcfce7", "reduce": "#fde68a"}
        boxes = []
        for s in self.stages:
            tip = html.escape(repr(s))
            boxes.append(
                f'<div title="{tip}" style="display:inline-block;padding:6px 10px;border:1px solid #555;'
                f'border-radius:6px;background:{colors[s.kind]};font-family:monospace">'
                f"<b>{html.escape(type(s).__name__)}</b><br><small>{s.kind}</small></div>"
            )
        legend = " ".join(f'<span style="background:{c};padding:0 6px">{k}</span>' for k, c in colors.items())
        arrow = ' <span style="font-size:18px">&rarr;</span> '
        return "<div>" + arrow.join(boxes) + f"<br><small>{legend}</small></div>"

