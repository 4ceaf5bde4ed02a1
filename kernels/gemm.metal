// gemm.metal -- general matrix multiply and the fully-connected layer's kernels.
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
//   vectors per k -- broadcast / conflict-free. Rows are padded by one vector so that the
//   transposing stores of K-contiguous operands (below) spread over all 32 banks.
// * Every layout goes through the same copy-in, 4-vectors along the direction the operand is
//   contiguous in: along m (n) for A^T (B) as stored -- one vector store into the tile -- or along
//   K for A (B^T) -- 4 scalar stores, the transpose happens on the way into threadgroup memory.
//   Slices inside the matrix with aligned rows (GEMM_VEC_A/B, host-checked) take unguarded
//   16-byte loads; edge slices check every element. Transposes are runtime flags: the branch is
//   uniform and only in the copy-in, and one kernel per (tile, precision) keeps the library small.
// * Double buffering: the next slice is fetched into registers before the FMAs on the current
//   one and stored to the other buffer after them, so global latency hides behind arithmetic and
//   one barrier per slice suffices.
// * Any M, N, K: slices past the edge are zero-filled, stores are guarded; the vector paths are
//   taken only for whole in-bounds aligned quads.
// * Small grids (few output tiles, long K: the 256 x 4096 x 4096 linear layer has 64 tiles of
//   128 x 128 for 132 SMs) split K over `k_splits` threadgroups; the same kernel then writes raw
//   partial sums (ACC) to a workspace and gemm_fwd_splitk_sum_* adds them in a fixed order
//   (deterministic) and applies the epilogue. The reduction over the batch (reduce_batch) is the
//   same loop over a longer K. ptxas gives the 128 x 128 kernels <= 128 registers (two
//   threadgroups per SM); keep an eye on that (benchmarks/dev_gemm.py, `ptxas -v`) when editing.
// * Output tiles are visited in groups of GEMM_GROUP_M tile-rows so that threadgroups running at
//   the same time share panels of A and B in L2.
// * Precision: ACC is the accumulator and threadgroup-tile type. float: fp32 storage and
//   accumulation; half: fp16 storage, operands widened to float when staged, float accumulation;
//   hacc_half: fp16 storage, staging and FMAs (Metal/MPS's fp16 accumulation). The epilogue
//   (alpha, beta, bias, then the optional activation act of neuron.h: linear(..., activation=))
//   is computed in float and rounded once to T. Split-K partials never get the activation (the
//   host clears act for the partial pass; gemm_splitk_sum applies it).
// * fp16 on matrix hardware: gemm_mma below, the same structure with the products on 8x8
//   simdgroup matrices (tensor cores on cuda), picked by pymetalnn/ops/gemm.py's mma* tiles; and
//   gemm_mma2, its successor (ops.gemm.MMA_GEN = 2, the mma2_* tiles): 16-deep tile products
//   (simdgroup_tile.h), which cuda runs as ldmatrix + full-rate mma.sync.m16n8k16, a copy-in
//   with per-thread offsets computed once, and optionally two slices of loads in flight (PF) or
//   16-byte loads (V).
// * Bounds: every matrix has fewer than 2^31 elements (host-checked), so in-matrix offsets are
//   32-bit; batch offsets are 64-bit.
#include <metal_stdlib>
#include "params.h"
#include "neuron.h"
#include "instantiate.h"
#include "simdgroup_tile.h"
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

// ---- epilogue of one quad of C: v = act(alpha * acc + bias + beta * C), rounded once to T.
template <typename T, typename ACC, typename B>
inline void gemm_store_quad(device T* c, device const B* bias, float alpha, float beta, uint flags,
                            uint N, vec<ACC, 4> acc, uint n, bool vec_ok, uint act,
                            float act_alpha) {
    float4 v = alpha * float4(acc);
    if (flags & GEMM_BIAS) {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < N) v[j] += float(bias[n + j]);
        }
    }
    if (vec_ok && n + 3u < N) {
        if (flags & GEMM_BETA) v += beta * float4(*((device vec<T, 4>*)c));
        if (act != NN_ACT_NONE) {
            for (int j = 0; j < 4; ++j) v[j] = nn_activation(v[j], act, act_alpha);
        }
        *((device vec<T, 4>*)c) = vec<T, 4>(v);
    } else {
        for (uint j = 0; j < 4u; ++j) {
            if (n + j < N) {
                float w = v[j];
                if (flags & GEMM_BETA) w += beta * float(c[j]);
                c[j] = T(nn_activation(w, act, act_alpha));
            }
        }
    }
}

// ---- the tiled kernel. Grid: tiles_m * tiles_n * (reduce_batch ? 1 : batch) * k_splits
// threadgroups of 256; group g -> (tile, batch entry, split) with the tile fastest; the output of
// (batch entry e, split s) is the matrix C + (s * nb + e) * stride_c. With k_splits > 1 the host
// points C at the workspace (stride_c = M * N, alpha = 1, no bias, no beta) so this same kernel
// stores raw partial sums, in ACC precision: TC = ACC (a separate instantiation only for half
// storage with float accumulation). One kernel for both keeps ptxas at <= 128 registers (two
// threadgroups per SM); a runtime branch between two epilogues pushed it to 157.
template <typename T, typename ACC, typename TC, int BM, int BN, int BK>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_tiled(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                       device TC* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                       constant GemmParams& p [[buffer(4)]],
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
    device TC* c0 = C + (ulong)(split * nb + bo) * p.stride_c;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        uint m = m0 + 64u * uint(i / 4) + 4u * ty + uint(i % 4);
        if (m >= p.M) continue;
#pragma unroll
        for (int j = 0; j < TN / 4; ++j) {
            uint n = n0 + 64u * uint(j) + 4u * tx;
            if (n >= p.N) continue;
            gemm_store_quad<TC, ACC, T>(c0 + m * p.ldc + n, bias, p.alpha, p.beta, p.flags, p.N,
                                        acc[i][j], n, vc, p.act, p.act_alpha);
        }
    }
}

