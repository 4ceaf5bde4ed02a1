// conv.metal -- conv2d forward, input gradient, weight gradient and bias gradient (NCHW).
// conv_transpose2d reuses these kernels with the roles swapped (see pymetalnn/ops/conv.py).
//
// Design note
// -----------
// Every conv is an implicit GEMM: the im2col matrix is never built, each threadgroup gathers its
// tile of it straight from the image into threadgroup memory.
//   forward        y[M = N*OH*OW, Kg]    = X_col[M, Cg*KH*KW] . W^T          per group
//   input grad     dx[N*H*W, Cg]         = dY_col[., Kg*KH*KW] . W           per group and phase
//   weight grad    dW[Kg, Cg*KH*KW]      = dY^T[Kg, M] . X_col[M, .]        split over M
// Tiles are BM x BN with BK-deep slices, 256 threads, each thread owning a TM x TN block of
// outputs in registers (rows in groups of 4 so threadgroup reads are 4-wide vectors); slices are
// double-buffered in threadgroup memory with the next slice's global loads in flight during the
// FMAs, one barrier per slice. The reduction is ordered (kernel tap, channel) so that one slice
// is one tap and BK consecutive channels: the bounds check and address of a tap are computed
// once per slice and row, and the channel loop is a constant stride. Weights are first packed
// tap-major (conv2d_pack_weight) so a slice's weights are BK contiguous runs: in the
// (K, C/G, KH, KW) layout each of them would sit in its own 32-byte sector.
// The input gradient with stride > 1 is split into SH*SW phases (output rows h with the same
// h mod SH): inside a phase the taps that reach a row are the same for every row, so no slice is
// spent on the zeros a stride inserts, and a phase's rows read dy contiguously.
// The weight gradient reduces over N*OH*OW, which can be huge (batch >= 65536): it is split into
// `splits` chunks of `chunk` elements, each threadgroup writes a float partial sum to a
// workspace, and conv2d_bwd_reduce adds the partials in a fixed order (deterministic). The same
// scheme serves the bias gradient.
// Weight gradients with horizontal stride and dilation 1 can instead stage whole input rows and
// slide a KW-wide window along them (conv2d_bwd_weight_rows: no per-element gather math).
// Small GEMM widths (depthwise, Kg or Cg below 16) waste most of a 64-wide tile: the *_direct
// kernels compute one output per thread instead.
// Precision: T is the storage type, A the accumulation (and threadgroup tile) type:
// float/float (_float), half/float (_half), half/half (_hacc_half: fp16 multiply-accumulate as
// MPS's fp16 accumulation). Partial sums of the split reductions are float in every variant; the
// half-accumulating weight gradient keeps each chunk short (the host caps `chunk`) so its fp16
// partial sums stay meaningful. The bias gradient is bandwidth-bound and always sums in float.
// Offsets are 32-bit: the host rejects tensors of 2^31 elements or more.
// The forward kernels end with an optional activation (p.act, neuron.h's nn_activation) applied
// in float after the bias: conv2d(..., activation=) + neuron in one dispatch.
// fp16 convs on matrix hardware (Apple7+ GPUs, NVIDIA tensor cores) run the same tiled kernels
// with MMA = 1: slices in half, products on 8x8 simdgroup matrices (see "Simdgroup-matrix
// variant" below; pymetalnn/ops/conv.py's MMA_TILES), or MMA = 2: the same as 16-deep tile
// products (simdgroup_tile.h: full-rate tensor-core instructions on cuda).
// 3x3 and 5x5 stride-1 float32 convs take another algorithm on cuda: Winograd minimal filtering
// (conv_winograd.metal), with fewer multiply-adds than any tiling of the direct sum here.
#include <metal_stdlib>
#include "params.h"
#include "neuron.h"
#include "simdgroup_tile.h"
#include "instantiate.h"
using namespace metal;

// CONV_THREADS (params.h): threads per threadgroup of every kernel here

// ============================================================================================
// Direct kernels: one output element per thread, grid-stride over the outputs.
// ============================================================================================
template <typename T, typename A>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_fwd_direct(device const T* x [[buffer(0)]],
                              device const T* w [[buffer(1)]],
                              device const T* b [[buffer(2)]],
                              device T* y [[buffer(3)]],
                              constant Conv2dParams& p [[buffer(4)]],
                              uint gid [[thread_position_in_grid]],
                              uint tpg [[threads_per_threadgroup]],
                              uint ntg [[threadgroups_per_grid]]) {
    const uint total = p.N * p.K * p.OH * p.OW;
    const uint HW = p.H * p.W, KHW = p.KH * p.KW;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint ow = i % p.OW, t = i / p.OW;
        uint oh = t % p.OH;
        t /= p.OH;
        uint k = t % p.K, n = t / p.K;
        uint g = k / p.Kg;
        int ih0 = int(oh * p.SH) - p.PH, iw0 = int(ow * p.SW) - p.PW;
        device const T* xg = x + (n * p.C + g * p.Cg) * HW;
        device const T* wk = w + k * p.Cg * KHW;
        A acc = A(0);
        for (uint c = 0; c < p.Cg; ++c) {
            for (uint r = 0; r < p.KH; ++r) {
                int ih = ih0 + int(r * p.DH);
                if (uint(ih) >= p.H) continue;  // negative wraps to a huge uint
                for (uint s = 0; s < p.KW; ++s) {
                    int iw = iw0 + int(s * p.DW);
                    if (uint(iw) >= p.W) continue;
                    acc = fma(A(xg[c * HW + uint(ih) * p.W + uint(iw)]), A(wk[c * KHW + r * p.KW + s]), acc);
                }
            }
        }
        if (p.has_bias) acc += A(b[k]);
        // p.out_nstride > 0: y is a channel slice of a larger NCHW tensor (images that far apart)
        uint yi = p.out_nstride ? n * p.out_nstride + (i - n * p.K * p.OH * p.OW) : i;
        y[yi] = T(nn_activation(float(acc), p.act, p.act_alpha));
    }
}

// dx[n, c, h, w] = sum over (k in c's group, r, s) with h + PH - r*DH = oh*SH (and the same for
// w) of dy[n, k, oh, ow] * w[k, c', r, s]  (+ b[c]: conv_transpose2d's bias).
template <typename T, typename A>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_data_direct(device const T* dy [[buffer(0)]],
                                   device const T* w [[buffer(1)]],
                                   device const T* b [[buffer(2)]],
                                   device T* dx [[buffer(3)]],
                                   constant Conv2dParams& p [[buffer(4)]],
                                   uint gid [[thread_position_in_grid]],
                                   uint tpg [[threads_per_threadgroup]],
                                   uint ntg [[threadgroups_per_grid]]) {
    const uint total = p.N * p.C * p.H * p.W;
    const uint OHW = p.OH * p.OW, KHW = p.KH * p.KW;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint iw = i % p.W, t = i / p.W;
        uint ih = t % p.H;
        t /= p.H;
        uint c = t % p.C, n = t / p.C;
        uint g = c / p.Cg, cc = c % p.Cg;
        A acc = A(0);
        for (uint kk = 0; kk < p.Kg; ++kk) {
            uint k = g * p.Kg + kk;
            device const T* dyk = dy + (n * p.K + k) * OHW;
            device const T* wk = w + (k * p.Cg + cc) * KHW;
            for (uint r = 0; r < p.KH; ++r) {
                int th = int(ih) + p.PH - int(r * p.DH);
                if (th < 0 || th % int(p.SH) != 0) continue;
                uint oh = uint(th) / p.SH;
                if (oh >= p.OH) continue;
                for (uint s = 0; s < p.KW; ++s) {
                    int tw = int(iw) + p.PW - int(s * p.DW);
                    if (tw < 0 || tw % int(p.SW) != 0) continue;
                    uint ow = uint(tw) / p.SW;
                    if (ow >= p.OW) continue;
                    acc = fma(A(dyk[oh * p.OW + ow]), A(wk[r * p.KW + s]), acc);
                }
            }
        }
        if (p.has_bias) acc += A(b[c]);
        dx[i] = T(acc);
    }
}

