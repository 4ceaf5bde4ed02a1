"""Shared by the normalization tests (test_norm.py, test_norm_fused.py): seeded inputs and
per-channel parameters."""
from __future__ import annotations

import numpy as np


def _data(shape, dtype, seed, offset=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def _params(c, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
