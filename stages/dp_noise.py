"""Secret noise for differential privacy: a key from the operating system, a keyed cryptographic stream.

Noise drawn from the run's public seed can be subtracted by anyone who knows the seed, and the seed is in
the pipeline spec. So each DP stage draws its own 256-bit key with :func:`secrets.token_bytes` (the
operating system's randomness) when a run starts, keeps it in its stage state (checkpointed, so a resumed
run draws the same noise: bit-exact resume), and never puts it in its settings (the spec), its metrics or
its ``repr``.

The noise of round ``r`` is ``gaussian(key, label, r, n)``: SHAKE-256, an extendable-output function of the
SHA-3 family (a cryptographic XOF in Python's standard library), absorbs ``(key, label, r)`` and squeezes
``16 n`` bytes; two 53-bit uniforms per value go through the Box-Muller transform. Unlike a numeric
generator seeded from the key (Philox or PCG, which are not designed to resist recovering their key or
state from their output), the stream is as hard to predict as SHAKE-256 is to invert, every round's stream
is independent of the others', and no key material is truncated.

``insecure_seed=`` derives the key from a public integer instead: reproducible noise for tests and
experiments, with an :class:`InsecureNoiseWarning` when the stage is built and the seed visible in the
pipeline spec. That noise protects nothing.

Example:
    >>> key = fresh_key()
    >>> len(key), bool((gaussian(key, "update", 3, 4) == gaussian(key, "update", 3, 4)).all())
    (32, True)
    >>> bool((gaussian(key, "update", 3, 4) == gaussian(key, "update", 4, 4)).any())
    False
    >>> insecure_key(7) == insecure_key(7)
    True
"""

from __future__ import annotations

import hashlib
import secrets
import warnings

import numpy as np

__all__ = ["InsecureNoiseWarning", "fresh_key", "gaussian", "insecure_key", "key_array", "key_bytes",
           "warn_insecure"]

KEY_BYTES = 32
_DOMAIN = b"flgraph-dp-noise-v1"


class InsecureNoiseWarning(UserWarning):
    """DP noise derived from a public seed: reproducible, and no privacy at all."""


def fresh_key() -> bytes:
    """A new 256-bit secret key from the operating system's randomness."""
    return secrets.token_bytes(KEY_BYTES)


def insecure_key(seed: int) -> bytes:
    """A key derived from a public seed (``insecure_seed=``): anyone who knows the seed can remove the noise."""
    return hashlib.sha256(_DOMAIN + b"insecure" + int(seed).to_bytes(16, "little", signed=True)).digest()


def warn_insecure(stage: str, seed: int) -> None:
    """Say loudly that a stage's noise is reproducible from a public seed."""
    warnings.warn(f"{stage}(insecure_seed={seed}): the DP noise is derived from a public seed and can be "
                  "removed by anyone who knows it. The run is NOT differentially private; use it for tests "
                  "only and drop insecure_seed= for a private run.", InsecureNoiseWarning, stacklevel=3)


def key_array(key: bytes) -> np.ndarray:
    """The key as stage state: a uint8 array (checkpointed like any state array)."""
    return np.frombuffer(key, np.uint8).copy()


def key_bytes(state: np.ndarray) -> bytes:
    """The key back from stage state."""
    return np.asarray(state, np.uint8).tobytes()


def gaussian(key: bytes, label: str, rnd: int, size: int) -> np.ndarray:
    """``size`` standard normal values (float64) of stream ``(label, rnd)`` under ``key``."""
    if size <= 0:
        return np.zeros(0)
    xof = hashlib.shake_256(_DOMAIN + len(label).to_bytes(2, "little") + label.encode()
                            + int(rnd).to_bytes(8, "little") + key)
    words = np.frombuffer(xof.digest(16 * size), dtype="<u8").reshape(2, size)
    # 53-bit uniforms: u1 in (0, 1] (the log never sees 0), u2 in [0, 1)
    u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53
    u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    out: np.ndarray = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return out