// ============================================================================================
// Split reductions: weight and bias gradients write float partials ws[split][i]; this kernel
// adds them in split order and stores T.
// ============================================================================================
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_reduce(device const float* ws [[buffer(0)]],
                              device T* out [[buffer(1)]],
                              constant uint& size [[buffer(2)]],
                              constant uint& splits [[buffer(3)]],
                              uint gid [[thread_position_in_grid]],
                              uint tpg [[threads_per_threadgroup]],
                              uint ntg [[threadgroups_per_grid]]) {
    for (uint i = gid; i < size; i += tpg * ntg) {
        float acc = 0.0f;
        for (uint s = 0; s < splits; ++s) acc += ws[s * size + i];
        out[i] = T(acc);
    }
}

// db partials: one threadgroup per (split, k); ws[split * K + k] = sum of dy[n, k, :, :] over
// the split's chunk of (n, oh, ow).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_bias(device const T* dy [[buffer(0)]],
                            device float* ws [[buffer(1)]],
                            constant Conv2dParams& p [[buffer(2)]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint tgid [[threadgroup_position_in_grid]],
                            uint ntg [[threadgroups_per_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sid [[simdgroup_index_in_threadgroup]]) {
    threadgroup float part[CONV_THREADS / 32];
    const uint OHW = p.OH * p.OW, M = p.N * OHW;
    const uint step_n = CONV_THREADS / OHW, step_r = CONV_THREADS % OHW;
    for (uint job = tgid; job < p.splits * p.K; job += ntg) {
        uint k = job % p.K, split = job / p.K;
        uint m0 = split * p.chunk, m1 = min(m0 + p.chunk, M);
        float acc = 0.0f;
        // (image, position) of m carried from step to step: no integer division per element
        // (on a CPU it cost more than the rest of the loop)
        uint m = m0 + lid, n = m / OHW, r = m - n * OHW;
        for (; m < m1; m += CONV_THREADS) {
            acc += float(dy[(n * p.K + k) * OHW + r]);
            r += step_r;
            n += step_n;
            if (r >= OHW) {
                r -= OHW;
                ++n;
            }
        }
        acc = simd_sum(acc);
        if (lane == 0) part[sid] = acc;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (lid == 0) {
            float s = 0.0f;
            for (uint i = 0; i < CONV_THREADS / 32; ++i) s += part[i];
            ws[job] = s;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // part[] is reused by the next job
    }
}

// Weights for the tiled kernels, tap-major with the GEMM column contiguous, so a slice (one tap,
// BK rows) is BK contiguous runs and a warp's loads coalesce (in the (K, C/G, KH, KW) layout
// every element of a slice sits in its own 32-byte sector):
//   k_inner = 1 (forward):         out[g][r*KW + s][c][k] = w[g*Kg + k][c][r][s]
//   k_inner = 0 (input gradient):  out[g][r*KW + s][k][c] = w[g*Kg + k][c][r][s]
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_pack_weight(device const T* w [[buffer(0)]],
                               device T* out [[buffer(1)]],
                               constant Conv2dParams& p [[buffer(2)]],
                               constant uint& k_inner [[buffer(3)]],
                               uint gid [[thread_position_in_grid]],
                               uint tpg [[threads_per_threadgroup]],
                               uint ntg [[threadgroups_per_grid]]) {
    const uint KHW = p.KH * p.KW, total = p.K * p.Cg * KHW;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint k, c, t;
        if (k_inner != 0) {
            k = i % p.Kg;
            t = i / p.Kg;
            c = t % p.Cg;
            t /= p.Cg;
        } else {
            c = i % p.Cg;
            t = i / p.Cg;
            k = t % p.Kg;
            t /= p.Kg;
        }
        uint rs = t % KHW, g = t / KHW;
        out[i] = w[((g * p.Kg + k) * p.Cg + c) * KHW + rs];
    }
}

// ============================================================================================
// Tiled implicit GEMM. Thread t of the 256 owns output rows tm*4 + q + i*(BM/RM) (q < 4,
// i < RM = TM/4) and columns tn*4 + u + j*(BN/RN), tm = t % (BM/TM), tn = t / (BM/TM): a warp
// spans consecutive rows, so its stores are contiguous along the image row.
// ============================================================================================

// acc[TM][TN] += a-slice x b-slice for one BK-deep slice held in threadgroup memory
// (As: BK rows of BM, Bs: BK rows of BN, both as 4-vectors; row strides SA, SB in vectors).
template <typename A, int BM, int BN, int BK, int TM, int TN, int SA, int SB>
inline void tile_fma(threadgroup const vec<A, 4>* As, threadgroup const vec<A, 4>* Bs,
                     thread A (&acc)[TM][TN], uint tm, uint tn) {
    constexpr int RM = TM / 4, RN = TN / 4;
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
        vec<A, 4> a[RM], b[RN];
#pragma unroll
        for (int i = 0; i < RM; ++i) a[i] = As[kk * SA + int(tm) + i * (BM / 4 / RM)];
#pragma unroll
        for (int j = 0; j < RN; ++j) b[j] = Bs[kk * SB + int(tn) + j * (BN / 4 / RN)];
#pragma unroll
        for (int i = 0; i < RM; ++i)
#pragma unroll
            for (int q = 0; q < 4; ++q)
#pragma unroll
                for (int j = 0; j < RN; ++j)
#pragma unroll
                    for (int u = 0; u < 4; ++u)
                        acc[i * 4 + q][j * 4 + u] = fma(a[i][q], b[j][u], acc[i * 4 + q][j * 4 + u]);
    }
}

// ============================================================================================
// Simdgroup-matrix variant of the tiled kernels (MMA = true; fp16 storage, matrix hardware). The
// same gathers, slices and epilogues; only the slices' home and the products differ. The slices
// hold T (half) -- A m-major, B k-major, rows padded by 8 elements: fragment loads are one aligned
// 32-bit access per lane without bank conflicts -- and each BK-deep slice runs on 8x8 simdgroup
// matrices: simdgroup s owns the (BM/4) x (BN/2) block at rows (s/2) BM/4, columns (s%2) BN/2,
// accumulating in A. After the K loop the accumulators pass through threadgroup memory (over the
// slices' bytes) into the SIMT kernels' per-thread acc[TM][TN], and their epilogues run unchanged.
// MSL 2.3 has no `if constexpr`: the two variants' code is picked by tag overloads.
// ============================================================================================
template <bool B> struct conv_tag {};
template <int G> struct conv_gen {};  // 0: SIMD FMAs, 1: 8x8 matrix products, 2: 16-deep tiles
template <bool MMA, typename T, typename A> struct conv_tile_t { typedef A type; };
template <typename T, typename A> struct conv_tile_t<true, T, A> { typedef T type; };

// Row pitch (elements) of the B slices; SB: the SIMT kernels' pitch in 4-vectors.
template <bool MMA, int BN, int SB> constexpr int conv_pb() { return MMA ? BN + 8 : 4 * SB; }
// Element offset of (k, m) in A slice `buf` and of (k, n) in B slice `buf`.
template <bool MMA, int BM, int BK, int SA>
inline uint conv_ia(uint buf, uint k, uint m) {
    return MMA ? (buf * uint(BM) + m) * uint(BK + 8) + k : (buf * uint(BK) + k) * uint(4 * SA) + m;
}
template <bool MMA, int BN, int BK, int SB>
inline uint conv_ib(uint buf, uint k, uint n) {
    return (buf * uint(BK) + k) * uint(conv_pb<MMA, BN, SB>()) + n;
}

template <typename A, int BM, int BN>
inline void conv_mma_zero(conv_tag<false>, thread simdgroup_matrix<A, 8, 8> (&)[BM / 32][BN / 16]) {}
template <typename A, int BM, int BN>
inline void conv_mma_zero(conv_tag<true>, thread simdgroup_matrix<A, 8, 8> (&macc)[BM / 32][BN / 16]) {
#pragma unroll
    for (int i = 0; i < BM / 32; ++i)
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) macc[i][j] = make_filled_simdgroup_matrix<A, 8, 8>(A(0));
}

