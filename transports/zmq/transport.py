"""``ZmqTransport``: a round's clients are edge agents behind a :class:`~.gateway.Gateway`.

To the engine an edge client is a client like any other: ``run_round`` posts the round's tasks (the
global params once per agent, and each client's config: the run's ``LocalTrain`` settings, the
ClientSet's per-client settings, then ``config=``), turns each arriving update into the reducer's leaf in
the driver, and combines leaves along the round's fixed tree by client position as they arrive, so the
result is deterministic and memory stays O(model x tree depth). Clients that miss the deadline, whose agent
vanishes or whose update is refused become failures: the round's ``clients_failed`` / ``failed_clients``
(``on_client_error="drop"``), or a :class:`~flgraph.errors.ClientError` (``"raise"``).

The asynchronous engine (FedBuff: a pipeline ending in ``st.BufferedAggregate``) runs on edge agents too:
``publish`` encodes each global version once, ``submit_client`` posts one client as one gateway job (its
own params version, deadline and task id) and returns an :class:`~.edge_async.EdgeFuture`, and
:meth:`completion` yields those futures as their results (or failures) arrive, never later than their deadline. Only
agents that are connected and idle are given work (:meth:`ready_clients`). Arrivals are processed in real
arrival order and the engine's clock is real seconds (``realtime = True``), so such a run is not
bit-reproducible, unlike an asynchronous run on Dask.

Example:
    >>> from flgraph.transports.zmq import ZmqTransport
    >>> t = ZmqTransport("tcp://127.0.0.1:0", deadline_s=30, config={"epochs": 2})
    >>> t.deadline_s, t.config, t.realtime
    (30.0, {'epochs': 2}, True)
    >>> import flgraph as fg  # doctest: +SKIP
    >>> with fg.Run(pipeline, model=model, data=population, transport=t,  # doctest: +SKIP
    ...             on_client_error="drop") as run:
    ...     t.gateway.wait_for(count=10)
    ...     run.fit(rounds=5)

    FedBuff over the same agents: at most ``concurrency`` of them train at once, the server steps every
    ``buffer`` arrivals (``fit(rounds=...)`` counts server steps; ``sim_time`` is real seconds):

    >>> fedbuff = fg.recipes.fedbuff(concurrency=8, buffer=4, evaluate_every=None)  # doctest: +SKIP
    >>> with fg.Run(fedbuff, model=model, data=population, transport=t,  # doctest: +SKIP
    ...             on_client_error="drop") as run:
    ...     t.gateway.wait_for(count=10)
    ...     history = run.fit(rounds=20)
"""

from __future__ import annotations

import logging
import os
import queue
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from flgraph import tree
from flgraph.context import ClientSet, Update
from flgraph.engine.clients import Bundle, Partial, combine_partials, reducer_leaf
from flgraph.errors import ClientError, ClusterError, ConfigError
from flgraph.secure.client import MaskRecord
from flgraph.secure.masks import field_dtype

from . import encoded, evaluate, secagg, segment
from .capabilities import unsupported
from .edge_async import EdgeCompletion, EdgeFuture, EdgeVersion
from .gateway import Gateway, RoundEvent
from .wire import Limits

__all__ = ["ZmqTransport"]

log = logging.getLogger("flgraph")


@dataclass
class _Pending:
    rnd: int
    flat: np.ndarray
    clients: ClientSet
    events: queue.SimpleQueue[RoundEvent]
    end: float


