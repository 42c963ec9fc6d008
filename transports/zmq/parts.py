"""Large messages in parts: a sender cuts the tensor bytes of a message into ``part`` messages, each a sign
of life on arrival, and the receiver puts them together (``transports/PROTOCOL.md`` section 5.1).

A message's frames reach the receiver only when the whole message has arrived, and a connection delivers
in order, so a heartbeat sent after a large message waits behind it: over a slow link both sides would
declare the other lost while the model is still in transit.

Example:
    >>> import numpy as np
    >>> from flgraph.transports.zmq.wire import Limits, decode
    >>> limits = Limits(part_bytes=4)
    >>> frames = encode_parts("result", 1, {"round": 1, "task": 2, "num_samples": 3, "kind": "delta",
    ...                       "metrics": {}}, [np.arange(3, dtype=np.float32)], limits.part_bytes, xfer=9)
    >>> len(frames)  # three parts of 4 bytes, then the result without its frame
    4
    >>> r = Reassembly(limits)
    >>> for f in frames[:-1]:
    ...     r.add(decode(f, limits))
    >>> decode(frames[-1], limits, r).tensors[0].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np

from .wire import PROTOCOL_VERSION, Limits, Message, ProtocolError, encode, tensor_frames

__all__ = ["MAX_PARTS", "Reassembly", "encode_parts", "needs_parts", "part_messages", "split_parts"]


class Reassembly:
    """A receiver's one transfer in progress: the ``part`` messages of a peer, in order, until the message
    they belong to arrives (PROTOCOL.md section 5.1). A part of another transfer starts over.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.xfer = -1
        self.buf = bytearray()
        self.got = 0
        self.index = 0
        self.count = 0

    def add(self, msg: Message) -> None:
        """Keep one ``part``; raises ProtocolError (and forgets the transfer) when it does not fit."""
        f = msg.fields
        chunk = memoryview(msg.tensors[0].data).cast("B")
        if f["index"] == 0:
            top = self.limits.max_tensor_bytes * self.limits.max_tensors
            if f["total"] > top:
                raise ProtocolError("too-large", f"part: a transfer of {f['total']} bytes (limit {top})")
            self.xfer, self.buf, self.got, self.index, self.count = f["xfer"], bytearray(f["total"]), 0, 0, f["count"]
        if (f["xfer"] != self.xfer or f["index"] != self.index or f["count"] != self.count
                or f["total"] != len(self.buf) or self.got + len(chunk) > len(self.buf)):
            self.xfer = -1
            raise ProtocolError("bad-field", f"part {f['index']}/{f['count']} of transfer {f['xfer']} does not "
                                             "follow the parts before it")
        self.buf[self.got : self.got + len(chunk)] = chunk
        self.got += len(chunk)
        self.index += 1

    def take(self, xfer: int) -> memoryview | None:
        """The bytes of transfer ``xfer`` if all its parts came (then forgotten), else None."""
        if xfer != self.xfer or self.index != self.count or self.got != len(self.buf):
            return None
        self.xfer = -1
        buf, self.buf = self.buf, bytearray()
        return memoryview(buf)


MAX_PARTS = 256
"""A transfer has at most this many parts (larger parts for larger messages): the parts of two tasks queued
for one agent stay well under the sockets' high-water marks."""


def split_parts(frames: Sequence[Any], part_bytes: int) -> list[memoryview]:
    """The bytes of ``frames`` (bytes, memoryviews or ``zmq.Frame``) as consecutive slices of at most
    ``max(part_bytes, total / MAX_PARTS)`` bytes (a slice does not cross a frame's end)."""
    out: list[memoryview] = []
    total = sum(len(memoryview(getattr(f, "buffer", f))) for f in frames)
    part_bytes = max(part_bytes, -(-total // MAX_PARTS))
    for f in frames:
        view = memoryview(getattr(f, "buffer", f)).cast("B")
        out += [view[i : i + part_bytes] for i in range(0, len(view), part_bytes)]
    return out


def encode_parts(msg_type: str, seq: int, fields: dict[str, Any], tensors: Sequence[np.ndarray],
                 part_bytes: int, *, xfer: int, compress: str = "auto") -> list[list[bytes | memoryview]]:
    """The messages that carry one message in parts: ``part`` messages (seq, seq + 1, ...), then the
    message itself without its frames, naming ``xfer``. One message, as :func:`encode`, when its tensor
    bytes fit in ``part_bytes`` (or ``part_bytes`` is 0)."""
    descs, frames = tensor_frames(tensors, compress=compress)
    if not needs_parts(frames, part_bytes):
        return [encode(msg_type, seq, fields, tensors, compress=compress)]
    out = part_messages(seq, xfer, frames, part_bytes)
    env = {"v": PROTOCOL_VERSION, "t": msg_type, "seq": seq + len(out),
           **{k: v for k, v in fields.items() if v is not None}, "xfer": xfer, "tensors": descs}
    out.append([msgpack.packb(env, use_bin_type=True)])
    return out


def needs_parts(frames: Sequence[Any], part_bytes: int) -> bool:
    """Whether ``frames`` travel in parts: their bytes exceed ``part_bytes`` (> 0)."""
    return part_bytes > 0 and sum(len(memoryview(getattr(f, "buffer", f))) for f in frames) > part_bytes


def part_messages(seq: int, xfer: int, frames: Sequence[Any], part_bytes: int) -> list[list[bytes | memoryview]]:
    """The ``part`` messages (seq, seq + 1, ...) that carry ``frames``' bytes for transfer ``xfer``."""
    chunks = split_parts(frames, part_bytes)
    total = sum(len(c) for c in chunks)
    out: list[list[bytes | memoryview]] = []
    for i, chunk in enumerate(chunks):
        env = {"v": PROTOCOL_VERSION, "t": "part", "seq": seq + i, "xfer": xfer, "index": i, "count": len(chunks),
               "total": total, "tensors": [["uint8", [len(chunk)], "raw", len(chunk)]]}
        out.append([msgpack.packb(env, use_bin_type=True), chunk])
    return out
