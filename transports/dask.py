"""The Dask transport: client stages run as Dask tasks on chunks of clients.

Per run, the :class:`~flgraph.engine.clients.Bundle` (client stages, reducer, dataset handle, model) is
scattered once to every worker, and each worker is warmed up. Per round:

1. the global params are scattered once to each worker (``broadcast-r00012-<run>-w0``, ``-w1``...);
2. one task per chunk of clients (:func:`flgraph.tree.chunks`) runs the client segment and returns the
   partial aggregates of the tree nodes its chunk covers (``local-train-r00012-c0001-<run>``);
3. the partials are combined along the round's fixed tree (:mod:`flgraph.tree`): in the driver when they
   are few, else on the workers first (``aggregate-r00012-...``). The tree fixes every addition, so params
   are bit-identical with 1 or N workers and any chunk size;
4. a worker that dies mid-round takes data with it and Dask cancels the tasks that needed it: the round's
   client work runs again on the workers left (clients are seeded by round and id: same result).

Over-selection (``keep_first``) keeps every drawn client's update on its worker and aggregates the first
to finish; ``map_clients`` runs a function per client; ``publish``, ``submit_client``, ``release`` and
``completion`` serve the asynchronous engine. When every worker runs on the driver's machine, rounds go
through an accelerator (:mod:`flgraph.local`, a :class:`~flgraph.transports.base.RoundAccelerator`): the
same chunks, keys and tree, with the data over a private data plane and the next round submitted ahead.

Example:
    >>> from distributed import Client, LocalCluster
    >>> from flgraph.transports.base import PlansAhead, Transport
    >>> from flgraph.transports.dask import DaskTransport
    >>> cluster = LocalCluster(n_workers=2, processes=False, dashboard_address=None)
    >>> client = Client(cluster, set_as_default=False)
    >>> transport = DaskTransport(client, run_token="doc", stage_name="local-train")
    >>> transport.places(), isinstance(transport, Transport), isinstance(transport, PlansAhead)
    (2, True, True)
    >>> client.close(); cluster.close()
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, TypeVar

import numpy as np
from distributed import Client, Future, as_completed
from distributed.client import FutureCancelledError

from flgraph import _chaos, tree
from flgraph.cluster import worker_threads
from flgraph.context import ClientSet
from flgraph.engine.clients import (
    Bundle,
    Partial,
    combine_partials,
    finish_times,
    hold_clients,
    map_chunk,
    one_client,
    reduce_held,
    run_clients,
)
from flgraph.errors import ClusterError
from flgraph.local import heap

from .base import LostWork, PlansAhead, RoundAccelerator, Transport

__all__ = ["DaskTransport", "gather"]

log = logging.getLogger("flgraph")

T = TypeVar("T")
RETRIES = 2  # times a round's client work runs again after work was lost (a worker left mid-round)
FAN_IN = 8  # at most this many partials travel to the driver; more are combined on the workers first


def gather(client: Client, futures: list[Any]) -> list[Any]:
    """The futures' results; a client's error is raised as it is, lost work as :class:`LostWork`."""
    try:
        return list(client.gather(futures, errors="raise"))
    except FutureCancelledError as e:
        raise LostWork(f"a client task was cancelled: {e}",
                       fix="check that the workers are alive (see the dashboard)") from e
    except Exception as e:
        if type(e).__name__ == "KilledWorker":
            raise ClusterError(f"workers kept dying while running clients: {e}",
                               fix="look at the worker logs (memory, crashes); the run state is unchanged, "
                                   "call fit() again once the cluster is healthy") from e
        raise


class DaskTransport(Transport, PlansAhead):
    """Runs the client segment of rounds on a Dask cluster through ``client`` (see the module docstring)."""

    #: Every shape of round graph: fan-outs, parallel branches, tiers, server values broadcast.
    supports: frozenset[str] = frozenset({"parallel branches", "several per-client values", "tiers",
                                          "server values broadcast besides the params", "secure aggregation"})

    def __init__(self, client: Client, run_token: str, stage_name: str, chunk_size: int | None = None) -> None:
        self.client = client
        self.token = run_token
        self.stage_name = stage_name
        self.chunk_size = chunk_size
        self._bundle: Future | None = None
        self._reducer: Future | None = None
        self._local: Bundle | None = None
        self._accel: RoundAccelerator | None = None
        self._attempt = 0
        self._held: list[Future] = []
        self._slots: list[str] = []
        self._slots_at = 0.0
        self._next_round: int | None = None
        self._prepare: Callable[[], None] | None = None

    def start(self, bundle: Bundle, flat: np.ndarray) -> float:
        """Ship the bundle to every worker and warm them up; returns the warm-up seconds."""
        t0 = time.perf_counter()
        self._local = bundle
        workers = self._workers()
        self._place(bundle)
        key = f"bundle-{self.token}"
        self._bundle = self.client.scatter({key: bundle}, broadcast=True, hash=False)[key]
        rkey = f"reducer-{self.token}"
        self._reducer = self.client.scatter({rkey: bundle.reducer}, broadcast=True, hash=False)[rkey]
        futs = [self.client.submit(_warm, self._bundle, flat, key=f"warm-up-{i}-{self.token}", workers=[w],
                                   pure=False) for i, w in enumerate(sorted(set(workers)))]
        _chaos.point("warm-up")
        self.client.gather(futs)
        from flgraph.local.rounds import accelerator_for  # the local package builds on this module

        self._accel = accelerator_for(self.client, workers, self._bundle, bundle.reducer, self.stage_name,
                                      self.token, self.chunk_size, self._release_later)
        return time.perf_counter() - t0

    def _place(self, bundle: Bundle) -> None:
        """Let each client stage settle its device for the run from every worker's CUDA count, before the
        bundle is shipped (:meth:`flgraph.graph.ClientStage.place`)."""
        cuda = {str(w): int(n) for w, n in self.client.run(_cuda_devices).items()}
        for stage in (*bundle.stages, *(s for branch in bundle.branch_stages for s in branch)):
            stage.place(cuda)

    def _new_run(self) -> str:
        """A fresh suffix for an attempt's keys: a retried round must not reuse the failed attempt's keys
        (Dask could hand back the stale erred result while the cancel is still in flight)."""
        self._attempt += 1
        return f"{self.token}.{self._attempt}"

    def _workers(self) -> list[str]:
        """One entry per worker thread, sorted; cached for 2 s (asking the scheduler is a round trip, and
        chunks may run elsewhere anyway)."""
        now = time.monotonic()
        if self._slots and now - self._slots_at < 2.0:
            return self._slots
        info = worker_threads(self.client)
        if not info:
            raise ClusterError("the Dask cluster has no workers",
                               fix="start workers (`dask worker SCHEDULER_ADDRESS`) or pass workers=N")
        self._slots = [addr for addr, nthreads in sorted(info.items()) for _ in range(nthreads)]
        self._slots_at = now
        return self._slots

    def on_this_machine(self) -> bool:
        """Whether every worker runs on the driver's machine (so they share its disk)."""
        from flgraph.local.rounds import LOOPBACK

        return all(w.startswith(LOOPBACK) for w in self._workers())

    def places(self) -> int:
        """Distinct workers (each receives the broadcast once)."""
        return len(set(self._workers()))

    # -- rounds ------------------------------------------------------------------------------------
    def plan_ahead(self, next_round: int | None, prepare: Callable[[], None] | None = None) -> None:
        """Say, before :meth:`run_round`, which round follows it at once (None: none, or not known), and how
        the driver prepares it (``prepare()``, e.g. choosing its clients: called once while the round's
        clients train, off the critical path between the two rounds)."""
        self._next_round = next_round
        self._prepare = prepare

    def cancel_ahead(self) -> None:
        """Drop what was prepared for a round that does not follow now (the engine calls this when ``fit``
        ends, whatever the reason)."""
        if self._accel is not None:
            self._accel.cancel_ahead()

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Run the client segment for ``clients`` and return the round's root partial.

        Work lost with a worker that left mid-round is run again on the workers left (at most
        :data:`RETRIES` times).
        """
        return self._retrying(rnd, lambda: self._run_round(rnd, flat, clients, on_error))

    def _retrying(self, rnd: int, attempt_once: Callable[[], T]) -> T:
        for attempt in itertools.count(1):
            before = set(self._slots)
            try:
                return attempt_once()
            except LostWork as e:
                self.cancel_ahead()  # submitted by the attempt that failed
                if attempt > RETRIES:
                    raise ClusterError(f"round {rnd}: workers kept leaving mid-round ({attempt} attempts): {e}",
                                       fix="check that the workers are alive (see the dashboard); the run's "
                                           "state is unchanged, call fit() again") from e
                self._slots_at = 0.0  # ask the scheduler which workers are left
                gone = ", ".join(sorted(before - set(self._workers())))
                log.warning("round %d: %s (%s); running the round's clients again", rnd,
                            f"worker {gone} left mid-round" if gone else "client work was lost", e)
        raise AssertionError("unreachable")

    def _run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str) -> Partial:
        bundle, local = self._started()
        slots = self._workers()
        n = len(clients)
        chunks = tree.chunks(n, len(slots), self.chunk_size)
        if clients.keep_first is not None and clients.keep_first < n:
            self.cancel_ahead()
            return self._over_selected(rnd, flat, clients, on_error, chunks)
        plan = [tree.cover(n, a, b) for a, b in chunks]
        accel = self._accel
        if accel is not None and accel.takes(n, plan):
            handle = accel.submit(rnd, flat, clients, on_error, plan, slots)
            if self._next_round == rnd + 1:
                accel.submit_ahead(rnd + 1, plan, slots)
            self._submitted()
            return accel.collect(handle)
        self.cancel_ahead()
        c, tag, run = self.client, f"r{rnd:05d}", self._new_run()
        copies = self._broadcast(f"broadcast-{tag}-{run}", flat)
        futs: list[Future] = [c.submit(run_clients, bundle, copies[j % len(copies)], rnd, clients, nodes, on_error,
                                       key=f"{self.stage_name}-{tag}-c{j:04d}-{run}", pure=False)
                              for j, nodes in enumerate(plan)]
        self._submitted()
        try:
            reducer = local.reducer
            if sum(len(nodes) for nodes in plan) <= FAN_IN:
                done = {node: part for result in gather(c, futs) for node, part in result}
                return tree.assemble(n, done, lambda a, b: combine_partials(reducer, a, b))
            node_futs: dict[tuple[int, int], Future] = {}
            for j, (f, nodes) in enumerate(zip(list(futs), plan)):
                for i, node in enumerate(nodes):
                    node_futs[node] = c.submit(_pick, f, i, key=f"aggregate-{tag}-c{j:04d}-p{i}-{run}")
            futs += node_futs.values()
            count = itertools.count()

            def combine_on_workers(a: Future, b: Future) -> Future:
                fut = c.submit(combine_partials, self._reducer, a, b, pure=False,
                               key=f"aggregate-{tag}-t{next(count):04d}-{run}")
                futs.append(fut)
                return fut

            root: Partial = gather(c, [tree.assemble(n, node_futs, combine_on_workers)])[0]
            return root
        except BaseException:
            c.cancel([*futs, *copies], force=True)  # stop the round's remaining work now
            raise
        finally:
            self._release_later([*futs, *copies])

    def _submitted(self) -> None:
        """The round's tasks are out: release the previous round's futures, and prepare the next round
        while this one's clients train (once; a failure there only means the next round does it itself)."""
        _chaos.point("round-submitted")
        self._release_later([])
        prepare, self._prepare = self._prepare, None
        if prepare is not None:
            try:
                prepare()
            except Exception:
                log.debug("preparing the next round ahead failed", exc_info=True)

    def _started(self) -> tuple[Future, Bundle]:
        if self._bundle is None or self._local is None:
            raise ClusterError("the transport was not started", fix="call start(bundle, flat) first")
        return self._bundle, self._local

    def _broadcast(self, name: str, flat: np.ndarray) -> list[Future]:
        """One copy of ``flat`` on each worker (keys ``<name>-w0``, ``-w1``...), in one scatter (not
        ``broadcast=True``, which replicates from one worker: more round trips). A task that depends on copy
        ``i`` runs where it is, so a round's chunks spread over the workers as the copies do."""
        places = sorted(set(self._workers()))
        data = {f"{name}-w{i}": flat for i in range(len(places))}
        futs = self.client.scatter(data, workers=places, hash=False)
        return [futs[k] for k in data]

    def _over_selected(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str,
                       chunks: list[tuple[int, int]]) -> Partial:
        """Selection after training: run every drawn client, keep their updates on the workers, gather only
        the finish times, then aggregate the first ``keep_first`` along the round's tree (two task waves;
        the updates of a chunk stay in its worker's memory in between)."""
        bundle, local = self._started()
        assert clients.keep_first is not None
        c, n, tag, run = self.client, len(clients), f"r{rnd:05d}", self._new_run()
        copies = self._broadcast(f"broadcast-{tag}-{run}", flat)
        held = [c.submit(hold_clients, bundle, copies[j % len(copies)], rnd, clients, a, b, on_error,
                         key=f"{self.stage_name}-{tag}-c{j:04d}-{run}", pure=False)
                for j, (a, b) in enumerate(chunks)]
        futs: list[Future] = list(held)
        self._release_later([])
        try:
            timed = [c.submit(finish_times, h, key=f"finish-times-{tag}-c{j:04d}-{run}", pure=False)
                     for j, h in enumerate(held)]
            futs += timed
            order = sorted((t, p) for part in gather(c, timed) for p, t in part)
            keep = frozenset(p for _, p in order[: clients.keep_first])
            reason = f"over-selection: not among the first {clients.keep_first} to finish"
            reduced = [c.submit(reduce_held, bundle, h, keep, n, tree.cover(n, a, b), reason, clients,
                                key=f"aggregate-{tag}-c{j:04d}-{run}", pure=False)
                       for j, (h, (a, b)) in enumerate(zip(held, chunks))]
            futs += reduced
            done = {node: part for result in gather(c, reduced) for node, part in result}
            root: Partial = tree.assemble(n, done, lambda a, b: combine_partials(local.reducer, a, b))
            return root
        except BaseException:
            c.cancel([*futs, *copies], force=True)
            raise
        finally:
            self._release_later([*futs, *copies])

    def _release_later(self, futures: list[Future]) -> None:
        """Release the previous round's futures now, keep these until the next round is submitted: a
        release sent before a submit holds the submit back on the client's batched stream. Released, not
        cancelled: ``Future.release`` does not wait for the client's loop, ``Client.cancel`` does."""
        previous, self._held = self._held, futures
        for fut in previous:
            fut.release()

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """``fn(work)`` for each client of ``ids`` on the workers (one task per chunk); results in order."""
        return self._retrying(rnd, lambda: self._map_clients(rnd, flat, ids, fn))

    def _map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        bundle, _ = self._started()
        self.cancel_ahead()  # tasks waiting for the next round would hold the workers this work needs
        c, run = self.client, self._new_run()
        copies = self._broadcast(f"broadcast-r{rnd:05d}-m-{run}", flat)
        clients = ClientSet(np.asarray(ids, dtype=np.int64))
        name = getattr(fn, "__name__", "client-work").replace("_", "-").strip("-") or "client-work"
        futs = [c.submit(map_chunk, bundle, copies[j % len(copies)], rnd, clients, a, b, fn,
                         key=f"{name}-r{rnd:05d}-c{j:04d}-{run}", pure=False)
                for j, (a, b) in enumerate(tree.chunks(len(clients), len(self._workers()), self.chunk_size))]
        try:
            return [r for part in gather(c, futs) for r in part]
        finally:
            c.cancel([*futs, *copies], force=True)

    def on_every_worker(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """``fn(*args)`` in every worker process (``Client.run``), by worker address (:class:`ReachesWorkers`)."""
        return dict(self.client.run(fn, *args))

    def on_one_worker(self, worker: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the worker process at ``worker`` (:class:`ReachesWorkers`)."""
        return self.client.run(fn, *args, workers=[worker])[worker]

    # -- asynchronous engine -----------------------------------------------------------------------
    def publish(self, version: int, flat: np.ndarray) -> Future:
        """Ship global version ``version`` to every worker once (clients of that version reuse it)."""
        key = f"broadcast-v{version:06d}-{self._new_run()}"
        return self.client.scatter({key: flat}, broadcast=True, hash=False)[key]

    def submit_client(self, params_f: Future, rnd: int, clients: ClientSet, on_error: str, idx: int) -> Future:
        """One client's segment as one task (``local-train-d0000042-<run>``); its result is a leaf Partial."""
        return self.client.submit(one_client, self._bundle, params_f, rnd, clients, on_error,
                                  key=f"{self.stage_name}-d{idx:07d}-{self.token}.{self._attempt}", pure=False)

    def release(self, futures: list[Future]) -> None:
        """Let the cluster forget these futures."""
        if futures:
            with contextlib.suppress(Exception):
                self.client.cancel(futures, force=True)

    def completion(self) -> as_completed:
        """An empty ``distributed.as_completed`` on this client's loop: ``add`` futures, ``next()`` the first done."""
        return as_completed(loop=self.client.loop)

    def close(self) -> None:
        """Release the run's data on the workers and their bound copies of the model."""
        accel, self._accel = self._accel, None
        if accel is not None:
            accel.close()
        futs = [f for f in (self._bundle, self._reducer) if f is not None] + self._held
        self._held = []
        if futs:
            with contextlib.suppress(Exception):
                self.client.cancel(futs, force=True)
        if self._local is not None:
            with contextlib.suppress(Exception):
                self.client.run(_forget_model, self._local.model_source.token)
            with contextlib.suppress(Exception):
                self.client.run(heap.thaw)
        self._bundle = self._reducer = None
        self._local = None


# -- what runs on the workers -----------------------------------------------------------------------
def _cuda_devices() -> int:
    """The CUDA devices this worker process sees (0 without torch or without a GPU)."""
    try:
        import torch  # the engine itself never imports torch: only here, in the worker, when it is there
    except ImportError:
        return 0
    return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0


def _warm(bundle: Bundle, flat: np.ndarray) -> float:
    """Run one throwaway client update (round 0, not counted) so that torch's import and lazy
    initialisation (autograd, the optimizer's first step) are paid before round 1."""
    t0 = time.perf_counter()
    ids = bundle.dataset.client_ids
    # stages with per-client state sit the warm-up out: a throwaway update must not touch a client's state
    stateless = replace(bundle, stages=tuple(s for s in bundle.stages if not s.client_fields(bundle.spec)),
                        client_state=None)
    if len(ids):
        with contextlib.suppress(Exception):  # a real error surfaces, with its client, in round 1
            run_clients(stateless, flat, 0, ClientSet(ids[:1]), [(0, 1)], "drop")
    heap.freeze()  # the worker's long-lived objects, the bundle's included: no full collection walks them
    return time.perf_counter() - t0


def _pick(result: list[tuple[tuple[int, int], Partial]], i: int) -> Partial:
    return result[i][1]


def _forget_model(token: str) -> int:
    from flgraph.models.adapter import ModelAdapter

    return ModelAdapter.forget(token)
