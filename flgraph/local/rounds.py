"""The accelerated round: the executor's chunk tasks, with their data over the data plane.

:class:`LocalAccelerator` implements :class:`~flgraph.transports.base.RoundAccelerator` for a Dask cluster
whose workers all run on the driver's machine. A round keeps the executor's protocol (the same chunks and
task keys, the same fixed reduction tree, so bit-identical params; Dask still schedules, names and retries
the tasks), but:

* the params are published on the data plane and fetched by the workers, and each chunk's partials are
  pushed back to the driver, which adds them into the round's tree as they arrive
  (:class:`flgraph.tree.Incremental`), so only the last chunk's additions remain after its last client;
* the default chunks share their clients (:mod:`flgraph.local.sharing`), so they end together;
* while a round runs, the next round's chunk tasks are already submitted (:meth:`submit_ahead`): each starts
  on its worker when that worker's current chunk ends and waits there for its job, which :meth:`submit`
  offers as soon as that round's clients are chosen. Dask's submit-to-start then overlaps the round before.

A task submitted ahead may give up waiting (see :mod:`flgraph.local.tasks`). If it does so after its job
was offered, its chunk is submitted again as an ordinary task, quietly: nothing was lost and the round's
result is the same. Only work that is really lost (a task cancelled, partials that do not come) raises
:class:`~flgraph.transports.base.LostWork`, so that the executor runs the round again.

Example:
    >>> from flgraph.local.rounds import LOOPBACK
    >>> "tcp://127.0.0.1:4242".startswith(LOOPBACK)
    True
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from distributed import Client, Future

from flgraph import tree
from flgraph.context import ClientSet
from flgraph.engine.clients import Partial, combine_partials
from flgraph.errors import ClusterError
from flgraph.transports.base import Chunks, LostWork
from flgraph.transports.dask import FAN_IN, gather

from . import dataplane, sharing, tasks

__all__ = ["LOOPBACK", "LocalAccelerator", "accelerator_for"]

log = logging.getLogger("flgraph")

LOOPBACK = ("inproc://", "tcp://127.0.0.1:", "tcp://localhost:", "tcp://[::1]:")
"""Worker addresses on the driver's machine."""
PUSH_GRACE_S = 0.25  # a task Dask reports done whose partial has not arrived by then is gathered through Dask
# A task that pushed its partial (it returned None) may finish well before the partial is read, when the
# driver's threads are busy (a snapshot being written, a loaded machine): the push is in the socket's queue.
# Only after this long is the partial taken as lost, and the round run again (its result is the same).
ARRIVAL_GRACE_S = 10.0


def accelerator_for(client: Client, workers: list[str], bundle: Future, reducer: Any, stage_name: str,
                    token: str, chunk_size: int | None,
                    hold: Callable[[list[Future]], None]) -> LocalAccelerator | None:
    """The accelerator for a cluster whose ``workers`` all run on this machine, unless the data plane is
    switched off or cannot start (None: the executor's own path)."""
    if not dataplane.available() or not all(w.startswith(LOOPBACK) for w in workers):
        return None
    share = sharing.enabled() and chunk_size is None  # a chunk size the user chose is kept as it is
    try:
        return LocalAccelerator(client, bundle, reducer, stage_name, token, share, hold)
    except (RuntimeError, OSError) as e:
        log.warning("the data plane could not start (%s); using Dask's scatter and gather", e)
        return None


@dataclass
class _Ahead:
    """Chunk tasks of round ``rnd`` submitted ahead, waiting on the plane under ``key`` for their jobs."""

    rnd: int
    key: str
    keys: list[str]  # the tasks' Dask keys, which are also their partials' keys on the plane
    futs: dict[str, Future]
    claims: tuple[str, list[tuple[int, int]]] | None = None  # work sharing's table, written ahead