// ---- the blocked kernel for CPUs (the cpu backend's pick; correct everywhere). Same grid
// (256 threads per group), tile walk, split-K slices (BK deep) and epilogue as gemm_tiled, but no
// threadgroup memory and no barriers: the group's threads form a (256 / TX) x TX grid, thread
// (ty, tx) owns the TM x TN block of C at rows m0 + TM * ty, columns n0 + TN * tx, and reads its
// operands straight from device memory (the caches hold the panels the group's threads share).
// Per BK-deep slice a thread copies its TM x BK values of op(A) and BK x TN of op(B) into
// private arrays (widened to ACC, zero past K; past M / N it reads the last row / column, never
// stored), then does the BK * TM * TN FMAs as rank-1 updates. Where the block and slice are
// whole and B's rows hold the thread's TN columns contiguously, the updates read B in place,
// and A too where it is stored M x K (each row a run) or K x M (A^T: the block's TM rows side
// by side): g++ then keeps the accumulators in registers (3x the FMA rate in a C++ model of the
// loop; with the copies it keeps them in memory); a block past N's end reads its valid columns
// of each row into a zero-padded row per step (ResNet-18's 2x2-plane GEMMs, N = 4: 4.8 -> 9.2
// GFLOP/s on the 2-core test box). Their column loops carry the vectorize hint: g++ peels loops of
// up to 16 iterations completely before its vectorizer sees them, and at TN = 16 then emitted
// scalar FMAs. Blocks: 8 x 32 where the host has 512-bit vectors (16 of its 32 registers; 8 x 32
// measured best of 4..8 x 16..64 in a C++ model of the loop, g++ 12, AVX-512 Xeon: 15 GFLOP/s
// per core against 3 for gemm_tiled as work-item loops), 6 x 16 elsewhere (12 of AVX2's 16
// registers, where 8 x 32's 32 spill: 512^3, AVX2 build, 2-core EPYC: 37-75 -> 144-150 GFLOP/s;
// versions and the sweep: kernels/dev/gemm_cpu.metal, benchmarks/dev_gemm.py --versions cpu).
// Each output still accumulates its K terms one at a time in order, with fma, as gemm_tiled
// does (split-K: per split). Threads whose block starts past M or N return at once. A C
// narrower than TN runs transposed (GEMM_TRANS_C: the host swaps the operands, ops/gemm.py
// _cpu_transposed), so that its long side lies along the vectorized columns.
// Element (r, k) of an operand stored r-major (x[r * ld + k]) or, kmajor, k-major
// (x[k * ld + r]), widened to float.
template <typename T>
inline float gemm_at(device const T* x, bool kmajor, uint ld, uint r, uint k) {
    return float(kmajor ? x[k * ld + r] : x[r * ld + k]);
}

template <typename T, typename ACC, typename TC, int TM, int TN, int TX, int BK>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_blocked(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                         device TC* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                         constant GemmParams& p [[buffer(4)]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint group [[threadgroup_position_in_grid]]) {
    constexpr uint BM = (256u / uint(TX)) * uint(TM), BN = uint(TX) * uint(TN);
    uint tiles = p.tiles_m * p.tiles_n;
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint tile = group % tiles, rest = group / tiles;
    uint bo = rest % nb, split = rest / nb;
    uint width = GEMM_GROUP_M * p.tiles_n;
    uint first = (tile / width) * GEMM_GROUP_M;
    uint gsize = min(p.tiles_m - first, GEMM_GROUP_M);
    uint mt = (first + (tile % width) % gsize) * BM + uint(TM) * (tid / uint(TX));
    uint nt = ((tile % width) / gsize) * BN + uint(TN) * (tid % uint(TX));
    if (mt >= p.M || nt >= p.N) return;

    uint kt_n = (p.K + uint(BK) - 1u) / uint(BK);
    ulong total = (ulong)kt_n * (p.reduce_batch ? p.batch : 1u);
    uint t0 = uint((ulong)split * total / p.k_splits);
    uint t1 = uint((ulong)(split + 1u) * total / p.k_splits);
    uint b = p.reduce_batch ? t0 / kt_n : bo;
    uint kt = t0 % kt_n;
    bool rca = (p.flags & GEMM_TRANS_A) != 0u;   // A^T stored: contiguous along m
    bool rcb = (p.flags & GEMM_TRANS_B) == 0u;   // B stored K x N: contiguous along n
    bool full_m = mt + uint(TM) <= p.M, full_n = nt + uint(TN) <= p.N;

    ACC acc[TM][TN];
    for (int i = 0; i < TM; ++i) {
        for (int j = 0; j < TN; ++j) acc[i][j] = ACC(0);
    }
    // Rows past M and columns past N are never stored: only the valid ones are copied (tiny
    // N, as a 2x2 plane's conv, would otherwise copy 32 clamped columns to use a few), the
    // rest stay 0 from here
    const uint mv = min(uint(TM), p.M - mt), nv = min(uint(TN), p.N - nt);
    ACC as[TM][BK];
    ACC bs[BK][TN];
    for (int kk = 0; kk < BK; ++kk) {
        for (int i = 0; i < TM; ++i) as[i][kk] = ACC(0);
        for (int j = 0; j < TN; ++j) bs[kk][j] = ACC(0);
    }
    for (uint t = t0; t < t1; ++t) {
        device const T* Ab = A + (ulong)b * p.stride_a;
        device const T* Bb = B + (ulong)b * p.stride_b;
        uint k0 = kt * uint(BK);
        uint kn = min(uint(BK), p.K - k0);
        // B in place where its rows hold the thread's TN columns; the BK-step loops (constant
        // trip count: unrolled) take whole slices, a short one (K % BK, or the few terms per
        // batch entry of a weight gradient) runs its kn steps
        bool direct = rcb && full_n && kn == uint(BK);
        // with a whole block both operands are then read in place (each A value broadcast
        // from memory into its row's FMAs), with no copy at all: op(A) stored K x M (A^T,
        // direct_a: the thread's TM rows side by side) or M x K (direct_ar: TM runs along k)
        bool direct_a = direct && rca && full_m;
        bool direct_ar = direct && !rca && full_m;
        for (uint kk = 0; kk < (direct_a || direct_ar ? 0u : kn); ++kk) {
            uint k = k0 + kk;
            // whole blocks keep constant trip counts (unrolled, vectorized copies)
            if (full_m) {
                for (int i = 0; i < TM; ++i) as[i][kk] = gemm_at(Ab, rca, p.lda, mt + uint(i), k);
            } else {
                for (uint i = 0; i < mv; ++i) as[i][kk] = gemm_at(Ab, rca, p.lda, mt + i, k);
            }
            if (!rcb && !(full_n && kn == uint(BK))) {
                for (uint j = 0; j < nv; ++j) bs[kk][j] = gemm_at(Bb, rcb, p.ldb, nt + j, k);
            }
        }
        if (!rcb && full_n && kn == uint(BK)) {
            // B^T stored: each of the thread's columns is a run of BK consecutive values; read
            // run by run (one cache line each) rather than one value of TN rows per step
            // (ResNet-18's 2x2-plane forward, 512 x 4 x 4608 at batch 2, run transposed:
            // 2.7 -> 1.3 ms on the 2-core test box)
            for (int j = 0; j < TN; ++j) {
                device const T* bp = Bb + (nt + uint(j)) * p.ldb + k0;
                for (int kk = 0; kk < BK; ++kk) bs[kk][j] = ACC(bp[kk]);
            }
        }
        // a short slice's rest: 0 (the in-place paths run only its kn steps)
        for (uint kk = kn; kk < (rcb ? 0u : uint(BK)); ++kk) {
            for (int i = 0; i < TM; ++i) as[i][kk] = ACC(0);
            for (int j = 0; j < TN; ++j) bs[kk][j] = ACC(0);
        }
        if (direct_a) {
            device const T* arow = Ab + k0 * p.lda + mt;
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    const ACC av = ACC(arow[i]);
#pragma clang loop vectorize(enable)
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(av, ACC(brow[j]), acc[i][j]);
                }
                arow += p.lda;
                brow += p.ldb;
            }
        } else if (direct_ar) {
            device const T* a0 = Ab + mt * p.lda + k0;
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    const ACC av = ACC(a0[uint(i) * p.lda + uint(kk)]);
#pragma clang loop vectorize(enable)
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(av, ACC(brow[j]), acc[i][j]);
                }
                brow += p.ldb;
            }
        } else if (direct) {  // B's rows read in place: the accumulators stay in registers
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
#pragma clang loop vectorize(enable)
                    for (int j = 0; j < TN; ++j) {
                        acc[i][j] = fma(as[i][kk], ACC(brow[j]), acc[i][j]);
                    }
                }
                brow += p.ldb;
            }
        } else if (rcb) {  // a short slice or a block past N: B's rows in place, valid columns
            device const T* brow = Bb + k0 * p.ldb + nt;
            for (uint kk = 0; kk < kn; ++kk) {
                ACC bk[TN];
                for (int j = 0; j < TN; ++j) bk[j] = uint(j) < nv ? ACC(brow[j]) : ACC(0);
                for (int i = 0; i < TM; ++i) {
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(as[i][kk], bk[j], acc[i][j]);
                }
                brow += p.ldb;
            }
        } else {
            for (int kk = 0; kk < BK; ++kk) {
                for (int i = 0; i < TM; ++i) {
                    for (int j = 0; j < TN; ++j) acc[i][j] = fma(as[i][kk], bs[kk][j], acc[i][j]);
                }
            }
        }
        if (++kt == kt_n) {
            kt = 0;
            ++b;
        }
    }

    device TC* c0 = C + (ulong)(split * nb + bo) * p.stride_c;
    if (p.flags & GEMM_TRANS_C) {
        // C^T stored (the caller's columns are these rows): one element at a time, the order
        // of operations of the other epilogues
        const bool has_bias = (p.flags & GEMM_BIAS) != 0u, has_beta = (p.flags & GEMM_BETA) != 0u;
        for (uint i = 0; i < mv; ++i) {
            for (uint j = 0; j < nv; ++j) {
                device TC* c = c0 + (nt + j) * p.ldc + mt + i;
                float v = p.alpha * float(acc[i][j]);
                if (has_bias) v += float(bias[mt + i]);
                if (has_beta) v += p.beta * float(*c);
                *c = TC(nn_activation(v, p.act, p.act_alpha));
            }
        }
        return;
    }
    if (full_m && full_n) {
        // a whole block: the epilogue's per-quad branches (bias, beta, vector alignment, the
        // activation switch) hoisted out of the element loops, which then vectorize; at K = 64
        // the quad-by-quad epilogue cost as much as the FMAs. The same operations in the same
        // order as gemm_store_quad: bitwise its results.
        const bool has_bias = (p.flags & GEMM_BIAS) != 0u, has_beta = (p.flags & GEMM_BETA) != 0u;
        for (int i = 0; i < TM; ++i) {
            device TC* crow = c0 + (mt + uint(i)) * p.ldc + nt;
            if (!has_bias && !has_beta && p.act == NN_ACT_NONE) {
                for (int j = 0; j < TN; ++j) crow[j] = TC(p.alpha * float(acc[i][j]));
            } else {
                for (int j = 0; j < TN; ++j) {
                    float v = p.alpha * float(acc[i][j]);
                    if (has_bias) v += float(bias[nt + uint(j)]);
                    if (has_beta) v += p.beta * float(crow[j]);
                    crow[j] = TC(nn_activation(v, p.act, p.act_alpha));
                }
            }
        }
        return;
    }
    bool vc = (p.flags & GEMM_VEC_C) != 0u;
    for (int i = 0; i < TM; ++i) {
        uint m = mt + uint(i);
        if (m >= p.M) break;
        for (int j = 0; j < TN; j += 4) {
            uint n = nt + uint(j);
            if (n >= p.N) break;
            gemm_store_quad<TC, ACC, T>(c0 + m * p.ldc + n, bias, p.alpha, p.beta, p.flags, p.N,
                                        vec<ACC, 4>(acc[i][j], acc[i][j + 1], acc[i][j + 2],
                                                    acc[i][j + 3]), n, vc, p.act, p.act_alpha);
        }
    }
}

