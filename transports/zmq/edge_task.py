"""What a device's task function gets and returns: :class:`EdgeTask` in, :class:`EdgeResult` out, and the
loading of the task function by its import path (``flgraph edge --task my_pkg.tasks:train``).

Example:
    >>> import numpy as np
    >>> from flgraph.params import Params, ParamSpec
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(2, np.float32)})
    >>> task = EdgeTask(1, 7, 0, 30.0, Params(spec, np.ones(2, np.float32)), {"epochs": 1})
    >>> EdgeResult(num_samples=4, delta=np.full(2, 0.5, np.float32)).flat_delta(task).tolist()
    [0.5, 0.5]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flgraph.errors import ConfigError
from flgraph.params import Params

__all__ = ["EdgeEncoded", "EdgeResult", "EdgeTask", "EdgeValues", "TaskFn", "load_task", "result_of"]


@dataclass
class EdgeTask:
    """One round's work for this device: the global params (read-only: copy before writing) and the config.

    ``stages``: the round's client segment as plain data (``transports/PROTOCOL.md`` section 3.1), ``None``
    from a gateway that sends none; ``allow``: the code patterns the device's owner allows
    (``--allow-code``); ``own``: the owner's own settings (``--set``), which win over the config;
    ``mode``: ``"train"`` (run the segment, answer an update) or ``"evaluate"`` (run the one evaluation
    stage's client work, answer :class:`EdgeValues`)."""

    round: int
    client: int
    seed: int
    deadline_s: float
    params: Params
    config: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] | None = None
    allow: tuple[str, ...] = ()
    own: dict[str, Any] = field(default_factory=dict)
    mode: str = "train"
    encode: str | None = None  # the codec whose payload the gateway takes as it is (PROTOCOL.md section 3.5)

    def arrays(self) -> dict[str, np.ndarray]:
        """The global weights as name -> array in each tensor's own dtype (``torch.from_numpy`` ready)."""
        return self.params.to_arrays()


@dataclass
class EdgeResult:
    """A device's answer: ``weights`` (trained) or ``delta`` (trained - global), flat or name -> array."""

    num_samples: int
    weights: np.ndarray | Mapping[str, np.ndarray] | None = None
    delta: np.ndarray | Mapping[str, np.ndarray] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def flat_delta(self, task: EdgeTask) -> np.ndarray:
        """The update as one flat buffer in the params' carrier dtype."""
        if (self.weights is None) == (self.delta is None):
            raise ConfigError("an EdgeResult needs exactly one of weights= or delta=")
        spec = task.params.spec
        value = self.weights if self.weights is not None else self.delta
        flat = (Params.pack(spec, value).flat if isinstance(value, Mapping)
                else np.asarray(value, dtype=spec.carrier).reshape(-1))
        if flat.size != spec.size:
            raise ConfigError(f"the task returned {flat.size} values; the model has {spec.size}",
                              fix="return the whole model (every tensor of task.params)")
        return flat - task.params.flat if self.weights is not None else flat


@dataclass
class EdgeValues:
    """A device's answer to an ``evaluate`` task: the evaluation stage's numbers for this client (the first
    is its held-out sample count)."""

    values: tuple[float, ...]


@dataclass
class EdgeEncoded:
    """A device's update as a codec's payload, packed by :func:`flgraph.transports.zmq.encoded.pack`
    (only for the codec the task names in ``encode``)."""

    num_samples: int
    codec: str
    frame: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)


TaskFn = Callable[[EdgeTask], Any]


def load_task(ref: str) -> TaskFn:
    """Import ``"package.module:function"`` (a module installed on the device)."""
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr:
        raise ConfigError(f"--task {ref!r}", fix="name a function as package.module:function")
    try:
        fn = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"cannot load the task {ref!r}: {e}",
                          fix="install the module on the device (pip install ...) and check the name") from None
    if not callable(fn):
        raise ConfigError(f"the task {ref!r} is not callable")
    return fn


def result_of(out: Any, task: EdgeTask) -> tuple[np.ndarray, int, dict[str, float]]:
    """A task function's return value as (flat delta, samples, metrics)."""
    if isinstance(out, EdgeResult):
        return out.flat_delta(task), int(out.num_samples), {k: float(v) for k, v in out.metrics.items()}
    if hasattr(out, "delta") and hasattr(out, "num_samples") and getattr(out, "delta", None) is not None:
        delta = np.asarray(out.delta, dtype=task.params.spec.carrier).reshape(-1)
        return delta, int(out.num_samples), {k: float(v) for k, v in getattr(out, "metrics", {}).items()}
    raise ConfigError(f"the task returned {type(out).__name__}",
                      fix="return an EdgeResult(num_samples=..., weights=... or delta=..., metrics=...)")
