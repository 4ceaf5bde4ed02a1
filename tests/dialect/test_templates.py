"""Templates under several host names, macros generating kernels, local includes, variants."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import rng


@pytest.mark.parametrize("name,dtype", [("tscale_float", np.float32), ("tscale_int", np.int32)])
def test_template_instantiations(load, name: str, dtype) -> None:
    lib = load("templates")
    dev = lib.device
    n = 777
    x = rng(1).integers(-1000, 1000, n).astype(dtype)
    out = dev.buffer(np.zeros(n, dtype))
    lib.kernel(name)(n, dev.buffer(x), out, n)
    # helper_twice (from dialect_helpers.h) * SCALE (default 2) + HELPER_OFFSET (1)
    np.testing.assert_array_equal(out.numpy(dtype), (x + x) * 2 + 1)


@pytest.mark.parametrize("name,dtype,k,table", [("taddk_float", np.float32, 3, 40),
                                                 ("taddk_int", np.int32, 5, 20)])
def test_macro_generated_instantiations(load, name, dtype, k, table) -> None:
    lib = load("templates")
    dev = lib.device
    kern = lib.kernel(name)
    assert kern.threadgroup_size == 64
    n = 200
    x = rng(2).integers(-1000, 1000, n).astype(dtype)
    out = dev.buffer(np.zeros(n, dtype))
    kern(n, dev.buffer(x), out, n)
    np.testing.assert_array_equal(out.numpy(dtype), x + k + table)


@pytest.mark.parametrize("t", ["float", "int", "half"])
def test_macro_defined_kernels(load, t: str) -> None:
    lib = load("templates")
    dev = lib.device
    dtype = {"float": np.float32, "int": np.int32, "half": np.float16}[t]
    n = 300
    x = rng(3).integers(-1000, 1000, n).astype(dtype)
    out = dev.buffer(np.zeros(n, dtype))
    lib.kernel(f"negate_{t}")(n, dev.buffer(x), out, n)
    np.testing.assert_array_equal(out.numpy(dtype), -x)


def test_library_kernel_names(load) -> None:
    names = set(load("templates").names)
    assert {"tscale_float", "tscale_int", "taddk_float", "taddk_int", "negate_float", "negate_int",
            "negate_half", "no_extra_kernel", "acc_size"} == names


def test_defines_select_a_variant(load) -> None:
    base = load("templates")
    var = load("templates", SCALE=5, EXTRA_KERNEL=3, ACC_TYPE="half")
    assert var is not base
    assert "extra_kernel" in var.names and "no_extra_kernel" not in var.names
    dev = var.device
    n = 256
    out = dev.buffer(np.zeros(n, np.int32))
    var.kernel("extra_kernel")(n, out)
    np.testing.assert_array_equal(out.numpy(np.int32), np.arange(n) * 3 + 5)
    x = np.arange(10, dtype=np.int32)
    y = dev.buffer(np.zeros(10, np.int32))
    var.kernel("tscale_int")(10, dev.buffer(x), y, 10)
    np.testing.assert_array_equal(y.numpy(np.int32), 2 * x * 5 + 1)
    sz = dev.buffer(np.zeros(1, np.uint32))
    var.kernel("acc_size")(1, sz)
    assert sz.numpy(np.uint32)[0] == 2, "ACC_TYPE=half: sizeof(acc_t)"
    base.kernel("acc_size")(1, sz)
    assert sz.numpy(np.uint32)[0] == 4, "default acc_t is float"
    base.kernel("no_extra_kernel")(1, out)
    assert out.numpy(np.int32)[0] == -1


def test_same_defines_reuse_the_compiled_library(load) -> None:
    assert load("templates", SCALE=5) is load("templates", SCALE=5)
    assert load("templates") is load("templates")


def test_host_names_from_adjacent_string_literals(load) -> None:
    """MLX writes [[host_name("addk_" #tname "_" #K)]]: adjacent literals form one string."""
    lib = load("host_name_concat")
    assert set(lib.names) == {"addk_float_3", "addk_int_7", "addk_int_9"}
    dev = lib.device
    x = np.arange(256, dtype=np.int32)
    out = dev.buffer(np.zeros(256, np.int32))
    lib.kernel("addk_int_9")(256, dev.buffer(x), out)
    np.testing.assert_array_equal(out.numpy(np.int32), x + 9)
