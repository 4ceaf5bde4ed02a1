"""GEMM kernel development: validate every numbered version against numpy and time it.

Versions (kernels side by side, same GemmParams interface):
  v1     kernels/dev/gemm_v1.metal     naive, one thread per output
  v2     kernels/dev/gemm_v2.metal     16x16 threadgroup-memory tiles, one output per thread
  v3     kernels/dev/gemm_v3.metal     128x128 / 64x64 register-blocked (8x8 / 4x4 per thread),
                                       double buffered; every copy-in element bounds-checked,
                                       K-contiguous operands gathered with scalar loads
  v4     kernels/dev/gemm_v4.metal     v3 + unguarded 16-byte copy-in of interior slices along
                                       either direction, split-K partials in separate kernels
                                       (157 registers: one threadgroup per SM)
  v5     kernels/gemm.metal            (current) v4 with split-K partials written by the same
                                       kernel (<= 128 registers: two threadgroups per SM)
  tiles  kernels/dev/gemm_tiles.metal  the current kernel at other tile shapes / slice depths
                                       (128x128k16, 128x64k8, 64x128k8, 64x64k8; for hacc_half
                                       also 128x256k8, 256x128k8, 128x256k16)
  cpu    kernels/dev/gemm_cpu.metal   gemm_blocked (the cpu backend's kernel): v1 beside the
                                       current one, 8 x 32 and 6 x 16 blocks (float)
  v4, v5, tiles and cpu are swept over k_splits (--splits).
  auto   kernels/gemm.metal            the current kernel through F.gemm with the host's plan

Problems (default): the 4096x4096 linear layer at batch 256 -- forward (x w^T: nt, M=256 N=4096
K=4096), grad_x (g w: nn), grad_w (g^T x: tn, M=4096 N=4096 K=256). --square adds 4096^3 nn.
On cuda every row also shows torch.matmul on the same operands in the same run (fp32 with TF32
off; fp16 on tensor cores for reference only). Each result is checked against a float64 numpy
product: max |err| / max sum_k |a||b| must stay under the variant's bound.

    PYTHONPATH=. python benchmarks/dev_gemm.py                  # cuda (or the default device)
    PYTHONPATH=. python benchmarks/dev_gemm.py --quick          # small problems (cpu)
    PYTHONPATH=. python benchmarks/dev_gemm.py --versions v3,v4 --variants float --problems fwd
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import pymetalnn  # noqa: E402
from pymetalnn.ops import gemm as ops  # noqa: E402
from pymetalnn.params import GemmParams  # noqa: E402

VARIANTS = {"float": (np.float32, None), "half": (np.float16, "float"),
            "hacc_half": (np.float16, "half")}
BOUND = {"float": 1e-5, "half": 2e-3, "hacc_half": 5e-2}  # max|err| / max(sum|a||b|)

# version -> (source, [(config label, bm, bn, kernel name format)]): driven directly
DEV_VERSIONS = {
    "v1": ("dev/gemm_v1.metal", [("naive", 0, 0, "gemm_fwd_v1_{var}")]),
    "v2": ("dev/gemm_v2.metal", [("16x16", 16, 16, "gemm_fwd_v2_{var}")]),
    "v3": ("dev/gemm_v3.metal", [("128x128", 128, 128, "gemm_fwd_v3_128x128_{var}"),
                                 ("64x64", 64, 64, "gemm_fwd_v3_64x64_{var}")]),
}
# version -> [(Tile, variants or None for all)]: driven through ops.gemm (split-K included)
_TILES = "dev/gemm_tiles.metal"
OPS_VERSIONS = {
    "v5": [(ops.Tile("128x128", 128, 128, 8, 1.0), None), (ops.Tile("64x64", 64, 64, 16, 0.6), None)],
    "tiles": [(ops.Tile("128x128k16", 128, 128, 16, 1.0, _TILES), None),
              (ops.Tile("128x64k8", 128, 64, 8, 0.8, _TILES), None),
              (ops.Tile("64x128k8", 64, 128, 8, 0.8, _TILES), None),
              (ops.Tile("64x64k8", 64, 64, 8, 0.6, _TILES), None),
              (ops.Tile("128x256k8", 128, 256, 8, 1.0, _TILES), ("hacc_half",)),
              (ops.Tile("256x128k8", 256, 128, 8, 1.0, _TILES), ("hacc_half",)),
              (ops.Tile("128x256k16", 128, 256, 16, 1.0, _TILES), ("hacc_half",))],
}
# cpu: gemm_blocked's versions (kernels/dev/gemm_cpu.metal: v1; gemm.metal: the current v2),
# 8 x 32 and 6 x 16 blocks each
_CPU = "dev/gemm_cpu.metal"
OPS_VERSIONS["cpu"] = [
    (ops.Tile(f"{name}{v}", bm, bn, 16, 1.0, _CPU if v else ops.SOURCE, ("float",), cpu=True,
              block=blk), ("float",))
    for v in ("v1", "") for name, bm, bn, blk in (("cpu512x128", 512, 128, (8, 32)),
                                                   ("cpu128x512", 128, 512, (8, 32)),
                                                   ("cpu384x64", 384, 64, (6, 16)),
                                                   ("cpu96x256", 96, 256, (6, 16)))]
V4_TILES = {"128x128": (128, 128), "64x64": (64, 64)}


def launch_v4(dev: pymetalnn.Device, tile: str, splits: int, var: str, a, b, out, prob) -> None:
    """kernels/dev/gemm_v4.metal's interface: A, B, C, bias, work, params; split-K through
    gemm_fwd_<tile>_splitk_<var> + gemm_fwd_splitk_sum_<var> (plain 2-D problems only)."""
    m, n, k, ta, tb = prob
    bm, bn = V4_TILES[tile]
    p = dev_params(m, n, k, ta, tb, bm, bn)
    p.k_splits = splits
    lib = dev.library("dev/gemm_v4.metal")
    groups = p.tiles_m * p.tiles_n * splits
    if splits == 1:
        lib.kernel(f"gemm_fwd_{tile}_{var}")(groups * 256, a.buffer, b.buffer, out.buffer,
                                             out.buffer, out.buffer, p)
        return
    work = ops._workspace(dev, splits * m * n * (2 if var == "hacc_half" else 4))
    lib.kernel(f"gemm_fwd_{tile}_splitk_{var}")(groups * 256, a.buffer, b.buffer, out.buffer,
                                                out.buffer, work, p)
    lib.kernel(f"gemm_fwd_splitk_sum_{var}")(m * n, out.buffer, out.buffer, work, p)


def problems(quick: bool, square: bool) -> dict[str, tuple[int, int, int, bool, bool]]:
    """name -> (M, N, K, transpose_a, transpose_b)."""
    if quick:
        return {"fwd": (64, 256, 256, False, True), "grad_x": (64, 256, 256, False, False),
                "grad_w": (256, 256, 64, True, False)}
    p = {"fwd": (256, 4096, 4096, False, True), "grad_x": (256, 4096, 4096, False, False),
         "grad_w": (4096, 4096, 256, True, False)}
    if square:
        p["square"] = (4096, 4096, 4096, False, False)
    return p


def dev_params(m: int, n: int, k: int, ta: bool, tb: bool, bm: int, bn: int) -> GemmParams:
    p = GemmParams()
    p.M, p.N, p.K = m, n, k
    p.lda, p.ldb, p.ldc = (m if ta else k), (k if tb else n), n
    p.batch, p.k_splits = 1, 1
    p.tiles_m, p.tiles_n = (math.ceil(m / bm), math.ceil(n / bn)) if bm else (1, 1)
    vec = ops.VEC_A * (p.lda % 4 == 0) | ops.VEC_B * (p.ldb % 4 == 0) | ops.VEC_C * (n % 4 == 0)
    p.flags = (ops.TRANS_A if ta else 0) | (ops.TRANS_B if tb else 0) | vec
    p.alpha, p.beta = 1.0, 0.0
    return p


class Runner:
    def __init__(self, dev: pymetalnn.Device, reps: int):
        self.dev = dev
        self.reps = reps

    def time(self, fn) -> tuple[float, float]:
        fn()  # compile / first launch outside the timing
        self.dev.synchronize()
        t0 = time.perf_counter()
        fn()
        self.dev.synchronize()
        once = time.perf_counter() - t0
        reps = max(2, min(self.reps, int(2.0 / max(once, 1e-6))))  # at most ~2 s per config
        if self.dev.name == "cuda":
            return common.time_cuda(fn, warmup=1, reps=reps)
        return common.time_host(fn, self.dev.synchronize, warmup=0, reps=min(reps, 3))


def run_variant(dev: pymetalnn.Device, run: Runner, torch, pname: str, prob: tuple, var: str,
                a32: np.ndarray, b32: np.ndarray, versions: list[str], splits: list[int]
                ) -> list[dict]:
    """Every version / config of one problem in one precision variant, plus torch's matmul."""
    m, n, k, ta, tb = prob
    flop = 2.0 * m * n * k
    dtype, accumulate = VARIANTS[var]
    a, b = a32.astype(dtype), b32.astype(dtype)
    oa = (a.T if ta else a).astype(np.float64)
    ob = (b.T if tb else b).astype(np.float64)
    want = oa @ ob
    scale = float((np.abs(oa) @ np.abs(ob)).max())
    ta_, tb_ = pymetalnn.tensor(a, dev), pymetalnn.tensor(b, dev)
    out = pymetalnn.empty((m, n), dtype, dev)
    rows: list[dict] = []

    def record(version: str, config: str, fn) -> None:
        out.buffer.write(np.full(m * n, np.nan, out.dtype))  # every output must be written
        fn()
        got = out.numpy().astype(np.float64)
        err = float(np.abs(got - want).max()) / scale if np.isfinite(got).all() else float("inf")
        med, spread = run.time(fn)
        rows.append({"problem": pname, "ver": version, "config": config, "variant": var,
                     "ms": med * 1e3, "spread": spread, "TFLOP/s": flop / med / 1e12,
                     "rel_err": err, "valid": "ok" if err <= BOUND[var] else "FAIL"})

    def gemm(tile: str | None, s: int | None) -> None:
        ops.gemm(ta_, tb_, out, transpose_a=ta, transpose_b=tb, accumulate=accumulate, tile=tile,
                 k_splits=s)

    for version in versions:
        if version in DEV_VERSIONS:
            if version in ("v1", "v2") and pname != "fwd":
                continue  # far from competitive: one problem is enough
            src, cfgs = DEV_VERSIONS[version]
            lib = dev.library(src)
            for label, bm, bn, fmt in cfgs:
                kern = lib.kernel(fmt.format(var=var))
                p = dev_params(m, n, k, ta, tb, bm, bn)
                count = m * n if bm == 0 else p.tiles_m * p.tiles_n * 256
                record(version, label, lambda kern=kern, p=p, count=count:
                       kern(count, ta_.buffer, tb_.buffer, out.buffer, out.buffer, out.buffer, p))
        elif version == "v4":
            for tile in V4_TILES:
                for s in splits:
                    record("v4", f"{tile}/k{s}", lambda tile=tile, s=s:
                           launch_v4(dev, tile, s, var, ta_, tb_, out, prob))
        elif version in OPS_VERSIONS:
            for tile, only in OPS_VERSIONS[version]:
                if only is not None and var not in only:
                    continue
                for s in splits:
                    record(version, f"{tile.name}/k{s}", lambda tile=tile, s=s: gemm(tile, s))
        elif version == "auto":
            t, s = ops.plan(dev, m, n, k, 1, False, var=var)
            record("auto", f"{t.name}/k{s}", lambda: gemm(None, None))
    if torch is not None and var != "hacc_half":
        xa = torch.as_tensor(dev.as_cupy(ta_.buffer, dtype, a.shape), device="cuda")
        xb = torch.as_tensor(dev.as_cupy(tb_.buffer, dtype, b.shape), device="cuda")
        xa, xb = (xa.t() if ta else xa), (xb.t() if tb else xb)
        med, spread = common.time_cuda(lambda: torch.matmul(xa, xb))
        rows.append({"problem": pname, "ver": "torch", "variant": var, "ms": med * 1e3,
                     "config": "cuBLAS" + (" (no TF32)" if var == "float" else " (tensor cores)"),
                     "spread": spread, "TFLOP/s": flop / med / 1e12})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["cpu", "cuda", "metal"], default=None)
    ap.add_argument("--quick", action="store_true", help="small problems (cpu)")
    ap.add_argument("--square", action="store_true", help="add 4096^3 nn")
    ap.add_argument("--versions", default="v1,v2,v3,v4,v5,tiles,auto")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--problems", default=None, help="comma list of fwd,grad_x,grad_w,square")
    ap.add_argument("--splits", default="1,2,4,8", help="k_splits swept for v4, v5, tiles")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    dev = pymetalnn.device(args.backend)
    run = Runner(dev, args.reps)
    probs = problems(args.quick, args.square)
    if args.problems:
        probs = {k: v for k, v in probs.items() if k in args.problems.split(",")}
    versions = args.versions.split(",")
    torch = common.cuda_torch(dev)
    print(f"device: {common.device_label(dev)}")
    rows: list[dict] = []
    rng = np.random.default_rng(0)
    splits = [int(x) for x in args.splits.split(",")]
    for pname, (m, n, k, ta, tb) in probs.items():
        a32 = rng.standard_normal((k, m) if ta else (m, k)).astype(np.float32)
        b32 = rng.standard_normal((n, k) if tb else (k, n)).astype(np.float32)
        for var in args.variants.split(","):
            rows += run_variant(dev, run, torch, pname, (m, n, k, ta, tb), var, a32, b32,
                                versions, splits)
    # ratio against torch fp32 (no TF32) of the same problem
    ref_ms = {r["problem"]: r["ms"] for r in rows if r["ver"] == "torch" and r["variant"] == "float"}
    ours32 = {(r["problem"]): r["ms"] for r in rows
              if r["ver"] == "auto" and r["variant"] == "float"}
    for r in rows:
        if r["problem"] in ref_ms:
            r["x_torch32"] = ref_ms[r["problem"]] / r["ms"]
        if r["problem"] in ours32:
            r["x_ours32"] = ours32[r["problem"]] / r["ms"]
    common.report(rows, ["problem", "ver", "config", "variant", "ms", "spread", "TFLOP/s", "x_torch32",
                         "x_ours32", "rel_err", "valid"], f"dev_gemm_{dev.name}")
    return 1 if any(r.get("valid") == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
