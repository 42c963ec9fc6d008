"""Pipelines: stages composed into a round, checked as they are built.

Three ways to compose:

* ``a >> b``: a chain, the plain round ``Select >> Broadcast >> LocalTrain >> Aggregate``;
* ``... >> {"update": st.Aggregate(...), "control_delta": st.Aggregate(st.Mean())}``: a fan-out, one
  reducer (or a chain of tiers) per per-client value that the client stages write; a client trains once;
* ``p | q``: parallel branches, each with its own cohort (its own ``Select``), whose client work runs side
  by side on the cluster in the same round (``q.named("eval")`` names a branch; its metrics appear in the
  history as ``eval/<metric>``).

Tiers are a chain of reducers: ``st.Aggregate(st.WeightedMean(), by="site") >> st.Aggregate(st.Median())``
reduces each site's clients, then the sites.

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

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..errors import PipelineError
from ..rng import stage_tag
from .check import RoundGraph, check
from .draw import html_of, text_of
from .stage import Stage

__all__ = ["Pipeline"]

Step = Stage | Mapping[str, "Pipeline"]


class Pipeline:
    """A round's stages, composed with ``>>`` (chain), a dict (fan-out) and ``|`` (parallel branches).

    Checked as it is built (a fragment assumes that what its first stage needs comes from upstream);
    :meth:`check` checks it as a whole round and returns the :class:`~flgraph.graph.RoundGraph` the
    engines run. ``stages`` lists every stage once, in order (branch after branch).

    Example:
        >>> from flgraph import stages as st
        >>> p = st.Select(clients=5) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
        >>> print(p)  # doctest: +NORMALIZE_WHITESPACE
        Pipeline: Select(clients=5, ...) >> Broadcast() >> LocalTrain(...) >> Aggregate(...)
        ...
    """

    def __init__(self, stages: Iterable[Any] = (), *, branches: tuple[Pipeline, ...] | None = None,
                 name: str | None = None) -> None:
        self.steps: tuple[Step, ...] = tuple(_step(s) for s in stages)
        self.branches: tuple[Pipeline, ...] | None = branches
        self.name = name
        if branches is not None:
            self.stages: tuple[Stage, ...] = tuple(s for b in branches for s in b.stages)
        else:
            self.stages = tuple(s for st in self.steps for s in _stages_of(st))
        self.segments: RoundGraph = check(self, final=False)
        counts: dict[str, int] = {}
        for s in self.stages:
            cls = type(s).__name__
            s.tag = stage_tag(cls, counts.get(cls, 0))
            counts[cls] = counts.get(cls, 0) + 1

    def __rshift__(self, other: Any) -> Pipeline:
        if self.branches is not None:
            raise PipelineError("a stage after parallel branches belongs to no branch",
                                fix="add it at the end of one branch: (a >> stage) | b")
        if isinstance(other, Pipeline):
            if other.branches is not None:
                raise PipelineError("parallel branches after a chain: each branch needs its own Select",
                                    fix="compose the branches side by side: (a >> b) | (c >> d)")
            return Pipeline(self.steps + other.steps, name=self.name)
        return Pipeline((*self.steps, other), name=self.name)

    def __rrshift__(self, other: Any) -> Pipeline:
        return Pipeline([other]) >> self

    def __or__(self, other: Any) -> Pipeline:
        right = other if isinstance(other, Pipeline) else Pipeline([other])
        return Pipeline(branches=(*(self.branches or (self,)), *(right.branches or (right,))))

    def named(self, name: str) -> Pipeline:
        """This pipeline as a branch called ``name`` (its metrics are recorded as ``name/<metric>``)."""
        if not name or "/" in name:
            raise PipelineError(f"branch name {name!r}", fix="use a short word without '/', e.g. 'eval'")
        if self.branches is not None:
            raise PipelineError("name the branches, not their composition", fix="(a.named('x') | b.named('y'))")
        return Pipeline(self.steps, name=name)

    def check(self) -> RoundGraph:
        """Check that the pipeline is a complete round; returns the graph the engines run."""
        return check(self, final=True)

    def show(self) -> Any:
        """A picture of the graph: rendered HTML in a notebook, the text form elsewhere."""
        try:
            from IPython.display import HTML, display

            display(HTML(self._repr_html_()))
        except ImportError:
            print(self)
        return None

    def __iter__(self) -> Iterator[Stage]:
        return iter(self.stages)

    def __len__(self) -> int:
        return len(self.stages)

    def __repr__(self) -> str:
        return text_of(self)

    def _repr_html_(self) -> str:
        return html_of(self)


def _step(s: Any) -> Step:
    if isinstance(s, Mapping):
        if not s:
            raise PipelineError("an empty fan-out {}", fix="map each per-client value to its reducer")
        out: dict[str, Pipeline] = {}
        for value, sub in s.items():
            if not isinstance(value, str):
                raise PipelineError(f"the fan-out's key {value!r} is not a value name",
                                    fix="key it by the per-client value, e.g. {'update': st.Aggregate()}")
            out[value] = sub if isinstance(sub, Pipeline) else Pipeline([sub])
        return out
    if not isinstance(s, Stage):
        raise PipelineError(f"{s!r} is not a stage",
                            fix="compose flgraph stages with >>, e.g. st.Select(clients=10) >> st.Broadcast()")
    return s


def _stages_of(step: Step) -> list[Stage]:
    if isinstance(step, Mapping):
        return [s for sub in step.values() for s in sub.stages]
    return [step]
