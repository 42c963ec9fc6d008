"""What flows between stages: ClientSet, Update, and the two contexts stages receive.

* :class:`RoundContext` is what a *server* stage sees, once per round, in the driver.
* :class:`ClientWork` is what a *client* stage sees, once per participating client, where it runs.
* :class:`Update` is one client's result: a delta (possibly encoded), a sample count and metrics.

Example:
    >>> import numpy as np
    >>> from flgraph.context import ClientSet
    >>> cs = ClientSet(np.array([4, 1, 9]), {"epochs": np.array([1, 2, 1])})
    >>> len(cs), cs.setting("epochs", 1)
    (3, 2)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .errors import ConfigError
from .params import Params, ParamSpec

if TYPE_CHECKING:
    from .data import ClientData, FederatedDataset
    from .store.client_state import ClientStateView

__all__ = ["ClientSet", "ClientWork", "Codec", "Devices", "RoundContext", "Update"]


@dataclass
class Devices:
    """The simulated devices of a round's clients, one value per position (set by
    :class:`~flgraph.stages.Simulate`, and by the asynchronous engine for each dispatch).

    ``speed`` in samples a second, ``down_bps`` and ``up_bps`` in bytes a second, ``online_until``: seconds
    after the round's start when the device goes offline; with a deadline, ``deadline`` (seconds) and,
    when clients stop in time, ``max_samples`` (the samples each can train on before it).

    Example:
        >>> import numpy as np
        >>> d = Devices(np.array([10.0, 20.0]), np.full(2, 1e6), np.full(2, 1e6), np.full(2, np.inf))
        >>> d.take(np.array([1])).speed.tolist()
        [20.0]
    """

    speed: np.ndarray
    down_bps: np.ndarray
    up_bps: np.ndarray
    online_until: np.ndarray
    deadline: np.ndarray | None = None
    max_samples: np.ndarray | None = None

    def take(self, positions: np.ndarray) -> Devices:
        """The devices at ``positions`` (an index array or a bool mask)."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[positions]
        return Devices(self.speed[positions], self.down_bps[positions], self.up_bps[positions],
                       self.online_until[positions], pick(self.deadline), pick(self.max_samples))

    def finish(self, pos: int, down_nbytes: float, samples: float, up_nbytes: float) -> float:
        """When the device at ``pos`` is done: download, train ``samples``, upload (seconds after the start)."""
        return (down_nbytes / float(self.down_bps[pos]) + samples / float(self.speed[pos])
                + up_nbytes / float(self.up_bps[pos]))


@dataclass
class ClientSet:
    """The clients chosen for a round, in order, with optional per-client settings.

    ``settings[name]`` is an array aligned with ``ids`` (e.g. ``epochs``, ``deadline``); a client stage
    reads its own value with ``work.setting(name, default)``. ``keep_first=N`` (over-selection) keeps only
    the first N clients to finish (by simulated time where devices are simulated, else by real time).
    """

    ids: np.ndarray
    settings: dict[str, np.ndarray] = field(default_factory=dict)
    keep_first: int | None = None  # over-selection: aggregate only the first N to finish
    # With parallel branches: each position's branch (0: the main one), and where each reducer of the round
    # puts it (flgraph.engine.fanout.Layout). None in a plain round.
    branch: np.ndarray | None = None
    layout: Any = None
    devices: Devices | None = None  # simulated devices (Simulate), aligned with ids

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64).reshape(-1)
        for k, v in self.settings.items():
            if len(v) != len(self.ids):
                raise ConfigError(f"client setting {k!r} has {len(v)} values for {len(self.ids)} clients")
        keys = self.ids if self.branch is None else self.ids + (np.asarray(self.branch, np.int64) << 48)
        if len(np.unique(keys)) != len(self.ids):
            raise ConfigError("a ClientSet lists a client twice", fix="select clients without replacement")

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: np.ndarray) -> ClientSet:
        """The clients at ``positions`` (an index array or a bool mask), with their settings and devices."""
        return ClientSet(self.ids[positions], {k: v[positions] for k, v in self.settings.items()}, self.keep_first,
                         devices=None if self.devices is None else self.devices.take(positions))

    def with_settings(self, **settings: np.ndarray) -> ClientSet:
        """These clients with more (or replaced) per-client settings."""
        return ClientSet(self.ids, {**self.settings, **settings}, self.keep_first, self.branch, self.layout,
                         self.devices)

    def setting(self, name: str, position: int) -> Any:
        """The value of setting ``name`` for the client at ``position`` (``None`` where a parallel branch's
        clients have no such setting)."""
        v = self.settings[name][position]
        return v.item() if isinstance(v, np.generic) else v


class Codec(Protocol):
    """Encodes a flat delta for the upload and decodes it before aggregation."""

    name: str

    def encode(self, delta: np.ndarray) -> Any: ...

    def decode(self, payload: Any, spec: ParamSpec) -> np.ndarray: ...

    def nbytes(self, payload: Any) -> int: ...


