"""The edge agent: connects out to a gateway, heartbeats, runs the client segment on the device's own data.

The work is a *task function* from a module installed on the device (``flgraph edge --task
my_pkg.tasks:train``); no code travels over the wire and nothing on it is unpickled::

    def train(task: EdgeTask) -> EdgeResult:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in task.arrays().items()})
        ...                                    # train on this device's data, task.config["epochs"], ...
        return EdgeResult(num_samples=len(my_data), weights=trained_flat, metrics={"loss": loss})

It gets an :class:`EdgeTask` (round, client id, seed, the global params as a flgraph ``Params`` -- one
flat float buffer with names, shapes and dtypes -- and the round's config) and returns an
:class:`EdgeResult` (the new ``weights`` or the ``delta`` from the global params, flat or name -> array,
the sample count and metrics); a flgraph ``Update`` with a plain ``delta`` works too.
:func:`flgraph.transports.zmq.tasks.local_train_task` builds one from a torch module and a data loader,
running flgraph's own ``LocalTrain`` on the device.

The agent stands for one client id of the run's population: ``--client-id N`` (or ``client_id=``), or,
without one, the lowest free id the gateway serves (the ``accept`` message says which).

Training runs in a background thread so that heartbeats go on during long training; after
``liveness`` silent heartbeat intervals the agent drops the connection and joins again with exponential
back-off (up to ``max_backoff_s``), so it survives a gateway restart.

Example:
    >>> import numpy as np
    >>> from flgraph.transports.zmq.agent import EdgeResult, EdgeTask
    >>> from flgraph.params import Params, ParamSpec
    >>> spec = ParamSpec.from_arrays({"w": np.zeros(3, np.float32)})
    >>> task = EdgeTask(1, 7, 0, 30.0, Params(spec, np.ones(3, np.float32)), {"epochs": 1})
    >>> EdgeResult(num_samples=10, weights=task.params.flat * 2).flat_delta(task).tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import platform
import random
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import zmq

from flgraph.errors import ConfigError
from flgraph.params import Params, ParamSpec

from .edge_task import EdgeEncoded, EdgeResult, EdgeTask, EdgeValues, TaskFn, load_task, result_of
from .keys import load_public, load_secret
from .parts import Reassembly, encode_parts
from .secagg import DeviceSecrets
from .sockets import readable
from .wire import Limits, Message, ProtocolError, decode, encode

__all__ = ["OWN_SETTINGS", "Agent", "EdgeResult", "EdgeTask", "TaskFn", "load_task"]

#: Error codes that answer a ``join`` it refused: the agent backs off and joins again (PROTOCOL.md 4.1).
JOIN_REFUSALS = frozenset({"bad-field", "duplicate-client", "version", "too-large", "malformed"})

#: The client settings a device's owner may set for their device (``flgraph edge --set NAME=VALUE``).
OWN_SETTINGS = frozenset({"epochs", "steps", "batch_size", "lr", "samples"})

log = logging.getLogger("flgraph")


class Agent:
    """An edge agent: a DEALER socket to ``connect``, a task function, heartbeats and reconnects.

    Args:
        connect: the gateway's endpoint, e.g. ``"tcp://127.0.0.1:5555"``.
        task: the task function (see the module's docstring) or ``"module:function"``.
        client_id: the client this device stands for; ``None``: the gateway assigns one.
        secret_key: this agent's ``NAME.key_secret`` file; ``server_key``: the gateway's public ``.key``
            file (both or neither: CURVE).
        heartbeat_s, liveness: used until the gateway's ``accept`` says its own.
        max_backoff_s: the longest wait between reconnect attempts (back-off doubles from 0.1 s, with jitter).
        give_up_s: stop when no gateway accepted this agent for this long (``None``: never).
        max_tasks: stop after this many tasks (``None``: never).
        threaded: run tasks in a background thread (heartbeats continue); ``False`` runs them inline.
        context: a ``zmq.Context`` to share (many agents in one process); default: a private one.
        allow: the code (import-path patterns such as ``"my_pkg.*"``) that tasks may name for the task
            function to import on this device: a ``train_fn``, an optimizer factory, a loss
            (:mod:`.segment`). Announced at ``join`` (``caps.allow``) so that the driver refuses up front.
        settings: the device owner's own client settings (``epochs``, ``steps``, ``batch_size``, ``lr``,
            ``samples``), which win over the run's (announced at ``join`` as ``caps.set.NAME``).
    """

    def __init__(self, connect: str, task: TaskFn | str, *, client_id: int | None = None,
                 secret_key: str | os.PathLike[str] | None = None, server_key: str | os.PathLike[str] | None = None,
                 heartbeat_s: float = 1.0, liveness: int = 3, limits: Limits | None = None,
                 max_backoff_s: float = 5.0, give_up_s: float | None = None, max_tasks: int | None = None,
                 threaded: bool = True, compress: str = "auto", device: Mapping[str, Any] | None = None,
                 context: zmq.Context[Any] | None = None, name: str = "", allow: Sequence[str] = (),
                 settings: Mapping[str, Any] | None = None) -> None:
        if (secret_key is None) != (server_key is None):
            raise ConfigError("CURVE needs both the agent's secret key and the gateway's public key",
                              fix="pass --key AGENT.key_secret and --server-key GATEWAY.key (or neither)")
        self.connect = connect
        self.task = load_task(task) if isinstance(task, str) else task
        self.client_id = client_id
        self.curve = (load_secret(secret_key), load_public(server_key)) if secret_key and server_key else None
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self.limits = limits or Limits()
        self.max_backoff_s = max_backoff_s
        self.give_up_s = give_up_s
        self.max_tasks = max_tasks
        self.threaded = threaded
        self.compress = compress
        self.device = dict(device) if device is not None else {
            "host": platform.node()[:64], "os": platform.system(), "cpus": os.cpu_count() or 1}
        self.name = name or f"flgraph-agent-{secrets.token_hex(3)}"
        self.allow = tuple(str(p) for p in allow)
        if len(",".join(self.allow)) > self.limits.max_str or any("," in p for p in self.allow):
            raise ConfigError(f"allow={list(self.allow)}: the patterns travel as one comma-separated string of at "
                              f"most {self.limits.max_str} characters", fix="use fewer, broader patterns (my_pkg.*)")
        self.settings = dict(settings or {})
        bad = sorted(set(self.settings) - OWN_SETTINGS)
        if bad:
            raise ConfigError(f"settings={bad}: a device sets only {sorted(OWN_SETTINGS)}",
                              fix="e.g. flgraph edge --set epochs=2 --set lr=0.05")
        for k, v in self.settings.items():
            ok = (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                  and (k == "lr" or float(v).is_integer()))
            if not ok:
                raise ConfigError(f"settings {k}={v!r}: " + ("a positive learning rate" if k == "lr" else
                                                             "a whole number >= 1") + " is needed",
                                  fix="e.g. flgraph edge --set epochs=2 --set lr=0.05")
        self._ctx = context
        self._own_ctx = context is None
        self.session = ""
        self.assigned: int | None = None
        self.tasks_done = 0
        self.secure = DeviceSecrets()  # its client's secure-aggregation secrets (they stay here)
        self.joins = 0
        self.errors: list[tuple[str, str]] = []  # (code, text) from the gateway, the newest last (bounded)
        self.stop_event = threading.Event()
        self._seq = 0
        self._done: tuple[Message, Any, BaseException | None] | None = None
        self._done_lock = threading.Lock()
        self._busy = False
        self._spec_cache: tuple[Any, ParamSpec] | None = None
        self._queued: Message | None = None
        self._params: tuple[int, np.ndarray] | None = None  # (version, params) last received with frames
        self._wake_addr = f"inproc://flgraph-agent-wake-{secrets.token_hex(6)}"
        self._inbound = Reassembly(self.limits)  # the gateway's transfer in progress (part messages)
        self._peer_part_bytes = 0  # the gateway takes parts of at least this size (accept.part_bytes; 0: none)
        self._xfer = 0
        self._joined = False  # this connection's join was accepted

    # -- the loop ---------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped, ``max_tasks`` are done or ``give_up_s`` passes; returns an exit code
        (0: done or stopped; 3: gave up waiting for a gateway)."""
        ctx = self._ctx or zmq.Context()
        self._ctx = ctx
        wake = ctx.socket(zmq.PAIR)
        wake.bind(self._wake_addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(self._wake_addr)
        backoff = 0.1
        last_accepted = time.monotonic()
        try:
            while not self.stop_event.is_set():
                sock = self._socket(ctx)
                try:
                    outcome = self._session(sock, wake)
                finally:
                    sock.close(0)
                if outcome == "done":
                    return 0
                if outcome == "accepted":
                    backoff, last_accepted = 0.1, time.monotonic()
                if self.give_up_s is not None and time.monotonic() - last_accepted > self.give_up_s:
                    log.error("flgraph agent %s: no gateway accepted this agent for %.0f s; giving up", self.name,
                              self.give_up_s)
                    return 3
                wait = backoff * (0.5 + random.random())
                log.info("flgraph agent %s: reconnecting in %.2f s", self.name, wait)
                self.stop_event.wait(wait)
                backoff = min(backoff * 2, self.max_backoff_s)
            return 0
        finally:
            wake.close(0)
            self._wake_tx.close(0)
            if self._own_ctx:
                ctx.term()

    def stop(self) -> None:
        """Ask the loop to end (thread-safe); it says ``disconnect`` to the gateway first."""
        self.stop_event.set()

    def _socket(self, ctx: zmq.Context[Any]) -> zmq.Socket[Any]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.max_tensor_bytes * self.limits.max_tensors
                        + self.limits.max_envelope_bytes)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.max_backoff_s * 1000))
        if self.curve is not None:
            (public, secret), server = self.curve
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            sock.curve_serverkey = server
        sock.connect(self.connect)
        return sock

    def _send(self, sock: zmq.Socket[Any], msg_type: str, fields: dict[str, Any],
              tensors: list[np.ndarray] | None = None) -> None:
        """Send one message; large tensors go first in ``part`` messages when the gateway takes them, so that
        the gateway hears from this agent all along a slow upload (PROTOCOL.md section 5.1)."""
        self._seq += 1
        part = min(self.limits.part_bytes, self._peer_part_bytes) if self._peer_part_bytes else 0
        if tensors and part:
            self._xfer += 1
            messages = encode_parts(msg_type, self._seq, fields, tensors, part, xfer=self._xfer,
                                    compress=self.compress)
            self._seq += len(messages) - 1
        else:
            messages = [encode(msg_type, self._seq, fields, tensors or [], compress=self.compress)]
        for frames in messages:
            try:
                sock.send_multipart(frames, zmq.NOBLOCK, copy=len(frames) == 1)
            except zmq.Again:
                log.warning("flgraph agent %s: the gateway is not reachable; %s not sent", self.name, msg_type)
                return

    def _session(self, sock: zmq.Socket[Any], wake: zmq.Socket[Any]) -> str:
        """One connection: join, then serve. Returns 'done', 'accepted' (then lost) or 'failed'."""
        self._inbound = Reassembly(self.limits)
        self._peer_part_bytes = 0
        self._joined = False
        join: dict[str, Any] = {"agent": f"flgraph-python {self.name}"[:200], "device": self.device,
                                "caps": {"codecs": "raw,lz4", "threaded": self.threaded, "params_cache": True,
                                         "parts": self.limits.part_bytes > 0,
                                         "segment": bool(getattr(self.task, "runs_segment", False)),
                                         "allow": ",".join(self.allow),
                                         **{f"set.{k}": v for k, v in self.settings.items()}}}
        if self.client_id is not None:
            join["client"] = int(self.client_id)
        self._send(sock, "join", join)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        accepted = False
        hb = self.heartbeat_s
        silence = hb * self.liveness
        last_heard = time.monotonic()
        next_beat = last_heard + hb
        while True:
            if self.stop_event.is_set():
                self._send(sock, "disconnect", {"reason": "the agent is stopping"})
                return "done"
            now = time.monotonic()
            ready = dict(poller.poll(int(max(0.0, min(next_beat, last_heard + silence) - now) * 1000) + 1))
            if wake in ready:  # EVENTS, not poll(0): Socket.poll builds a Poller each call
                while readable(wake):
                    wake.recv(zmq.NOBLOCK)
                if self._finish(sock):
                    self._send(sock, "disconnect", {"reason": "max_tasks done"})
                    return "done"
            if sock in ready:
                for _ in range(100):
                    if not readable(sock):  # no zmq.Again raised per batch
                        break
                    frames = [f.buffer for f in sock.recv_multipart(zmq.NOBLOCK, copy=False)]
                    last_heard = time.monotonic()
                    verdict = self._handle(sock, frames)
                    if verdict == "accepted":
                        accepted = True
                        hb, silence = self.heartbeat_s, self.heartbeat_s * self.liveness
                    elif verdict is not None:
                        return "accepted" if accepted else verdict
            if self.max_tasks is not None and self.tasks_done >= self.max_tasks:
                self._send(sock, "disconnect", {"reason": "max_tasks done"})
                return "done"
            now = time.monotonic()
            if now - last_heard > silence:
                log.warning("flgraph agent %s: no word from the gateway for %.1f s; reconnecting", self.name,
                            now - last_heard)
                return "accepted" if accepted else "failed"
            if accepted and now >= next_beat:
                self._send(sock, "heartbeat", {})
                next_beat = now + hb

    def _handle(self, sock: zmq.Socket[Any], frames: list[memoryview]) -> str | None:
        try:
            msg = decode(frames, self.limits, self._inbound)
            if msg.type == "part":
                self._inbound.add(msg)
                return None
        except ProtocolError as e:
            # Logged, never answered: an error answered with an error could ping-pong forever.
            log.warning("flgraph agent %s: rejected a message from the gateway: %s", self.name, e.message)
            return None
        if msg.type == "accept":
            self._joined = True
            self.session = msg.fields["session"]
            self.assigned = msg.fields["client"]
            self.heartbeat_s = max(0.05, msg.fields["heartbeat_s"])
            self.liveness = max(1, msg.fields["liveness"])
            self._peer_part_bytes = int(msg.fields.get("part_bytes", 0))
            self.joins += 1
            log.info("flgraph agent %s: joined as client %d", self.name, self.assigned)
            return "accepted"
        if msg.type == "task":
            if self.assigned is None or msg.fields["client"] != self.assigned:
                self._send(sock, "error", {"code": "bad-field", "text": "a task for another client",
                                           "round": msg.fields["round"], "task": msg.fields["task"]})
            elif not self._resolve_params(msg):
                self._send(sock, "error", {"code": "unknown-params", "text": f"this agent does not hold params "
                                           f"version {msg.fields['params']}", "round": msg.fields["round"],
                                           "task": msg.fields["task"]})
            elif self._busy:
                self._queued = msg  # the newest task waits for the one in progress (bounded: one slot)
            else:
                self._start(sock, msg)
            return None
        if msg.type == "error":
            code, text = msg.fields["code"], msg.fields["text"]
            self.errors = [*self.errors[-31:], (code, text)]
            log.warning("flgraph agent %s: the gateway says %s: %s", self.name, code, text[:300])
            if code == "unknown-session":
                return "rejoin"
            if not self._joined and code in JOIN_REFUSALS:  # refused: back off now, not after a silence
                return "refused"
            return None
        if msg.type == "reconnect-later":
            wait = min(msg.fields["retry_s"], 60.0)
            log.info("flgraph agent %s: the gateway asks to reconnect in %.1f s (%s)", self.name, wait,
                     msg.fields["reason"][:200])
            self.stop_event.wait(wait)
            return "later"
        if msg.type == "disconnect":
            log.info("flgraph agent %s: the gateway disconnected (%s)", self.name, msg.fields.get("reason", ""))
            return "disconnected"
        return None  # heartbeat

    # -- tasks ------------------------------------------------------------------------------------------
    def _resolve_params(self, msg: Message) -> bool:
        """Keep a task's params as the version it names, or give a frameless task the params of the version
        it names (the last one received); False when this agent does not hold that version."""
        version = msg.fields.get("params")
        if msg.tensors:
            if version is not None:
                self._params = (version, msg.tensors[0])  # one version kept: a view of the received frame
            return True
        if self._params is None or self._params[0] != version:
            return False
        msg.tensors = [self._params[1]]
        return True

    def _start(self, sock: zmq.Socket[Any], msg: Message) -> None:
        self._busy = True
        if self.threaded:
            threading.Thread(target=self._work, args=(msg,), name=f"{self.name}-task", daemon=True).start()
        else:
            self._work(msg)
            self._finish(sock)

    def _work(self, msg: Message) -> None:
        out: Any = None
        err: BaseException | None = None
        try:
            f = msg.fields
            if f.get("mode") == "secagg":  # a phase of secure aggregation: the agent's own work, not the task's
                out = (self.secure.answer(f["config"], bytes(np.asarray(msg.tensors[0], np.uint8))), 0, {},
                       {"kind": "secagg"})
            else:
                spec = self._spec_of(f["spec"])
                flat = np.asarray(msg.tensors[0], dtype=spec.carrier)  # read-only: copy it before writing to it
                task = EdgeTask(f["round"], f["client"], f["seed"], f["deadline_s"], Params(spec, flat), f["config"],
                                f.get("stages"), self.allow, dict(self.settings), f.get("mode", "train"),
                                f.get("encode"))
                answer = self.task(task)
                if task.mode == "evaluate" or isinstance(answer, EdgeValues):
                    if not isinstance(answer, EdgeValues) or task.mode != "evaluate":
                        raise ConfigError(f"a {task.mode} task answered with {type(answer).__name__}",
                                          fix="answer train tasks with EdgeResult, evaluate tasks with EdgeValues")
                    values = np.array([float(v) for v in answer.values], np.float64)
                    out = (values, max(0, int(values[0])) if values.size else 0, {}, {"kind": "values"})
                elif isinstance(answer, EdgeEncoded):
                    if answer.codec != task.encode:
                        raise ConfigError(f"the task answered in codec {answer.codec!r}; the gateway takes "
                                          f"{task.encode!r}", fix="answer with the codec the task names in encode")
                    out = (np.ascontiguousarray(answer.frame, np.uint8).reshape(-1), int(answer.num_samples),
                           {k: float(v) for k, v in answer.metrics.items()}, {"kind": "encoded", "codec": answer.codec})
                else:
                    out = (*result_of(answer, task), {"kind": "delta"})
                    if "secagg_ring" in task.config:  # SecureMask: the update leaves the device masked
                        masked = self.secure.mask(task.config, out[0], task.seed, task.round, task.client)
                        out = (masked, out[1], out[2], {"kind": "masked"})
        except BaseException as e:  # reported to the gateway as this client's failure
            err = e
        with self._done_lock:
            self._done = (msg, out, err)
        if self.threaded:
            with contextlib.suppress(zmq.ZMQError):
                self._wake_tx.send(b"", zmq.NOBLOCK)

    def _spec_of(self, entries: list[tuple[str, tuple[int, ...], str]]) -> ParamSpec:
        """The task's ParamSpec; the same model comes every round, so the last one is reused."""
        cached = self._spec_cache
        if cached is None or cached[0] != entries:  # decode gives (name, shape tuple, dtype) entries
            cached = self._spec_cache = (list(entries), ParamSpec.from_shapes(list(entries)))
        return cached[1]

    def _finish(self, sock: zmq.Socket[Any]) -> bool:
        """Send the finished task's result (or error); start the queued one. True when max_tasks are done."""
        with self._done_lock:
            done, self._done = self._done, None
        if done is None:
            return False
        msg, out, err = done
        self._busy = False
        ref = {"round": msg.fields["round"], "task": msg.fields["task"]}
        if err is not None:
            text = f"{type(err).__name__}: {err}"
            log.warning("flgraph agent %s: the task failed in round %d: %s", self.name, ref["round"], text[:300])
            self._send(sock, "error", {"code": "task-failed", "text": text[:4000], **ref})
        else:
            delta, n, metrics, kind = out
            self._send(sock, "result", {**ref, "num_samples": n, **kind,
                                        "metrics": dict(list(metrics.items())[: self.limits.max_map])}, [delta])
        self.tasks_done += 1
        queued, self._queued = self._queued, None
        if queued is not None:
            self._start(sock, queued)
        return self.max_tasks is not None and self.tasks_done >= self.max_tasks
