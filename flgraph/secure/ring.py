"""The workers' key ring: where a simulated client's secret state waits between the phases of a round.

In simulation a client's phases run as Dask tasks, each on whichever worker the scheduler picks, and the
driver routes everything between them. A client's secrets (its two private keys, its self-mask seed) must
survive from one phase to the next without the driver ever holding them, so each phase returns them sealed
(ChaCha20-Poly1305) under a ring key that every worker process holds and the driver does not: pinning each
client to one worker instead would tie every phase, the training included, to that worker's queue, and a
worker's loss would lose the client's state.

The ring is made fresh for each round, without the driver learning it: every worker offers an X25519 public
key (:func:`offer`), one worker draws the ring key and wraps it for each of them (:func:`make`), and each
unwraps its copy (:func:`join`); the driver only routes public keys and wrapped keys. Old rings are
forgotten (:func:`drop`), so a round's sealed state cannot be opened once the round is over.

Example (one process plays two workers here; on Dask each call runs in its own worker process):
    >>> offers = {"w0": offer("r1", "w0"), "w1": offer("r1", "w1")}
    >>> wrapped = make("r1", offers, "w0")
    >>> join("r1", wrapped, "w1")
    >>> open_sealed("r1", seal("r1", b"secret", b"client 3"), b"client 3")
    b'secret'
    >>> drop("r1")
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .keys import agree, new_key_pair, open_box, seal_box

__all__ = ["RingError", "drop", "hold", "join", "make", "offer", "open_sealed", "seal"]

KEEP = 16  # rings a worker keeps (32 bytes each): the current rounds of the runs sharing the cluster, and
# rounds that failed between SecureSetup and Unmasking (a completed round drops its own ring)

_lock = threading.Lock()
_offers: dict[tuple[str, str], bytes] = {}  # (ring, worker) -> the private key offered for it
_rings: dict[str, bytes] = {}


class RingError(RuntimeError):
    """A worker does not hold the round's ring key (it joined the cluster after the round began)."""


def offer(ring: str, worker: str) -> bytes:
    """Worker side: a fresh public key to receive ring ``ring``'s key with."""
    sk, pk = new_key_pair()
    with _lock:
        _offers[(ring, worker)] = sk
    return pk


def make(ring: str, offers: dict[str, bytes], worker: str) -> dict[str, bytes]:
    """Worker side (one worker): draw ring ``ring``'s key, keep it, and wrap it for every offering worker."""
    key = os.urandom(32)
    out: dict[str, bytes] = {}
    for addr, pk in offers.items():
        eph_sk, eph_pk = new_key_pair()
        wrap = agree(eph_sk, pk, b"flgraph-ring|" + ring.encode())
        out[addr] = eph_pk + seal_box(wrap, key, ring.encode() + b"|" + addr.encode())
    _install(ring, key)
    with _lock:
        _offers.pop((ring, worker), None)
    return out


def join(ring: str, wrapped: dict[str, bytes], worker: str) -> None:
    """Worker side: unwrap this worker's copy of ring ``ring``'s key."""
    with _lock:
        sk = _offers.pop((ring, worker), None)
        have = ring in _rings
    if have:
        return
    if sk is None or worker not in wrapped:
        raise RingError(f"worker {worker} offered no key for ring {ring}")
    box = wrapped[worker]
    wrap = agree(sk, box[:32], b"flgraph-ring|" + ring.encode())
    _install(ring, open_box(wrap, box[32:], ring.encode() + b"|" + worker.encode()))


def hold(ring: str) -> None:
    """A process that is its own only worker (an edge agent keeping its client's secrets): a fresh key for
    ring ``ring`` unless it holds one already; the key never leaves the process."""
    with _lock:
        if ring in _rings:
            return
    key = os.urandom(32)
    with _lock:
        _rings.setdefault(ring, key)
        while len(_rings) > KEEP:
            _rings.pop(next(iter(_rings)))


def _install(ring: str, key: bytes) -> None:
    with _lock:
        _rings[ring] = key
        while len(_rings) > KEEP:
            _rings.pop(next(iter(_rings)))


def drop(ring: str) -> None:
    """Forget ring ``ring`` (its sealed state can no longer be opened)."""
    with _lock:
        _rings.pop(ring, None)
        for k in [k for k in _offers if k[0] == ring]:
            del _offers[k]


def _key(ring: str) -> bytes:
    with _lock:
        key = _rings.get(ring)
    if key is None:
        raise RingError(f"this worker holds no key of ring {ring}: it joined the cluster after the round began, "
                        "or the round is over")
    return key


def seal(ring: str, secret: bytes, context: bytes) -> bytes:
    """Worker side: ``secret`` sealed under ring ``ring`` for ``context`` (the client and phase)."""
    return seal_box(_key(ring), secret, context)


def open_sealed(ring: str, box: bytes, context: bytes) -> bytes:
    """Worker side: what :func:`seal` sealed (on any worker holding the ring)."""
    return open_box(_key(ring), box, context)


def establish(reach: Any) -> str:
    """Driver side: a fresh ring on every worker ``reach`` (a transport that
    :class:`~flgraph.engine.contracts.ReachesWorkers`) knows; returns its name. The driver sees only public
    keys and wrapped keys."""
    ring = os.urandom(12).hex()
    offers: dict[str, bytes] = reach.on_every_worker(_offer_here, ring)
    maker = sorted(offers)[0]
    wrapped = reach.on_one_worker(maker, _make_here, ring, offers)
    reach.on_every_worker(_join_here, ring, wrapped)
    return ring


def forget(reach: Any, ring: str) -> None:
    """Driver side: every worker drops ring ``ring``."""
    reach.on_every_worker(_drop_here, ring)


# the forms Dask calls on a worker: ``dask_worker`` is passed by ``Client.run`` (and by the transport's task)
def _offer_here(ring: str, dask_worker: Any = None) -> bytes:
    return offer(ring, _address(dask_worker))


def _make_here(ring: str, offers: dict[str, bytes], dask_worker: Any = None) -> dict[str, bytes]:
    return make(ring, offers, _address(dask_worker))


def _join_here(ring: str, wrapped: dict[str, bytes], dask_worker: Any = None) -> None:
    join(ring, wrapped, _address(dask_worker))


def _drop_here(ring: str, dask_worker: Any = None) -> None:
    drop(ring)


def _address(dask_worker: Any) -> str:
    if dask_worker is not None:
        return str(dask_worker.address)
    from distributed import get_worker

    return str(get_worker().address)
