"""The gateway's jobs: a job's tasks sent to the clients' agents, results checked and routed back, deadlines.

A *job* is what the driver posts (:meth:`~.gateway.Gateway.begin_round`, :meth:`~.gateway.Gateway.begin_job`):
tasks for some clients, one params version, one deadline and one event queue. :class:`JobRouting` is the
part of the gateway thread that sends each task to its client's session (the params frames only to an agent
that does not hold that version), accepts a result only from the session the task went to, while the job is
open, once, and with an update the model can take, and turns what is missing at the deadline into failures.

Example:
    >>> from flgraph.transports.zmq.jobs import RoundEvent
    >>> RoundEvent("failed", position=3, client=17, reason="no result by the round's deadline (5 s)").kind
    'failed'
"""

from __future__ import annotations

import heapq
import queue
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import zmq

from flgraph.params import ParamSpec, all_finite

from .wire import Limits, Message, ProtocolError

if TYPE_CHECKING:
    from .sessions import AgentInfo

__all__ = ["EncodedParams", "Frames", "JobRouting", "RoundEvent"]

Frames = list[bytes | memoryview | zmq.Frame]


@dataclass(frozen=True)
class EncodedParams:
    """A params version encoded once (:meth:`Gateway.encode_params`): its tensor ``frames``, sent under each
    task's envelope, and the ``version`` that names it on the wire (a task's ``params`` field), so that an
    agent holding that version gets its next task without the frames (PROTOCOL.md, section 4.3)."""

    frames: Frames
    version: int


@dataclass
class RoundEvent:
    """What the gateway hands the driver: a ``result`` message, or a ``failed`` client with its reason.

    ``job`` is the id :meth:`Gateway.begin_job` returned (one queue may serve many jobs)."""

    kind: str
    position: int
    client: int
    message: Message | None = None
    reason: str = ""
    job: int = 0


@dataclass
class _Task:
    position: int
    client: int
    task_id: int
    config: dict[str, Any]
    sent_to: bytes | None = None
    finished: bool = False


@dataclass
class _Round:
    """A job: a synchronous round (``exclusive``: it closes the jobs before it) or one asynchronous client."""

    job: int
    rnd: int
    seed: int
    spec: ParamSpec
    params: EncodedParams
    deadline: float
    deadline_s: float
    tasks: dict[int, _Task]  # client -> task
    events: queue.SimpleQueue[RoundEvent] = field(default_factory=queue.SimpleQueue)
    exclusive: bool = True
    open: bool = True  # set to False by the driver (end_round / end_job) or at the deadline
    spec_wire: list[list[Any]] = field(default_factory=list)  # the task envelope's spec, built once per job
    descs: list[list[Any]] = field(default_factory=list)  # the params frame's descriptor, built once per job
    stages: list[Any] | None = None  # the client segment every task carries
    needs_segment: tuple[str, ...] = ()  # what an agent without caps.segment would leave out
    mode: str = "train"  # "evaluate": its tasks answer a values result (an evaluation stage's numbers);
    # "secagg": a secure-aggregation phase, answered by a secagg result
    encode: str | None = None  # the codec whose payload results may carry as it is (encoded.py)


