// softmax.metal -- softmax and log_softmax over one axis, forward and backward.
//
// Design: the tensor is viewed as (outer, len, inner) and reduced over len. One tile (see
// tile_reduce.h) owns W consecutive inner positions of one outer index: its lanes read W
// neighbouring elements (coalesced even when the axis is strided, as the channel axis of NCHW),
// its S slices walk the axis. Forward is two reductions (max, then the sum of exp(x - max)) and a
// write; the values a thread reads stay in threadgroup memory when the tile fits (`cached`), so
// the input is read from memory once and the op is bound by one read and one write, like a copy.
// A thread only ever touches its own cache entries, so the cache needs no barriers. Tiles too
// long for the cache re-read their input (from L1/L2, as the same threadgroup just read it).
// Backward takes the forward's OUTPUT y (as PyTorch's autograd does):
//   softmax:     dx = y * (dy - sum(dy * y))
//   log_softmax: dx = dy - exp(y) * sum(dy)
// Rows (the axis innermost, e.g. (N, classes) logits) of up to 32 SM_ROW_CHUNKS 16-byte chunks
// take the row kernels instead (end of file): one simdgroup per row, the row in registers. On
// the cpu backend, float32 rows take softmax_seq_* (one thread per row, any length) instead.
// Storage is float or half; every reduction and all arithmetic run in float.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "stream.h"
#include "tile_reduce.h"
using namespace metal;

// SM_CACHE (params.h): floats of tile cache per threadgroup (16 KB)
// The tile kernels' first pass issues SM_UN loads per thread before using them (a thread had
// one load in flight at a time), accumulating in the same order: the same results.
#define SM_UN 4u

