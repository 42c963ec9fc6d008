"""Small tools to derive a recipe from another by swapping or inserting stages.

Example:
    >>> from flgraph import stages as st
    >>> from flgraph.recipes import fedavg
    >>> from flgraph.recipes.compose import insert_after, swap
    >>> p = swap(fedavg(clients=10), st.Aggregate, st.Aggregate(st.Median()))
    >>> p = insert_after(p, st.Select, st.Stragglers(0.5))
    >>> [s.name for s in p]
    ['select', 'stragglers', 'broadcast', 'local-train', 'aggregate', 'evaluate']
"""

from __future__ import annotations

from flgraph.errors import PipelineError
from flgraph.graph import Pipeline, Stage

__all__ = ["insert_after", "swap"]


def _index(pipeline: Pipeline, kind: type[Stage]) -> int:
    hits = [i for i, s in enumerate(pipeline) if isinstance(s, kind)]
    if len(hits) != 1:
        raise PipelineError(f"the pipeline has {len(hits)} {kind.__name__} stages, expected one",
                            fix=f"pass a pipeline with exactly one {kind.__name__}")
    return hits[0]


def swap(pipeline: Pipeline, kind: type[Stage], new: Stage) -> Pipeline:
    """``pipeline`` with its one stage of type ``kind`` replaced by ``new`` (checked again)."""
    stages = list(pipeline)
    stages[_index(pipeline, kind)] = new
    return Pipeline(stages)


def insert_after(pipeline: Pipeline, kind: type[Stage], new: Stage) -> Pipeline:
    """``pipeline`` with ``new`` inserted right after its one stage of type ``kind`` (checked again)."""
    stages = list(pipeline)
    i = _index(pipeline, kind)
    return Pipeline([*stages[: i + 1], new, *stages[i + 1 :]])
