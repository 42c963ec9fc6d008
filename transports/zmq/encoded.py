"""Encoded updates on the wire: a lossy ``Compress`` codec's payload travels as it is, not decoded.

When the round's client segment ends with ``Compress`` of a codec listed here, each task names it
(``encode``) and an agent may answer ``kind: "encoded"`` with ``codec`` and ONE ``uint8`` frame laid out as
below (little-endian; ``n`` = the model's flat size, the carrier dtype from ``spec``). The driver rebuilds
the codec's payload and the reducer decodes it as on a Dask worker's update, so the round's ``bytes_up``
counts the encoded bytes, as on Dask.

* ``fp16``: ``n`` float16; ``bf16``: ``n`` uint16 (the upper halves of the float32 values);
* ``int8``: ``n`` int8, then one float32 scale per block (per tensor of ``spec``, or per ``block`` values);
* ``topk``: ``k`` int32 positions (ascending, distinct, below ``n``), then ``k`` values in the carrier dtype,
  with ``k = min(n, max(1, ceil(fraction * n)))``.

Example:
    >>> import numpy as np
    >>> from flgraph.params import ParamSpec
    >>> from flgraph.stages.compress import TopK
    >>> spec = ParamSpec.from_shapes([("w", (8,), "float32")])
    >>> codec = TopK(fraction=0.25)
    >>> payload = codec.encode(np.arange(8, dtype=np.float32))
    >>> frame = pack("topk", payload)
    >>> frame.dtype, frame.size, codec.decode(unpack(codec, frame, spec), spec).tolist()
    (dtype('uint8'), 16, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 6.0, 7.0])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from flgraph.params import ParamSpec

__all__ = ["WIRE_CODECS", "pack", "unpack"]

WIRE_CODECS = ("fp16", "bf16", "int8", "topk")


def pack(name: str, payload: Any) -> np.ndarray:
    """The codec ``name``'s payload as one ``uint8`` frame."""
    if name == "fp16":
        return np.ascontiguousarray(payload, dtype="<f2").view(np.uint8)
    if name == "bf16":
        return np.ascontiguousarray(payload, dtype="<u2").view(np.uint8)
    if name == "int8":
        q, scales, _ = payload
        return np.concatenate([np.ascontiguousarray(q, np.int8).view(np.uint8),
                               np.ascontiguousarray(scales, "<f4").view(np.uint8)])
    if name == "topk":
        idx, values, _ = payload
        return np.concatenate([np.ascontiguousarray(idx, "<i4").view(np.uint8),
                               np.ascontiguousarray(values).view(np.uint8)])
    raise ValueError(f"codec {name!r} does not travel encoded")


def unpack(codec: Any, frame: np.ndarray, spec: ParamSpec) -> Any:
    """``codec``'s payload from a frame of :func:`pack`; ValueError naming what does not fit."""
    raw = np.ascontiguousarray(frame).view(np.uint8).reshape(-1)
    n, carrier = spec.size, np.dtype(spec.carrier).newbyteorder("<")
    name = codec.name

    def need(size: int) -> None:
        if raw.size != size:
            raise ValueError(f"an update encoded with {name} of {raw.size} bytes; the model's needs {size}")

    if name in ("fp16", "bf16"):
        need(2 * n)
        out = raw.view("<f2" if name == "fp16" else "<u2")
        return out.astype(np.float16 if name == "fp16" else np.uint16)
    if name == "int8":
        starts = codec.for_client(spec, None)._starts(n)
        need(n + 4 * len(starts))
        scales = raw[n:].view("<f4").astype(np.float32)
        if not np.isfinite(scales).all():
            raise ValueError("an int8 update with non-finite scales")
        return raw[:n].view(np.int8), scales, starts
    if name == "topk":
        k = min(n, max(1, math.ceil(codec.fraction * n))) if n else 0
        need(k * (4 + carrier.itemsize))
        idx = raw[: 4 * k].view("<i4").astype(np.int32)
        values = raw[4 * k :].view(carrier).astype(spec.carrier)
        if k and (idx[0] < 0 or idx[-1] >= n or (np.diff(idx) <= 0).any()):
            raise ValueError("a top-k update whose positions are not ascending, distinct and within the model")
        if not np.isfinite(values).all():
            raise ValueError("a top-k update with non-finite values")
        return idx, values, n
    raise ValueError(f"codec {name!r} does not travel encoded")
