// norm.metal -- batch norm (training and inference), group norm and instance norm (= group norm
// with one channel per group), forward and backward.
//
// Design. Statistics are Welford/Chan partials (count, mean, M2) merged in a fixed order, so a
// channel whose mean is large next to its spread keeps its variance (no E[x^2] - E[x]^2), and the
// results do not depend on scheduling (no float atomics). Two kernels make partials:
//  * row mode (norm_stats_*): a threadgroup owns a chunk of one statistics row (a channel of
//    batch norm = N runs of HW contiguous elements; a (sample, group) row of group norm = one
//    contiguous run) and reduces it with simd shuffles + one threadgroup round (tile_reduce.h);
//  * column mode (norm_stats_*_cols, batch norm with HW < 32, e.g. (N, C) inputs): lanes own 32
//    neighbouring columns c*HW + hw (coalesced), slices walk the samples, and each column keeps
//    its own partial, so a (N, C) input is read with full 128-byte lines.
// norm_finalize merges a row's partials (one threadgroup per row), writes mean and 1/std and
// updates batch norm's running estimates (unbiased variance, as PyTorch). Every output element
// is then one multiply-add with per-plane coefficients (a, b, m, d) made by a tiny kernel:
//   forward   y  = act(a (x - m) + d)                   (a = gamma / std, m = mean, d = beta)
//   backward  dx = a dy + b (x - m) + d
// so the forward reads x twice and writes y once, the backward reads dy, x twice and writes dx.
// Backward sums are taken around the mean (sum dy (x - m)), again to avoid cancellation.
// Fused activation (batch norm, p.act of neuron.h): the backward's sums and apply kernels
// (the *_act variants) take dy through act' themselves, act'(z) at z = a (x - m) + d recomputed
// from x and the forward's coefficients, so the gradient needs neither y nor a separate
// element-wise pass. z is formed by the same inline functions as the forward's (bn_coef_fwd,
// norm_pre; one fma), so relu's mask z > 0 is the forward's bit for bit on every backend.
// Strided images (batch norm; concat elimination, docs/graph.md): the forward apply may write y
// into a channel slice of a larger NCHW tensor (p.out_nstride elements between images), and the
// backward may read dy from such a slice of the concatenation's gradient (p.dy_nstride), so
// neither a concat nor a split kernel copies them. Only the images move: an image's C*HW
// elements stay contiguous, so the per-element index is i + n (stride - C*HW), n = i / (C*HW),
// and the walks above are unchanged (x, dx and the statistics stay contiguous).
// Memory traffic: the row-mode partials and the apply kernels have 16-byte-chunk forms
// (norm_part_vec, norm_apply_vec: 4 float / 8 half per access, one plane lookup per chunk), which
// the host takes when the layout allows (aligned buffers; runs of a row, resp. planes, that fit
// whole chunks); the scalar partials issue 8 loads per thread before using them and merge them
// as one Welford block. The apply kernels give the same bits in either form. The forward's
// 16-byte-chunk statistics are shifted sums (sum of x - K and its square, K a value of the same
// row) rather than Welford merges, and batch norm planes that are short and not whole chunks
// (17x17) get one simdgroup per plane over the aligned chunks covering it (norm_part_planes).
// Batch norm training forward on channels that fit one threadgroup's registers (N HW <=
// 48 x 256: InceptionV3's 17x17 and 8x8, ResNet's 7x7 at batch 32) runs as one kernel
// (batch_norm_fwd_res): x read once, statistics and y from registers.
// Layer norm (layer_norm_*, its own kernels): rows of D contiguous elements, each normalized by
// one tile of SW threads (two passes over the row: a mean, then the variance and a correction of
// the mean around it, ln_stats); the backward recomputes the row's statistics the same way (the
// contract takes the input, not saved statistics), and the weight/bias gradients are column sums
// over rows in fixed-order chunks.
// Storage float or half; all statistics and arithmetic in float.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "neuron.h"
#include "stream.h"
#include "tile_reduce.h"
using namespace metal;

// ---- forward coefficients, shared by the forward and the fused-activation backward ----------
// Batch norm channel c: (a, 0, m, d), a = gamma invstd, d = beta.
inline float4 bn_coef_fwd(constant NormParams& p, device const float* weight,
                          device const float* bias, float m, float is, uint c) {
    float a = (p.has_weight ? weight[c] : 1.0f) * is;
    return float4(a, 0.0f, m, p.has_bias ? bias[c] : 0.0f);
}

// The pre-activation a (x - m) + d. An explicit fma: left to the compiler, a * b + c contracts
// on cuda and maybe not on cpu, or differently in two kernels, and the backward's recomputed
// relu mask must equal the forward's.
inline float norm_pre(float4 k, float x) { return fma(k.x, x - k.z, k.w); }

// Element i of a contiguous (N, C, HW) tensor in one whose images lie ns elements apart (0:
// contiguous); the division only where a stride is set (uniform per launch).
inline uint norm_strided(constant NormParams& p, uint i, uint ns) {
    if (ns == 0u) return i;
    uint img = p.C * p.HW;
    return i + (i / img) * (ns - img);
}