// Registers -> threadgroup tile of gemm_mma, element type kept: k-major (tile[k * P + r], the
// layout of B fragments) or r-major (tile[r * P + k], A fragments), P the padded row pitch.
template <typename T, int BR, int BK, int NL, int P, bool KMAJOR>
inline void gemm_stash_mma(threadgroup T* tile, thread const vec<T, 4>* regs, bool rc, uint tid) {
#pragma unroll
    for (int i = 0; i < NL; ++i) {
        uint l = tid + uint(i) * GEMM_THREADS;
        if ((BR * BK / 4) % int(GEMM_THREADS) == 0 || l < uint(BR * BK / 4)) {
            uint2 kr = gemm_slot<BR, BK>(l, rc);
            if (rc == KMAJOR) {  // the vector runs along the tile's rows: one 8-byte store
                uint o = KMAJOR ? kr.x * uint(P) + kr.y : kr.y * uint(P) + kr.x;
                *((threadgroup vec<T, 4>*)(tile + o)) = regs[i];
            } else {
                for (uint j = 0; j < 4u; ++j) {
                    uint k = kr.x + (rc ? 0u : j), r = kr.y + (rc ? j : 0u);
                    tile[KMAJOR ? k * uint(P) + r : r * uint(P) + k] = regs[i][j];
                }
            }
        }
    }
}

