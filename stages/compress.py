"""Compress: encode the client's update for the upload; it is decoded before aggregation (client stage).

Codecs shipped here:

* ``"lz4"`` — lossless: the float bytes are shuffled by byte plane, then lz4-compressed;
* ``"fp16"`` / ``"bf16"`` — casts to float16 / bfloat16 (round to nearest even), half the bytes;
* ``"int8"`` — :class:`Int8`, uniform symmetric quantization with one float32 scale per tensor or per block
  of values and (by default) unbiased stochastic rounding, seeded per client (about 4x fewer bytes);
* ``"topk"`` — :class:`TopK`, keeps the largest-magnitude fraction of the values (int32 index + float32).

Each update records its bytes before and after, and the round's metrics report ``bytes_up`` (encoded)
next to ``bytes_up_raw``. Any object with ``name``, ``encode(delta)``, ``decode(payload, spec)`` and
``nbytes(payload)`` is a codec; one that also has ``for_client(spec, rng)`` is given the params' layout and
the client's seeded random stream before it encodes (this is how Int8 knows the tensors and rounds
stochastically). Every reducer decodes with ``update.decoded(spec)``, so any codec composes with any
aggregator.

Example:
    >>> import numpy as np
    >>> from flgraph.stages.compress import LZ4, Float16
    >>> d = np.zeros(1000, np.float32)
    >>> c = LZ4(); payload = c.encode(d); c.nbytes(payload) < d.nbytes
    True
    >>> Float16().nbytes(Float16().encode(d))
    2000
    >>> from flgraph.stages.compress import Int8, TopK
    >>> Int8(block=256).nbytes(Int8(block=256).encode(np.ones(1000, np.float32)))  # 1000 int8 + 4 scales
    1016
    >>> TopK(fraction=0.01).nbytes(TopK(fraction=0.01).encode(np.arange(1000, dtype=np.float32)))
    80
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import lz4.frame
import numpy as np

from flgraph.context import ClientWork, Codec
from flgraph.errors import ConfigError
from flgraph.graph import ClientStage
from flgraph.params import ParamSpec
from flgraph.rng import stream

__all__ = ["LZ4", "BFloat16", "Compress", "Float16", "Int8", "TopK"]


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


class BFloat16:
    """Lossy: cast to bfloat16 (float32's exponent, 8 bits of mantissa; round to nearest even), half the bytes.

    numpy has no bfloat16: the payload is the upper 16 bits of each float32, as uint16. Unlike float16 it
    keeps float32's range (no overflow); its relative error is at most 2**-9.
    """

    name = "bf16"

    def encode(self, delta: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(delta, dtype=np.float32).view(np.uint32)
        # round to nearest even on the 16 bits dropped; NaNs keep a set mantissa bit (stay NaN)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        nan = np.isnan(delta)
        if nan.any():
            rounded[nan] = (bits[nan] >> np.uint32(16)) | np.uint32(0x40)
        return rounded.astype(np.uint16)

    def decode(self, payload: np.ndarray, spec: ParamSpec) -> np.ndarray:
        out = (payload.astype(np.uint32) << np.uint32(16)).view(np.float32)
        return out.astype(spec.carrier, copy=spec.carrier != "float32")

    def nbytes(self, payload: np.ndarray) -> int:
        return int(payload.nbytes)

    def __repr__(self) -> str:
        return "BFloat16()"


class Int8:
    """Lossy: uniform symmetric 8-bit quantization, ``q = round(x / s)`` in ``[-127, 127]``, ``s = max|x| / 127``.

    ``block=None`` gives one scale per tensor of the model (read from the params' layout); ``block=B`` one
    scale per run of ``B`` consecutive values of the flat buffer. ``stochastic=True`` rounds up with
    probability equal to the fractional part (unbiased: ``E[decode(encode(x))] = x``), drawing from the
    client's seeded stream; ``False`` rounds to nearest. The payload is the int8 values plus float32 scales:
    for a float32 model, ``4 / (1 + 4 / block)`` times fewer bytes (per tensor: almost exactly 4x).

    Example:
        >>> import numpy as np
        >>> from flgraph.params import ParamSpec
        >>> spec = ParamSpec.from_shapes([("w", (4,), "float32")])
        >>> c = Int8(stochastic=False)
        >>> c.decode(c.encode(np.array([1.27, -0.5, 0.0, 0.01], np.float32)), spec).tolist()
        [1.2699999809265137, -0.5, 0.0, 0.009999999776482582]
    """

    name = "int8"

    def __init__(self, block: int | None = None, *, stochastic: bool = True) -> None:
        if block is not None and block < 1:
            raise ConfigError(f"Int8(block={block}): a block holds at least one value",
                              fix="use block=None (one scale per tensor) or e.g. block=256")
        self.block = block
        self.stochastic = stochastic
        self._bounds: np.ndarray | None = None
        self._rng: np.random.Generator | None = None

    def for_client(self, spec: ParamSpec, rng: np.random.Generator) -> Int8:
        """A copy that knows the params' tensors and rounds with the client's stream ``rng``."""
        c = Int8(self.block, stochastic=self.stochastic)
        c._bounds = np.array([e.offset for e in spec.entries] + [spec.size], np.int64)
        c._rng = rng
        return c

    def _starts(self, n: int) -> np.ndarray:
        if self.block is not None:
            return np.arange(0, n, self.block, dtype=np.int64)
        bounds = self._bounds if self._bounds is not None and self._bounds[-1] == n else np.array([0, n])
        starts = bounds[:-1]
        return starts[starts < n] if n else np.zeros(0, np.int64)

    def encode(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x: np.ndarray = np.asarray(delta, dtype=np.float64 if delta.dtype == np.float64 else np.float32)
        if not np.isfinite(x).all():
            raise ConfigError("Int8 cannot quantize a non-finite update (NaN or inf)",
                              fix="clip updates before Compress, or use codec='lz4'")
        starts = self._starts(x.size)
        amax = np.maximum.reduceat(np.abs(x), starts) if x.size else np.zeros(0, x.dtype)
        scales = (amax / 127.0).astype(np.float32)
        scales[scales == 0] = 1.0  # an all-zero block: any scale gives zeros
        per_value = np.repeat(scales, np.diff(np.append(starts, x.size)))
        y: np.ndarray = x / per_value.astype(x.dtype)
        if self.stochastic:
            rng = self._rng if self._rng is not None else np.random.default_rng(0)
            q = np.floor(y + rng.random(y.size, dtype=y.dtype))
        else:
            q = np.rint(y)
        return np.clip(q, -127, 127).astype(np.int8), scales, starts

    def decode(self, payload: tuple[np.ndarray, np.ndarray, np.ndarray], spec: ParamSpec) -> np.ndarray:
        q, scales, starts = payload
        per_value = np.repeat(scales, np.diff(np.append(starts, q.size)))
        return (q.astype(np.float32) * per_value).astype(spec.carrier, copy=False)

    def nbytes(self, payload: tuple[np.ndarray, np.ndarray, np.ndarray]) -> int:
        """The int8 values and the float32 scales (the block starts follow from the layout: not sent)."""
        return int(payload[0].nbytes + payload[1].nbytes)

    def settings(self) -> dict[str, Any]:
        return {"block": self.block, "stochastic": self.stochastic}

    def __repr__(self) -> str:
        return f"Int8(block={self.block!r}, stochastic={self.stochastic!r})"


class TopK:
    """Lossy: top-k sparsification. Sends the ``ceil(fraction * n)`` values of largest magnitude.

    The payload is their int32 positions and their values (in the carrier dtype); the rest decode as zero.
    Ties are broken by position (the earlier wins), so the encoding is deterministic.
    """

    name = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"TopK(fraction={fraction}): keep a fraction in (0, 1] of the values",
                              fix="e.g. TopK(fraction=0.01) keeps 1%")
        self.fraction = fraction

    def encode(self, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        n = delta.size
        k = min(n, max(1, math.ceil(self.fraction * n))) if n else 0
        if n >= 2**31:
            raise ConfigError(f"TopK indexes with int32, and the update holds {n} values",
                              fix="use Int8 or LZ4 for models above 2**31 values")
        mag = np.abs(delta)
        idx = np.argpartition(-mag, k - 1, kind="introselect")[:k] if 0 < k < n else np.arange(k)
        # deterministic ties: among the k-th magnitude, keep the earliest positions
        if 0 < k < n:
            kth = mag[idx].min()
            above = np.flatnonzero(mag > kth)
            ties = np.flatnonzero(mag == kth)[: k - len(above)]
            idx = np.concatenate([above, ties])
        idx = np.sort(idx).astype(np.int32)
        return idx, np.ascontiguousarray(delta[idx]), n

    def decode(self, payload: tuple[np.ndarray, np.ndarray, int], spec: ParamSpec) -> np.ndarray:
        idx, values, n = payload
        out = np.zeros(n, spec.carrier)
        out[idx] = values
        return out

    def nbytes(self, payload: tuple[np.ndarray, np.ndarray, int]) -> int:
        return int(payload[0].nbytes + payload[1].nbytes)

    def __repr__(self) -> str:
        return f"TopK(fraction={self.fraction!r})"


CODECS: dict[str, type] = {"lz4": LZ4, "fp16": Float16, "bf16": BFloat16, "int8": Int8, "topk": TopK}


class Compress(ClientStage):
    """Encode the update with ``codec`` (a name: ``"lz4"``, ``"fp16"``, ``"bf16"``, ``"int8"``, ``"topk"``,
    or a codec object).

    A codec with ``for_client(spec, rng)`` gets the params' layout and the client's seeded stream
    ``(tag, round, client)`` first.

    ``error_feedback=True`` keeps, per client, what the lossy codec dropped and adds it back the next time
    that client trains (Seide et al. 2014; Karimireddy et al., "Error Feedback Fixes SignSGD and other
    Gradient Compression Schemes", ICML 2019): the client sends ``encode(delta + e)`` and keeps
    ``e = delta + e - decode(encode(delta + e))``. The residual ``e`` is per-client state
    (:mod:`flgraph.store.client_state`): stored on disk, not in memory, and restored exactly on resume. The
    round reports ``residual_norm``, the clients' mean L2 norm of ``e`` after encoding.

    Example:
        >>> from flgraph import stages as st
        >>> st.Compress("topk", error_feedback=True)
        Compress(codec=TopK(fraction=0.01), error_feedback=True)
    """

    requires: ClassVar[frozenset[str]] = frozenset({"update"})

    def __init__(self, codec: str | Codec = "lz4", *, error_feedback: bool = False) -> None:
        if isinstance(codec, str):
            if codec not in CODECS:
                raise ConfigError(f"unknown codec {codec!r}", fix=f"use one of {sorted(CODECS)} or a codec object")
            codec = CODECS[codec]()
        for attr in ("encode", "decode", "nbytes"):
            if not callable(getattr(codec, attr, None)):
                raise ConfigError(f"codec {codec!r} has no {attr}() method")
        self.codec: Any = codec
        self.error_feedback = bool(error_feedback)

    def settings(self) -> dict[str, Any]:
        return {"codec": self.codec, **({"error_feedback": True} if self.error_feedback else {})}

    def client_fields(self, spec: ParamSpec) -> dict[str, tuple[str, int]]:
        return {"residual": (spec.carrier, spec.size)} if self.error_feedback else {}

    def run(self, work: ClientWork) -> None:
        update = work.update
        assert update is not None
        spec = work.global_params.spec
        codec = self.codec
        bind = getattr(codec, "for_client", None)
        if callable(bind):
            codec = bind(spec, stream(work.seed, work.tag, work.round, work.client))
        if not self.error_feedback:
            update.encoded_with(codec)
            return
        assert update.delta is not None
        corrected = update.delta  # the client's own buffer: corrected in place
        residual = work.load_state("residual")
        if residual is not None:
            corrected += residual
        update.encoded_with(codec)
        residual = corrected - update.decoded(spec)
        work.save_state("residual", residual)
        update.metrics["residual_norm"] = float(np.linalg.norm(residual.astype(np.float64, copy=False)))
