// membound.metal -- numbered versions of the memory-bound kernels whose production form does not
// reach the copy bandwidth, timed side by side by benchmarks/dev_membound.py (each validated against
// numpy first). Production (v1) is the kernel the op launches today; the versions here are
// candidates for promotion.
//
//   channel statistics (batch norm's Welford partials, the per-channel sum of a bias gradient)
//     v1  norm.metal norm_stats_fwd / arith.metal reduce_inner: scalar loads, one Welford update
//         (a division) per element
//     v2  16-byte loads (4 float / 8 half), one chunk's mean and M2 from registers, then one
//         Chan merge per chunk (one division per 4 or 8 elements); same partial layout as v1, so
//         norm_finalize reads it. Needs HW % W == 0 (a chunk never straddles two images).
//     v3  v2 with two chunks in flight per thread per iteration (the sum: promoted as
//         arith.metal sum_rows_part / sum_rows_finish, float partials, for full sums too)
//   channel broadcast  y = act(x * w[c] (+ b[c]))  (mul_bias; a conv's bias + activation)
//     v1  arith.metal arith_ew: the generic broadcast walk, ndim - 1 divisions per 4 outputs,
//         8-byte half loads
//     v2  the stream.h chunk layout: one division per 16-byte chunk for its channel, STREAM_U
//         chunks per thread, bias and activation fused in the same pass (arith_chan has the
//         same layout and fuses the activation: F.add(x, b, activation=) is the production form)
//   avg_pool2d forward, 3x3 windows at stride 1 (InceptionV3's 3x3 / 1 / pad 1 pooling)
//     v1  pool.metal avg_pool2d_fwd: one thread per output, 9 loads and the window's divisor
//     v2  a thread owns a strip of AP_ROWS outputs of one column: each of the AP_ROWS + 2 input
//         rows is read once (3 coalesced loads), its 3-sum kept in registers, and each output
//         adds 3 row sums (4.5 loads per output instead of 9); same divisor as v1
// Geometry in NormParams (N, C, HW, total, act, act_alpha; row plans as norm.py's _row_plan);
// pooling in Pool2dParams (tiles_h = strips of AP_ROWS rows per plane).
// (softmax over contiguous rows, one simdgroup per row, was v2 here: now softmax.metal's
// softmax_rows_*.)
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "neuron.h"
#include "stream.h"
#include "tile_reduce.h"
using namespace metal;

// ---- channel statistics ---------------------------------------------------------------------
// Chunk of W elements -> its Welford partial (W, mean, M2): two passes over registers.
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

template <int W>
inline float chunk_sum(thread const float* v) {
    float s = 0.0f;
    for (int e = 0; e < W; ++e) s += v[e];
    return s;
}