// ---- the simdgroup-matrix kernel (fp16 storage; matrix hardware: Apple GPUs' simdgroup
// matrices, NVIDIA tensor cores through the cuda translation). Same grid, tile walk, split-K,
// copy-in (gemm_fetch) and epilogue (gemm_store_quad) as gemm_tiled; the BK-deep products run on
// 8x8 simdgroup matrices instead of per-thread FMAs. The 8 simdgroups of a threadgroup form a 4 x 2 grid, each owning a
// (BM/4) x (BN/2) block of C as FM x FN accumulators of type ACC (float: MPS's default fp16 path;
// half: its fp16 accumulation). MSL 2.3 has no per-element access to a
// simdgroup matrix, so the epilogue goes through threadgroup memory: each simdgroup stores one
// row of its fragments (8 x BN/2 values) to its own staging rows (over the slices' memory, free
// after the K loop), then every lane applies the
// epilogue to 4-vectors of them.
template <typename T, typename ACC, typename TC, int BM, int BN, int BK>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_mma(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                     device TC* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                     constant GemmParams& p [[buffer(4)]],
                     uint tid [[thread_position_in_threadgroup]],
                     uint group [[threadgroup_position_in_grid]],
                     uint sg [[simdgroup_index_in_threadgroup]],
                     uint lane [[thread_index_in_simdgroup]]) {
    constexpr int WM = BM / 4, WN = BN / 2;          // per-simdgroup block of C
    constexpr int FM = WM / 8, FN = WN / 8;          // its 8x8 accumulators
    // A slices m-major (row m: BK values), B slices k-major (row k: BN values), rows padded by 8
    // halves: fragment loads are one aligned 32-bit access per lane, conflict-free.
    constexpr int PA = BK + 8, PB = BN + 8;
    constexpr int NLA = (BM * BK / 4 + 255) / 256, NLB = (BN * BK / 4 + 255) / 256;
    // one allocation (vectors: 8-byte aligned rows for the stash): the double-buffered slices,
    // then, after the K loop, the epilogue's staging rows over the same bytes
    constexpr int TILE_T = 2 * BM * PA + 2 * BK * PB;
    constexpr int STAGE_T = 8 * 8 * WN * int(sizeof(ACC)) / int(sizeof(T));
    threadgroup vec<T, 4> smem[((TILE_T > STAGE_T ? TILE_T : STAGE_T) + 3) / 4];
    threadgroup T* As = (threadgroup T*)smem;
    threadgroup T* Bs = As + 2 * BM * PA;
    threadgroup ACC* Cs = (threadgroup ACC*)smem;

    uint tiles = p.tiles_m * p.tiles_n;
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint tile = group % tiles, rest = group / tiles;
    uint bo = rest % nb, split = rest / nb;
    uint width = GEMM_GROUP_M * p.tiles_n;
    uint first = (tile / width) * GEMM_GROUP_M;
    uint gsize = min(p.tiles_m - first, GEMM_GROUP_M);
    uint m0 = (first + (tile % width) % gsize) * uint(BM);
    uint n0 = ((tile % width) / gsize) * uint(BN);

    uint kt_n = (p.K + uint(BK) - 1u) / uint(BK);
    ulong total = (ulong)kt_n * (p.reduce_batch ? p.batch : 1u);
    uint t0 = uint((ulong)split * total / p.k_splits);
    uint t1 = uint((ulong)(split + 1u) * total / p.k_splits);
    uint b = p.reduce_batch ? t0 / kt_n : bo;
    uint kt = t0 % kt_n;

    bool rca = (p.flags & GEMM_TRANS_A) != 0u;
    bool rcb = (p.flags & GEMM_TRANS_B) == 0u;
    bool va = (p.flags & GEMM_VEC_A) != 0u, vb = (p.flags & GEMM_VEC_B) != 0u;
    uint wm0 = (sg / 2u) * uint(WM), wn0 = (sg % 2u) * uint(WN);

    simdgroup_matrix<ACC, 8, 8> acc[FM][FN];
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) acc[i][j] = make_filled_simdgroup_matrix<ACC, 8, 8>(ACC(0));
    }
    vec<T, 4> ra[NLA];
    vec<T, 4> rb[NLB];
    bool fa = va && m0 + uint(BM) <= p.M, fb = vb && n0 + uint(BN) <= p.N;

    if (t0 < t1) {
        uint k0 = kt * uint(BK);
        bool fk = k0 + uint(BK) <= p.K;
        gemm_fetch<T, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, fa && fk, m0, k0,
                                   p.M, p.K, tid);
        gemm_fetch<T, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, fb && fk, n0, k0,
                                   p.N, p.K, tid);
        gemm_stash_mma<T, BM, BK, NLA, PA, false>(As, ra, rca, tid);
        gemm_stash_mma<T, BN, BK, NLB, PB, true>(Bs, rb, rcb, tid);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    uint cur = 0;
    for (uint t = t0; t < t1; ++t) {
        bool more = t + 1u < t1;
        if (more) {
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
        threadgroup const T* sa = As + cur * uint(BM * PA);
        threadgroup const T* sb = Bs + cur * uint(BK * PB);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            simdgroup_matrix<T, 8, 8> ma[FM];
            simdgroup_matrix<T, 8, 8> mb[FN];
            // fragment origins folded into the pointer (constant row pitch, zero origin): the
            // per-lane offset inside a fragment is then loop-invariant
#pragma unroll
            for (int i = 0; i < FM; ++i) {
                simdgroup_load(ma[i], sa + (wm0 + 8u * uint(i)) * uint(PA) + uint(kk), PA);
            }
#pragma unroll
            for (int j = 0; j < FN; ++j) {
                simdgroup_load(mb[j], sb + uint(kk) * uint(PB) + wn0 + 8u * uint(j), PB);
            }
#pragma unroll
            for (int i = 0; i < FM; ++i) {
#pragma unroll
                for (int j = 0; j < FN; ++j) {
                    simdgroup_multiply_accumulate(acc[i][j], ma[i], mb[j], acc[i][j]);
                }
            }
        }
        if (more) {
            gemm_stash_mma<T, BM, BK, NLA, PA, false>(As + (cur ^ 1u) * uint(BM * PA), ra, rca, tid);
            gemm_stash_mma<T, BN, BK, NLB, PB, true>(Bs + (cur ^ 1u) * uint(BK * PB), rb, rcb, tid);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        cur ^= 1u;
    }

    bool vc = (p.flags & GEMM_VEC_C) != 0u;
    device TC* c0 = C + (ulong)(split * nb + bo) * p.stride_c;
    threadgroup ACC* cs = Cs + sg * uint(8 * WN);
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) simdgroup_store(acc[i][j], cs + 8u * uint(j), WN);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (uint q = lane; q < uint(8 * WN / 4); q += 32u) {
            uint r = q / uint(WN / 4), cq = (q % uint(WN / 4)) * 4u;
            uint m = m0 + wm0 + 8u * uint(i) + r, n = n0 + wn0 + cq;
            if (m < p.M && n < p.N) {
                threadgroup const ACC* v = cs + r * uint(WN) + cq;
                gemm_store_quad<TC, ACC, T>(c0 + m * p.ldc + n, bias, p.alpha, p.beta, p.flags,
                                            p.N, vec<ACC, 4>(v[0], v[1], v[2], v[3]), n, vc,
                                            p.act, p.act_alpha);
            }
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// ---- gemm_mma2's copy-in: gemm_fetch / gemm_stash_mma with the per-thread offsets computed once.
// Vector i of a thread is vector tid + 256 i of the slice; when 256 is a multiple of the vectors
// per row (BR / 4 along r, BK / 4 along k: every tile here), it sits a fixed stride past vector
// tid: (1024 / BR) rows of k apart (r-contiguous) or (1024 / BK) rows of r (K-contiguous). So a
// slice costs one address per vector and a single uniform branch (`fast`), not a bounds test
// per vector. GemmOff holds, per operand: the thread's offset in the matrix relative to the
// slice origin, that stride, its tile offset and the tile stride of its vectors.
struct GemmOff {
    uint src, src_step, dst, dst_step;
};

template <int BR, int BK, int P, bool KMAJOR, int V>
inline GemmOff gemm_offsets(uint ld, bool rc, uint tid) {
    uint2 kr = rc ? uint2(tid / uint(BR / V), (tid % uint(BR / V)) * uint(V))
                  : uint2((tid % uint(BK / V)) * uint(V), tid / uint(BK / V));  // gemm_slot
    GemmOff o;
    o.src = rc ? kr.x * ld + kr.y : kr.y * ld + kr.x;
    o.src_step = uint(rc ? 256 * V / BR : 256 * V / BK) * ld;
    o.dst = KMAJOR ? kr.x * uint(P) + kr.y : kr.y * uint(P) + kr.x;
    o.dst_step = KMAJOR ? (rc ? uint(256 * V / BR * P) : uint(256 * V / BK))
                        : (rc ? uint(256 * V / BR) : uint(256 * V / BK * P));
    return o;
}

// Global -> registers for the slice at (r0, k0); `fast` as in gemm_fetch.
template <typename T, int BR, int BK, int NL>
inline void gemm_fetch_mma(thread vec<T, 4>* regs, device const T* X, uint ld, bool rc, bool fast,
                           uint r0, uint k0, uint R, uint K, uint tid, GemmOff o) {
    constexpr bool ALL = (BR * BK / 4) % int(GEMM_THREADS) == 0;
    if (fast && ALL) {
        device const T* src = X + (rc ? k0 * ld + r0 : r0 * ld + k0) + o.src;
#pragma unroll
        for (int i = 0; i < NL; ++i) regs[i] = *((device const vec<T, 4>*)(src + uint(i) * o.src_step));
    } else {
        gemm_fetch<T, BR, BK, NL>(regs, X, ld, rc, fast, r0, k0, R, K, tid);
    }
}

// Registers -> threadgroup tile (layouts of gemm_stash_mma).
template <typename T, int BR, int BK, int NL, int P, bool KMAJOR>
inline void gemm_stash_mma2(threadgroup T* tile, thread const vec<T, 4>* regs, bool rc, uint tid,
                            GemmOff o) {
    constexpr bool ALL = (BR * BK / 4) % int(GEMM_THREADS) == 0;
    if (!ALL) {
        gemm_stash_mma<T, BR, BK, NL, P, KMAJOR>(tile, regs, rc, tid);
    } else if (rc == KMAJOR) {  // the vectors run along the tile's rows: one 8-byte store each
#pragma unroll
        for (int i = 0; i < NL; ++i) {
            *((threadgroup vec<T, 4>*)(tile + o.dst + uint(i) * o.dst_step)) = regs[i];
        }
    } else {
#pragma unroll
        for (int i = 0; i < NL; ++i) {
            threadgroup T* t = tile + o.dst + uint(i) * o.dst_step;
            for (int j = 0; j < 4; ++j) t[j * P] = regs[i][j];
        }
    }
}

// 8-element vectors (V = 8 tiles: one 16-byte load and store per vector where the operand allows
// it, GEMM_VEC8_*): vector i of a thread is held as regs[2i], regs[2i + 1]. Every V = 8 tile
// covers its slices with whole vectors ((BR * BK / 8) % 256 == 0).
template <typename T, int BR, int BK, int NL>
inline void gemm_fetch_mma8(thread vec<T, 4>* regs, device const T* X, uint ld, bool rc, bool fast,
                            uint r0, uint k0, uint R, uint K, uint tid, GemmOff o) {
    if (fast) {
        device const T* src = X + (rc ? k0 * ld + r0 : r0 * ld + k0) + o.src;
#pragma unroll
        for (int i = 0; i < NL / 2; ++i) {
            uint4 u = *((device const uint4*)(src + uint(i) * o.src_step));
            regs[2 * i] = as_type<vec<T, 4>>(uint2(u.x, u.y));
            regs[2 * i + 1] = as_type<vec<T, 4>>(uint2(u.z, u.w));
        }
    } else {
#pragma unroll
        for (int i = 0; i < NL / 2; ++i) {
            uint l = tid + uint(i) * GEMM_THREADS;
            uint2 kr = rc ? uint2(l / uint(BR / 8), (l % uint(BR / 8)) * 8u)
                          : uint2((l % uint(BK / 8)) * 8u, l / uint(BK / 8));
            uint k = k0 + kr.x, r = r0 + kr.y;
            device const T* src = X + (rc ? k * ld + r : r * ld + k);
            vec<T, 4> v0 = vec<T, 4>(T(0)), v1 = vec<T, 4>(T(0));
            for (uint j = 0; j < 8u; ++j) {
                bool in = rc ? (k < K && r + j < R) : (r < R && k + j < K);
                T x = in ? src[j] : T(0);
                if (j < 4u) {
                    v0[j] = x;
                } else {
                    v1[j - 4u] = x;
                }
            }
            regs[2 * i] = v0;
            regs[2 * i + 1] = v1;
        }
    }
}

template <typename T, int BR, int BK, int NL, int P, bool KMAJOR>
inline void gemm_stash_mma8(threadgroup T* tile, thread const vec<T, 4>* regs, bool rc, GemmOff o) {
    if (rc == KMAJOR) {  // along the tile's rows: one 16-byte store
#pragma unroll
        for (int i = 0; i < NL / 2; ++i) {
            uint2 a = as_type<uint2>(regs[2 * i]), b = as_type<uint2>(regs[2 * i + 1]);
            *((threadgroup uint4*)(tile + o.dst + uint(i) * o.dst_step)) = uint4(a.x, a.y, b.x, b.y);
        }
    } else {
#pragma unroll
        for (int i = 0; i < NL / 2; ++i) {
            threadgroup T* t = tile + o.dst + uint(i) * o.dst_step;
            for (int j = 0; j < 4; ++j) t[j * P] = regs[2 * i][j];
            for (int j = 0; j < 4; ++j) t[(j + 4) * P] = regs[2 * i + 1][j];
        }
    }
}

// ---- gemm_mma2: gemm_mma with 16-deep tile products (kernels/simdgroup_tile.h). Each k16 step
// of a simdgroup loads its A rows (FM x 2 blocks) as a tile and runs one
// simdgroup_multiply_accumulate_tile with its B columns (2 x FN blocks) read from threadgroup
// memory: on cuda ldmatrix (4 blocks each; .trans for B, straight into the tensor-core layout)
// and full-rate mma.sync.m16n8k16 with no per-block alignment branches, on Metal and cpu the
// same 8x8 operations as gemm_mma. The threadgroup's 8 simdgroups form a WGM x (8 / WGM) grid, each
// owning a (BM / WGM) x (BN / (8 / WGM)) block of C; tile rows are 16-byte aligned (ldmatrix):
// the slices live in a float4 array, and the pitches BK + 8, BN + 8 are multiples of 8 halves.
// PF: how many slices ahead the global loads run. PF = 1 is gemm_mma's double buffering; PF = 2
// keeps two register sets in flight (the loop is unrolled by two so that each set has fixed
// registers), so a load has two slices of products to arrive in, not one: on a GPU with one or
// two threadgroups per core that is what hides global memory latency.

// Global -> registers for slice (kt, b) of the walk (batch entry b, K slice kt).
template <typename T, int BM, int BN, int BK, int NLA, int NLB, int V>
inline void gemm_mma2_fetch(thread vec<T, 4>* ra, thread vec<T, 4>* rb, device const T* A,
                            device const T* B, constant GemmParams& p, uint kt, uint b, bool rca,
                            bool rcb, bool fa, bool fb, uint m0, uint n0, uint tid, GemmOff oa,
                            GemmOff ob) {
    uint k0 = kt * uint(BK);
    bool fk = k0 + uint(BK) <= p.K;
    if (V == 8) {
        gemm_fetch_mma8<T, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, fa && fk, m0,
                                        k0, p.M, p.K, tid, oa);
        gemm_fetch_mma8<T, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, fb && fk, n0,
                                        k0, p.N, p.K, tid, ob);
    } else {
        gemm_fetch_mma<T, BM, BK, NLA>(ra, A + (ulong)b * p.stride_a, p.lda, rca, fa && fk, m0,
                                       k0, p.M, p.K, tid, oa);
        gemm_fetch_mma<T, BN, BK, NLB>(rb, B + (ulong)b * p.stride_b, p.ldb, rcb, fb && fk, n0,
                                       k0, p.N, p.K, tid, ob);
    }
}

