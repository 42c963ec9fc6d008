"""Model parameters as ONE flat contiguous numpy buffer plus a :class:`ParamSpec`.

Aggregation, compression, the wire format and checkpoints all work on the flat buffer; torch only
ever sees zero-copy views of it (see :mod:`flgraph.models.adapter`). This module does not import torch.

The buffer has one *carrier* dtype (float32, or float64 when the model holds a float64 tensor).
Entries of another dtype (an int64 BatchNorm counter, a float16 weight) are carried in it and cast
back to their own dtype when they are loaded into a module; integers are carried exactly up to 2**24
(float32) and a larger one is refused when packing.

Example:
    >>> import numpy as np
    >>> from flgraph.params import ParamSpec, Params
    >>> spec = ParamSpec.from_arrays({"w": np.ones((2, 3), np.float32), "b": np.zeros(3, np.float32)})
    >>> p = Params.pack(spec, {"w": np.ones((2, 3), np.float32), "b": np.arange(3, dtype=np.float32)})
    >>> p.flat.shape, p["b"].tolist()
    ((9,), [0.0, 1.0, 2.0])
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["Entry", "ParamSpec", "Params", "all_finite"]

_EXACT_INT = {np.dtype(np.float32): 2**24, np.dtype(np.float64): 2**53}


@dataclass(frozen=True)
class Entry:
    """One named tensor inside the flat buffer: ``flat[offset : offset + size]`` reshaped to ``shape``."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    size: int


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes, dtypes and offsets of a model's tensors within one flat buffer.

    Example:
        >>> import numpy as np
        >>> spec = ParamSpec.from_arrays({"a": np.zeros((2, 2), np.float32), "n": np.zeros((), np.int64)})
        >>> spec.size, spec.carrier, [e.dtype for e in spec.entries]
        (5, 'float32', ['float32', 'int64'])
    """

    entries: tuple[Entry, ...]
    carrier: str

    @staticmethod
    def from_shapes(items: list[tuple[str, tuple[int, ...], str]]) -> ParamSpec:
        """Build a spec from ``(name, shape, dtype)`` triples, in order."""
        dtypes = {np.dtype(d) for _, _, d in items}
        carrier = np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)
        entries, offset, seen = [], 0, set()
        for name, shape, dtype in items:
            if name in seen:
                raise ConfigError(f"duplicate tensor name {name!r} in a ParamSpec", fix="give every tensor one name")
            seen.add(name)
            kind = np.dtype(dtype).kind
            if kind not in "fiub":
                raise ConfigError(
                    f"tensor {name!r} has dtype {dtype}, which flgraph cannot carry",
                    fix="use float, int or bool tensors in the model's state",
                )
            size = int(np.prod(shape, dtype=np.int64))
            entries.append(Entry(name, tuple(int(s) for s in shape), np.dtype(dtype).name, offset, size))
            offset += size
        return ParamSpec(tuple(entries), carrier.name)

    @staticmethod
    def from_arrays(arrays: Mapping[str, np.ndarray]) -> ParamSpec:
        """Build a spec describing ``arrays`` (name -> array), in mapping order."""
        return ParamSpec.from_shapes([(k, tuple(v.shape), np.asarray(v).dtype.name) for k, v in arrays.items()])

    @property
    def size(self) -> int:
        """Number of elements of the flat buffer."""
        return self.entries[-1].offset + self.entries[-1].size if self.entries else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the flat buffer."""
        return self.size * np.dtype(self.carrier).itemsize

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def entry(self, name: str) -> Entry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(f"no tensor named {name!r}; the model has {self.names}")

    def empty(self) -> np.ndarray:
        """A new, uninitialised flat buffer of the carrier dtype."""
        return np.empty(self.size, dtype=self.carrier)

    def describe(self) -> str:
        """A one-line summary, e.g. ``6 tensors, 199,210 values, float32, 797 KB``."""
        return f"{len(self.entries)} tensors, {self.size:,} values, {self.carrier}, {self.nbytes / 1e3:,.0f} KB"


