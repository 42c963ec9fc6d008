"""Run the client segment of a round for a range of clients and reduce it to partials.

This is what a Dask chunk task (or, later, an edge agent) executes: for each client position of a tree
node, the client stages in order, then the reducer's ``leaf``; leaves are combined along the round's fixed
tree (:mod:`flgraph.tree`), so a chunk returns one :class:`Partial` per node it covers, never a list of
updates: memory stays O(model), not O(clients x model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import _chaos, tree
from ..context import ClientSet, ClientWork, Update
from ..errors import ClientError, FlgraphError
from ..graph import ClientStage, Reducer
from ..local.sharing import Share, run_shared
from ..params import Params, ParamSpec
from ..store.client_state import ROW, ClientStateStore, ClientStateView
from .blocks import BlockRunner, Started, block_stage
from .fanout import RoundReducer

__all__ = ["Bundle", "Partial", "client_leaf", "combine_partials", "finish_times", "hold_clients", "map_chunk",
           "one_client", "reduce_held", "run_clients"]

log = logging.getLogger("flgraph")
OnError = Literal["raise", "drop"]


@dataclass
class Bundle:
    """Everything a client needs that does not change between rounds (shipped once per run)."""

    stages: tuple[ClientStage, ...]
    reducer: Reducer
    dataset: Any
    model_source: Any
    spec: ParamSpec
    seed: int
    client_state: ClientStateStore | None = None  # per-client state of stateful client stages, if any
    state_fields: list[tuple[int, dict[str, tuple[str, int]]]] = field(default_factory=list)
    # A round with parallel branches: each branch's client stages and name (``stages`` is the main one's).
    branch_stages: tuple[tuple[ClientStage, ...], ...] = ()
    branch_names: tuple[str, ...] = ()
    # Server values broadcast after the params in the round's flat buffer: (name, size), in order.
    broadcast: tuple[tuple[str, int], ...] = ()

    def view(self, clients: ClientSet, pos: int, rnd: int) -> ClientStateView | None:
        """The client's state for this round (``None`` when no stage keeps per-client state)."""
        if self.client_state is None or ROW not in clients.settings:
            return None
        if clients.branch is not None and clients.branch[pos] != 0:
            return None  # per-client state is kept by the main branch's stages only
        return ClientStateView(self.client_state, clients, pos, rnd)

    def global_params(self, flat: np.ndarray) -> tuple[Params, dict[str, np.ndarray]]:
        """The round's params and the other server values broadcast with them (views of ``flat``)."""
        if not self.broadcast:
            return Params(self.spec, flat), {}
        n = self.spec.size
        values, at = {}, n
        for name, size in self.broadcast:
            values[name] = flat[at : at + size]
            at += size
        return Params(self.spec, flat[:n]), values


@dataclass
class Partial:
    """The reduction of some clients: the reducer's value, metric sums and maxima, failures and dropouts.

    ``failures`` are clients whose work raised (``on_client_error="drop"``); ``dropped`` are clients the
    device simulation left out (a deadline, going offline, over-selection), each with the reason.
    """

    value: Any
    sums: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    maxes: dict[str, float] = field(default_factory=dict)


def combine_partials(reducer: Reducer, left: Partial, right: Partial) -> Partial:
    """Combine two partials (left is reused)."""
    if left.value is None:
        left.value = right.value
    elif right.value is not None:
        left.value = reducer.combine(left.value, right.value)
    for k, v in right.sums.items():
        left.sums[k] = left.sums.get(k, 0.0) + v
    for k, v in right.maxes.items():
        left.maxes[k] = max(left.maxes.get(k, v), v)
    left.failures += right.failures
    left.dropped += right.dropped
    return left


def _as_client_error(e: BaseException, client: int, stage: ClientStage, rnd: int) -> ClientError:
    if isinstance(e, ClientError):
        return e
    if isinstance(e, FlgraphError):
        return ClientError(e.message, client=client, stage=type(stage).__name__, round=rnd, fix=e.fix)
    return ClientError(f"{type(e).__name__}: {e}", client=client, stage=type(stage).__name__, round=rnd)


def _sim_finish(bundle: Bundle, clients: ClientSet, pos: int, update: Update) -> float | None:
    """The client's simulated finish time in the round (seconds after the round's start), if simulated."""
    dev = clients.devices
    if dev is None:
        return None
    samples = update.metrics.get("samples_processed")
    if samples is None:
        epochs = clients.setting("epochs", pos) if "epochs" in clients.settings else 1
        samples = float(epochs or 1) * update.num_samples
    return dev.finish(pos, bundle.spec.nbytes, float(samples), update.upload_nbytes)


