// gemm_v3.metal -- GEMM version 3 (snapshot of the first kernels/gemm.metal): register-blocked
// 128x128 / 64x64 tiles, double-buffered, split-K; every copy-in element bounds-checked, and
// K-contiguous operands gathered with 4 scalar loads. Kernels gemm_fwd_v3_<tile>_<variant>.
//
// (original header follows)
//
//   C = alpha * op(A) op(B) + beta * C (+ bias[n]),   op(X) = X or X^T,   batched,
//   optionally C = sum over the batch (weight gradients), optionally split along K.
//
// Design note
// -----------
// Classic register-blocked SGEMM (as in CUTLASS's SIMT kernels and the well-known "sgemm" blog
// derivations), written so that our MSL -> CUDA translation gives the same code a CUDA author
// would: a threadgroup of 256 threads owns a BM x BN tile of C; the K loop walks BK-deep slices
// of op(A) (BM x BK) and op(B) (BK x BN) staged in threadgroup memory; each thread keeps a
// TM x TN (BM/16 x BN/16) block of C in registers and does TM*TN FMAs per k against TM + TN
// values read from threadgroup memory (8x8: 4 FMAs per shared load).
//
// * Threadgroup tiles are stored k-major as 4-vectors along m (n): As[k][m/4], so the inner loop
//   reads whole float4s (128-bit shared loads on cuda). Each thread's 8 rows are two runs of 4,
//   64 apart, and so are its columns: a SIMD-group then reads 2 distinct As and 16 consecutive Bs
//   vectors per k -- broadcast / conflict-free. Rows are padded by one vector so the copy-in of
//   K-contiguous operands (below) does not hit the same bank 8 times.
// * Every layout goes through the same copy-in: a thread fetches 4 consecutive m (n) at one k.
//   If the operand is contiguous along m (n) (A^T, or B, as stored) that is one 16-byte load
//   when aligned (flag GEMM_VEC_A/B, host-checked) and in bounds; if it is contiguous along K
//   (A, or B^T) that is 4 scalar loads from 4 rows, with consecutive threads on consecutive k so
//   a SIMD-group still reads whole 32-byte sectors. Transposes are runtime flags: the branch is
//   uniform and only in the copy-in, and one kernel per (tile, precision) keeps the library small.
// * Double buffering: the next slice is fetched into registers before the FMAs on the current
//   one and stored to the other buffer after them, so global latency hides behind arithmetic and
//   one barrier per slice suffices.
// * Any M, N, K: slices past the edge are zero-filled, stores are guarded; the vector paths are
//   taken only for whole in-bounds aligned quads.
// * Small grids (few output tiles, long K: the 256 x 4096 x 4096 linear layer has 64 tiles of
//   128 x 128 for 132 SMs) split K over `k_splits` threadgroups writing partial sums (ACC) to a
//   workspace; gemm_fwd_splitk_* adds them in a fixed order (deterministic) and applies the
//   epilogue. The reduction over the batch (reduce_batch) is the same loop over a longer K.
// * Output tiles are visited in groups of GEMM_GROUP_M tile-rows so that threadgroups running at
//   the same time share panels of A and B in L2.
// * Precision: ACC is the accumulator and threadgroup-tile type. float: fp32 storage and
//   accumulation; half: fp16 storage, operands widened to float when staged, float accumulation;
//   hacc_half: fp16 storage, staging and FMAs (Metal/MPS's fp16 accumulation). The epilogue
//   (alpha, beta, bias) is computed in float and rounded once to T.
// * Bounds: every matrix has fewer than 2^31 elements (host-checked), so in-matrix offsets are
//   32-bit; batch offsets are 64-bit.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

// GemmParams.flags GEMM_*, GEMM_THREADS: params.h

#define GEMM_GROUP_M 8u

// ---- copy-in: one BK x BR slice of an operand, R = rows of op(A) (m) or columns of op(B) (n).
// `rcontig`: element (r, k) lives at X[k * ld + r] (contiguous along r), else at X[r * ld + k].
// Each thread handles NL 4-vectors; vector l covers r = 4q..4q+3 at one k, with consecutive
// threads on consecutive q (r-contiguous, 16-byte loads) or consecutive k (K-contiguous).
template <int BR, int BK>
inline uint2 gemm_slot(uint l, bool rcontig) {
    return rcontig ? uint2(l / uint(BR / 4), (l % uint(BR / 4)) * 4u)
                   : uint2(l % uint(BK), (l / uint(BK)) * 4u);  // (k, r) within the slice
}

