"""The stage library (importable as ``flgraph.stages``): one module per family.

Example:
    >>> from flgraph import stages as st
    >>> pipeline = (st.Select(clients=10) >> st.Broadcast() >> st.LocalTrain(epochs=1)
    ...             >> st.Compress("lz4") >> st.Aggregate(st.WeightedMean()) >> st.Evaluate(every=5))
    >>> len(pipeline)
    6
"""

from flgraph.graph import ClientStage, Reducer, ReduceStage, ServerStage, Stage

from .accounting import PrivacyAccountant
from .aggregate import Aggregate, Mean, MetricsMean, WeightedMean
from .broadcast import Broadcast
from .buffered import BufferedAggregate, Constant, Hinge, Polynomial
from .byzantine import Byzantine
from .clipping import AdaptiveClip
from .compress import LZ4, BFloat16, Compress, Float16, Int8, TopK
from .ditto import DittoPersonal
from .dp_noise import InsecureNoiseWarning
from .epochs import RandomEpochs
from .evaluate import Evaluate
from .evaluate_clients import FederatedEvaluate, PersonalizedEvaluate
from .evaluate_cohort import ClientEvaluate, Discard
from .fednova import FedNovaNormalize, FedNovaStep
from .oort import Collect, OortFeedback, OortSelect, OortUtility
from .privacy import ClipNorm, ClipUpdate, DPAggregate
from .qffl import QFedAvgStep, QFFLUpdate
from .robust import Krum, Median, TrimmedMean
from .scaffold import ScaffoldControl
from .secagg import SecureAggregate, SecureMask, SecureSetup, SecureSum
from .select import Select, is_pure_sampler, pure_sampler
from .server_opt import ServerOpt
from .simulate import Simulate
from .stragglers import Stragglers
from .train import SGD, LocalTrain, TrainContext

__all__ = [
    "LZ4",
    "SGD",
    "AdaptiveClip",
    "Aggregate",
    "BFloat16",
    "Broadcast",
    "BufferedAggregate",
    "Byzantine",
    "ClientEvaluate",
    "ClientStage",
    "ClipNorm",
    "ClipUpdate",
    "Collect",
    "Compress",
    "Constant",
    "DPAggregate",
    "Discard",
    "DittoPersonal",
    "Evaluate",
    "FedNovaNormalize",
    "FedNovaStep",
    "FederatedEvaluate",
    "Float16",
    "Hinge",
    "InsecureNoiseWarning",
    "Int8",
    "Krum",
    "LocalTrain",
    "Mean",
    "Median",
    "MetricsMean",
    "OortFeedback",
    "OortSelect",
    "OortUtility",
    "PersonalizedEvaluate",
    "Polynomial",
    "PrivacyAccountant",
    "QFFLUpdate",
    "QFedAvgStep",
    "RandomEpochs",
    "ReduceStage",
    "Reducer",
    "ScaffoldControl",
    "SecureAggregate",
    "SecureMask",
    "SecureSetup",
    "SecureSum",
    "Select",
    "ServerOpt",
    "ServerStage",
    "Simulate",
    "Stage",
    "Stragglers",
    "TopK",
    "TrainContext",
    "TrimmedMean",
    "WeightedMean",
    "is_pure_sampler",
    "pure_sampler",
]