// One BK-deep slice (buffer `buf`) into the accumulators.
template <typename TT, typename A, int BM, int BN, int BK, int TM, int TN, int SA, int SB>
inline void conv_slice(conv_gen<0>, threadgroup const TT* As, threadgroup const TT* Bs,
                       uint buf, thread A (&acc)[TM][TN],
                       thread simdgroup_matrix<A, 8, 8> (&)[BM / 32][BN / 16], uint tm, uint tn,
                       uint) {
    tile_fma<A, BM, BN, BK, TM, TN, SA, SB>((threadgroup const vec<A, 4>*)As + buf * BK * SA,
                                            (threadgroup const vec<A, 4>*)Bs + buf * BK * SB, acc,
                                            tm, tn);
}
template <typename TT, typename A, int BM, int BN, int BK, int TM, int TN, int SA, int SB>
inline void conv_slice(conv_gen<1>, threadgroup const TT* As, threadgroup const TT* Bs,
                       uint buf, thread A (&)[TM][TN],
                       thread simdgroup_matrix<A, 8, 8> (&macc)[BM / 32][BN / 16], uint, uint,
                       uint sg) {
    constexpr int FM = BM / 32, FN = BN / 16, PA = BK + 8, PB = BN + 8;
    threadgroup const TT* sa = As + buf * uint(BM * PA) + (sg / 2u) * uint(BM / 4 * PA);
    threadgroup const TT* sb = Bs + buf * uint(BK * PB) + (sg % 2u) * uint(BN / 2);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 8) {
        simdgroup_matrix<TT, 8, 8> ma[FM];
        simdgroup_matrix<TT, 8, 8> mb[FN];
#pragma unroll
        for (int i = 0; i < FM; ++i) simdgroup_load(ma[i], sa + i * 8 * PA + kk, PA);
#pragma unroll
        for (int j = 0; j < FN; ++j) simdgroup_load(mb[j], sb + kk * PB + j * 8, PB);
#pragma unroll
        for (int i = 0; i < FM; ++i)
#pragma unroll
            for (int j = 0; j < FN; ++j)
                simdgroup_multiply_accumulate(macc[i][j], ma[i], mb[j], macc[i][j]);
    }
}
// The same slice product as 16-deep tiles (kernels/simdgroup_tile.h): on cuda ldmatrix and full-rate
// mma.sync.m16n8k16 (BK is a multiple of 16; slice rows 16-byte aligned: float4 smem, pitches
// BK + 8 and BN + 8 multiples of 8).
template <typename TT, typename A, int BM, int BN, int BK, int TM, int TN, int SA, int SB>
inline void conv_slice(conv_gen<2>, threadgroup const TT* As, threadgroup const TT* Bs,
                       uint buf, thread A (&)[TM][TN],
                       thread simdgroup_matrix<A, 8, 8> (&macc)[BM / 32][BN / 16], uint, uint,
                       uint sg) {
    constexpr int FM = BM / 32, FN = BN / 16, PA = BK + 8, PB = BN + 8;
    threadgroup const TT* sa = As + buf * uint(BM * PA) + (sg / 2u) * uint(BM / 4 * PA);
    threadgroup const TT* sb = Bs + buf * uint(BK * PB) + (sg % 2u) * uint(BN / 2);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
        simdgroup_matrix<TT, 8, 8> ma[FM * 2];
        simdgroup_load_tile<FM, 2>(ma, sa + kk, PA);
        simdgroup_multiply_accumulate_tile<FM, FN>(&macc[0][0], ma, sb + kk * PB, PB);
    }
}

// After the K loop: the simdgroup accumulators into acc[TM][TN] (thread (tm, tn)'s outputs, the
// SIMT kernels' layout) through `stage` (BM x BN values of A over the slices' memory).
template <typename A, int BM, int BN, int TM, int TN>
inline void conv_unstage(conv_tag<false>, threadgroup A*, thread simdgroup_matrix<A, 8, 8> (&)[BM / 32][BN / 16],
                         thread A (&)[TM][TN], uint, uint, uint) {}
template <typename A, int BM, int BN, int TM, int TN>
inline void conv_unstage(conv_tag<true>, threadgroup A* stage,
                         thread simdgroup_matrix<A, 8, 8> (&macc)[BM / 32][BN / 16],
                         thread A (&acc)[TM][TN], uint tm, uint tn, uint sg) {
    constexpr int RM = TM / 4, RN = TN / 4;
    threadgroup A* cs = stage + (sg / 2u) * uint(BM / 4 * BN) + (sg % 2u) * uint(BN / 2);
#pragma unroll
    for (int i = 0; i < BM / 32; ++i)
#pragma unroll
        for (int j = 0; j < BN / 16; ++j) simdgroup_store(macc[i][j], cs + i * 8 * BN + j * 8, BN);
    threadgroup_barrier(mem_flags::mem_threadgroup);
#pragma unroll
    for (int i = 0; i < RM; ++i)
#pragma unroll
        for (int q = 0; q < 4; ++q)
#pragma unroll
            for (int j = 0; j < RN; ++j)
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    acc[i * 4 + q][j * 4 + u] =
                        stage[(tm * 4u + uint(q) + uint(i * (BM / RM))) * uint(BN) + tn * 4u + uint(u) +
                              uint(j * (BN / RN))];
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next tile's slices reuse the bytes
}