// Forward. LOG = 0: y = exp(x - m) / sum; LOG = 1: y = x - m - log(sum).
template <typename T, int LOG>
[[max_total_threads_per_threadgroup(256)]]
kernel void softmax_fwd(device const T* x [[buffer(0)]],
                        device T* y [[buffer(1)]],
                        constant SoftmaxParams& p [[buffer(2)]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint tg [[threadgroup_position_in_grid]],
                        uint ntg [[threadgroups_per_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float cache[SM_CACHE];
    threadgroup float scratch[TR_TG];
    TilePos t = tile_pos(p.W, p.SW, tid);
    const uint L = p.len, inner = p.inner;
    threadgroup float* cp = cache + t.r * (L * p.W) + t.w;
    // grid-stride over groups of R tiles; the trip count is uniform across the threadgroup
    for (uint base = tg * t.R; base < p.ntiles; base += ntg * t.R) {
        uint tile = base + t.r;
        uint o = tile / p.wblocks;
        uint i = (tile % p.wblocks) * p.W + t.w;
        bool col = tile < p.ntiles && i < inner;
        uint off = o * L * inner + i;
        float m = -INFINITY;
        if (col) {
            // SM_UN loads issued together, then used in the same order as one at a time
            uint l = t.s;
            for (; l + (SM_UN - 1u) * t.S < L; l += SM_UN * t.S) {
                float v[SM_UN];
                for (uint u = 0; u < SM_UN; ++u) v[u] = float(x[off + (l + u * t.S) * inner]);
                for (uint u = 0; u < SM_UN; ++u) {
                    if (p.cached) cp[(l + u * t.S) * p.W] = v[u];
                    m = max(m, v[u]);
                }
            }
            for (; l < L; l += t.S) {
                float v = float(x[off + l * inner]);
                if (p.cached) cp[l * p.W] = v;
                m = max(m, v);
            }
        }
        m = tile_reduce(m, TR_MAX, p.W, p.SW, lane, sg, scratch);
        float sum = 0.0f;
        if (col) {
            for (uint l = t.s; l < L; l += t.S) {
                float v = p.cached ? cp[l * p.W] : float(x[off + l * inner]);
                float e = precise::exp(v - m);
                if (LOG == 0 && p.cached) cp[l * p.W] = e;
                sum += e;
            }
        }
        sum = tile_reduce(sum, TR_SUM, p.W, p.SW, lane, sg, scratch);
        if (col) {
            if (LOG) {
                float lse = precise::log(sum);
                for (uint l = t.s; l < L; l += t.S) {
                    float v = p.cached ? cp[l * p.W] : float(x[off + l * inner]);
                    y[off + l * inner] = T((v - m) - lse);
                }
            } else {
                float inv = 1.0f / sum;
                for (uint l = t.s; l < L; l += t.S) {
                    float e = p.cached ? cp[l * p.W] : precise::exp(float(x[off + l * inner]) - m);
                    y[off + l * inner] = T(e * inv);
                }
            }
        }
    }
}

// Backward from the output y. LOG = 0 caches y and dy (two arrays: `cached` is set by the host
// only when both fit); LOG = 1 caches dy and reads y once.
template <typename T, int LOG>
[[max_total_threads_per_threadgroup(256)]]
kernel void softmax_bwd(device const T* dy [[buffer(0)]],
                        device const T* y [[buffer(1)]],
                        device T* dx [[buffer(2)]],
                        constant SoftmaxParams& p [[buffer(3)]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint tg [[threadgroup_position_in_grid]],
                        uint ntg [[threadgroups_per_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float cache[SM_CACHE];
    threadgroup float scratch[TR_TG];
    TilePos t = tile_pos(p.W, p.SW, tid);
    const uint L = p.len, inner = p.inner;
    threadgroup float* cg = cache + t.r * (L * p.W) + t.w;     // dy
    threadgroup float* cy = cg + t.R * (L * p.W);               // y (LOG == 0)
    for (uint base = tg * t.R; base < p.ntiles; base += ntg * t.R) {
        uint tile = base + t.r;
        uint o = tile / p.wblocks;
        uint i = (tile % p.wblocks) * p.W + t.w;
        bool col = tile < p.ntiles && i < inner;
        uint off = o * L * inner + i;
        float acc = 0.0f;
        if (col) {
            uint l = t.s;
            for (; l + (SM_UN - 1u) * t.S < L; l += SM_UN * t.S) {
                float gv[SM_UN], yv[SM_UN];
                for (uint u = 0; u < SM_UN; ++u) {
                    gv[u] = float(dy[off + (l + u * t.S) * inner]);
                    if (!LOG) yv[u] = float(y[off + (l + u * t.S) * inner]);
                }
                for (uint u = 0; u < SM_UN; ++u) {
                    const uint lu = l + u * t.S;
                    if (LOG) {
                        acc += gv[u];
                    } else {
                        acc += gv[u] * yv[u];
                        if (p.cached) cy[lu * p.W] = yv[u];
                    }
                    if (p.cached) cg[lu * p.W] = gv[u];
                }
            }
            for (; l < L; l += t.S) {
                float g = float(dy[off + l * inner]);
                if (LOG) {
                    acc += g;
                } else {
                    float v = float(y[off + l * inner]);
                    acc += g * v;
                    if (p.cached) cy[l * p.W] = v;
                }
                if (p.cached) cg[l * p.W] = g;
            }
        }
        acc = tile_reduce(acc, TR_SUM, p.W, p.SW, lane, sg, scratch);
        if (col) {
            for (uint l = t.s; l < L; l += t.S) {
                float g = p.cached ? cg[l * p.W] : float(dy[off + l * inner]);
                float r;
                if (LOG) {
                    r = g - precise::exp(float(y[off + l * inner])) * acc;
                } else {
                    float v = p.cached ? cy[l * p.W] : float(y[off + l * inner]);
                    r = v * (g - acc);
                }
                dx[off + l * inner] = T(r);
            }
        }
    }
}

// ---- contiguous rows (inner == 1): one simdgroup per row --------------------------------------
// The host takes these when the axis is the innermost (e.g. (N, classes) logits), its length a
// multiple of W = 16 / sizeof(T) and at most 32 SM_ROW_CHUNKS W (1024 float, 2048 half), and the
// buffers are 16-byte aligned: each lane loads its SM_ROW_CHUNKS 16-byte chunks at once and keeps
// them in registers, and the reductions are simd_max / simd_sum: no threadgroup memory, no
// barrier, and every load of the row in flight together (the tile kernels above run a 256-thread
// tile per row through threadgroup memory with four barriers, a few scalar loads per thread).
// One simdgroup per row: params outer = rows, len; launched with rows * 32 threads.

template <typename T, int LOG>
[[max_total_threads_per_threadgroup(256)]]
kernel void softmax_rows_fwd(device const T* x [[buffer(0)]],
                             device T* y [[buffer(1)]],
                             constant SoftmaxParams& p [[buffer(2)]],
                             uint gid [[thread_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]]) {
    const uint W = 16u / sizeof(T);
    const uint row = gid / 32u;  // uniform across the simdgroup
    if (row >= p.outer) return;
    const uint nv = p.len / W, base = row * nv;
    float v[SM_ROW_CHUNKS][16 / sizeof(T)];
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) stream_load<16 / sizeof(T)>(x, base + min(lane + 32u * c, nv - 1u), v[c]);
    float m = -INFINITY;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) m = max(m, v[c][e]);
        }
    }
    m = simd_max(m);
    float s = 0.0f;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) {
                const float ex = precise::exp(v[c][e] - m);
                if (!LOG) v[c][e] = ex;
                s += ex;
            }
        }
    }
    s = simd_sum(s);
    const float k = LOG ? precise::log(s) : 1.0f / s;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) v[c][e] = LOG ? (v[c][e] - m) - k : v[c][e] * k;
            stream_store<16 / sizeof(T)>(y, base + lane + 32u * c, v[c]);
        }
    }
}

