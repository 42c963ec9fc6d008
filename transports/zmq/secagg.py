"""Secure aggregation (SecAgg+) over edge agents: each agent runs its client's phases itself and keeps its
secrets; the gateway routes public keys, encrypted shares and masked inputs (``transports/PROTOCOL.md``
section 4.5).

The driver's side of the protocol is :mod:`flgraph.secure.protocol`'s, unchanged: it calls
``map_clients`` with a phase (:class:`~flgraph.secure.client.AdvertiseKeys`, ``ShareKeys``, ``Unmask``),
and :func:`run_phase` turns it into one ``secagg`` task per client, whose input and answer are bytes laid
out as below. A client whose agent does not answer a phase (away, killed, late) answers ``None``: it left
the round at that phase. On the agent, :class:`DeviceSecrets` runs the same client code
(:mod:`flgraph.secure.client`) with its secrets sealed under a key of the agent's own process (never sent):
what the driver gets back is public keys and ciphertexts only. The masked input comes with the training
task's result (:func:`mask_update`).

Example (the bytes of a ShareKeys input for one neighbour, position 3):
    >>> data = share_input([(3, bytes(32), bytes(range(32)))])
    >>> len(data), _records(data, _NEIGHBOUR)[0][0]
    (69, 3)
"""

from __future__ import annotations

import queue
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from flgraph.errors import ClusterError, ConfigError
from flgraph.params import ParamSpec
from flgraph.rng import stream
from flgraph.secure import ring as rings
from flgraph.secure import shamir
from flgraph.secure.client import AdvertiseKeys, MaskRecord, ShareKeys, Unmask, advertise, masked_input
from flgraph.secure.masks import field_dtype, quantise

if TYPE_CHECKING:
    from .jobs import RoundEvent
    from .transport import ZmqTransport

__all__ = ["PHASES", "DeviceSecrets", "mask_settings", "run_phase", "share_input"]

PHASES = {AdvertiseKeys: "advertise", ShareKeys: "share", Unmask: "unmask"}
VERSION = 1  # the first byte of every phase input and answer
_NEIGHBOUR = struct.Struct(">I32s32s")  # share input: neighbour position, its c public key, its s public key
_BOX = struct.Struct(">II")  # share answer: recipient position, box length, then the box
_REQUEST = struct.Struct(">Ic32sI")  # unmask input: sender position, b"b" or b"s", its c public key, box length
_SHARE = struct.Struct(f">Ic{shamir.SHARE_BYTES}s")  # unmask answer: sender position, kind, the share
KEEP_ROUNDS = 4  # rounds an agent keeps secrets of (a round that failed mid-way leaves them behind)


def _records(data: bytes, rec: struct.Struct, at: int = 1) -> list[tuple[Any, ...]]:
    if (len(data) - at) % rec.size:
        raise ConfigError(f"a secagg phase input of {len(data)} bytes is not whole records of {rec.size}")
    return [rec.unpack_from(data, i) for i in range(at, len(data), rec.size)]


def share_input(neighbours: list[tuple[int, bytes, bytes]]) -> bytes:
    """ShareKeys' input: the version byte, then (position, c public key, s public key) per neighbour."""
    return bytes([VERSION]) + b"".join(_NEIGHBOUR.pack(v, c, s) for v, c, s in neighbours)


def _unmask_input(requests: list[tuple[int, bytes, bytes, str]]) -> bytes:
    out = [bytes([VERSION])]
    for sender, c_pk, box, kind in requests:
        out.append(_REQUEST.pack(sender, kind.encode(), c_pk, len(box)) + box)
    return b"".join(out)


# -- the driver's side -------------------------------------------------------------------------------------

