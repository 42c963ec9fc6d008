"""The flgraph edge wire format: one msgpack envelope frame, then raw (optionally lz4) tensor frames.

Nothing on the wire is unpickled: the envelope is a msgpack map of plain values, checked field by field
against the message type's schema (:data:`SCHEMAS`), and each tensor frame is described in the envelope
by dtype (from a short allow-list), shape, codec and byte count before a single byte of it is read.
Every size and count is bounded by a :class:`Limits`. Anything else raises :class:`ProtocolError` with a
machine-readable ``code``. The format is specified in ``transports/PROTOCOL.md``.

Example:
    >>> import numpy as np
    >>> from flgraph.transports.zmq.wire import Limits, decode, encode
    >>> frames = encode("result", 7, {"round": 3, "task": 11, "num_samples": 64, "kind": "delta",
    ...                               "metrics": {"loss": 0.5}}, [np.zeros(1000, np.float32)])
    >>> msg = decode(frames, Limits())
    >>> msg.type, msg.seq, msg.fields["num_samples"], msg.tensors[0].shape
    ('result', 7, 64, (1000,))
    >>> decode([b"\\x93garbage"], Limits())
    Traceback (most recent call last):
    ...
    flgraph.transports.zmq.wire.ProtocolError: malformed: the envelope is not valid msgpack (...)
      fix: ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lz4.block
import msgpack
import numpy as np

from flgraph.errors import FlgraphError

if TYPE_CHECKING:
    from .parts import Reassembly

__all__ = ["DTYPES", "PROTOCOL_VERSION", "SCHEMAS", "Limits", "Message", "ProtocolError", "decode", "encode",
           "readable_ref", "tensor_frames"]

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a peer with another version is refused (code ``version``)."""

DTYPES = ("float32", "float64", "float16", "int64", "int32", "uint8")
"""Tensor dtypes allowed on the wire (little-endian)."""

CODECS = ("raw", "lz4")
_WIRE_DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPES}  # wire name -> little-endian dtype
_WIRE_NAMES = {dt: name for name, dt in _WIRE_DTYPES.items()}  # the reverse (native little-endian too)
MAX_INT = 2**63 - 1
MAX_EXACT = 2**53  # the largest whole number every double holds exactly (and the task ids' bound)


class ProtocolError(FlgraphError):
    """A message that breaks the edge protocol (``transports/PROTOCOL.md``); ``code`` names the rule.

    Example:
        >>> e = ProtocolError("too-large", "the envelope has 70000 bytes (limit 65536)")
        >>> e.code, str(e).splitlines()[0]
        ('too-large', 'too-large: the envelope has 70000 bytes (limit 65536)')
    """

    def __init__(self, code: str, message: str, *, fix: str | None = None) -> None:
        self.code = code
        super().__init__(f"{code}: {message}",
                         fix=fix or "the peer must speak flgraph edge protocol "
                                    f"v{PROTOCOL_VERSION} (transports/PROTOCOL.md)")


@dataclass(frozen=True)
class Limits:
    """Bounds on every size and count a peer may send (both sides enforce them).

    Example:
        >>> Limits().max_envelope_bytes, Limits(max_tensor_bytes=1 << 20).max_tensor_bytes
        (65536, 1048576)
    """

    max_envelope_bytes: int = 64 * 1024
    max_tensors: int = 4
    max_tensor_bytes: int = 256 * 1024 * 1024
    max_ndim: int = 8
    max_str: int = 1024
    max_text: int = 4096
    max_map: int = 64
    max_spec_entries: int = 4096
    max_num_samples: int = 2**40
    part_bytes: int = 1 << 20  # a sender splits tensor bytes above this into `part` messages (0: never)

    @property
    def max_frames(self) -> int:
        return 1 + self.max_tensors


@dataclass
class Message:
    """A decoded, checked message: its ``type``, sender ``seq``, schema ``fields`` and ``tensors``."""

    type: str
    seq: int
    fields: dict[str, Any] = field(default_factory=dict)
    tensors: list[np.ndarray] = field(default_factory=list)
    wire_nbytes: int = 0


