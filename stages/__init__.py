"""The stage library (importable as ``flgraph.stages``): one module per family.

Example:
    >>> from flgraph import stages as st
    >>> pipeline = (st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain(epochs=1)
    ...             >> st.Compress("lz4") >> st.Aggregate(st.WeightedMean()) >> st.Evaluate(every=5))
    >>> len(pipeline)
    6
"""

from flgraph.graph import ClientStage, Reducer, ReduceStage, ServerStage, Stage

from .aggregate import Aggregate, WeightedMean
from .broadcast import Broadcast
from .buffered import BufferedAggregate, Constant, Hinge, Polynomial
from .compress import LZ4, Compress, Float16
from .evaluate import Evaluate
from .select import Select
from .simulate import Simulate
from .train import LocalTrain, TrainContext

__all__ = [
    "LZ4",
    "Aggregate",
    "Broadcast",
    "BufferedAggregate",
    "ClientStage",
    "Compress",
    "Constant",
    "Evaluate",
    "Float16",
    "Hinge",
    "LocalTrain",
    "Polynomial",
    "ReduceStage",
    "Reducer",
    "Select",
    "ServerStage",
    "Simulate",
    "Stage",
    "TrainContext",
    "WeightedMean",
]
