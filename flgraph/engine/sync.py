"""The synchronous engine: one round = each branch's server stages, ONE client pass on a transport, the
reducers (and their tiers), each branch's server stages after them.

The engine never imports torch. A round changes the run state only when it completes: a client error or
a lost cluster leaves the previous round's params, stage states and round counter untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _chaos
from ..context import ClientSet, RoundContext, Update
from ..errors import ClientError, ConfigError, PipelineError
from ..graph import Branch, RoundGraph, ServerStage
from ..graph.hooks import ChoosesAhead, KeepsClock
from ..params import Params
from ..store.client_state import ClientStateTable
from .contracts import KnowsClients, PlansAhead, Transport
from .fanout import Consumer, Layout, RoundReducer, combine_groups, merge_cohorts

if TYPE_CHECKING:
    from .clients import Partial

__all__ = ["RunState", "SyncEngine", "branch_row", "client_row", "consumers_of"]


@dataclass
class RunState:
    """Everything that changes between rounds: the round counter, global params, stage states."""

    round: int
    params: Params
    stage_states: dict[str, dict[str, Any]] = field(default_factory=dict)


def consumers_of(graph: RoundGraph) -> tuple[Consumer, ...]:
    """The reducers of the round's client pass: the first tier of each branch's reductions."""
    return tuple(Consumer(b, r.value, r.tiers[0].reducer, tuple(t.by for t in r.tiers if t.by is not None))
                 for b, branch in enumerate(graph.branches) for r in branch.reductions)


class SyncEngine:
    """Runs synchronous rounds of a checked pipeline."""

    def __init__(self, graph: RoundGraph, *, seed: int, dataset: Any, model_source: Any) -> None:
        if graph.reduce is None:
            raise PipelineError("the pipeline has no Aggregate stage")
        self.graph = graph
        self.seed = seed
        self.dataset = dataset
        self.model_source = model_source
        self.consumers = consumers_of(graph)
        self.reducer: RoundReducer | None = None if graph.plain else RoundReducer(self.consumers)
        # per-client state of stateful client stages: the driver's table and the stage-state key it lives in
        self.client_state: tuple[ClientStateTable, str] | None = None

    @property
    def segments(self) -> RoundGraph:
        return self.graph

    def abort(self, transport: Transport) -> None:
        """Nothing to call back: a synchronous round leaves no client work in flight once it returns."""

    @staticmethod
    def state_key(index: int, stage: Any) -> str:
        return f"{index:02d}-{stage.name}"

    @staticmethod
    def initial_states(params: Params, stages: tuple[Any, ...]) -> dict[str, dict[str, Any]]:
        """Every stage's explicit state at the start of a run."""
        return {SyncEngine.state_key(i, s): s.init_state(params) for i, s in enumerate(stages)
                if hasattr(s, "init_state")}

    def broadcast_flat(self, state: RunState, keys: dict[int, str]) -> np.ndarray:
        """What the clients get: the params, then the server values the branches broadcast, in order."""
        extra = [self._value(name, state.stage_states, keys) for b in self.graph.branches for name in b.broadcast]
        return state.params.flat if not extra else np.concatenate([state.params.flat, *extra])

    def _value(self, name: str, states: dict[str, dict[str, Any]], keys: dict[int, str]) -> np.ndarray:
        for b in self.graph.branches:
            for s in b.stages:
                if name in s.keeps:
                    return np.asarray(states[keys[id(s)]][name])
        raise PipelineError(f"no stage keeps the server value {name!r}")

    def run_round(self, state: RunState, rnd: int, last: bool, transport: Transport,
                  keys: dict[int, str], on_error: str = "raise") -> dict[str, Any]:
        """Run round ``rnd``; on success update ``state`` and return the round's metrics row."""
        t_round = time.perf_counter()
        g = self.graph
        new_states = {k: dict(v) for k, v in state.stage_states.items()}
        times: dict[str, float] = {}
        ctxs = [self._before(branch, state, rnd, last, transport, new_states, keys, times) for branch in g.branches]
        main = ctxs[0]
        assert main.clients is not None
        table: dict[str, Any] | None = None
        if self.client_state is not None:
            states, skey = self.client_state
            table = new_states.get(skey) or states.initial()
            main.clients = states.prepare(main.clients, table, rnd)
        clients = main.clients if self.reducer is None else self._layout(ctxs, transport)
        if isinstance(transport, PlansAhead):
            transport.plan_ahead(None if last else rnd + 1, None if last or self.reducer else self.lookahead(rnd + 1))
        t0 = time.perf_counter()
        root = transport.run_round(rnd, self.broadcast_flat(state, keys), clients, on_error)
        times["time_clients_wall"] = time.perf_counter() - t0
        for s in g.before:  # e.g. Simulate: advance the virtual clock by the round's simulated time
            if isinstance(s, KeepsClock):
                main.tag = s.tag
                main.state = new_states.setdefault(keys[id(s)], {})
                s.after_clients(main, root)
        t0 = time.perf_counter()
        _chaos.point("aggregate")
        if root.value is None and (root.failures or not root.dropped):
            cid, msg = (root.failures or [(int(clients.ids[0]), "no update")])[0]
            raise ClientError(f"all {len(clients)} clients of the round failed; the first: {msg}",
                              client=cid, stage="Aggregate", round=rnd,
                              fix="fix the cause above; the run's state is unchanged")
        if self.reducer is None:
            if root.value is not None:  # else every client was dropped by the simulation: the model stays
                reduce = g.reduce
                assert reduce is not None
                delta, weight = reduce.reducer.finalize(root.value, main.params.spec)
                main.state = new_states.get(keys[id(reduce)], {})
                main.tag = reduce.tag
                reduce.apply(main, delta, weight)
        else:
            self._reduce_all(ctxs, root, clients, new_states, keys)
        times["time_aggregate"] = time.perf_counter() - t0
        for branch, ctx in zip(g.branches, ctxs):
            if ctx is not main:
                ctx.params = main.params  # the model the branches' after-stages see is the round's new one
            for s in branch.after:
                self._server(s, ctx, new_states, keys, times)
            if ctx is not main:
                main.params = ctx.params
        if self.client_state is not None and table is not None:
            gone = [c for c, _ in root.failures] + [c for c, _ in root.dropped]
            done = np.flatnonzero(~np.isin(main.clients.ids, np.asarray(gone, np.int64)))
            new_states[self.client_state[1]] = ClientStateTable.commit(main.clients, done, table, rnd)
        row = self._row(rnd, main, root, transport)
        for branch, ctx in zip(g.branches[1:], ctxs[1:]):
            row.update(branch_row(branch.name, ctx, root.sums))
        row.update(times)
        row["round_time"] = time.perf_counter() - t_round
        state.params, state.round, state.stage_states = main.params, rnd, new_states
        return row

    def _before(self, branch: Branch, state: RunState, rnd: int, last: bool, transport: Transport,
                states: dict[str, dict[str, Any]], keys: dict[int, str], times: dict[str, float]) -> RoundContext:
        ctx = RoundContext(rnd, self.seed, state.params, self.dataset, self.model_source, last)
        ctx.mapper = lambda fn, ids, flat: transport.map_clients(rnd, flat, ids, fn)
        ctx.transport = transport  # stages whose protocol talks to the clients in phases (SecAgg) reach it
        if self.reducer is not None:
            ctx.values = {v: self._value(v, states, keys) for b in self.graph.branches for s in b.stages
                          for v in s.keeps}
        for s in branch.before:  # a stage that keeps a virtual clock (Simulate) tells the round its start time
            if isinstance(s, KeepsClock):
                ctx.time = s.clock(states.get(keys[id(s)], {}))
        for s in branch.before:
            self._server(s, ctx, states, keys, times)
        if ctx.clients is None:
            raise PipelineError(f"no stage of branch {branch.name!r} chose clients before its client stages",
                                fix="start the branch with st.Select(...)")
        return ctx

    def _layout(self, ctxs: list[RoundContext], transport: Transport) -> ClientSet:
        parts = [c.clients for c in ctxs if c.clients is not None]
        clients = merge_cohorts(parts) if len(parts) > 1 else parts[0]
        names = {b for c in self.consumers for b in c.bys}
        attributes = {name: group_attribute(self.dataset, clients, name, transport) for name in sorted(names)}
        clients.layout = Layout.of(self.consumers, clients, attributes)
        return clients

    def _reduce_all(self, ctxs: list[RoundContext], root: Partial, clients: ClientSet,
                    states: dict[str, dict[str, Any]], keys: dict[int, str]) -> None:
        """Finish every reduction: finalize its slots (tiers above the first here), then apply the model
        step or record the aggregate for the server stages after it."""
        assert self.reducer is not None
        spec = ctxs[0].params.spec
        slots = self.reducer.finish(root.value, clients.layout)
        k = 0
        for b, branch in enumerate(self.graph.branches):
            ctx = ctxs[b]
            for r in branch.reductions:
                parts = {key: v for (kk, key), v in slots.items() if kk == k}
                k += 1
                if not parts:
                    continue  # every client of this reducer failed or was dropped
                if len(r.tiers) == 1:
                    acc, holder = parts[()], r.tiers[0].reducer
                else:
                    acc, holder = combine_groups(parts, [t.reducer for t in r.tiers], spec, _group_update)
                result, weight = holder.finalize(acc, spec)
                stage = r.stage
                if r.value == "update":
                    ctx.state = states.get(keys[id(stage)], {})
                    ctx.tag = stage.tag
                    stage.apply(ctx, result, weight)
                    if ctx is not ctxs[0]:
                        ctxs[0].params = ctx.params
                elif holder.yields_metrics:
                    ctx.metrics.update(result)
                    ctx.aggregates[r.value] = (result, weight)
                else:
                    ctx.aggregates[r.value] = (result, weight)

    def lookahead(self, rnd: int) -> Callable[[], None] | None:
        """A function that chooses round ``rnd``'s clients ahead of that round (its Select keeps them for
        it, see :meth:`flgraph.stages.Select.lookahead`), for the transport to call while the round before
        trains; None when no stage before the client segment can choose ahead."""
        selects = [s for s in self.graph.before if isinstance(s, ChoosesAhead)]
        if not selects:
            return None

        def choose() -> None:
            for s in selects:
                s.lookahead(rnd, self.seed, self.dataset)

        return choose

    def _server(self, s: ServerStage, ctx: RoundContext, states: dict[str, dict[str, Any]],
                keys: dict[int, str], times: dict[str, float]) -> None:
        t0 = time.perf_counter()
        ctx.tag = s.tag
        ctx.state = states.setdefault(keys[id(s)], {})
        s.run(ctx)
        times[f"time_{s.name}"] = times.get(f"time_{s.name}", 0.0) + time.perf_counter() - t0

    def _row(self, rnd: int, ctx: RoundContext, root: Partial, transport: Transport) -> dict[str, Any]:
        row = client_row(rnd, ctx, root.sums, [c for c, _ in root.failures], [c for c, _ in root.dropped])
        row["bytes_broadcast"] = ctx.params.nbytes * transport.places()
        return row