# -- schemas ----------------------------------------------------------------------------------------
# field -> (kind, required). Kinds: int (0..2**63-1), float (finite), str, text, bool, scalars (a map of
# str -> int/float/str/bool), floats (a map of str -> finite float), spec ([[name, shape, dtype], ...]),
# stages (the client segment: a list of maps of plain data, see _plain).
SCHEMAS: dict[str, tuple[dict[str, tuple[str, bool]], int]] = {
    "join": ({"client": ("int", False), "agent": ("str", False), "caps": ("scalars", False),
              "device": ("scalars", False)}, 0),
    "accept": ({"session": ("str", True), "client": ("int", True), "heartbeat_s": ("float", True),
                "liveness": ("int", True), "max_tensor_bytes": ("int", True), "part_bytes": ("int", False)}, 0),
    "task": ({"round": ("int", True), "task": ("int", True), "client": ("int", True),
              "deadline_s": ("float", True), "seed": ("int", True), "config": ("scalars", True),
              "spec": ("spec", True), "params": ("int", False), "stages": ("stages", False),
              "mode": ("str", False), "xfer": ("int", False), "encode": ("str", False)}, 1),
    "result": ({"round": ("int", True), "task": ("int", True), "num_samples": ("int", True),
                "kind": ("str", True), "metrics": ("floats", True), "xfer": ("int", False),
                "codec": ("str", False)}, 1),
    "part": ({"xfer": ("int", True), "index": ("int", True), "count": ("int", True), "total": ("int", True)}, 1),
    "error": ({"code": ("str", True), "text": ("text", True), "round": ("int", False),
               "task": ("int", False)}, 0),
    "heartbeat": ({}, 0),
    "disconnect": ({"reason": ("text", False)}, 0),
    "reconnect-later": ({"retry_s": ("float", True), "reason": ("text", True)}, 0),
}
"""Every message type: its fields (kind, required) and how many tensor frames follow its envelope.

A ``task`` that names a params version (``params``) may come without its tensor frame: the agent then
reuses the params it last received under that version (``transports/PROTOCOL.md``, section 4.3)."""

RESERVED = ("v", "t", "seq", "tensors")


def _reject_ext(code: int, data: bytes) -> Any:
    raise ProtocolError("malformed", f"msgpack extension type {code} is not allowed")


def encode(msg_type: str, seq: int, fields: dict[str, Any], tensors: Sequence[np.ndarray] = (),
           *, compress: str = "auto") -> list[bytes | memoryview]:
    """Frames for one message: the envelope, then one frame per tensor.

    ``compress``: ``"raw"`` (no compression; the frame is a zero-copy view), ``"lz4"``, or ``"auto"``
    (lz4 when 8 KiB sampled across the tensor shrink by at least 10 %: random float weights do not, so
    they travel raw and cost no compression time).
    """
    if msg_type not in SCHEMAS:
        raise ProtocolError("unknown-type", f"cannot encode message type {msg_type!r}")
    env: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": msg_type, "seq": int(seq)}
    for k, v in fields.items():
        if v is not None:
            env[k] = v
    descs, frames = tensor_frames(tensors, compress=compress)
    env["tensors"] = descs
    return [msgpack.packb(env, use_bin_type=True), *frames]