// ---- forward ------------------------------------------------------------------------------
// Slice (r, s, c0): As[kk][m] = x[n, g*Cg + c0 + kk, oh*SH - PH + r*DH, ow*SW - PW + s*DW],
// Bs[kk][k] = w[g*Kg + k, c0 + kk, r, s]. Thread t loads row m = t % BM of As at depths
// t / BM + j * (256 / BM), and column t % BN of Bs at depths t / BN + j * (256 / BN).
template <typename T, typename A, int BM, int BN, int BK, int TM, int TN, bool PACKED, int MMA>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_fwd_tiled(device const T* x [[buffer(0)]],
                             device const T* w [[buffer(1)]],
                             device const T* b [[buffer(2)]],
                             device T* y [[buffer(3)]],
                             constant Conv2dParams& p [[buffer(4)]],
                             uint lid [[thread_position_in_threadgroup]],
                             uint tgid [[threadgroup_position_in_grid]],
                             uint ntg [[threadgroups_per_grid]],
                    uint sg [[simdgroup_index_in_threadgroup]]) {
    static_assert((BM / TM) * (BN / TN) == CONV_THREADS && BM * BK % CONV_THREADS == 0 &&
                  BN * BK % CONV_THREADS == 0 && CONV_THREADS % BM == 0 && CONV_THREADS % BN == 0,
                  "tile shape does not fit 256 threads");
    constexpr int LA = BM * BK / CONV_THREADS, LB = BN * BK / CONV_THREADS;
    constexpr int DA = CONV_THREADS / BM, DB = CONV_THREADS / BN;
    constexpr int SA = BM / 4, SB = BN / 4;
    constexpr bool MM = MMA != 0;  // slices in T, products on simdgroup matrices
    typedef typename conv_tile_t<MM, T, A>::type TT;
    constexpr int TA = 2 * (MM ? BM * (BK + 8) : BK * 4 * SA);  // slice elements (TT)
    constexpr int TB = 2 * BK * conv_pb<MM, BN, SB>();
    constexpr int TS = MM ? BM * BN * int(sizeof(A)) / int(sizeof(TT)) : 0;  // MMA staging
    // float4: 16-byte aligned slice rows (simdgroup_load_tile's ldmatrix on cuda)
    threadgroup float4 smem[((TA + TB > TS ? TA + TB : TS) * int(sizeof(TT)) + 15) / 16];
    threadgroup TT* As = (threadgroup TT*)smem;
    threadgroup TT* Bs = As + TA;

    const uint OHW = p.OH * p.OW, HW = p.H * p.W, KHW = p.KH * p.KW;
    const uint M = p.N * OHW;
    const uint tiles_m = (M + BM - 1) / BM, tiles_n = (p.Kg + BN - 1) / BN;
    const uint csteps = (p.Cg + BK - 1) / BK, nsteps = KHW * csteps;
    const uint tm = lid % (BM / TM), tn = lid / (BM / TM);
    const uint am = lid % BM, ak = lid / BM, bn = lid % BN, bk = lid / BN;

    for (uint tile = tgid; tile < p.G * tiles_m * tiles_n; tile += ntg) {
        const uint tn_i = tile % tiles_n, tmp = tile / tiles_n;
        const uint tm_i = tmp % tiles_m, g = tmp / tiles_m;
        const uint m0 = tm_i * BM, n0 = tn_i * BN;
        // this thread's gather row and weight column
        const uint m = m0 + am;
        const bool mok = m < M;
        const uint mm = mok ? m : 0;
        const uint img = mm / OHW, ohw = mm % OHW;
        const int ih0 = int((ohw / p.OW) * p.SH) - p.PH, iw0 = int((ohw % p.OW) * p.SW) - p.PW;
        device const T* xrow = x + (img * p.C + g * p.Cg) * HW;
        const bool nok = n0 + bn < p.Kg;
        const uint ncol = nok ? n0 + bn : 0;
        // packed: w[g][r*KW + s][c][k] (conv2d_pack_weight), else w[g*Kg + k][c][r][s]
        device const T* wcol = PACKED ? w + g * KHW * p.Cg * p.Kg + ncol
                                      : w + (g * p.Kg + ncol) * p.Cg * KHW;
        const uint wcs = PACKED ? p.Kg : KHW, wrs = PACKED ? p.Cg * p.Kg : 1u;

        A acc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
        simdgroup_matrix<A, 8, 8> macc[BM / 32][BN / 16];
        conv_mma_zero<A, BM, BN>(conv_tag<MM>(), macc);

        A ra[LA], rb[LB];
        uint r = 0, s = 0, c0 = 0;  // slice being loaded
        for (uint kstep = 0; kstep <= nsteps; ++kstep) {
            if (kstep < nsteps) {  // global -> registers for slice `kstep`
                int ih = ih0 + int(r * p.DH), iw = iw0 + int(s * p.DW);
                bool ok = mok && uint(ih) < p.H && uint(iw) < p.W;
                device const T* xs = xrow + (ok ? uint(ih) * p.W + uint(iw) : 0);
#pragma unroll
                for (int j = 0; j < LA; ++j) {
                    uint c = c0 + ak + j * DA;
                    ra[j] = ok && c < p.Cg ? A(xs[c * HW]) : A(0);
                }
                device const T* ws = wcol + (r * p.KW + s) * wrs;
#pragma unroll
                for (int j = 0; j < LB; ++j) {
                    uint c = c0 + bk + j * DB;
                    rb[j] = nok && c < p.Cg ? A(ws[c * wcs]) : A(0);
                }
                c0 += BK;
                if (c0 >= p.Cg) {
                    c0 = 0;
                    if (++s == p.KW) { s = 0; ++r; }
                }
            }
            if (kstep > 0) {  // FMAs on slice kstep - 1 while the loads above are in flight
                uint buf = (kstep - 1) & 1;
                conv_slice<TT, A, BM, BN, BK, TM, TN, SA, SB>(conv_gen<MMA>(), As, Bs, buf, acc, macc,
                                                              tm, tn, sg);
            }
            if (kstep < nsteps) {
                uint buf = kstep & 1;
#pragma unroll
                for (int j = 0; j < LA; ++j) As[conv_ia<MM, BM, BK, SA>(buf, ak + j * DA, am)] = TT(ra[j]);
#pragma unroll
                for (int j = 0; j < LB; ++j) Bs[conv_ib<MM, BN, BK, SB>(buf, bk + j * DB, bn)] = TT(rb[j]);
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }

        conv_unstage<A, BM, BN, TM, TN>(conv_tag<MM>(), (threadgroup A*)smem, macc, acc, tm, tn, sg);
        constexpr int RM = TM / 4, RN = TN / 4;
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint mo = m0 + tm * 4 + q + i * (BM / RM);
                if (mo >= M) continue;
                uint oimg = mo / OHW, oo = mo % OHW;
                device T* yrow = y + oimg * (p.out_nstride ? p.out_nstride : p.K * OHW) +
                                 g * p.Kg * OHW + oo;
#pragma unroll
                for (int j = 0; j < RN; ++j) {
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        uint k = n0 + tn * 4 + u + j * (BN / RN);
                        if (k >= p.Kg) continue;
                        A v = acc[i * 4 + q][j * 4 + u];
                        if (p.has_bias) v += A(b[g * p.Kg + k]);
                        yrow[k * OHW] = T(nn_activation(float(v), p.act, p.act_alpha));
                    }
                }
            }
        }
    }
}

// ---- input gradient -------------------------------------------------------------------------
// Phase (ph, pw): rows h = ph + hq*SH, w = pw + wq*SW, m = (n*Hq + hq)*Wq + wq. The taps that
// reach the phase are r = r0 + i*rstep (rstep = SH / gcd(SH, DH)), each at dy row
// oh = hq + (ph + PH - r*DH) / SH. Slice (r, s, k0): As[kk][m] = dy[n, g*Kg + k0 + kk, oh, ow],
// Bs[kk][c] = w[g*Kg + k0 + kk, c, r, s]; out dx[n, g*Cg + c, h, w] (+ b[g*Cg + c]).
inline uint conv_gcd(uint a, uint b) {
    while (b != 0) {
        uint t = a % b;
        a = b;
        b = t;
    }
    return a;
}

// First tap index >= 0 whose offset lands on the phase, or `k` when none does.
inline uint conv_first_tap(uint ph, int pad, uint d, uint st, uint k) {
    for (uint r = 0; r < k && r < st; ++r) {
        int t = int(ph) + pad - int(r * d);
        if (((t % int(st)) + int(st)) % int(st) == 0) return r;
    }
    return k;
}