def client_leaf(bundle: Bundle, gp: Params, rnd: int, clients: ClientSet, pos: int, on_error: OnError,
                reduce: bool = True, values: dict[str, np.ndarray] | None = None,
                started: Started | None = None) -> Partial:
    """One client: its stages, then (``reduce``) the reducer's leaf, or a dropout/failure record.

    With ``reduce=False`` the partial's value is the Update itself (for selection after training).
    ``started``: the client's first stages already ran in a block (:mod:`flgraph.engine.blocks`); the
    rest run here.
    """
    _chaos.point("client-work")
    cid = int(clients.ids[pos])
    branch = 0 if clients.branch is None else int(clients.branch[pos])
    stages = bundle.stages if branch == 0 else bundle.branch_stages[branch]
    if started is None:
        work = ClientWork(rnd, cid, pos, bundle.seed, gp, bundle.dataset, clients, bundle.model_source)
        if values:
            work.values = values
        sums: dict[str, float] = {}
        t_start = time.perf_counter()
    else:
        work, sums, t_start = started.work, started.sums, started.t_start
        stages = stages[started.next_stage:]
    stage = stages[0] if stages else bundle.stages[-1]
    try:
        if started is None:
            work.state = bundle.view(clients, pos, rnd)
        elif started.error is not None:
            stage = started.failed or stage
            raise started.error
        for stage in stages:
            work.tag = stage.tag
            t0 = time.perf_counter()
            stage.run(work)
            sums[f"time_{stage.name}"] = time.perf_counter() - t0
        if work.state is not None:
            work.state.finish(bundle.state_fields)
        update = work.update
        if work.outputs:  # several per-client values: the update (or the first value) carries them all
            outputs = dict(work.outputs)
            if update is not None:
                outputs["update"] = update
            update = outputs.get("update") or next(iter(outputs.values()))
            update.extras = outputs
        if update is None:
            raise ClientError("no client stage produced an update", client=cid,
                              stage=type(stage).__name__, round=rnd, fix="put LocalTrain in the pipeline")
        if branch:
            return _branch_leaf(bundle, update, clients, pos, branch, sums, reduce)
        finish = _sim_finish(bundle, clients, pos, update)
        maxes = {"finish": finish if finish is not None else time.perf_counter() - t_start}
        dev = clients.devices
        if finish is not None and dev is not None:
            if dev.max_samples is not None and update.metrics.get("samples_processed", 1.0) <= 0:
                return Partial(None, {"clients_dropped": 1.0}, dropped=[(cid, "too slow to train before the "
                               "deadline")], maxes={})
            if dev.deadline is not None and finish > float(dev.deadline[pos]):
                return Partial(None, {"clients_dropped": 1.0}, dropped=[(cid, f"missed the deadline "
                               f"({finish:.1f} s > {float(dev.deadline[pos]):.1f} s)")], maxes={})
            if finish > float(dev.online_until[pos]):
                return Partial(None, {"clients_dropped": 1.0}, dropped=[(cid, "went offline mid-round")], maxes={})
        up = float(update.upload_nbytes)
        sums.update(clients_done=1.0, samples=float(update.num_samples), bytes_up=up,
                    bytes_up_raw=float(update.raw_nbytes or up))
        n = float(update.num_samples)
        for k, v in update.metrics.items():
            sums[f"wsum_{k}"] = float(v) * n
        value = reducer_leaf(bundle, update, clients, pos) if reduce else update
    except Exception as e:
        err = _as_client_error(e, cid, stage, rnd)
        if branch:
            err.message = f"branch {bundle.branch_names[branch]!r}: {err.message}"
        if on_error == "raise":
            raise err from (None if e is err else e)
        log.warning("dropped: %s", err)
        failed = f"{bundle.branch_names[branch]}/clients_failed" if branch else "clients_failed"
        return Partial(None, {failed: 1.0}, [(cid, str(err))])
    return Partial(value, sums, maxes=maxes)


def _branch_leaf(bundle: Bundle, update: Update, clients: ClientSet, pos: int, branch: int,
                 times: dict[str, float], reduce: bool) -> Partial:
    """A parallel branch's client: its figures go under ``<branch>/`` (no device simulation there)."""
    prefix = f"{bundle.branch_names[branch]}/"
    n = float(update.num_samples)
    sums = {prefix + k: v for k, v in times.items()}
    sums.update({prefix + "clients_done": 1.0, prefix + "samples": n})
    for k, v in update.metrics.items():
        sums[f"{prefix}wsum_{k}"] = float(v) * n
    return Partial(reducer_leaf(bundle, update, clients, pos) if reduce else update, sums, maxes={})


def reducer_leaf(bundle: Bundle, update: Update, clients: ClientSet | None, pos: int) -> Any:
    """The reducer's leaf for the client at ``pos`` (may consume the update's buffers)."""
    if isinstance(bundle.reducer, RoundReducer):
        assert clients is not None
        return bundle.reducer.leaf_at(update, bundle.spec, clients, pos)
    return bundle.reducer.leaf(update, bundle.spec)


