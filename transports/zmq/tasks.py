"""Ready-made task functions for edge agents: the round's client stages run on the device.

:class:`LocalTrainTask` wraps a torch module and a function loading this device's data; it rebuilds the
task's client segment (``LocalTrain``, ``Compress``: :mod:`.segment`, code only from the device's
allow-list), applies the per-client settings (the config's, then the device owner's own) and runs the
stages with the run's seed streams, so an agent computes exactly the update a Dask worker would compute
for the same client and data; it answers evaluate tasks (``FederatedEvaluate``, ``PersonalizedEvaluate``)
too. Without a segment in the task (an older gateway) it runs ``LocalTrain`` with the config's settings.
:func:`synthetic` is a complete task for demos and tests: its
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

from . import encoded, segment
from .agent import EdgeResult, EdgeTask
from .edge_task import EdgeEncoded, EdgeValues

__all__ = ["LocalTrainTask", "synthetic"]


class _OneClient:
    """The minimal dataset a ClientWork needs on a device: this client's data, loaded on first use (its first
    ``samples`` samples when the device or the operator sets ``samples``)."""

    def __init__(self, client: int, load: Callable[[int], Any], samples: int | None = None) -> None:
        self.client = client
        self._load = load
        self.samples = samples

    def load(self, client: int) -> Any:
        from flgraph.data.dataset import ClientData, as_client_data

        if client != self.client:
            raise ConfigError(f"this device holds client {self.client}'s data, not client {client}'s")
        data = as_client_data(self._load(client), f"the device's data for client {client}")
        if self.samples is not None:
            data = ClientData(data.x[: self.samples], data.y[: self.samples])
        return data


class LocalTrainTask:
    """A task function running the round's client segment (flgraph's ``LocalTrain``, ``Compress``) on
    ``model`` with ``load_data(client)``, as a Dask worker runs it."""

    runs_segment = True  # the agent announces caps.segment: it runs the task's stages, not LocalTrain alone

    def __init__(self, model: Any, load_data: Callable[[int], Any], *, device: str = "cpu") -> None:
        from flgraph.models.adapter import ModelAdapter

        self.adapter = ModelAdapter.from_module(model)
        self.load_data = load_data
        self.device = device

    def __call__(self, task: EdgeTask) -> EdgeResult | EdgeValues | EdgeEncoded:
        mine, theirs = self.adapter.spec, task.params.spec
        if [(e.name, e.shape) for e in mine.entries] != [(e.name, e.shape) for e in theirs.entries]:
            raise ConfigError(f"the gateway's model ({theirs.describe()}) is not this device's "
                              f"({mine.describe()})", fix="install the run's model on the device")
        cfg = {**task.config, **task.own}  # the device owner's settings win
        if task.mode == "evaluate":
            return self._evaluate(task)
        if task.stages is None:  # a gateway that sends no segment: LocalTrain with the config's settings
            accepted = inspect.signature(LocalTrain).parameters
            stage = LocalTrain(**{k: cfg[k] for k in ("epochs", "steps", "batch_size", "lr", "mu", "holdout")
                                  if k in cfg and k in accepted})
            stage.tag = int(cfg.get("tag", stage_tag("LocalTrain", 0)))
            stages: list[Any] = [stage]
        else:
            stages = segment.build(task.stages, task.allow)
        used: dict[str, float] = {}
        for stage in stages:
            if isinstance(stage, LocalTrain):
                used = _endpoint_settings(stage, cfg)
                stage.device = self.device  # the device's own accelerator, not the driver's
            stage.prepare(None, self.adapter)
        samples = whole("samples", cfg["samples"]) if "samples" in cfg else None
        if samples is not None and samples < 1:
            raise ConfigError(f"samples={samples}: train on at least one sample")
        work = ClientWork(task.round, task.client, 0, task.seed, task.params,
                          _OneClient(task.client, self.load_data, samples),  # type: ignore[arg-type]
                          ClientSet(np.array([task.client])), self.adapter)
        for stage in stages:  # as flgraph.engine.clients.client_leaf runs them
            work.tag = stage.tag
            stage.run(work)
        update = work.update
        if update is None:
            raise ConfigError("no client stage produced an update", fix="put LocalTrain in the pipeline")
        metrics = {**update.metrics, **used}
        if task.encode is not None and update.codec is not None and update.codec.name == task.encode:
            return EdgeEncoded(update.num_samples, task.encode, encoded.pack(task.encode, update.payload), metrics)
        delta = np.array(update.decoded(task.params.spec), copy=True)
        return EdgeResult(num_samples=update.num_samples, delta=delta, metrics=metrics)


    def _evaluate(self, task: EdgeTask) -> EdgeValues:
        """An evaluation stage's client work (``FederatedEvaluate.client``) on all of this device's data."""
        if not task.stages or len(task.stages) != 1:
            raise ConfigError("an evaluate task names exactly one evaluation stage")
        (stage,) = segment.build(task.stages, task.allow, segment.EVAL_STAGES)
        stage.prepare(None, self.adapter)
        work = ClientWork(task.round, task.client, 0, task.seed, task.params,
                          _OneClient(task.client, self.load_data),  # type: ignore[arg-type]
                          ClientSet(np.array([task.client])), self.adapter)
        work.tag = stage.tag
        return EdgeValues(tuple(float(v) for v in stage.client(work)))


def whole(name: str, value: Any) -> int:
    """``value`` as an int when it is a whole number (``2`` or ``2.0``); a ConfigError naming ``name`` otherwise.

    Example:
        >>> whole("epochs", 2.0)
        2
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ConfigError(f"{name}={value!r}: a whole number is needed", fix=f"e.g. --set {name}=2")
    return int(value)


def _endpoint_settings(stage: Any, cfg: dict[str, Any]) -> dict[str, float]:
    """Set ``stage``'s epochs, steps, batch size and lr from ``cfg`` (the run's per-client settings, the
    operator's config, the device owner's settings); the values it will train with, as metrics."""
    from flgraph.stages.train import SGD

    if "epochs" in cfg:
        stage.epochs = whole("epochs", cfg["epochs"])
    if "steps" in cfg:
        stage.steps = whole("steps", cfg["steps"])
    if "batch_size" in cfg:
        stage.batch_size = whole("batch_size", cfg["batch_size"])
    if "lr" in cfg and float(cfg["lr"]) != stage.lr:
        if stage.optimizer is not None and not isinstance(stage.optimizer, SGD):
            raise ConfigError(f"lr={cfg['lr']} is set for this client, but LocalTrain's optimizer "
                              f"{stage.optimizer!r} sets its own learning rate",
                              fix="set lr only for runs with LocalTrain's SGD (optimizer=SGD(lr, momentum))")
        stage.lr = float(cfg["lr"])
        if stage.optimizer is not None:
            stage.optimizer = SGD(stage.lr, momentum=stage.optimizer.momentum)
    if stage.epochs < 1 or (stage.steps is not None and stage.steps < 1) or stage.batch_size < 1:
        raise ConfigError(f"epochs={stage.epochs}, steps={stage.steps}, batch_size={stage.batch_size}: each must "
                          "be >= 1", fix="check the device's --set and the operator's client settings")
    out = {"epochs": float(stage.epochs), "batch_size": float(stage.batch_size), "lr": float(stage.lr)}
    return out


_cache: dict[tuple[Any, ...], LocalTrainTask] = {}
_cache_lock = threading.Lock()


def synthetic(task: EdgeTask) -> EdgeResult | EdgeValues | EdgeEncoded:
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


synthetic.runs_segment = True  # type: ignore[attr-defined]
