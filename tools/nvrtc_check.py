"""Compile CUDA C++ with NVRTC on a machine without a GPU (developer tool, not a runtime path).

Usage: python tools/nvrtc_check.py file.cu [-I dir] ...   (prints the NVRTC log; exit 1 on error)
Needs libnvrtc (pip install nvidia-cuda-nvrtc-cu12).
"""
from __future__ import annotations

import ctypes
import glob
import os
import sys


def _lib() -> ctypes.CDLL:
    cands = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia",
                                   "cuda_nvrtc", "lib", "libnvrtc.so*"))
    cands = [c for c in cands if ".alt." not in c] or ["libnvrtc.so"]
    return ctypes.CDLL(cands[0])


def compile_source(src: str, name: str = "k.cu", options: list[str] | None = None) -> tuple[bool, str]:
    lib = _lib()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    assert rc == 0, rc
    opts = options or ["-std=c++17", "-default-device", "-arch=compute_90"]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, buf.value.decode(errors="replace")


if __name__ == "__main__":
    path = sys.argv[1]
    extra = sys.argv[2:]
    ok, log = compile_source(open(path).read(), os.path.basename(path),
                             ["-std=c++17", "-default-device", "-arch=compute_90", *extra])
    print(log)
    sys.exit(0 if ok else 1)