// ---- partials -------------------------------------------------------------------------------
// BWD = 0: Welford partial of x. BWD = 1: (sum dy, sum dy (x - mean[row]), 0, 0). BWD = 2
// (batch norm with a fused activation): the same sums of g = act'(z) dy, z the forward's
// pre-activation of x (needs invstd, weight, bias; the other variants get dummies).
// UN elements per thread per step (production UN = 8; UN = 1 is the earlier kernel, kept for
// benchmarks/dev_membound.py): their loads are issued together before any is used (one load in
// flight per thread made the kernel latency-bound), and Welford takes them as one block, its own
// mean and M2 from registers joined by one Chan merge, instead of a division per element (more
// instructions per element than fp16's share of the memory bandwidth allows).
template <typename T, int BWD, int UN>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_part(device const T* x [[buffer(0)]],
                      device const T* dy [[buffer(1)]],
                      device const float* mean [[buffer(2)]],
                      device const float* invstd [[buffer(3)]],
                      device const float* weight [[buffer(4)]],
                      device const float* bias [[buffer(5)]],
                      device float4* part [[buffer(6)]],
                      constant NormParams& p [[buffer(7)]],
                      uint tid [[thread_position_in_threadgroup]],
                      uint tg [[threadgroup_position_in_grid]],
                      uint ntg [[threadgroups_per_grid]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    for (uint g = tg; g < p.rows * p.chunks; g += ntg) {
        uint row = g / p.chunks, ch = g % p.chunks;
        uint e = ch * p.chunk + tid;
        uint e1 = min(ch * p.chunk + p.chunk, p.row_len);
        float mu = BWD ? mean[row] : 0.0f;
        float4 k = BWD == 2 ? bn_coef_fwd(p, weight, bias, mu, invstd[row], row) : float4(0.0f);
        float4 acc = float4(0.0f);
        // batch norm walks (sample, offset) incrementally, without a division per element; a
        // group norm row is one contiguous run
        uint n = e / p.inner_len, h = e % p.inner_len;
        const uint dy_outer = p.dy_nstride ? p.dy_nstride : p.outer_stride;
        for (; e < e1; e += uint(UN) * TR_TG) {
            float xv[UN], gv[UN];
            for (int u = 0; u < UN; ++u) {
                const bool ok = e + uint(u) * TR_TG < e1;
                const uint idx = p.outer_stride == 0u ? row * p.row_stride + e + uint(u) * TR_TG
                                                      : n * p.outer_stride + row * p.row_stride + h;
                xv[u] = ok ? float(x[idx]) : 0.0f;
                if (BWD) {
                    const uint di = p.outer_stride == 0u ? idx
                                                         : n * dy_outer + row * p.row_stride + h;
                    gv[u] = ok ? float(dy[di]) : 0.0f;
                }
                if (p.outer_stride != 0u) {
                    h += TR_TG;
                    while (h >= p.inner_len) {
                        h -= p.inner_len;
                        n += 1u;
                    }
                }
            }
            // elements of this step: a prefix of the UN (e < e1 here)
            const int cnt = min(UN, int((e1 - e + TR_TG - 1u) / TR_TG));
            if (BWD) {
                for (int u = 0; u < cnt; ++u) {
                    float g1 = gv[u];
                    if (BWD == 2) g1 = nn_activation_bwd(g1, norm_pre(k, xv[u]), p.act, p.act_alpha);
                    acc.x += g1;
                    acc.y += g1 * (xv[u] - mu);
                }
            } else if (UN == 1) {
                acc = welford_push(acc, xv[0]);
            } else {
                float s = 0.0f;
                for (int u = 0; u < cnt; ++u) s += xv[u];
                const float m = s / float(cnt);
                float q = 0.0f;
                for (int u = 0; u < cnt; ++u) {
                    const float d = xv[u] - m;
                    q = fma(d, d, q);
                }
                acc = chan_merge(acc, float4(float(cnt), m, q, 0.0f));
            }
        }
        if (BWD) {
            acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        } else {
            acc = tile_welford(acc, 1u, TR_TG, lane, sg, scratch);
        }
        if (tid == 0) part[g] = acc;
    }
}

// norm_part over 16-byte chunks of W = 16 / sizeof(T) elements (host: the contiguous runs of a
// row, HW for batch norm or the whole row for group norm, and dy's image stride are multiples of
// W, the buffers 16-byte aligned; same chunks, partial layout and finalize as norm_part). The
// scalar kernel spends a division per element (Welford's update) and loads 2 or 4 bytes at a
// time, more instructions than fp16's memory budget per element; here a chunk's own (W, mean,
// M2) comes from registers and joins the thread's partial with one Chan merge, the backward sums
// add W terms per chunk, and each thread issues STREAM_U chunk loads per stream before using any.
template <int W>
inline float4 chunk_welford(thread const float* v) {
    float s = 0.0f;
    for (int e = 0; e < W; ++e) s += v[e];
    const float m = s * (1.0f / float(W));
    float q = 0.0f;
    for (int e = 0; e < W; ++e) {
        const float d = v[e] - m;
        q = fma(d, d, q);
    }
    return float4(float(W), m, q, 0.0f);
}

// Element offset of chunk cc (in chunks) of statistics row `row`; dy's when DY.
inline uint norm_chunk_elem(constant NormParams& p, uint row, uint cc, uint W, bool dy) {
    if (p.outer_stride == 0u) return row * p.row_stride + cc * W;
    const uint cpr = p.inner_len / W;
    const uint n = cc / cpr, h = cc - n * cpr;
    const uint outer = (dy && p.dy_nstride) ? p.dy_nstride : p.outer_stride;
    return n * outer + row * p.row_stride + h * W;
}

// SHIFT (forward, BWD = 0): instead of a Welford block per chunk (a division per chunk) and a
// Welford threadgroup reduction (a division per merge), sums of d = x - K and d^2 with K the
// threadgroup chunk's first element (a value of the same channel, so d stays of the order of
// the spread: no cancellation from the offset), reduced as plain sums and turned into
// (count, K + S / n, Q - S^2 / n) once per threadgroup. The Welford form spent more instructions
// per byte than the memory allows: its statistics pass ran at 0.66 of the bias sum's speed
// (same loads) on an H100, fp32 32x256x56x56.
template <typename T, int BWD, bool SHIFT>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_part_vec(device const T* x [[buffer(0)]],
                          device const T* dy [[buffer(1)]],
                          device const float* mean [[buffer(2)]],
                          device const float* invstd [[buffer(3)]],
                          device const float* weight [[buffer(4)]],
                          device const float* bias [[buffer(5)]],
                          device float4* part [[buffer(6)]],
                          constant NormParams& p [[buffer(7)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint ntg [[threadgroups_per_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    const uint W = 16u / sizeof(T);
    for (uint g = tg; g < p.rows * p.chunks; g += ntg) {
        const uint row = g / p.chunks, ck = g % p.chunks;
        const uint c0 = ck * (p.chunk / W);
        const uint c1 = min(c0 + p.chunk / W, p.row_len / W);
        const float mu = BWD ? mean[row] : 0.0f;
        const float4 k = BWD == 2 ? bn_coef_fwd(p, weight, bias, mu, invstd[row], row)
                                  : float4(0.0f);
        const float K = (BWD == 0 && SHIFT) ? float(x[norm_chunk_elem(p, row, c0, W, false)])
                                            : 0.0f;
        float4 acc = float4(0.0f);
        for (uint c = c0 + tid; c < c1; c += STREAM_U * TR_TG) {
            float xv[STREAM_U][16 / sizeof(T)], gv[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
            for (uint s = 0; s < STREAM_U; ++s) {
                const uint cc = min(c + s * TR_TG, c1 - 1u);
                stream_load<16 / sizeof(T)>(x, norm_chunk_elem(p, row, cc, W, false) / W, xv[s]);
                if (BWD) {
                    stream_load<16 / sizeof(T)>(dy, norm_chunk_elem(p, row, cc, W, true) / W,
                                                gv[s]);
                }
            }
#pragma unroll
            for (uint s = 0; s < STREAM_U; ++s) {
                if (c + s * TR_TG < c1) {
                    if (BWD) {
#pragma unroll
                        for (uint e = 0; e < W; ++e) {
                            float g1 = gv[s][e];
                            if (BWD == 2) {
                                g1 = nn_activation_bwd(g1, norm_pre(k, xv[s][e]), p.act,
                                                       p.act_alpha);
                            }
                            acc.x += g1;
                            acc.y += g1 * (xv[s][e] - mu);
                        }
                    } else if (SHIFT) {
                        acc.x += float(W);
#pragma unroll
                        for (uint e = 0; e < W; ++e) {
                            const float d = xv[s][e] - K;
                            acc.y += d;
                            acc.z = fma(d, d, acc.z);
                        }
                    } else {
                        acc = chan_merge(acc, chunk_welford<16 / sizeof(T)>(xv[s]));
                    }
                }
            }
        }
        if (BWD || SHIFT) {
            acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        } else {
            acc = tile_welford(acc, 1u, TR_TG, lane, sg, scratch);
        }
        if (tid == 0) {
            if (BWD == 0 && SHIFT) {
                const float dm = acc.y / acc.x;  // acc.x >= W: the chunk holds c0
                acc = float4(acc.x, K + dm, max(acc.z - acc.y * dm, 0.0f), 0.0f);
            }
            part[g] = acc;
        }
    }
}

// Batch norm forward statistics for planes whose HW is not a whole number of 16-byte chunks
// (InceptionV3's 17x17, ResNet's 7x7 in float32), where norm_part_vec does not apply and
// norm_part loads 2 or 4 bytes per access: one simdgroup per plane (n, c), its lanes on the
// aligned 16-byte chunks that cover the plane (PLANE_U per lane per step, loads issued together),
// the elements of the neighbouring planes masked out; a chunk's own (count, mean, M2) from
// registers joins the lane's partial with one Chan merge, a simdgroup butterfly (no threadgroup
// round, no barrier) makes the plane's partial. Partial of plane (n, c) at c N + n, so the
// finalize reads row c's N partials as row mode's chunks (host: p.chunks = p.parts = N). Host:
// x 16-byte aligned, total a multiple of W (the last plane's chunks stay inside x).
#define PLANE_U 4
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_part_planes(device const T* x [[buffer(0)]],
                             device const T* dy [[buffer(1)]],
                             device const float* mean [[buffer(2)]],
                             device const float* invstd [[buffer(3)]],
                             device const float* weight [[buffer(4)]],
                             device const float* bias [[buffer(5)]],
                             device float4* part [[buffer(6)]],
                             constant NormParams& p [[buffer(7)]],
                             uint gid [[thread_position_in_grid]],
                             uint tg_size [[threads_per_threadgroup]],
                             uint n_groups [[threadgroups_per_grid]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];  // unused: a 32-thread tile has no threadgroup round
    const uint W = 16u / sizeof(T);
    const uint nsg = tg_size * n_groups / 32u;
    for (uint q = gid / 32u; q < p.N * p.C; q += nsg) {
        const uint c = q / p.N, n = q - c * p.N;
        const uint start = (n * p.C + c) * p.HW, end = start + p.HW;
        const uint a0 = start / W, a1 = (end - 1u) / W + 1u;
        float4 acc = float4(0.0f);
        for (uint a = a0 + lane; a < a1; a += PLANE_U * 32u) {
            float v[PLANE_U][16 / sizeof(T)];
            for (uint u = 0; u < PLANE_U; ++u) {
                stream_load<16 / sizeof(T)>(x, min(a + u * 32u, a1 - 1u), v[u]);
            }
            for (uint u = 0; u < PLANE_U; ++u) {
                const uint i0 = (a + u * 32u) * W;
                if (a + u * 32u < a1) {
                    float s = 0.0f, cnt = 0.0f;
                    for (uint e = 0; e < W; ++e) {
                        const bool in = i0 + e >= start && i0 + e < end;
                        s += in ? v[u][e] : 0.0f;
                        cnt += in ? 1.0f : 0.0f;
                    }
                    const float m = s / cnt;
                    float m2 = 0.0f;
                    for (uint e = 0; e < W; ++e) {
                        const float d = v[u][e] - m;
                        m2 = (i0 + e >= start && i0 + e < end) ? fma(d, d, m2) : m2;
                    }
                    acc = chan_merge(acc, float4(cnt, m, m2, 0.0f));
                }
            }
        }
        acc = tile_welford(acc, 1u, 32u, lane, sg, scratch);
        if (lane == 0) part[q] = acc;
    }
}

// Column mode: the partial of column j (of p.cols = C * HW) over samples n0, n0 + step, ... < n1:
// Welford (BWD 0) or (sum g, sum g (x - mean)), g = dy (1) or act'(z) dy (2).
template <typename T, int BWD>
inline float4 norm_cols_acc(device const T* x, device const T* dy, device const float* mean,
                            device const float* invstd, device const float* weight,
                            device const float* bias, constant NormParams& p, uint j, uint n0,
                            uint n1, uint step) {
    float mu = BWD ? mean[j / p.HW] : 0.0f;
    float4 k = BWD == 2 ? bn_coef_fwd(p, weight, bias, mu, invstd[j / p.HW], j / p.HW)
                        : float4(0.0f);
    float4 acc = float4(0.0f);
    const uint dy_row = p.dy_nstride ? p.dy_nstride : p.cols;
    for (uint n = n0; n < n1; n += step) {
        uint idx = n * p.cols + j;
        if (BWD) {
            float g1 = float(dy[n * dy_row + j]), xv = float(x[idx]);
            if (BWD == 2) g1 = nn_activation_bwd(g1, norm_pre(k, xv), p.act, p.act_alpha);
            acc.x += g1;
            acc.y += g1 * (xv - mu);
        } else {
            acc = welford_push(acc, float(x[idx]));
        }
    }
    return acc;
}

#define NORM_COLS_ARGS                                                                             \
    device const T* x [[buffer(0)]], device const T* dy [[buffer(1)]],                           \
        device const float* mean [[buffer(2)]], device const float* invstd [[buffer(3)]],        \
        device const float* weight [[buffer(4)]], device const float* bias [[buffer(5)]],        \
        device float4* part [[buffer(6)]], constant NormParams& p [[buffer(7)]]

// 32 columns x 8 slices over the samples of a chunk per threadgroup; one partial per column.
template <typename T, int BWD>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_part_cols(NORM_COLS_ARGS,
                           uint tid [[thread_position_in_threadgroup]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint ntg [[threadgroups_per_grid]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    const uint w = tid % 32u, s = tid / 32u;
    const uint cblocks = (p.cols + 31u) / 32u;
    for (uint g = tg; g < cblocks * p.col_chunks; g += ntg) {
        uint cb = g % cblocks, nc = g / cblocks;
        uint j = cb * 32u + w;
        bool ok = j < p.cols;
        uint n1 = min(nc * p.col_rows + p.col_rows, p.N);
        float4 acc = ok ? norm_cols_acc<T, BWD>(x, dy, mean, invstd, weight, bias, p, j,
                                                nc * p.col_rows + s, n1, 8u)
                        : float4(0.0f);
        if (BWD) {
            acc = tile_reduce(acc, TR_SUM, 32u, TR_TG, lane, sg, scratch);
        } else {
            acc = tile_welford(acc, 32u, TR_TG, lane, sg, scratch);
        }
        if (ok && s == 0) part[nc * p.cols + j] = acc;
    }
}

// The same partials a thread per (column, chunk), the chunk's samples in order: on a CPU the
// tree's barriers (work-item loops) and its empty slices (batch 2 fills 2 of 8) cost more than
// the samples (ResNet-18 at batch 2: 6-10 ms of a step in the forward's 2x2 .. 8x8 planes).
// ops.norm.FINALIZE picks, as for the finalize.
template <typename T, int BWD>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_part_colrows(NORM_COLS_ARGS, uint gid [[thread_position_in_grid]],
                              uint tg_size [[threads_per_threadgroup]],
                              uint ntg [[threadgroups_per_grid]]) {
    for (uint q = gid; q < p.cols * p.col_chunks; q += tg_size * ntg) {
        uint j = q % p.cols, nc = q / p.cols;
        uint n1 = min(nc * p.col_rows + p.col_rows, p.N);
        part[nc * p.cols + j] = norm_cols_acc<T, BWD>(x, dy, mean, invstd, weight, bias, p, j,
                                                      nc * p.col_rows, n1, 1u);
    }
}

// Partial k of statistics row r: row mode r * chunks + k; column mode (chunk, hw) = (k / HW,
// k % HW) of channel r.
inline uint part_index(constant NormParams& p, uint r, uint k) {
    if (p.cols == 0u) return r * p.chunks + k;
    return (k / p.HW) * p.cols + r * p.HW + k % p.HW;
}

// ---- statistics -----------------------------------------------------------------------------
// mean[r], invstd[r] = 1 / sqrt(var + eps) (biased variance) of row r; batch norm in training
// also moves the running estimates toward (mean, unbiased variance) by `momentum`. BN = true
// (batch_norm_finalize_fwd): rows are channels, and the forward coefficients (bn_coef_fwd) are
// written too, so a training forward needs no separate coefficient kernel (one launch per layer
// less: InceptionV3 has 94 of them per step).
// The merged Welford triple (count, mean, M2) of row r -> the row's outputs.
// 1 / sqrt(biased variance + eps) of a Welford triple; one function, so that a kernel that
// needs the value in every thread (batch_norm_fwd_res) gets the bits the finalize stores.
inline float norm_invstd(float4 acc, constant NormParams& p) {
    return 1.0f / precise::sqrt(acc.z / acc.x + p.eps);
}

template <bool BN>
inline void norm_finalize_row(float4 acc, uint r, constant NormParams& p,
                              device float* running_mean, device float* running_var,
                              device float* mean, device float* invstd,
                              device const float* weight, device const float* bias,
                              device float4* coef) {
    float is = norm_invstd(acc, p);
    mean[r] = acc.y;
    invstd[r] = is;
    if (BN) coef[r] = bn_coef_fwd(p, weight, bias, acc.y, is, r);
    if (p.has_running) {
        float unbiased = acc.z / (acc.x - 1.0f);
        running_mean[r] = (1.0f - p.momentum) * running_mean[r] + p.momentum * acc.y;
        running_var[r] = (1.0f - p.momentum) * running_var[r] + p.momentum * unbiased;
    }
}

#define NORM_FINALIZE_ARGS                                                                      \
    device const float4* part [[buffer(0)]], device float* running_mean [[buffer(1)]],          \
        device float* running_var [[buffer(2)]], device float* mean [[buffer(3)]],              \
        device float* invstd [[buffer(4)]], constant NormParams& p [[buffer(5)]],               \
        device const float* weight [[buffer(6)]], device const float* bias [[buffer(7)]],       \
        device float4* coef [[buffer(8)]]

// A threadgroup per row (grid-stride), its 256 threads merging the row's partials as a tree.
template <bool BN>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_finalize_fwd(NORM_FINALIZE_ARGS,
                              uint tid [[thread_position_in_threadgroup]],
                              uint tg [[threadgroup_position_in_grid]],
                              uint ntg [[threadgroups_per_grid]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    for (uint r = tg; r < p.rows; r += ntg) {
        float4 acc = float4(0.0f);
        for (uint k = tid; k < p.parts; k += TR_TG) acc = chan_merge(acc, part[part_index(p, r, k)]);
        acc = tile_welford(acc, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) {
            norm_finalize_row<BN>(acc, r, p, running_mean, running_var, mean, invstd, weight, bias,
                                  coef);
        }
    }
}
INSTANTIATE("norm_finalize_fwd_float", norm_finalize_fwd, false)
INSTANTIATE("batch_norm_finalize_fwd_float", norm_finalize_fwd, true)

// A thread per row, merging its partials in order. The cpu backend's plans leave a few
// partials per row, where the tree above pays its barriers and SIMD-group steps as work-item
// loops for every row (ResNet-18 at batch 2 on a 2-core Xeon: 33 ms of a training step for its
// 20 batch norms, 15%; under 1 ms here).
template <bool BN>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_finalize_rows_fwd(NORM_FINALIZE_ARGS, uint gid [[thread_position_in_grid]],
                                   uint tg_size [[threads_per_threadgroup]],
                                   uint ntg [[threadgroups_per_grid]]) {
    for (uint r = gid; r < p.rows; r += tg_size * ntg) {  // grid-stride past MAX_GROUPS groups
        float4 acc = float4(0.0f);
        for (uint k = 0; k < p.parts; ++k) acc = chan_merge(acc, part[part_index(p, r, k)]);
        norm_finalize_row<BN>(acc, r, p, running_mean, running_var, mean, invstd, weight, bias,
                              coef);
    }
}
INSTANTIATE("norm_finalize_rows_fwd_float", norm_finalize_rows_fwd, false)
INSTANTIATE("batch_norm_finalize_rows_fwd_float", norm_finalize_rows_fwd, true)

// Batch norm training forward in one launch for channels that fit in the registers of one
// threadgroup (N HW <= RU TR_TG): the channel is read once into RU values per thread, its sum
// and then its sum of squares around the mean reduced over the threadgroup (two passes over
// registers, not over memory: the variance has no cancellation), the finalize's outputs written
// by thread 0 (norm_finalize_row: mean, invstd, running estimates, coefficients) and y from the
// registers. The three-kernel path (partials, finalize, apply) reads x twice and pays two more
// launches; on InceptionV3's 32x768x17x17 (28 MB) it ran at 0.86x cuDNN's one kernel on an H100.
// A threadgroup per channel (grid-stride over channels); element k = n HW + hw of the channel,
// thread tid holding k = tid + j TR_TG, its (n, hw) stepped without a division per element.
template <typename T, int RU>
[[max_total_threads_per_threadgroup(256)]]
kernel void batch_norm_fwd_res(device const T* x [[buffer(0)]],
                               device T* y [[buffer(1)]],
                               device float* running_mean [[buffer(2)]],
                               device float* running_var [[buffer(3)]],
                               device float* mean [[buffer(4)]],
                               device float* invstd [[buffer(5)]],
                               constant NormParams& p [[buffer(6)]],
                               device const float* weight [[buffer(7)]],
                               device const float* bias [[buffer(8)]],
                               device float4* coef [[buffer(9)]],
                               uint tid [[thread_position_in_threadgroup]],
                               uint tg [[threadgroup_position_in_grid]],
                               uint ntg [[threadgroups_per_grid]],
                               uint lane [[thread_index_in_simdgroup]],
                               uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    const uint len = p.N * p.HW;
    const uint dn = TR_TG / p.HW, dh = TR_TG % p.HW;
    const uint n0 = tid / p.HW, h0 = tid % p.HW;
    for (uint c = tg; c < p.C; c += ntg) {
        // the mean as K + sum (x - K) / len, K the channel's first element: a mean large next
        // to the spread keeps its digits (positions past the channel hold K: they add 0)
        const float K = float(x[c * p.HW]);
        float v[RU];
        uint n = n0, h = h0;
#pragma unroll
        for (uint j = 0; j < RU; ++j) {
            v[j] = tid + j * TR_TG < len ? float(x[(n * p.C + c) * p.HW + h]) : K;
            n += dn;
            h += dh;
            if (h >= p.HW) {
                h -= p.HW;
                n += 1u;
            }
        }
        float s = 0.0f;
#pragma unroll
        for (uint j = 0; j < RU; ++j) s += v[j] - K;
        const float m = K + tile_reduce(s, TR_SUM, 1u, TR_TG, lane, sg, scratch) / float(len);
        float q = 0.0f;
#pragma unroll
        for (uint j = 0; j < RU; ++j) {
            const float d = v[j] - m;
            q = tid + j * TR_TG < len ? fma(d, d, q) : q;
        }
        const float4 acc = float4(float(len), m, tile_reduce(q, TR_SUM, 1u, TR_TG, lane, sg, scratch),
                                  0.0f);
        if (tid == 0) {
            norm_finalize_row<true>(acc, c, p, running_mean, running_var, mean, invstd, weight,
                                    bias, coef);
        }
        const float4 k = bn_coef_fwd(p, weight, bias, m, norm_invstd(acc, p), c);
        n = n0;
        h = h0;
#pragma unroll
        for (uint j = 0; j < RU; ++j) {
            if (tid + j * TR_TG < len) {
                y[norm_strided(p, (n * p.C + c) * p.HW + h, p.out_nstride)] =
                    T(nn_activation(norm_pre(k, v[j]), p.act, p.act_alpha));
            }
            n += dn;
            h += dh;
            if (h >= p.HW) {
                h -= p.HW;
                n += 1u;
            }
        }
    }
}
#define BN_RES_INSTANTIATE(T, RU) INSTANTIATE("batch_norm_fwd_res" #RU "_" #T, batch_norm_fwd_res, T, RU)
BN_RES_INSTANTIATE(float, 8)
BN_RES_INSTANTIATE(float, 16)
BN_RES_INSTANTIATE(float, 24)
BN_RES_INSTANTIATE(float, 32)
BN_RES_INSTANTIATE(float, 40)
BN_RES_INSTANTIATE(float, 48)
BN_RES_INSTANTIATE(half, 8)
BN_RES_INSTANTIATE(half, 16)
BN_RES_INSTANTIATE(half, 24)
BN_RES_INSTANTIATE(half, 32)
BN_RES_INSTANTIATE(half, 40)
BN_RES_INSTANTIATE(half, 48)

// Batch norm forward coefficients per channel; in inference mode mean / invstd come from (and
// are written from) the running estimates.
kernel void batch_norm_coef_fwd_float(device const float* weight [[buffer(0)]],
                                      device const float* bias [[buffer(1)]],
                                      device const float* running_mean [[buffer(2)]],
                                      device const float* running_var [[buffer(3)]],
                                      device float* mean [[buffer(4)]],
                                      device float* invstd [[buffer(5)]],
                                      device float4* coef [[buffer(6)]],
                                      constant NormParams& p [[buffer(7)]],
                                      uint c [[thread_position_in_grid]]) {
    if (c >= p.C) return;
    float m, is;
    if (p.training) {
        m = mean[c];
        is = invstd[c];
    } else {
        m = running_mean[c];
        is = 1.0f / precise::sqrt(running_var[c] + p.eps);
        mean[c] = m;
        invstd[c] = is;
    }
    coef[c] = bn_coef_fwd(p, weight, bias, m, is, c);
}

// Group norm forward coefficients per (sample, channel) plane.
kernel void group_norm_coef_fwd_float(device const float* weight [[buffer(0)]],
                                      device const float* bias [[buffer(1)]],
                                      device const float* mean [[buffer(2)]],
                                      device const float* invstd [[buffer(3)]],
                                      device float4* coef [[buffer(4)]],
                                      constant NormParams& p [[buffer(5)]],
                                      uint pl [[thread_position_in_grid]]) {
    if (pl >= p.planes) return;
    uint n = pl / p.C, c = pl % p.C;
    uint r = n * p.G + c / (p.C / p.G);
    float a = (p.has_weight ? weight[c] : 1.0f) * invstd[r];
    coef[pl] = float4(a, 0.0f, mean[r], p.has_bias ? bias[c] : 0.0f);
}

// ---- element-wise ---------------------------------------------------------------------------
// TWO = 0: out = act(a (u - m) + d) (forward, u = x; act: p.act of neuron.h, 0 = none, for
// batch_norm(..., activation=)). TWO = 1: out = a u + b (v - m) + d (backward, u = dy, v = x).
// TWO = 2: the backward of a fused activation, u replaced by act'(z) u with z = norm_pre of the
// forward's coefficients, stored after the backward's (coef[planes + plane]).
// Coefficients per plane (i / HW) % planes. Batch norm: u = dy read with p.dy_nstride (TWO > 0),
// out = y written with p.out_nstride (TWO = 0); x and dx contiguous.
// One element of norm_apply: uv = u's element (x or dy), xv = x's (TWO > 0), k its plane's
// coefficients, kf the forward's (TWO == 2).
template <int TWO>
inline float norm_apply_one(float uv, float xv, float4 k, float4 kf, constant NormParams& p) {
    if (TWO) {
        float g = uv;
        if (TWO == 2) g = nn_activation_bwd(g, norm_pre(kf, xv), p.act, p.act_alpha);
        return k.x * g + k.y * (xv - k.z) + k.w;
    }
    return nn_activation(norm_pre(k, uv), p.act, p.act_alpha);
}

// Element i of norm_apply (the scalar kernel, and the vector kernel's tail).
template <typename T, int TWO>
inline void norm_apply_elem(device const T* u, device const T* v, device const float4* coef,
                            device T* out, constant NormParams& p, uint i) {
    uint pl = (i / p.HW) % p.planes;
    float4 k = coef[pl];
    float4 kf = TWO == 2 ? coef[p.planes + pl] : k;
    float uv = float(u[TWO ? norm_strided(p, i, p.dy_nstride) : i]);
    float r = norm_apply_one<TWO>(uv, TWO ? float(v[i]) : 0.0f, k, kf, p);
    out[TWO ? i : norm_strided(p, i, p.out_nstride)] = T(r);
}

template <typename T, int TWO>
kernel void norm_apply(device const T* u [[buffer(0)]],
                       device const T* v [[buffer(1)]],
                       device const float4* coef [[buffer(2)]],
                       device T* out [[buffer(3)]],
                       constant NormParams& p [[buffer(4)]],
                       uint gid [[thread_position_in_grid]],
                       uint ntg [[threadgroups_per_grid]],
                       uint tgs [[threads_per_threadgroup]]) {
    for (uint i = gid; i < p.total; i += ntg * tgs) norm_apply_elem<T, TWO>(u, v, coef, out, p, i);
}

// norm_apply in the stream.h shape: 16-byte chunks of W = 16 / sizeof(T) elements, STREAM_U
// per thread, loads issued before any result is used, one plane lookup (division) per chunk
// instead of per element: the scalar kernel is bound by its integer divisions and 2-byte loads
// (fp16 ran no faster than fp32), then a scalar tail (total - W nvec elements, one thread
// each). A chunk meets at most two planes (host: HW >= W), q and q + 1, the first b elements in
// q. Strided images (p.out_nstride, p.dy_nstride) need chunks that stay in one image, aligned
// in the strided tensor (host: C HW and the stride multiples of W); every buffer is 16-byte
// aligned. Per element the same norm_apply_one as the scalar kernel, so the same bits.
template <typename T, int TWO>
[[max_total_threads_per_threadgroup(256)]]
kernel void norm_apply_vec(device const T* u [[buffer(0)]],
                           device const T* v [[buffer(1)]],
                           device const float4* coef [[buffer(2)]],
                           device T* out [[buffer(3)]],
                           constant NormParams& p [[buffer(4)]],
                           uint gid [[thread_position_in_grid]]) {
    const uint W = 16u / sizeof(T);
    const uint nvec = p.total / W;
    const uint vthreads = stream_vthreads(nvec);
    if (gid >= vthreads) {
        const uint i = nvec * W + (gid - vthreads);
        if (i < p.total) norm_apply_elem<T, TWO>(u, v, coef, out, p, i);
        return;
    }
    float a[STREAM_U][16 / sizeof(T)], b[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_clamp(stream_chunk(gid, s), nvec);
        stream_load<16 / sizeof(T)>(u, TWO ? norm_strided(p, ch * W, p.dy_nstride) / W : ch, a[s]);
        if (TWO) stream_load<16 / sizeof(T)>(v, ch, b[s]);
    }
#pragma unroll
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_chunk(gid, s);
        if (ch < nvec) {
            const uint i0 = ch * W, q = i0 / p.HW;
            const uint in_q = (q + 1u) * p.HW - i0;  // elements of the chunk in plane q
            const uint pl0 = q % p.planes, pl1 = (q + 1u) % p.planes;
            const float4 k0 = coef[pl0];
            const float4 k1 = in_q < W ? coef[pl1] : k0;
            const float4 f0 = TWO == 2 ? coef[p.planes + pl0] : k0;
            const float4 f1 = TWO == 2 && in_q < W ? coef[p.planes + pl1] : f0;
            // unrolled: the chunk's elements stay in registers (a loop left rolled around the
            // activation's branches would index them dynamically, through local memory)
#pragma unroll
            for (uint e = 0; e < W; ++e) {
                const bool first = e < in_q;
                a[s][e] = norm_apply_one<TWO>(a[s][e], TWO ? b[s][e] : 0.0f, first ? k0 : k1,
                                              first ? f0 : f1, p);
            }
            stream_store<16 / sizeof(T)>(out, TWO ? ch : norm_strided(p, i0, p.out_nstride) / W,
                                         a[s]);
        }
    }
}

// ---- backward -------------------------------------------------------------------------------
// Batch norm, per channel: dbeta = sum dy, dgamma = invstd sum dy (x - m), and the coefficients
// of dx. Training: dx = a (dy - dbeta / M - xhat dgamma / M), a = gamma invstd; inference
// (running statistics are constants): dx = a dy. With a fused activation (p.act) the forward's
// coefficients follow, coef[C + c], for norm_apply_bwd_act. Two ways to sum a channel's
// partials, as the forward's finalize: a threadgroup per channel (batch_norm_grad_bwd, a tree)
// or a thread per channel (batch_norm_grad_rows_bwd, in order; ops.norm.FINALIZE picks), with
// this epilogue shared.
#define BN_GRAD_ARGS                                                                               \
    device const float4* part [[buffer(0)]], device const float* weight [[buffer(1)]],          \
        device const float* bias [[buffer(2)]], device const float* mean [[buffer(3)]],          \
        device const float* invstd [[buffer(4)]], device float* dweight [[buffer(5)]],           \
        device float* dbias [[buffer(6)]], device float4* coef [[buffer(7)]],                    \
        constant NormParams& p [[buffer(8)]]

inline void bn_grad_finish(float4 acc, uint c, constant NormParams& p, device const float* weight,
                           device const float* bias, device const float* mean,
                           device const float* invstd, device float* dweight, device float* dbias,
                           device float4* coef) {
    float is = invstd[c];
    if (p.has_weight) dweight[c] = is * acc.y;
    if (p.has_bias) dbias[c] = acc.x;
    float4 f = bn_coef_fwd(p, weight, bias, mean[c], is, c);
    float a = f.x;
    if (p.act) coef[p.C + c] = f;
    if (p.training) {
        float M = float(p.row_len);
        coef[c] = float4(a, -a * is * is * acc.y / M, mean[c], -a * acc.x / M);
    } else {
        coef[c] = float4(a, 0.0f, 0.0f, 0.0f);
    }
}

[[max_total_threads_per_threadgroup(256)]]
kernel void batch_norm_grad_bwd_float(BN_GRAD_ARGS,
                                      uint tid [[thread_position_in_threadgroup]],
                                      uint tg [[threadgroup_position_in_grid]],
                                      uint ntg [[threadgroups_per_grid]],
                                      uint lane [[thread_index_in_simdgroup]],
                                      uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    for (uint c = tg; c < p.C; c += ntg) {
        float4 acc = float4(0.0f);
        for (uint k = tid; k < p.parts; k += TR_TG) acc += part[part_index(p, c, k)];
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) bn_grad_finish(acc, c, p, weight, bias, mean, invstd, dweight, dbias, coef);
    }
}

// A thread per channel, grid-stride: on a CPU the tree's barriers, run as work-item loops, cost
// more than the few partials it sums (ResNet-18 at batch 2: 8.9 ms of a 115 ms step).
[[max_total_threads_per_threadgroup(256)]]
kernel void batch_norm_grad_rows_bwd_float(BN_GRAD_ARGS, uint gid [[thread_position_in_grid]],
                                           uint tg_size [[threads_per_threadgroup]],
                                           uint ntg [[threadgroups_per_grid]]) {
    for (uint c = gid; c < p.C; c += tg_size * ntg) {
        float4 acc = float4(0.0f);
        for (uint k = 0; k < p.parts; ++k) acc += part[part_index(p, c, k)];
        bn_grad_finish(acc, c, p, weight, bias, mean, invstd, dweight, dbias, coef);
    }
}

// Group norm: per (sample, channel) plane, (sum dy, sum dy (x - mean of its group)), one tile of
// softmax.metal's plan per plane (the plane's HW elements are the reduced axis).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void group_norm_sums(device const T* dy [[buffer(0)]],
                            device const T* x [[buffer(1)]],
                            device const float* mean [[buffer(2)]],
                            device float2* sums [[buffer(3)]],
                            constant NormParams& p [[buffer(4)]],
                            constant SoftmaxParams& q [[buffer(5)]],
                            uint tid [[thread_position_in_threadgroup]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint ntg [[threadgroups_per_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float2 scratch[TR_TG];
    TilePos t = tile_pos(q.W, q.SW, tid);
    for (uint base = tg * t.R; base < q.ntiles; base += ntg * t.R) {
        uint pl = base + t.r;  // inner == 1: one tile per plane
        bool ok = pl < q.ntiles;
        float2 acc = float2(0.0f);
        if (ok) {
            uint n = pl / p.C, c = pl % p.C;
            float mu = mean[n * p.G + c / (p.C / p.G)];
            // 4 elements' loads issued together, summed in the same order as one at a time
            uint l = t.s;
            for (; l + 3u * t.S < p.HW; l += 4u * t.S) {
                float gv[4], xv[4];
                for (uint u = 0; u < 4u; ++u) {
                    gv[u] = float(dy[pl * p.HW + l + u * t.S]);
                    xv[u] = float(x[pl * p.HW + l + u * t.S]);
                }
                for (uint u = 0; u < 4u; ++u) acc += float2(gv[u], gv[u] * (xv[u] - mu));
            }
            for (; l < p.HW; l += t.S) {
                float g1 = float(dy[pl * p.HW + l]);
                acc += float2(g1, g1 * (float(x[pl * p.HW + l]) - mu));
            }
        }
        acc = tile_reduce(acc, TR_SUM, q.W, q.SW, lane, sg, scratch);
        if (ok && t.s == 0) sums[pl] = acc;
    }
}

// Per (sample, group) row: coefficients of dx for the row's planes.
// dx = r gamma dy - r sg / L - r^2 q (x - mean), sg = sum gamma dy, q = r sum gamma dy (x - mean) / L.
kernel void group_norm_coef_bwd_float(device const float2* sums [[buffer(0)]],
                                      device const float* weight [[buffer(1)]],
                                      device const float* mean [[buffer(2)]],
                                      device const float* invstd [[buffer(3)]],
                                      device float4* coef [[buffer(4)]],
                                      constant NormParams& p [[buffer(5)]],
                                      uint r [[thread_position_in_grid]]) {
    if (r >= p.rows) return;
    uint n = r / p.G, g = r % p.G, cg = p.C / p.G;
    float sg = 0.0f, sgx = 0.0f;
    for (uint c = g * cg; c < (g + 1u) * cg; ++c) {
        float gm = p.has_weight ? weight[c] : 1.0f;
        float2 s = sums[n * p.C + c];
        sg += gm * s.x;
        sgx += gm * s.y;
    }
    float rs = invstd[r], L = float(p.row_len);
    float q = rs * sgx / L;
    for (uint c = g * cg; c < (g + 1u) * cg; ++c) {
        float gm = p.has_weight ? weight[c] : 1.0f;
        coef[n * p.C + c] = float4(rs * gm, -rs * rs * q, mean[r], -rs * sg / L);
    }
}

// Per channel: dgamma = sum_n invstd (sum dy (x - mean)), dbeta = sum_n sum dy.
kernel void group_norm_param_bwd_float(device const float2* sums [[buffer(0)]],
                                       device const float* invstd [[buffer(1)]],
                                       device float* dweight [[buffer(2)]],
                                       device float* dbias [[buffer(3)]],
                                       constant NormParams& p [[buffer(4)]],
                                       uint c [[thread_position_in_grid]]) {
    if (c >= p.C) return;
    float dw = 0.0f, db = 0.0f;
    uint g = c / (p.C / p.G);
    for (uint n = 0; n < p.N; ++n) {
        float2 s = sums[n * p.C + c];
        dw += invstd[n * p.G + g] * s.y;
        db += s.x;
    }
    if (p.has_weight) dweight[c] = dw;
    if (p.has_bias) dbias[c] = db;
}

// ---- layer norm ------------------------------------------------------------------------------
// A row's statistics (m, c, rstd, 0): mean = m + c, where m = sum(x) / D is a first guess and c =
// sum(x - m) / D its correction (the corrected two-pass algorithm): a float sum of D values near
// a large mean is off by up to D ulp(D mean) / D, and x - m (exact when x and m are within a factor
// of two) minus the small c keeps the centred values accurate where x - (m + c) would round m + c
// to ulp(mean) first. var = (sum (x - m)^2 - (sum (x - m))^2 / D) / D, around the mean.
template <typename T>
inline float4 ln_stats(device const T* xr, uint D, uint SW, uint s, float eps, uint lane, uint sg,
                       threadgroup float* scratch, threadgroup float2* scratch2) {
    float acc = 0.0f;
    for (uint j = s; j < D; j += SW) acc += float(xr[j]);
    float m = tile_reduce(acc, TR_SUM, 1u, SW, lane, sg, scratch) / float(D);
    float2 a2 = float2(0.0f);
    for (uint j = s; j < D; j += SW) {
        float d = float(xr[j]) - m;
        a2 += float2(d, d * d);
    }
    a2 = tile_reduce(a2, TR_SUM, 1u, SW, lane, sg, scratch2);
    float c = a2.x / float(D);
    float var = max((a2.y - a2.x * c) / float(D), 0.0f);
    return float4(m, c, precise::rsqrt(var + eps), 0.0f);
}

// x - mean from the statistics above
inline float ln_centre(float x, float4 st) { return (x - st.x) - st.y; }

// g = dy w rounded once, as a value of its own: contracted into the later g - mean(g) (as
// fma(dy, w, -mean(g)), which NVRTC does by default), the product's rounding error would stay
// and be multiplied by rstd (1/sqrt(eps) = 316 for a row of equal values, whose true input
// gradient with D = 1 is exactly zero). fma with +0 is the product rounded once on every backend.
inline float ln_g(float dy, float w) { return fma(dy, w, 0.0f); }

// y = (x - mean) / std * w + b per row
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void layer_norm_fwd(device const T* x [[buffer(0)]],
                           device const T* weight [[buffer(1)]],
                           device const T* bias [[buffer(2)]],
                           device T* y [[buffer(3)]],
                           constant LayerNormParams& p [[buffer(4)]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint ntg [[threadgroups_per_grid]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    threadgroup float2 scratch2[TR_TG];
    TilePos t = tile_pos(1u, p.SW, tid);
    for (uint base = tg * t.R; base < p.rows; base += ntg * t.R) {
        uint row = min(base + t.r, p.rows - 1u);  // out-of-range tiles redo the last row, unwritten
        device const T* xr = x + row * p.D;
        float4 st = ln_stats(xr, p.D, p.SW, t.s, p.eps, lane, sg, scratch, scratch2);
        if (base + t.r < p.rows) {
            for (uint j = t.s; j < p.D; j += p.SW) {
                float v = ln_centre(float(xr[j]), st) * st.z;
                if (p.has_weight) v *= float(weight[j]);
                if (p.has_bias) v += float(bias[j]);
                y[row * p.D + j] = T(v);
            }
        }
    }
}

// dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy w, xhat = (x - mean) rstd
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void layer_norm_bwd(device const T* dy [[buffer(0)]],
                           device const T* x [[buffer(1)]],
                           device const T* weight [[buffer(2)]],
                           device T* dx [[buffer(3)]],
                           device float4* stats [[buffer(4)]],
                           constant LayerNormParams& p [[buffer(5)]],
                           uint tid [[thread_position_in_threadgroup]],
                           uint tg [[threadgroup_position_in_grid]],
                           uint ntg [[threadgroups_per_grid]],
                           uint lane [[thread_index_in_simdgroup]],
                           uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    threadgroup float2 scratch2[TR_TG];
    TilePos t = tile_pos(1u, p.SW, tid);
    for (uint base = tg * t.R; base < p.rows; base += ntg * t.R) {
        uint row = min(base + t.r, p.rows - 1u);
        device const T* xr = x + row * p.D;
        device const T* gr = dy + row * p.D;
        float4 st = ln_stats(xr, p.D, p.SW, t.s, p.eps, lane, sg, scratch, scratch2);
        float2 acc = float2(0.0f);  // (sum g, sum g (x - mean))
        for (uint j = t.s; j < p.D; j += p.SW) {
            float g = p.has_weight ? ln_g(float(gr[j]), float(weight[j])) : float(gr[j]);
            acc += float2(g, g * ln_centre(float(xr[j]), st));
        }
        acc = tile_reduce(acc, TR_SUM, 1u, p.SW, lane, sg, scratch2);
        if (base + t.r < p.rows) {
            float inv_d = 1.0f / float(p.D);
            float mg = acc.x * inv_d, mgx = acc.y * st.z * inv_d;
            for (uint j = t.s; j < p.D; j += p.SW) {
                float g = p.has_weight ? ln_g(float(gr[j]), float(weight[j])) : float(gr[j]);
                float xh = ln_centre(float(xr[j]), st) * st.z;
                dx[row * p.D + j] = T(st.z * ((g - mg) - xh * mgx));
            }
            if (p.save_stats && t.s == 0) stats[row] = st;
        }
    }
}

// Partial column sums over chunk c of rows: (sum dy xhat, sum dy) per column j.
template <typename T>
kernel void layer_norm_bwd_params(device const T* dy [[buffer(0)]],
                                  device const T* x [[buffer(1)]],
                                  device const float4* stats [[buffer(2)]],
                                  device float2* part [[buffer(3)]],
                                  constant LayerNormParams& p [[buffer(4)]],
                                  uint gid [[thread_position_in_grid]]) {
    if (gid >= p.splits * p.D) return;
    uint c = gid / p.D, j = gid % p.D;
    uint lo = c * p.chunk_rows, hi = min(lo + p.chunk_rows, p.rows);
    float2 acc = float2(0.0f);
    for (uint r = lo; r < hi; ++r) {
        float g = float(dy[r * p.D + j]);
        float4 st = stats[r];
        acc += float2(g * ln_centre(float(x[r * p.D + j]), st) * st.z, g);
    }
    part[gid] = acc;
}

// dw[j], db[j]: the chunks' partials in order
template <typename T>
kernel void layer_norm_params_sum(device const float2* part [[buffer(0)]],
                                  device T* dweight [[buffer(1)]],
                                  device T* dbias [[buffer(2)]],
                                  constant LayerNormParams& p [[buffer(3)]],
                                  uint j [[thread_position_in_grid]]) {
    if (j >= p.D) return;
    float2 acc = float2(0.0f);
    for (uint c = 0; c < p.splits; ++c) acc += part[c * p.D + j];
    if (p.has_weight) dweight[j] = T(acc.x);
    if (p.has_bias) dbias[j] = T(acc.y);
}

#define LAYER_NORM_INSTANTIATE(T)                                                              \
    INSTANTIATE("layer_norm_fwd_" #T, layer_norm_fwd, T)                                       \
    INSTANTIATE("layer_norm_bwd_" #T, layer_norm_bwd, T)                                       \
    INSTANTIATE("layer_norm_bwd_params_" #T, layer_norm_bwd_params, T)                         \
    INSTANTIATE("layer_norm_params_sum_" #T, layer_norm_params_sum, T)

LAYER_NORM_INSTANTIATE(float)
LAYER_NORM_INSTANTIATE(half)

#define NORM_INSTANTIATE(T)                                                                    \
    INSTANTIATE("norm_stats_fwd_" #T, norm_part, T, 0, 8)                                      \
    INSTANTIATE("norm_stats_bwd_" #T, norm_part, T, 1, 8)                                      \
    INSTANTIATE("norm_stats_fwd_u1_" #T, norm_part, T, 0, 1)                                   \
    INSTANTIATE("norm_stats_bwd_u1_" #T, norm_part, T, 1, 1)                                   \
    INSTANTIATE("norm_stats_bwd_act_u1_" #T, norm_part, T, 2, 1)                               \
    INSTANTIATE("norm_stats_fwd_cols_" #T, norm_part_cols, T, 0)                               \
    INSTANTIATE("norm_stats_bwd_cols_" #T, norm_part_cols, T, 1)                               \
    INSTANTIATE("norm_apply_fwd_" #T, norm_apply, T, 0)                                        \
    INSTANTIATE("norm_apply_bwd_" #T, norm_apply, T, 1)                                        \
    INSTANTIATE("norm_stats_bwd_act_" #T, norm_part, T, 2, 8)                                  \
    INSTANTIATE("norm_stats_bwd_cols_act_" #T, norm_part_cols, T, 2)                           \
    INSTANTIATE("norm_stats_fwd_colrows_" #T, norm_part_colrows, T, 0)                         \
    INSTANTIATE("norm_stats_bwd_colrows_" #T, norm_part_colrows, T, 1)                         \
    INSTANTIATE("norm_stats_bwd_colrows_act_" #T, norm_part_colrows, T, 2)                     \
    INSTANTIATE("norm_apply_bwd_act_" #T, norm_apply, T, 2)                                    \
    INSTANTIATE("norm_stats_fwd_vec_" #T, norm_part_vec, T, 0, true)                           \
    INSTANTIATE("norm_stats_fwd_vec_welford_" #T, norm_part_vec, T, 0, false)                  \
    INSTANTIATE("norm_stats_fwd_planes_" #T, norm_part_planes, T)                              \
    INSTANTIATE("norm_stats_bwd_vec_" #T, norm_part_vec, T, 1, false)                          \
    INSTANTIATE("norm_stats_bwd_act_vec_" #T, norm_part_vec, T, 2, false)                      \
    INSTANTIATE("norm_apply_fwd_vec_" #T, norm_apply_vec, T, 0)                                \
    INSTANTIATE("norm_apply_bwd_vec_" #T, norm_apply_vec, T, 1)                                \
    INSTANTIATE("norm_apply_bwd_act_vec_" #T, norm_apply_vec, T, 2)                            \
    INSTANTIATE("group_norm_sums_bwd_" #T, group_norm_sums, T)

NORM_INSTANTIATE(float)
NORM_INSTANTIATE(half)
