"""flgraph: federated-learning rounds as composable dataflow graphs, executed on Dask.

Example:
    >>> import flgraph as fg
    >>> from flgraph import stages as st
    >>> data = fg.data.synthetic_classification(num_clients=100, samples_per_client=32, num_features=20,
    ...                                         num_classes=4, seed=0, test_samples=200)
    >>> pipeline = fg.recipes.fedavg(clients=10, epochs=1, batch_size=16, lr=0.05)
    >>> run = fg.Run(pipeline, model=fg.models.mlp(20, [32], 4), data=data, seed=0)  # doctest: +SKIP
    >>> history = run.fit(rounds=5)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from . import data, errors
from .context import ClientSet, ClientWork, RoundContext, Update
from .errors import CheckpointError, ClientError, ClusterError, ConfigError, DataError, FlgraphError, PipelineError
from .graph import ClientStage, Pipeline, Reducer, ReduceStage, ServerStage, Stage
from .observe.history import History
from .params import Params, ParamSpec
from .run import Run
from .store.checkpoint import Checkpoints
from .store.persist import resume

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "ClientError",
    "ClientSet",
    "ClientStage",
    "ClientWork",
    "ClusterError",
    "ConfigError",
    "DataError",
    "FlgraphError",
    "History",
    "ParamSpec",
    "Params",
    "Pipeline",
    "PipelineError",
    "ReduceStage",
    "Reducer",
    "RoundContext",
    "Run",
    "ServerStage",
    "Stage",
    "Update",
    "__version__",
    "data",
    "errors",
    "models",
    "recipes",
    "resume",
    "stages",
    "transports",
]

_LAZY = {"models", "recipes", "stages", "transports"}  # these import torch or dask: load on first use


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'flgraph' has no attribute {name!r}")
