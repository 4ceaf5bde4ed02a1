"""Shared fixtures: every test that takes `backend` (or `dev`) runs once per backend.

A backend that cannot run here (`pymetalnn.availability()`) is skipped with its reason, which
`pytest -ra` prints. `PYMETALNN_BACKEND=cuda` (or metal, cpu) restricts the run to that one.
"""
from __future__ import annotations

import contextlib
import os

import pytest

import pymetalnn
from pymetalnn.runtime import BACKENDS

_AVAIL: dict[str, str | None] | None = None


def availability() -> dict[str, str | None]:
    """`pymetalnn.availability()`, probed once per session (the metal probe builds a device)."""
    global _AVAIL
    if _AVAIL is None:
        _AVAIL = pymetalnn.availability()
    return _AVAIL


def selected_backends() -> list[str]:
    only = os.environ.get("PYMETALNN_BACKEND") or None
    if only is not None:
        if only not in BACKENDS:
            raise pytest.UsageError(f"PYMETALNN_BACKEND={only!r}: choose from {', '.join(BACKENDS)}")
        return [only]
    return list(BACKENDS)


def get_device(name: str) -> pymetalnn.Device:
    """The device of backend `name`, or skip the test saying why it cannot run here."""
    reason = availability().get(name)
    if reason:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return pymetalnn.device(name)


@pytest.fixture(params=selected_backends())
def backend(request: pytest.FixtureRequest) -> str:
    """Name of a backend that can run here (others are skipped with the reason)."""
    name = request.param
    reason = availability().get(name)
    if reason:
        pytest.skip(f"backend {name} unavailable: {reason}")
    return name


@pytest.fixture
def dev(backend: str) -> pymetalnn.Device:
    """The device of `backend`."""
    return pymetalnn.device(backend)


@contextlib.contextmanager
def _no_dispatch(device: pymetalnn.Device, msg: str = "a kernel was dispatched"):
    before = sum(device.dispatch_counts.values())
    yield
    assert sum(device.dispatch_counts.values()) == before, msg


@pytest.fixture
def no_dispatch():
    """`with no_dispatch(device[, msg]): ...` fails if the block dispatched any kernel on `device`
    (argument checks must raise before anything is launched)."""
    return _no_dispatch


@pytest.fixture(autouse=True)
def _metal_stand_in_faults():
    """Under the metalcompute stand-in (PYMETALNN_FAKE_METAL=1), fail a test after which a kernel
    faulted: Metal itself would have reported nothing (pymetalnn/testing/fake_metalcompute.py)."""
    if os.environ.get("PYMETALNN_FAKE_METAL") != "1":
        yield
        return
    from pymetalnn.testing import fake_metalcompute

    fake_metalcompute.pop_faults()
    yield
    faults = fake_metalcompute.pop_faults()
    assert not faults, "kernel faults under the metal stand-in:\n" + "\n".join(faults)


@pytest.fixture
def nvrtc():
    """tools/nvrtc_check.py (NVRTC without a GPU), or a skip where libnvrtc is not installed
    (PMN_NVRTC names it)."""
    import sys

    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    sys.path.insert(0, tools)
    try:
        import nvrtc_check
    finally:
        sys.path.remove(tools)
    try:
        nvrtc_check._lib()
    except OSError as e:
        pytest.skip(f"libnvrtc is not installed ({e}); PMN_NVRTC names it")
    return nvrtc_check
