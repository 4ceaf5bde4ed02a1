"""How the cuda backend compiles a library (backend_cuda._compile): the translation is a head
without kernel instantiations plus one entry per kernel; NVRTC's front end alone checks the whole
source when the library loads (errors with their .metal line), and each kernel compiles alone, as
its own module, on first use. The NVRTC checks skip where libnvrtc is not installed (PMN_NVRTC
names it); the device test runs on cuda only."""
from __future__ import annotations

import glob
import os

import numpy as np
import pytest

import pymetalnn
from pymetalnn.runtime.core import KERNEL_DIR
from pymetalnn.runtime.errors import CompileError
from pymetalnn.runtime.msl import translate_file
from pymetalnn.runtime.msl_emit import cuda_entry

LIBRARIES = sorted(os.path.relpath(p, KERNEL_DIR) for p in glob.glob(os.path.join(KERNEL_DIR, "*.metal")))

# an error only an instantiation of f<float> reveals, on line 6
TEMPLATE_ERROR = ("#include <metal_stdlib>\nusing namespace metal;\n\n"
                  "template <typename T>\nvoid f(device T* x) {\n    x[0].no_such_member();\n}\n\n"
                  "template <typename T>\nkernel void k(device T* x [[buffer(0)]]) { f(x); }\n"
                  'template [[host_name("k_float")]] kernel void k<float>(device float*);\n')


@pytest.mark.parametrize("name", LIBRARIES)
def test_translation_is_head_plus_one_entry_per_kernel(name: str) -> None:
    tr = translate_file(os.path.join(KERNEL_DIR, name), "cuda", {}, [KERNEL_DIR])
    entries = [cuda_entry(k) for k in tr.kernels.values()]
    assert tr.source == tr.head + "".join(w + s for w, s in entries)
    assert 'extern "C" __global__' not in tr.head
    for (wrapper, sizes), k in zip(entries, tr.kernels.values()):
        assert wrapper.count("__global__") == 1 and f" {k.name}(" in wrapper
        assert sizes.startswith(f'extern "C" __device__ unsigned pmn_argsizes_{k.name}[]')


@pytest.mark.parametrize("name", ["gemm.metal", "conv.metal", "loss.metal"])
def test_each_kernel_compiles_alone(nvrtc, name: str) -> None:
    """The whole source passes the front-end check; the head with one kernel's wrapper compiles
    to PTX holding that kernel alone (first, middle and last of the library)."""
    tr = nvrtc.translate(os.path.join(KERNEL_DIR, name))
    ok, log = nvrtc.compile_source(tr.source, name, [*nvrtc.options(), "-fdevice-syntax-only"])
    assert ok, log
    names = list(tr.kernels)
    for k in (names[0], names[len(names) // 2], names[-1]):
        ok, log, ptx = nvrtc.compile_source(tr.head + cuda_entry(tr.kernels[k])[0], name,
                                            nvrtc.options(), want_ptx=True)
        assert ok, log
        assert nvrtc._ENTRY.findall(ptx) == [k]


def test_front_end_check_finds_errors_inside_templates(nvrtc, tmp_path) -> None:
    """-fdevice-syntax-only instantiates templates: an error that only an instantiation reveals
    is reported, with its .metal line (what makes loading a library report every error)."""
    src = tmp_path / "tmpl_err.metal"
    src.write_text(TEMPLATE_ERROR)
    tr = nvrtc.translate(str(src))
    ok, log = nvrtc.compile_source(tr.source, "tmpl_err.metal", [*nvrtc.options(), "-fdevice-syntax-only"])
    assert not ok
    assert "tmpl_err.metal(6): error" in log, log


def test_cuda_library_compiles_kernels_on_first_use(tmp_path) -> None:
    """cuda: loading a library compiles no kernel; a lookup compiles that kernel alone, which
    then runs; an error in a template body fails the load with the .metal line."""
    if pymetalnn.availability()["cuda"]:
        pytest.skip(f"cuda: {pymetalnn.availability()['cuda']}")
    dev = pymetalnn.device("cuda")
    # a define of its own: a library of its own, whatever this process has run before
    lib = dev.library("arith.metal", defines={"PMN_TEST_FIRST_USE": 1})
    assert len(lib.kernels) > 10 and not lib.kernels._loaded
    from pymetalnn.params import ArithParams

    k = lib.kernel("add_fwd_flat_float")
    assert list(lib.kernels._loaded) == ["add_fwd_flat_float"] and lib.kernel("add_fwd_flat_float") is k
    n = 1000
    a, b = np.arange(n, dtype=np.float32), np.full(n, 0.5, np.float32)
    out = dev.buffer(np.zeros(n, np.float32))
    p = ArithParams(n=n)
    p.stride0[0] = p.stride1[0] = 1
    k(n, dev.buffer(a), dev.buffer(b), dev.buffer(b), out, p)
    np.testing.assert_array_equal(out.numpy(np.float32), a + b)
    bad = tmp_path / "bad_tmpl.metal"
    bad.write_text(TEMPLATE_ERROR)
    with pytest.raises(CompileError, match=r"^bad_tmpl\.metal:6: error"):
        dev.library(str(bad))
