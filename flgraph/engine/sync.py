"""The synchronous engine: one round = server stages, the client segment on a transport, reduce, server stages.

The engine never imports torch. A round changes the run state only when it completes: a client error or
a lost cluster leaves the previous round's params, stage states and round counter untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .client_runner import Partial
from .client_state import ClientStateTable
from .context import ClientSet, RoundContext
from .errors import ClientError, PipelineError
from .graph import Segments, ServerStage
from .params import Params

__all__ = ["RunState", "SyncEngine", "Transport", "client_row"]


class Transport(Protocol):
    """Runs a round's client segment somewhere and returns the root partial."""

    def start(self, bundle: Any, flat: np.ndarray) -> float:
        """Ship what does not change between rounds; return the warm-up seconds."""
        ...

    def run_round(self, rnd: int, flat: np.ndarray, clients: ClientSet, on_error: str = "raise") -> Partial:
        """Run the client segment for ``clients`` and return the round's root partial (the fixed tree)."""
        ...

    def map_clients(self, rnd: int, flat: np.ndarray, ids: np.ndarray, fn: Any) -> list[Any]:
        """``fn(work)`` for each client of ``ids``, where it lives; results in the order of ``ids``."""
        ...

    def places(self) -> int:
        """Distinct places the broadcast goes to (workers, agents)."""
        ...

    def close(self) -> None: ...

    # Optional (looked up with getattr): ``plan_ahead(next_round: int | None, prepare=None)``, called before
    # each ``run_round`` with the round that follows it at once (and a function that prepares that round in
    # the driver, e.g. chooses its clients, for the transport to call once while this round's clients
    # train: SyncEngine.lookahead), and ``cancel_ahead()``, called when ``fit`` ends, so that a transport may
    # prepare the next round while one runs and drop what it prepared.


@dataclass
class RunState:
    """Everything that changes between rounds: the round counter, global params, stage states."""

    round: int
    params: Params
    stage_states: dict[str, dict[str, Any]] = field(default_factory=dict)


class SyncEngine:
    """Runs synchronous rounds of a checked pipeline."""

    def __init__(self, segments: Segments, *, seed: int, dataset: Any, model_source: Any) -> None:
        if segments.reduce is None:
            raise PipelineError("the pipeline has no Aggregate stage")
        self.segments = segments
        self.seed = seed
        self.dataset = dataset
        self.model_source = model_source
        # per-client state of stateful client stages: the driver's table and the stage-state key it lives in
        self.client_state: tuple[ClientStateTable, str] | None = None

    @staticmethod
    def state_key(index: int, stage: Any) -> str:
        return f"{index:02d}-{stage.name}"

    @staticmethod
    def initial_states(params: Params, stages: tuple[Any, ...]) -> dict[str, dict[str, Any]]:
        """Every stage's explicit state at the start of a run."""
        return {SyncEngine.state_key(i, s): s.init_state(params) for i, s in enumerate(stages)
                if hasattr(s, "init_state")}

    def run_round(self, state: RunState, rnd: int, last: bool, transport: Transport,
                  keys: dict[int, str], on_error: str = "raise") -> dict[str, Any]:
        """Run round ``rnd``; on success update ``state`` and return the round's metrics row."""
        t_round = time.perf_counter()
        seg = self.segments
        ctx = RoundContext(rnd, self.seed, state.params, self.dataset, self.model_source, last)
        ctx.mapper = lambda fn, ids, flat: transport.map_clients(rnd, flat, ids, fn)
        new_states = {k: dict(v) for k, v in state.stage_states.items()}
        times: dict[str, float] = {}
        for s in seg.before:  # a stage that keeps a virtual clock (Simulate) tells the round its start time
            clock = getattr(s, "clock", None)
            if clock is not None:
                ctx.time = clock(new_states.get(keys[id(s)], {}))
        for s in seg.before:
            self._server(s, ctx, new_states, keys, times)
        if ctx.clients is None:
            raise PipelineError("no stage before the client stages chose clients", fix="start with st.Select(...)")
        table: dict[str, Any] | None = None
        if self.client_state is not None:
            states, skey = self.client_state
            table = new_states.get(skey) or states.initial()
            ctx.clients = states.prepare(ctx.clients, table, rnd)
        plan_ahead = getattr(transport, "plan_ahead", None)  # optional: prepare the next round meanwhile
        if plan_ahead is not None:
            plan_ahead(None if last else rnd + 1, None if last else self.lookahead(rnd + 1))
        t0 = time.perf_counter()
        root = transport.run_round(rnd, ctx.params.flat, ctx.clients, on_error)
        times["time_clients_wall"] = time.perf_counter() - t0
        for s in seg.before:  # e.g. Simulate: advance the virtual clock by the round's simulated time
            hook = getattr(s, "after_clients", None)
            if hook is not None:
                ctx.tag = s.tag
                ctx.state = new_states.setdefault(keys[id(s)], {})
                hook(ctx, root)
        assert seg.reduce is not None
        t0 = time.perf_counter()
        if root.value is None and (root.failures or not root.dropped):
            cid, msg = (root.failures or [(int(ctx.clients.ids[0]), "no update")])[0]
            raise ClientError(f"all {len(ctx.clients)} clients of the round failed; the first: {msg}",
                              client=cid, stage="Aggregate", round=rnd,
                              fix="fix the cause above; the run's state is unchanged")
        if root.value is not None:  # else every client was dropped by the simulation: the model stays
            delta, weight = seg.reduce.reducer.finalize(root.value, ctx.params.spec)
            ctx.state = new_states.get(keys[id(seg.reduce)], {})
            ctx.tag = seg.reduce.tag
            seg.reduce.apply(ctx, delta, weight)
        times["time_aggregate"] = time.perf_counter() - t0
        for s in seg.after:
            self._server(s, ctx, new_states, keys, times)
        if self.client_state is not None and table is not None:
            gone = [c for c, _ in root.failures] + [c for c, _ in root.dropped]
            done = np.flatnonzero(~np.isin(ctx.clients.ids, np.asarray(gone, np.int64)))
            new_states[self.client_state[1]] = ClientStateTable.commit(ctx.clients, done, table, rnd)
        row = self._row(rnd, ctx, root, transport)
        row.update(times)
        row["round_time"] = time.perf_counter() - t_round
        state.params, state.round, state.stage_states = ctx.params, rnd, new_states
        return row

    def lookahead(self, rnd: int) -> Callable[[], None] | None:
        """A function that chooses round ``rnd``'s clients ahead of that round (its Select keeps them for
        it, see :meth:`flgraph.stages.Select.lookahead`), for the transport to call while the round before
        trains; None when no stage before the client segment can choose ahead."""
        selects = [s for s in self.segments.before if hasattr(s, "lookahead")]
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

    @staticmethod
    def _row(rnd: int, ctx: RoundContext, root: Partial, transport: Transport) -> dict[str, Any]:
        row = client_row(rnd, ctx, root.sums, [c for c, _ in root.failures], [c for c, _ in root.dropped])
        row["bytes_broadcast"] = ctx.params.nbytes * transport.places()
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
