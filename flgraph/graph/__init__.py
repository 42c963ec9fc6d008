"""A federated round as a small dataflow graph of stages over named values.

* :mod:`flgraph.graph.stage` — the stage kinds (server, client, reduce) and the :class:`Reducer` protocol;
* :mod:`flgraph.graph.values` — the named values stages read and write;
* :mod:`flgraph.graph.pipeline` — composition: chains (``>>``), fan-outs (a dict), branches (``|``);
* :mod:`flgraph.graph.check` — the check before anything runs, and the :class:`RoundGraph` engines run;
* :mod:`flgraph.graph.draw` — the text and HTML pictures of a pipeline.

Example:
    >>> from flgraph import stages as st
    >>> p = st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain() >> st.Aggregate(st.WeightedMean())
    >>> p.check().plain
    True
"""

from .check import Branch, Reduction, RoundGraph
from .pipeline import Pipeline
from .stage import ClientStage, Reducer, ReduceStage, ServerStage, Stage

__all__ = ["Branch", "ClientStage", "Pipeline", "ReduceStage", "Reducer", "Reduction", "RoundGraph", "ServerStage",
           "Stage"]
