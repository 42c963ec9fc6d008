"""Every random choice in a run derives from one seed through :class:`numpy.random.SeedSequence`.

A stream is named by a stage tag and the position in the run (round, client, ...):
``SeedSequence(seed, spawn_key=(tag, round, client, ...))``. Streams do not depend on the cluster size,
the chunking or the order of arrivals, and a resumed run re-derives them from the round counter alone.

The stage tag is ``crc32("<StageClass>:<occurrence>") & 0x7FFFFFFF`` so adding a stage to a pipeline does
not shift the streams of the others.

Example:
    >>> from flgraph.rng import stream, stage_tag
    >>> a = stream(0, stage_tag("Select"), 3).integers(1000)
    >>> b = stream(0, stage_tag("Select"), 3).integers(1000)
    >>> bool(a == b)
    True
"""

from __future__ import annotations

import threading
import zlib

import numpy as np

__all__ = ["client_torch_seed", "seed_sequence", "stage_tag", "stream", "torch_seed", "torch_seeds"]


def stage_tag(stage_class: str, occurrence: int = 0) -> int:
    """The stable integer tag of the ``occurrence``-th stage of class ``stage_class`` in a pipeline."""
    return zlib.crc32(f"{stage_class}:{occurrence}".encode()) & 0x7FFFFFFF


def seed_sequence(seed: int, *key: int) -> np.random.SeedSequence:
    """The seed sequence of the stream ``key`` under the run seed ``seed``."""
    return np.random.SeedSequence(int(seed), spawn_key=tuple(int(k) for k in key))


def stream(seed: int, *key: int) -> np.random.Generator:
    """A numpy Generator for the stream ``key`` under the run seed ``seed``."""
    return np.random.default_rng(seed_sequence(seed, *key))


def torch_seed(seed: int, *key: int) -> int:
    """A 63-bit integer seed for torch generators, derived like :func:`stream`."""
    return int(seed_sequence(seed, *key).generate_state(2, np.uint64)[0] >> np.uint64(1))


# numpy's SeedSequence constants (numpy/random/bit_generator.pyx; stream-stable by numpy's policy)
_POOL = 4
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_M32 = 0xFFFFFFFF


def _words(n: int) -> list[int]:
    """``n`` as SeedSequence reads an int: little-endian 32-bit words, ``[0]`` for 0."""
    out = [n & _M32]
    n >>= 32
    while n:
        out.append(n & _M32)
        n >>= 32
    return out


def torch_seeds(seed: int, key: tuple[int, ...], ids: np.ndarray) -> np.ndarray:
    """``torch_seed(seed, *key, i)`` for every ``i`` of ``ids``, as a uint64 array, in one vector pass.

    A SeedSequence costs 8-60 us in Python (more when the caches are cold), so a round of clients pays
    milliseconds for its seeds one by one. The streams differ only in their last spawn-key word, the
    client id, which SeedSequence mixes in last: the mixing of everything before it is done once, with
    Python ints, and only the last word's mixing and ``generate_state`` run as numpy uint32 arithmetic over
    all the ids together (the same operations, wrapping at 2**32 as SeedSequence's C code does). Ids
    outside ``0 .. 2**32 - 1`` take the one-by-one path (which refuses negative ones, as SeedSequence
    does); ids that are not integers are refused.

    Example:
        >>> ids = np.array([7, 3, 9])
        >>> [int(s) for s in torch_seeds(0, (1, 2), ids)] == [torch_seed(0, 1, 2, i) for i in (7, 3, 9)]
        True
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iuO":
        raise TypeError(f"client ids must be integers, not {ids.dtype}")
    if ids.size == 0:
        return np.zeros(0, np.uint64)
    if ids.dtype.kind == "O" or int(ids.min()) < 0 or int(ids.max()) > _M32:
        return np.array([torch_seed(seed, *key, int(i)) for i in ids.tolist()], np.uint64)
    run = _words(int(seed))
    # a spawn key pads the run entropy to the pool size (numpy >= 1.19), then follows it word by word
    head = run + [0] * max(0, _POOL - len(run)) + [w for k in key for w in _words(int(k))]
    hc = _INIT_A

    def hashmix(value: int) -> int:
        nonlocal hc
        value ^= hc
        hc = (hc * _MULT_A) & _M32
        value = (value * hc) & _M32
        return value ^ (value >> 16)

    def mix(x: int, y: int) -> int:
        r = (_MIX_L * x - _MIX_R * y) & _M32
        return r ^ (r >> 16)

    pool = [hashmix(head[i]) for i in range(_POOL)]  # head holds at least _POOL words; the id comes after
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for word in head[_POOL:]:
        for dst in range(_POOL):
            pool[dst] = mix(pool[dst], hashmix(word))
    last = ids.astype(np.uint32)  # the id: the last entropy word, mixed into each pool word
    vec: list[np.ndarray] = []
    for dst in range(_POOL):
        h = last ^ np.uint32(hc)
        hc = (hc * _MULT_A) & _M32
        h *= np.uint32(hc)
        h ^= h >> np.uint32(16)
        r = np.uint32((_MIX_L * pool[dst]) & _M32) - np.uint32(_MIX_R) * h  # array arithmetic wraps
        r ^= r >> np.uint32(16)
        vec.append(r)
    out: list[np.ndarray] = []  # generate_state(2, uint64): the first two 32-bit words make the seed
    hb = _INIT_B
    for i in range(2):
        v = vec[i] ^ np.uint32(hb)
        hb = (hb * _MULT_B) & _M32
        v *= np.uint32(hb)
        v ^= v >> np.uint32(16)
        out.append(v)
    return (out[0].astype(np.uint64) | (out[1].astype(np.uint64) << np.uint64(32))) >> np.uint64(1)


_seeds = threading.local()


def client_torch_seed(seed: int, tag: int, rnd: int, ids: np.ndarray, pos: int) -> int:
    """``torch_seed(seed, tag, rnd, ids[pos])``, the seed of the client at position ``pos`` of a round's
    clients ``ids``.

    The seeds of all of ``ids`` are computed at the first request (:func:`torch_seeds`, one vector pass:
    about 60 us for a round, where one SeedSequence costs 20 us in a worker between two trainings) and kept
    (per thread, for the latest round and ``ids``) until their clients ask for them.

    Example:
        >>> ids = np.array([7, 3, 9])
        >>> client_torch_seed(0, 1, 2, ids, 1) == torch_seed(0, 1, 2, 3)
        True
    """
    key = (int(seed), int(tag), int(rnd))
    cache = getattr(_seeds, "cache", None)
    if cache is None or cache[0] != key or cache[1] is not ids:
        if cache is None or cache[0] != key or not np.array_equal(cache[1], ids):
            cache = (key, ids, torch_seeds(seed, (tag, rnd), ids).tolist())
        else:
            cache = (key, ids, cache[2])  # the same round's ids in another array
        _seeds.cache = cache
    return int(cache[2][pos])
