"""Error paths: constructs outside the dialect (MSLError with file and line), backend compiler
errors mapped back to the .metal line (CompileError), bad dispatches (DispatchError before
anything runs), unknown kernel names (KeyError)."""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import numpy as np
import pytest

import pymetalnn
from pymetalnn import CompileError, DispatchError, MSLError

HEAD = "#include <metal_stdlib>\nusing namespace metal;\n"
MARK = "// <- error here"

KERNEL_OK = """
kernel void ok(device float* x [[buffer(0)]],
               uint gid [[thread_position_in_grid]]) {
    x[gid] = 1.0f;
}
"""

# (id, source body); the line holding MARK is where the error must be reported.
REJECTED = [
    ("texture2d", """
kernel void k(texture2d<float> t [[texture(0)]],  // <- error here
              uint gid [[thread_position_in_grid]]) {
}
"""),
    ("sampler", """
constexpr sampler smp(coord::normalized);  // <- error here
""" + KERNEL_OK),
    ("double", """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    double d = 2.0;  // <- error here
    x[gid] = float(d);
}
"""),
    ("vertex_function", KERNEL_OK + """
vertex float4 vs(uint vid [[vertex_id]]) {  // <- error here
    return float4(0.0f);
}
"""),
    ("threadgroup_arg", """
kernel void k(device float* x [[buffer(0)]],
              threadgroup float* tg [[threadgroup(0)]],  // <- error here
              uint gid [[thread_position_in_grid]]) {
    x[gid] = tg[0];
}
"""),
    ("uint2_position", """
kernel void k(device float* x [[buffer(0)]],
              uint2 gid [[thread_position_in_grid]]) {  // <- error here
    x[gid.x] = 1.0f;
}
"""),
    ("arg_without_attribute", """
kernel void k(device float* x [[buffer(0)]],
              device float* y,  // <- error here
              uint gid [[thread_position_in_grid]]) {
    x[gid] = y[gid];
}
"""),
    ("buffer_index_gap", """
kernel void k(device float* x [[buffer(0)]], device float* y [[buffer(2)]],  // <- error here
              uint gid [[thread_position_in_grid]]) {
    x[gid] = y[gid];
}
"""),
    ("unknown_metal_function", """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    x[gid] = metal::frobnicate(x[gid]);  // <- error here
}
"""),
    ("unsupported_kernel_attribute", """
[[early_fragment_tests]]  // <- error here
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    x[gid] = 1.0f;
}
"""),
    ("unsupported_statement_attribute", """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    [[frobnicate]] x[gid] = 1.0f;  // <- error here
}
"""),
    ("include_other_header", """
#include <vector>  // <- error here
""" + KERNEL_OK),
    ("include_missing_local", """
#include "no_such_header.h"  // <- error here
""" + KERNEL_OK),
    ("tg_size_100", """
[[max_total_threads_per_threadgroup(100)]]  // <- error here
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    x[gid] = 1.0f;
}
"""),
    ("tg_size_2048", """
[[max_total_threads_per_threadgroup(2048)]]  // <- error here
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    x[gid] = 1.0f;
}
"""),
    ("packed_vector", """
kernel void k(device packed_float3* x [[buffer(0)]],  // <- error here
              uint gid [[thread_position_in_grid]]) {
}
"""),
    ("matrix_type", """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    float4x4 m;  // <- error here
}
"""),
    ("quad_function", """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    x[gid] = quad_sum(x[gid]);  // <- error here
}
"""),
    ("mutable_reference_arg", """
kernel void k(device float& x [[buffer(0)]],  // <- error here
              uint gid [[thread_position_in_grid]]) {
}
"""),
    ("no_kernels", """
inline float f(float x) { return x; }
"""),
    ("error_directive", """
#if __METAL_VERSION__ >= 200
#error "this variant is not supported"  // <- error here
#endif
""" + KERNEL_OK),
]


def write(tmp_path: Path, name: str, body: str) -> tuple[str, int]:
    src = HEAD + body
    lines = src.split("\n")
    marked = [i + 1 for i, ln in enumerate(lines) if MARK in ln]
    path = tmp_path / f"{name}.metal"
    path.write_text(src)
    return str(path), (marked[0] if marked else 1)


