"""The gateway: a ROUTER socket next to the driver that edge agents connect out to.

One background thread owns the socket. It accepts agents (``join`` -> ``accept``), keeps the registry
(session, client id, device info, last message), answers and sends heartbeats, expires silent agents,
sends each job's tasks (the global params once per agent per job), checks every arriving message
(:mod:`.wire`: sizes, schema, sequence numbers, round and task ids) and hands good results to the driver
through a queue. A job's deadline is applied here: clients that have not answered by then, or whose agent
vanished, become failures; a result that arrives later, or twice, is refused (never a hang, never a double
count). A malformed, oversized, replayed or out-of-round message is logged, answered with an ``error``
message, and the gateway goes on serving.

A *job* is what the driver posts: a synchronous round (:meth:`Gateway.begin_round`: one at a time, a new
one closes the previous) or one client of the asynchronous engine (:meth:`Gateway.begin_job`: many at
once, each with its own params version, deadline and event queue). Results and failures are routed to
their job by task id (random, one per client and job); the wire is the same for both.

Example:
    >>> from flgraph.transports.zmq.gateway import Gateway
    >>> gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5)  # doctest: +SKIP
    >>> gw.start(); gw.endpoint  # doctest: +SKIP
    'tcp://127.0.0.1:41234'
    >>> gw.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from flgraph.errors import ConfigError
from flgraph.params import ParamSpec, all_finite

from .keys import allowed_keys, load_secret
from .sockets import readable
from .wire import PROTOCOL_VERSION, Limits, Message, ProtocolError, decode, encode, tensor_frames

__all__ = ["AgentInfo", "EncodedParams", "Gateway", "RoundEvent"]

log = logging.getLogger("flgraph")

Frames = list[bytes | memoryview | zmq.Frame]


@dataclass(frozen=True)
class EncodedParams:
    """A params version encoded once (:meth:`Gateway.encode_params`): its tensor ``frames``, sent under each
    task's envelope, and the ``version`` that names it on the wire (a task's ``params`` field), so that an
    agent holding that version gets its next task without the frames (PROTOCOL.md, section 4.3)."""

    frames: Frames
    version: int

MAX_BATCH = 2000  # messages handled per poll before housekeeping runs again


@dataclass
class AgentInfo:
    """One connected agent, as the gateway's registry holds it."""

    routing_id: bytes
    session: str
    client: int
    key: str
    device: dict[str, Any]
    caps: dict[str, Any]
    joined: float
    last_seen: float
    last_seq: int = -1
    tasks_done: int = 0
    working: list[int] = field(default_factory=list)  # task ids sent and not answered: running, queued
    params_held: int = 0  # the params version last sent to this session with its frames (0: none)

    @property
    def caches_params(self) -> bool:
        """Whether the agent said it keeps the last params version it received (``caps.params_cache``)."""
        return self.caps.get("params_cache") is True


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


