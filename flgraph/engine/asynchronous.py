"""The asynchronous engine (FedBuff): ``concurrency`` clients in flight, a server step every K updates.

Each dispatched client trains from the global version current at its dispatch and takes a simulated
duration (its device's download + compute + upload, with the real byte counts; without a ``Simulate``
stage every device trains one sample per virtual second and transfers instantly). Arrivals are processed
in virtual-clock order, ``(finish time, dispatch index)``, never in real completion order: a completed
update is processed only once no client still running could finish before it (its lower bound is its
start plus its download time). So an asynchronous run with the same seed is bit-identical whatever the
number of workers. After each processed arrival a new client is dispatched at that virtual time, with
the then-current version. ``run_round`` returns when the server has stepped once.

A dispatch's draw costs O(clients in flight), not O(population): without ``available=`` an index is
drawn over the free clients and mapped past the busy ones; with ``available=`` over more than 100,000
clients, candidates are checked in the dispatch's seeded random order until one is available and free
(the exact path, a mask over every free client, serves smaller populations and the case of few clients
available).

The engine never imports torch. Its state (buffer, clock, dispatch counter, clients in flight) is
explicit in the BufferedAggregate stage's state, so checkpoints hold it; after a resume the clients that
were in flight are dispatched again (from the current version) and none is counted twice.

The engine talks to its transport through ``publish(version, flat)`` (a handle for a global version),
``submit_client(handle, rnd, clients, on_error, idx)`` (a future whose ``result()`` is the client's leaf
Partial), ``release(handles)`` and ``completion()`` (an object with ``add(future)`` whose ``next()``
returns the next completed future: ``distributed.as_completed`` for Dask).

**Real time (edge agents).** A transport with ``realtime = True`` (:class:`~flgraph.transports.zmq.ZmqTransport`)
runs clients on real devices, whose durations are not simulated. Then arrivals are processed in real
arrival order, the clock is real seconds since the run's first dispatch (continued from the checkpointed
clock after a resume), so ``sim_time`` and ``sim_round_time`` in the history are real seconds, and there
is no lower-bound check. A client is drawn only among those whose agent is connected and idle
(``transport.ready_clients``), waiting for one if none is (bounded by the transport's deadline), and a
client re-dispatched after a resume whose agent is not free is replaced by a free one (same dispatch
index). Such a run is NOT bit-reproducible: which client arrives first, and so which clients are drawn
and which version each starts from, depend on the devices and the network. Asynchronous runs on Dask
(simulated clients) remain bit-identical whatever the number of workers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _chaos
from ..context import ClientSet, Devices, RoundContext
from ..errors import ConfigError, PipelineError
from ..graph import RoundGraph
from ..params import Params
from ..rng import stream
from . import client_row
from .clients import Partial

__all__ = ["AsyncEngine"]


_VERSION = "model_of_version_"  # + the version: a model clients in flight started from (stage state)

@dataclass
class _Flight:
    idx: int
    client: int
    version: int
    start: float
    lower: float
    future: Any = None  # the transport's future (a distributed.Future, an EdgeFuture)
    result: Partial | None = None
    arrived: float = 0.0  # real time mode: the clock when the result was received


class AsyncEngine:
    """Runs asynchronous server steps of a pipeline whose reduce stage is a BufferedAggregate."""

    def __init__(self, segments: RoundGraph, *, seed: int, dataset: Any, model_source: Any) -> None:
        from ..stages import Select, Simulate

        if not segments.plain:
            raise PipelineError(f"the asynchronous engine steps the model from one buffered reducer; this graph "
                                f"has {', '.join(segments.features())}",
                                fix="use a synchronous Aggregate for fan-outs, branches and tiers")
        self.segments = segments
        self.seed = seed
        self.dataset = dataset
        self.model_source = model_source
        self.stage: Any = segments.reduce
        sel = [s for s in segments.before if isinstance(s, Select)]
        if not sel:
            raise ConfigError("an asynchronous pipeline needs a Select stage: its clients= is the concurrency")
        self.select = sel[0]
        from ..stages.select import EXACT_AVAILABILITY_UP_TO

        self._exact_up_to = EXACT_AVAILABILITY_UP_TO  # above it, dispatches draw available clients sparsely
        if self.select.over_select > 1.0 or self.select.sampler is not None:
            raise ConfigError("asynchronous runs draw clients uniformly one at a time",
                              fix="use st.Select(clients=CONCURRENCY) without sampler= or over_select=")
        blocked = [(s, getattr(s, "clients_at_once", 1)) for s in segments.clients]
        blocked = [(s, b) for s, b in blocked if b > 1]
        if blocked:
            raise ConfigError(f"{type(blocked[0][0]).__name__}(clients_at_once={blocked[0][1]}): an "
                              "asynchronous run dispatches one client per task, so no block of clients trains "
                              "at once", fix="drop clients_at_once= (or use a synchronous Aggregate)")
        sims = [s for s in segments.before if isinstance(s, Simulate)]
        self.simulate: Any = sims[0] if sims else None
        if self.simulate is not None and self.simulate.deadline is not None:
            raise ConfigError("deadlines apply to synchronous rounds", fix="use Simulate(devices) without deadline=")
        self.concurrency = self.select.count(dataset.num_clients)
        if self.concurrency >= dataset.num_clients:
            raise ConfigError(f"concurrency {self.concurrency} needs more clients than the dataset's "
                              f"{dataset.num_clients}", fix="keep fewer clients in flight")
        from ..stages import LocalTrain

        trains = [s for s in segments.clients if isinstance(s, LocalTrain)]
        self.train: Any = trains[0] if len(trains) == 1 and trains[0].steps is None else None
        self.flights: dict[int, _Flight] = {}
        self.client_state: Any = None  # per-client state is kept by synchronous rounds only (Run refuses it here)
        self.reducer: Any = None  # one reducer, the buffered stage's own
        self.versions: dict[int, Any] = {}
        self.version_flats: dict[int, np.ndarray] = {}  # the params of each version in self.versions
        self.completed: Any = None
        self.spec = None
        self.realtime = False  # set from the transport at each step
        self._t0: float | None = None  # real time mode: time.monotonic() at this engine's first dispatch
        self._clock0 = 0.0  # and the run's clock then (0, or the checkpointed clock after a resume)

    def check_transport(self, transport: Any) -> None:
        """Refuse, before anything runs, a transport this engine cannot dispatch clients through."""
        missing = [m for m in ("publish", "submit_client", "release", "completion")
                   if not callable(getattr(transport, m, None))]
        if missing:
            raise ConfigError(f"{type(transport).__name__} serves synchronous rounds only; the asynchronous engine "
                              f"({type(self.stage).__name__}) dispatches clients one by one through "
                              f"publish/submit_client/release/completion, and it lacks {', '.join(missing)}",
                              fix="run asynchronous pipelines on Dask (no transport=) or on edge agents alone "
                                  "(ZmqTransport), or use a synchronous Aggregate with this transport")
        if getattr(transport, "realtime", False) and self.simulate is not None:
            raise ConfigError(f"{type(transport).__name__} runs clients on real devices, in real time; "
                              "Simulate's devices would not time them",
                              fix="drop st.Simulate(...) (recipes.fedbuff without devices=) for edge runs")

    @staticmethod
    def state_key(index: int, stage: Any) -> str:
        return f"{index:02d}-{stage.name}"

    # -- dispatch ------------------------------------------------------------------------------------
    def _clock(self) -> float:
        """Real time mode: seconds since this run's first dispatch (continuing a resumed run's clock)."""
        if self._t0 is None:
            return self._clock0
        return self._clock0 + time.monotonic() - self._t0

    def _version_future(self, transport: Any, version: int, params: Params) -> Any:
        if version not in self.versions:
            self.versions[version] = transport.publish(version, params.flat)
            self.version_flats[version] = params.flat  # never changed in place: no copy
        return self.versions[version]

    def _release_versions(self, transport: Any, current: int) -> None:
        used = {f.version for f in self.flights.values()} | {current}
        old = [v for v in self.versions if v not in used]
        for v in old:
            self.version_flats.pop(v, None)
        if old:
            transport.release([self.versions.pop(v) for v in old])

    def _devices(self, cid: int, start: float) -> tuple[Devices | None, float]:
        """The dispatched client's simulated device and a lower bound on its finish time."""
        if self.realtime:  # a real device: nothing simulated, no lower bound
            return None, start
        one = np.ones(1)
        if self.simulate is None:  # a unit-speed device with an instant link: time counts samples trained
            return Devices(one, one * math.inf, one * math.inf, one * math.inf), start + self._min_samples(cid)
        p = self.simulate.devices.profile(cid)
        dev = Devices(one * p.speed, one * p.down_bps, one * p.up_bps, one * (p.online_until(start) - start))
        down = float(self.spec.nbytes) / p.down_bps if self.spec is not None else 0.0
        return dev, start + down + self._min_samples(cid) / p.speed

    def _min_samples(self, cid: int) -> float:
        """A lower bound on the samples the client trains on (0 when it cannot be known in advance)."""
        if self.train is None:
            return 0.0
        n = self.dataset.num_samples(cid)
        kept = math.floor(n * (1.0 - float(getattr(self.train, "holdout", 0.0)))) - 1
        return float(self.train.epochs * max(kept, 0))

    def _dispatch(self, transport: Any, state: dict[str, Any], params: Params, version: int, at: float,
                  on_error: str, idx: int | None = None, cid: int | None = None) -> None:
        if self.realtime:
            if self._t0 is None:
                self._t0, self._clock0 = time.monotonic(), float(state["time"])
            if cid is not None and (any(f.client == cid for f in self.flights.values())
                                    or not len(transport.ready_clients(np.array([cid], np.int64), wait=False))):
                cid = None  # re-dispatched after a resume, but its agent is away or busy: draw a free one
        if idx is None:
            idx = int(state["dispatched"])
            state["dispatched"] = idx + 1
        if cid is None:
            cid = self._draw(transport, idx, at)
        if self.realtime:
            at = self._clock()  # after any wait for a free agent
        devices, lower = self._devices(cid, at)
        clients = ClientSet(np.array([cid], np.int64), devices=devices)
        fut = transport.submit_client(self._version_future(transport, version, params), idx + 1, clients,
                                      on_error, idx)
        self.flights[idx] = _Flight(idx, cid, version, at, lower, fut)
        self.completed.add(fut)

    def _draw(self, transport: Any, idx: int, at: float) -> int:
        """Dispatch ``idx``'s client, drawn by Select among those not in flight (available; real time: idle
        agents)."""
        population = self.dataset.client_ids
        busy = np.fromiter((f.client for f in self.flights.values()), np.int64, len(self.flights))
        when = at if self.simulate is not None else None
        if not self.realtime and self.select.sampler is None:
            if self.select.available is None:
                return _free_draw(self.select, population, busy, self.seed, idx)
            if len(population) > self._exact_up_to:
                got = _available_free_draw(self.select, population, busy, self.seed, idx, when)
                if got is not None:
                    return got
        if self.realtime and hasattr(transport, "idle_clients"):
            got = self._idle_draw(transport, population, busy, idx, when)
            if got is not None:
                return got
        # the exact path: every free client checked (small populations, few clients available, no idle agent)
        free = population[~np.isin(population, busy)]
        if self.select.available is not None:  # draw from those available at the dispatch's start
            here = free[self.select.available_mask(free, idx + 1, when)]
            free = here if len(here) else free  # none: an offline client is dispatched, and dropped
        if self.realtime:
            free = transport.ready_clients(free)  # waits (bounded) for an agent to be free
        return int(self.select.draw(free, 1, seed=self.seed, dispatch=idx).ids[0])

    def _idle_draw(self, transport: Any, population: np.ndarray, busy: np.ndarray, idx: int,
                   when: float | None) -> int | None:
        """Real time: the exact path's draw, made from the idle agents' clients (O(agents)) rather than from
        the population, whenever one of them can be drawn; None (then the exact path waits for one) otherwise.

        The exact path draws among ``free ∩ available ∩ idle`` (in id order) whenever that set is not empty;
        this is that set, built from the idle side, so the same seed gives the same client.
        """
        idle = np.asarray(transport.idle_clients(), np.int64)  # sorted ids of connected agents without a task
        at = np.searchsorted(population, idle)
        ready = idle[(at < len(population)) & (population[np.minimum(at, len(population) - 1)] == idle)]
        ready = ready[~np.isin(ready, busy)]
        if self.select.available is not None and len(ready):
            ready = ready[self.select.available_mask(ready, idx + 1, when)]
        if not len(ready):
            return None
        return int(self.select.draw(ready, 1, seed=self.seed, dispatch=idx).ids[0])

    # -- one server step -----------------------------------------------------------------------------
    def run_round(self, state_obj: Any, rnd: int, last: bool, transport: Any, keys: dict[int, str],
                  on_error: str = "raise") -> dict[str, Any]:
        """Process arrivals until the server steps once (server step ``rnd``); return its metrics row."""
        t_round = time.perf_counter()
        self.spec = state_obj.params.spec
        key = keys[id(self.stage)]
        st = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in state_obj.stage_states[key].items()}
        st.setdefault("time", 0.0)
        st.setdefault("dispatched", 0)
        version = state_obj.round
        params = state_obj.params
        self.realtime = bool(getattr(transport, "realtime", False))
        if self.completed is None:
            self.completed = transport.completion()
        try:
            if not self.flights:  # first step, or after a resume: (re)fill the flight
                for fl in np.asarray(st.get("inflight", np.zeros((0, 4)))).reshape(-1, 4):
                    was = int(fl[2])  # a client in flight trains again on the model it started from
                    began = params if f"{_VERSION}{was}" not in st else Params(params.spec, st[f"{_VERSION}{was}"])
                    self._dispatch(transport, st, began, was if began is not params else version, float(fl[3]),
                                   on_error, idx=int(fl[0]), cid=int(fl[1]))
                while len(self.flights) < self.concurrency:
                    self._dispatch(transport, st, params, version, float(st["time"]), on_error)
            sums: dict[str, float] = {}
            stale: list[int] = []
            dropped_stale = 0
            failed: list[int] = []
            dropped: list[int] = []
            arrivals: list[int] = []
            dispatched_before = int(st["dispatched"])
            step_start = float(st["time"])
            while not self.stage.full(st):
                flight = self._next_safe()
                if flight is None:
                    self._wait_one()
                    continue
                part = flight.result
                assert part is not None
                del self.flights[flight.idx]
                arrivals.append(flight.idx)
                finish = self._finish(flight)
                if not self.realtime and finish < flight.lower - 1e-9:
                    raise ConfigError(
                        f"client {flight.client} finished at virtual time {finish:.3f}, before its lower bound "
                        f"{flight.lower:.3f}: it trained on fewer samples than LocalTrain(epochs=...) implies, "
                        "which would break the virtual-clock order",
                        fix="report the real count as metrics['samples_processed'] from train_fn, at least "
                            "epochs x the client's samples, or use LocalTrain(steps=...)")
                st["time"] = max(float(st["time"]), finish)
                failed += [c for c, _ in part.failures]
                dropped += [c for c, _ in part.dropped]
                accepted = part.value is not None and self.stage.add(st, part.value, version - flight.version)
                if accepted:
                    stale.append(version - flight.version)
                elif part.value is not None:
                    dropped_stale += 1  # too stale: its work is timed, its update and metrics are not used
                for k, v in part.sums.items():
                    if accepted or part.value is None or k.startswith("time_"):
                        sums[k] = sums.get(k, 0.0) + v
                if not self.stage.full(st):
                    self._dispatch(transport, st, params, version, float(st["time"]), on_error)
            ctx = RoundContext(rnd, self.seed, params, self.dataset, self.model_source, last)
            ctx.mapper = lambda fn, ids, flat: transport.map_clients(rnd, flat, ids, fn)
            ctx.tag = self.stage.tag
            t0 = time.perf_counter()
            _chaos.point("aggregate")
            self.stage.step(ctx, st)
            t_agg = time.perf_counter() - t0
            new_version = version + 1
            # the client that filled the buffer is replaced with the new model
            self._dispatch(transport, st, ctx.params, new_version, float(st["time"]), on_error)
            new_states = {k: dict(v) for k, v in state_obj.stage_states.items()}
            new_states[key] = st
            times: dict[str, float] = {"time_aggregate": t_agg}
            for s in self.segments.after:
                t0 = time.perf_counter()
                ctx.tag = s.tag
                ctx.state = new_states.setdefault(keys[id(s)], {})
                s.run(ctx)
                times[f"time_{s.name}"] = time.perf_counter() - t0
        except BaseException:
            self.abort(transport)
            raise
        st["inflight"] = np.array([[f.idx, f.client, f.version, f.start] for f in self.flights.values()],
                                  np.float64).reshape(-1, 4)
        # the older models clients in flight started from are part of the state: a resumed run dispatches
        # them again from those (not from the newest), as a run that never stopped had them train
        older = {f.version for f in self.flights.values()} - {new_version}
        for k in [k for k in st if k.startswith(_VERSION) and int(k[len(_VERSION):]) not in older]:
            del st[k]
        for v in older:
            st.setdefault(f"{_VERSION}{v}", self.version_flats[v])
        self._release_versions(transport, new_version)
        row = self._row(rnd, ctx, sums, stale, dropped_stale, failed, dropped, st, step_start,
                        int(st["dispatched"]) - dispatched_before, transport)
        row.update(times)
        row["arrivals"] = arrivals  # dispatch indices processed in this step (each exactly once in a run)
        row["round_time"] = time.perf_counter() - t_round
        state_obj.params, state_obj.round, state_obj.stage_states = ctx.params, rnd, new_states
        return row

    def _finish(self, f: _Flight) -> float:
        """A completed flight's finish time: its arrival (real time) or its virtual finish time."""
        assert f.result is not None
        if self.realtime:
            return f.arrived
        return f.start + f.result.maxes["finish"] if f.result.value is not None else f.lower

    def _next_safe(self) -> _Flight | None:
        """The completed flight that comes next in virtual time, if no running flight can precede it
        (real time: the first to arrive)."""
        done = [f for f in self.flights.values() if f.result is not None]
        if not done:
            return None
        first = min(done, key=lambda f: (self._finish(f), f.idx))
        if self.realtime:
            return first
        running = [(f.lower, f.idx) for f in self.flights.values() if f.result is None]
        if running and min(running) < (self._finish(first), first.idx):
            return None
        return first

    def _wait_one(self) -> None:
        fut = next(self.completed)
        for f in self.flights.values():
            if f.future is fut:
                f.result = fut.result()  # raises the client's error in "raise" mode
                f.arrived = self._clock() if self.realtime else 0.0
                f.future = None
                return

    def abort(self, transport: Any) -> None:
        """Forget the flight (after an error or at close); the explicit state keeps what was in flight."""
        futs = [f.future for f in self.flights.values() if f.future is not None]
        futs += list(self.versions.values())
        if futs:
            transport.release(futs)
        self.flights.clear()
        self.versions.clear()
        self.version_flats.clear()
        self.completed = None

    @staticmethod
    def _row(rnd: int, ctx: RoundContext, sums: dict[str, float], stale: list[int], dropped_stale: int,
             failed: list[int], dropped: list[int], st: dict[str, Any], step_start: float, dispatched: int,
             transport: Any) -> dict[str, Any]:
        row = client_row(rnd, ctx, sums, failed, dropped)
        row["clients_stale"] = dropped_stale
        row["staleness_mean"] = float(np.mean(stale)) if stale else 0.0
        row["staleness_max"] = int(max(stale)) if stale else 0
        row["bytes_down"] = ctx.params.nbytes * dispatched
        row["sim_time"] = float(st["time"])
        row["sim_round_time"] = float(st["time"]) - step_start
        row["clients_dispatched"] = dispatched
        return row