@pytest.mark.parametrize("name,body", REJECTED, ids=[r[0] for r in REJECTED])
def test_rejected_construct_names_file_and_line(dev, tmp_path: Path, name: str, body: str) -> None:
    path, line = write(tmp_path, name, body)
    with pytest.raises(MSLError) as ei:
        dev.library(path)
    e = ei.value
    assert Path(e.file).name == f"{name}.metal"
    assert e.line == line, f"reported line {e.line}, construct on line {line}: {e}"
    assert str(e).startswith(f"{name}.metal:{line}: error: "), str(e)


def test_error_in_included_header_names_the_header(dev, tmp_path: Path) -> None:
    (tmp_path / "bad_helpers.h").write_text("#pragma once\n\ninline float f(float x) {\n"
                                            "    double y = x;\n    return y;\n}\n")
    path, _ = write(tmp_path, "includes_bad", '#include "bad_helpers.h"\n' + KERNEL_OK)
    with pytest.raises(MSLError) as ei:
        dev.library(path)
    assert str(ei.value).startswith("bad_helpers.h:4: error: "), str(ei.value)


def test_backend_compile_error_names_metal_line(dev, tmp_path: Path) -> None:
    body = """
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {
    float a = 1.0f;
    x[gid] = a + not_declared_anywhere;  // <- error here
}
"""
    path, line = write(tmp_path, "undeclared", body)
    with pytest.raises(CompileError) as ei:
        dev.library(path)
    text = str(ei.value)
    assert "not_declared_anywhere" in text
    # g++/clang: "undeclared.metal:7:18: error"; NVRTC: "undeclared.metal(7): error"
    assert re.search(rf"undeclared\.metal(:{line}:|\({line}\))", text), text


@pytest.mark.parametrize("decl", ["simdgroup_matrix<float, 16, 16> m;", "simdgroup_matrix<int, 8, 8> m;"])
def test_unsupported_simdgroup_matrix_names_metal_line(dev, tmp_path: Path, decl: str) -> None:
    """MSL 2.3 has 8x8 float/half simdgroup matrices only: other shapes and types fail to compile
    with the .metal line of the declaration."""
    body = f"""
kernel void k(device float* x [[buffer(0)]],
              uint gid [[thread_position_in_grid]]) {{
    {decl}  // <- error here
    x[gid] = 1.0f;
}}
"""
    path, line = write(tmp_path, "bad_matrix", body)
    with pytest.raises(CompileError) as ei:
        dev.library(path)
    text = str(ei.value)
    assert "simdgroup matrices" in text or "8x8" in text, text
    # g++: "bad_matrix.metal:7:..."; NVRTC: "bad_matrix.metal(7)" or "at line 7 of ...bad_matrix.metal"
    assert re.search(rf"bad_matrix\.metal(:{line}:|\({line}\))|line {line} of \S*bad_matrix\.metal",
                     text), text


# ---- dispatch errors ----------------------------------------------------------------------

class Params(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("scale", ctypes.c_float), ("offset", ctypes.c_int32),
                ("mode", ctypes.c_uint32), ("bias", ctypes.c_float * 2)]


class WrongParams(ctypes.Structure):
    _fields_ = [("n", ctypes.c_uint32), ("scale", ctypes.c_float)]


@pytest.fixture
def params_lib(load):
    return load("params")


