"""The Dask transport: client stages run as Dask tasks on chunks of clients.

Per run, the :class:`~flgraph.client_runner.Bundle` (client stages, reducer, dataset handle, model) is
scattered once to every worker. Per round, the global params are scattered once to each worker, one task per
chunk of clients runs the client segment and returns partial aggregates, and partials are combined along
the round's fixed tree (on the workers when there are many, in the driver when there are few).

When every worker runs on this machine (the embedded cluster), the round's params and partials travel
over the :mod:`flgraph.dataplane` instead (fetched from and pushed to the driver directly, no scatter or
gather round trips through the scheduler); Dask still schedules, names and retries the chunk tasks.
``DaskTransport(..., data_plane=False)`` or ``FLGRAPH_DATA_PLANE=0`` turns it off. Over the data plane,
the default chunks (one per worker thread) also share their clients (:mod:`flgraph.sharing`): a task that
runs out takes a slower chunk's last clients, and the sum stays bit-identical.

Over the data plane, when the engine says another round follows (:meth:`DaskTransport.plan_ahead`), the
next round's chunk tasks are submitted while the current one runs. Each starts on its worker as soon as
that worker's current chunk ends and waits there for its job; the driver offers it (params, clients) the
moment the next round's clients are chosen, or withdraws it when the round does not come (the end of
``fit``, an error, client work outside a round). A waiting task gives up by itself when other work is
queued behind it on its worker, or when Dask cancels it, so it can hold up nothing. While a round trains,
the driver also prepares the next one (the engine's ``prepare``: Select chooses its clients; the claims
table of work sharing is written) and adds the partials into the round's tree as they arrive, so that
little is left between the last client's end and the next round's start.

Task keys carry the stage and the round, e.g. ``local-train-r00012-c0001-<run>``,
``aggregate-r00012-n0-50-<run>`` and ``broadcast-r00012-<run>-w0`` (one copy per worker), so the dashboard
groups work by stage.

Example:
    >>> from flgraph.transports.dask import DaskTransport  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
from distributed import Client, Future, as_completed
from distributed.client import FutureCancelledError

from flgraph import tree
from flgraph.client_runner import (
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
from flgraph.cluster import worker_threads
from flgraph.context import ClientSet
from flgraph.errors import ClusterError
from flgraph.local import dataplane, heap, sharing

__all__ = ["DaskTransport"]

log = logging.getLogger("flgraph")

T = TypeVar("T")
RETRIES = 2  # times a round's client work runs again after a worker left mid-round with data it needed


class _LostWork(ClusterError):
    """Client tasks were cancelled: typically a worker died holding the only copy of data they needed."""


PUSH_GRACE_S = 0.25  # a chunk task Dask reports done whose partial has not arrived by then is gathered
FAN_IN = 8  # at most this many partials travel to the driver; more are combined on the workers first
NO_WORK = "flgraph: no job came for this task submitted ahead"  # what such a task returns to Dask


@dataclass
class _Sent:
    """A chunk task's final answer when it sent some of its nodes on early (work sharing): the nodes it
    kept and how many early pushes (keys ``<key>#e0``, ``#e1``...) the driver must also take."""

    nodes: list[tuple[tuple[int, int], Partial]]
    early: int


def _early_keys(key: str, chunks: int) -> list[str]:
    """The keys a chunk task may push early under: run_shared emits at most twice per chunk it works on,
    its own and each it adopts (a chunk gets one helper at most), so at most ``2 * chunks`` times."""
    return [f"{key}#e{i}" for i in range(2 * chunks)]


def _run_and_push(bundle: Bundle, endpoint: str, result_key: str, flat: np.ndarray, rnd: int,
                  clients: ClientSet, nodes: Any, on_error: str) -> Any:
    """Run a chunk's clients and push the partials to the driver; what to return to Dask: None when the
    final push went through, else the partials (the driver gathers them)."""
    sent = 0

    def emit(part: list[tuple[tuple[int, int], Partial]]) -> bool:
        nonlocal sent
        if not dataplane.push(endpoint, f"{result_key}#e{sent}", part):
            return False  # kept: they go with the final answer
        sent += 1
        return True

    result = run_clients(bundle, flat, rnd, clients, nodes, on_error, emit)  # type: ignore[arg-type]
    final: Any = _Sent(result, sent) if sent else result
    return None if dataplane.push(endpoint, result_key, final) else final


@dataclass
class _Ahead:
    """Chunk tasks of round ``rnd`` submitted ahead: waiting on the plane under ``key`` for their jobs."""

    rnd: int
    key: str
    keys: list[str]  # the tasks' Dask keys, which are also their partials' keys on the plane
    futs: dict[str, Future]
    claims: tuple[str, list[tuple[int, int]]] | None = None  # work sharing's table, written ahead: (path, ranges)


def _combine_task(reducer: Any, left: Partial, right: Partial) -> Partial:
    return combine_partials(reducer, left, right)


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


class DaskTransport:
    """Runs the client segment of rounds on a Dask cluster through ``client``."""

    def __init__(self, client: Client, run_token: str, stage_name: str, chunk_size: int | None = None,
                 data_plane: bool | None = None, share_work: bool | None = None) -> None:
        self.client = client
        self.share_work = sharing.enabled() if share_work is None else share_work
        self._want_plane = data_plane
        self._plane: dataplane.DataPlane | None = None
        self.token = run_token
        self.stage_name = stage_name
        self.chunk_size = chunk_size
        self._bundle: Future | None = None
        self._reducer: Future | None = None
        self._local: Bundle | None = None
        self._attempt = 0
        self._held: list[Future] = []
        self._slots: list[str] = []
        self._slots_at = 0.0
        self._next_round: int | None = None
        self._prepare: Callable[[], None] | None = None
        self._ahead: _Ahead | None = None

    def start(self, bundle: Bundle, flat: np.ndarray) -> float:
        """Ship the bundle to every worker and warm them up; returns the warm-up seconds."""
        t0 = time.perf_counter()
        self._local = bundle
        workers = self._workers()
        key = f"bundle-{self.token}"
        self._bundle = self.client.scatter({key: bundle}, broadcast=True, hash=False)[key]
        rkey = f"reducer-{self.token}"
        self._reducer = self.client.scatter({rkey: bundle.reducer}, broadcast=True, hash=False)[rkey]
        futs = [self.client.submit(_warm, self._bundle, flat, key=f"warm-up-{i}-{self.token}", workers=[w],
                                   pure=False) for i, w in enumerate(sorted(set(workers)))]
        self.client.gather(futs)
        self._plane = self._open_plane(workers)
        return time.perf_counter() - t0

    def _open_plane(self, workers: list[str]) -> dataplane.DataPlane | None:
        """The data plane when asked for, or by default when every worker is on this machine's loopback."""
        if self._want_plane is False or not dataplane.available():
            return None
        local = all(w.startswith(("inproc://", "tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:"))
                    for w in workers)
        if not local and self._want_plane is None:
            return None
        try:
            return dataplane.DataPlane()
        except (RuntimeError, OSError) as e:
            log.warning("the data plane could not start (%s); using Dask's scatter and gather", e)
            return None

    def _workers(self) -> list[str]:
        """One entry per worker thread, sorted; cached for 2 s (asking the scheduler is a round trip, and
        chunks may run elsewhere anyway: ``allow_other_workers``)."""
        now = time.monotonic()
        if self._slots and now - self._slots_at < 2.0:
            return self._slots
        info = worker_threads(self.client)
        if not info:
            raise ClusterError("the Dask cluster has no workers",
                               fix="start workers (`dask worker SCHEDULER_ADDRESS`) or pass workers=N")
        out: list[str] = []
        for addr, nthreads in sorted(info.items()):
            out += [addr] * nthreads
        self._slots, self._slots_at = out, now
        return out

    def slots(self) -> int:
        """Worker threads available (the default number of chunks)."""
        return len(self._workers())

    def places(self) -> int:
        """Distinct workers (each receives the broadcast once)."""
        return len(set(self._workers()))

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Run the client segment for ``clients`` and return the round's root partial.

        A worker that dies mid-round takes its copy of the round's params with it, and Dask cancels the
        tasks that needed it; the round's client work is then run again on the workers left (at most
        ``RETRIES`` times). Clients are seeded by round and id, so the rerun gives the same result.
        """
        return self._retrying(rnd, lambda: self._run_round(rnd, flat, clients, on_error))

    def plan_ahead(self, next_round: int | None, prepare: Callable[[], None] | None = None) -> None:
        """Say, before :meth:`run_round`, which round follows it at once (None: none, or not known), and how
        the driver prepares it (``prepare()``, e.g. choosing its clients: called once while the round's
        clients train, so that it is off the critical path between the two rounds).

        Over the data plane, that round's chunk tasks are also submitted while this one runs.
        """
        self._next_round = next_round
        self._prepare = prepare

    def _prepare_next(self) -> None:
        """Run the engine's preparation of the next round (once), now that this round's tasks are out."""
        prepare, self._prepare = self._prepare, None
        if prepare is not None:
            try:
                prepare()
            except Exception:  # a preparation only: the next round does the work itself, errors included
                log.debug("preparing the next round ahead failed", exc_info=True)

    def cancel_ahead(self) -> None:
        """Withdraw the chunk tasks submitted ahead for a round that does not follow now (the engine calls
        this when ``fit`` ends, whatever the reason); they end at once, with nothing done."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._withdraw(ahead)

    def _withdraw(self, ahead: _Ahead) -> None:
        if self._plane is not None:
            self._plane.withdraw(ahead.key)
            self._plane.retract(ahead.keys)
        if ahead.claims is not None:
            with contextlib.suppress(OSError):
                os.unlink(ahead.claims[0])
        with contextlib.suppress(Exception):
            self.client.cancel(list(ahead.futs.values()), force=True)

    def _retrying(self, rnd: int, attempt_once: Callable[[], T]) -> T:
        for attempt in itertools.count(1):
            try:
                return attempt_once()
            except _LostWork as e:
                self.cancel_ahead()  # submitted by the attempt that failed
                if attempt > RETRIES:
                    raise ClusterError(f"round {rnd}: workers kept leaving mid-round ({attempt} attempts): {e}",
                                       fix="check that the workers are alive (see the dashboard); the run's "
                                           "state is unchanged, call fit() again") from e
                log.warning("round %d: a worker left mid-round (%s); running the round's clients again", rnd, e)
                self._slots_at = 0.0  # ask the scheduler which workers are left
        raise AssertionError("unreachable")

    def _run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str) -> Partial:
        if self._bundle is None or self._local is None:
            raise ClusterError("the transport was not started")
        c = self.client
        tag = f"r{rnd:05d}"
        # A retried round (after a client error) must not reuse the failed attempt's keys: Dask could
        # hand back the stale erred result while the cancel is still in flight.
        self._attempt += 1
        run = f"{self.token}.{self._attempt}"
        slots = self._workers()
        n = len(clients)
        over_selected = clients.keep_first is not None and clients.keep_first < n
        if self._plane is not None and not over_selected:
            plan = [tree.cover(n, a, b) for a, b in tree.chunks(n, len(slots), self.chunk_size)]
            if sum(len(nodes) for nodes in plan) <= FAN_IN:
                return self._plane_round(rnd, flat, clients, on_error, run, slots, plan)
        self.cancel_ahead()
        copies = self._broadcast(f"broadcast-{tag}-{run}", flat)
        if over_selected:
            return self._over_selected(rnd, copies, clients, on_error, run, slots)
        chunk_futs: list[tuple[Future, list[tuple[int, int]]]] = []
        for j, (a, b) in enumerate(tree.chunks(n, len(slots), self.chunk_size)):
            nodes = tree.cover(n, a, b)
            f = c.submit(run_clients, self._bundle, copies[j % len(copies)], rnd, clients, nodes, on_error,
                         key=f"{self.stage_name}-{tag}-c{j:04d}-{run}", pure=False)
            chunk_futs.append((f, nodes))
        futs: list[Future] = [f for f, _ in chunk_futs]
        self._release_later([])  # the previous round's futures, now that this round is submitted
        self._prepare_next()
        try:
            reducer = self._local.reducer
            if sum(len(nodes) for _, nodes in chunk_futs) <= FAN_IN:
                done = {node: part for result in self._gather(futs) for node, part in result}
                return tree.assemble(n, done, lambda a, b: combine_partials(reducer, a, b))
            node_futs: dict[tuple[int, int], Future] = {}
            for j, (f, nodes) in enumerate(chunk_futs):
                for i, node in enumerate(nodes):
                    node_futs[node] = c.submit(_pick, f, i, key=f"aggregate-{tag}-c{j:04d}-p{i}-{run}")
            futs += list(node_futs.values())
            count = itertools.count()

            def combine(a: Future, b: Future) -> Future:
                fut = c.submit(_combine_task, self._reducer, a, b, pure=False,
                               key=f"aggregate-{tag}-t{next(count):04d}-{run}")
                futs.append(fut)
                return fut

            root: Partial = self._gather([tree.assemble(n, node_futs, combine)])[0]
            return root
        except BaseException:
            c.cancel([*futs, *copies], force=True)  # stop the round's remaining work now
            raise
        finally:
            self._release_later([*futs, *copies])

    def _plane_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str, run: str,
                     slots: list[str], plan: list[list[tuple[int, int]]]) -> Partial:
        """The round over the data plane: params fetched from the driver, partials pushed back to it."""
        assert self._plane is not None and self._local is not None
        plane, c, tag = self._plane, self.client, f"r{rnd:05d}"
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.rnd != rnd or len(ahead.keys) != len(plan)
                                  or any(f.status != "pending" for f in ahead.futs.values())):
            self._withdraw(ahead)  # not this round's shape, or a task gave up: submit the round afresh
            ahead = None
        served = ahead.key if ahead is not None else f"broadcast-{tag}-{run}"
        work, claims = self._share(plan, served, ahead.claims if ahead is not None else None)
        if ahead is not None:  # the tasks wait on their workers already: hand them their jobs
            keys, futs = ahead.keys, ahead.futs
        else:
            keys = [f"{self.stage_name}-{tag}-c{j:04d}-{run}" for j in range(len(plan))]
        early = [e for key in keys for e in _early_keys(key, len(plan))] if claims is not None else []
        plane.expect([*keys, *early])
        if ahead is not None:
            plane.offer(served, flat, [(rnd, clients, job, on_error) for job in work])
        else:
            plane.publish(served, flat)
            futs = {key: c.submit(_plane_chunk, self._bundle, (plane.endpoint, served, key), rnd, clients, job,
                                  on_error, key=key, workers=[slots[j % len(slots)]], allow_other_workers=True,
                                  pure=False)
                    for j, (key, job) in enumerate(zip(keys, work))}
        if self._next_round == rnd + 1:
            self._submit_ahead(rnd + 1, plan, slots)
        self._release_later([])  # the previous round's futures, now that this round is submitted
        self._prepare_next()
        try:
            return self._await_plane(futs, len(clients), len(plan) if claims is not None else 0)
        except BaseException:
            c.cancel(list(futs.values()), force=True)  # stop the round's remaining work now
            raise
        finally:
            plane.retract([served, *keys, *early])
            self._release_later(list(futs.values()))
            if claims is not None:
                with contextlib.suppress(OSError):
                    os.unlink(claims)

    def _share(self, plan: list[list[tuple[int, int]]], served: str,
               ready: tuple[str, list[tuple[int, int]]] | None = None,
               ) -> tuple[list[list[tuple[int, int]]] | list[sharing.Share], str | None]:
        """The chunks' jobs: their nodes, or (work sharing, see :mod:`flgraph.sharing`) their rows of a
        claims table for this round attempt; and the table's path, removed after the round. The table is
        written now unless ``ready`` (written ahead by :meth:`_claims_ahead`) already has these chunks.

        Shared when the chunks are the default ones (one tree node each, more than one chunk) and the
        transport's ``share_work`` is on; a ``chunk_size`` the user chose is kept as it is."""
        if (not self.share_work or self.chunk_size is not None or len(plan) < 2 or self._plane is None
                or any(len(nodes) != 1 for nodes in plan)):
            if ready is not None:
                with contextlib.suppress(OSError):
                    os.unlink(ready[0])
            return plan, None
        path = os.path.join(self._plane.directory, f"claims-{served}")
        ranges = [nodes[0] for nodes in plan]
        if ready != (path, ranges):
            sharing.Claims.create(path, ranges)
        return [sharing.Share(path, j) for j in range(len(plan))], path

    def _claims_ahead(self, key: str, plan: list[list[tuple[int, int]]]) -> tuple[str, list[tuple[int, int]]] | None:
        """Write the claims table for the round submitted ahead under ``key`` now, while a round runs (off
        the critical path between rounds), for chunks like ``plan``'s; :meth:`_share` uses it when the
        round's chunks turn out the same."""
        _, path = self._share(plan, key)
        if path is None:
            return None
        return path, [nodes[0] for nodes in plan]

    def _submit_ahead(self, rnd: int, plan: list[list[tuple[int, int]]], slots: list[str]) -> None:
        """Submit round ``rnd``'s chunk tasks now, one per chunk of ``plan`` (this round's: the next is
        expected to be alike); each waits on its worker for its job."""
        assert self._plane is not None
        self._attempt += 1
        run = f"{self.token}.{self._attempt}"
        tag = f"r{rnd:05d}"
        key = f"next-{tag}-{run}"
        keys = [f"{self.stage_name}-{tag}-c{j:04d}-{run}" for j in range(len(plan))]
        futs = {k: self.client.submit(_ahead_chunk, self._bundle, (self._plane.endpoint, key, k, j, f"-{run}"),
                                      key=k, workers=[slots[j % len(slots)]], allow_other_workers=True, pure=False)
                for j, k in enumerate(keys)}
        self._ahead = _Ahead(rnd, key, keys, futs)
        self._ahead.claims = self._claims_ahead(key, plan)

    def _await_plane(self, futs: dict[str, Future], n: int, chunks: int) -> Partial:
        """The round's root partial, assembled as the chunks' partials arrive over the data plane.

        Each arriving node is combined at once into the round's tree (:class:`flgraph.tree.Incremental`:
        the same additions in the same order as :func:`flgraph.tree.assemble`, so the same root, bit for
        bit), so that only the last node's combinations remain when the last client ends. With work sharing
        (``chunks`` > 0) a task also pushes nodes early (``<key>#eN``, as many as its final answer says).
        A chunk's error or cancellation, from its Dask future, ends the wait (checked every 50 ms); a task
        Dask reports done whose partial has not come after :data:`PUSH_GRACE_S` is gathered through Dask.
        """
        assert self._plane is not None and self._local is not None
        reducer = self._local.reducer
        inc = tree.Incremental(n, lambda a, b: combine_partials(reducer, a, b), check=True)
        early_of = {e: key for key in futs for e in _early_keys(key, chunks)} if chunks else {}
        pending = set(futs)  # tasks whose final answer has not come
        owed: dict[str, float] = {}  # early pushes a final answer announced that have not come: since when
        finished_at: dict[str, float] = {}

        def fold(key: str, nodes: list[tuple[tuple[int, int], Partial]]) -> None:
            try:
                for node, part in nodes:
                    inc.add_node(node, part)
            except ValueError as e:  # cannot happen with one claim per position; rerun rather than guess
                raise _LostWork(f"the chunk task {key} sent a partial that does not fit the round: {e}") from e

        def answer(key: str, result: Any) -> None:
            pending.discard(key)
            if isinstance(result, _Sent):  # it sent nodes on early too: those not here yet are owed
                now = time.monotonic()
                owed.update((e, now) for e in (f"{key}#e{i}" for i in range(result.early)) if e in early_of)
                result = result.nodes
            fold(key, result)

        while pending or owed:
            got = self._plane.take([*pending, *early_of], timeout=0.05)
            for k, value in got.items():
                if k in early_of:
                    del early_of[k]
                    owed.pop(k, None)
                    fold(k, value)
                else:
                    answer(k, value)
            now = time.monotonic()
            for e, since in owed.items():
                if now - since > PUSH_GRACE_S:
                    raise _LostWork(f"the chunk task {e.split('#')[0]} sent early partials that never arrived")
            for key in [k for k in pending if k not in got]:
                fut = futs[key]
                if fut.status == "error":
                    self._gather([fut])  # raises the client's error
                    raise ClusterError(f"the chunk task {key} failed")
                if fut.status == "cancelled":
                    raise _LostWork(f"the chunk task {key} was cancelled")
                if fut.status == "finished" and now - finished_at.setdefault(key, now) > PUSH_GRACE_S:
                    result = self._gather([fut])[0]  # the task returned its partial: the push failed
                    if result is None:
                        raise ClusterError(f"the chunk task {key} sent its partial, but it never arrived")
                    if isinstance(result, str) and result == NO_WORK:
                        raise _LostWork(f"the chunk task {key} gave up waiting for its job")
                    answer(key, result)
        if inc.covered != n:
            # work sharing: a task that died (its worker with it) had claimed positions no one ran; Dask's
            # rerun of it finds them claimed. Run the round again with a fresh table.
            raise _LostWork("clients claimed by a chunk task that did not finish (a worker left)")
        root: Partial = inc.root()
        return root

    def _broadcast(self, name: str, flat: np.ndarray) -> list[Future]:
        """One copy of ``flat`` on each worker (keys ``<name>-w0``, ``-w1``...), in one scatter.

        Dask's ``scatter(broadcast=True)`` puts the data on one worker and then replicates it: two more
        round trips through the scheduler (W1 on 2 workers: 8.9 ms against 5.5 ms for this). A task that
        depends on copy ``i`` is placed by the scheduler on the worker holding it, so the chunks of a
        round spread over the workers as the copies do.
        """
        places = sorted(set(self._workers()))
        data = {f"{name}-w{i}": flat for i in range(len(places))}
        futs = self.client.scatter(data, workers=places, hash=False)
        return [futs[k] for k in data]

    def _over_selected(self, rnd: int, copies: list[Future], clients: ClientSet, on_error: str, run: str,
                       slots: list[str]) -> Partial:
        """Selection after training: run every drawn client, keep their updates on the workers, gather only
        the finish times, then aggregate the first ``keep_first`` along the round's tree (two task waves;
        the updates of a chunk stay in its worker's memory in between)."""
        assert self._local is not None and clients.keep_first is not None
        c, n, tag = self.client, len(clients), f"r{rnd:05d}"
        plan = tree.chunks(n, len(slots), self.chunk_size)
        held = [c.submit(hold_clients, self._bundle, copies[j % len(copies)], rnd, clients, a, b, on_error,
                         key=f"{self.stage_name}-{tag}-c{j:04d}-{run}", pure=False)
                for j, (a, b) in enumerate(plan)]
        futs: list[Future] = list(held)
        self._release_later([])
        try:
            timed = [c.submit(finish_times, h, key=f"finish-times-{tag}-c{j:04d}-{run}", pure=False)
                     for j, h in enumerate(held)]
            futs += timed
            order = sorted((t, p) for part in self._gather(timed) for p, t in part)
            keep = frozenset(p for _, p in order[: clients.keep_first])
            reason = f"over-selection: not among the first {clients.keep_first} to finish"
            reduced = [c.submit(reduce_held, self._bundle, h, keep, n, tree.cover(n, a, b), reason,
                                key=f"aggregate-{tag}-c{j:04d}-{run}", pure=False)
                       for j, (h, (a, b)) in enumerate(zip(held, plan))]
            futs += reduced
            reducer = self._local.reducer
            done = {node: part for result in self._gather(reduced) for node, part in result}
            root: Partial = tree.assemble(n, done, lambda a, b: combine_partials(reducer, a, b))
            return root
        except BaseException:
            c.cancel([*futs, *copies], force=True)
            raise
        finally:
            self._release_later([*futs, *copies])

    def _release_later(self, futures: list[Future]) -> None:
        """Release the previous round's futures now, keep this round's until the next round is submitted.

        Releasing sends a message on the client's batched stream, which then holds the next message (the
        next round's tasks) back for up to 10 ms; released after the next submit, it costs nothing. The
        round is over, so its futures are released, not cancelled: ``Future.release`` queues the release on
        the client's loop without waiting for it, where ``Client.cancel`` blocks this thread on a round
        trip to the loop and costs the scheduler a cancellation (W1, the driver's CPU for it: 0.46 ms a
        round cancelled, 0.12 released).
        """
        previous, self._held = self._held, futures
        for fut in previous:
            fut.release()

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """``fn(work)`` for each client of ``ids`` on the workers (one task per chunk); results in order."""
        return self._retrying(rnd, lambda: self._map_clients(rnd, flat, ids, fn))

    def _map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        if self._bundle is None:
            raise ClusterError("the transport was not started")
        self.cancel_ahead()  # tasks waiting for the next round would hold the workers this work needs
        c = self.client
        self._attempt += 1
        run = f"{self.token}.{self._attempt}"
        copies = self._broadcast(f"broadcast-r{rnd:05d}-m-{run}", flat)
        slots = self._workers()
        clients = ClientSet(np.asarray(ids, dtype=np.int64))
        name = getattr(fn, "__name__", "client-work").replace("_", "-").strip("-") or "client-work"
        futs = [c.submit(map_chunk, self._bundle, copies[j % len(copies)], rnd, clients, a, b, fn,
                         key=f"{name}-r{rnd:05d}-c{j:04d}-{run}", pure=False)
                for j, (a, b) in enumerate(tree.chunks(len(clients), len(slots), self.chunk_size))]
        try:
            return [r for part in self._gather(futs) for r in part]
        finally:
            c.cancel([*futs, *copies], force=True)

    # -- asynchronous engine -----------------------------------------------------------------------
    def publish(self, version: int, flat: np.ndarray) -> Future:
        """Ship global version ``version`` to every worker once (clients of that version reuse it)."""
        self._attempt += 1
        key = f"broadcast-v{version:06d}-{self.token}.{self._attempt}"
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

    def _gather(self, futures: list[Future]) -> list[Any]:
        try:
            return list(self.client.gather(futures, errors="raise"))
        except FutureCancelledError as e:
            raise _LostWork(f"a client task was cancelled: {e}",
                            fix="check that the workers are alive (see the dashboard)") from e
        except Exception as e:
            if type(e).__name__ == "KilledWorker":
                raise ClusterError(f"workers kept dying while running clients: {e}",
                                   fix="look at the worker logs (memory, crashes); the run state is unchanged, "
                                       "call fit() again once the cluster is healthy") from e
            raise

    def close(self) -> None:
        """Release the run's data on the workers and their bound copies of the model."""
        self.cancel_ahead()
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
        if self._plane is not None:
            with contextlib.suppress(Exception):
                self.client.run(dataplane.forget, self._plane.endpoint)  # the workers' sockets to it
            self._plane.close()
            self._plane = None