def run_phase(t: ZmqTransport, rnd: int, ids: Any, fn: Any, s_keys: dict[str, list[bytes]]) -> list[Any]:
    """Phase ``fn`` on the agents of ``ids``: answers in the order of ``ids``, ``None`` where a client's agent
    did not answer. ``s_keys[ring]``: the s public keys advertised in the round (ShareKeys sends each client
    its neighbours'; the masking stage needs them)."""
    phase = PHASES[type(fn)]
    ids = [int(c) for c in np.asarray(ids, np.int64).tolist()]
    inputs: list[tuple[dict[str, Any], bytes]] = []
    for i in range(len(ids)):
        base: dict[str, Any] = {"phase": phase, "ring": fn.ring}
        if isinstance(fn, AdvertiseKeys):
            inputs.append(({**base, "position": int(fn.positions[i])}, bytes([VERSION])))
        elif isinstance(fn, ShareKeys):
            _, pos, neighbours = fn.inputs[i]
            s_pk = s_keys[fn.ring]
            inputs.append(({**base, "position": int(pos), "threshold": int(fn.threshold)},
                           share_input([(v, c, s_pk[v]) for v, c in neighbours])))
        else:
            _, pos, requests = fn.inputs[i]
            inputs.append(({**base, "position": int(pos)}, _unmask_input(requests)))
    raw = _on_agents(t, rnd, ids, inputs)
    out: list[Any] = []
    for (cfg, _), answer in zip(inputs, raw):
        out.append(None if answer is None else _decode_answer(phase, answer, cfg["position"]))
        if phase == "advertise" and out[-1] is not None:
            if fn.ring not in s_keys:  # one secure round at a time: the last round's keys are done with
                s_keys.clear()
                s_keys[fn.ring] = [b""] * len(ids)
            s_keys[fn.ring][cfg["position"]] = out[-1][1]
    return out


def _decode_answer(phase: str, data: bytes, pos: int) -> Any:
    if not data or data[0] != VERSION:
        raise ConfigError(f"a secagg {phase} answer of layout version {data[:1].hex() or 'none'}")
    if phase == "advertise":
        if len(data) != 65:
            raise ConfigError(f"a secagg advertise answer of {len(data)} bytes (65 expected)")
        return data[1:33], data[33:65], b""  # b"": the secrets stay on the device
    if phase == "share":
        if len(data) == 1:
            return None  # it aborted: fewer than threshold neighbours advertised keys
        boxes, at = {}, 1
        while at < len(data):
            v, size = _BOX.unpack_from(data, at)
            boxes[int(v)] = bytes(data[at + _BOX.size : at + _BOX.size + size])
            at += _BOX.size + size
        return boxes, b""
    return [(int(s), k.decode(), bytes(y)) for s, k, y in _records(data, _SHARE)]


def _on_agents(t: ZmqTransport, rnd: int, ids: list[int], inputs: list[tuple[dict[str, Any], bytes]]) -> list[Any]:
    """One ``secagg`` task per client, all at once; each one's answer bytes, or None."""
    bundle = t._bundle
    if bundle is None:
        raise ClusterError("the transport was not started", fix="use it through fg.Run(..., transport=...)")
    events: queue.SimpleQueue[RoundEvent] = queue.SimpleQueue()
    jobs = {}
    for i, (cid, (cfg, data)) in enumerate(zip(ids, inputs)):
        blob = np.frombuffer(data, np.uint8)
        spec = ParamSpec.from_shapes([("secagg", (len(data),), "uint8")])
        job = t.gateway.begin_job(rnd, t.gateway.encode_params(blob), spec, bundle.seed, {cid: cfg},
                                  t.deadline_s, events, None, (), mode="secagg")
        jobs[job] = i
    out: list[Any] = [None] * len(ids)
    end = time.monotonic() + t.deadline_s + t._grace()
    try:
        for _ in range(len(ids)):
            left = end - time.monotonic()
            try:
                ev = events.get(timeout=left) if left > 0 else events.get_nowait()
            except queue.Empty:
                break  # the gateway reports every task by its deadline; those not reported did not answer
            if ev.kind == "result" and ev.message is not None and ev.job in jobs:
                out[jobs[ev.job]] = bytes(np.asarray(ev.message.tensors[0], np.uint8))
    finally:
        for job in jobs:
            t.gateway.end_job(job)
    return out


def mask_settings(record: MaskRecord, stage: Any) -> dict[str, Any]:
    """A training task's config for a client that masks its update (PROTOCOL.md section 4.5)."""
    cfg = stage.config
    return {"secagg_ring": record.ring, "secagg_position": int(record.position),
            "secagg_peers": ",".join(str(int(v)) for v, _ in record.neighbours), "secagg_clip": float(cfg.clip),
            "secagg_levels": int(cfg.levels), "secagg_modulus": str(int(cfg.modulus)), "secagg_tag": int(stage.tag)}