def _bad_calls(dev, lib):
    x = dev.buffer(np.arange(64, dtype=np.float32))
    y = dev.buffer(np.zeros(64, np.float32))
    axpy = lib.kernel("axpy")
    sp = lib.kernel("struct_params")
    p = Params(n=64, scale=1.0)
    good_sp = (x, y, p, 1.0, 2, 0.5, np.zeros(2, np.float32))
    return y, [
        ("too few arguments", lambda: axpy(64, x, y, 2.0)),
        ("too many arguments", lambda: axpy(64, x, y, 2.0, 64, 1)),
        ("int where a buffer is expected", lambda: axpy(64, 5, y, 2.0, 64)),
        ("numpy array where a buffer is expected",
         lambda: axpy(64, np.zeros(64, np.float32), y, 2.0, 64)),
        ("Buffer where a value is expected", lambda: axpy(64, x, y, x, 64)),
        ("struct bytes of the wrong size", lambda: sp(64, x, y, bytes(12), *good_sp[3:])),
        ("ctypes struct of the wrong size", lambda: sp(64, x, y, WrongParams(), *good_sp[3:])),
        ("Python number for a struct", lambda: sp(64, x, y, 3, *good_sp[3:])),
        ("float2 of the wrong size", lambda: sp(64, *good_sp[:6], np.zeros(3, np.float32))),
        ("float for a uint (not truncated)", lambda: axpy(64, x, y, 2.0, 63.9)),
        ("numpy float for a uint (not reinterpreted)", lambda: axpy(64, x, y, 2.0, np.float32(64))),
        ("bool for a uint", lambda: axpy(64, x, y, 2.0, True)),
        ("value out of range for uint", lambda: axpy(64, x, y, 2.0, -1)),
        ("value out of range for uint (2**32)", lambda: axpy(64, x, y, 2.0, 2**32)),
        ("count 0", lambda: axpy(0, x, y, 2.0, 64)),
        ("negative count", lambda: axpy(-5, x, y, 2.0, 64)),
        ("count > 2**32", lambda: axpy(2**32 + 1, x, y, 2.0, 64)),
        ("count past the 32-bit grid", lambda: axpy(2**32 - 1023, x, y, 2.0, 64)),
        ("float count", lambda: axpy(64.0, x, y, 2.0, 64)),
        ("bool count", lambda: axpy(True, x, y, 2.0, 64)),
    ]


def test_bad_dispatches_raise_before_running(dev, params_lib) -> None:
    y, calls = _bad_calls(dev, params_lib)
    before = dev.dispatch_counts["axpy"], dev.dispatch_counts["struct_params"]
    for label, call in calls:
        with pytest.raises(DispatchError):
            call()
            pytest.fail(f"no DispatchError for: {label}")
    dev.synchronize()
    assert (dev.dispatch_counts["axpy"], dev.dispatch_counts["struct_params"]) == before
    np.testing.assert_array_equal(y.numpy(np.float32), np.zeros(64, np.float32),
                                  err_msg="a rejected dispatch ran")


def test_small_types_out_of_range(dev, params_lib) -> None:
    out = dev.buffer(np.zeros(5, np.int32))
    k = params_lib.kernel("scalar_types")
    for args in [(1, 40000, 0, False, 0), (1, 0, 256, False, 0), (1, 0, -1, False, 0),
                 (1, 0, 0, False, 65536), (-1, 0, 0, False, 0)]:
        with pytest.raises(DispatchError):
            k(1, out, *args)
    np.testing.assert_array_equal(out.numpy(np.int32), np.zeros(5, np.int32))


def test_buffer_from_another_device(dev, params_lib) -> None:
    other = type(dev)()  # a second device of the same backend
    assert other is not dev
    x_other = other.buffer(np.arange(64, dtype=np.float32))
    y = dev.buffer(np.zeros(64, np.float32))
    with pytest.raises(DispatchError):
        params_lib.kernel("axpy")(64, x_other, y, 2.0, 64)
    np.testing.assert_array_equal(y.numpy(np.float32), np.zeros(64, np.float32))


def test_views_on_backends_without_them(dev) -> None:
    b = dev.buffer(np.zeros(16, np.float32))
    if dev.supports_views:
        assert b.view(8, 16).nbytes == 16
        with pytest.raises(ValueError):
            b.view(60, 8)  # past the end
    else:
        with pytest.raises(DispatchError):
            b.view(8, 16)


def test_unknown_kernel_name(params_lib) -> None:
    with pytest.raises(KeyError) as ei:
        params_lib.kernel("no_such_kernel")
    assert "no_such_kernel" in str(ei.value) and "axpy" in str(ei.value)
    with pytest.raises(KeyError):
        params_lib["also_missing"]


def test_missing_source_file(dev, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        dev.library(str(tmp_path / "nope.metal"))


def test_unknown_backend_name() -> None:
    with pytest.raises(ValueError):
        pymetalnn.device("opencl")