def _forget_model(token: str) -> int:
    from flgraph.models.adapter import ModelAdapter

    return ModelAdapter.forget(token)


def _plane_chunk(bundle: Bundle, plane: tuple[str, str, str], rnd: int, clients: ClientSet,
                 nodes: list[tuple[int, int]] | sharing.Share, on_error: str) -> Any:
    """A chunk task over the data plane: fetch the params, run the clients, push the partials (or return
    them, when the push fails)."""
    endpoint, params_key, result_key = plane
    flat = dataplane.fetch(endpoint, params_key)
    return _run_and_push(bundle, endpoint, result_key, flat, rnd, clients, nodes, on_error)


def _ahead_chunk(bundle: Bundle, plane: tuple[str, str, str, int, str]) -> Any:
    """A chunk task submitted ahead: wait for its job (round, clients, nodes) on the plane, then run it as
    :func:`_plane_chunk` does. Returns :data:`NO_WORK` when the job does not come."""
    endpoint, offer_key, result_key, index, batch = plane
    got = dataplane.wait(endpoint, offer_key, index, give_up=_make_give_up(batch))
    if got is None:
        return NO_WORK
    flat, (rnd, clients, nodes, on_error) = got
    return _run_and_push(bundle, endpoint, result_key, flat, rnd, clients, nodes, on_error)


def _make_give_up(batch: str) -> Callable[[], bool]:
    """True once this task is cancelled, or other work (not a task of the same batch, whose keys end with
    ``batch``) is queued on this worker: a waiting task must not hold up a round's rescheduled chunk."""
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
            return any(not str(t.key).endswith(batch) for t in list(worker.state.ready))
        except RuntimeError:  # the worker's state changed while we looked: look again next time
            return False

    return give_up


def _pick(result: list[tuple[tuple[int, int], Partial]], i: int) -> Partial:
    return result[i][1]