template <typename T, typename A, int BM, int BN, int BK, int TM, int TN, bool PACKED, int MMA>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_data_tiled(device const T* dy [[buffer(0)]],
                                  device const T* w [[buffer(1)]],
                                  device const T* b [[buffer(2)]],
                                  device T* dx [[buffer(3)]],
                                  constant Conv2dParams& p [[buffer(4)]],
                                  uint lid [[thread_position_in_threadgroup]],
                                  uint tgid [[threadgroup_position_in_grid]],
                                  uint ntg [[threadgroups_per_grid]],
                    uint sg [[simdgroup_index_in_threadgroup]]) {
    static_assert((BM / TM) * (BN / TN) == CONV_THREADS && BM * BK % CONV_THREADS == 0 &&
                  BN * BK % CONV_THREADS == 0 && CONV_THREADS % BM == 0 && CONV_THREADS % BN == 0,
                  "tile shape does not fit 256 threads");
    constexpr int LA = BM * BK / CONV_THREADS, LB = BN * BK / CONV_THREADS;
    constexpr int DA = CONV_THREADS / BM, DB = CONV_THREADS / BN;
    constexpr int SA = BM / 4, SB = BN / 4;
    constexpr bool MM = MMA != 0;  // slices in T, products on simdgroup matrices
    typedef typename conv_tile_t<MM, T, A>::type TT;
    constexpr int TA = 2 * (MM ? BM * (BK + 8) : BK * 4 * SA);  // slice elements (TT)
    constexpr int TB = 2 * BK * conv_pb<MM, BN, SB>();
    constexpr int TS = MM ? BM * BN * int(sizeof(A)) / int(sizeof(TT)) : 0;  // MMA staging
    // float4: 16-byte aligned slice rows (simdgroup_load_tile's ldmatrix on cuda)
    threadgroup float4 smem[((TA + TB > TS ? TA + TB : TS) * int(sizeof(TT)) + 15) / 16];
    threadgroup TT* As = (threadgroup TT*)smem;
    threadgroup TT* Bs = As + TA;

    const uint OHW = p.OH * p.OW, HW = p.H * p.W, KHW = p.KH * p.KW;
    const uint Hq = (p.H + p.SH - 1) / p.SH, Wq = (p.W + p.SW - 1) / p.SW;
    const uint M = p.N * Hq * Wq;
    const uint tiles_m = (M + BM - 1) / BM, tiles_n = (p.Cg + BN - 1) / BN;
    const uint phases = p.SH * p.SW;
    const uint rstep = p.SH / conv_gcd(p.SH, p.DH), sstep = p.SW / conv_gcd(p.SW, p.DW);
    const uint ksteps = (p.Kg + BK - 1) / BK;
    const uint tm = lid % (BM / TM), tn = lid / (BM / TM);
    const uint am = lid % BM, ak = lid / BM, bn = lid % BN, bk = lid / BN;

    for (uint tile = tgid; tile < p.G * phases * tiles_m * tiles_n; tile += ntg) {
        const uint tn_i = tile % tiles_n;
        uint tmp = tile / tiles_n;
        const uint tm_i = tmp % tiles_m;
        tmp /= tiles_m;
        const uint phase = tmp % phases, g = tmp / phases;
        const uint ph = phase / p.SW, pw = phase % p.SW;
        const uint m0 = tm_i * BM, n0 = tn_i * BN;
        const uint r0 = conv_first_tap(ph, p.PH, p.DH, p.SH, p.KH);
        const uint s0 = conv_first_tap(pw, p.PW, p.DW, p.SW, p.KW);
        const uint nr = r0 < p.KH ? (p.KH - 1 - r0) / rstep + 1 : 0;
        const uint ns = s0 < p.KW ? (p.KW - 1 - s0) / sstep + 1 : 0;
        const uint nsteps = nr * ns * ksteps;

        const uint m = m0 + am;
        const bool mok = m < M;
        const uint mm = mok ? m : 0;
        const uint img = mm / (Hq * Wq), hw = mm % (Hq * Wq);
        const int hq = int(hw / Wq), wq = int(hw % Wq);
        device const T* dyrow = dy + (img * p.K + g * p.Kg) * OHW;
        const bool nok = n0 + bn < p.Cg;
        const uint ccol = nok ? n0 + bn : 0;
        // packed: w[g][r*KW + s][k][c] (conv2d_pack_weight), else w[g*Kg + k][c][r][s]
        device const T* wcol = PACKED ? w + g * KHW * p.Kg * p.Cg + ccol
                                      : w + (g * p.Kg * p.Cg + ccol) * KHW;
        const uint wks = PACKED ? p.Cg : p.Cg * KHW, wrs = PACKED ? p.Kg * p.Cg : 1u;

        A acc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
        simdgroup_matrix<A, 8, 8> macc[BM / 32][BN / 16];
        conv_mma_zero<A, BM, BN>(conv_tag<MM>(), macc);

        A ra[LA], rb[LB];
        uint r = r0, s = s0, k0 = 0;
        for (uint kstep = 0; kstep <= nsteps; ++kstep) {
            if (kstep < nsteps) {
                // exact divisions: r and s are taps of this phase
                int oh = hq + (int(ph) + p.PH - int(r * p.DH)) / int(p.SH);
                int ow = wq + (int(pw) + p.PW - int(s * p.DW)) / int(p.SW);
                bool ok = mok && uint(oh) < p.OH && uint(ow) < p.OW;
                device const T* ds = dyrow + (ok ? uint(oh) * p.OW + uint(ow) : 0);
#pragma unroll
                for (int j = 0; j < LA; ++j) {
                    uint k = k0 + ak + j * DA;
                    ra[j] = ok && k < p.Kg ? A(ds[k * OHW]) : A(0);
                }
                device const T* ws = wcol + (r * p.KW + s) * wrs;
#pragma unroll
                for (int j = 0; j < LB; ++j) {
                    uint k = k0 + bk + j * DB;
                    rb[j] = nok && k < p.Kg ? A(ws[k * wks]) : A(0);
                }
                k0 += BK;
                if (k0 >= p.Kg) {
                    k0 = 0;
                    s += sstep;
                    if (s >= p.KW) { s = s0; r += rstep; }
                }
            }
            if (kstep > 0) {
                uint buf = (kstep - 1) & 1;
                conv_slice<TT, A, BM, BN, BK, TM, TN, SA, SB>(conv_gen<MMA>(), As, Bs, buf, acc, macc,
                                                              tm, tn, sg);
            }
            if (kstep < nsteps) {
                uint buf = kstep & 1;
#pragma unroll
                for (int j = 0; j < LA; ++j) As[conv_ia<MM, BM, BK, SA>(buf, ak + j * DA, am)] = TT(ra[j]);
#pragma unroll
                for (int j = 0; j < LB; ++j) Bs[conv_ib<MM, BN, BK, SB>(buf, bk + j * DB, bn)] = TT(rb[j]);
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }

        conv_unstage<A, BM, BN, TM, TN>(conv_tag<MM>(), (threadgroup A*)smem, macc, acc, tm, tn, sg);
        constexpr int RM = TM / 4, RN = TN / 4;
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint mo = m0 + tm * 4 + q + i * (BM / RM);
                if (mo >= M) continue;
                uint oimg = mo / (Hq * Wq), ohw = mo % (Hq * Wq);
                uint h = ph + (ohw / Wq) * p.SH, wd = pw + (ohw % Wq) * p.SW;
                if (h >= p.H || wd >= p.W) continue;
                device T* xrow = dx + (oimg * p.C + g * p.Cg) * HW + h * p.W + wd;
#pragma unroll
                for (int j = 0; j < RN; ++j) {
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        uint c = n0 + tn * 4 + u + j * (BN / RN);
                        if (c >= p.Cg) continue;
                        A v = acc[i * 4 + q][j * 4 + u];
                        if (p.has_bias) v += A(b[g * p.Cg + c]);
                        xrow[c * HW] = T(v);
                    }
                }
            }
        }
    }
}