@dataclass
class Update:
    """One client's result.

    ``delta`` is ``trained - global`` as a flat buffer in the carrier dtype (``None`` once encoded);
    ``payload`` and ``codec`` hold the encoded form. ``base_round`` is the round whose global model the
    client started from (for staleness).
    """

    client: int
    num_samples: int
    base_round: int
    delta: np.ndarray | None
    metrics: dict[str, float] = field(default_factory=dict)
    payload: Any = None
    codec: Codec | None = None
    raw_nbytes: int = 0
    # every per-client value the client's stages wrote, by name (filled only in rounds whose reducers read
    # more than the update: flgraph.engine.fanout)
    extras: dict[str, Update] | None = None

    def encoded_with(self, codec: Codec) -> None:
        """Replace the delta by ``codec``'s encoding of it (done on the client)."""
        if self.delta is None:
            raise ConfigError(f"client {self.client}'s update is already encoded with {self.codec}")
        self.raw_nbytes = int(self.delta.nbytes)
        self.payload = codec.encode(self.delta)
        self.codec = codec
        self.delta = None

    def decoded(self, spec: ParamSpec) -> np.ndarray:
        """The flat delta, decoded if it was encoded."""
        if self.delta is not None:
            return self.delta
        assert self.codec is not None
        return self.codec.decode(self.payload, spec)

    @property
    def upload_nbytes(self) -> int:
        """Bytes this update takes on the wire (after encoding)."""
        if self.codec is not None:
            return self.codec.nbytes(self.payload)
        return int(self.delta.nbytes) if self.delta is not None else 0


@dataclass
class ClientWork:
    """What a client stage sees: who, which round, the global model, the client's data, the update.

    ``data`` is loaded on first use, on the worker. ``update`` is the model delta a training stage
    writes; ``outputs`` holds the client's other per-client values by name (SCAFFOLD's
    ``control_delta``, an evaluation), each an :class:`Update`, each reduced by its own reducer.
    ``values`` holds the server values broadcast besides the params (``Broadcast("params", "control")``).
    """

    round: int
    client: int
    position: int
    seed: int
    global_params: Params
    dataset: FederatedDataset
    clients: ClientSet
    model_source: Any
    update: Update | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    tag: int = 0
    state: ClientStateView | None = None
    outputs: dict[str, Update] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    _data: ClientData | None = None

    @property
    def data(self) -> ClientData:
        if self._data is None:
            self._data = self.dataset.load(self.client)
        return self._data

    def setting(self, name: str, default: Any) -> Any:
        """This client's value of a per-client setting of the ClientSet, else ``default``."""
        if name in self.clients.settings:
            v = self.clients.setting(name, self.position)
            return default if v is None else v
        return default

    def sample_budget(self) -> float:
        """The samples this client's device can train on before the round's deadline (``inf``: no cut-off)."""
        dev = self.clients.devices
        if dev is None or dev.max_samples is None:
            return float("inf")
        return float(dev.max_samples[self.position])

    def load_state(self, name: str) -> np.ndarray | None:
        """The running stage's per-client state ``name`` from this client's last counted round, or ``None``
        the first time (the stage declares its fields with ``client_fields``; see :mod:`flgraph.store.client_state`)."""
        if self.state is None:
            raise ConfigError(f"client {self.client} has no per-client state store in this run",
                              fix="declare the state with client_fields(spec) on the stage")
        return self.state.load(self.tag, name)

    def save_state(self, name: str, value: np.ndarray) -> None:
        """Keep ``value`` as this client's state ``name``; it counts once the round completes."""
        if self.state is None:
            raise ConfigError(f"client {self.client} has no per-client state store in this run",
                              fix="declare the state with client_fields(spec) on the stage")
        self.state.save(self.tag, name, value)


@dataclass
class RoundContext:
    """What a server stage sees in the driver: the round, the global params, the chosen clients.

    ``state`` is the running stage's own explicit state (a dict of arrays and numbers, saved in
    checkpoints); ``metrics`` collects this round's figures. ``aggregates`` holds the reduced per-client
    values other than the update (``ctx.aggregates["control_delta"]``), ``values`` the server values
    stages keep (``ctx.values["control"]``).
    """

    round: int
    seed: int
    params: Params
    dataset: FederatedDataset
    model_source: Any
    last_round: bool
    clients: ClientSet | None = None
    broadcast: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    tag: int = 0
    time: float | None = None  # the virtual clock at the round's start (seconds), with a Simulate stage
    # the round's aggregates of per-client values other than the update: name -> (aggregate, total weight)
    aggregates: dict[str, tuple[Any, float]] = field(default_factory=dict)
    # server values kept by stages (e.g. SCAFFOLD's "control"): name -> array, as of the round's start
    values: dict[str, Any] = field(default_factory=dict)
    # the transport running the round's clients: for stages whose protocol talks to the clients in several
    # phases (secure aggregation), through the capabilities it declares (flgraph.engine.contracts)
    transport: Any = None
    mapper: Callable[[Callable[[ClientWork], Any], np.ndarray, np.ndarray], list[Any]] | None = None

    def map_clients(self, fn: Callable[[ClientWork], Any], ids: np.ndarray | list[int],
                    params: np.ndarray | None = None) -> list[Any]:
        """Run ``fn(work)`` where each client of ``ids`` lives (a Dask worker, an edge agent), with the
        global params (or ``params``), and return the results in the order of ``ids``.

        For server stages that need client-side work outside the round's client segment, e.g. federated
        or personalized evaluation. ``fn`` must be picklable (a top-level function or a stage method).
        """
        if self.mapper is None:
            raise ConfigError("this round has no transport to run client work on")
        flat = self.params.flat if params is None else params
        return self.mapper(fn, np.asarray(ids, dtype=np.int64), flat)
