"""Philox4x32-10 (Salmon et al., SC'11) on Python ints, and the uniforms of DESIGN.md "Randomness"."""

from __future__ import annotations

MASK32 = 0xFFFFFFFF


def philox4x32_10(c, k):
    """Philox4x32-10 (Salmon et al., SC'11) on Python ints: counter c[4], key k[2]."""
    c0, c1, c2, c3 = c
    k0, k1 = k
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p1 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0 & MASK32
        k0 = (k0 + 0x9E3779B9) & MASK32
        k1 = (k1 + 0xBB67AE85) & MASK32
    return c0, c1, c2, c3


def philox_element(seed: int, offset: int, stream: int, i: int) -> int:
    seed &= 2**64 - 1
    offset &= 2**64 - 1
    block = philox4x32_10((offset & MASK32, offset >> 32, stream, i // 4), (seed & MASK32, seed >> 32))
    return block[i % 4]


def uniform_double(seed: int, offset: int, stream: int, i: int) -> float:
    a = philox_element(seed, offset, stream, 2 * i)
    b = philox_element(seed, offset, stream, 2 * i + 1)
    return ((a >> 5) * 2**26 + (b >> 6)) * 2.0**-53