// ---- weight gradient ------------------------------------------------------------------------
// Rows k < Kg, columns col = (c*KH + r)*KW + s < Cg*KH*KW, reduction over m = (n, oh, ow) in the
// split's chunk. Slice m0..m0+BK: As[kk][k] = dy[n, g*Kg + k, oh, ow], Bs[kk][col] =
// x[n, g*Cg + c, oh*SH - PH + r*DH, ow*SW - PW + s*DW] at m = m0 + kk. Thread t loads depth
// t % BK (consecutive threads read consecutive pixels) of rows/columns t / BK + j * (256 / BK).
// Threadgroup rows are padded by one vector so those column-wise stores do not all hit one bank.
// Output: ws[split][g*Kg + k][col] (float partials, the layout of w).
template <typename T, typename A, int BM, int BN, int BK, int TM, int TN, int MMA>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_weight_tiled(device const T* dy [[buffer(0)]],
                                    device const T* x [[buffer(1)]],
                                    device float* wsum [[buffer(2)]],
                                    constant Conv2dParams& p [[buffer(3)]],
                                    uint lid [[thread_position_in_threadgroup]],
                                    uint tgid [[threadgroup_position_in_grid]],
                                    uint ntg [[threadgroups_per_grid]],
                    uint sg [[simdgroup_index_in_threadgroup]]) {
    static_assert((BM / TM) * (BN / TN) == CONV_THREADS && CONV_THREADS % BK == 0 &&
                  BM % (CONV_THREADS / BK) == 0 && BN % (CONV_THREADS / BK) == 0,
                  "tile shape does not fit 256 threads");
    constexpr int DL = CONV_THREADS / BK;  // rows/columns between one thread's loads
    constexpr int LA = BM / DL, LB = BN / DL;
    constexpr int SA = BM / 4 + 1, SB = BN / 4 + 1;
    constexpr bool MM = MMA != 0;  // slices in T, products on simdgroup matrices
    typedef typename conv_tile_t<MM, T, A>::type TT;
    constexpr int TA = 2 * (MM ? BM * (BK + 8) : BK * 4 * SA);  // slice elements (TT)
    constexpr int TB = 2 * BK * conv_pb<MM, BN, SB>();
    constexpr int TS = MM ? BM * BN * int(sizeof(A)) / int(sizeof(TT)) : 0;  // MMA staging
    // float4: 16-byte aligned slice rows (simdgroup_load_tile's ldmatrix on cuda)
    threadgroup float4 smem[((TA + TB > TS ? TA + TB : TS) * int(sizeof(TT)) + 15) / 16];
    threadgroup TT* As = (threadgroup TT*)smem;
    threadgroup TT* Bs = As + TA;

    const uint OHW = p.OH * p.OW, HW = p.H * p.W, KHW = p.KH * p.KW;
    const uint M = p.N * OHW, CRS = p.Cg * KHW;
    const uint tiles_m = (p.Kg + BM - 1) / BM, tiles_n = (CRS + BN - 1) / BN;
    const uint wsize = p.K * CRS;
    const uint tm = lid % (BM / TM), tn = lid / (BM / TM);
    const uint lk = lid % BK, lr = lid / BK;
    const uint step_h = uint(BK) / p.OW, step_w = uint(BK) % p.OW;  // BK pixels in rows + columns

    for (uint tile = tgid; tile < p.splits * p.G * tiles_m * tiles_n; tile += ntg) {
        const uint tn_i = tile % tiles_n;
        uint tmp = tile / tiles_n;
        const uint tm_i = tmp % tiles_m;
        tmp /= tiles_m;
        const uint g = tmp % p.G, split = tmp / p.G;
        const uint k0 = tm_i * BM, n0 = tn_i * BN;
        const uint mbeg = split * p.chunk, mend = min(mbeg + p.chunk, M);
        const uint nsteps = mbeg < mend ? (mend - mbeg + BK - 1) / BK : 0;

        // this thread's weight-gradient columns: offsets of (c, r, s) in x
        uint coff[LB];
        int roff[LB], soff[LB];
        bool cok[LB];
#pragma unroll
        for (int j = 0; j < LB; ++j) {
            uint col = n0 + lr + j * DL;
            cok[j] = col < CRS;
            uint cc = cok[j] ? col : 0;
            uint c = cc / KHW, rs = cc % KHW;
            coff[j] = (g * p.Cg + c) * HW;
            roff[j] = int((rs / p.KW) * p.DH) - p.PH;
            soff[j] = int((rs % p.KW) * p.DW) - p.PW;
        }

        A acc[TM][TN];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
        simdgroup_matrix<A, 8, 8> macc[BM / 32][BN / 16];
        conv_mma_zero<A, BM, BN>(conv_tag<MM>(), macc);

        // (img, oh, ow) of this thread's pixel m = mbeg + kstep * BK + lk, decoded once and then
        // advanced by BK per slice: the two runtime divisions and remainders a full decode
        // takes cost a GPU thread about a fifth of the instructions of a t64x64 slice's 256
        // FMAs; only a step past an image's last row divides again
        uint img = (mbeg + lk) / OHW, oh = (mbeg + lk) % OHW, ow = oh % p.OW;
        oh /= p.OW;

        A ra[LA], rb[LB];
        for (uint kstep = 0; kstep <= nsteps; ++kstep) {
            if (kstep < nsteps) {
                uint m = mbeg + kstep * BK + lk;
                bool mok = m < mend;
                // past the chunk: the index of pixel 0, never read (keeps the pointers in range)
                uint ohw = mok ? oh * p.OW + ow : 0, im = mok ? img : 0;
                int ih0 = int((mok ? oh : 0) * p.SH), iw0 = int((mok ? ow : 0) * p.SW);
                device const T* dyp = dy + (im * p.K + g * p.Kg) * OHW + ohw;
#pragma unroll
                for (int j = 0; j < LA; ++j) {
                    uint k = k0 + lr + j * DL;
                    ra[j] = mok && k < p.Kg ? A(dyp[k * OHW]) : A(0);
                }
                device const T* xp = x + im * p.C * HW;
#pragma unroll
                for (int j = 0; j < LB; ++j) {
                    int ih = ih0 + roff[j], iw = iw0 + soff[j];
                    bool ok = mok && cok[j] && uint(ih) < p.H && uint(iw) < p.W;
                    rb[j] = ok ? A(xp[coff[j] + uint(ih) * p.W + uint(iw)]) : A(0);
                }
                ow += step_w;
                oh += step_h;
                if (ow >= p.OW) {
                    ow -= p.OW;
                    ++oh;
                }
                if (oh >= p.OH) {
                    img += oh / p.OH;
                    oh %= p.OH;
                }
            }
            if (kstep > 0) {
                uint buf = (kstep - 1) & 1;
                conv_slice<TT, A, BM, BN, BK, TM, TN, SA, SB>(conv_gen<MMA>(), As, Bs, buf, acc, macc,
                                                              tm, tn, sg);
            }
            if (kstep < nsteps) {
                uint buf = kstep & 1;
#pragma unroll
                for (int j = 0; j < LA; ++j) As[conv_ia<MM, BM, BK, SA>(buf, lk, lr + j * DL)] = TT(ra[j]);
#pragma unroll
                for (int j = 0; j < LB; ++j) Bs[conv_ib<MM, BN, BK, SB>(buf, lk, lr + j * DL)] = TT(rb[j]);
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }

        conv_unstage<A, BM, BN, TM, TN>(conv_tag<MM>(), (threadgroup A*)smem, macc, acc, tm, tn, sg);
        constexpr int RM = TM / 4, RN = TN / 4;
        device float* out = wsum + split * wsize + g * p.Kg * CRS;
#pragma unroll
        for (int i = 0; i < RM; ++i) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                uint k = k0 + tm * 4 + q + i * (BM / RM);
                if (k >= p.Kg) continue;
#pragma unroll
                for (int j = 0; j < RN; ++j) {
#pragma unroll
                    for (int u = 0; u < 4; ++u) {
                        uint col = n0 + tn * 4 + u + j * (BN / RN);
                        if (col < CRS) out[k * CRS + col] = float(acc[i * 4 + q][j * 4 + u]);
                    }
                }
            }
        }
    }
}

// ---- weight gradient, row-staged (horizontal stride and dilation 1) ---------------------------
// With SW = DW = 1 the KW im2col columns (c, r, 0..KW-1) of pixel (n, oh, ow) are KW neighbours
// x[n, c, ih, ow - PW + s] of one input row ih = oh*SH - PH + r*DH: a sliding window. A
// threadgroup owns RK output channels x RQ (c, r) pairs x all KW taps; a reduction step is one
// segment of SEG pixel slots: R whole output rows (n, oh0 .. oh0 + R - 1) of one image where a
// row is narrow (R = rows_per_segment: LeNet's 14-pixel rows at KW 5 go two to a segment and fill
// 28 slots, so the staging, barrier and partial-sum work per pixel halves), else a piece of up to
// SEG pixels of one row. It stages dy for its channels (as [slot][k], so a thread's 8 channels
// are two float4 loads, the same address for a whole simdgroup) and, per pair and row, the input
// row under the segment with the KW - 1 halo (zeros outside the image). Thread (kg, q) then walks
// each row keeping x's KW-wide window in registers, KW pixels per round with the window's slots
// rotating by constant indices (no register moves): per pixel 2 broadcast float4 loads, one load
// of x and 8*KW FMAs, with no per-element address math (the tiled kernel, at half of cuDNN on
// LeNet's 5x5 weight gradient, gathers every im2col element with its own bounds check). Same
// split/partial scheme as the tiled kernel: p.chunk counts segments; ws[split] holds float
// partials in w's layout. Each dw is a sequential sum in (n, oh, ow) order within a split, then
// over splits, as in the tiled kernel: errors of the same size. Earlier versions:
// kernels/dev/conv_rows.metal.
// Output rows per segment: as many whole rows as fit SEG slots and SEG + KW - 1 staged inputs;
// 1 for rows wider than SEG (mirrored by ops.conv._rows_per_segment).
template <int SEG, int KW>
inline uint rows_per_segment(uint OW) {
    return OW > uint(SEG) ? 1u : min(uint(SEG) / OW, uint(SEG + KW - 1) / (OW + uint(KW - 1)));
}