def _group_update(delta: Any, weight: float) -> Update:
    """A group's finalized result as the next tier's input (its weight: the group's total weight)."""
    return Update(-1, round(weight), -1, np.asarray(delta))


def group_attribute(dataset: Any, clients: ClientSet, name: str, transport: Any = None) -> np.ndarray:
    """Attribute ``name`` of the round's clients: a per-client setting of the ClientSet, else what the
    transport knows of its clients (an edge agent's announced ``device`` fields: :class:`KnowsClients`),
    else the dataset's client attribute (:meth:`flgraph.data.FederatedDataset.attribute`)."""
    if name in clients.settings:
        return np.asarray(clients.settings[name])
    if isinstance(transport, KnowsClients):
        known = transport.client_attribute(name, clients.ids)
        if known is not None:
            return np.asarray(known, dtype=object)
    try:
        return np.asarray(dataset.attribute(name, clients.ids))
    except (AttributeError, KeyError) as e:
        raise ConfigError(f"Aggregate(by={name!r}): the clients have no attribute {name!r}",
                          fix=f"give the dataset one: data.with_attributes({name}=array_or_function)") from e


def branch_row(name: str, ctx: RoundContext, sums: dict[str, float]) -> dict[str, Any]:
    """A parallel branch's figures, each under ``<branch>/``: its clients' sums and its stages' metrics."""
    prefix = f"{name}/"
    own = {k[len(prefix):]: v for k, v in sums.items() if k.startswith(prefix)}
    samples = own.get("samples", 0.0)
    row: dict[str, Any] = {}
    for k, v in own.items():
        if k.startswith("wsum_") and samples:
            row[prefix + k[5:]] = v / samples
    row.update({prefix + k: v for k, v in ctx.metrics.items()})
    row[prefix + "clients_done"] = int(own.get("clients_done", 0))
    row[prefix + "clients_failed"] = int(own.get("clients_failed", 0))
    row[prefix + "samples"] = int(samples)
    return row


def client_row(rnd: int, ctx: RoundContext, sums: dict[str, float], failed: list[int],
               dropped: list[int]) -> dict[str, Any]:
    """A round's (or a server step's) metrics row from the summed client metrics and the server stages'."""
    samples = sums.get("samples", 0.0)
    row: dict[str, Any] = {"round": rnd}
    for k, v in sums.items():
        if k.startswith("wsum_") and samples:
            row[k[5:]] = v / samples  # sample-weighted means of the clients' own metrics (loss, steps, ...)
    row.update(ctx.metrics)
    row["clients_done"] = int(sums.get("clients_done", 0))
    row["clients_failed"] = len(failed)
    row["clients_dropped"] = len(dropped)
    if failed:
        row["failed_clients"] = failed
    if dropped:
        row["dropped_clients"] = dropped
    row["samples"] = int(samples)
    row["bytes_up"] = int(sums.get("bytes_up", 0))
    row["bytes_up_raw"] = int(sums.get("bytes_up_raw", 0))
    for k, v in sums.items():
        if k.startswith("time_"):
            row[k] = v
    return row