// Registers -> the slice buffers at As, Bs.
template <typename T, int BM, int BN, int BK, int NLA, int NLB, int PA, int PB, int V>
inline void gemm_mma2_stash(threadgroup T* As, threadgroup T* Bs, thread const vec<T, 4>* ra,
                            thread const vec<T, 4>* rb, bool rca, bool rcb, uint tid, GemmOff oa,
                            GemmOff ob) {
    if (V == 8) {
        gemm_stash_mma8<T, BM, BK, NLA, PA, false>(As, ra, rca, oa);
        gemm_stash_mma8<T, BN, BK, NLB, PB, true>(Bs, rb, rcb, ob);
    } else {
        gemm_stash_mma2<T, BM, BK, NLA, PA, false>(As, ra, rca, tid, oa);
        gemm_stash_mma2<T, BN, BK, NLB, PB, true>(Bs, rb, rcb, tid, ob);
    }
}

// The products of one BK-deep slice (buffer at sa, sb: the simdgroup's rows / columns).
template <typename T, typename ACC, int BK, int FM, int FN, int PA, int PB>
inline void gemm_mma2_slice(thread simdgroup_matrix<ACC, 8, 8>* acc, threadgroup const T* sa,
                            threadgroup const T* sb) {
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        simdgroup_matrix<T, 8, 8> ma[FM * 2];
        simdgroup_load_tile<FM, 2>(ma, sa + kk, PA);
        simdgroup_multiply_accumulate_tile<FM, FN>(acc, ma, sb + kk * PB, PB);  // B from memory
    }
}