template <typename T, typename A, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_weight_rows(device const T* dy [[buffer(0)]],
                                   device const T* x [[buffer(1)]],
                                   device float* wsum [[buffer(2)]],
                                   constant Conv2dParams& p [[buffer(3)]],
                                   uint lid [[thread_position_in_threadgroup]],
                                   uint tgid [[threadgroup_position_in_grid]],
                                   uint ntg [[threadgroups_per_grid]]) {
    // RK x RQ x SEG mirrored by ROWS_TILE in pymetalnn/ops/conv.py
    constexpr int RK = 64, RQ = 32, SEG = 32;
    constexpr int KT = RK * RQ / CONV_THREADS;       // channels per thread (8)
    constexpr int DP = RK + 4;                       // dy row pitch: float4-aligned, 4 banks apart
    constexpr int XW = SEG + KW - 1, XP = XW | 1;    // staged x row(s), odd pitch
    constexpr int LD = RK * SEG / CONV_THREADS;      // dy loads per thread and step
    constexpr int LX = (RQ * XW + CONV_THREADS - 1) / CONV_THREADS;
    static_assert(KT == 8 && RK * SEG % CONV_THREADS == 0 && CONV_THREADS % SEG == 0,
                  "row tile does not fit 256 threads");
    threadgroup vec<A, 4> dys4[2 * SEG * DP / 4];
    threadgroup A xs[2 * RQ * XP];
    threadgroup A* dys = (threadgroup A*)dys4;

    const uint OHW = p.OH * p.OW, HW = p.H * p.W, KHW = p.KH * p.KW;
    const uint CRS = p.Cg * KHW, pairs = p.Cg * p.KH;
    const uint R = rows_per_segment<SEG, KW>(p.OW);
    const uint PWD = min(p.OW, uint(SEG));           // pixels of one row in a segment (at most)
    const uint XR = PWD + uint(KW - 1);              // staged x per row
    const uint npiece = (p.OW + SEG - 1) / SEG, ngrp = (p.OH + R - 1) / R;
    const uint nsegs = p.N * ngrp * npiece;
    const uint tiles_k = (p.Kg + RK - 1) / RK, tiles_q = (pairs + RQ - 1) / RQ;
    const uint wsize = p.K * CRS;
    const uint kg = lid / RQ, q = lid % RQ;  // a simdgroup: one channel group, 32 pairs
    // this thread's dy loads: slot dslot (the same for all LD: 256 is a multiple of SEG) = row dj,
    // pixel do_ of the segment; channels dk + j * 256 / SEG
    const uint dslot = lid % uint(SEG), dj = dslot / PWD, do_ = dslot % PWD, dk = lid / uint(SEG);

    for (uint tile = tgid; tile < p.splits * p.G * tiles_k * tiles_q; tile += ntg) {
        const uint tq = tile % tiles_q;
        uint tmp = tile / tiles_q;
        const uint tk = tmp % tiles_k;
        tmp /= tiles_k;
        const uint g = tmp % p.G, split = tmp / p.G;
        const uint k0 = tk * RK, q0 = tq * RQ;
        const uint sbeg = split * p.chunk, send = min(sbeg + p.chunk, nsegs);

        // per staged x element: channel offset, row offset (-2^30 for an invalid pair: never
        // inside the image), and (segment row << 16 | column within that row's staging)
        uint xoff[LX], xsel[LX];
        int xrow[LX];
#pragma unroll
        for (int j = 0; j < LX; ++j) {
            uint e = lid + uint(j * CONV_THREADS);
            uint pr = q0 + e / uint(XW), col = e % uint(XW);
            bool ok = e < uint(RQ * XW) && pr < pairs && col / XR < R;
            uint pc = ok ? pr : 0;
            xoff[j] = (g * p.Cg + pc / p.KH) * HW;
            xrow[j] = ok ? int((pc % p.KH) * p.DH) - p.PH : -(1 << 30);
            xsel[j] = ((col / XR) << 16) | (col % XR);
        }

        A acc[KT][KW];
#pragma unroll
        for (int i = 0; i < KT; ++i)
#pragma unroll
            for (int s = 0; s < KW; ++s) acc[i][s] = A(0);

        A rd[LD], rx[LX];
        uint len = 0, nrow = 0;  // pixels per row and rows of the segment being computed
        for (uint st = sbeg; st <= send; ++st) {
            uint nlen = 0, nnrow = 0;
            if (st < send) {  // fetch segment st into registers
                uint si = st % npiece, tmp2 = st / npiece;
                uint img = tmp2 / ngrp, oh0 = (tmp2 % ngrp) * R, ow0 = si * uint(SEG);
                nlen = min(uint(SEG), p.OW - ow0);
                nnrow = min(R, p.OH - oh0);
                uint oh = oh0 + dj;
                bool dok = dj < nnrow && do_ < nlen;
                device const T* dyp = dy + (img * p.K + g * p.Kg + k0 + dk) * OHW + oh * p.OW + ow0 + do_;
#pragma unroll
                for (int j = 0; j < LD; ++j) {
                    uint k = k0 + dk + uint(j * (CONV_THREADS / SEG));
                    rd[j] = dok && k < p.Kg ? A(dyp[uint(j * (CONV_THREADS / SEG)) * OHW]) : A(0);
                }
                device const T* xp = x + img * p.C * HW;
                int iw0 = int(ow0) - p.PW;
#pragma unroll
                for (int j = 0; j < LX; ++j) {
                    uint xj = xsel[j] >> 16, col = xsel[j] & 0xffffu;
                    int ih = int((oh0 + xj) * p.SH) + xrow[j], iw = iw0 + int(col);
                    bool ok = xj < nnrow && col < nlen + uint(KW - 1) && uint(ih) < p.H && uint(iw) < p.W;
                    rx[j] = ok ? A(xp[xoff[j] + uint(ih) * p.W + uint(iw)]) : A(0);
                }
            }
            if (st > sbeg) {  // segment st - 1 from threadgroup memory
                for (uint r = 0; r < nrow; ++r) {
                    threadgroup const A* xr = xs + ((st - 1) & 1) * uint(RQ * XP) + q * uint(XP) + r * XR;
                    threadgroup const vec<A, 4>* dr = (threadgroup const vec<A, 4>*)(
                        dys + ((st - 1) & 1) * uint(SEG * DP) + r * PWD * uint(DP) + kg * uint(KT));
                    A win[KW];
#pragma unroll
                    for (int s = 0; s < KW - 1; ++s) win[s] = xr[s];
                    uint o = 0;
                    for (; o + uint(KW) <= len; o += uint(KW)) {
#pragma unroll
                        for (int j = 0; j < KW; ++j) {
                            win[(j + KW - 1) % KW] = xr[o + uint(j + KW - 1)];
                            vec<A, 4> d0 = dr[(o + uint(j)) * uint(DP / 4)], d1 = dr[(o + uint(j)) * uint(DP / 4) + 1];
                            A d[KT] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
                            for (int i = 0; i < KT; ++i)
#pragma unroll
                                for (int s = 0; s < KW; ++s) acc[i][s] = fma(d[i], win[(j + s) % KW], acc[i][s]);
                        }
                    }
                    for (; o < len; ++o) {
                        win[KW - 1] = xr[o + uint(KW - 1)];
                        vec<A, 4> d0 = dr[o * uint(DP / 4)], d1 = dr[o * uint(DP / 4) + 1];
                        A d[KT] = {d0.x, d0.y, d0.z, d0.w, d1.x, d1.y, d1.z, d1.w};
#pragma unroll
                        for (int i = 0; i < KT; ++i)
#pragma unroll
                            for (int s = 0; s < KW; ++s) acc[i][s] = fma(d[i], win[s], acc[i][s]);
#pragma unroll
                        for (int s = 0; s < KW - 1; ++s) win[s] = win[s + 1];
                    }
                }
            }
            if (st < send) {  // registers into the other buffer
                uint buf = st & 1;
#pragma unroll
                for (int j = 0; j < LD; ++j)
                    dys[buf * uint(SEG * DP) + dslot * uint(DP) + dk + uint(j * (CONV_THREADS / SEG))] = rd[j];
#pragma unroll
                for (int j = 0; j < LX; ++j) {
                    uint e = lid + uint(j * CONV_THREADS);
                    if (e < uint(RQ * XW)) xs[buf * uint(RQ * XP) + (e / uint(XW)) * uint(XP) + e % uint(XW)] = rx[j];
                }
            }
            len = nlen;
            nrow = nnrow;
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }

        const uint pr = q0 + q;
        if (pr < pairs) {
            device float* out = wsum + split * wsize + (g * p.Kg) * CRS + pr * uint(KW);
#pragma unroll
            for (int i = 0; i < KT; ++i) {
                uint k = k0 + kg * uint(KT) + uint(i);
                if (k < p.Kg) {
#pragma unroll
                    for (int s = 0; s < KW; ++s) out[k * CRS + uint(s)] = float(acc[i][s]);
                }
            }
        }
    }
}

