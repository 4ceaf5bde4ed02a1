// gemm_v1.metal -- GEMM version 1 (naive): one thread per element of C, the K loop straight from
// global memory. The correctness baseline of benchmarks/dev_gemm.py; every later version must
// match it. Same interface as kernels/gemm.metal (GemmParams, GEMM_* flags) minus split-K.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

template <typename T, typename ACC>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_v1(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                    device T* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                    device ACC* work [[buffer(4)]], constant GemmParams& p [[buffer(5)]],
                    uint gid [[thread_position_in_grid]]) {
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint mn = p.M * p.N;
    if ((ulong)gid >= (ulong)nb * mn) return;
    uint bo = gid / mn, r = gid % mn, m = r / p.N, n = r % p.N;
    bool ta = (p.flags & GEMM_TRANS_A) != 0u, tb = (p.flags & GEMM_TRANS_B) != 0u;
    uint b_first = p.reduce_batch ? 0u : bo, b_last = p.reduce_batch ? p.batch : bo + 1u;
    ACC acc = ACC(0);
    for (uint b = b_first; b < b_last; ++b) {
        device const T* a = A + (ulong)b * p.stride_a;
        device const T* bm = B + (ulong)b * p.stride_b;
        for (uint k = 0; k < p.K; ++k) {
            T av = ta ? a[k * p.lda + m] : a[m * p.lda + k];
            T bv = tb ? bm[n * p.ldb + k] : bm[k * p.ldb + n];
            acc = fma(ACC(av), ACC(bv), acc);
        }
    }
    device T* c = C + (ulong)bo * p.stride_c + m * p.ldc + n;
    float v = p.alpha * float(acc);
    if (p.flags & GEMM_BIAS) v += float(bias[n]);
    if (p.flags & GEMM_BETA) v += p.beta * float(*c);
    *c = T(v);
}

INSTANTIATE("gemm_fwd_v1_float", gemm_v1, float, float)
INSTANTIATE("gemm_fwd_v1_half", gemm_v1, half, float)
INSTANTIATE("gemm_fwd_v1_hacc_half", gemm_v1, half, half)
