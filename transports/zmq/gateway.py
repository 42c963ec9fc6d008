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

This module holds the gateway's lifetime, the driver's API and the serving loop (decode, dispatch by
message type); :mod:`.sessions` holds the agents' registry and liveness, :mod:`.jobs` the jobs' tasks,
results and deadlines.

Example:
    >>> from flgraph.transports.zmq.gateway import Gateway
    >>> gw = Gateway("tcp://127.0.0.1:0", heartbeat_s=0.5)  # doctest: +SKIP
    >>> gw.start(); gw.endpoint  # doctest: +SKIP
    'tcp://127.0.0.1:41234'
    >>> gw.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator

from flgraph.errors import ConfigError
from flgraph.params import ParamSpec

from .jobs import EncodedParams, Frames, JobRouting, RoundEvent, _Round, _Task
from .keys import allowed_keys, load_secret
from .parts import needs_parts, part_messages
from .sessions import AgentInfo, AgentSessions, _AllowList
from .sockets import readable
from .wire import PROTOCOL_VERSION, Limits, ProtocolError, decode, encode, readable_ref, tensor_frames

__all__ = ["AgentInfo", "EncodedParams", "Gateway", "RoundEvent"]

log = logging.getLogger("flgraph")

MAX_BATCH = 2000  # messages handled per poll before housekeeping runs again


class Gateway(AgentSessions, JobRouting):
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
        self.counters: dict[str, int] = {"received": 0, "sent": 0, "rejected": 0, "joins": 0, "joins_refused": 0,
                                        "lost": 0,
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
        self._xfer = 0  # the id of the gateway's last transfer in parts
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
                    configs: dict[int, dict[str, Any]], deadline_s: float, stages: list[Any] | None = None,
                    needs_segment: Sequence[str] = (), encode: str | None = None) -> queue.SimpleQueue[RoundEvent]:
        """Post synchronous round ``rnd`` (client id -> task config, in position order); returns the event
        queue. A round is exclusive: it closes every job still open (their clients fail).

        ``stages``: the client segment each task carries (:mod:`.segment`); ``needs_segment``: what an agent
        that runs no segment (no ``caps.segment``) would leave out; non-empty, such an agent's client fails.
        ``encode``: the codec whose payload the tasks' results may carry as it is (:mod:`.encoded`)."""
        job = self._job(rnd, self.encode_params(flat), spec, seed, configs, deadline_s, queue.SimpleQueue(), True,
                        stages, needs_segment)
        job.encode = encode
        self._posted = job
        self._command("job", job)
        return job.events

    def end_round(self) -> None:
        """Close the current round: later results for it are refused as out-of-round.

        Only a flag: the gateway thread reads ``open`` before it accepts a result, so closing needs no
        message to that thread (a thread hand-off less per round)."""
        if self._posted is not None:
            self._posted.open = False

    def begin_job(self, rnd: int, params: EncodedParams, spec: ParamSpec, seed: int,
                  configs: dict[int, dict[str, Any]], deadline_s: float,
                  events: queue.SimpleQueue[RoundEvent], stages: list[Any] | None = None,
                  needs_segment: Sequence[str] = (), mode: str = "train", encode: str | None = None) -> int:
        """Post a job beside the running ones (the asynchronous engine: one client per job) and return its id.

        ``params``: from :meth:`encode_params` (one encoding per params version, shared by its
        jobs); ``rnd`` travels as the task's ``round``; events go to ``events`` with ``job`` set. Close it
        with :meth:`end_job` once its event came (or to give up on it). ``stages``, ``needs_segment``: as in
        :meth:`begin_round`; ``mode="evaluate"``: each client runs the one evaluation stage of ``stages`` and
        answers its numbers (a ``values`` result, PROTOCOL.md section 4.4); ``mode="secagg"``: ``params`` holds a
        secure-aggregation phase's input bytes (``spec``: one uint8 entry of that length), answered by a
        ``secagg`` result (section 4.5)."""
        job = self._job(rnd, params, spec, seed, configs, deadline_s, events, False, stages, needs_segment)
        job.mode, job.encode = mode, encode
        if mode == "secagg":  # the frame is the phase's input bytes, not params (PROTOCOL.md section 4.5)
            frame = params.frames[0]
            job.descs = [["uint8", [spec.size], "raw" if len(frame) == spec.size else "lz4", len(frame)]]
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
             exclusive: bool, stages: list[Any] | None = None, needs_segment: Sequence[str] = ()) -> _Round:
        if self._thread is None:
            raise ConfigError("the gateway is not started", fix="call start() first")
        # random ids below 2**53: exact in every implementation, also one whose numbers are doubles (JavaScript)
        tasks = {cid: _Task(pos, cid, secrets.randbits(53), cfg) for pos, (cid, cfg) in enumerate(configs.items())}
        frame = params.frames[0]
        descs = [[spec.carrier, [spec.size], "raw" if len(frame) == spec.nbytes else "lz4", len(frame)]]
        spec_wire = [[e.name, list(e.shape), e.dtype] for e in spec.entries]
        return _Round(next(self._job_ids), rnd, seed, spec, params, time.monotonic() + deadline_s, deadline_s,
                      tasks, events, exclusive, spec_wire=spec_wire, descs=descs, stages=stages,
                      needs_segment=tuple(needs_segment))

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

    def _send(self, sock: zmq.Socket[Any], rid: bytes, msg_type: str, fields: dict[str, Any],
              tensor_frames: Frames | None = None, descs: list[Any] | None = None) -> None:
        self._seq += 1
        frames: Frames
        if tensor_frames is None:
            frames = list(encode(msg_type, self._seq, fields))
        else:  # the round's params, encoded once, travel with each agent's own envelope
            info = self.agents.get(rid)
            if info is not None and info.caps.get("parts") is True and needs_parts(tensor_frames,
                                                                                   self.limits.part_bytes):
                # in parts: the agent hears from the gateway all along a slow download (PROTOCOL.md 5.1)
                self._xfer += 1
                for part in part_messages(self._seq, self._xfer, tensor_frames, self.limits.part_bytes):
                    try:
                        sock.send_multipart([rid, *part], zmq.NOBLOCK, copy=False)
                    except zmq.ZMQError as e:
                        log.debug("flgraph gateway: cannot send a part to an agent: %s", e)
                        return
                    self._seq += 1
                fields, tensor_frames = {**fields, "xfer": self._xfer}, []
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
        ids: dict[str, Any] = {k: ref[k] for k in ("round", "task") if k in ref}
        self._send(sock, rid, "error", {"code": err.code, "text": err.message[: self.limits.max_text], **ids})

    def _handle(self, sock: zmq.Socket[Any], frames: list[zmq.Frame]) -> None:
        self.counters["received"] += 1
        rid = bytes(frames[0].bytes)
        info = self.agents.get(rid)
        who = f"client {info.client}" if info else f"connection {rid.hex()[:10]}"
        try:
            msg = decode([f.buffer for f in frames[1:]], self.limits, info.inbound if info else None)
        except ProtocolError as e:
            ref = readable_ref(frames[1].buffer) if len(frames) > 1 else {}
            self._reject(sock, rid, e, who, **ref)
            if info is not None and ref.get("t") == "result":  # a refused answer closes the task's slot
                self._answered(info, ref.get("task"))
                hit = self._task_of(info, ref.get("round"), ref.get("task"))
                if hit is not None:
                    self._fail(*hit, f"its result was refused: {e.message}")
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
        if msg.type == "part":  # a slow upload goes on: it counted as a sign of life above
            try:
                info.inbound.add(msg)
            except ProtocolError as e:
                self._reject(sock, rid, e, who)
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