// ============================================================================================
// Instantiations: conv2d_<op>[_<tile>]_<precision>. Tile names and shapes (BM x BN, BK, TM x TN)
// must match TILES in pymetalnn/ops/conv.py. kernels/dev/ includes this file with
// CONV_NO_INSTANCES to instantiate experimental shapes instead.
// ============================================================================================
#define CONV_INST_PREC(NAME, T, A)                                                                 \
    INSTANTIATE("conv2d_fwd_direct_" NAME, conv2d_fwd_direct, T, A)                                \
    INSTANTIATE("conv2d_bwd_data_direct_" NAME, conv2d_bwd_data_direct, T, A)                      \
    INSTANTIATE("conv2d_fwd_t128x64_" NAME, conv2d_fwd_tiled, T, A, 128, 64, 8, 8, 4, true, false)              \
    INSTANTIATE("conv2d_fwd_t128x128_" NAME, conv2d_fwd_tiled, T, A, 128, 128, 8, 8, 8, true, false)            \
    INSTANTIATE("conv2d_fwd_t64x64_" NAME, conv2d_fwd_tiled, T, A, 64, 64, 8, 4, 4, true, false)                \
    INSTANTIATE("conv2d_fwd_t128x32_" NAME, conv2d_fwd_tiled, T, A, 128, 32, 8, 4, 4, true, false)              \
    INSTANTIATE("conv2d_fwd_t128x64k16_" NAME, conv2d_fwd_tiled, T, A, 128, 64, 16, 8, 4, true, false)          \
    INSTANTIATE("conv2d_fwd_t128x32k16_" NAME, conv2d_fwd_tiled, T, A, 128, 32, 16, 4, 4, true, false)          \
    INSTANTIATE("conv2d_bwd_data_t128x64_" NAME, conv2d_bwd_data_tiled, T, A, 128, 64, 8, 8, 4, true, false)    \
    INSTANTIATE("conv2d_bwd_data_t128x128_" NAME, conv2d_bwd_data_tiled, T, A, 128, 128, 8, 8, 8, true, false)  \
    INSTANTIATE("conv2d_bwd_data_t64x64_" NAME, conv2d_bwd_data_tiled, T, A, 64, 64, 8, 4, 4, true, false)      \
    INSTANTIATE("conv2d_bwd_data_t128x32_" NAME, conv2d_bwd_data_tiled, T, A, 128, 32, 8, 4, 4, true, false)    \
    INSTANTIATE("conv2d_bwd_data_t128x64k16_" NAME, conv2d_bwd_data_tiled, T, A, 128, 64, 16, 8, 4, true, false) \
    INSTANTIATE("conv2d_bwd_data_t128x32k16_" NAME, conv2d_bwd_data_tiled, T, A, 128, 32, 16, 4, 4, true, false) \
    INSTANTIATE("conv2d_bwd_weight_t64x64_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 64, 16, 4, 4, false) \
    INSTANTIATE("conv2d_bwd_weight_t64x128_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 128, 16, 4, 8, false) \
    INSTANTIATE("conv2d_bwd_weight_t128x128_" NAME, conv2d_bwd_weight_tiled, T, A, 128, 128, 8, 8, 8, false)

// row-staged weight gradients (stride-1 columns), fp32 only: fp16 has the matrix tiles; names
// conv2d_bwd_weight_rows<KW>_<prec> (ops/conv.py's ROWS_KW)
#define CONV_INST_ROWS(NAME, T, A)                                                                 \
    INSTANTIATE("conv2d_bwd_weight_rows3_" NAME, conv2d_bwd_weight_rows, T, A, 3)                  \
    INSTANTIATE("conv2d_bwd_weight_rows5_" NAME, conv2d_bwd_weight_rows, T, A, 5)                  \
    INSTANTIATE("conv2d_bwd_weight_rows7_" NAME, conv2d_bwd_weight_rows, T, A, 7)

// simdgroup-matrix tiles (fp16 storage only; TILES' "m*" entries), BK = 32
#define CONV_INST_MMA(NAME, T, A)                                                                  \
    INSTANTIATE("conv2d_fwd_m128x64_" NAME, conv2d_fwd_tiled, T, A, 128, 64, 32, 8, 4, true, true)      \
    INSTANTIATE("conv2d_fwd_m64x64_" NAME, conv2d_fwd_tiled, T, A, 64, 64, 32, 4, 4, true, true)        \
    INSTANTIATE("conv2d_fwd_m128x32_" NAME, conv2d_fwd_tiled, T, A, 128, 32, 32, 4, 4, true, true)      \
    INSTANTIATE("conv2d_bwd_data_m128x64_" NAME, conv2d_bwd_data_tiled, T, A, 128, 64, 32, 8, 4, true, true) \
    INSTANTIATE("conv2d_bwd_data_m64x64_" NAME, conv2d_bwd_data_tiled, T, A, 64, 64, 32, 4, 4, true, true)   \
    INSTANTIATE("conv2d_bwd_data_m128x32_" NAME, conv2d_bwd_data_tiled, T, A, 128, 32, 32, 4, 4, true, true) \
    INSTANTIATE("conv2d_bwd_weight_m64x64_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 64, 32, 4, 4, true)     \
    INSTANTIATE("conv2d_bwd_weight_m64x128_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 128, 32, 4, 8, true)

// the same tiles on 16-deep tile products (conv_gen<2>): "n*" names (ops/conv.py's MMA_GEN)
#define CONV_INST_MMA2(NAME, T, A)                                                                 \
    INSTANTIATE("conv2d_fwd_n128x64_" NAME, conv2d_fwd_tiled, T, A, 128, 64, 32, 8, 4, true, 2)         \
    INSTANTIATE("conv2d_fwd_n64x64_" NAME, conv2d_fwd_tiled, T, A, 64, 64, 32, 4, 4, true, 2)           \
    INSTANTIATE("conv2d_fwd_n128x32_" NAME, conv2d_fwd_tiled, T, A, 128, 32, 32, 4, 4, true, 2)         \
    INSTANTIATE("conv2d_bwd_data_n128x64_" NAME, conv2d_bwd_data_tiled, T, A, 128, 64, 32, 8, 4, true, 2) \
    INSTANTIATE("conv2d_bwd_data_n64x64_" NAME, conv2d_bwd_data_tiled, T, A, 64, 64, 32, 4, 4, true, 2)   \
    INSTANTIATE("conv2d_bwd_data_n128x32_" NAME, conv2d_bwd_data_tiled, T, A, 128, 32, 32, 4, 4, true, 2) \
    INSTANTIATE("conv2d_bwd_weight_n64x64_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 64, 32, 4, 4, 2)     \
    INSTANTIATE("conv2d_bwd_weight_n64x128_" NAME, conv2d_bwd_weight_tiled, T, A, 64, 128, 32, 4, 8, 2)

#define CONV_INST_STORAGE(NAME, T)                                                                 \
    INSTANTIATE("conv2d_bwd_reduce_" NAME, conv2d_bwd_reduce, T)                                   \
    INSTANTIATE("conv2d_bwd_bias_" NAME, conv2d_bwd_bias, T)                                       \
    INSTANTIATE("conv2d_pack_weight_" NAME, conv2d_pack_weight, T)

#ifndef CONV_NO_INSTANCES
CONV_INST_PREC("float", float, float)
CONV_INST_ROWS("float", float, float)
CONV_INST_PREC("half", half, float)
CONV_INST_PREC("hacc_half", half, half)
CONV_INST_MMA("half", half, float)
CONV_INST_MMA("hacc_half", half, half)
CONV_INST_MMA2("half", half, float)
CONV_INST_MMA2("hacc_half", half, half)
CONV_INST_STORAGE("float", float)
CONV_INST_STORAGE("half", half)
#endif
