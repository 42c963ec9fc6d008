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

__all__ = ["client_torch_seed", "seed_sequence", "stage_tag", "stream", "torch_seed"]


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


SEED_BLOCK = 16  # client_torch_seed computes this many clients' seeds at a time
_seeds = threading.local()


def client_torch_seed(seed: int, tag: int, rnd: int, ids: np.ndarray, pos: int) -> int:
    """``torch_seed(seed, tag, rnd, ids[pos])``, the seed of the client at position ``pos`` of a round's
    clients ``ids``, computed for a block of :data:`SEED_BLOCK` of them at a time.

    A client's training starts with the caches its predecessor's training filled, where one seed costs
    40-60 us (8-9 us in a warm loop; W1 on 2 workers). So the seeds of ``pos``'s block are computed
    together and kept (per thread, for the latest round) until their clients ask for them.

    Example:
        >>> ids = np.array([7, 3, 9])
        >>> client_torch_seed(0, 1, 2, ids, 1) == torch_seed(0, 1, 2, 3)
        True
    """
    key = (int(seed), int(tag), int(rnd))
    cache = getattr(_seeds, "cache", None)
    if cache is None or cache[0] != key:
        cache = _seeds.cache = (key, {})
    table: dict[int, int] = cache[1]
    cid = int(ids[pos])
    value = table.get(cid)
    if value is None:
        lo = pos - pos % SEED_BLOCK
        for c in np.asarray(ids[lo : lo + SEED_BLOCK]).tolist():
            table[int(c)] = torch_seed(seed, tag, rnd, int(c))
        value = table[cid]
    return value