def tensor_frames(tensors: Sequence[np.ndarray], *, compress: str = "auto"
                  ) -> tuple[list[list[Any]], list[bytes | memoryview]]:
    """The envelope's ``tensors`` descriptors and the tensor frames, without an envelope: a sender that
    puts the same tensors under many envelopes (the gateway's params, one envelope per agent) encodes them
    once. ``compress`` as in :func:`encode`.

    Example:
        >>> import numpy as np
        >>> descs, frames = tensor_frames([np.arange(4, dtype=np.float32)], compress="raw")
        >>> descs, len(frames[0])
        ([['float32', [4], 'raw', 16]], 16)
    """
    frames: list[bytes | memoryview] = []
    descs: list[list[Any]] = []
    for t in tensors:
        a = np.ascontiguousarray(t)
        name = _WIRE_NAMES.get(a.dtype)
        if name is None:
            if a.dtype.name not in DTYPES:
                raise ProtocolError("bad-tensor", f"dtype {a.dtype} cannot travel; allowed: {', '.join(DTYPES)}")
            a = a.astype(a.dtype.newbyteorder("<"))  # a big-endian array of an allowed dtype
            name = a.dtype.name
        raw = memoryview(a.reshape(-1).view(np.uint8).data)
        codec = "raw"
        data: bytes | memoryview = raw
        if compress == "lz4" or (compress == "auto" and _compressible(raw)):
            packed = lz4.block.compress(raw, store_size=False)
            if len(packed) < len(raw):
                codec, data = "lz4", packed
        descs.append([name, list(a.shape), codec, len(data)])
        frames.append(data)
    return descs, frames


def _compressible(raw: memoryview) -> bool:
    """Whether lz4 pays: four 2 KiB samples spread over the tensor (the start, the end and two between, so
    that a run of zeros such as a frozen layer's update is seen) shrink by at least 10 %."""
    n = len(raw)
    if n < 256:
        return False
    if n <= 8192:
        sample: bytes | memoryview = raw
    else:
        step = (n - 2048) // 3
        sample = b"".join(raw[i * step : i * step + 2048] for i in range(4))
    return len(lz4.block.compress(sample, store_size=False)) < 0.9 * len(sample)


def decode(frames: Sequence[bytes | memoryview], limits: Limits, parts: Reassembly | None = None) -> Message:
    """Check and decode one message (the frames after the routing id); raises :class:`ProtocolError`.

    A message whose tensor bytes came before it in ``part`` messages (its field ``xfer``) takes them from
    ``parts``, where the receiver collected them."""
    if not frames:
        raise ProtocolError("malformed", "an empty message (no envelope frame)")
    if len(frames) > limits.max_frames:
        raise ProtocolError("too-large", f"{len(frames)} frames (limit {limits.max_frames})")
    head = frames[0]
    if len(head) > limits.max_envelope_bytes:
        raise ProtocolError("too-large", f"the envelope has {len(head)} bytes (limit {limits.max_envelope_bytes})")
    try:
        # msgpack's own bounds only guard memory (the envelope is at most max_envelope_bytes): a map, an array
        # or a string beyond a Limits bound is reported by the schema checks below as too-large
        env = msgpack.unpackb(bytes(head), raw=False, strict_map_key=True, use_list=True,
                              max_str_len=limits.max_envelope_bytes, max_bin_len=0,
                              max_array_len=limits.max_envelope_bytes, max_map_len=limits.max_envelope_bytes,
                              max_ext_len=0, ext_hook=_reject_ext, timestamp=0)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ExtraData, ValueError, StackError, ...)
        raise ProtocolError("malformed", f"the envelope is not valid msgpack ({type(e).__name__}: "
                                         f"{str(e)[:120]})") from None
    if not isinstance(env, dict):
        raise ProtocolError("malformed", f"the envelope is a msgpack {type(env).__name__}, not a map")
    version = env.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError("version", f"protocol version {_short(version)}, this side speaks {PROTOCOL_VERSION}",
                            fix=f"run agent and gateway of the same protocol version ({PROTOCOL_VERSION})")
    msg_type = env.get("t")
    if not isinstance(msg_type, str) or msg_type not in SCHEMAS:
        raise ProtocolError("unknown-type", f"message type {_short(msg_type)}; known: {', '.join(SCHEMAS)}")
    seq = env.get("seq")
    if type(seq) is not int or not 0 <= seq <= MAX_INT:
        raise ProtocolError("bad-field", f"{msg_type}: seq must be an int in 0..2**63-1, got {_short(seq)}")
    schema, n_tensors = SCHEMAS[msg_type]
    out: dict[str, Any] = {}
    for name, (kind, required) in schema.items():
        if name not in env or env[name] is None:
            if required:
                raise ProtocolError("bad-field", f"{msg_type}: the field {name!r} is missing")
            continue
        out[name] = _check(msg_type, name, kind, env[name], limits)
    descs = env.get("tensors", [])
    if not isinstance(descs, list):
        raise ProtocolError("bad-tensor", f"{msg_type}: 'tensors' must be a list")
    if len(descs) == 0 and len(frames) == 1 and msg_type == "task" and "params" in out:
        n_tensors = 0  # the params of the version it names, which the agent already holds
    if "xfer" in out and len(frames) == 1 and n_tensors:
        frames = [frames[0], *_assembled(msg_type, out["xfer"], descs, parts)]
    if len(descs) != n_tensors or len(frames) != 1 + n_tensors:
        raise ProtocolError("bad-tensor", f"{msg_type}: carries {n_tensors} tensor frame(s); the envelope describes "
                                          f"{len(descs)} and {len(frames) - 1} followed")
    tensors = [_tensor(msg_type, d, frames[1 + i], limits) for i, d in enumerate(descs)]
    nbytes = sum(len(f) for f in frames)
    return Message(msg_type, seq, out, tensors, nbytes)