template <typename T, typename ACC, int BR, int BK, int NL>
inline void gemm_fetch(thread vec<ACC, 4>* regs, device const T* X, uint ld, bool rcontig,
                       bool vec_ok, uint r0, uint k0, uint R, uint K, uint tid) {
#pragma unroll
    for (int i = 0; i < NL; ++i) {
        uint l = tid + uint(i) * GEMM_THREADS;
        vec<ACC, 4> v = vec<ACC, 4>(ACC(0));
        uint2 kr = gemm_slot<BR, BK>(l, rcontig);
        uint k = k0 + kr.x, r = r0 + kr.y;
        if (l < uint(BR * BK / 4) && k < K && r < R) {
            if (rcontig) {
                device const T* src = X + k * ld + r;
                if (vec_ok && r + 3u < R) {
                    v = vec<ACC, 4>(*((device const vec<T, 4>*)src));
                } else {
                    for (uint j = 0; j < 4u; ++j) {
                        if (r + j < R) v[j] = ACC(src[j]);
                    }
                }
            } else {
                device const T* src = X + r * ld + k;
                for (uint j = 0; j < 4u; ++j) {
                    if (r + j < R) v[j] = ACC(src[j * ld]);
                }
            }
        }
        regs[i] = v;
    }
}

template <typename ACC, int BR, int BK, int NL>
inline void gemm_stash(threadgroup vec<ACC, 4>* tile, thread const vec<ACC, 4>* regs,
                       bool rcontig, uint tid) {
#pragma unroll
    for (int i = 0; i < NL; ++i) {
        uint l = tid + uint(i) * GEMM_THREADS;
        if (l < uint(BR * BK / 4)) {
            uint2 kr = gemm_slot<BR, BK>(l, rcontig);
            tile[kr.x * uint(BR / 4 + 1) + kr.y / 4u] = regs[i];
        }
    }
}

// ---- epilogue of one quad of C: v = alpha * acc + bias + beta * C, rounded once to T.
template <typename T, typename ACC>
inline void gemm_store_quad(device T* c, device const T* bias, constant GemmParams& p,
                            vec<ACC, 4> acc, uint n, bool vec_ok) {
    float4 v = p.alpha * float4(acc);
    if (p.flags & GEMM_BIAS) {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < p.N) v[j] += float(bias[n + j]);
        }
    }
    if (vec_ok && n + 3u < p.N) {
        if (p.flags & GEMM_BETA) v += p.beta * float4(*((device vec<T, 4>*)c));
        *((device vec<T, 4>*)c) = vec<T, 4>(v);
    } else {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < p.N) {
                float w = v[j];
                if (p.flags & GEMM_BETA) w += p.beta * float(c[j]);
                c[j] = T(w);
            }
        }
    }
}

// ---- the tiled kernel. Grid: tiles_m * tiles_n * (reduce_batch ? 1 : batch) * k_splits
// threadgroups of 256; group g -> (tile, batch entry, split) with the tile fastest.
template <typename T, typename ACC, int BM, int BN, int BK>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_tiled(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                       device T* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                       device ACC* work [[buffer(4)]], constant GemmParams& p [[buffer(5)]],
                       uint tid [[thread_position_in_threadgroup]],
                       uint group [[threadgroup_position_in_grid]]) {
    constexpr int TM = BM / 16, TN = BN / 16;     // per-thread block of C (16 x 16 threads)
    constexpr int SA = BM / 4 + 1, SB = BN / 4 + 1;  // padded slice rows, in 4-vectors
    constexpr int NLA = (BM * BK / 4 + 255) / 256, NLB = (BN * BK / 4 + 255) / 256;
    threadgroup vec<ACC, 4> As[2 * BK * SA];
    threadgroup vec<ACC, 4> Bs[2 * BK * SB];

    // which tile / batch entry / K split
    uint tiles = p.tiles_m * p.tiles_n;
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint tile = group % tiles, rest = group / tiles;
    uint bo = rest % nb, split = rest / nb;
    uint width = GEMM_GROUP_M * p.tiles_n;
    uint first = (tile / width) * GEMM_GROUP_M;
    uint gsize = min(p.tiles_m - first, GEMM_GROUP_M);
    uint m0 = (first + (tile % width) % gsize) * uint(BM);
    uint n0 = ((tile % width) / gsize) * uint(BN);

    // this split's share of the reduction: slices t in [t0, t1) of kt_n per batch entry
    uint kt_n = (p.K + uint(BK) - 1u) / uint(BK);
    ulong total = (ulong)kt_n * (p.reduce_batch ? p.batch : 1u);
    uint t0 = uint((ulong)split * total / p.k_splits);
    uint t1 = uint((ulong)(split + 1u) * total / p.k_splits);
    uint b = p.reduce_batch ? t0 / kt_n : bo;
    uint kt = t0 % kt_n;

    bool rca = (p.flags & GEMM_TRANS_A) != 0u;   // A^T stored: contiguous along m
    bool rcb = (p.flags & GEMM_TRANS_B) == 0u;   // B stored K x N: contiguous along n
    bool va = (p.flags & GEMM_VEC_A) != 0u, vb = (p.flags & GEMM_VEC_B) != 0u;
    uint ty = tid / 16u, tx = tid % 16u;

    vec<ACC, 4> acc[TM][TN / 4];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) acc[i][j] = vec<ACC, 4>(ACC(0));
    }
    vec<ACC, 4> ra[NLA];
    vec<ACC, 4> rb[NLB];

    if (t0 < t1) {
        gemm_fetch<T, ACC, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, va, m0,
                                        kt * uint(BK), p.M, p.K, tid);
        gemm_fetch<T, ACC, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, vb, n0,
                                        kt * uint(BK), p.N, p.K, tid);
        gemm_stash<ACC, BM, BK, NLA>(As, ra, rca, tid);
        gemm_stash<ACC, BN, BK, NLB>(Bs, rb, rcb, tid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    uint cur = 0;
    for (uint t = t0; t < t1; ++t) {
        bool more = t + 1u < t1;
        if (more) {  // prefetch the next slice into registers
            if (++kt == kt_n) {
                kt = 0;
                ++b;
            }
            gemm_fetch<T, ACC, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, va, m0,
                                            kt * uint(BK), p.M, p.K, tid);
            gemm_fetch<T, ACC, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, vb, n0,
                                            kt * uint(BK), p.N, p.K, tid);
        }
        threadgroup const vec<ACC, 4>* sa = As + cur * uint(BK * SA) + ty;
        threadgroup const vec<ACC, 4>* sb = Bs + cur * uint(BK * SB) + tx;
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            vec<ACC, 4> af[TM / 4];
            vec<ACC, 4> bf[TN / 4];
