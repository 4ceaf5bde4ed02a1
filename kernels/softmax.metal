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
// Storage is float or half; every reduction and all arithmetic run in float.
#include <metal_stdlib>
#include "params.h"
#include "tile_reduce.h"
using namespace metal;

// SM_CACHE (params.h): floats of tile cache per threadgroup (16 KB)

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
            for (uint l = t.s; l < L; l += t.S) {
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
            for (uint l = t.s; l < L; l += t.S) {
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

#define SM_INSTANTIATE(T)                                                                     \
    template [[host_name("softmax_fwd_" #T)]] [[kernel]] decltype(softmax_fwd<T, 0>)          \
        softmax_fwd<T, 0>;                                                                    \
    template [[host_name("log_softmax_fwd_" #T)]] [[kernel]] decltype(softmax_fwd<T, 1>)      \
        softmax_fwd<T, 1>;                                                                    \
    template [[host_name("softmax_bwd_" #T)]] [[kernel]] decltype(softmax_bwd<T, 0>)          \
        softmax_bwd<T, 0>;                                                                    \
    template [[host_name("log_softmax_bwd_" #T)]] [[kernel]] decltype(softmax_bwd<T, 1>)      \
        softmax_bwd<T, 1>;

SM_INSTANTIATE(float)
SM_INSTANTIATE(half)