// Backward from the output y: softmax dx = y (dy - sum dy y); log_softmax dx = dy - exp(y) sum dy.
template <typename T, int LOG>
[[max_total_threads_per_threadgroup(256)]]
kernel void softmax_rows_bwd(device const T* dy [[buffer(0)]],
                             device const T* y [[buffer(1)]],
                             device T* dx [[buffer(2)]],
                             constant SoftmaxParams& p [[buffer(3)]],
                             uint gid [[thread_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]]) {
    const uint W = 16u / sizeof(T);
    const uint row = gid / 32u;
    if (row >= p.outer) return;
    const uint nv = p.len / W, base = row * nv;
    float g[SM_ROW_CHUNKS][16 / sizeof(T)], v[SM_ROW_CHUNKS][16 / sizeof(T)];
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        const uint ch = base + min(lane + 32u * c, nv - 1u);
        stream_load<16 / sizeof(T)>(dy, ch, g[c]);
        stream_load<16 / sizeof(T)>(y, ch, v[c]);
    }
    float s = 0.0f;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) s += LOG ? g[c][e] : g[c][e] * v[c][e];
        }
    }
    s = simd_sum(s);
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) {
                g[c][e] = LOG ? g[c][e] - precise::exp(v[c][e]) * s : v[c][e] * (g[c][e] - s);
            }
            stream_store<16 / sizeof(T)>(dx, base + lane + 32u * c, g[c]);
        }
    }
}

// ---- contiguous rows, one thread per row (the cpu backend's pick) ---------------------------
// Same host conditions as the row kernels above but any length. A work item walks its row in
// 16-byte chunks with W running maxima and sums (combined in a fixed order at the end): the
// C++ compiler turns each pass into vector instructions, where the simdgroup row kernels run as
// 32-lane work-item loops with per-lane chunk arrays (log_softmax over 256x1000 on one cpu
// worker: about 2 ms). On a GPU the simdgroup kernels win (one thread per row serializes the
// row). Three passes over x for the forward (max; sum of exp; the output, exp recomputed so
// that fp16 rounds once), two for the backward (the sum; the gradient); `outer` threads.
template <typename T, int LOG>
[[max_total_threads_per_threadgroup(32)]]
kernel void softmax_seq_fwd(device const T* x [[buffer(0)]],
                            device T* y [[buffer(1)]],
                            constant SoftmaxParams& p [[buffer(2)]],
                            uint gid [[thread_position_in_grid]]) {
    constexpr int W = 16 / sizeof(T);
    if (gid >= p.outer) return;
    const uint nv = p.len / uint(W), base = gid * nv;
    float v[W], mw[W], sw[W];
    for (int e = 0; e < W; ++e) {
        mw[e] = -INFINITY;
        sw[e] = 0.0f;
    }
    for (uint c = 0; c < nv; ++c) {
        stream_load<W>(x, base + c, v);
        // a select, not max(): it vectorizes on cpu (max's NaN and signed-zero rules are
        // branches there); the same results: a NaN element is skipped by both, and a maximum
        // of -0 or +0 gives the same v - m, exp and log-softmax
        for (int e = 0; e < W; ++e) mw[e] = v[e] > mw[e] ? v[e] : mw[e];
    }
    float m = mw[0];
    for (int e = 1; e < W; ++e) m = max(m, mw[e]);
    // float softmax keeps each exp in y and scales it in the last pass (one exp per element, not
    // two: y holds the float exactly, so the same results); half would round it there
    const bool keep = !LOG && sizeof(T) == 4;
    for (uint c = 0; c < nv; ++c) {
        stream_load<W>(x, base + c, v);
        for (int e = 0; e < W; ++e) {
            v[e] = precise::exp(v[e] - m);
            sw[e] += v[e];
        }
        if (keep) stream_store<W>(y, base + c, v);
    }
    float s = sw[0];
    for (int e = 1; e < W; ++e) s += sw[e];
    const float k = LOG ? precise::log(s) : 1.0f / s;
    for (uint c = 0; c < nv; ++c) {
        stream_load<W>(keep ? (device const T*)y : x, base + c, v);
        for (int e = 0; e < W; ++e) {
            v[e] = keep ? v[e] * k : (LOG ? (v[e] - m) - k : precise::exp(v[e] - m) * k);
        }
        stream_store<W>(y, base + c, v);
    }
}