// Slice u of the loop, up to its barrier: fetch slice u + PF (at cursor kt, b, when `fetch`; into
// fa_set / fb_set), products on buffer `cur`, stash slice u + 1 (from sa_set / sb_set) into
// buffer cur ^ 1 (when `stash`).
template <typename T, typename ACC, int BM, int BN, int BK, int FM, int FN, int PA, int PB,
          int NLA, int NLB, int V>
inline void gemm_mma2_step(thread simdgroup_matrix<ACC, 8, 8>* acc, thread vec<T, 4>* fa_set,
                           thread vec<T, 4>* fb_set, thread const vec<T, 4>* sa_set,
                           thread const vec<T, 4>* sb_set, threadgroup T* As, threadgroup T* Bs,
                           threadgroup const T* sa0, threadgroup const T* sb0, uint cur,
                           bool fetch, bool stash, device const T* A, device const T* B,
                           constant GemmParams& p, uint kt, uint b, bool rca, bool rcb, bool fa,
                           bool fb, uint m0, uint n0, uint tid, GemmOff oa, GemmOff ob) {
    if (fetch) {
        gemm_mma2_fetch<T, BM, BN, BK, NLA, NLB, V>(fa_set, fb_set, A, B, p, kt, b, rca, rcb, fa,
                                                    fb, m0, n0, tid, oa, ob);
    }
    gemm_mma2_slice<T, ACC, BK, FM, FN, PA, PB>(acc, sa0 + cur * uint(BM * PA),
                                                sb0 + cur * uint(BK * PB));
    if (stash) {
        gemm_mma2_stash<T, BM, BN, BK, NLA, NLB, PA, PB, V>(As + (cur ^ 1u) * uint(BM * PA),
                                                            Bs + (cur ^ 1u) * uint(BK * PB),
                                                            sa_set, sb_set, rca, rcb, tid, oa,
                                                            ob);
    }
}

