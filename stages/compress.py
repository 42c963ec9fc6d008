"""Compress: encode the client's update for the upload; it is decoded before aggregation (client stage).

Codecs shipped here: ``"lz4"`` (lossless: the float bytes are shuffled by byte plane, then lz4-compressed)
and ``"fp16"`` (a cast to float16, half the bytes). Each update records its bytes before and after, and
the round's metrics report ``bytes_up`` (encoded) next to ``bytes_up_raw``. Any object with
``name``, ``encode(delta)``, ``decode(payload, spec)`` and ``nbytes(payload)`` is a codec.

Example:
    >>> import numpy as np
    >>> from flgraph.stages.compress import LZ4, Float16
    >>> d = np.zeros(1000, np.float32)
    >>> c = LZ4(); payload = c.encode(d); c.nbytes(payload) < d.nbytes
    True
    >>> Float16().nbytes(Float16().encode(d))
    2000
"""

from __future__ import annotations

from typing import Any, ClassVar

import lz4.frame
import numpy as np

from flgraph.context import ClientWork, Codec
from flgraph.errors import ConfigError
from flgraph.graph import ClientStage
from flgraph.params import ParamSpec

__all__ = ["LZ4", "Compress", "Float16"]


class LZ4:
    """Lossless: byte-shuffle the floats (all first bytes, then all second bytes, ...) and lz4 them."""

    name = "lz4"

    def __init__(self, level: int = 0) -> None:
        self.level = level

    def encode(self, delta: np.ndarray) -> bytes:
        planes = np.ascontiguousarray(delta).view(np.uint8).reshape(-1, delta.dtype.itemsize).T
        return bytes(lz4.frame.compress(np.ascontiguousarray(planes).tobytes(), compression_level=self.level))

    def decode(self, payload: bytes, spec: ParamSpec) -> np.ndarray:
        itemsize = np.dtype(spec.carrier).itemsize
        planes = np.frombuffer(lz4.frame.decompress(payload), np.uint8).reshape(itemsize, -1)
        return np.ascontiguousarray(planes.T).view(spec.carrier).reshape(-1)

    def nbytes(self, payload: bytes) -> int:
        return len(payload)

    def __repr__(self) -> str:
        return f"LZ4(level={self.level})"


class Float16:
    """Lossy: cast to float16 for the upload (values beyond +-65504 saturate to inf and are refused)."""

    name = "fp16"

    def encode(self, delta: np.ndarray) -> np.ndarray:
        big = float(np.abs(delta).max()) if delta.size else 0.0
        if big >= 65520.0:  # rounds to inf in float16 (65504 is the largest finite value)
            raise ConfigError(f"the update holds {big:.3g}, beyond float16's range (65504)",
                              fix="clip updates before Compress, or use codec='lz4'")
        return delta.astype(np.float16)

    def decode(self, payload: np.ndarray, spec: ParamSpec) -> np.ndarray:
        out = payload.astype(spec.carrier)
        if not np.isfinite(out).all():
            raise ConfigError("an fp16-encoded update overflowed float16's range (|x| > 65504)",
                              fix="clip updates before Compress, or use codec='lz4'")
        return out

    def nbytes(self, payload: np.ndarray) -> int:
        return int(payload.nbytes)

    def __repr__(self) -> str:
        return "Float16()"


CODECS: dict[str, type] = {"lz4": LZ4, "fp16": Float16}


class Compress(ClientStage):
    """Encode the update with ``codec`` (a name: ``"lz4"``, ``"fp16"``, or a codec object)."""

    requires: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(self, codec: str | Codec = "lz4") -> None:
        if isinstance(codec, str):
            if codec not in CODECS:
                raise ConfigError(f"unknown codec {codec!r}", fix=f"use one of {sorted(CODECS)} or a codec object")
            codec = CODECS[codec]()
        for attr in ("encode", "decode", "nbytes"):
            if not callable(getattr(codec, attr, None)):
                raise ConfigError(f"codec {codec!r} has no {attr}() method")
        self.codec: Any = codec

    def run(self, work: ClientWork) -> None:
        assert work.update is not None
        work.update.encoded_with(self.codec)
