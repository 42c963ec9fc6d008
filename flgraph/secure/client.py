"""The client's side of SecAgg+: what a client computes in each phase, where it runs (a Dask worker in
simulation). Its secrets leave a phase only sealed under the workers' ring (:mod:`flgraph.secure.ring`).

* AdvertiseKeys (:class:`AdvertiseKeys`): two X25519 key pairs, ``c`` to encrypt shares, ``s`` to agree masks;
* ShareKeys (:class:`ShareKeys`): a self-mask seed ``b``; Shamir shares of ``b`` and of the ``s`` private key
  for each neighbour, each encrypted to that neighbour under a key agreed with its ``c`` key;
* MaskedInputCollection (:func:`masked_input`): the quantised update plus the self mask and, for each
  neighbour still in, plus or minus the pairwise mask both derive from their ``s`` keys (they cancel);
* Unmasking (:class:`Unmask`): for each neighbour the server names, the share of its ``b`` (it sent a masked
  input) or of its ``s`` key (it dropped), never both.

Example (the ring of one process stands for the workers' here):
    >>> from flgraph.secure import ring
    >>> ring.make("doc", {}, "w")  # a ring with no other worker to wrap it for
    {}
    >>> c_pk, s_pk, sealed = advertise("doc", 7)
    >>> len(c_pk), len(s_pk)
    (32, 32)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from . import shamir
from .keys import agree, open_box, seal_box
from .masks import add_mod, expand, field_dtype, sub_mod
from .ring import open_sealed, seal

__all__ = ["AdvertiseKeys", "ShareKeys", "Unmask", "advertise", "mask_key", "masked_input", "share_context"]

_SHARE = struct.Struct(">II")  # sender position, recipient position, then the two shares


def _state_context(pos: int, phase: bytes) -> bytes:
    return b"flgraph-secagg-state|" + phase + b"|" + str(pos).encode()


def share_context(ring: str, sender: int, recipient: int) -> bytes:
    """The associated data of the encrypted shares ``sender`` -> ``recipient`` in the round of ``ring``."""
    return f"flgraph-secagg-share|{ring}|{sender}|{recipient}".encode()


def mask_key(private: bytes, peer_public: bytes, ring: str) -> bytes:
    """The pairwise mask key two neighbours agree on in the round of ``ring`` (the same at both ends)."""
    return agree(private, peer_public, b"flgraph-secagg-mask|" + ring.encode())


def advertise(ring: str, pos: int) -> tuple[bytes, bytes, bytes]:
    """AdvertiseKeys: the public ``c`` and ``s`` keys, and the private ones sealed under the ring."""
    from .keys import new_key_pair

    c_sk, c_pk = new_key_pair()
    s_sk, s_pk = new_key_pair()
    return c_pk, s_pk, seal(ring, c_sk + s_sk, _state_context(pos, b"keys"))


@dataclass
class AdvertiseKeys:
    """Phase 1 on the clients of ``ids`` (``map_clients``: the work's position is its SecAgg position)."""

    ring: str
    positions: list[int]
    __name__: ClassVar[str] = "secagg-advertise-keys"

    def __call__(self, work: Any) -> tuple[bytes, bytes, bytes]:
        return advertise(self.ring, self.positions[work.position])


@dataclass
class ShareKeys:
    """Phase 2: ``inputs[i]`` = (sealed keys, SecAgg position, [(neighbour position, its c public key)])
    for the i-th client mapped. A client with fewer than ``threshold`` neighbours left aborts (None)."""

    ring: str
    threshold: int
    inputs: list[tuple[bytes, int, list[tuple[int, bytes]]]]
    __name__: ClassVar[str] = "secagg-share-keys"

    def __call__(self, work: Any) -> tuple[dict[int, bytes], bytes] | None:
        sealed, pos, neighbours = self.inputs[work.position]
        if len(neighbours) < self.threshold:
            return None
        keys = open_sealed(self.ring, sealed, _state_context(pos, b"keys"))
        c_sk, s_sk = keys[:32], keys[32:]
        b = os.urandom(32)
        xs = [v + 1 for v, _ in neighbours]
        s_shares = shamir.split(int.from_bytes(s_sk, "big"), xs, self.threshold)
        b_shares = shamir.split(int.from_bytes(b, "big"), xs, self.threshold)
        boxes = {}
        for (v, c_pk), (_, ys), (_, yb) in zip(neighbours, s_shares, b_shares):
            plain = _SHARE.pack(pos, v) + shamir.to_bytes(ys) + shamir.to_bytes(yb)
            key = agree(c_sk, c_pk, b"flgraph-secagg-share|" + self.ring.encode())
            boxes[v] = seal_box(key, plain, share_context(self.ring, pos, v))
        return boxes, seal(self.ring, c_sk + s_sk + b, _state_context(pos, b"shared"))


@dataclass(frozen=True)
class MaskRecord:
    """What a client needs to mask its input: the ring, its position, its sealed secrets, and each
    neighbour still in the round with that neighbour's ``s`` public key."""

    ring: str
    position: int
    sealed: bytes
    neighbours: tuple[tuple[int, bytes], ...]
    config: Any = None  # the SecAggConfig of the SecureSetup that prepared it (the masking stage checks it)


def masked_input(record: MaskRecord, x: np.ndarray, modulus: int) -> np.ndarray:
    """MaskedInputCollection: ``x`` (quantised, in ``[0, M)``) plus the self mask and the pairwise masks
    (plus towards neighbours after it, minus towards those before it), mod ``M``."""
    secrets = open_sealed(record.ring, record.sealed, _state_context(record.position, b"shared"))
    s_sk, b = secrets[32:64], secrets[64:96]
    y = add_mod(x.astype(field_dtype(modulus), copy=True), expand(b, len(x), modulus, b"self"), modulus)
    for v, s_pk in record.neighbours:
        m = expand(mask_key(s_sk, s_pk, record.ring), len(x), modulus, b"pair")
        (add_mod if record.position < v else sub_mod)(y, m, modulus)
    return y


@dataclass
class Unmask:
    """Phase 4: ``inputs[i]`` = (sealed secrets, SecAgg position, [(sender position, sender's c public key,
    the box it sent, "b" or "s")]) for the i-th client mapped; answers [(sender, kind, share)]."""

    ring: str
    inputs: list[tuple[bytes, int, list[tuple[int, bytes, bytes, str]]]]
    __name__: ClassVar[str] = "secagg-unmask"

    def __call__(self, work: Any) -> list[tuple[int, str, bytes]]:
        sealed, pos, requests = self.inputs[work.position]
        c_sk = open_sealed(self.ring, sealed, _state_context(pos, b"shared"))[:32]
        out = []
        for sender, c_pk, box, kind in requests:
            key = agree(c_sk, c_pk, b"flgraph-secagg-share|" + self.ring.encode())
            plain = open_box(key, box, share_context(self.ring, sender, pos))
            if _SHARE.unpack(plain[:8]) != (sender, pos):
                raise ValueError(f"a share box from {sender} names another sender or recipient")
            at = 8 if kind == "s" else 8 + shamir.SHARE_BYTES
            out.append((sender, kind, plain[at : at + shamir.SHARE_BYTES]))
        return out
