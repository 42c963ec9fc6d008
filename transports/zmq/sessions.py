"""The gateway's agent sessions: who is connected, joins, liveness, and who may connect at all.

:class:`AgentSessions` is the part of the gateway thread that admits an agent (``join`` -> ``accept``: a
client id from the pool or the one it asks for, one session per client, a restarted agent with the same
key replacing its old session), sends heartbeats and drops agents silent for ``liveness`` intervals (their
open tasks fail at once), and publishes a snapshot of the registry for the driver's threads. ``_AllowList``
admits CURVE keys.

Example:
    >>> from flgraph.transports.zmq.sessions import AgentInfo
    >>> info = AgentInfo(b"rid", "s1", 4, "", {}, {"params_cache": True}, 0.0, 0.0)
    >>> info.caches_params, info.working
    (True, [])
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from flgraph.errors import ConfigError

from .parts import Reassembly
from .wire import Limits, Message, ProtocolError

if TYPE_CHECKING:
    from .jobs import Frames, _Round, _Task

__all__ = ["AgentInfo", "AgentSessions"]

log = logging.getLogger("flgraph")


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
    params_held: int = 0  # the params version last sent to that agent's session with its frames (0: none)
    inbound: Any = None  # the agent's transfer in progress (a wire.Reassembly of its part messages)

    @property
    def caches_params(self) -> bool:
        """Whether the agent said it keeps the last params version it received (``caps.params_cache``)."""
        return self.caps.get("params_cache") is True


class AgentSessions:
    """The gateway's registry of agents (a part of :class:`~.gateway.Gateway`): the snapshot methods may be
    called from any thread, the others run on the gateway thread."""

    if TYPE_CHECKING:  # provided by the Gateway and its jobs part
        agents: dict[bytes, AgentInfo]
        by_client: dict[int, bytes]
        counters: dict[str, int]
        limits: Limits
        pool: list[int] | None
        max_agents: int
        heartbeat_s: float
        liveness: int
        _jobs: dict[int, _Round]
        _lock: threading.Lock
        _snapshot: dict[int, AgentInfo]
        _busy: set[int]

        def _send(self, sock: zmq.Socket[Any], rid: bytes, msg_type: str, fields: dict[str, Any],
                  tensor_frames: Frames | None = None, descs: list[Any] | None = None) -> None: ...

        def _reject(self, sock: zmq.Socket[Any], rid: bytes, err: ProtocolError, who: str, **ref: Any) -> None: ...

        def _dispatch(self, sock: zmq.Socket[Any], job: _Round, task: _Task) -> None: ...

        def _fail(self, job: _Round, task: _Task, reason: str) -> None: ...

        def _forget(self, job: _Round) -> None: ...

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

    def _join(self, sock: zmq.Socket[Any], rid: bytes, msg: Message, key: str, now: float) -> None:
        """Admit an agent (``counters["joins"]``: accepted joins; ``"joins_refused"``: refused or deferred)."""
        self.counters["joins_refused"] += 1  # until accepted below
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
        info.inbound = Reassembly(self.limits)
        self.counters["joins_refused"] -= 1
        self.counters["joins"] += 1
        self.agents[rid] = info
        self.by_client[info.client] = rid
        self._publish()
        log.info("flgraph gateway: client %d joined (%s)", info.client, msg.fields.get("agent", "agent"))
        self._send(sock, rid, "accept", {"session": info.session, "client": info.client,
                                         "heartbeat_s": self.heartbeat_s, "liveness": self.liveness,
                                         "max_tensor_bytes": self.limits.max_tensor_bytes,
                                         "part_bytes": self.limits.part_bytes})
        for job in list(self._jobs.values()):  # the client's open tasks go to its new session
            task = job.tasks.get(info.client)
            if job.open and task is not None and not task.finished:
                self._dispatch(sock, job, task)

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


class _AllowList:
    """ZAP credentials provider: a CURVE public key is allowed when it is in the set."""

    def __init__(self, keys: set[bytes]) -> None:
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        ok = bytes(key) in self.keys  # pyzmq passes the Z85 form
        if not ok:
            log.warning("flgraph gateway: refused a connection with a key not on the allow-list")
        return ok