class ZmqTransport:
    """Runs rounds' client segments on edge agents connected to a gateway on ``bind``.

    Args:
        bind: the gateway's endpoint (``"tcp://127.0.0.1:0"``: any free port; see ``endpoint``).
        deadline_s: seconds a round waits for its clients; the missing ones are failures.
        config: extra per-round config for the agents' task functions (numbers, bools, short strings).
        client_config: the operator's settings per client id, over ``config`` (e.g. ``{7: {"epochs": 2,
            "lr": 0.05, "batch_size": 16, "samples": 500}}``); a device's own ``--set`` wins over both.
        secret_key, allow, heartbeat_s, liveness, limits, max_agents, client_ids, compress: the
            :class:`~flgraph.transports.zmq.gateway.Gateway`'s.

    ``realtime`` is True: the asynchronous engine orders arrivals by real arrival and keeps real seconds.
    """

    realtime = True

    #: Tiers (``Aggregate(..., by=...)``): the agents' updates are reduced per group, as on Dask. Agents return
    #: one update, so fan-outs of several per-client values and parallel branches are refused before a run.
    supports: frozenset[str] = frozenset({"tiers", "secure aggregation"})

    #: SecAgg+ (:mod:`flgraph.transports.zmq.secagg`): each agent runs its client's phases and keeps its
    #: secrets on the device.
    clients_keep_secrets = True

    def __init__(self, bind: str = "tcp://127.0.0.1:0", *, deadline_s: float = 60.0,
                 config: dict[str, Any] | None = None, secret_key: str | os.PathLike[str] | None = None,
                 allow: str | os.PathLike[str] | Iterable[bytes] | None = None, heartbeat_s: float = 1.0,
                 liveness: int = 3, limits: Limits | None = None, max_agents: int = 10_000,
                 client_ids: Iterable[int] | None = None, compress: str = "auto",
                 client_config: Mapping[int, Mapping[str, Any]] | None = None) -> None:
        if deadline_s <= 0:
            raise ConfigError(f"deadline_s={deadline_s}", fix="give rounds a positive deadline in seconds")
        self.deadline_s = float(deadline_s)
        self.config = dict(config or {})
        self.client_config = {int(c): dict(v) for c, v in (client_config or {}).items()}
        self.gateway = Gateway(bind, secret_key=secret_key, allow=allow, heartbeat_s=heartbeat_s, liveness=liveness,
                               limits=limits, max_agents=max_agents, client_ids=client_ids, compress=compress)
        self._bundle: Bundle | None = None
        self._base: dict[str, Any] = {}
        self._places = 0
        self._events: queue.SimpleQueue[RoundEvent] = queue.SimpleQueue()  # the asynchronous jobs' events
        self._secure: Any = None  # the SecureMask stage of the client segment, if any
        self._s_keys: dict[str, list[bytes]] = {}  # a secure round's advertised s public keys, by round name

    @property
    def endpoint(self) -> str:
        """The address agents connect to (after ``start`` or ``gateway.start()``)."""
        return self.gateway.endpoint

    def start(self, bundle: Bundle, flat: np.ndarray) -> float:
        """Start the gateway (if not yet) and keep what rounds need; returns the seconds it took."""
        t0 = time.perf_counter()
        if bundle.state_fields:
            names = ", ".join(type(s).__name__ for s in bundle.stages if s.client_fields(bundle.spec))
            raise ConfigError(f"{names} keeps per-client state in the run's client-state store, which edge "
                              "devices cannot reach",
                              fix="keep such state on the device, inside the agent's task function (e.g. the "
                                  "error-feedback residual), and drop it from the pipeline's client stages")
        stages = list(bundle.stages)
        # SecureMask runs on the agent after its task (PROTOCOL.md section 4.5), so any task function masks
        self._secure = stages.pop() if stages and type(stages[-1]).__name__ == "SecureMask" else None
        masking = [type(s).__name__ for s in stages if type(s).__name__ == "SecureMask"]
        if masking:
            raise ConfigError("SecureMask is not the last client stage: edge agents mask the update their task "
                              "answers", fix="put st.SecureMask(cfg) right before st.SecureAggregate(cfg)")
        refused = segment.refusals(stages)
        if refused:
            raise ConfigError("edge agents cannot run the pipeline's client stages as a Dask worker does: "
                              + "; ".join(refused),
                              fix="drop these from the pipeline's client stages for an edge run (or run it on Dask)")
        self._bundle = bundle
        self._base = _stage_config(bundle)
        self._segment = segment.describe(stages)
        self._legacy = unsupported(stages)  # what an agent without caps.segment would leave out
        last = stages[-1] if stages else None
        codec = getattr(last, "codec", None) if type(last).__name__ == "Compress" else None
        # a segment that ends encoding the update: its payload may travel as it is (encoded.py)
        self._codec = codec if getattr(codec, "name", None) in encoded.WIRE_CODECS else None
        self.gateway.start()
        return time.perf_counter() - t0

    def restart_gateway(self) -> str:
        """Stop and start the gateway on the same endpoint (agents reconnect by themselves)."""
        endpoint = self.gateway.endpoint
        self.gateway.stop()
        if endpoint:
            self.gateway.bind = endpoint
        return self.gateway.start()

    def configs(self, clients: ClientSet) -> dict[int, dict[str, Any]]:
        """Each client's task config: the run's client-stage settings, its ClientSet settings, ``config``, then
        its ``client_config``."""
        out = {}
        for pos, cid in enumerate(clients.ids.tolist()):
            cfg = dict(self._base)
            for name in clients.settings:
                v = clients.setting(name, pos)
                if isinstance(v, (int, float, bool, str)):
                    cfg[name] = v
                elif isinstance(v, MaskRecord) and self._secure is not None:
                    cfg.update(secagg.mask_settings(v, self._secure))
            cfg.update(self.config)
            cfg.update(self.client_config.get(int(cid), {}))
            out[int(cid)] = cfg
        return out

    def submit(self, rnd: int, flat: np.ndarray, clients: ClientSet) -> _Pending:
        """Post round ``rnd``'s tasks; collect with :meth:`collect`."""
        if self._bundle is None:
            raise ClusterError("the transport was not started", fix="use it through fg.Run(..., transport=...)")
        self._check_agents(clients)
        events = self.gateway.begin_round(rnd, flat, self._bundle.spec, self._bundle.seed, self.configs(clients),
                                          self.deadline_s, self._segment, self._legacy, self._encode())
        present = self.gateway.connected().keys()
        self._places = sum(1 for c in clients.ids.tolist() if c in present)
        return _Pending(rnd, flat, clients, events, time.monotonic() + self.deadline_s + self._grace())

    def _encode(self) -> str | None:
        return None if self._codec is None else str(self._codec.name)

    def _check_agents(self, clients: ClientSet) -> None:
        """Refuse a round that a connected agent of its clients would not run as a Dask worker does."""
        segment.check_agents(self.gateway.connected(), clients.ids.tolist(), self._segment, self._legacy)

    def _grace(self) -> float:
        """How long after a deadline the driver waits for the gateway to report it."""
        return max(5.0, 2 * self.gateway.heartbeat_s * self.gateway.liveness)

    def collect(self, pending: _Pending, on_error: str = "raise") -> Partial:
        """Wait for every client of the round (result or failure) and return the root partial."""
        assert self._bundle is not None
        reducer = self._bundle.reducer
        n = len(pending.clients)
        acc = tree.Incremental(n, lambda a, b: combine_partials(reducer, a, b))
        try:
            for _ in range(n):
                ev = self._next(pending)
                if ev.kind == "result":
                    try:
                        part = self._leaf(ev, pending.flat, pending.rnd, pending.clients)
                    except Exception as e:  # a reducer that refuses this update: the client failed
                        part = self._failed(ev.client, f"{type(e).__name__}: {e}", pending.rnd, on_error)
                else:
                    part = self._failed(ev.client, ev.reason, pending.rnd, on_error)
                acc.add(ev.position, part)
        finally:
            self.gateway.end_round()
        return acc.root() if n else Partial(None)

    def _next(self, pending: _Pending) -> RoundEvent:
        while True:
            left = pending.end - time.monotonic()
            if left <= 0:
                raise ClusterError(f"round {pending.rnd}: the gateway did not close the round after its deadline",
                                   fix="check the gateway's log; the run's state is unchanged")
            try:
                return pending.events.get(timeout=min(left, 0.5))
            except queue.Empty:
                thread = self.gateway._thread
                if thread is None or not thread.is_alive():
                    raise ClusterError(f"round {pending.rnd}: the gateway stopped",
                                       fix="start it again (restart_gateway()) and call fit() again") from None

    @staticmethod
    def _failed(client: int, reason: str, rnd: int, on_error: str) -> Partial:
        if on_error == "raise":
            raise ClientError(reason, client=client, stage="edge", round=rnd,
                              fix="pass on_client_error='drop' to Run to count edge dropouts as failures")
        log.warning("dropped: round %d, client %d: %s", rnd, client, reason)
        return Partial(None, {"clients_failed": 1.0}, [(client, f"round {rnd}, client {client}, edge: {reason}")])

    def _leaf(self, ev: RoundEvent, flat: np.ndarray, rnd: int, clients: ClientSet) -> Partial:
        """The reducer's leaf for a result (``flat``: the params its task carried; ``clients``: the round's)."""
        assert self._bundle is not None and ev.message is not None
        msg = ev.message
        wire = np.asarray(msg.tensors[0])
        n = int(msg.fields["num_samples"])
        metrics = msg.fields["metrics"]
        spec = self._bundle.spec
        if msg.fields["kind"] == "masked":  # a masked input (PROTOCOL.md section 4.5): the field's integers
            assert self._secure is not None
            dtype = field_dtype(self._secure.config.modulus)
            if wire.dtype.itemsize != dtype.itemsize or wire.shape != (spec.size,):
                raise ClientError(f"edge: a masked input of dtype {wire.dtype} and shape {wire.shape}",
                                  client=ev.client, stage="SecureMask", round=rnd,
                                  fix="run agent and gateway of the same release")
            update = Update(ev.client, n, rnd - 1, wire.view(dtype).copy(), dict(metrics),
                            raw_nbytes=int(spec.size * np.dtype(spec.carrier).itemsize))
            sent = float(msg.wire_nbytes)
        elif msg.fields["kind"] == "encoded":  # the codec's payload as the agent encoded it: counted as on Dask
            update = Update(ev.client, n, rnd - 1, None, dict(metrics), payload=encoded.unpack(self._codec, wire, spec),
                            codec=self._codec, raw_nbytes=int(spec.size * np.dtype(spec.carrier).itemsize))
            sent = float(update.upload_nbytes)
        else:
            delta = wire - flat if msg.fields["kind"] == "weights" else np.array(wire, copy=True)
            update = Update(ev.client, n, rnd - 1, delta, dict(metrics), raw_nbytes=int(delta.nbytes))
            sent = float(msg.wire_nbytes)
        sums = {"clients_done": 1.0, "samples": float(n), "bytes_up": sent, "bytes_up_raw": float(update.raw_nbytes)}
        value = reducer_leaf(self._bundle, update, clients, ev.position)  # per group too, with tiers
        for k, v in metrics.items():
            sums[f"wsum_{k}"] = float(v) * n
        return Partial(value, sums)

    def client_attribute(self, name: str, ids: np.ndarray) -> np.ndarray | None:
        """What the agents of ``ids`` announced as ``name`` in their ``device`` map when they joined
        (``Agent(device={"site": "lab-3"})``, ``flgraph edge --device site=lab-3``): the groups of
        ``Aggregate(..., by=name)``. ``None`` for a client whose agent is away or did not say; ``None`` in
        all when no connected agent announced ``name``."""
        agents = self.gateway.connected()
        said = {c: info.device[name] for c, info in agents.items() if name in info.device}
        if not said:
            return None
        return np.array([said.get(int(c)) for c in ids], dtype=object)

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Run the client segment for ``clients`` on their agents and return the round's root partial."""
        return self.collect(self.submit(rnd, flat, clients), on_error)

    # -- asynchronous engine -----------------------------------------------------------------------
    def publish(self, version: int, flat: np.ndarray) -> EdgeVersion:
        """Global version ``version``: copied once and encoded once; each of its clients' tasks carries it."""
        own = np.array(flat, copy=True)
        return EdgeVersion(int(version), own, self.gateway.encode_params(own))

    def submit_client(self, params: EdgeVersion, rnd: int, clients: ClientSet, on_error: str,
                      idx: int) -> EdgeFuture:
        """Post one client (``clients`` holds exactly one) as a gateway job beside the running ones.

        The task's ``round`` is ``rnd`` (the engine passes the dispatch index + 1, as its Dask tasks use),
        so an agent's seed streams are those a Dask worker would use for the same dispatch."""
        if self._bundle is None:
            raise ClusterError("the transport was not started", fix="use it through fg.Run(..., transport=...)")
        if len(clients) != 1:
            raise ConfigError(f"submit_client got {len(clients)} clients", fix="submit one client per call")
        started = time.monotonic()
        self._check_agents(clients)
        job = self.gateway.begin_job(rnd, params.encoded, self._bundle.spec, self._bundle.seed,
                                     self.configs(clients), self.deadline_s, self._events, self._segment,
                                     self._legacy, encode=self._encode())
        return EdgeFuture(job, rnd, int(clients.ids[0]), params, on_error, started,
                          started + self.deadline_s + self._grace())

    def release(self, handles: list[Any]) -> None:
        """Forget futures (their jobs close: a later result is refused) and versions (nothing to free)."""
        for h in handles:
            if isinstance(h, EdgeFuture) and not h.released:
                h.released = True
                self.gateway.end_job(h.job)

    def completion(self) -> EdgeCompletion:
        """A new :class:`EdgeCompletion` for this transport's futures (one at a time per transport)."""
        return EdgeCompletion(self)

    def idle_clients(self) -> np.ndarray:
        """The clients whose agent is connected and has no task outstanding (sorted ids)."""
        idle = self.gateway.idle()
        return np.sort(np.fromiter(idle, np.int64, len(idle)))

    def ready_clients(self, candidates: np.ndarray, wait: bool = True) -> np.ndarray:
        """The ``candidates`` whose agent is connected and has no task outstanding, in their order.

        With ``wait``, blocks until at least one is (up to ``deadline_s``), then raises ClusterError."""
        cand = np.asarray(candidates, dtype=np.int64)
        end = time.monotonic() + self.deadline_s
        while True:
            idle = self.gateway.idle()
            ready = cand[np.isin(cand, np.fromiter(idle, np.int64, len(idle)))]
            if len(ready) or not wait:
                return ready
            if time.monotonic() >= end:
                connected = self.gateway.connected()
                mine = int(np.isin(cand, np.fromiter(connected, np.int64, len(connected))).sum())
                why = (f"none of the {len(cand)} candidate clients has an agent connected" if not mine else
                       f"the {mine} of the {len(cand)} candidate clients with an agent connected are all busy")
                raise ClusterError(f"no edge agent is free for the run's clients after {self.deadline_s:g} s: {why}",
                                   fix="start more agents (`flgraph edge ...`) than the asynchronous "
                                       "concurrency (Select(clients=...)), for clients of the run's data, "
                                       "or raise deadline_s")
            self._check_alive("waiting for a free agent")
            time.sleep(0.02)

    def _check_alive(self, what: str) -> None:
        thread = self.gateway._thread
        if thread is None or not thread.is_alive():
            raise ClusterError(f"{what}: the gateway stopped",
                               fix="start it again (restart_gateway()) and call fit() again")

    def _next_event(self, first: EdgeFuture) -> RoundEvent | None:
        """The next asynchronous event, or None after a short wait; ClusterError past ``first``'s end."""
        left = first.end - time.monotonic()
        if left <= 0:
            raise ClusterError(f"client {first.client} (dispatch round {first.rnd}): the gateway did not "
                               "report its job after the deadline", fix="check the gateway's log; the run's state "
                                                                        "is unchanged")
        try:
            return self._events.get(timeout=min(left, 0.5))
        except queue.Empty:
            self._check_alive(f"client {first.client} (dispatch round {first.rnd})")
            return None

    def _settle(self, fut: EdgeFuture, ev: RoundEvent) -> None:
        """Turn the job's event into the future's leaf Partial (or its error), as the synchronous path does."""
        self.gateway.end_job(fut.job)
        took = time.monotonic() - fut.started
        part: Partial | None = None
        reason = ev.reason
        if ev.kind == "result":
            try:
                part = self._leaf(ev, fut.version.flat, fut.rnd, ClientSet(np.array([fut.client], np.int64)))
                part.maxes["finish"] = took
            except Exception as e:  # a reducer that refuses this update: the client failed
                reason = f"{type(e).__name__}: {e}"
        if part is None:
            try:
                part = self._failed(fut.client, reason, fut.rnd, fut.on_error)
            except ClientError as e:
                fut._error = e
                return
        fut._value = part

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """An evaluation stage's client work on the agents of ``ids`` (:func:`.evaluate.on_agents`), or a
        secure-aggregation phase (:func:`flgraph.transports.zmq.secagg.run_phase`)."""
        if type(fn) in secagg.PHASES:
            return secagg.run_phase(self, rnd, ids, fn, self._s_keys)
        return evaluate.on_agents(self, rnd, flat, ids, fn)

    def places(self) -> int:
        """Agents that received the last round's params."""
        return self._places

    def close(self) -> None:
        """Stop the gateway (agents are told ``disconnect`` and keep trying to reconnect)."""
        self.gateway.stop()


def _stage_config(bundle: Bundle) -> dict[str, Any]:
    """The client stages' scalar settings (first stage wins on a shared name), and LocalTrain's tag."""
    cfg: dict[str, Any] = {}
    for stage in bundle.stages:
        for k, v in stage.settings().items():
            if isinstance(v, (bool, int, float, str)) and k not in cfg:
                cfg[k] = v
        if type(stage).__name__ == "LocalTrain" and "tag" not in cfg:
            cfg["tag"] = int(stage.tag)
    return cfg
