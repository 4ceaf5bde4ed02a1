"""Developer check of pymetalnn/runtime/prelude/pmn_prelude.h (the MSL prelude) on both targets.

Usage: python tools/prelude_check.py [--cpu] [--cuda] [--gpu] [--keep DIR] [--cxx g++]

  --cpu   (default on) compiles a C++17 test program with PMN_CPU and runs it: half rounding
          against an independent reference (exhaustive over all halves, boundary sweeps, random
          floats, random +-*/fma operands), vectors, math, as_type, atomics (also contended), and
          the SIMD-group functions through a "cross-check kernel" run on 64 threads. The kernel
          runs under a thread-based mock of the three pmn_cpu_* runtime calls and, if
          pymetalnn/runtime/cpu/pmn_cpu_rt.cpp exists, again under the real fiber runtime; both
          runs are checked against reference semantics and must agree bit for bit.
  --cuda  (default on) compiles a CUDA source that instantiates every function and operator for
          each type, through tools/nvrtc_check.py (NVRTC, no GPU needed), plus the cross-check
          kernel. Zero errors and zero warnings required.
  --gpu   (needs CuPy and a GPU) runs the cross-check kernel on the GPU (NVRTC, -fmad=false so
          float expressions are not contracted) and compares every output with the cpu run:
          half and SIMD results must be bit-identical; libm functions within a tolerance.
Exit status 0 when everything passed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRELUDE_DIR = os.path.join(ROOT, "pymetalnn", "runtime", "prelude")
CPU_DIR = os.path.join(ROOT, "pymetalnn", "runtime", "cpu")
sys.path.insert(0, ROOT)
from pymetalnn.runtime.backend_cpu import kernel_flags  # noqa: E402

CPU_RT = os.path.join(CPU_DIR, "pmn_cpu_rt.cpp")
NVRTC_CHECK = os.path.join(ROOT, "tools", "nvrtc_check.py")
# the C++ and CUDA sources: prelude_test.cpp (cpu program; mock_rt.h or real_rt.h), xk.h (the
# cross-check kernel, both targets), prelude_compile.cu and prelude_xk.cu (NVRTC)
TESTS_DIR = os.path.join(ROOT, "tools", "prelude_tests")
CPU_TEST = os.path.join(TESTS_DIR, "prelude_test.cpp")


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def _compile_cpu(cxx: str, work: str, name: str, mock: bool, link: list[str],
                 isa: list[str]) -> str | None:
    exe = os.path.join(work, name)
    cmd = [cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-DPMN_CPU=1", "-pthread",
           f"-DPMN_TEST_MOCK_RT={int(mock)}", "-I", PRELUDE_DIR, "-I", CPU_DIR, "-I", TESTS_DIR,
           *isa, CPU_TEST, *link, "-o", exe]
    r = _run(cmd)
    if r.returncode != 0:
        print(f"[cpu] compile of {name} FAILED:\n{r.stdout}{r.stderr}")
        return None
    if r.stderr.strip():
        print(f"[cpu] compiler output for {name}:\n{r.stderr}")
    return exe


def run_cpu(cxx: str, work: str, dump: str | None) -> bool:
    ok = True
    dumps = []
    variants = [("prelude_test_mock", True, [], [])]
    if os.path.exists(CPU_RT):
        variants.append(("prelude_test_rt", False, [CPU_RT], []))
    else:
        print(f"[cpu] {CPU_RT} not found: SIMD tests run on the mock runtime only")
    # the kernels' instruction set (-march for this host, where known): the prelude's F16C and
    # AVX512-FP16 paths, which must give the portable build's results bit for bit
    isa = [f for f in kernel_flags() if f.startswith(("-march=", "-mavx", "-mf16c", "-ffp-contract"))]
    if isa:
        variants.append(("prelude_test_host", True, [], isa))
    for name, mock, link, flags in variants:
        exe = _compile_cpu(cxx, work, name, mock, link, flags)
        if exe is None:
            ok = False
            continue
        d = os.path.join(work, name + ".xk.bin")
        args = [exe, "--dump", d] + (["--xk-only"] if name == "prelude_test_rt" else [])
        r = _run(args, timeout=900)
        print(f"[cpu] {name}: {r.stdout.strip().splitlines()[-1] if r.stdout.strip() else '(no output)'}")
        if r.returncode != 0:
            print(r.stdout + r.stderr)
            ok = False
        elif os.path.exists(d):
            dumps.append(d)
    if len(dumps) >= 2:
        first = open(dumps[0], "rb").read()
        if any(open(p, "rb").read() != first for p in dumps[1:]):
            print("[cpu] FAIL: the builds (mock runtime, real runtime, host instruction set) give "
                  "different cross-check results")
            ok = False
        else:
            print(f"[cpu] {len(dumps)} builds (mock runtime, real runtime, host instruction set) "
                  "agree bit for bit on the cross-check kernel")
    if dump and dumps:
        shutil.copyfile(dumps[0], dump)
    return ok


def run_cuda_compile(work: str) -> bool:
    ok = True
    for name in ("prelude_compile.cu", "prelude_xk.cu"):
        path = os.path.join(TESTS_DIR, name)
        r = _run([sys.executable, NVRTC_CHECK, path, "-I", PRELUDE_DIR, "-I", TESTS_DIR,
                  "-DPMN_CUDA"])
        log = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or log:
            print(f"[cuda] NVRTC {name}: {'FAILED' if r.returncode else 'warnings'}\n{log}")
            ok = ok and r.returncode == 0 and not log
        else:
            print(f"[cuda] NVRTC compiled {name}: 0 errors, 0 warnings")
    return ok


def _load_dump(path: str):
    import numpy as np
    raw = open(path, "rb").read()
    kinds = np.frombuffer(raw[:256], dtype=np.uint8)
    out = np.frombuffer(raw[256:], dtype=np.uint32)
    return kinds, out


def run_gpu(work: str, cpu_dump: str) -> bool:
    import numpy as np
    try:
        import cupy as cp
    except ImportError:
        print("[gpu] CuPy not available: skipped")
        return True
    nout, tg, nscen = 256, 64, 6
    kinds_cpu, out_cpu = _load_dump(cpu_dump)
    out_cpu = out_cpu.reshape(nscen, tg, nout)
    with open(os.path.join(TESTS_DIR, "prelude_xk.cu"), encoding="utf-8") as f:
        code = f.read()
    mod = cp.RawModule(code=code, options=("-std=c++17", "-default-device", "-fmad=false",
                                           "-I" + PRELUDE_DIR, "-I" + TESTS_DIR, "-DPMN_CUDA"),
                       backend="nvrtc")
    kern = mod.get_function("xk_kernel")
    out_gpu = np.zeros((nscen, tg, nout), dtype=np.uint32)
    kinds_gpu = None
    for s in range(nscen):
        d_out = cp.full(tg * nout, 0xdeadbeef, dtype=cp.uint32)
        d_kinds = cp.zeros(nout, dtype=cp.uint8)
        d_scr = cp.zeros(tg, dtype=cp.uint32)
        kern((1,), (tg,), (np.uint32(s), d_out, d_kinds, d_scr))
        out_gpu[s] = d_out.get().reshape(tg, nout)
        kinds_gpu = d_kinds.get()
    ok = True
    if not np.array_equal(kinds_gpu, kinds_cpu):
        print("[gpu] FAIL: output kinds differ (kernel layout mismatch)")
        return False
    f32 = lambda u: np.array([u], dtype=np.uint32).view(np.float32)[0]
    stats = {"exact": 0, "nan_payload": 0, "approx": 0}
    bad = []
    nan_idx: dict[int, int] = {}
    nan_example: dict[int, tuple[int, int]] = {}
    for s in range(nscen):
        for t in range(tg):
            for j in range(nout):
                a, b = int(out_cpu[s, t, j]), int(out_gpu[s, t, j])
                k = chr(kinds_cpu[j])
                if a == b:
                    stats["exact"] += 1
                    continue
                fa, fb = f32(a), f32(b)
                if k == "f" and np.isnan(fa) and np.isnan(fb):
                    stats["nan_payload"] += 1      # float NaN bit patterns differ by target
                    nan_idx[j] = nan_idx.get(j, 0) + 1
                    if j not in nan_example:
                        nan_example[j] = (a, b)
                    continue
                if k in "ab":
                    tol = 2e-6 if k == "a" else 2e-3
                    if (np.isnan(fa) and np.isnan(fb)) or fa == fb or \
                            abs(fa - fb) <= tol * max(1.0, abs(fa), abs(fb)):
                        stats["approx"] += 1
                        continue
                bad.append((s, t, j, k, a, b))
    print(f"[gpu] cross-check: {stats['exact']} outputs bit-identical, {stats['approx']} libm outputs "
          f"within tolerance, {stats['nan_payload']} float NaNs with target-specific payloads")
    if nan_idx:
        print("   float NaN payloads differ at output index (count, cpu/gpu example): " +
              ", ".join(f"{j}:{n} {nan_example[j][0]:08x}/{nan_example[j][1]:08x}"
                        for j, n in sorted(nan_idx.items())))
    if bad:
        ok = False
        print(f"[gpu] FAIL: {len(bad)} outputs differ between cpu and gpu:")
        by_index: dict[int, int] = {}
        for _, _, j, _, _, _ in bad:
            by_index[j] = by_index.get(j, 0) + 1
        print("   mismatches per output index: " +
              ", ".join(f"{j}({chr(kinds_cpu[j])}):{n}" for j, n in sorted(by_index.items())))
        for s, t, j, k, a, b in bad[:40]:
            print(f"   scen {s} tid {t:2d} out {j:3d} kind {k}: cpu {a:08x} ({f32(a)!r}) "
                  f"gpu {b:08x} ({f32(b)!r})")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--cuda", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="write the binaries here")
    ap.add_argument("--cxx", default=os.environ.get("CXX", "g++"))
    a = ap.parse_args()
    if not (a.cpu or a.cuda or a.gpu):
        a.cpu = a.cuda = True
    work = a.keep or tempfile.mkdtemp(prefix="pmn_prelude_check_")
    os.makedirs(work, exist_ok=True)
    ok = True
    try:
        dump = os.path.join(work, "cpu_xk.bin") if a.gpu else None
        if a.cpu or a.gpu:
            ok &= run_cpu(a.cxx, work, dump)
        if a.cuda:
            ok &= run_cuda_compile(work)
        if a.gpu and dump and os.path.exists(dump):
            ok &= run_gpu(work, dump)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("prelude check: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