def run_clients(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet,
                nodes: Sequence[tuple[int, int]] | Share, on_error: OnError = "raise",
                emit: Callable[[list[tuple[tuple[int, int], Partial]]], bool] | None = None,
                ) -> list[tuple[tuple[int, int], Partial]]:
    """Run the client stages for every position in ``nodes`` and reduce each node to a Partial.

    Leaves are combined as they are produced (memory: O(log n) partials). ``on_error="raise"`` re-raises
    the first client failure as a ClientError; ``"drop"`` records it. With a :class:`~flgraph.local.sharing.Share`
    instead of nodes, the positions are claimed from the round's shared table (:mod:`flgraph.local.sharing`)
    and the nodes returned are those that cover the positions this call ran, less those sent on early
    through ``emit`` (see :func:`~flgraph.local.sharing.run_shared`).
    """
    gp, values = bundle.global_params(global_flat)

    def combine(a: Partial, b: Partial) -> Partial:
        return combine_partials(bundle.reducer, a, b)

    index = block_stage(bundle.stages) if clients.branch is None else None
    if index is None:
        def leaf(p: int) -> Partial:
            return client_leaf(bundle, gp, rnd, clients, p, on_error, values=values)
    else:  # a stage trains blocks of clients at once; each client is still its own leaf of the tree
        blocks = BlockRunner(bundle, gp, values, rnd, clients, index)

        def leaf(p: int) -> Partial:
            return client_leaf(bundle, gp, rnd, clients, p, on_error, values=values, started=blocks.take(p))

    if isinstance(nodes, Share):
        return run_shared(nodes, len(clients), leaf, combine, emit)
    return [((lo, hi), tree.evaluate(lo, hi, leaf, combine)) for lo, hi in nodes]


def one_client(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet,
               on_error: OnError = "raise") -> Partial:
    """The leaf Partial of the single client in ``clients`` (the asynchronous engine's task)."""
    return client_leaf(bundle, Params(bundle.spec, global_flat), rnd, clients, 0, on_error)


def hold_clients(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet, a: int, b: int,
                 on_error: OnError = "raise") -> dict[int, Partial]:
    """Phase 1 of selection after training: run positions ``a:b`` and keep their updates (not reduced)."""
    gp, values = bundle.global_params(global_flat)
    index = block_stage(bundle.stages) if clients.branch is None else None
    blocks = BlockRunner(bundle, gp, values, rnd, clients, index) if index is not None else None
    return {p: client_leaf(bundle, gp, rnd, clients, p, on_error, reduce=False, values=values,
                           started=blocks.take(p) if blocks is not None else None) for p in range(a, b)}


def finish_times(held: dict[int, Partial]) -> list[tuple[int, float]]:
    """(position, finish time) of the held clients that produced an update."""
    return [(p, part.maxes["finish"]) for p, part in held.items() if part.value is not None]


def reduce_held(bundle: Bundle, held: dict[int, Partial], keep: frozenset[int], n: int,
                nodes: Sequence[tuple[int, int]], reason: str, clients: ClientSet | None = None,
                ) -> list[tuple[tuple[int, int], Partial]]:
    """Phase 2: reduce the kept positions along the round's tree; the others become dropouts."""

    def leaf(p: int) -> Partial:
        part = held[p]
        if part.value is None:
            return part
        if p not in keep:
            cid = int(part.value.client)
            return Partial(None, {"clients_dropped": 1.0}, dropped=[(cid, reason)])
        part.value = reducer_leaf(bundle, part.value, clients, p)
        return part

    def combine(a: Partial, b: Partial) -> Partial:
        return combine_partials(bundle.reducer, a, b)

    return [((lo, hi), tree.evaluate(lo, hi, leaf, combine)) for lo, hi in nodes]


def map_chunk(bundle: Bundle, global_flat: np.ndarray, rnd: int, clients: ClientSet, a: int, b: int,
              fn: Callable[[ClientWork], Any]) -> list[Any]:
    """``fn(work)`` for the clients at positions ``a:b`` (client work outside the round's segment)."""
    gp = Params(bundle.spec, global_flat)
    out = []
    for pos in range(a, b):
        cid = int(clients.ids[pos])
        work = ClientWork(rnd, cid, pos, bundle.seed, gp, bundle.dataset, clients, bundle.model_source)
        try:
            out.append(fn(work))
        except ClientError:
            raise
        except Exception as e:
            raise ClientError(f"{type(e).__name__}: {e}", client=cid, stage=getattr(fn, "__qualname__", "fn"),
                              round=rnd) from e
    return out