class Gateway:
    """Accepts agents on ``bind`` and runs jobs' tasks on them (synchronous rounds, asynchronous clients).

    Args:
        bind: a loopback or interface endpoint such as ``"tcp://127.0.0.1:5555"`` (port 0: any free port;
            the bound one is :attr:`endpoint`).
        secret_key: the gateway's ``NAME.key_secret`` file; with it the socket is a CURVE server.
        allow: a directory of agents' public ``.key`` files, or a set of Z85 public keys: only they may
            connect (CURVE needed). ``None`` with a ``secret_key``: any key may connect (encrypted only).
        heartbeat_s, liveness: heartbeat interval; an agent silent for ``liveness`` intervals is gone.
        limits: bounds on every message (:class:`~flgraph.transports.zmq.wire.Limits`).
        max_agents: agents beyond this are told ``reconnect-later``.
        client_ids: ids handed out to agents that join without asking for one, lowest free first.
        compress: tensor frames' codec for tasks (``"auto"``, ``"raw"``, ``"lz4"``).
    """

    def __init__(self, bind: str = "tcp://127.0.0.1:0", *, secret_key: str | os.PathLike[str] | None = None,
                 allow: str | os.PathLike[str] | Iterable[bytes] | None = None, heartbeat_s: float = 1.0,
                 liveness: int = 3, limits: Limits | None = None, max_agents: int = 10_000,
                 client_ids: Iterable[int] | None = None, compress: str = "auto") -> None:
        if heartbeat_s <= 0 or liveness < 1:
            raise ConfigError(f"heartbeat_s={heartbeat_s}, liveness={liveness}",
                              fix="use heartbeat_s > 0 and liveness >= 1")
        if allow is not None and secret_key is None:
            raise ConfigError("an allow-list needs CURVE", fix="pass secret_key= (the gateway's NAME.key_secret)")
        self.bind = bind
        self.secret_key = secret_key
        self.allow = allow
        self.heartbeat_s = float(heartbeat_s)
        self.liveness = int(liveness)
        self.limits = limits or Limits()
        self.max_agents = max_agents
        self.pool = sorted(int(c) for c in client_ids) if client_ids is not None else None
        self.compress = compress
        self.endpoint = ""
        self.agents: dict[bytes, AgentInfo] = {}  # touched only by the gateway thread; read a copy
        self.by_client: dict[int, bytes] = {}
        self.counters: dict[str, int] = {"received": 0, "sent": 0, "rejected": 0, "joins": 0, "lost": 0,
                                         "params_sent": 0, "params_reused": 0}
        self._ctx: zmq.Context[Any] | None = None
        self._auth: ThreadAuthenticator | None = None
        self._thread: threading.Thread | None = None
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake_addr = f"inproc://flgraph-gateway-wake-{secrets.token_hex(6)}"
        self._wake: zmq.Socket[Any] | None = None
        self._wake_lock = threading.Lock()
        # jobs, tasks and deadlines: touched only by the gateway thread (the driver posts through _commands)
        self._jobs: dict[int, _Round] = {}
        self._tasks: dict[int, tuple[_Round, _Task]] = {}  # task id -> its job and task
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, job id)
        self._job_ids = itertools.count(1)
        self._param_versions = itertools.count(1)
        self._posted: _Round | None = None  # the last synchronous round posted by the driver thread
        self._open_jobs: dict[int, _Round] = {}  # asynchronous jobs posted and not ended (driver thread)
        self._busy: set[int] = set()  # clients whose agent has a task outstanding (guarded by _lock)
        self._seq = 0
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._lock = threading.Lock()  # guards the registry snapshot
        self._snapshot: dict[int, AgentInfo] = {}

    # -- lifetime (driver thread) ---------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> str:
        """Bind and start serving; returns the bound endpoint."""
        if self._thread is not None:
            return self.endpoint
        self._ctx = zmq.Context()
        self._stopping.clear()
        self._ready.clear()
        self._error = None
        if self.secret_key is not None:
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("flgraph.zap"))
            self._auth.start()
            if self.allow is None:
                self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
            else:
                allow = self.allow
                keys = (allowed_keys(allow) if isinstance(allow, (str, os.PathLike))
                        else {bytes(k) for k in allow})
                self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowList(keys))
        self._wake = self._ctx.socket(zmq.PAIR)
        self._wake.bind(self._wake_addr)
        self._thread = threading.Thread(target=self._serve, name="flgraph-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise ConfigError("the gateway did not start in time")
        if self._error is not None:
            err = self._error
            self.stop()
            raise ConfigError(f"the gateway cannot bind {self.bind}: {err}",
                              fix="choose a free port, or port 0 for any") from err
        return self.endpoint

    def stop(self, timeout: float = 5.0) -> None:
        """Tell the agents (``disconnect``), close the socket and stop the thread."""
        if self._thread is None:
            return
        self._command("stop", None)
        self._thread.join(timeout)
        self._thread = None
        if self._wake is not None:
            self._wake.close(linger=0)
            self._wake = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        with self._lock:
            self._snapshot = {}
            self._busy = set()
        self.agents, self.by_client = {}, {}

    def _command(self, what: str, arg: Any) -> None:
        self._commands.put((what, arg))
        with self._wake_lock:
            if self._wake is not None:
                self._wake.send(b"", zmq.NOBLOCK)

    # -- registry (any thread) -------------------------------------------------------------------------
    def connected(self) -> dict[int, AgentInfo]:
        """Client id -> agent, for the agents connected now (a snapshot)."""
        with self._lock:
            return dict(self._snapshot)

    def idle(self) -> set[int]:
        """Client ids whose agent is connected and has no task outstanding (sent and not yet answered,
        whatever became of its job): the ones that can start work now."""
        with self._lock:
            return {c for c in self._snapshot if c not in self._busy}

    def wait_for(self, count: int | None = None, clients: Iterable[int] | None = None,
                 timeout: float = 30.0) -> dict[int, AgentInfo]:
        """Wait until ``count`` agents, or agents for all of ``clients``, are connected; raise after ``timeout``."""
        want = set(int(c) for c in clients) if clients is not None else None
        end = time.monotonic() + timeout
        while True:
            now = self.connected()
            if (want is None or want <= now.keys()) and (count is None or len(now) >= count):
                return now
            if time.monotonic() >= end:
                raise ConfigError(f"{len(now)} agent(s) connected after {timeout:.0f} s; waited for "
                                  f"{count if want is None else sorted(want - now.keys())[:10]}",
                                  fix="start the agents (`flgraph edge --connect ...`) and check their keys")
            time.sleep(0.02)

    # -- rounds and jobs (driver thread) -----------------------------------------------------------------
    def encode_params(self, flat: np.ndarray) -> EncodedParams:
        """The params' tensor frame, encoded once for every task that carries this version.

        A large frame is wrapped once in a ``zmq.Frame``: each agent's send then shares it (libzmq counts
        references) instead of registering the buffer with pyzmq's zero-copy bookkeeping per agent. With
        the ``raw`` codec the frame is a view of ``flat``: do not write to ``flat`` while jobs use it."""
        frames: Frames = [zmq.Frame(f, copy=False) if len(f) >= zmq.COPY_THRESHOLD else f
                          for f in tensor_frames([flat], compress=self.compress)[1]]
        return EncodedParams(frames, next(self._param_versions))

    def begin_round(self, rnd: int, flat: np.ndarray, spec: ParamSpec, seed: int,
                    configs: dict[int, dict[str, Any]], deadline_s: float) -> queue.SimpleQueue[RoundEvent]:
        """Post synchronous round ``rnd`` (client id -> task config, in position order); returns the event
        queue. A round is exclusive: it closes every job still open (their clients fail)."""
        job = self._job(rnd, self.encode_params(flat), spec, seed, configs, deadline_s, queue.SimpleQueue(), True)
        self._posted = job
        self._command("job", job)
        return job.events

    def end_round(self) -> None:
        """Close the current round: later results for it are refused as out-of-round.

        Only a flag: the gateway thread reads ``open`` before it accepts a result, so closing needs no
        message to that thread (one thread hand-off less per round, about 30 us here)."""
        if self._posted is not None:
            self._posted.open = False

    def begin_job(self, rnd: int, params: EncodedParams, spec: ParamSpec, seed: int,
                  configs: dict[int, dict[str, Any]], deadline_s: float,
                  events: queue.SimpleQueue[RoundEvent]) -> int:
        """Post a job beside the running ones (the asynchronous engine: one client per job) and return its id.

        ``params``: from :meth:`encode_params` (one encoding per params version, shared by its
        jobs); ``rnd`` travels as the task's ``round``; events go to ``events`` with ``job`` set. Close it
        with :meth:`end_job` once its event came (or to give up on it)."""
        job = self._job(rnd, params, spec, seed, configs, deadline_s, events, False)
        self._open_jobs[job.job] = job
        self._command("job", job)
        return job.job

    def end_job(self, job_id: int) -> None:
        """Close a job of :meth:`begin_job`: a result for it that comes later is refused (out-of-round)."""
        job = self._open_jobs.pop(job_id, None)
        if job is not None:
            job.open = False

    def _job(self, rnd: int, params: EncodedParams, spec: ParamSpec, seed: int,
             configs: dict[int, dict[str, Any]], deadline_s: float, events: queue.SimpleQueue[RoundEvent],
             exclusive: bool) -> _Round:
        if self._thread is None:
            raise ConfigError("the gateway is not started", fix="call start() first")
        tasks = {cid: _Task(pos, cid, secrets.randbits(62), cfg) for pos, (cid, cfg) in enumerate(configs.items())}
        frame = params.frames[0]
        descs = [[spec.carrier, [spec.size], "raw" if len(frame) == spec.nbytes else "lz4", len(frame)]]
        spec_wire = [[e.name, list(e.shape), e.dtype] for e in spec.entries]
        return _Round(next(self._job_ids), rnd, seed, spec, params, time.monotonic() + deadline_s, deadline_s,
                      tasks, events, exclusive, spec_wire=spec_wire, descs=descs)

    # -- the gateway thread ----------------------------------------------------------------------------
    def _serve(self) -> None:
        assert self._ctx is not None
        sock = self._ctx.socket(zmq.ROUTER)
        wake = self._ctx.socket(zmq.PAIR)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_tensor_bytes * self.limits.max_tensors
                            + self.limits.max_envelope_bytes)
            sock.setsockopt(zmq.RCVHWM, 10_000)
            sock.setsockopt(zmq.SNDHWM, 10_000)
            if self.secret_key is not None:
                public, secret = load_secret(self.secret_key)
                sock.curve_server = True
                sock.curve_publickey = public
                sock.curve_secretkey = secret
            sock.bind(self.bind)
            self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            wake.connect(self._wake_addr)
        except zmq.ZMQError as e:
            self._error = e
            sock.close(0)
            wake.close(0)
            self._ready.set()
            return
        self._ready.set()
        log.info("flgraph gateway: serving on %s (CURVE %s)", self.endpoint,
                 "on" if self.secret_key else "off")
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_tick = time.monotonic()
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                wait = max(0.0, min(next_tick, self._next_deadline()) - now)
                ready = dict(poller.poll(int(wait * 1000) + 1))
                if wake in ready:  # EVENTS, not recv until zmq.Again: no exception (and no Poller) per wake
                    while readable(wake):
                        wake.recv(zmq.NOBLOCK)
                    self._drain_commands(sock)
                if sock in ready:
                    for _ in range(MAX_BATCH):
                        if not readable(sock):
                            break
                        self._handle(sock, sock.recv_multipart(zmq.NOBLOCK, copy=False))
                now = time.monotonic()
                if now >= next_tick:
                    self._tick(sock, now)
                    next_tick = now + self.heartbeat_s / 2
                self._expire_due(now)
        except Exception as e:  # a bug here must not hang the driver: it sees the thread gone
            log.exception("flgraph gateway: the serving thread failed")
            self._error = e
        finally:  # open jobs are kept: after a restart their tasks go to the agents that join again
            for info in list(self.agents.values()):
                self._send(sock, info.routing_id, "disconnect", {"reason": "the gateway is shutting down"})
            sock.close(0)
            wake.close(0)

    def _drain_commands(self, sock: zmq.Socket[Any]) -> None:
        while True:
            try:
                what, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if what == "stop":
                self._stopping.set()
            elif what == "job":
                self._post(sock, arg)

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

    def _publish(self) -> None:
        with self._lock:
            self._snapshot = {a.client: a for a in self.agents.values()}
            self._busy = {a.client for a in self.agents.values() if a.working}

    def _mark(self, info: AgentInfo) -> None:
        """Publish whether the agent has a task outstanding."""
        if self.by_client.get(info.client) != info.routing_id:
            return
        with self._lock:
            if info.working:
                self._busy.add(info.client)
            else:
                self._busy.discard(info.client)

    def _answered(self, info: AgentInfo, task_id: Any) -> None:
        """The agent answered ``task_id`` (a result or an error, accepted or not): that work is over."""
        if task_id in info.working:
            info.working.remove(task_id)
            self._mark(info)

    def _send(self, sock: zmq.Socket[Any], rid: bytes, msg_type: str, fields: dict[str, Any],
              tensor_frames: Frames | None = None, descs: list[Any] | None = None) -> None:
        self._seq += 1
        frames: Frames
        if tensor_frames is None:
            frames = list(encode(msg_type, self._seq, fields))
        else:  # the round's params, encoded once, travel with each agent's own envelope
            env = {"v": PROTOCOL_VERSION, "t": msg_type, "seq": self._seq, **fields, "tensors": descs}
            frames = [msgpack.packb(env, use_bin_type=True), *tensor_frames]
        try:
            sock.send_multipart([rid, *frames], zmq.NOBLOCK, copy=False)
            self.counters["sent"] += 1
        except zmq.ZMQError as e:
            log.debug("flgraph gateway: cannot send %s to an agent: %s", msg_type, e)

    def _reject(self, sock: zmq.Socket[Any], rid: bytes, err: ProtocolError, who: str, **ref: Any) -> None:
        self.counters["rejected"] += 1
        log.warning("flgraph gateway: rejected a message from %s: %s", who, err.message)
        self._send(sock, rid, "error", {"code": err.code, "text": err.message[: self.limits.max_text], **ref})

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        self.counters["received"] += 1
        rid = bytes(frames[0].bytes)
        info = self.agents.get(rid)
        who = f"client {info.client}" if info else f"connection {rid.hex()[:10]}"
        try:
            msg = decode([f.buffer for f in frames[1:]], self.limits)
        except ProtocolError as e:
            self._reject(sock, rid, e, who)
            return
        now = time.monotonic()
        if msg.type == "join":
            key = frames[1].get("User-Id") if self.secret_key is not None else ""
            self._join(sock, rid, msg, str(key or ""), now)
            return
        if info is None:
            if msg.type not in ("disconnect", "error"):
                self._reject(sock, rid, ProtocolError("unknown-session", f"a {msg.type} before join",
                                                      fix="join first (the gateway may have restarted)"), who)
            return
        if msg.seq <= info.last_seq:
            self._reject(sock, rid, ProtocolError("replay", f"seq {msg.seq} after {info.last_seq} ({msg.type})"), who)
            return
        info.last_seq = msg.seq
        info.last_seen = now
        if msg.type == "heartbeat":
            return
        if msg.type == "result":
            self._result(sock, info, msg)
        elif msg.type == "error":
            log.warning("flgraph gateway: client %d reports %s: %s", info.client, msg.fields["code"],
                        msg.fields["text"][:300])
            self._answered(info, msg.fields.get("task"))
            hit = self._task_of(info, msg.fields.get("round"), msg.fields.get("task"))
            if hit is not None and msg.fields["code"] == "unknown-params":
                info.params_held = 0  # it lost them (or never decoded them): the task again, with its params
                self._dispatch(sock, *hit)
            elif hit is not None:
                self._fail(*hit, f"the agent reported {msg.fields['code']}: {msg.fields['text'][:500]}")
        elif msg.type == "disconnect":
            self._drop(info, f"the agent disconnected ({msg.fields.get('reason', '')[:200]})")
        else:
            self._reject(sock, rid, ProtocolError("unknown-type", f"an agent may not send {msg.type}"), who)

    def _join(self, sock: zmq.Socket[Any], rid: bytes, msg: Message, key: str, now: float) -> None:
        self.counters["joins"] += 1
        old = self.agents.pop(rid, None)
        if old is not None:
            self.by_client.pop(old.client, None)
        want = msg.fields.get("client")
        if want is None:
            if self.pool is None:
                self._reject(sock, rid, ProtocolError("bad-field", "join without a client id",
                                                      fix="start the agent with --client-id N"), "a new agent")
                return
            taken = self.by_client.keys()
            free = [c for c in self.pool if c not in taken]
            if not free:
                self._send(sock, rid, "reconnect-later", {"retry_s": 5.0, "reason": "every client id is taken"})
                return
            want = free[0]
        elif self.pool is not None and want not in self.pool:
            self._reject(sock, rid, ProtocolError("bad-field", f"client id {want} is not one this gateway serves"),
                         "a new agent")
            return
        holder = self.by_client.get(want)
        if holder is not None:
            prev = self.agents[holder]
            if prev.key != key:
                self._reject(sock, rid, ProtocolError("duplicate-client", f"client {want} is connected with "
                                                      "another key", fix="give each agent its own --client-id"),
                             "a new agent")
                return
            self.agents.pop(holder)  # the same key joins again (a restarted agent): the new session wins
        if len(self.agents) >= self.max_agents:
            self._send(sock, rid, "reconnect-later", {"retry_s": 5.0, "reason": "the gateway is full"})
            return
        device = {k: v for k, v in msg.fields.get("device", {}).items()}
        info = AgentInfo(rid, secrets.token_hex(8), int(want), key, device, msg.fields.get("caps", {}), now, now,
                         msg.seq)
        self.agents[rid] = info
        self.by_client[info.client] = rid
        self._publish()
        log.info("flgraph gateway: client %d joined (%s)", info.client, msg.fields.get("agent", "agent"))
        self._send(sock, rid, "accept", {"session": info.session, "client": info.client,
                                         "heartbeat_s": self.heartbeat_s, "liveness": self.liveness,
                                         "max_tensor_bytes": self.limits.max_tensor_bytes})
        for job in list(self._jobs.values()):  # the client's open tasks go to its new session
            task = job.tasks.get(info.client)
            if job.open and task is not None and not task.finished:
                self._dispatch(sock, job, task)

    def _dispatch(self, sock: zmq.Socket[Any], job: _Round, task: _Task) -> None:
        rid = self.by_client.get(task.client)
        if rid is None or task.finished:
            return  # sent when an agent for the client joins, or failed at the deadline
        task.sent_to = rid
        info = self.agents[rid]
        info.working[1:] = [task.task_id]  # the agent runs one task and keeps the newest one queued
        self._mark(info)
        remaining = max(0.0, job.deadline - time.monotonic())
        env = {"round": job.rnd, "task": task.task_id, "client": task.client, "deadline_s": remaining,
               "seed": job.seed, "config": task.config, "spec": job.spec_wire}
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
        """The open, unfinished task ``task_id`` of round ``rnd`` that was sent to this session, if any."""
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
                self._reject(sock, info.routing_id, ProtocolError("unknown-task", f"task {task_id} was not given "
                                                                  "to this session"), f"client {info.client}", **ref)
            return
        if task.sent_to != info.routing_id:
            self._reject(sock, info.routing_id, ProtocolError("unknown-task", f"task {task_id} was not given to "
                                                              "this session"), f"client {info.client}", **ref)
            return
        if task.finished:
            self._reject(sock, info.routing_id, ProtocolError("duplicate", f"round {rnd} already counts this "
                                                              "client"), f"client {info.client}", **ref)
            return
        problem = _check_update(msg, job.spec, self.limits)
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

    def _drop(self, info: AgentInfo, reason: str) -> None:
        self.agents.pop(info.routing_id, None)
        if self.by_client.get(info.client) == info.routing_id:
            self.by_client.pop(info.client)
        self._publish()
        log.warning("flgraph gateway: client %d is gone: %s", info.client, reason)
        for job in list(self._jobs.values()):
            task = job.tasks.get(info.client)
            if job.open and task is not None and task.sent_to == info.routing_id:
                self._fail(job, task, f"its agent was lost mid-round: {reason}")

    def _tick(self, sock: zmq.Socket[Any], now: float) -> None:
        for job in [j for j in self._jobs.values() if not j.open]:  # closed by the driver
            self._forget(job)
        limit = self.heartbeat_s * self.liveness
        for info in list(self.agents.values()):
            if now - info.last_seen > limit:
                self.counters["lost"] += 1
                self._drop(info, f"no message for {now - info.last_seen:.1f} s")
            else:
                self._send(sock, info.routing_id, "heartbeat", {})

    def _expire_round(self, job: _Round, why: str = "") -> None:
        for task in job.tasks.values():
            if not task.finished:
                self._fail(job, task, why or (f"no result by the round's deadline ({job.deadline_s:g} s)"
                                         + ("" if task.sent_to else "; no agent for this client was connected")))
        job.open = False


class _AllowList:
    """ZAP credentials provider: a CURVE public key is allowed when it is in the set."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = bytes(key) in self.keys  # pyzmq passes the Z85 form
        if not ok:
            log.warning("flgraph gateway: refused a connection with a key not on the allow-list")
        return ok


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