def _free_draw(select: Any, population: np.ndarray, busy: np.ndarray, seed: int, idx: int) -> int:
    """The draw ``select.draw(free, 1, ...)`` over ``free`` = ``population`` less ``busy``, without building
    ``free``: O(clients in flight), not O(population), per dispatch.

    A uniform draw from an array is the draw of an index into it (numpy's ``choice``), so the index is
    drawn over ``len(free)`` and mapped to the free client it stands for, skipping the busy positions.
    """
    at = np.searchsorted(population, busy)
    busy_pos = np.unique(at[(at < len(population)) & (population[np.minimum(at, len(population) - 1)] == busy)])
    j = int(select.draw(len(population) - len(busy_pos), 1, seed=seed, dispatch=idx).ids[0])
    for b in busy_pos.tolist():  # ascending: each busy position at or before the target shifts it by one
        if b <= j:
            j += 1
        else:
            break
    return int(population[j])


def _available_free_draw(select: Any, population: np.ndarray, busy: np.ndarray, seed: int, idx: int,
                         when: float | None) -> int | None:
    """Dispatch ``idx``'s client drawn uniformly among the clients available at ``when`` and not in flight,
    checking candidates in seeded random order (stages/available_draw.py): O(clients in flight + candidates
    checked), about ``1 / availability`` candidates, instead of a mask over the population. None when few
    clients qualify (the caller then checks every free client).

    The candidates come from the dispatch's own stream, so the draw depends only on the seed, the dispatch
    index, the clients in flight and the availability, never on the cluster or the order of arrivals.
    """
    from ..stages.available_draw import draw_available

    def usable(ids: np.ndarray) -> np.ndarray:
        return select.available_mask(ids, idx + 1, when) & ~np.isin(ids, busy)

    got = draw_available(population, 1, stream(seed, select.tag, 0, idx), usable)
    return None if got is None else int(got.ids[0])