class JobRouting:
    """The gateway thread's handling of jobs (a part of :class:`~.gateway.Gateway`)."""

    if TYPE_CHECKING:  # provided by the Gateway and its sessions part
        agents: dict[bytes, AgentInfo]
        by_client: dict[int, bytes]
        counters: dict[str, int]
        limits: Limits
        _jobs: dict[int, _Round]
        _tasks: dict[int, tuple[_Round, _Task]]
        _deadlines: list[tuple[float, int]]

        def _send(self, sock: zmq.Socket[Any], rid: bytes, msg_type: str, fields: dict[str, Any],
                  tensor_frames: Frames | None = None, descs: list[Any] | None = None) -> None: ...

        def _reject(self, sock: zmq.Socket[Any], rid: bytes, err: ProtocolError, who: str, **ref: Any) -> None: ...

        def _mark(self, info: AgentInfo) -> None: ...

        def _answered(self, info: AgentInfo, task_id: Any) -> None: ...

    def _post(self, sock: zmq.Socket[Any], job: _Round) -> None:
        """Take a job posted by the driver and send its tasks to the agents connected now."""
        if job.exclusive:  # a synchronous round: the jobs before it are over
            for other in list(self._jobs.values()):
                if other.open:
                    self._expire_round(other, "the next round started")
        if not job.open:  # closed by the driver before the gateway thread saw it
            return
        self._jobs[job.job] = job
        for task in job.tasks.values():
            self._tasks[task.task_id] = (job, task)
        heapq.heappush(self._deadlines, (job.deadline, job.job))
        for task in job.tasks.values():
            self._dispatch(sock, job, task)

    def _next_deadline(self) -> float:
        """The earliest deadline of an open job (inf: none); jobs closed meanwhile are forgotten."""
        while self._deadlines:
            deadline, jid = self._deadlines[0]
            job = self._jobs.get(jid)
            if job is not None and job.open:
                return deadline
            heapq.heappop(self._deadlines)
            if job is not None:
                self._forget(job)
        return float("inf")

    def _expire_due(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, jid = heapq.heappop(self._deadlines)
            job = self._jobs.get(jid)
            if job is not None:
                if job.open:
                    self._expire_round(job)
                self._forget(job)

    def _forget(self, job: _Round) -> None:
        self._jobs.pop(job.job, None)
        for task in job.tasks.values():
            self._tasks.pop(task.task_id, None)

    def _dispatch(self, sock: zmq.Socket[Any], job: _Round, task: _Task) -> None:
        rid = self.by_client.get(task.client)
        if rid is None or task.finished:
            return  # sent when an agent for the client joins, or failed at the deadline
        info = self.agents[rid]
        if job.needs_segment and not info.caps.get("segment"):
            self._fail(job, task, "its agent runs no client segment (no caps.segment) and would leave out "
                       + "; ".join(job.needs_segment))
            return
        task.sent_to = rid
        info.working[1:] = [task.task_id]  # the agent runs one task and keeps the newest one queued
        self._mark(info)
        remaining = max(0.0, job.deadline - time.monotonic())
        env = {"round": job.rnd, "task": task.task_id, "client": task.client, "deadline_s": remaining,
               "seed": job.seed, "config": task.config, "spec": job.spec_wire, "stages": job.stages,
               "mode": None if job.mode == "train" else job.mode, "encode": job.encode}
        if info.caches_params:
            env["params"] = job.params.version
            if info.params_held == job.params.version:  # the agent holds these params: the envelope only
                self.counters["params_reused"] += 1
                self._send(sock, rid, "task", env, [], [])
                return
            info.params_held = job.params.version
        self.counters["params_sent"] += 1
        self._send(sock, rid, "task", env, job.params.frames, job.descs)

    def _task_of(self, info: AgentInfo, rnd: Any, task_id: Any) -> tuple[_Round, _Task] | None:
        """The open, unfinished task ``task_id`` of round ``rnd`` that was sent to the agent's current session,
        if any."""
        hit = self._tasks.get(task_id) if isinstance(task_id, int) else None
        if hit is None:
            return None
        job, task = hit
        if (not job.open or rnd != job.rnd or task.client != info.client or task.sent_to != info.routing_id
                or task.finished):
            return None
        return hit

    def _running(self, rnd: Any) -> bool:
        """Whether an open job has round ``rnd`` (error path only: a scan of the jobs)."""
        return any(job.open and job.rnd == rnd for job in self._jobs.values())

    def _result(self, sock: zmq.Socket[Any], info: AgentInfo, msg: Message) -> None:
        rnd, task_id = msg.fields["round"], msg.fields["task"]
        self._answered(info, task_id)
        ref = {"round": rnd, "task": task_id}
        hit = self._tasks.get(task_id)
        job, task = hit if hit is not None else (None, None)
        if job is None or task is None or not job.open or rnd != job.rnd or task.client != info.client:
            if not self._running(rnd):
                self._reject(sock, info.routing_id, ProtocolError("out-of-round", f"a result for round {rnd}; the "
                                                                  "gateway is not running that round"),
                             f"client {info.client}", **ref)
            else:
                self._reject(sock, info.routing_id,
                             ProtocolError("unknown-task", f"task {task_id} was not given to the sender's session"),
                             f"client {info.client}", **ref)
            return
        if task.sent_to != info.routing_id:
            self._reject(sock, info.routing_id, ProtocolError("unknown-task", f"task {task_id} was not given to "
                                                              "the sender's session"), f"client {info.client}", **ref)
            return
        if task.finished:
            self._reject(sock, info.routing_id, ProtocolError("duplicate", f"round {rnd} already counts this "
                                                              "client"), f"client {info.client}", **ref)
            return
        problem = (_check_values(msg) if job.mode == "evaluate" else _check_secagg(msg, job.mode, job.spec)
                   if job.mode == "secagg" or msg.fields["kind"] in ("secagg", "masked")
                   else _check_encoded(msg, job.encode, self.limits)
                   if msg.fields["kind"] == "encoded" else _check_update(msg, job.spec, self.limits))
        if problem is not None:
            self._reject(sock, info.routing_id, ProtocolError("refused-update", problem,
                                                              fix="send a finite flat update of the model's size"),
                         f"client {info.client}", **ref)
            self._fail(job, task, f"its update was refused: {problem}")
            return
        task.finished = True
        info.tasks_done += 1
        job.events.put(RoundEvent("result", task.position, task.client, msg, job=job.job))

    @staticmethod
    def _fail(job: _Round, task: _Task, reason: str) -> None:
        if task.finished:
            return
        task.finished = True
        job.events.put(RoundEvent("failed", task.position, task.client, None, reason, job=job.job))

    def _expire_round(self, job: _Round, why: str = "") -> None:
        for task in job.tasks.values():
            if not task.finished:
                self._fail(job, task, why or (f"no result by the round's deadline ({job.deadline_s:g} s)"
                                         + ("" if task.sent_to else "; no agent for this client was connected")))
        job.open = False


def _check_secagg(msg: Message, mode: str, spec: ParamSpec) -> str | None:
    """Why a secure-aggregation answer (a phase's bytes, or a masked input) cannot be taken, or None."""
    kind, t = msg.fields["kind"], msg.tensors[0]
    if mode == "secagg":
        if kind != "secagg" or t.ndim != 1 or t.dtype != np.uint8 or t.size < 1:
            return f"a {kind!r} result of dtype {t.dtype} for a secagg task (one uint8 'secagg' frame expected)"
        return None
    if kind != "masked" or mode != "train":
        return f"kind {kind!r} for a {mode} task"
    if t.shape != (spec.size,) or t.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
        return f"a masked input of shape {t.shape} and dtype {t.dtype} (({spec.size},) int32 or int64 expected)"
    return None


def _check_values(msg: Message) -> str | None:
    """Why an evaluate task's result cannot be used, or None."""
    if msg.fields["kind"] != "values":
        return f"kind {msg.fields['kind']!r} for an evaluate task (use 'values')"
    t = msg.tensors[0]
    if t.ndim != 1 or not 1 <= t.size <= MAX_VALUES or t.dtype != np.float64:
        return f"values of shape {t.shape} and dtype {t.dtype}; an evaluate result is 1..{MAX_VALUES} float64"
    if not np.isfinite(t).all():
        return "the values hold non-finite numbers"
    return None


MAX_VALUES = 64


def _check_encoded(msg: Message, encode: str | None, limits: Limits) -> str | None:
    """Why an encoded result cannot be used (its payload is checked in full where the driver unpacks it)."""
    if encode is None or msg.fields.get("codec") != encode:
        return (f"an update encoded with {msg.fields.get('codec')!r}; this round takes "
                + (f"{encode!r} or " if encode else "") + "plain deltas")
    t = msg.tensors[0]
    if t.ndim != 1 or t.dtype != np.uint8:
        return f"an encoded update of shape {t.shape} and dtype {t.dtype} (one uint8 frame expected)"
    if msg.fields["num_samples"] > limits.max_num_samples:
        return f"num_samples {msg.fields['num_samples']} is beyond {limits.max_num_samples}"
    return None


def _check_update(msg: Message, spec: ParamSpec, limits: Limits) -> str | None:
    """Why a result's update cannot be aggregated, or None."""
    kind = msg.fields["kind"]
    if kind not in ("delta", "weights"):
        return f"kind {kind!r} (use 'delta' or 'weights')"
    t = msg.tensors[0]
    if t.shape != (spec.size,):
        return f"an update of shape {t.shape}; the model's flat buffer is ({spec.size},)"
    if t.dtype != np.dtype(spec.carrier):
        return f"an update of dtype {t.dtype}; the model's is {spec.carrier}"
    if not all_finite(t):
        return f"the update holds {int((~np.isfinite(t)).sum())} non-finite values"
    if msg.fields["num_samples"] > limits.max_num_samples:
        return f"num_samples {msg.fields['num_samples']} is beyond {limits.max_num_samples}"
    return None