# -- the agent's side --------------------------------------------------------------------------------------

class DeviceSecrets:
    """An agent's secure-aggregation state: its client's secrets of the last rounds, sealed under its own
    process's key (:func:`flgraph.secure.ring.hold`), and the s public keys of its neighbours."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rounds: dict[str, dict[str, Any]] = {}

    def _state(self, ring: str) -> dict[str, Any]:
        with self._lock:
            if ring not in self._rounds:
                self._rounds[ring] = {}
                while len(self._rounds) > KEEP_ROUNDS:
                    self._rounds.pop(next(iter(self._rounds)))
            return self._rounds[ring]

    def answer(self, config: dict[str, Any], data: bytes) -> np.ndarray:
        """The answer bytes (uint8) to a ``secagg`` task."""
        phase, ring, pos = config.get("phase"), str(config.get("ring", "")), int(config.get("position", -1))
        if not data or data[0] != VERSION:
            raise ConfigError(f"a secagg task input of layout version {data[:1].hex() or 'none'}; this agent "
                              f"reads version {VERSION}", fix="run agent and gateway of the same release")
        state = self._state(ring)
        if phase == "advertise":
            rings.hold(ring)
            c_pk, s_pk, sealed = advertise(ring, pos)
            state.update(position=pos, keys=sealed)
            out = bytes([VERSION]) + c_pk + s_pk
        elif phase == "share":
            if state.get("position") != pos or "keys" not in state:
                raise ConfigError(f"a share task for position {pos} of a round this agent holds no keys of")
            neighbours = _records(data, _NEIGHBOUR)
            state["s_pk"] = {int(v): s for v, _, s in neighbours}
            answer = ShareKeys(ring, int(config["threshold"]),
                               [(state["keys"], pos, [(int(v), c) for v, c, _ in neighbours])])(_First())
            if answer is None:
                out = bytes([VERSION])
            else:
                boxes, state["shared"] = answer
                out = bytes([VERSION]) + b"".join(_BOX.pack(v, len(b)) + b for v, b in sorted(boxes.items()))
        elif phase == "unmask":
            requests, at = [], 1
            while at < len(data):
                sender, kind, c_pk, size = _REQUEST.unpack_from(data, at)
                at += _REQUEST.size
                requests.append((int(sender), c_pk, bytes(data[at : at + size]), kind.decode()))
                at += size
            shares = Unmask(ring, [(self._shared(ring, pos), pos, requests)])(_First())
            out = bytes([VERSION]) + b"".join(_SHARE.pack(s, k.encode(), y) for s, k, y in shares)
        else:
            raise ConfigError(f"a secagg task of phase {phase!r}", fix="phases: advertise, share, unmask")
        return np.frombuffer(out, np.uint8).copy()

    def _shared(self, ring: str, pos: int) -> bytes:
        state = self._state(ring)
        if state.get("position") != pos or "shared" not in state:
            raise ConfigError(f"a secagg task for position {pos} of a round this agent shared no keys in")
        return bytes(state["shared"])

    def mask(self, config: dict[str, Any], delta: np.ndarray, seed: int, rnd: int, client: int) -> np.ndarray:
        """The masked input of a trained update (MaskedInputCollection), as it travels: the field's unsigned
        integers viewed as the signed ones of the same size (``int32`` for ``M <= 2**32``)."""
        ring, pos = str(config["secagg_ring"]), int(config["secagg_position"])
        modulus = int(config["secagg_modulus"])
        state = self._state(ring)
        s_pk = state.get("s_pk", {})
        peers = [int(v) for v in str(config["secagg_peers"]).split(",") if v]
        if any(v not in s_pk for v in peers):
            raise ConfigError("the masking task names neighbours whose keys this agent was not sent")
        record = MaskRecord(ring, pos, self._shared(ring, pos), tuple((v, s_pk[v]) for v in peers))
        x = quantise(delta, float(config["secagg_clip"]), int(config["secagg_levels"]),
                     stream(seed, int(config["secagg_tag"]), rnd, client))
        y = masked_input(record, x, modulus)
        return y.view(np.int32 if field_dtype(modulus).itemsize == 4 else np.int64)


class _First:
    """The work :mod:`flgraph.secure.client`'s phases take: the agent's one client is their first input."""

    position = 0
