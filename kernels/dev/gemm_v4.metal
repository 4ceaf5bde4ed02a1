// gemm_v4.metal -- GEMM version 4 (snapshot of kernels/gemm.metal): v3 + unguarded 16-byte
// copy-in of interior slices along either direction (K-contiguous operands transposed on the way
// into threadgroup memory), split-K partials in separate kernels. Same kernel names as
// kernels/gemm.metal (a separate library).
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
//   workspace; gemm_fwd_splitk_sum_* adds them in a fixed order (deterministic) and applies the
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
// `rc` (r-contiguous): element (r, k) lives at X[k * ld + r], else (K-contiguous) at
// X[r * ld + k]. A thread moves NL 4-vectors per slice, each along the contiguous direction:
// 4 consecutive r at one k (stored to the tile as one vector), or 4 consecutive k at one r
// (stored as 4 scalars: the transpose happens on the way into threadgroup memory). Consecutive
// threads take consecutive vectors, so a SIMD-group reads whole 32-byte sectors either way.
template <int BR, int BK>
inline uint2 gemm_slot(uint l, bool rc) {  // (k, r) of vector l within the slice
    return rc ? uint2(l / uint(BR / 4), (l % uint(BR / 4)) * 4u)
              : uint2((l % uint(BK / 4)) * 4u, l / uint(BK / 4));
}

// Global -> registers. `fast`: the slice is inside the matrix and 4-vector aligned (uniform over
// the threadgroup), so every vector is one unguarded 16-byte (8-byte for half) load; otherwise
// each element is bounds-checked and zero-filled outside.
template <typename T, int BR, int BK, int NL>
inline void gemm_fetch(thread vec<T, 4>* regs, device const T* X, uint ld, bool rc, bool fast,
                       uint r0, uint k0, uint R, uint K, uint tid) {
#pragma unroll
    for (int i = 0; i < NL; ++i) {
        uint l = tid + uint(i) * GEMM_THREADS;
        uint2 kr = gemm_slot<BR, BK>(l, rc);
        uint k = k0 + kr.x, r = r0 + kr.y;
        device const T* src = X + (rc ? k * ld + r : r * ld + k);
        bool mine = (BR * BK / 4) % int(GEMM_THREADS) == 0 || l < uint(BR * BK / 4);
        if (fast && mine) {
            regs[i] = *((device const vec<T, 4>*)src);
        } else {
            vec<T, 4> v = vec<T, 4>(T(0));
            if (mine) {
                if (rc) {
                    if (k < K) {
                        for (uint j = 0; j < 4u; ++j) {
                            if (r + j < R) v[j] = src[j];
                        }
                    }
                } else if (r < R) {
                    for (uint j = 0; j < 4u; ++j) {
                        if (k + j < K) v[j] = src[j];
                    }
                }
            }
            regs[i] = v;
        }
    }
}

// Registers -> threadgroup tile (k-major, rows of BR/4 + 1 vectors), widened to ACC.
template <typename T, typename ACC, int BR, int BK, int NL>
inline void gemm_stash(threadgroup vec<ACC, 4>* tile, thread const vec<T, 4>* regs, bool rc,
                       uint tid) {
    constexpr uint S = uint(BR / 4 + 1);
#pragma unroll
    for (int i = 0; i < NL; ++i) {
        uint l = tid + uint(i) * GEMM_THREADS;
        if ((BR * BK / 4) % int(GEMM_THREADS) == 0 || l < uint(BR * BK / 4)) {
            uint2 kr = gemm_slot<BR, BK>(l, rc);
            vec<ACC, 4> v = vec<ACC, 4>(regs[i]);
            if (rc) {
                tile[kr.x * S + kr.y / 4u] = v;
            } else {
                threadgroup ACC* t = (threadgroup ACC*)tile + kr.x * 4u * S + kr.y;
                for (uint j = 0; j < 4u; ++j) t[j * 4u * S] = v[j];
            }
        }
    }
}

// ---- epilogue of one quad of C: v = alpha * acc + bias + beta * C, rounded once to T (the
// split-K partial sums use it too, with alpha = 1, no bias, no beta and T = ACC).
template <typename T, typename ACC, typename B>
inline void gemm_store_quad(device T* c, device const B* bias, float alpha, float beta, uint flags,
                            uint N, vec<ACC, 4> acc, uint n, bool vec_ok) {
    float4 v = alpha * float4(acc);
    if (flags & GEMM_BIAS) {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < N) v[j] += float(bias[n + j]);
        }
    }
    if (vec_ok && n + 3u < N) {
        if (flags & GEMM_BETA) v += beta * float4(*((device vec<T, 4>*)c));
        *((device vec<T, 4>*)c) = vec<T, 4>(v);
    } else {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < N) {
                float w = v[j];
                if (flags & GEMM_BETA) w += beta * float(c[j]);
                c[j] = T(w);
            }
        }
    }
}