template <typename T, int LOG>
[[max_total_threads_per_threadgroup(32)]]
kernel void softmax_seq_bwd(device const T* dy [[buffer(0)]],
                            device const T* y [[buffer(1)]],
                            device T* dx [[buffer(2)]],
                            constant SoftmaxParams& p [[buffer(3)]],
                            uint gid [[thread_position_in_grid]]) {
    constexpr int W = 16 / sizeof(T);
    if (gid >= p.outer) return;
    const uint nv = p.len / uint(W), base = gid * nv;
    float g[W], v[W], sw[W];
    for (int e = 0; e < W; ++e) sw[e] = 0.0f;
    for (uint c = 0; c < nv; ++c) {
        stream_load<W>(dy, base + c, g);
        if (!LOG) stream_load<W>(y, base + c, v);
        for (int e = 0; e < W; ++e) sw[e] += LOG ? g[e] : g[e] * v[e];
    }
    float s = sw[0];
    for (int e = 1; e < W; ++e) s += sw[e];
    for (uint c = 0; c < nv; ++c) {
        stream_load<W>(dy, base + c, g);
        stream_load<W>(y, base + c, v);
        for (int e = 0; e < W; ++e) {
            g[e] = LOG ? g[e] - precise::exp(v[e]) * s : v[e] * (g[e] - s);
        }
        stream_store<W>(dx, base + c, g);
    }
}

#define SM_INSTANTIATE(T)                                                                     \
    INSTANTIATE("softmax_fwd_" #T, softmax_fwd, T, 0)                                         \
    INSTANTIATE("log_softmax_fwd_" #T, softmax_fwd, T, 1)                                     \
    INSTANTIATE("softmax_bwd_" #T, softmax_bwd, T, 0)                                         \
    INSTANTIATE("log_softmax_bwd_" #T, softmax_bwd, T, 1)                                     \
    INSTANTIATE("softmax_fwd_rows_" #T, softmax_rows_fwd, T, 0)                               \
    INSTANTIATE("log_softmax_fwd_rows_" #T, softmax_rows_fwd, T, 1)                           \
    INSTANTIATE("softmax_bwd_rows_" #T, softmax_rows_bwd, T, 0)                               \
    INSTANTIATE("log_softmax_bwd_rows_" #T, softmax_rows_bwd, T, 1)                           \
    INSTANTIATE("softmax_fwd_seq_" #T, softmax_seq_fwd, T, 0)                                 \
    INSTANTIATE("log_softmax_fwd_seq_" #T, softmax_seq_fwd, T, 1)                             \
    INSTANTIATE("softmax_bwd_seq_" #T, softmax_seq_bwd, T, 0)                                 \
    INSTANTIATE("log_softmax_bwd_seq_" #T, softmax_seq_bwd, T, 1)

SM_INSTANTIATE(float)
SM_INSTANTIATE(half)
