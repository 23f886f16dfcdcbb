"""Shamir t-of-n secret sharing of 32-byte secrets over GF(2^521 - 1).

A 32-byte secret is one field element (256 bits < 521 bits). Share ``x`` coordinates are
``1..n``: the holder's position (1-based) in the sorted participant list. A share is encoded
as 2 bytes of ``x`` then 66 bytes of ``y`` (big endian).
"""

from __future__ import annotations

import secrets as _secrets

from .errors import BelowThreshold, MalformedMessage

PRIME = (1 << 521) - 1
SECRET_BYTES = 32
Y_BYTES = 66
SHARE_BYTES = 2 + Y_BYTES


def split(secret: bytes | bytearray, threshold: int, xs: list[int]) -> dict[int, bytes]:
    """Split ``secret`` (32 bytes) so that any ``threshold`` of the shares at ``xs`` rebuild it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"secret must be {SECRET_BYTES} bytes")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < 1 << 16 for x in xs):
        raise ValueError("share x coordinates must be distinct and in [1, 65535]")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [_secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % PRIME
        shares[x] = x.to_bytes(2, "big") + y.to_bytes(Y_BYTES, "big")
    coeffs.clear()
    return shares


def parse_share(share: bytes) -> tuple[int, int]:
    """Return ``(x, y)`` of an encoded share, or raise MalformedMessage."""
    if not isinstance(share, bytes | bytearray) or len(share) != SHARE_BYTES:
        raise MalformedMessage(f"a Shamir share must be {SHARE_BYTES} bytes")
    x = int.from_bytes(share[:2], "big")
    y = int.from_bytes(share[2:], "big")
    if x == 0 or y >= PRIME:
        raise MalformedMessage("Shamir share out of range")
    return x, y


def combine(shares: list[bytes], threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise BelowThreshold(
            f"only {len(shares)} shares, {threshold} are needed to rebuild the secret"
        )
    points = [parse_share(s) for s in shares[:threshold]]
    xs = [x for x, _ in points]
    if len(set(xs)) != len(xs):
        raise MalformedMessage("duplicate Shamir share x coordinates")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise MalformedMessage("shares do not rebuild a 32-byte secret (corrupt share?)")
    return secret.to_bytes(SECRET_BYTES, "big")
