"""Masks and the modular field of secure aggregation: expansion of agreed keys into uniform vectors mod
``M``, and the clipping and quantisation that bring an update into ``Z_M``.

A mask is the ChaCha20 keystream under a 32-byte key (from :mod:`cryptography`), read as 64-bit words and
reduced into ``[0, M)`` without bias: for a power of two ``M`` the low bits are uniform; otherwise words at
or above the largest multiple of ``M`` below ``2**64`` are rejected and the stream continues. Moduli are at
most ``2**63``, so the sum of two field elements never overflows a ``uint64``; a power of two up to ``2**32``
is computed in ``uint32``, whose wrap-around is the reduction.

Example:
    >>> import numpy as np
    >>> a, b = expand(bytes(32), 5, 2**32), expand(bytes(32), 5, 2**32)
    >>> bool((a == b).all()), bool((a < 2**32).all())
    (True, True)
    >>> x = quantise(np.array([-1.0, 0.0, 1.0], np.float32), 1.0, 5, np.random.default_rng(0))
    >>> x.tolist(), dequantise_sum(x, 1, 1.0, 5).tolist()
    ([0, 2, 4], [-1.0, 0.0, 1.0])
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["MAX_MODULUS", "add_mod", "dequantise_sum", "expand", "quantise", "sub_mod"]

MAX_MODULUS = 2**63


def field_dtype(modulus: int) -> np.dtype[Any]:
    """The dtype field elements live in: ``uint32`` for a power of two up to ``2**32`` (additions then wrap
    modulo ``2**32``, a multiple of ``M``: no division, half the memory), else ``uint64``."""
    return np.dtype(np.uint32) if _power_of_two(modulus) and modulus <= 2**32 else np.dtype(np.uint64)


def _power_of_two(modulus: int) -> bool:
    return modulus & (modulus - 1) == 0


def expand(key: bytes, size: int, modulus: int, label: bytes = b"flgraph-mask") -> np.ndarray:
    """``size`` uniform elements of ``[0, modulus)`` (in :func:`field_dtype`) expanded from ``key`` (32 bytes)
    with the ChaCha20 keystream; ``label`` (at most 16 bytes) separates streams drawn from the same key."""
    if len(key) != 32:
        raise ValueError("a mask key has 32 bytes")
    if not 2 <= modulus <= MAX_MODULUS:
        raise ValueError(f"modulus {modulus} must lie in [2, 2**63]")
    nonce = label[:16].ljust(16, b"\0")
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor()
    dtype = field_dtype(modulus)
    if _power_of_two(modulus):  # the low bits of uniform words are uniform
        words = np.frombuffer(stream.update(bytes(dtype.itemsize * size)), dtype=dtype.newbyteorder("<"))
        words = words.astype(dtype, copy=False)
        return words if modulus == 2 ** (8 * dtype.itemsize) else np.bitwise_and(words, dtype.type(modulus - 1))
    limit = np.uint64((2**64 // modulus) * modulus - 1)  # the largest word kept: no residue is favoured
    out = np.empty(size, np.uint64)
    filled = 0
    while filled < size:
        need = size - filled
        words = np.frombuffer(stream.update(bytes(8 * (need + need // 8 + 8))), dtype="<u8")
        kept = words[words <= limit][:need]
        out[filled : filled + len(kept)] = kept % np.uint64(modulus)
        filled += len(kept)
    return out


def add_mod(acc: np.ndarray, other: np.ndarray, modulus: int) -> np.ndarray:
    """``acc = (acc + other) mod M`` in place (both in ``[0, M)``, in :func:`field_dtype`: no overflow
    beyond a wrap-around modulo a multiple of ``M``)."""
    np.add(acc, other, out=acc)
    return _reduce(acc, modulus)


def sub_mod(acc: np.ndarray, other: np.ndarray, modulus: int) -> np.ndarray:
    """``acc = (acc - other) mod M`` in place."""
    if _power_of_two(modulus):
        np.subtract(acc, other, out=acc)  # wraps modulo 2**32 or 2**64, a multiple of M
    else:
        np.add(acc, np.uint64(modulus) - other, out=acc)
    return _reduce(acc, modulus)


def _reduce(acc: np.ndarray, modulus: int) -> np.ndarray:
    if not _power_of_two(modulus):
        return np.remainder(acc, np.uint64(modulus), out=acc)
    if modulus == 2 ** (8 * acc.itemsize):
        return acc  # the wrap-around did it
    return np.bitwise_and(acc, acc.dtype.type(modulus - 1), out=acc)  # a mask, not a division


def quantise(delta: np.ndarray, clip: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Clip each coordinate to ``[-clip, clip]`` and map it onto the integers ``0 .. levels - 1`` with
    unbiased stochastic rounding (``rng``: the client's own seeded stream, so a rerun gives the same bits)."""
    scaled = (np.clip(delta.astype(np.float64), -clip, clip) + clip) * ((levels - 1) / (2.0 * clip))
    low = np.floor(scaled)
    up = rng.random(scaled.shape) < (scaled - low)
    return np.minimum(low + up, levels - 1).astype(np.uint64)


def dequantise_sum(total: np.ndarray, count: int, clip: float, levels: int) -> np.ndarray:
    """The sum of ``count`` clipped updates (float64) from the sum of their quantised forms."""
    return total.astype(np.float64) * (2.0 * clip / (levels - 1)) - count * clip
