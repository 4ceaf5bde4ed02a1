// gemm_v2.metal -- GEMM version 2: classic threadgroup-memory tiling. A 16 x 16 threadgroup owns a
// 16 x 16 tile of C, one element per thread; 16-deep slices of op(A) and op(B) are staged in
// threadgroup memory so each global element is read by 16 threads from shared memory instead of
// 16 times from global. Still one FMA per two shared loads: bound by shared-memory bandwidth.
// Same interface as kernels/gemm.metal (GemmParams, GEMM_* flags) minus split-K.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

#define TS 16u

template <typename T, typename ACC>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_v2(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                    device T* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                    device ACC* work [[buffer(4)]], constant GemmParams& p [[buffer(5)]],
                    uint tid [[thread_position_in_threadgroup]],
                    uint group [[threadgroup_position_in_grid]]) {
    threadgroup ACC As[TS][TS + 1];
    threadgroup ACC Bs[TS][TS + 1];
    uint tiles = p.tiles_m * p.tiles_n;
    uint tile = group % tiles, bo = group / tiles;
    uint ty = tid / TS, tx = tid % TS;
    uint m = (tile / p.tiles_n) * TS + ty, n = (tile % p.tiles_n) * TS + tx;
    bool ta = (p.flags & GEMM_TRANS_A) != 0u, tb = (p.flags & GEMM_TRANS_B) != 0u;
    device const T* a = A + (ulong)bo * p.stride_a;
    device const T* bm = B + (ulong)bo * p.stride_b;
    ACC acc = ACC(0);
    for (uint k0 = 0; k0 < p.K; k0 += TS) {
        // As[k][m], Bs[k][n]: thread (ty, tx) loads op(A)[m0 + tx, k0 + ty] and op(B)[k0 + ty, n]
        uint am = m - ty + tx, ak = k0 + ty;
        As[ty][tx] = (am < p.M && ak < p.K) ? ACC(ta ? a[ak * p.lda + am] : a[am * p.lda + ak])
                                            : ACC(0);
        Bs[ty][tx] = (n < p.N && ak < p.K) ? ACC(tb ? bm[n * p.ldb + ak] : bm[ak * p.ldb + n])
                                           : ACC(0);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint k = 0; k < TS; ++k) acc = fma(As[k][ty], Bs[k][tx], acc);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    if (m >= p.M || n >= p.N) return;
    device T* c = C + (ulong)bo * p.stride_c + m * p.ldc + n;
    float v = p.alpha * float(acc);
    if (p.flags & GEMM_BIAS) v += float(bias[n]);
    if (p.flags & GEMM_BETA) v += p.beta * float(*c);
    *c = T(v);
}

INSTANTIATE("gemm_fwd_v2_float", gemm_v2, float, float)
INSTANTIATE("gemm_fwd_v2_half", gemm_v2, half, float)
INSTANTIATE("gemm_fwd_v2_hacc_half", gemm_v2, half, half)
