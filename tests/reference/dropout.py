"""numpy references for dropout: Philox4x32-10 and the masks built from it, in integers only.

Design note: Philox is written from the Random123 definition (Salmon et al., SC'11) with uint64
numpy arithmetic for the 32 x 32 -> 64-bit products, independently of the MSL version; it is
checked against the published known-answer vectors in the tests. The mask definitions follow
kernels/dropout.metal's contract: key = (seed lo, seed hi), counter = (block, 0, offset lo,
offset hi); element i (dropout) or channel i (dropout2d) uses word i % 4 of block i // 4 and is
kept when that word >= round(p * 2^32) (saturated to 2^32 - 1).
"""
from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: np.ndarray, key: tuple[int, int], rounds: int = 10) -> np.ndarray:
    """ctr: (n, 4) uint32 counters; key: two uint32 words. Returns (n, 4) uint32."""
    c = np.asarray(ctr, np.uint64).reshape(-1, 4).copy()
    k0, k1 = int(key[0]) & 0xFFFFFFFF, int(key[1]) & 0xFFFFFFFF
    for r in range(rounds):
        if r > 0:
            k0 = (k0 + W0) & 0xFFFFFFFF
            k1 = (k1 + W1) & 0xFFFFFFFF
        p0 = M0 * c[:, 0]  # < 2^64: exact in uint64
        p1 = M1 * c[:, 2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c = np.stack([hi1 ^ c[:, 1] ^ np.uint64(k0), lo1, hi0 ^ c[:, 3] ^ np.uint64(k1), lo0], axis=1)
    return c.astype(np.uint32)


def stream(n: int, seed: int, offset: int) -> np.ndarray:
    """The first n words: word 4b + j = word j of Philox(counter (b, 0, offset lo, offset hi))."""
    blocks = -(-n // 4)
    ctr = np.zeros((blocks, 4), np.uint64)
    ctr[:, 0] = np.arange(blocks)
    ctr[:, 2] = offset & 0xFFFFFFFF
    ctr[:, 3] = offset >> 32
    return philox4x32_10(ctr, (seed & 0xFFFFFFFF, seed >> 32)).reshape(-1)[:n]


def threshold(p: float) -> int:
    return min(int(round(p * 2.0**32)), 2**32 - 1)


def keep_mask(n: int, p: float, seed: int, offset: int) -> np.ndarray:
    return stream(n, seed, offset) >= np.uint32(threshold(p))


def dropout(x: np.ndarray, p: float, seed: int, offset: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    m = keep_mask(x.size, p, seed, offset).reshape(x.shape)
    return np.where(m, x / (1.0 - p), 0.0)


def dropout2d(x: np.ndarray, p: float, seed: int, offset: int) -> np.ndarray:
    x = np.asarray(x, np.float64)
    n, c = x.shape[:2]
    m = keep_mask(n * c, p, seed, offset).reshape(n, c, 1, 1)
    return np.where(m, x / (1.0 - p), 0.0)


def dropout_backward(g: np.ndarray, p: float, seed: int, offset: int) -> np.ndarray:
    """d/dx of sum(g * dropout(x)): the mask does not depend on x, so g * mask / (1 - p)."""
    g = np.asarray(g, np.float64)
    return np.where(keep_mask(g.size, p, seed, offset).reshape(g.shape), g / (1.0 - p), 0.0)


def dropout2d_backward(g: np.ndarray, p: float, seed: int, offset: int) -> np.ndarray:
    g = np.asarray(g, np.float64)
    n, c = g.shape[:2]
    return np.where(keep_mask(n * c, p, seed, offset).reshape(n, c, 1, 1), g / (1.0 - p), 0.0)
