"""Compile CUDA C++ with NVRTC on a machine without a GPU (developer tool, not a runtime path).

Usage:
  python tools/nvrtc_check.py file.cu [-I dir] ...    (prints the NVRTC log; exit 1 on error)
  python tools/nvrtc_check.py --metal kernels/neuron.metal [--ptx OUT.ptx] [--match SUBSTR] ...
      translate a kernel source as the cuda backend does (prelude pasted in, -arch=compute_90),
      compile it to PTX and print, per kernel whose name contains a --match string (all when
      none), the global and local load/store instructions by width (ld.global.v4.b32 and so
      on): the check that a memory-bound kernel moves 16 bytes per access and touches no local
      memory. --ptx also writes the PTX. PMN_NVRTC names libnvrtc if it is elsewhere.
Needs libnvrtc (pip install nvidia-cuda-nvrtc-cu12).
"""
from __future__ import annotations

import collections
import ctypes
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCH = "-arch=compute_90"


def _lib() -> ctypes.CDLL:
    cands = glob.glob(os.path.join(sys.prefix, "lib", "python3*", "site-packages", "nvidia",
                                   "cuda_nvrtc", "lib", "libnvrtc.so*"))
    cands += sorted(glob.glob("/usr/local/cuda*/lib64/libnvrtc.so*"))
    cands = [c for c in cands if ".alt." not in c] or ["libnvrtc.so"]
    return ctypes.CDLL(os.environ.get("PMN_NVRTC") or cands[0])


def compile_source(src: str, name: str = "k.cu", options: list[str] | None = None,
                   want_ptx: bool = False) -> tuple[bool, str] | tuple[bool, str, str]:
    lib = _lib()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    assert rc == 0, rc
    opts = options or ["-std=c++17", "-default-device", ARCH]
    arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    ptx = ""
    if want_ptx and rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
        pbuf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetPTX(prog, pbuf)
        ptx = pbuf.value.decode(errors="replace")
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    if want_ptx:
        return rc == 0, buf.value.decode(errors="replace"), ptx
    return rc == 0, buf.value.decode(errors="replace")


def translate(path: str, defines: dict | None = None):
    """The cuda translation of a .metal source as backend_cuda makes it (prelude pasted in);
    needs no libnvrtc."""
    sys.path.insert(0, ROOT)
    from pymetalnn.runtime.core import KERNEL_DIR, PRELUDE_DIR
    from pymetalnn.runtime.msl import translate_file

    with open(os.path.join(PRELUDE_DIR, "pmn_prelude.h"), encoding="utf-8") as f:
        prelude = '#line 1 "pmn_prelude.h"\n' + f.read() + "\n"
    return translate_file(path, "cuda", defines or {}, [KERNEL_DIR], prelude=prelude)


def options() -> list[str]:
    """backend_cuda's NVRTC options with this tool's architecture."""
    sys.path.insert(0, ROOT)
    from pymetalnn.runtime.backend_cuda import NVRTC_OPTIONS

    return [*NVRTC_OPTIONS, ARCH]


def metal_ptx(path: str, defines: dict | None = None) -> str:
    """PTX of a .metal source translated as backend_cuda does (prelude pasted in)."""
    tr = translate(path, defines)
    ok, log, ptx = compile_source(tr.source, os.path.basename(path), options(), want_ptx=True)
    if not ok:
        raise SystemExit(f"NVRTC failed on {path}:\n{log}")
    return ptx


_ENTRY = re.compile(r"^\.visible \.entry (\w+)\(", re.M)
_MEM = re.compile(r"\b((?:ld|st)\.(?:global|local)(?:\.\w+)*?)\s", re.M)


def access_summary(ptx: str) -> dict[str, collections.Counter]:
    """kernel name -> Counter of global and local load/store opcodes (ld.global.nc.v4.u32,
    st.local.u32, ...). Local accesses in a kernel with no per-thread arrays mean an argument
    struct or an array indexed at run time was copied to local memory (kernels/args.h)."""
    out: dict[str, collections.Counter] = {}
    starts = [(m.start(), m.group(1)) for m in _ENTRY.finditer(ptx)] + [(len(ptx), "")]
    for (a, name), (b, _) in zip(starts, starts[1:]):
        out[name] = collections.Counter(m.group(1) for m in _MEM.finditer(ptx[a:b]))
    return out


def _main_metal(argv: list[str]) -> int:
    path, ptx_out, matches = "", "", []
    it = iter(argv)
    for a in it:
        if a == "--metal":
            path = next(it)
        elif a == "--ptx":
            ptx_out = next(it)
        elif a == "--match":
            matches.append(next(it))
    ptx = metal_ptx(path)
    if ptx_out:
        with open(ptx_out, "w", encoding="utf-8") as f:
            f.write(ptx)
    for name, c in sorted(access_summary(ptx).items()):
        if matches and not any(m in name for m in matches):
            continue
        print(f"{name:40s} " + ", ".join(f"{k} x{v}" for k, v in sorted(c.items())))
    return 0


if __name__ == "__main__":
    if "--metal" in sys.argv:
        sys.exit(_main_metal(sys.argv[1:]))
    path = sys.argv[1]
    extra = sys.argv[2:]
    ok, log = compile_source(open(path).read(), os.path.basename(path),
                             ["-std=c++17", "-default-device", ARCH, *extra])
    print(log)
    sys.exit(0 if ok else 1)
