"""Ready-made task functions for edge agents: flgraph's own ``LocalTrain`` run on the device.

:class:`LocalTrainTask` wraps a torch module and a function loading this device's data; it trains with
the round's config (``epochs``, ``steps``, ``batch_size``, ``lr``, ``tag``: the gateway sends the run's
``LocalTrain`` settings) and the run's seed streams, so an agent computes exactly the update a Dask worker
would compute for the same client and data. :func:`synthetic` is a complete task for demos and tests: its
data is :func:`flgraph.data.synthetic_classification`, its model :func:`flgraph.models.mlp`, both
described by the round's config.

Example:
    >>> import numpy as np
    >>> import flgraph as fg
    >>> from flgraph.transports.zmq.agent import EdgeTask
    >>> from flgraph.transports.zmq.tasks import LocalTrainTask
    >>> data = fg.data.synthetic_classification(num_clients=4, samples_per_client=16, num_features=8,
    ...                                         num_classes=3, seed=0, test_samples=0)
    >>> train = LocalTrainTask(fg.models.mlp(8, [16], 3), data.load)
    >>> params = train.adapter.initial_params()
    >>> result = train(EdgeTask(1, 2, 0, 30.0, params, {"epochs": 1, "batch_size": 8, "lr": 0.1}))
    >>> result.num_samples, result.delta.shape == params.flat.shape, "loss" in result.metrics
    (16, True, True)
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from flgraph.stages import LocalTrain  # imports torch now, before the agent joins, not in its first round

from flgraph.context import ClientSet, ClientWork
from flgraph.errors import ConfigError
from flgraph.rng import stage_tag

from .agent import EdgeResult, EdgeTask

__all__ = ["LocalTrainTask", "synthetic"]


class _OneClient:
    """The minimal dataset a ClientWork needs on a device: this client's data, loaded on first use."""

    def __init__(self, client: int, load: Callable[[int], Any]) -> None:
        self.client = client
        self._load = load

    def load(self, client: int) -> Any:
        from flgraph.data.dataset import as_client_data

        if client != self.client:
            raise ConfigError(f"this device holds client {self.client}'s data, not client {client}'s")
        return as_client_data(self._load(client), f"the device's data for client {client}")


class LocalTrainTask:
    """A task function running flgraph's ``LocalTrain`` on ``model`` with ``load_data(client)``."""

    def __init__(self, model: Any, load_data: Callable[[int], Any], *, device: str = "cpu") -> None:
        from flgraph.models.adapter import ModelAdapter

        self.adapter = ModelAdapter.from_module(model)
        self.load_data = load_data
        self.device = device

    def __call__(self, task: EdgeTask) -> EdgeResult:
        mine, theirs = self.adapter.spec, task.params.spec
        if [(e.name, e.shape) for e in mine.entries] != [(e.name, e.shape) for e in theirs.entries]:
            raise ConfigError(f"the gateway's model ({theirs.describe()}) is not this device's "
                              f"({mine.describe()})", fix="install the run's model on the device")
        cfg = task.config
        accepted = inspect.signature(LocalTrain).parameters
        kwargs = {k: cfg[k] for k in ("epochs", "steps", "batch_size", "lr", "mu", "holdout")
                  if k in cfg and k in accepted}
        stage = LocalTrain(**kwargs, device=self.device)
        stage.prepare(None, self.adapter)
        work = ClientWork(task.round, task.client, 0, task.seed, task.params,
                          _OneClient(task.client, self.load_data),  # type: ignore[arg-type]
                          ClientSet(np.array([task.client])), self.adapter)
        stage.tag = work.tag = int(cfg.get("tag", stage_tag("LocalTrain", 0)))
        stage.run(work)
        update = work.update
        assert update is not None and update.delta is not None
        return EdgeResult(num_samples=update.num_samples, delta=np.array(update.delta, copy=True),
                          metrics=dict(update.metrics))


_cache: dict[tuple[Any, ...], LocalTrainTask] = {}
_cache_lock = threading.Lock()


def synthetic(task: EdgeTask) -> EdgeResult:
    """Train an MLP on this client's part of ``synthetic_classification``, both described by the config.

    Config keys (defaults): ``data_seed`` (0), ``num_clients`` (1000), ``samples_per_client`` (64),
    ``num_features`` (784), ``num_classes`` (10), ``alpha`` (0.5), ``hidden`` ("200,200"), ``model_seed``
    (0), besides ``LocalTrain``'s. For demos and tests (``flgraph edge --task
    flgraph.transports.zmq.tasks:synthetic``); a real device loads its own data.
    """
    import flgraph as fg

    c = task.config
    key = tuple(c.get(k) for k in ("data_seed", "num_clients", "samples_per_client", "num_features",
                                   "num_classes", "alpha", "hidden", "model_seed"))
    with _cache_lock:
        fn = _cache.get(key)
        if fn is None:
            nf, nc = int(c.get("num_features", 784)), int(c.get("num_classes", 10))
            data = fg.data.synthetic_classification(
                num_clients=int(c.get("num_clients", 1000)), samples_per_client=int(c.get("samples_per_client", 64)),
                num_features=nf, num_classes=nc, alpha=float(c.get("alpha", 0.5)), seed=int(c.get("data_seed", 0)),
                test_samples=0)
            hidden = [int(h) for h in str(c.get("hidden", "200,200")).split(",") if h.strip()]
            fn = LocalTrainTask(fg.models.mlp(nf, hidden, nc, seed=int(c.get("model_seed", 0))), data.load)
            _cache.clear()
            _cache[key] = fn
    return fn(task)
