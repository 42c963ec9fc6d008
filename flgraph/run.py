"""Run: a pipeline, a model and a federated dataset, executed round after round on a Dask cluster.

Example:
    >>> import flgraph as fg
    >>> from flgraph import stages as st
    >>> data = fg.data.synthetic_classification(num_clients=20, samples_per_client=16, num_features=8,
    ...                                         num_classes=3, seed=0, test_samples=60)
    >>> pipeline = (st.Select(clients=4) >> st.Broadcast() >> st.LocalTrain(epochs=1, batch_size=8)
    ...             >> st.Aggregate(st.WeightedMean()))
    >>> with fg.Run(pipeline, model=fg.models.mlp(8, [16], 3), data=data, seed=0, workers=1,
    ...             progress=False) as run:  # doctest: +SKIP
    ...     history = run.fit(rounds=3)
    ...     print(len(history), history.last("accuracy") > 0)
    3 True
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import _chaos
from .cluster import ClusterHandle, connect, scheduler_lost
from .engine import PlansAhead, RunState, SyncEngine
from .engine.clients import Bundle
from .engine.contracts import refuse_unsupported
from .errors import ClusterError, ConfigError, PipelineError, StopRun
from .graph import Pipeline, ReduceStage
from .graph.hooks import SeesPipeline
from .local import malloc
from .local.heap import frozen
from .observe.history import History
from .observe.progress import RoundProgress
from .params import Params
from .spec import describe
from .store.checkpoint import Checkpoints, RunDirectory, Snapshot
from .store.client_state import ClientStatePlace, ClientStateStore, ClientStateTable, stateful_stages
from .store.persist import create_directory, snapshot_of
from .store.writer import SnapshotWriter

if TYPE_CHECKING:
    from .stages.holding import Holding

__all__ = ["Run"]

log = logging.getLogger("flgraph")

def _then(pipeline: Pipeline, stage: Any) -> Pipeline:
    """``pipeline >> stage``; with parallel branches, the stage goes at the end of the main branch."""
    if pipeline.branches is None:
        return pipeline >> stage
    main, *rest = pipeline.branches
    return Pipeline(branches=(main >> stage, *rest))


class Run:
    """A federated run of ``pipeline`` on ``model`` and ``data``.

    Args:
        pipeline: the round, e.g. ``Select >> Broadcast >> LocalTrain >> Aggregate``.
        model: any ``torch.nn.Module``; its current weights are the initial global params.
        data: a :class:`flgraph.data.FederatedDataset`.
        seed: the one seed every random choice derives from.
        cluster: ``None`` (an embedded LocalCluster of worker processes), a ``distributed.Client``,
            a cluster object, or a scheduler address such as ``"tcp://127.0.0.1:8786"``.
        workers: worker processes of the embedded cluster (default: one per core), or how many workers
            to wait for on an address.
        chunk_size: clients per Dask task (default: one chunk per worker thread). Results do not depend
            on it.
        on_client_error: ``"raise"`` stops the round at the first failing client (the run's state stays
            as it was); ``"drop"`` counts the client as failed and aggregates the others.
        evaluate: ``"final"`` adds an ``Evaluate`` at the end of each ``fit`` when the pipeline has no
            Evaluate stage and the data has a test split; ``"never"`` does not.
        progress: show a progress bar (round, loss, accuracy, client updates per second).
        connect_timeout: seconds to wait for a scheduler given by address (and for its ``workers``).
        checkpoint: a path (or a zarr store) for the run directory, or :class:`flgraph.Checkpoints` with the
            path and how often to snapshot and what to keep (default: every round, the newest 3); ``None``
            writes no checkpoints. Continue an interrupted run with :func:`flgraph.resume`
            (``flgraph resume PATH``).
        callbacks: objects told about the run: ``on_start(run)`` once the cluster is up,
            ``on_round(run, row)`` after each completed round, ``on_end(run)`` at the end of each ``fit``,
            ``on_close(run)`` when the run is closed (each method optional; an exception in a callback is
            logged, never stops the run). Experiment trackers (TensorBoard, Weights & Biases, MLflow) are
            such callbacks: see :mod:`flgraph.observe.trackers`.
        transport: where client stages run, an object like :class:`flgraph.transports.DaskTransport`
            (``start``, ``run_round``, ``map_clients``, ``places``, ``close``; for an asynchronous pipeline
            also ``publish``, ``submit_client``, ``release``, ``completion``, see
            :mod:`flgraph.engine.asynchronous`), e.g. edge agents with
            :class:`flgraph.transports.zmq.ZmqTransport` (both engines); default: Dask tasks on ``cluster``.
        metrics_log: a ``.jsonl`` or ``.csv`` file that gets every round's metrics row as it completes
            (:class:`flgraph.observe.metrics_log.MetricsLog`); ``"auto"`` (default): ``metrics.jsonl`` inside the run
            directory when ``checkpoint`` is a local path, no file otherwise; ``None``: no file.
        dashboard: add the FL page to the Dask dashboard (``/flgraph`` next to ``/status``, see
            :mod:`flgraph.observe.dashboard`); a page that cannot be set up is logged and the run goes on.
        client_state: where client stages keep per-client state (e.g. ``Compress(..., error_feedback=True)``),
            a path every worker can reach. Default: ``client-state`` inside the run directory when
            ``checkpoint`` is a local path (so resume restores it exactly), else a temporary directory
            removed by :meth:`close`. See :mod:`flgraph.store.client_state`.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        model: Any,
        data: Any,
        seed: int = 0,
        cluster: Any = None,
        workers: int | None = None,
        chunk_size: int | None = None,
        on_client_error: Literal["raise", "drop"] = "raise",
        evaluate: Literal["final", "never"] = "final",
        progress: bool = True,
        connect_timeout: float = 30.0,
        checkpoint: Any = None,
        callbacks: Sequence[Any] = (),
        transport: Any = None,
        metrics_log: str | os.PathLike[str] | None = "auto",
        dashboard: bool = True,
        client_state: str | os.PathLike[str] | None = None,
        _resume: tuple[RunDirectory, Snapshot | None] | None = None,
    ) -> None:
        from .models.adapter import ModelAdapter
        from .stages import Evaluate

        if not isinstance(pipeline, Pipeline):
            raise PipelineError(f"Run needs a Pipeline, got {type(pipeline).__name__}",
                                fix="compose stages with >>, e.g. st.Select(10) >> st.Broadcast() >> ...")
        if on_client_error not in ("raise", "drop"):
            raise ConfigError(f"on_client_error={on_client_error!r}", fix="use 'raise' or 'drop'")
        if not hasattr(data, "load") or not hasattr(data, "client_ids"):
            raise ConfigError(f"data must be a flgraph.data.FederatedDataset, got {type(data).__name__}",
                              fix="wrap arrays with fg.data.FederatedDataset.from_arrays(x, y, partition)")
        user_pipeline = pipeline
        if (evaluate == "final" and getattr(data, "test", None) is not None
                and not any(isinstance(s, Evaluate) for s in pipeline)):
            pipeline = _then(pipeline, Evaluate(every=2**31 - 1))
        self.segments = pipeline.check()
        self.pipeline = pipeline
        for s in pipeline:
            if isinstance(s, SeesPipeline):
                s.see_pipeline(pipeline.stages)
        self.adapter = ModelAdapter.from_module(model)
        self.data = data
        self.seed = int(seed)
        self.chunk_size = chunk_size
        self.on_client_error = on_client_error
        self.progress = progress
        for s in pipeline:
            s.prepare(data, self.adapter)
        self.engine: Any
        reduce = self.segments.reduce
        if reduce is not None and reduce.asynchronous:
            from .engine.asynchronous import AsyncEngine

            self.engine = AsyncEngine(self.segments, seed=self.seed, dataset=data, model_source=self.adapter)
        else:
            self.engine = SyncEngine(self.segments, seed=self.seed, dataset=data, model_source=self.adapter)
        params = self.adapter.initial_params()
        self.state = RunState(0, params, SyncEngine.initial_states(params, pipeline.stages))
        self._keys = {id(s): SyncEngine.state_key(i, s) for i, s in enumerate(pipeline.stages)}
        self.history = History()
        self.token = uuid.uuid4().hex[:8]
        self._cluster_arg = cluster
        self.callbacks = list(callbacks)
        if metrics_log is not None:
            from .observe.metrics_log import MetricsLog

            self.callbacks.append(MetricsLog(metrics_log))
        if dashboard:
            from .observe.dashboard import Dashboard

            self.callbacks.append(Dashboard())
        if transport is not None and not isinstance(self.engine, SyncEngine):
            self.engine.check_transport(transport)  # the asynchronous engine dispatches clients one by one
        if transport is not None:
            refuse_unsupported(self.segments, transport)
        self._custom_transport = transport
        self._workers = workers
        self._connect_timeout = connect_timeout
        self._handle: ClusterHandle | None = None
        self._transport: Any = None
        self.warmup_s: float | None = None
        self._spec = describe(user_pipeline)
        self.changes: list[str] = []
        self.resume_notes: list[str] = []
        self.target_round = 0
        self.stopped: str | None = None  # why a stage ended the run early (flgraph.errors.StopRun)
        self._writer: SnapshotWriter | None = None
        options = {"chunk_size": chunk_size, "on_client_error": on_client_error, "evaluate": evaluate}
        self._state_fields = stateful_stages(self.segments.clients, params.spec)
        for branch in self.segments.branches[1:]:
            if stateful_stages(branch.clients, params.spec):
                raise ConfigError(f"branch {branch.name!r} has client stages that keep per-client state; only the "
                                  "main (first) branch's client stages may", fix="move the stateful stage into "
                                  "the first branch, or keep the state on the device")
        self._client_state_tmp: str | None = None
        self._holding = self._plan_holding(params)
        given = Checkpoints.of(checkpoint)
        if given is not None and given.path is not None and _resume is not None:
            raise ConfigError("a resumed run continues in its own run directory",
                              fix="give Checkpoints(every=..., keep_last=...) without a path to change its schedule")
        if given is not None and given.path is None and _resume is None:
            raise ConfigError("Checkpoints() has no path", fix="give the run directory: Checkpoints('runs/exp.zarr')")
        checkpoints = given or Checkpoints()
        path = checkpoints.path
        place: ClientStatePlace | None = None
        if self._state_fields:
            if not isinstance(self.engine, SyncEngine):
                raise ConfigError("per-client state (" + ", ".join(type(s).__name__ for s in self.segments.clients
                                                                   if s.client_fields(params.spec)) +
                                  ") is kept by synchronous rounds; the asynchronous engine does not keep it",
                                  fix="use a synchronous Aggregate, or a client stage without per-client state")
            place = ClientStatePlace.choose(client_state, path, _resume[0] if _resume else None,
                                            checkpoints.keep_last)
        if _resume is not None:
            directory, snap = _resume
            if snap is not None:
                self._restore(snap)
        elif path is not None:
            directory = create_directory(path, self, user_pipeline, options,
                                         place.meta() if place is not None else {})
        if path is not None or _resume is not None:
            self._writer = SnapshotWriter(directory, checkpoints.policy)
            self.history.attach(directory)  # rows older than the history's window are read back from it
        if place is not None:
            self._open_client_state(place, _resume)

    def _plan_holding(self, params: Params) -> Any:
        """What the reducers that need every update hold a round, in memory or streamed to disk (refused
        here when neither has room): :mod:`flgraph.stages.holding`."""
        from .stages.holding import HoldingPlan

        if not isinstance(self.engine, SyncEngine):
            return HoldingPlan((), (), None)
        return HoldingPlan.of(self.segments, int(self.data.num_clients), params.spec, self.token)

    @property
    def holding(self) -> tuple[Holding, ...]:
        """What each reducer that needs every update (``Median``, ``TrimmedMean``, ``Krum``) holds in a round,
        and where (:class:`flgraph.stages.holding.Holding`: clients, values, bytes, peak memory, ``"memory"``
        or ``"disk"``); empty for a run whose reducers hold O(model), as the mean does."""
        return tuple(self._holding.holdings)

    def _open_client_state(self, place: ClientStatePlace,
                           resume: tuple[RunDirectory, Snapshot | None] | None) -> None:
        store = ClientStateStore(place.path, self.data.num_clients, place.slots)
        table = ClientStateTable(store, self.data.client_ids, self._state_fields)
        key = next(self._keys[id(s)] for s in self.segments.clients if s.client_fields(self.state.params.spec))
        self.state.stage_states.setdefault(key, table.initial())
        self._client_state_tmp = place.path if place.temporary else None
        if resume is not None:  # the snapshots that may still be resumed from keep their clients' versions
            directory, snap = resume
            for rnd in directory.snapshot_rounds():
                got = snap if snap is not None and rnd == snap.round else directory.read(rnd)
                if key in got.states:
                    table.protect(rnd, got.states[key])
        self.engine.client_state = (table, key)

    # -- cluster -------------------------------------------------------------------------------------
    def _ensure_started(self) -> Any:
        if self._transport is not None:
            return self._transport
        from .transports.dask import DaskTransport

        malloc.tune_this_process()  # model-sized buffers every round: keep freed memory (flgraph.local.malloc)
        states = self.engine.client_state
        graph = self.segments
        reducer = self.engine.reducer or self._reducer().reducer
        sizes = {name: int(np.asarray(v).size) for name, v in self._server_values().items()}
        bundle = Bundle(graph.clients, reducer, self.data, self.adapter, self.state.params.spec, self.seed,
                        states[0].store if states else None, self._state_fields,
                        branch_stages=tuple(b.clients for b in graph.branches),
                        branch_names=tuple(b.name for b in graph.branches),
                        broadcast=tuple((v, sizes[v]) for b in graph.branches for v in b.broadcast))
        if self._custom_transport is not None:
            transport = self._custom_transport
        else:
            self._handle = connect(self._cluster_arg, workers=self._workers, timeout=self._connect_timeout)
            first = self.segments.clients[0].name
            _chaos.point("cluster-start")
            transport = DaskTransport(self._handle.client, self.token, first, self.chunk_size)
        if self._holding.streams and isinstance(transport, DaskTransport) and not transport.on_this_machine():
            raise ConfigError("the round's updates are streamed to disk (over the driver's memory budget: "
                              + "; ".join(str(h) for h in self._holding.holdings) + "), and some Dask workers "
                              "run on other machines, which cannot write to the driver's disk",
                              fix="run the workers on the driver's machine, select fewer clients per round, or "
                                  "use a mean-based reducer")
        self.warmup_s = transport.start(bundle, self.state.params.flat)
        self._transport = transport
        self._notify("on_start")
        link = self.dashboard_link
        if link:
            log.info("flgraph run %s: Dask dashboard at %s", self.token, link)
            if self.progress:
                print(f"flgraph: Dask dashboard at {link}", file=sys.stderr, flush=True)
        return transport

    def _server_values(self) -> dict[str, Any]:
        """The server values stages keep (SCAFFOLD's ``control``...), as of now."""
        return {v: st[v] for s in self.pipeline.stages for v in s.keeps
                if (st := self.state.stage_states.get(self._keys[id(s)], {})) and v in st}

    def _reducer(self) -> ReduceStage:
        assert self.segments.reduce is not None
        return self.segments.reduce

    @property
    def dashboard_link(self) -> str:
        """The Dask dashboard's address (empty before the first ``fit``)."""
        return self._handle.dashboard_link if self._handle else ""

    # -- running -------------------------------------------------------------------------------------
    def fit(self, rounds: int) -> History:
        """Run ``rounds`` more rounds; returns the whole history so far.

        A round that fails (a client error in ``"raise"`` mode, a lost cluster) raises and leaves the run
        as it was after the last completed round: fix the cause and call ``fit`` again. A stage that raises
        :class:`~flgraph.errors.StopRun` at a round's start (a spent privacy budget) ends the run before that
        round: ``fit`` returns, the last completed round is checkpointed, ``run.stopped`` says why.
        """
        if rounds < 1:
            raise ConfigError(f"fit(rounds={rounds}): run at least one round")
        first = self.state.round + 1
        end = self.state.round + rounds
        writer = self._writer
        if writer is not None and writer.last_round == 0 and not writer.directory.snapshot_rounds():
            writer.directory.note_target(end)  # a run stopped before its first snapshot resumes toward it
        try:
            transport = self._ensure_started()
            self.target_round = end
            self._rounds(transport, first, end, writer)
        except Exception as e:
            if self._handle is not None and self._handle.scheduler_lost():
                raise self._scheduler_lost() from e
            raise
        return self.history

    def _rounds(self, transport: Any, first: int, end: int, writer: SnapshotWriter | None) -> None:
        try:
            with frozen(), RoundProgress(total=end - first + 1, enabled=self.progress) as bar:
                for rnd in range(first, end + 1):
                    with self._holding.round(rnd):
                        row = self.engine.run_round(self.state, rnd, rnd == end, transport, self._keys,
                                                    self.on_client_error)
                    row.update(self._holding.row())
                    self.history.append(row)
                    if writer is not None and writer.policy.due(rnd, rnd == end,
                                                                time.monotonic() - writer.last_time):
                        writer.submit(snapshot_of(self, end))  # waits for the previous write, never two
                        self._protect_client_state(writer)
                    bar.update(row)
                    self._notify("on_round", row)
                    log.debug("round %d: %s", rnd, row)
        except StopRun as stop:
            self._stop(str(stop) or type(stop).__name__)
        finally:
            if isinstance(transport, PlansAhead) and not (self._handle is not None and self._handle.lost):
                transport.cancel_ahead()  # nothing waits on the workers for a round that will not run now
            if writer is not None:
                writer.wait()  # a normal exit, an error or Ctrl-C: the write in flight completes
            self._notify("on_end")

    def _scheduler_lost(self) -> ClusterError:
        """The error of a fit whose scheduler was lost: what was saved, and the command that continues."""
        assert self._handle is not None
        under_way = f"round {self.state.round + 1} was under way" if self._transport is not None else \
            "the run was starting"
        return scheduler_lost(self._handle.address, under_way, self.checkpoint_directory, self._workers)

    def _stop(self, reason: str) -> None:
        """End the run before the next round: the target becomes the last completed round, committed."""
        self.stopped = reason
        self.target_round = self.state.round
        log.warning("flgraph run %s stopped before round %d: %s", self.token, self.state.round + 1, reason)
        if self.progress:
            print(f"flgraph: stopped before round {self.state.round + 1}: {reason}", file=sys.stderr, flush=True)
        writer = self._writer
        if writer is not None and self.state.round > 0:
            writer.submit(snapshot_of(self, self.state.round))  # also when the schedule skipped the last round
            self._protect_client_state(writer)

    def _protect_client_state(self, writer: SnapshotWriter) -> None:
        """The snapshot just submitted keeps its clients' state versions; pruned snapshots release theirs."""
        states = self.engine.client_state
        if states is None:
            return
        table, key = states
        table.protect(self.state.round, self.state.stage_states[key])
        table.retained(writer.directory.retained_rounds())

    def _notify(self, event: str, *args: Any) -> None:
        for cb in self.callbacks:
            method = getattr(cb, event, None)
            if method is None:
                continue
            try:
                method(self, *args)
            except Exception:
                log.exception("flgraph: callback %r failed in %s; the run goes on", cb, event)

    def _restore(self, snap: Snapshot) -> None:
        if snap.params.size != self.state.params.spec.size:
            raise ConfigError(f"the model's tensors differ from the run's: the snapshot holds {snap.params.size} "
                              f"values, this model {self.state.params.spec.size}",
                              fix="resume with a model of the run's architecture (or without model=)")
        states = {**self.state.stage_states, **snap.states}
        for s in self.pipeline.stages:  # a server value kept since the snapshot's version starts as initialised
            key = self._keys[id(s)]
            missing = [v for v in s.keeps if key in snap.states and v not in states[key]]
            if missing:
                states[key] = {**self.state.stage_states.get(key, {}), **states[key]}
        self.state = RunState(snap.round, Params(self.state.params.spec, snap.params.astype(
            self.state.params.spec.carrier, copy=False)), states)
        self.history = History(snap.rows, first=snap.first_row)
        self.target_round = snap.target_round

    @property
    def remaining(self) -> int:
        """Rounds left to reach the target of the last ``fit`` (after a resume: of the interrupted one)."""
        return max(0, self.target_round - self.state.round)

    @property
    def checkpoint_directory(self) -> RunDirectory | None:
        """The run directory snapshots are written to, if any."""
        return self._writer.directory if self._writer else None

    # -- results -------------------------------------------------------------------------------------
    @property
    def round(self) -> int:
        """Rounds completed."""
        return self.state.round

    @property
    def params(self) -> Params:
        """The global params (a copy)."""
        return self.state.params.copy()

    @property
    def model(self) -> Any:
        """A new torch module holding the global weights."""
        return self.adapter.to_module(self.state.params)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The global weights as name -> numpy array, each in its own dtype."""
        return self.state.params.to_arrays()

    # -- lifetime ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for the snapshot in flight, release the run's data on the cluster, and stop the embedded
        cluster if the run started one; callbacks get ``on_close`` first (a tracker ends its run)."""
        self._notify("on_close")
        if self._writer is not None:
            self._writer.close()
        if self._client_state_tmp is not None:
            shutil.rmtree(self._client_state_tmp, ignore_errors=True)
            self._client_state_tmp = None
        self._holding.close()
        if self._transport is not None:
            self.engine.abort(self._transport)
            self._transport.close()
            self._transport = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __enter__(self) -> Run:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Run({self.token}, round {self.state.round}, seed {self.seed}, "
                f"model {self.state.params.spec.describe()})\n{self.pipeline!r}")