def _assembled(msg_type: str, xfer: int, descs: Any, parts: Reassembly | None) -> list[memoryview]:
    """The tensor frames of a message whose bytes came in ``part`` messages, cut by its descriptors."""
    if parts is None:
        raise ProtocolError("bad-tensor", f"{msg_type}: names transfer {xfer}, but this side takes no parts")
    buf = parts.take(xfer)
    if buf is None:
        raise ProtocolError("bad-tensor", f"{msg_type}: transfer {xfer} did not arrive whole before the message")
    sizes = [d[3] if isinstance(d, list) and len(d) == 4 and type(d[3]) is int and d[3] >= 0 else -1
             for d in (descs if isinstance(descs, list) else [])]
    if -1 in sizes or sum(sizes) != len(buf):
        raise ProtocolError("bad-tensor", f"{msg_type}: its descriptors' nbytes do not add up to the {len(buf)} "
                                          f"bytes of transfer {xfer}")
    out, at = [], 0
    for n in sizes:
        out.append(buf[at : at + n])
        at += n
    return out


def readable_ref(head: bytes | memoryview) -> dict[str, Any]:
    """The type, ``round`` and ``task`` of an envelope that failed its checks but is readable msgpack (the
    error answered to it names them); {} when it is not.

    Example:
        >>> import msgpack
        >>> readable_ref(msgpack.packb({"v": 1, "t": "result", "seq": 1, "round": 3, "task": 9, "num_samples": -1}))
        {'t': 'result', 'round': 3, 'task': 9}
    """
    try:
        env = msgpack.unpackb(bytes(head), raw=False, strict_map_key=False, max_bin_len=0, max_ext_len=0,
                              ext_hook=_reject_ext, timestamp=0)
    except Exception:  # not readable: nothing to name
        return {}
    if not isinstance(env, dict):
        return {}
    out: dict[str, Any] = {}
    if isinstance(env.get("t"), str) and len(env["t"]) <= 64:
        out["t"] = env["t"]
    for k in ("round", "task"):
        v = env.get(k)
        if type(v) is float and v.is_integer():
            v = int(v)
        if type(v) is int and 0 <= v <= MAX_INT:
            out[k] = v
    return out


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def _check(msg_type: str, name: str, kind: str, v: Any, limits: Limits) -> Any:
    where = f"{msg_type}.{name}"
    if kind == "int":
        if type(v) is float and v.is_integer() and 0 <= v <= MAX_EXACT:
            return int(v)  # a whole number sent as a float (a JavaScript agent's numbers are doubles)
        if type(v) is not int or not 0 <= v <= MAX_INT:
            raise ProtocolError("bad-field", f"{where} must be an int in 0..2**63-1, got {_short(v)}")
        return v
    if kind == "float":
        if type(v) not in (int, float) or not math.isfinite(v) or v < 0:
            raise ProtocolError("bad-field", f"{where} must be a finite number >= 0, got {_short(v)}")
        return float(v)
    if kind in ("str", "text"):
        top = limits.max_str if kind == "str" else limits.max_text
        if not isinstance(v, str):
            raise ProtocolError("bad-field", f"{where} must be a string of at most {top} characters")
        if len(v) > top:
            raise ProtocolError("too-large", f"{where}: a string of {len(v)} characters (limit {top})")
        return v
    if kind in ("scalars", "floats"):
        if not isinstance(v, dict):
            raise ProtocolError("bad-field", f"{where} must be a map of at most {limits.max_map} entries")
        if len(v) > limits.max_map:
            raise ProtocolError("too-large", f"{where}: a map of {len(v)} entries (limit {limits.max_map})")
        for k, x in v.items():
            if not isinstance(k, str):
                raise ProtocolError("bad-field", f"{where} has a key that is not a string")
            if len(k) > limits.max_str:
                raise ProtocolError("too-large", f"{where} has a key longer than {limits.max_str} characters")
            if kind == "floats":
                if type(x) not in (int, float) or not math.isfinite(x):
                    raise ProtocolError("bad-field", f"{where}[{k[:40]!r}] must be a finite number, got {_short(x)}")
            elif isinstance(x, str) and len(x) > limits.max_str:
                raise ProtocolError("too-large", f"{where}[{k[:40]!r}]: a string longer than {limits.max_str}")
            elif type(x) not in (int, float, str, bool) or (type(x) is float and not math.isfinite(x)):
                raise ProtocolError("bad-field", f"{where}[{k[:40]!r}] must be a finite number, a bool or a short "
                                                 f"string, got {_short(x)}")
        return {k: (float(x) if kind == "floats" else x) for k, x in v.items()}
    if kind == "spec":
        if isinstance(v, list) and len(v) > limits.max_spec_entries:
            raise ProtocolError("too-large", f"{where}: {len(v)} tensors (limit {limits.max_spec_entries})")
        if not isinstance(v, list) or not v:
            raise ProtocolError("bad-field", f"{where} must list 1..{limits.max_spec_entries} tensors")
        out = []
        for e in v:
            if (not isinstance(e, list) or len(e) != 3 or not isinstance(e[0], str) or len(e[0]) > limits.max_str
                    or not isinstance(e[2], str) or e[2] not in ("float32", "float64", "float16", "int64", "int32",
                                                                 "int16", "int8", "uint8", "bool")):
                raise ProtocolError("bad-field", f"{where} entries must be [name, shape, dtype]")
            out.append((e[0], _shape(where, e[1], limits), e[2]))
        return out
    if kind == "stages":
        if isinstance(v, list) and len(v) > MAX_STAGES:
            raise ProtocolError("too-large", f"{where}: {len(v)} stages (limit {MAX_STAGES})")
        if not isinstance(v, list) or not all(isinstance(e, dict) for e in v):
            raise ProtocolError("bad-field", f"{where} must be a list of at most {MAX_STAGES} maps")
        _plain(where, v, limits, 0)
        return v
    raise AssertionError(kind)