@dataclass
class _Round:
    """A round :meth:`LocalAccelerator.submit` started: what :meth:`~LocalAccelerator.collect` needs."""

    rnd: int
    flat: np.ndarray
    clients: ClientSet
    on_error: str
    slots: list[str]
    served: str  # the params' key on the plane (published, or offered to tasks submitted ahead)
    keys: list[str]  # the chunks' partial keys on the plane
    jobs: list[Any]  # each chunk's tree nodes, or its row of the claims table
    claims: str | None  # work sharing's table of this round, removed after it
    futs: dict[str, Future] = field(default_factory=dict)  # partial key -> the task running that chunk now
    spent: list[Future] = field(default_factory=list)  # tasks that gave up, replaced in futs
    again: set[str] = field(default_factory=set)  # chunks submitted again after their task gave up

    @property
    def early(self) -> list[str]:
        """The keys of partials pushed early (work sharing)."""
        if self.claims is None:
            return []
        return [e for key in self.keys for e in tasks.early_keys(key, len(self.keys))]


class LocalAccelerator:
    """Runs rounds over the data plane for :class:`~flgraph.transports.dask.DaskTransport` (module docstring).

    ``bundle`` is the run's bundle as a Dask future, ``reducer`` its reducer here in the driver, ``hold``
    the executor's way of keeping a round's futures until the next round is submitted.
    """

    def __init__(self, client: Client, bundle: Future, reducer: Any, stage_name: str, token: str,
                 share_work: bool, hold: Callable[[list[Future]], None]) -> None:
        self.client = client
        self.bundle = bundle
        self.reducer = reducer
        self.stage_name = stage_name
        self.token = token
        self.share_work = share_work
        self._hold = hold
        self._count = itertools.count(1)
        self._ahead: _Ahead | None = None
        self.plane = dataplane.DataPlane()

    def _run_id(self) -> str:
        """A fresh run id for a round's own tasks, ``<token>.p<n>`` (tasks submitted ahead get
        ``<token>.a<n>``, by which a waiting task recognises the later rounds' waiting tasks)."""
        return f"{self.token}.p{next(self._count)}"

    def _chunk_key(self, rnd: int, j: int, run: str) -> str:
        return f"{self.stage_name}-r{rnd:05d}-c{j:04d}-{run}"

    def takes(self, n: int, plan: Chunks) -> bool:
        """Rounds whose partials are few enough to travel to the driver (the executor combines more on the
        workers first)."""
        return sum(len(nodes) for nodes in plan) <= FAN_IN

    def submit(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str, plan: Chunks,
               slots: list[str]) -> _Round:
        """Hand the round's jobs to the tasks submitted ahead for it, or submit its chunk tasks now."""
        plane = self.plane
        ahead, self._ahead = self._ahead, None
        if ahead is not None and (ahead.rnd != rnd or len(ahead.keys) != len(plan)
                                  or any(f.status != "pending" for f in ahead.futs.values())):
            self._withdraw(ahead)  # not this round's shape, or a task already gave up: submit afresh
            ahead = None
        run = self._run_id()
        served = ahead.key if ahead is not None else f"broadcast-r{rnd:05d}-{run}"
        jobs, claims = self._share(plan, served, ahead.claims if ahead is not None else None)
        keys = ahead.keys if ahead is not None else [self._chunk_key(rnd, j, run) for j in range(len(plan))]
        h = _Round(rnd, flat, clients, on_error, slots, served, keys, list(jobs), claims)
        plane.expect([*keys, *h.early])
        if ahead is not None:
            h.futs = dict(ahead.futs)
            plane.offer(served, flat, [(rnd, clients, job, on_error) for job in jobs])
        else:
            plane.publish(served, flat)
            h.futs = {key: self._submit_chunk(h, j, key, key) for j, key in enumerate(keys)}
        return h

    def _submit_chunk(self, h: _Round, j: int, result_key: str, dask_key: str) -> Future:
        return self.client.submit(tasks.plane_chunk, self.bundle, (self.plane.endpoint, h.served, result_key),
                                  h.rnd, h.clients, h.jobs[j], h.on_error, key=dask_key,
                                  workers=[h.slots[j % len(h.slots)]], allow_other_workers=True, pure=False)

    def submit_ahead(self, rnd: int, plan: Chunks, slots: list[str]) -> None:
        """Submit round ``rnd``'s chunk tasks now, one per chunk of ``plan`` (the current round's: the next
        is expected to be alike); each waits on its worker for its job. Work sharing's table is written now
        too, off the critical path between the rounds."""
        batch = next(self._count)
        run = f"{self.token}.a{batch}"
        key = f"next-r{rnd:05d}-{run}"
        keys = [self._chunk_key(rnd, j, run) for j in range(len(plan))]
        family = f"-{self.token}.a"
        # priority -rnd: queued on its worker behind any other work, and behind no earlier round's task
        futs = {k: self.client.submit(tasks.ahead_chunk, self.bundle,
                                      (self.plane.endpoint, key, k, j, family, batch), key=k, priority=-rnd,
                                      workers=[slots[j % len(slots)]], allow_other_workers=True, pure=False)
                for j, k in enumerate(keys)}
        self._ahead = _Ahead(rnd, key, keys, futs)
        _, path = self._share(plan, key)
        if path is not None:
            self._ahead.claims = path, [nodes[0] for nodes in plan]

    def collect(self, h: _Round) -> Partial:
        """The round's root partial; its tasks are cancelled if this raises."""
        try:
            return self._assemble(h)
        except BaseException:
            self.client.cancel(list(h.futs.values()), force=True)  # stop the round's remaining work now
            raise
        finally:
            self.plane.retract([h.served, *h.keys, *h.early])
            self._hold([*h.futs.values(), *h.spent])
            if h.claims is not None:
                with contextlib.suppress(OSError):
                    os.unlink(h.claims)

    def _assemble(self, h: _Round) -> Partial:
        """Add the chunks' partials into the round's tree as they arrive over the data plane.

        :class:`flgraph.tree.Incremental` makes the same additions in the same order as
        :func:`flgraph.tree.assemble`, so the root is the same, bit for bit. With work sharing a task also
        pushes nodes early (``<key>#eN``, as many as its final answer says). A chunk's error or cancellation,
        from its Dask future, ends the wait (checked every 50 ms); a task Dask reports done whose partial
        has not come after :data:`PUSH_GRACE_S` is gathered through Dask.
        """
        n = len(h.clients)
        reducer = self.reducer
        inc = tree.Incremental(n, lambda a, b: combine_partials(reducer, a, b), check=True)
        early_of = {e: e.split("#")[0] for e in h.early}
        pending = set(h.keys)  # chunks whose final answer has not come
        owed: dict[str, float] = {}  # early pushes a final answer announced that have not come: since when
        finished_at: dict[str, float] = {}
        pushed: set[str] = set()  # finished tasks that pushed their partial (it has not been read yet)

        def fold(key: str, nodes: tasks.Nodes) -> None:
            try:
                for node, part in nodes:
                    inc.add_node(node, part)
            except ValueError as e:  # cannot happen with one claim per position; rerun rather than guess
                raise LostWork(f"the chunk task {key} sent a partial that does not fit the round: {e}") from e

        def answer(key: str, result: Any) -> None:
            pending.discard(key)
            if isinstance(result, tasks.Sent):  # it sent nodes on early too: those not here yet are owed
                now = time.monotonic()
                owed.update((e, now) for e in (f"{key}#e{i}" for i in range(result.early)) if e in early_of)
                result = result.nodes
            fold(key, result)

        while pending or owed:
            got = self.plane.take([*pending, *early_of], timeout=0.05)
            for k, value in got.items():
                if isinstance(value, str) and value == tasks.NO_WORK:
                    self._again(h, k)
                elif k in early_of:
                    del early_of[k]
                    owed.pop(k, None)
                    fold(k, value)
                else:
                    answer(k, value)
            now = time.monotonic()
            for e, since in owed.items():
                if now - since > ARRIVAL_GRACE_S:
                    raise LostWork(f"the chunk task {e.split('#')[0]} sent early partials that never arrived")
            for key in [k for k in pending if k not in got]:
                fut = h.futs[key]
                if fut.status == "error":
                    gather(self.client, [fut])  # raises the client's error
                    raise ClusterError(f"the chunk task {key} failed")
                if fut.status == "cancelled":
                    raise LostWork(f"the chunk task {key} was cancelled")
                if fut.status != "finished":
                    continue
                since = finished_at.setdefault(key, now)
                if key in pushed:  # it pushed its partial, which is still on its way
                    if now - since > ARRIVAL_GRACE_S:
                        raise LostWork(f"the chunk task {key} pushed its partial, which did not arrive")
                    continue
                if now - since > PUSH_GRACE_S:
                    result = gather(self.client, [fut])[0]  # the task returned its partial: the push failed
                    if isinstance(result, str) and result == tasks.NO_WORK:
                        self._again(h, key)
                        finished_at.pop(key, None)
                    elif result is None:
                        pushed.add(key)
                    else:
                        answer(key, result)
        if inc.covered != n:
            # work sharing: a task that died (its worker with it) had claimed positions no one ran; Dask's
            # rerun of it finds them claimed. Run the round again with a fresh table.
            raise LostWork("clients claimed by a chunk task that did not finish (a worker left)")
        root: Partial = inc.root()
        return root

    def _again(self, h: _Round, key: str) -> None:
        """Submit chunk ``key`` again as an ordinary task: its task submitted ahead gave up waiting after
        the job was offered (other work was queued on its worker, or the wait timed out). Nothing ran, so
        nothing is lost; the new task pushes under the same key."""
        if key in h.again:  # the task said so over the plane and Dask reported it too: submitted once
            self.plane.expect([key])  # still expecting the new task's partial
            return
        h.again.add(key)
        j = h.keys.index(key)
        log.debug("round %d: the chunk task %s gave up waiting for its job; submitting its chunk again",
                  h.rnd, key)
        self.plane.publish(h.served, h.flat)  # offered until now: a plain task fetches it
        self.plane.expect([key])
        h.spent.append(h.futs[key])
        h.futs[key] = self._submit_chunk(h, j, key, self._chunk_key(h.rnd, j, self._run_id()))

    def _share(self, plan: Chunks, served: str, ready: tuple[str, list[tuple[int, int]]] | None = None,
               ) -> tuple[Chunks | list[sharing.Share], str | None]:
        """The chunks' jobs: their nodes, or (work sharing) their rows of a claims table for this round
        attempt; and the table's path, removed after the round. The table is written now unless ``ready``
        (written ahead by :meth:`submit_ahead`) already has these chunks.

        Shared when the chunks are the default ones (one tree node each, more than one chunk)."""
        if not self.share_work or len(plan) < 2 or any(len(nodes) != 1 for nodes in plan):
            if ready is not None:
                with contextlib.suppress(OSError):
                    os.unlink(ready[0])
            return plan, None
        path = os.path.join(self.plane.directory, f"claims-{served}")
        ranges = [nodes[0] for nodes in plan]
        if ready != (path, ranges):
            sharing.Claims.create(path, ranges)
        return [sharing.Share(path, j) for j in range(len(plan))], path

    def cancel_ahead(self) -> None:
        """Withdraw the tasks submitted ahead: they end at once, with nothing done."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            self._withdraw(ahead)

    def _withdraw(self, ahead: _Ahead) -> None:
        self.plane.withdraw(ahead.key)
        self.plane.retract(ahead.keys)
        if ahead.claims is not None:
            with contextlib.suppress(OSError):
                os.unlink(ahead.claims[0])
        with contextlib.suppress(Exception):
            self.client.cancel(list(ahead.futs.values()), force=True)

    def close(self) -> None:
        """Withdraw what waits, close the workers' sockets to the plane, then the plane."""
        self.cancel_ahead()
        with contextlib.suppress(Exception):
            self.client.run(dataplane.forget, self.plane.endpoint)
        self.plane.close()
