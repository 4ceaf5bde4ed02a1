"""Fixtures of the dialect conformance suite: kernel libraries from tests/dialect/kernels/."""
from __future__ import annotations

from typing import Callable

import pytest
from helpers import kernel_path

import pymetalnn


@pytest.fixture
def load(dev: pymetalnn.Device) -> Callable[..., pymetalnn.Library]:
    """load("simd") -> the library tests/dialect/kernels/simd.metal compiled for `dev` (cached
    per device and defines by the runtime, so each file compiles once per session)."""

    def _load(name: str, **defines: object) -> pymetalnn.Library:
        return dev.library(kernel_path(name), defines=defines or None)

    return _load
