"""Shamir secret sharing over the prime field of the Mersenne prime ``2**521 - 1``.

A secret (an integer below :data:`PRIME`, e.g. a 32-byte key) is the constant term of a random polynomial
of degree ``threshold - 1``; share ``x`` is the polynomial at ``x``. Any ``threshold`` shares give the secret
back by Lagrange interpolation at zero; fewer give a value that is independent of it. The field is large
enough for a 256-bit key in one share, and the arithmetic is exact Python integers (no library does this
small part better). The coefficients come from the operating system's randomness (:mod:`secrets`).

Example:
    >>> shares = split(123456789, [1, 2, 3, 4, 5], threshold=3)
    >>> reconstruct(shares[:3]), reconstruct([shares[0], shares[2], shares[4]])
    (123456789, 123456789)
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

__all__ = ["PRIME", "SHARE_BYTES", "from_bytes", "reconstruct", "split", "to_bytes"]

PRIME = 2**521 - 1  # a Mersenne prime: larger than any 256-bit secret
SHARE_BYTES = 66  # a field element fits in 521 bits


def split(secret: int, xs: Sequence[int], threshold: int) -> list[tuple[int, int]]:
    """Shares ``(x, f(x))`` of ``secret`` for each (distinct, non-zero) ``x`` of ``xs``, any ``threshold``
    of which reconstruct it."""
    if not 0 <= secret < PRIME:
        raise ValueError("the secret must lie in the field [0, PRIME)")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be between 1 and the number of shares ({len(xs)})")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct and non-zero")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        out.append((x, y))
    return out


def reconstruct(shares: Sequence[tuple[int, int]]) -> int:
    """The polynomial's value at zero from ``shares`` (Lagrange interpolation). Given at least the threshold
    of shares this is the secret; given fewer it is a field element unrelated to it."""
    if not shares:
        raise ValueError("no shares to reconstruct from")
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("two shares have the same point")
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def to_bytes(value: int) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes."""
    return value.to_bytes(SHARE_BYTES, "big")


def from_bytes(data: bytes) -> int:
    """The field element of :func:`to_bytes`."""
    return int.from_bytes(data, "big")