template <typename T, typename ACC, typename TC, int BM, int BN, int BK, int WGM, int PF, int V>
[[max_total_threads_per_threadgroup(256)]]
kernel void gemm_mma2(device const T* A [[buffer(0)]], device const T* B [[buffer(1)]],
                      device TC* C [[buffer(2)]], device const T* bias [[buffer(3)]],
                      constant GemmParams& p [[buffer(4)]],
                      uint tid [[thread_position_in_threadgroup]],
                      uint group [[threadgroup_position_in_grid]],
                      uint sg [[simdgroup_index_in_threadgroup]],
                      uint lane [[thread_index_in_simdgroup]]) {
    constexpr int WGN = 8 / WGM;
    constexpr int WM = BM / WGM, WN = BN / WGN;      // per-simdgroup block of C
    constexpr int FM = WM / 8, FN = WN / 8;          // its 8x8 accumulators
    constexpr int PA = BK + 8, PB = BN + 8;
    constexpr int NLA = (BM * BK / 4 + 255) / 256, NLB = (BN * BK / 4 + 255) / 256;
    constexpr int TILE_T = 2 * BM * PA + 2 * BK * PB;
    constexpr int STAGE_T = 8 * 8 * WN * int(sizeof(ACC)) / int(sizeof(T));
    constexpr int MEM_T = TILE_T > STAGE_T ? TILE_T : STAGE_T;
    threadgroup float4 smem[(MEM_T * int(sizeof(T)) + 15) / 16];
    threadgroup T* As = (threadgroup T*)smem;
    threadgroup T* Bs = As + 2 * BM * PA;
    threadgroup ACC* Cs = (threadgroup ACC*)smem;

    uint tiles = p.tiles_m * p.tiles_n;
    uint nb = p.reduce_batch ? 1u : p.batch;
    uint tile = group % tiles, rest = group / tiles;
    uint bo = rest % nb, split = rest / nb;
    uint width = GEMM_GROUP_M * p.tiles_n;
    uint first = (tile / width) * GEMM_GROUP_M;
    uint gsize = min(p.tiles_m - first, GEMM_GROUP_M);
    uint m0 = (first + (tile % width) % gsize) * uint(BM);
    uint n0 = ((tile % width) / gsize) * uint(BN);

    uint kt_n = (p.K + uint(BK) - 1u) / uint(BK);
    ulong total = (ulong)kt_n * (p.reduce_batch ? p.batch : 1u);
    uint t0 = uint((ulong)split * total / p.k_splits);
    uint t1 = uint((ulong)(split + 1u) * total / p.k_splits);
    uint b = p.reduce_batch ? t0 / kt_n : bo;
    uint kt = t0 % kt_n;

    bool rca = (p.flags & GEMM_TRANS_A) != 0u;
    bool rcb = (p.flags & GEMM_TRANS_B) == 0u;
    bool va = (p.flags & (V == 8 ? GEMM_VEC8_A : GEMM_VEC_A)) != 0u;
    bool vb = (p.flags & (V == 8 ? GEMM_VEC8_B : GEMM_VEC_B)) != 0u;
    uint wm0 = (sg / uint(WGN)) * uint(WM), wn0 = (sg % uint(WGN)) * uint(WN);

    simdgroup_matrix<ACC, 8, 8> acc[FM * FN];
#pragma unroll
    for (int i = 0; i < FM * FN; ++i) acc[i] = make_filled_simdgroup_matrix<ACC, 8, 8>(ACC(0));
    vec<T, 4> ra0[NLA], ra1[NLA];  // register sets: PF = 1 uses the first only
    vec<T, 4> rb0[NLB], rb1[NLB];
    bool fa = va && m0 + uint(BM) <= p.M, fb = vb && n0 + uint(BN) <= p.N;
    GemmOff oa = gemm_offsets<BM, BK, PA, false, V>(p.lda, rca, tid);
    GemmOff ob = gemm_offsets<BN, BK, PB, true, V>(p.ldb, rcb, tid);

    if (t0 < t1) {
        gemm_mma2_fetch<T, BM, BN, BK, NLA, NLB, V>(ra0, rb0, A, B, p, kt, b, rca, rcb, fa, fb,
                                                    m0, n0, tid, oa, ob);
        gemm_mma2_stash<T, BM, BN, BK, NLA, NLB, PA, PB, V>(As, Bs, ra0, rb0, rca, rcb, tid, oa,
                                                            ob);
        if (PF == 2 && t0 + 1u < t1) {
            if (++kt == kt_n) {
                kt = 0;
                ++b;
            }
            gemm_mma2_fetch<T, BM, BN, BK, NLA, NLB, V>(ra1, rb1, A, B, p, kt, b, rca, rcb, fa,
                                                        fb, m0, n0, tid, oa, ob);
        }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // slice t: fetch slice t + PF into one register set, products on buffer `cur`, stash slice
    // t + 1 (the other set for PF = 2, the same one for PF = 1) into buffer cur ^ 1. (kt, b):
    // the last slice fetched, stepped before each fetch.
    uint cur = 0;
    threadgroup const T* sa0 = As + wm0 * uint(PA);
    threadgroup const T* sb0 = Bs + wn0;
    for (uint t = t0; t < t1; t += uint(PF)) {
        bool fetch = t + uint(PF) < t1;
        if (fetch && ++kt == kt_n) {
            kt = 0;
            ++b;
        }
        if (PF == 1) {
            gemm_mma2_step<T, ACC, BM, BN, BK, FM, FN, PA, PB, NLA, NLB, V>(
                acc, ra0, rb0, ra0, rb0, As, Bs, sa0, sb0, cur, fetch, t + 1u < t1, A, B, p, kt,
                b, rca, rcb, fa, fb, m0, n0, tid, oa, ob);
        } else {
            gemm_mma2_step<T, ACC, BM, BN, BK, FM, FN, PA, PB, NLA, NLB, V>(
                acc, ra0, rb0, ra1, rb1, As, Bs, sa0, sb0, cur, fetch, t + 1u < t1, A, B, p, kt,
                b, rca, rcb, fa, fb, m0, n0, tid, oa, ob);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        cur ^= 1u;
        if (PF == 2 && t + 1u < t1) {
            fetch = t + 3u < t1;
            if (fetch && ++kt == kt_n) {
                kt = 0;
                ++b;
            }
            gemm_mma2_step<T, ACC, BM, BN, BK, FM, FN, PA, PB, NLA, NLB, V>(
                acc, ra1, rb1, ra0, rb0, As, Bs, sa0, sb0, cur, fetch, t + 2u < t1, A, B, p, kt,
                b, rca, rcb, fa, fb, m0, n0, tid, oa, ob);
            threadgroup_barrier(mem_flags::mem_threadgroup);
            cur ^= 1u;
        }
    }

    bool vc = (p.flags & GEMM_VEC_C) != 0u;
    device TC* c0 = C + (ulong)(split * nb + bo) * p.stride_c;
    threadgroup ACC* cs = Cs + sg * uint(8 * WN);
#pragma unroll
    for (int i = 0; i < FM; ++i) {
#pragma unroll
        for (int j = 0; j < FN; ++j) simdgroup_store(acc[i * FN + j], cs + 8u * uint(j), WN);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (uint q = lane; q < uint(8 * WN / 4); q += 32u) {
            uint r = q / uint(WN / 4), cq = (q % uint(WN / 4)) * 4u;
            uint m = m0 + wm0 + 8u * uint(i) + r, n = n0 + wn0 + cq;
            if (m < p.M && n < p.N) {
                threadgroup const ACC* v = cs + r * uint(WN) + cq;
                gemm_store_quad<TC, ACC, T>(c0 + m * p.ldc + n, bias, p.alpha, p.beta, p.flags,
                                            p.N, vec<ACC, 4>(v[0], v[1], v[2], v[3]), n, vc,
                                            p.act, p.act_alpha);
            }
        }
        simdgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// Split-K sum: C = act(alpha * (sum of the k_splits partials, in split order) + bias + beta * C).
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
    bool tc = (p.flags & GEMM_TRANS_C) != 0u;
    device T* c = C + (ulong)bo * p.stride_c + (tc ? n * p.ldc + m : m * p.ldc + n);
    float v = p.alpha * float(s);
    if (p.flags & GEMM_BIAS) v += float(bias[tc ? m : n]);
    if (p.flags & GEMM_BETA) v += p.beta * float(*c);
    *c = T(nn_activation(v, p.act, p.act_alpha));
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

// ---- instantiations: gemm_fwd_<BM>x<BN>_<variant> (+ _splitk_half: half storage, float
// partial sums), gemm_fwd_splitk_sum_<variant>,
// linear_bwd_bias_<variant>, variant = float | half | hacc_half (see the design note).
#define GEMM_STR_(x) #x
#define GEMM_STR(x) GEMM_STR_(x)
#define GEMM_KERNEL(NAME, FN, ...) INSTANTIATE(GEMM_STR(NAME), FN, __VA_ARGS__)

#define GEMM_INST(TILE, BM, BN, BK)                                                              \
    GEMM_KERNEL(gemm_fwd_##TILE##_float, gemm_tiled, float, float, float, BM, BN, BK)            \
    GEMM_KERNEL(gemm_fwd_##TILE##_half, gemm_tiled, half, float, half, BM, BN, BK)               \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_tiled, half, half, half, BM, BN, BK)           \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_half, gemm_tiled, half, float, float, BM, BN, BK)
GEMM_INST(128x128, 128, 128, 8)
GEMM_INST(64x64, 64, 64, 16)
// BK = 16 (H200 sweep, 2026-11-26): faster for float and hacc_half, not for half (see TILES in
// pymetalnn/ops/gemm.py); split-K of hacc_half runs the hacc_half kernel, so no _splitk_half.
GEMM_KERNEL(gemm_fwd_128x128k16_float, gemm_tiled, float, float, float, 128, 128, 16)
GEMM_KERNEL(gemm_fwd_128x128k16_hacc_half, gemm_tiled, half, half, half, 128, 128, 16)

// blocked tiles for CPUs: gemm_fwd_cpu<BM>x<BN>_<float | half | splitk_half | hacc_half>
#define GEMM_CPU_INST(TILE, TM, TN, TX, BK)                                                      \
    GEMM_KERNEL(gemm_fwd_##TILE##_float, gemm_blocked, float, float, float, TM, TN, TX, BK)      \
    GEMM_KERNEL(gemm_fwd_##TILE##_half, gemm_blocked, half, float, half, TM, TN, TX, BK)         \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_half, gemm_blocked, half, float, float, TM, TN, TX, BK) \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_blocked, half, half, half, TM, TN, TX, BK)
GEMM_CPU_INST(cpu512x128, 8, 32, 4, 16)   // 512-bit vectors
GEMM_CPU_INST(cpu128x512, 8, 32, 16, 16)
GEMM_CPU_INST(cpu384x64, 6, 16, 4, 16)    // narrower vectors
GEMM_CPU_INST(cpu96x256, 6, 16, 16, 16)

// simdgroup-matrix tiles (fp16 storage only): gemm_fwd_mma<BM>x<BN>[k<BK>]_<variant>, and the
// split-K partial-sum kernel of the half variant (float partials). Every tile stays within the
// 32 KiB of threadgroup memory of Apple GPUs (128x128 at BK 32 would need 38 KB).
#define GEMM_MMA_INST(TILE, BM, BN, BK)                                                          \
    GEMM_KERNEL(gemm_fwd_##TILE##_half, gemm_mma, half, float, half, BM, BN, BK)                 \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_mma, half, half, half, BM, BN, BK)             \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_half, gemm_mma, half, float, float, BM, BN, BK)
GEMM_MMA_INST(mma128x128, 128, 128, 16)
GEMM_MMA_INST(mma64x64, 64, 64, 16)
GEMM_MMA_INST(mma64x64k32, 64, 64, 32)
GEMM_MMA_INST(mma128x64, 128, 64, 32)

// gemm_mma2 tiles: gemm_fwd_mma2_<BM>x<BN>k<BK>[w<WGM>][p<PF>][v<V>]_<variant> (WGM: simdgroup
// rows, 4 unless named; PF: slices of loads in flight, 1 unless named; V: elements per global
// load, 4 unless named). Threadgroup memory past Apple's 32 KiB (128x128k32: 37 KB) only runs on cuda (tile_fits).
#define GEMM_MMA2_INST(TILE, BM, BN, BK, WGM, PF, V)                                             \
    GEMM_KERNEL(gemm_fwd_##TILE##_half, gemm_mma2, half, float, half, BM, BN, BK, WGM, PF, V)    \
    GEMM_KERNEL(gemm_fwd_##TILE##_hacc_half, gemm_mma2, half, half, half, BM, BN, BK, WGM, PF, V) \
    GEMM_KERNEL(gemm_fwd_##TILE##_splitk_half, gemm_mma2, half, float, float, BM, BN, BK, WGM, PF, V)
GEMM_MMA2_INST(mma2_128x128k16, 128, 128, 16, 4, 1, 4)
GEMM_MMA2_INST(mma2_128x128k32, 128, 128, 32, 4, 1, 4)
GEMM_MMA2_INST(mma2_64x64k32, 64, 64, 32, 4, 1, 4)
GEMM_MMA2_INST(mma2_128x64k32, 128, 64, 32, 4, 1, 4)
GEMM_MMA2_INST(mma2_128x256k16w2, 128, 256, 16, 2, 1, 4)
// p2: two slices of loads in flight
GEMM_MMA2_INST(mma2_128x128k16p2, 128, 128, 16, 4, 2, 4)
GEMM_MMA2_INST(mma2_128x128k32p2, 128, 128, 32, 4, 2, 4)
GEMM_MMA2_INST(mma2_128x256k16w2p2, 128, 256, 16, 2, 2, 4)
GEMM_MMA2_INST(mma2_64x64k32p2, 64, 64, 32, 4, 2, 4)
// v8: 16-byte global loads and threadgroup stores (operands with 8-element aligned rows)
GEMM_MMA2_INST(mma2_128x128k16v8, 128, 128, 16, 4, 1, 8)
GEMM_MMA2_INST(mma2_128x256k16w2v8, 128, 256, 16, 2, 1, 8)
GEMM_MMA2_INST(mma2_128x128k32p2v8, 128, 128, 32, 4, 2, 8)
// smaller accumulators (32 x 32 per simdgroup) with two slices in flight: room for two
// threadgroups per core with float accumulation
GEMM_MMA2_INST(mma2_128x64k32p2v8, 128, 64, 32, 4, 2, 8)
GEMM_MMA2_INST(mma2_64x128k32w2p2v8, 64, 128, 32, 2, 2, 8)

#define GEMM_INST_PREC(VARIANT, T, ACC)                                \
    GEMM_KERNEL(gemm_fwd_splitk_sum_##VARIANT, gemm_splitk_sum, T, ACC)\
    GEMM_KERNEL(linear_bwd_bias_##VARIANT, linear_bias_grad, T, ACC)
GEMM_INST_PREC(float, float, float)
GEMM_INST_PREC(half, half, float)
GEMM_INST_PREC(hacc_half, half, half)
