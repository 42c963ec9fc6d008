"""Key agreement, key derivation and authenticated encryption for secure aggregation, from the
:mod:`cryptography` library (X25519, HKDF-SHA256, ChaCha20-Poly1305); this module only names the uses.

Example:
    >>> a, b = new_key_pair(), new_key_pair()
    >>> agree(a[0], b[1], b"ctx") == agree(b[0], a[1], b"ctx")
    True
    >>> k = agree(a[0], b[1], b"ctx")
    >>> open_box(k, seal_box(k, b"share", b"who"), b"who")
    b'share'
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["BoxError", "agree", "new_key_pair", "open_box", "public_of", "seal_box"]

NONCE = 12


class BoxError(ValueError):
    """A ciphertext that does not open: wrong key, wrong context, or tampered."""


def new_key_pair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair ``(private, public)``, 32 raw bytes each, from the OS's randomness."""
    sk = X25519PrivateKey.generate()
    return sk.private_bytes_raw(), sk.public_key().public_bytes_raw()


def public_of(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive alike: HKDF-SHA256 over the X25519 shared secret, bound to ``info``."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal_box(key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """``plaintext`` encrypted and authenticated under ``key`` (a fresh random nonce, ``context`` bound as
    associated data, so a box cannot be replayed into another round, sender or recipient)."""
    nonce = os.urandom(NONCE)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, context)


def open_box(key: bytes, box: bytes, context: bytes) -> bytes:
    """The plaintext of :func:`seal_box`; :class:`BoxError` if the key or context is wrong or it was altered."""
    try:
        return ChaCha20Poly1305(key).decrypt(box[:NONCE], box[NONCE:], context)
    except InvalidTag as e:
        raise BoxError("a sealed message did not authenticate (wrong key, wrong context, or altered)") from e