MAX_STAGES = 16
MAX_DEPTH = 8


def _plain(where: str, v: Any, limits: Limits, depth: int) -> None:
    """Plain data only: nil, bools, ints, finite floats, short strings, and arrays / string-keyed maps of at
    most ``max_map`` entries of those, nested at most MAX_DEPTH deep."""
    if v is None or isinstance(v, bool | int):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ProtocolError("bad-field", f"{where}: a non-finite number")
        return
    if isinstance(v, str):
        if len(v) > limits.max_str:
            raise ProtocolError("too-large", f"{where}: a string longer than {limits.max_str} characters")
        return
    if depth >= MAX_DEPTH:
        raise ProtocolError("too-large", f"{where}: nested deeper than {MAX_DEPTH}")
    if isinstance(v, list):
        if len(v) > limits.max_map:
            raise ProtocolError("too-large", f"{where}: an array of more than {limits.max_map} entries")
        for i, x in enumerate(v):
            _plain(f"{where}[{i}]", x, limits, depth + 1)
        return
    if isinstance(v, dict):
        if len(v) > limits.max_map:
            raise ProtocolError("too-large", f"{where}: a map of more than {limits.max_map} entries")
        for k, x in v.items():
            if not isinstance(k, str) or len(k) > limits.max_str:
                raise ProtocolError("bad-field", f"{where} has a key that is not a short string")
            _plain(f"{where}.{k[:40]}", x, limits, depth + 1)
        return
    raise ProtocolError("bad-field", f"{where}: {type(v).__name__} is not plain data")