class Params:
    """A flat buffer of model parameters with its :class:`ParamSpec`.

    ``params[name]`` is a zero-copy view of one tensor, in the carrier dtype.

    Example:
        >>> import numpy as np
        >>> spec = ParamSpec.from_arrays({"w": np.zeros(4, np.float32)})
        >>> p = Params(spec, np.arange(4, dtype=np.float32))
        >>> p["w"][1] = 7.0
        >>> p.flat.tolist()
        [0.0, 7.0, 2.0, 3.0]
    """

    __slots__ = ("flat", "spec")

    def __init__(self, spec: ParamSpec, flat: np.ndarray) -> None:
        flat = np.asarray(flat)
        if flat.ndim != 1 or flat.size != spec.size:
            raise ConfigError(f"a flat buffer of {flat.size} values does not fit a spec of {spec.size}")
        if flat.dtype != np.dtype(spec.carrier):
            raise ConfigError(f"a flat buffer of dtype {flat.dtype} does not fit a {spec.carrier} spec")
        self.spec = spec
        self.flat = flat

    @staticmethod
    def pack(spec: ParamSpec, arrays: Mapping[str, Any]) -> Params:
        """Copy ``arrays`` (name -> array-like) into a new flat buffer laid out by ``spec``."""
        flat = spec.empty()
        missing = [e.name for e in spec.entries if e.name not in arrays]
        if missing:
            raise ConfigError(f"arrays for {missing} are missing", fix="pass every tensor the spec names")
        carrier = np.dtype(spec.carrier)
        for e in spec.entries:
            a = np.asarray(arrays[e.name])
            if a.shape != e.shape:
                raise ConfigError(f"tensor {e.name!r} has shape {a.shape}, the spec says {e.shape}")
            if a.dtype.kind in "iu" and a.size and int(np.abs(a).max()) > _EXACT_INT[carrier]:
                raise ConfigError(
                    f"integer tensor {e.name!r} holds {int(np.abs(a).max())}, more than {carrier} carries exactly",
                    fix="keep large counters out of the model state (register them with persistent=False)",
                )
            flat[e.offset : e.offset + e.size] = a.reshape(-1)
        return Params(spec, flat)

    def __getitem__(self, name: str) -> np.ndarray:
        e = self.spec.entry(name)
        return self.flat[e.offset : e.offset + e.size].reshape(e.shape)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, view)`` pairs in the carrier dtype."""
        for e in self.spec.entries:
            yield e.name, self.flat[e.offset : e.offset + e.size].reshape(e.shape)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Copies of every tensor in its own dtype (ints and halves cast back from the carrier)."""
        out: dict[str, np.ndarray] = {}
        for e in self.spec.entries:
            v = self.flat[e.offset : e.offset + e.size].reshape(e.shape)
            out[e.name] = v.astype(e.dtype) if e.dtype != self.spec.carrier else v.copy()
        return out

    def copy(self) -> Params:
        return Params(self.spec, self.flat.copy())

    @property
    def nbytes(self) -> int:
        return int(self.flat.nbytes)

    def __repr__(self) -> str:
        return f"Params({self.spec.describe()})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Params, (self.spec, self.flat))


def all_finite(values: np.ndarray) -> bool:
    """Whether every value of a float (or complex) array is finite (no NaN, no inf); other dtypes always are.

    One BLAS pass that allocates nothing (``np.isfinite(a).all()`` writes a mask as large as a quarter of
    the array and reads it again, about 2-3x slower on a W1 update): a NaN or inf anywhere makes the dot
    product non-finite. A finite array whose squares overflow (values beyond about 1e19 in float32) gets
    the exact check, so it is never refused.

    Example:
        >>> import numpy as np
        >>> all_finite(np.ones(3, np.float32)), all_finite(np.array([1.0, np.nan])), all_finite(np.array([1e30]))
        (True, False, True)
    """
    kind = values.dtype.kind
    if kind not in "fc":
        return True
    flat = values.reshape(-1)
    if flat.size <= 4096:  # below this the mask is cheaper than entering np.errstate (a few microseconds)
        return bool(np.isfinite(flat).all())
    if kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            if math.isfinite(float(np.dot(flat, flat))):
                return True
    return bool(np.isfinite(flat).all())
