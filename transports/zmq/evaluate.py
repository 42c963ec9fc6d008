"""Evaluation stages' client work on edge agents: ``FederatedEvaluate`` / ``PersonalizedEvaluate`` through
``ZmqTransport.map_clients`` (``transports/PROTOCOL.md`` section 4.4).

The stage travels as plain data, as the client segment does (:mod:`.segment`); each agent runs its
``client(work)`` on its own data and answers the numbers. Other client work cannot run on agents: no code
travels to them.

Example:
    >>> from flgraph.transports.zmq import ZmqTransport
    >>> on_agents(ZmqTransport("tcp://127.0.0.1:0"), 1, None, [0], len)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    flgraph.errors.ConfigError: len cannot run on edge agents (no code travels to them; ...
      fix: ...
"""

from __future__ import annotations

import queue
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from flgraph.context import ClientSet
from flgraph.errors import ClientError, ClusterError, ConfigError

from . import segment
from .gateway import RoundEvent

if TYPE_CHECKING:
    from .transport import ZmqTransport

__all__ = ["on_agents"]


def on_agents(t: ZmqTransport, rnd: int, flat: np.ndarray, ids: Any, fn: Any) -> list[Any]:
    """``fn`` (an evaluation stage's ``client`` method) for the clients ``ids`` on their agents, in order.

    A client whose agent is away, fails or misses the deadline raises a ClientError (as a failing Dask
    worker does): an evaluation over clients that are not there would be over other clients."""
    stage = getattr(fn, "__self__", None)
    entries = segment.describe([stage]) if stage is not None and getattr(fn, "__name__", "") == "client" else []
    if not entries or entries[0].get("class") not in segment.EVAL_STAGES or segment.code_paths(entries):
        raise ConfigError(f"{getattr(fn, '__qualname__', 'client work')} cannot run on edge agents (no code "
                          "travels to them; they run FederatedEvaluate and PersonalizedEvaluate)",
                          fix="evaluate on the driver's test split (st.Evaluate), or run this stage's clients "
                              "on Dask with MixedTransport")
    bundle = t._bundle
    if bundle is None:
        raise ClusterError("the transport was not started", fix="use it through fg.Run(..., transport=...)")
    name = type(stage).__name__
    clients = ClientSet(np.asarray(ids, np.int64))
    t._check_agents(clients)
    events: queue.SimpleQueue[RoundEvent] = queue.SimpleQueue()
    job = t.gateway.begin_job(rnd, t.gateway.encode_params(np.array(flat, copy=True)), bundle.spec, bundle.seed,
                              t.configs(clients), t.deadline_s, events, entries, (f"{name} (evaluation)",),
                              mode="evaluate")
    out: list[Any] = [None] * len(clients)
    end = time.monotonic() + t.deadline_s + t._grace()
    try:
        for _ in range(len(clients)):
            left = end - time.monotonic()
            try:
                ev = events.get(timeout=left) if left > 0 else events.get_nowait()
            except queue.Empty:
                raise ClusterError(f"round {rnd}: the gateway did not report {name}'s clients after the deadline",
                                   fix="check the gateway's log") from None
            if ev.kind != "result" or ev.message is None:
                raise ClientError(f"edge: {ev.reason}", client=ev.client, stage=name, round=rnd,
                                  fix="start the client's agent (flgraph edge ...) or evaluate fewer clients "
                                      f"({name}(clients=N) samples N of them)")
            out[ev.position] = tuple(float(v) for v in ev.message.tensors[0])
    finally:
        t.gateway.end_job(job)
    return out