#pragma unroll
            for (int i = 0; i < TM / 4; ++i) af[i] = sa[kk * SA + i * 16];
#pragma unroll
            for (int j = 0; j < TN / 4; ++j) bf[j] = sb[kk * SB + j * 16];
#pragma unroll
            for (int i = 0; i < TM; ++i) {
#pragma unroll
                for (int j = 0; j < TN / 4; ++j) {
                    acc[i][j] = fma(vec<ACC, 4>(af[i / 4][i % 4]), bf[j], acc[i][j]);
                }
            }
        }
        if (more) {
            gemm_stash<ACC, BM, BK, NLA>(As + (cur ^ 1u) * uint(BK * SA), ra, rca, tid);
            gemm_stash<ACC, BN, BK, NLB>(Bs + (cur ^ 1u) * uint(BK * SB), rb, rcb, tid);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        cur ^= 1u;
    }

    // thread (ty, tx) holds rows m0 + 64 * (i / 4) + 4 * ty + i % 4, columns n0 + 64 * j + 4 * tx
    bool vc = (p.flags & GEMM_VEC_C) != 0u;
    bool vw = (p.N % 4u) == 0u;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        uint m = m0 + 64u * uint(i / 4) + 4u * ty + uint(i % 4);
        if (m >= p.M) continue;
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) {
            uint n = n0 + 64u * uint(j) + 4u * tx;
            if (n >= p.N) continue;
            if (p.k_splits > 1u) {  // partial sums, finished by gemm_fwd_splitk
                device ACC* w = work + ((ulong)(split * nb + bo) * p.M + m) * p.N + n;
                if (vw && n + 3u < p.N) {
                    *((device vec<ACC, 4>*)w) = acc[i][j];
                } else {
                    for (uint q = 0; q < 4u; ++q) {
                        if (n + q < p.N) w[q] = acc[i][j][q];
                    }
                }
            } else {
                gemm_store_quad<T, ACC>(C + (ulong)bo * p.stride_c + m * p.ldc + n, bias, p,
                                        acc[i][j], n, vc);
            }
        }
    }
}

// ---- instantiations: gemm_fwd_<BM>x<BN>_<variant>, gemm_fwd_splitk_<variant>,
// linear_bwd_bias_<variant>, variant = float | half | hacc_half (see the design note).
#define GEMM_STR_(x) #x
#define GEMM_STR(x) GEMM_STR_(x)
#define GEMM_KERNEL(NAME, FN, ...) \
    INSTANTIATE(GEMM_STR(NAME), FN, __VA_ARGS__)

#define GEMM_INST(TILE, BM, BN, BK)                                                \
    GEMM_KERNEL(gemm_fwd_v3_##TILE##_float, gemm_tiled, float, float, BM, BN, BK)     \
    GEMM_KERNEL(gemm_fwd_v3_##TILE##_half, gemm_tiled, half, float, BM, BN, BK)       \
    GEMM_KERNEL(gemm_fwd_v3_##TILE##_hacc_half, gemm_tiled, half, half, BM, BN, BK)
GEMM_INST(128x128, 128, 128, 8)
GEMM_INST(64x64, 64, 64, 16)