// MODE 0: Welford partial (count, mean, M2, 0) of x per chunk of a channel row (row mode of
// norm.metal: row = channel, p.chunk elements per threadgroup, p.chunks per row).
// MODE 1: (sum x, 0, 0, 0). U chunks of W elements per thread per step.
template <typename T, int MODE, int U>
[[max_total_threads_per_threadgroup(256)]]
kernel void chan_part(device const T* x [[buffer(0)]],
                      device float4* part [[buffer(1)]],
                      constant NormParams& p [[buffer(2)]],
                      uint tid [[thread_position_in_threadgroup]],
                      uint tg [[threadgroup_position_in_grid]],
                      uint ntg [[threadgroups_per_grid]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    const int W = int(16 / sizeof(T));
    const uint cpr = p.HW / uint(W);  // chunks per run (one image's plane of the channel)
    for (uint g = tg; g < p.rows * p.chunks; g += ntg) {
        const uint row = g / p.chunks, ck = g % p.chunks;
        // chunk range of this threadgroup within the row (p.chunk elements, a multiple of W)
        const uint c0 = ck * (p.chunk / uint(W));
        const uint c1 = min(c0 + p.chunk / uint(W), p.row_len / uint(W));
        float4 acc = float4(0.0f);
        for (uint c = c0 + tid; c < c1; c += uint(U) * TR_TG) {
            float v[U][16 / sizeof(T)];
            for (int u = 0; u < U; ++u) {
                const uint cc = min(c + uint(u) * TR_TG, c1 - 1u);
                const uint n = cc / cpr, h = cc - n * cpr;
                // chunk index in x: image n, channel row, chunk h of the plane
                stream_load<16 / sizeof(T)>(x, (n * p.C + row) * cpr + h, v[u]);
            }
            for (int u = 0; u < U; ++u) {
                if (c + uint(u) * TR_TG < c1) {
                    if (MODE == 0) {
                        acc = chan_merge(acc, chunk_welford<16 / sizeof(T)>(v[u]));
                    } else {
                        acc.x += chunk_sum<16 / sizeof(T)>(v[u]);
                    }
                }
            }
        }
        if (MODE == 0) {
            acc = tile_welford(acc, 1u, TR_TG, lane, sg, scratch);
        } else {
            acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        }
        if (tid == 0) part[g] = acc;
    }
}

// out[c] = alpha * sum of row c's partials (fixed order), one threadgroup per row.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void chan_sum_finish(device const float4* part [[buffer(0)]],
                            device T* out [[buffer(1)]],
                            constant NormParams& p [[buffer(2)]],
                            uint tid [[thread_position_in_threadgroup]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint ntg [[threadgroups_per_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float4 scratch[TR_TG];
    for (uint r = tg; r < p.rows; r += ntg) {
        float4 acc = float4(0.0f);
        for (uint k = tid; k < p.chunks; k += TR_TG) acc.x += part[r * p.chunks + k].x;
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) out[r] = T(acc.x * p.eps);  // eps carries alpha here (1, or 1 / count)
    }
}

// ---- channel broadcast ----------------------------------------------------------------------
// y = act(x * w[c] + b[c]) over (N, C, HW), HW % W == 0, every buffer 16-byte aligned;
// p.has_weight / p.has_bias select the terms. Chunks: p.total / W, STREAM_U per thread.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void chan_affine(device const T* x [[buffer(0)]],
                        device const T* w [[buffer(1)]],
                        device const T* b [[buffer(2)]],
                        device T* y [[buffer(3)]],
                        constant NormParams& p [[buffer(4)]],
                        uint gid [[thread_position_in_grid]]) {
    const uint W = 16u / sizeof(T);
    const uint nvec = p.total / W;
    const uint cpp = p.HW / W;  // chunks per plane
    if (gid >= stream_vthreads(nvec)) return;
    float v[STREAM_U][16 / sizeof(T)];
    for (uint u = 0; u < STREAM_U; ++u) {
        stream_load<16 / sizeof(T)>(x, stream_clamp(stream_chunk(gid, u), nvec), v[u]);
    }
    for (uint u = 0; u < STREAM_U; ++u) {
        const uint ch = stream_chunk(gid, u);
        if (ch < nvec) {
            const uint c = (ch / cpp) % p.C;
            const float a = p.has_weight ? float(w[c]) : 1.0f;
            const float d = p.has_bias ? float(b[c]) : 0.0f;
            for (uint e = 0; e < W; ++e) v[u][e] = nn_activation(fma(v[u][e], a, d), p.act, p.act_alpha);
            stream_store<16 / sizeof(T)>(y, ch, v[u]);
        }
    }
}

// ---- avg_pool2d 3x3 stride 1 ------------------------------------------------------------------
// pool.metal's divisor rule for a 3x3 window at stride 1 (torch's: divisor_override, or the window
// clipped to the padded input (count_include_pad), or to the input)
inline float avg_div3(int oh, int ow, constant Pool2dParams& p, thread int4& box) {
    int h0 = oh - p.PH, w0 = ow - p.PW;
    int h1 = min(h0 + 3, int(p.IH) + p.PH), w1 = min(w0 + 3, int(p.IW) + p.PW);
    int padded = (h1 - h0) * (w1 - w0);
    box = int4(max(h0, 0), min(h1, int(p.IH)), max(w0, 0), min(w1, int(p.IW)));
    if (p.divisor != 0u) return float(p.divisor);
    if (p.flags & POOL_COUNT_PAD) return float(padded);
    return float((box.y - box.x) * (box.w - box.z));
}

#define AP_ROWS 4

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void avg_pool3_s1_fwd(device const T* x [[buffer(0)]],
                             device T* y [[buffer(1)]],
                             constant Pool2dParams& p [[buffer(2)]],
                             uint gid [[thread_position_in_grid]]) {
    const uint OW = p.OW, OH = p.OH, IW = p.IW, IH = p.IH;
    const uint rest = gid / OW, ow = gid - rest * OW;
    const uint plane = rest / p.tiles_h, strip = rest - plane * p.tiles_h;
    if (plane >= p.planes) return;
    const int oh0 = int(strip) * AP_ROWS;
    device const T* xp = x + plane * (IH * IW);
    const int w0 = int(ow) - p.PW;
    float hs[AP_ROWS + 2];
    for (int r = 0; r < AP_ROWS + 2; ++r) {
        const int h = oh0 - p.PH + r;
        float a = 0.0f;
        if (h >= 0 && h < int(IH)) {
            for (int s = 0; s < 3; ++s) {
                const int w = w0 + s;
                if (w >= 0 && w < int(IW)) a += float(xp[h * int(IW) + w]);
            }
        }
        hs[r] = a;
    }
    for (int j = 0; j < AP_ROWS; ++j) {
        const int oh = oh0 + j;
        if (oh >= int(OH)) break;
        int4 box;
        const float div = avg_div3(oh, int(ow), p, box);
        const float sum = (box.x >= box.y || box.z >= box.w) ? 0.0f : (hs[j] + hs[j + 1]) + hs[j + 2];
        y[plane * (OH * OW) + uint(oh) * OW + ow] = T(box.x >= box.y || box.z >= box.w ? 0.0f : sum / div);
    }
}

#define MEMBOUND_DEV(T)                                                                           \
    INSTANTIATE("chan_stats_v2_" #T, chan_part, T, 0, 1)                                          \
    INSTANTIATE("chan_stats_v3_" #T, chan_part, T, 0, 2)                                          \
    INSTANTIATE("chan_sum_v2_" #T, chan_part, T, 1, 1)                                            \
    INSTANTIATE("chan_sum_v3_" #T, chan_part, T, 1, 2)                                            \
    INSTANTIATE("chan_sum_finish_" #T, chan_sum_finish, T)                                        \
    INSTANTIATE("chan_affine_v2_" #T, chan_affine, T)                                             \
    INSTANTIATE("avg_pool3_s1_fwd_v2_" #T, avg_pool3_s1_fwd, T)
MEMBOUND_DEV(float)
MEMBOUND_DEV(half)