// ---- the tiled kernel. Grid: tiles_m * tiles_n * (reduce_batch ? 1 : batch) * k_splits
// threadgroups of 256; group g -> (tile, batch entry, split) with the tile fastest. SPLIT
// kernels store raw partial sums to `work` (k_splits > 1); the others apply the epilogue. Two
// kernels rather than a runtime branch: with both stores in one kernel ptxas allocates > 128
// registers, which allows only one threadgroup per SM.
template <typename T, typename ACC, int BM, int BN, int BK, bool SPLIT>
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
    vec<T, 4> ra[NLA];
    vec<T, 4> rb[NLB];
    // slices entirely inside the matrix (in m / n; k is checked per slice) take the fast path
    bool fa = va && m0 + uint(BM) <= p.M, fb = vb && n0 + uint(BN) <= p.N;

    if (t0 < t1) {
        uint k0 = kt * uint(BK);
        bool fk = k0 + uint(BK) <= p.K;
        gemm_fetch<T, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, fa && fk, m0, k0,
                                   p.M, p.K, tid);
        gemm_fetch<T, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, fb && fk, n0, k0,
                                   p.N, p.K, tid);
        gemm_stash<T, ACC, BM, BK, NLA>(As, ra, rca, tid);
        gemm_stash<T, ACC, BN, BK, NLB>(Bs, rb, rcb, tid);
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
            uint k0 = kt * uint(BK);
            bool fk = k0 + uint(BK) <= p.K;
            gemm_fetch<T, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, fa && fk, m0,
                                       k0, p.M, p.K, tid);
            gemm_fetch<T, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, fb && fk, n0,
                                       k0, p.N, p.K, tid);
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
            gemm_stash<T, ACC, BM, BK, NLA>(As + (cur ^ 1u) * uint(BK * SA), ra, rca, tid);
            gemm_stash<T, ACC, BN, BK, NLB>(Bs + (cur ^ 1u) * uint(BK * SB), rb, rcb, tid);
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
            if (SPLIT) {  // partial sums, finished by gemm_fwd_splitk_sum
                gemm_store_quad<ACC, ACC, T>(work + ((ulong)(split * nb + bo) * p.M + m) * p.N + n,
                                             bias, 1.0f, 0.0f, 0u, p.N, acc[i][j], n, vw);
            } else {
                gemm_store_quad<T, ACC, T>(C + (ulong)bo * p.stride_c + m * p.ldc + n, bias,
                                           p.alpha, p.beta, p.flags, p.N, acc[i][j], n, vc);
            }
        }
    }
}

// Split-K sum: C = alpha * (sum of the k_splits partials, in split order) + bias + beta * C.
// One thread per element of C.
template <typename T, typename ACC>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_splitk_sum(device T* C [[buffer(0)]], device const T* bias [[buffer(1)]],
                        device const ACC* work [[buffer(2)]], constant GemmParams& p [[buffer(3)]],
                        uint gid [[thread_position_in_grid]]) {
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint mn = p.M * p.N;
    ulong total = (ulong)nb * mn;
    if ((ulong)gid >= total) return;
    ACC s = work[gid];
    for (uint q = 1; q < p.k_splits; ++q) s += work[(ulong)q * total + gid];
    uint bo = gid / mn, r = gid % mn, m = r / p.N, n = r % p.N;
    device T* c = C + (ulong)bo * p.stride_c + m * p.ldc + n;
    float v = p.alpha * float(s);
    if (p.flags & GEMM_BIAS) v += float(bias[n]);
    if (p.flags & GEMM_BETA) v += p.beta * float(*c);
    *c = T(v);
}

// ---- linear's bias gradient: out[n] = sum over rows r of g[r, n]. A threadgroup owns 32
// columns; its 8 SIMD-groups each sum every 8th row (coalesced 128-byte rows), then one
// SIMD-group adds the 8 partials in a fixed order.
template <typename T, typename ACC>
[[max_total_threads_per_threadgroup(256)]]
kernel void linear_bias_grad(device const T* g [[buffer(0)]], device T* out [[buffer(1)]],
                             constant LinearBiasGradParams& p [[buffer(2)]],
                             uint tid [[thread_position_in_threadgroup]],
                             uint group [[threadgroup_position_in_grid]]) {
    threadgroup ACC part[8 * 32];
    uint lane = tid % 32u, row = tid / 32u;
    uint col = group * 32u + lane;
    ACC s = ACC(0);
    if (col < p.cols) {
        for (uint r = row; r < p.rows; r += 8u) s += ACC(g[(ulong)r * p.cols + col]);
    }
    part[row * 32u + lane] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (row == 0u && col < p.cols) {
        ACC t = part[lane];
        for (uint q = 1; q < 8u; ++q) t += part[q * 32u + lane];
        out[col] = T(t);
    }
}

// ---- instantiations: gemm_fwd_<BM>x<BN>[_splitk]_<variant>, gemm_fwd_splitk_sum_<variant>,
// linear_bwd_bias_<variant>, variant = float | half | hacc_half (see the design note).
#define GEMM_STR_(x) #x
#define GEMM_STR(x) GEMM_STR_(x)
#define GEMM_KERNEL(NAME, FN, ...) \
    INSTANTIATE(GEMM_STR(NAME), FN, __VA_ARGS__)

#define GEMM_INST(TILE, BM, BN, BK)                                                              \
    GEMM_KERNEL(gemm_fwd_##TILE##_float, gemm_tiled, float, float, BM, BN, BK, false)            \
    GEMM_KERNEL(gemm_fwd_##TILE##_half, gemm_tiled, half, float, BM, BN, BK, false)              \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_tiled, half, half, BM, BN, BK, false)          \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_float, gemm_tiled, float, float, BM, BN, BK, true)      \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_half, gemm_tiled, half, float, BM, BN, BK, true)        \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_hacc_half, gemm_tiled, half, half, BM, BN, BK, true)
GEMM_INST(128x128, 128, 128, 8)
GEMM_INST(64x64, 64, 64, 16)

#define GEMM_INST_PREC(VARIANT, T, ACC)                                \
    GEMM_KERNEL(gemm_fwd_splitk_sum_##VARIANT, gemm_splitk_sum, T, ACC)\
    GEMM_KERNEL(linear_bwd_bias_##VARIANT, linear_bias_grad, T, ACC)
GEMM_INST_PREC(float, float, float)
GEMM_INST_PREC(half, half, float)
GEMM_INST_PREC(hacc_half, half, half)