def _shape(where: str, shape: Any, limits: Limits) -> tuple[int, ...]:
    if isinstance(shape, list) and len(shape) > limits.max_ndim:
        raise ProtocolError("too-large", f"{where}: a shape of {len(shape)} dims (limit {limits.max_ndim})")
    if not isinstance(shape, list) or any(type(s) is not int or not 0 <= s < 2**31 for s in shape):
        raise ProtocolError("bad-tensor", f"{where}: a shape must list at most {limits.max_ndim} ints in 0..2**31-1")
    return tuple(shape)


def _tensor(msg_type: str, desc: Any, frame: bytes | memoryview, limits: Limits) -> np.ndarray:
    where = f"{msg_type}.tensors"
    if not isinstance(desc, list) or len(desc) != 4:
        raise ProtocolError("bad-tensor", f"{where}: a descriptor must be [dtype, shape, codec, nbytes]")
    dtype, shape, codec, nbytes = desc
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError("bad-tensor", f"{where}: dtype {_short(dtype)} is not one of {', '.join(DTYPES)}")
    dims = _shape(where, shape, limits)
    count = 1
    for s in dims:
        count *= s
    wire_dtype = _WIRE_DTYPES[dtype]
    raw_nbytes = count * wire_dtype.itemsize
    if raw_nbytes > limits.max_tensor_bytes:
        raise ProtocolError("too-large", f"{where}: a tensor of {raw_nbytes} bytes (limit {limits.max_tensor_bytes})")
    if not isinstance(codec, str) or codec not in CODECS:
        raise ProtocolError("bad-tensor", f"{where}: codec {_short(codec)} is not one of {', '.join(CODECS)}")
    if type(nbytes) is not int or nbytes != len(frame):
        raise ProtocolError("bad-tensor", f"{where}: the descriptor says {_short(nbytes)} bytes, the frame has "
                                          f"{len(frame)}")
    if codec == "raw":
        if len(frame) != raw_nbytes:
            raise ProtocolError("bad-tensor", f"{where}: a raw {dtype}{list(dims)} needs {raw_nbytes} bytes, "
                                              f"the frame has {len(frame)}")
        data = frame
    else:
        if raw_nbytes == 0 or len(frame) > raw_nbytes + raw_nbytes // 255 + 16:
            raise ProtocolError("bad-tensor", f"{where}: an lz4 frame of {len(frame)} bytes cannot hold "
                                              f"{raw_nbytes} bytes")
        try:
            data = lz4.block.decompress(frame, uncompressed_size=raw_nbytes)
        except Exception as e:
            raise ProtocolError("bad-tensor", f"{where}: the lz4 frame does not decompress to {raw_nbytes} bytes "
                                              f"({type(e).__name__})") from None
        if len(data) != raw_nbytes:
            raise ProtocolError("bad-tensor", f"{where}: the lz4 frame decompressed to {len(data)} bytes, "
                                              f"expected {raw_nbytes}")
    return np.frombuffer(data, dtype=wire_dtype).reshape(dims)
