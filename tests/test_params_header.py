"""kernels/params.h against pymetalnn/params.py: every struct has a ctypes mirror with the same
fields (arrays of 4-byte fields included; params.layout reads them from the header) and back;
every shared constant has one definition, in params.h, and a kernel compiled by the backend sees
the value the host reads (params.CONST)."""
from __future__ import annotations

import ctypes
import glob
import os
import re

import numpy as np
import pytest

from pymetalnn.params import CONST, Params, layout, parse_constants, parse_header
from pymetalnn.runtime.core import KERNEL_DIR

C_TYPES = {"uint": ctypes.c_uint32, "int": ctypes.c_int32, "float": ctypes.c_float}


def test_struct_mirrors_match_header() -> None:
    header = parse_header()
    for name, fields in header.items():
        assert name in Params.registry, f"kernels/params.h: struct {name} has no Python mirror"
        py = Params.registry[name]._fields_
        assert len(py) == len(fields), name
        words = 0
        for (pname, pty), (hty, hname) in zip(py, fields):
            m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", hname)
            assert m and pname == m.group(1), (name, pname, hname)
            assert hty in C_TYPES, f"{name}: field type {hty} is not a 4-byte type"
            count = int(m.group(2) or 0)
            want = C_TYPES[hty] * count if count else C_TYPES[hty]
            assert ctypes.sizeof(pty) == ctypes.sizeof(want), (name, pname)
            base = getattr(pty, "_type_", pty) if count else pty
            assert base is C_TYPES[hty], (name, pname)
            words += max(count, 1)
        assert ctypes.sizeof(Params.registry[name]) == 4 * words, name
    for name in Params.registry:
        assert name in header, f"pymetalnn.params.{name} is not in kernels/params.h"


def test_constants_defined_once() -> None:
    """No kernel source redefines a params.h constant (a second copy could drift)."""
    assert {"GEMM_TRANS_A", "NN_ACT_RELU", "SM_CACHE", "OPTIM_CHUNK", "RNN_STAGE"} <= set(CONST)
    sources = glob.glob(os.path.join(KERNEL_DIR, "**", "*.metal"), recursive=True)
    sources += glob.glob(os.path.join(KERNEL_DIR, "**", "*.h"), recursive=True)
    for path in sources:
        if os.path.basename(path) == "params.h":
            continue
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for name in CONST:
            assert not re.search(rf"^\s*#\s*define\s+{name}\b|constant\s+\w+\s+{name}\s*=", text,
                                 re.M), f"{os.path.relpath(path, KERNEL_DIR)} redefines {name}"


def test_parse_constants_literals(tmp_path) -> None:
    h = tmp_path / "h.h"
    h.write_text("#define A 12u\n#define B 0x10  // sixteen\n  #  define C 7\n#define D(x) x\n"
                 "#define E SOMETHING\n#define F 3.5f\n")
    assert parse_constants(str(h)) == {"A": 12, "B": 16, "C": 7}


def test_layout_reads_fields_arrays_and_refuses_other_types(tmp_path) -> None:
    h = tmp_path / "h.h"
    h.write_text("struct P {\n  uint n, m;  // two\n  float a;\n  int off[3];\n};\n"
                 "struct Q { double d; };\n")
    got = [(n, ctypes.sizeof(t), t._type_ if hasattr(t, "_length_") else t)
           for n, t in layout("P", str(h))]
    assert got == [("n", 4, ctypes.c_uint32), ("m", 4, ctypes.c_uint32), ("a", 4, ctypes.c_float),
                   ("off", 12, ctypes.c_int32)]
    with pytest.raises(TypeError, match="Q.d: double is not a 4-byte field type"):
        layout("Q", str(h))


def test_kernels_see_the_host_constants(dev, tmp_path) -> None:
    """A kernel including params.h writes every constant; the values are params.CONST's."""
    names = sorted(CONST)
    body = "\n".join(f"    if (i == {k}u) out[i] = uint({n});" for k, n in enumerate(names))
    src = tmp_path / "params_constants.metal"
    src.write_text('#include <metal_stdlib>\n#include "params.h"\nusing namespace metal;\n\n'
                   "kernel void params_constants(device uint* out [[buffer(0)]],\n"
                   "                             uint i [[thread_position_in_grid]]) {\n"
                   f"{body}\n}}\n")
    buf = dev.buffer(nbytes=4 * len(names))
    dev.library(str(src)).kernel("params_constants")(len(names), buf)
    got = buf.numpy(np.uint32, (len(names),))
    assert dict(zip(names, got.tolist())) == {n: CONST[n] for n in names}


# The memory-bound families: their kernels have no per-thread arrays that belong in local memory,
# so a local access in their PTX is an argument struct indexed at run time (kernels/args.h).
MEMORY_BOUND = ["arith", "copy", "dropout", "embedding", "loss", "neuron", "norm", "optimizer",
                "pool", "softmax", "detection", "rnn"]


@pytest.mark.parametrize("name", MEMORY_BOUND)
def test_argument_structs_stay_out_of_local_memory(nvrtc, name: str) -> None:
    """cuda: no kernel of kernels/<name>.metal loads or stores local memory (PTX from NVRTC,
    translated as backend_cuda does; skipped where libnvrtc is not installed). A run-time index
    into a kernel-argument array copies the whole struct to local memory in every thread."""
    ptx = nvrtc.metal_ptx(os.path.join(KERNEL_DIR, f"{name}.metal"))
    bad = {k: dict(c) for k, c in nvrtc.access_summary(ptx).items()
           if any(".local" in op for op in c)}
    assert not bad, f"kernels/{name}.metal: local memory in {bad}"
