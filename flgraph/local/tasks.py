"""What the accelerator's chunk tasks run on a worker: fetch the params, run the chunk, push the partials.

Two kinds of task, both named like the executor's (``local-train-r00012-c0001-<run>``):

* :func:`plane_chunk` is submitted with its job: it fetches the round's params from the driver over the
  data plane (:mod:`flgraph.local.dataplane`), runs its clients and pushes the partials back;
* :func:`ahead_chunk` is submitted while the round before runs and *waits* on the plane for its job, which
  the driver offers once the round's clients are chosen.

A waiting task must never hold its worker's thread against work that needs it: it gives up when Dask
cancels it, when the driver withdraws the offer, or when other work is queued on its worker, and says so
(:data:`NO_WORK`, pushed to the driver and returned to Dask); the driver submits the chunk again if it still
wants it. Tasks its transport submitted ahead for the same or *later* rounds do not count: their jobs come
after this task's, so waiting for its own holds them up no longer than the round in between (giving up for
them would only turn a normal round into a resubmission).

Example:
    >>> from flgraph.local.tasks import early_keys
    >>> early_keys("local-train-r00002-c0000-abc.p1", 1)
    ['local-train-r00002-c0000-abc.p1#e0', 'local-train-r00002-c0000-abc.p1#e1']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flgraph.context import ClientSet
from flgraph.engine.clients import Bundle, Partial, run_clients

from . import dataplane
from .sharing import Share

__all__ = ["NO_WORK", "Sent", "ahead_chunk", "early_keys", "make_give_up", "plane_chunk"]

NO_WORK = "flgraph: no job came for this task submitted ahead"
"""What a task submitted ahead returns to Dask when it gave up waiting for its job."""

Nodes = list[tuple[tuple[int, int], Partial]]


@dataclass
class Sent:
    """A chunk task's final answer when it sent some of its nodes on early (work sharing): the nodes it
    kept and how many early pushes (keys ``<key>#e0``, ``#e1``...) the driver must also take."""

    nodes: Nodes
    early: int


def early_keys(key: str, chunks: int) -> list[str]:
    """The keys a chunk task may push early under: work sharing emits at most twice per chunk a task works
    on, its own and each it adopts (a chunk gets one helper at most), so at most ``2 * chunks`` times."""
    return [f"{key}#e{i}" for i in range(2 * chunks)]


def run_and_push(bundle: Bundle, endpoint: str, result_key: str, flat: np.ndarray, rnd: int,
                 clients: ClientSet, nodes: list[tuple[int, int]] | Share, on_error: str) -> Any:
    """Run a chunk's clients and push the partials to the driver. Returns None to Dask when the final push
    went through, else the partials (the driver then gathers them through Dask)."""
    sent = 0

    def emit(part: Nodes) -> bool:
        nonlocal sent
        if not dataplane.push(endpoint, f"{result_key}#e{sent}", part):
            return False  # kept: they go with the final answer
        sent += 1
        return True

    result = run_clients(bundle, flat, rnd, clients, nodes, on_error, emit)  # type: ignore[arg-type]
    final: Any = Sent(result, sent) if sent else result
    return None if dataplane.push(endpoint, result_key, final) else final


def plane_chunk(bundle: Bundle, plane: tuple[str, str, str], rnd: int, clients: ClientSet,
                nodes: list[tuple[int, int]] | Share, on_error: str) -> Any:
    """A chunk task submitted with its job; ``plane`` is (endpoint, params key, result key)."""
    endpoint, params_key, result_key = plane
    flat = dataplane.fetch(endpoint, params_key)
    return run_and_push(bundle, endpoint, result_key, flat, rnd, clients, nodes, on_error)


def ahead_chunk(bundle: Bundle, plane: tuple[str, str, str, int, str, int]) -> Any:
    """A chunk task submitted ahead; ``plane`` is (endpoint, offer key, result key, index, family, batch).
    Waits for job ``index`` of the offer, then runs it as :func:`plane_chunk` does; when it gives up (see
    :func:`make_give_up`) it pushes and returns :data:`NO_WORK`."""
    endpoint, offer_key, result_key, index, family, batch = plane
    got = dataplane.wait(endpoint, offer_key, index, give_up=make_give_up(family, batch))
    if got is None:
        dataplane.push(endpoint, result_key, NO_WORK)  # dropped unless the driver expects this chunk now
        return NO_WORK
    flat, (rnd, clients, nodes, on_error) = got
    return run_and_push(bundle, endpoint, result_key, flat, rnd, clients, nodes, on_error)


def make_give_up(family: str, batch: int) -> Callable[[], bool]:
    """For the task running now: a check that is true once Dask no longer runs it (cancelled, released) or
    work is queued on its worker other than tasks submitted ahead by its transport for the same or a later
    round (keys ending with ``<family><n>``, ``n >= batch``)."""
    try:
        from distributed import get_worker
        from distributed.worker import thread_state

        worker, key = get_worker(), thread_state.key
    except (ImportError, ValueError, AttributeError):
        return lambda: False

    def give_up() -> bool:
        try:
            ts = worker.state.tasks.get(key)
            if ts is None or ts.state != "executing":
                return True
            return any(not _later(str(t.key), family, batch) for t in list(worker.state.ready))
        except RuntimeError:  # the worker's state changed while we looked: look again next time
            return False

    return give_up


def _later(key: str, family: str, batch: int) -> bool:
    """Whether ``key`` is a task submitted ahead by the same transport (``...<family><n>``), ``n >= batch``."""
    _, found, n = key.rpartition(family)
    return bool(found) and n.isdigit() and int(n) >= batch
