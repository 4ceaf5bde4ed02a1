// loss.metal -- MPS's loss set, forward (loss value) and fused backward (gradient w.r.t. the
// network output), with per-sample weights and the reductions none / per-sample / sum / mean /
// sum-by-nonzero-weights.
//
// Design. Two shapes of loss:
//  * pointwise (MSE, L1, Huber, sigmoid CE with logits, hinge, KL, log loss): the loss of every
//    element. Forward threadgroups each own a chunk of one segment (a sample, or the whole
//    tensor) and write either the elements' losses (reduction none) or one partial sum and the
//    chunk's term counts; loss_reduce then adds a segment's partials in a fixed order, so results
//    are deterministic (no float atomics). Backward is element-wise.
//  * class-axis (softmax cross-entropy, categorical cross-entropy, cosine distance): one term per
//    (sample, position), reduced over the class axis (dim 1) with softmax.metal's tile plan
//    (tile_reduce.h): the logits are read once into threadgroup memory when the tile fits, the
//    max and the shifted sums come from two tile reductions, and the term's value, weight and
//    counts are written per position (N*H*W values, 1/C of the input) for loss_reduce.
//    Softmax cross-entropy on (N, C) logits with integer labels has row kernels too (ce_rows_*,
//    softmax.metal's row layout: one simdgroup per row, the row in registers).
// Softmax cross-entropy works from the max-shifted logits (log s - sum t' (x - m)), never from
// lse * sum(t') - sum(t' x), which cancels catastrophically for large logits.
// A term whose weight is 0 (or whose label is ignore_index) contributes exactly 0 to the loss and
// the gradient, even where its unweighted loss is inf or NaN.
// The backward kernels take their upstream coefficient from g: g[0] (a scalar reduction; the
// host's loss_scale launch has already divided it by the count of a mean), g[n] (per sample) or
// g[term] (reduction none).
// torch's options: pointwise `weight` (one per element, host-broadcast, in place of the per-sample
// weights), bce's `pos_weight` (one per element) and the class-axis `weight` (one per class,
// multiplying t'_c: the loss is sum_c w_c t'_c (lse - x_c)); a mean over labels with class weights
// divides by sum w[label] (loss_scale). Pointwise backwards also give d loss / d target
// (target_grad), as torch differentiates the target of these losses.
// Storage float or half; every sum and every loss is computed in float, losses are stored float.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "stream.h"
#include "tile_reduce.h"
using namespace metal;

#define LOSS_CACHE SM_CACHE  // floats of logit cache per threadgroup (params.h)

// pointwise kinds
#define L_MSE 0
#define L_L1 1
#define L_HUBER 2
#define L_BCE 3     // sigmoid cross-entropy with logits
#define L_HINGE 4
#define L_KL 5
#define L_LOG 6
#define L_SL1 7     // smooth L1 (beta in p.a)
// class-axis kinds
#define L_CE 10     // softmax cross-entropy on logits
#define L_CCE 11    // categorical cross-entropy on probabilities
#define L_COS 12    // cosine distance

// log(1 + u) for u in [0, 1], accurate for tiny u (Goldberg's correction), without log1p.
inline float log1p_acc(float u) {
    float v = 1.0f + u;
    return v == 1.0f ? u : precise::log(v) * (u / (v - 1.0f));
}

inline float sigmoid_acc(float x) {
    if (x >= 0.0f) return 1.0f / (1.0f + precise::exp(-x));
    float e = precise::exp(x);
    return e / (1.0f + e);
}

// softplus(-x) = log(1 + exp(-x)), stable for both signs
inline float softplus_neg(float x) { return max(-x, 0.0f) + log1p_acc(precise::exp(-fabs(x))); }

inline float pw_loss(int kind, float x, float t, float pw, constant LossParams& p) {
    float d = x - t;
    if (kind == L_MSE) return d * d;
    if (kind == L_L1) return fabs(d);
    if (kind == L_HUBER) {
        float a = fabs(d);
        return a < p.a ? 0.5f * d * d : p.a * (a - 0.5f * p.a);
    }
    if (kind == L_SL1) {
        float a = fabs(d);
        return a < p.a ? 0.5f * d * d / p.a : a - 0.5f * p.a;
    }
    if (kind == L_BCE) {
        float ts = t * (1.0f - p.smoothing) + 0.5f * p.smoothing;
        if (p.has_pos_weight) return (1.0f - ts) * x + (1.0f + (pw - 1.0f) * ts) * softplus_neg(x);
        return max(x, 0.0f) - x * ts + log1p_acc(precise::exp(-fabs(x)));
    }
    if (kind == L_HINGE) return max(0.0f, 1.0f - (2.0f * t - 1.0f) * x);
    if (kind == L_KL) {
        if (p.a != 0.0f) return precise::exp(t) * (t - x);
        return (t == 0.0f ? 0.0f : t * precise::log(t)) - t * x;  // torch's xlogy(t, t) - t x
    }
    // L_LOG
    return -t * precise::log(x + p.a) - (1.0f - t) * precise::log(1.0f - x + p.a);
}

inline float pw_grad(int kind, float x, float t, float pw, constant LossParams& p) {
    float d = x - t;
    if (kind == L_MSE) return 2.0f * d;
    if (kind == L_L1) return sign(d);
    if (kind == L_HUBER) return clamp(d, -p.a, p.a);
    if (kind == L_SL1) return fabs(d) < p.a ? d / p.a : sign(d);
    if (kind == L_BCE) {
        float ts = t * (1.0f - p.smoothing) + 0.5f * p.smoothing;
        if (p.has_pos_weight) return (1.0f + (pw - 1.0f) * ts) * sigmoid_acc(x) - pw * ts;
        return sigmoid_acc(x) - ts;
    }
    if (kind == L_HINGE) {
        float y = 2.0f * t - 1.0f;
        return 1.0f - y * x > 0.0f ? -y : 0.0f;
    }
    if (kind == L_KL) return p.a != 0.0f ? -precise::exp(t) : -t;
    return -t / (x + p.a) + (1.0f - t) / (1.0f - x + p.a);
}

// d l / d t where torch differentiates the target (0 for the MPS-only hinge and log losses,
// whose host wrappers do not ask for it). kl_div at t = 0 is NaN, as torch's xlogy(t, t) gives.
inline float pw_grad_target(int kind, float x, float t, float pw, constant LossParams& p) {
    float d = x - t;
    if (kind == L_MSE) return -2.0f * d;
    if (kind == L_L1) return -sign(d);
    if (kind == L_HUBER) return -clamp(d, -p.a, p.a);
    if (kind == L_SL1) return fabs(d) < p.a ? -d / p.a : -sign(d);
    if (kind == L_BCE) {
        float s = 1.0f - p.smoothing;
        return p.has_pos_weight ? s * (-x + (pw - 1.0f) * softplus_neg(x)) : -s * x;
    }
    if (kind == L_KL) {
        if (p.a != 0.0f) return precise::exp(t) * (t - x + 1.0f);
        return (t != 0.0f ? precise::log(t) : 0.0f) + t / t - x;
    }
    return 0.0f;
}

// ---- pointwise ------------------------------------------------------------------------------
// out: the elements' weighted losses (reduce == 0), else one partial sum per chunk; cnt: the
// chunk's (terms, terms of nonzero weight).
template <typename T, int K>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_pw_fwd(device const T* x [[buffer(0)]],
                        device const T* t [[buffer(1)]],
                        device const float* sw [[buffer(2)]],
                        device float* out [[buffer(3)]],
                        device uint2* cnt [[buffer(4)]],
                        device const float* pw [[buffer(5)]],
                        constant LossParams& p [[buffer(6)]],
                        uint tid [[thread_position_in_threadgroup]],
                        uint tg [[threadgroup_position_in_grid]],
                        uint ntg [[threadgroups_per_grid]],
                        uint lane [[thread_index_in_simdgroup]],
                        uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float2 scratch[TR_TG];
    for (uint g = tg; g < p.ngroups; g += ntg) {
        uint seg = g / p.chunks, c = g % p.chunks;
        uint lo = seg * p.seglen + c * p.chunk;
        uint hi = seg * p.seglen + min((c + 1u) * p.chunk, p.seglen);
        float2 acc = float2(0.0f);  // (sum, terms of nonzero weight); exact: a chunk < 2^24
        for (uint i = lo + tid; i < hi; i += TR_TG) {
            float w = p.has_weight ? sw[p.elem_weight ? i : i / p.M] : 1.0f;
            float l = w == 0.0f ? 0.0f
                                : w * pw_loss(K, float(x[i]), float(t[i]),
                                              p.has_pos_weight ? pw[i] : 1.0f, p);
            if (p.reduce) {
                acc += float2(l, w != 0.0f ? 1.0f : 0.0f);
            } else {
                out[i] = l;
            }
        }
        if (p.reduce) {
            acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
            if (tid == 0) {
                out[g] = acc.x;
                cnt[g] = uint2(hi - lo, uint(acc.y));
            }
        }
    }
}

template <typename T, int K>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_pw_bwd(device const float* g [[buffer(0)]],
                        device const T* x [[buffer(1)]],
                        device const T* t [[buffer(2)]],
                        device const float* sw [[buffer(3)]],
                        device T* dx [[buffer(4)]],
                        device const float* pw [[buffer(5)]],
                        device T* dt [[buffer(6)]],
                        constant LossParams& p [[buffer(7)]],
                        uint gid [[thread_position_in_grid]],
                        uint ntg [[threadgroups_per_grid]]) {
    for (uint i = gid; i < p.total; i += ntg * TR_TG) {
        uint n = i / p.M;
        float w = p.has_weight ? sw[p.elem_weight ? i : n] : 1.0f;
        float r = 0.0f, rt = 0.0f;
        if (w != 0.0f) {
            float c = p.gmode == LOSS_G_SCALAR ? g[0]
                    : (p.gmode == LOSS_G_PER_SAMPLE ? g[n] : g[i]);
            float xi = float(x[i]), ti = float(t[i]), pwi = p.has_pos_weight ? pw[i] : 1.0f;
            r = c * w * pw_grad(K, xi, ti, pwi, p);
            if (p.target_grad) rt = c * w * pw_grad_target(K, xi, ti, pwi, p);
        }
        dx[i] = T(r);
        if (p.target_grad) dt[i] = T(rt);
    }
}

// loss_pw_bwd in the stream.h shape (host: M >= W = 16 / sizeof(T), every
// buffer read or written per element 16-byte aligned; p.reduce carries nvec here): 16-byte chunks
// of x and t (and of the per-element weights, pos_weight and per-term g when present), STREAM_U
// per thread, one sample lookup (division) per chunk instead of per element: a chunk meets at
// most two samples n0 and n0 + 1 (the first in_n elements in n0). Per element the same
// arithmetic as loss_pw_bwd, so the same bits; a scalar tail.
template <typename T, int K>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_pw_bwd_vec(device const float* g [[buffer(0)]],
                            device const T* x [[buffer(1)]],
                            device const T* t [[buffer(2)]],
                            device const float* sw [[buffer(3)]],
                            device T* dx [[buffer(4)]],
                            device const float* pw [[buffer(5)]],
                            device T* dt [[buffer(6)]],
                            constant LossParams& p [[buffer(7)]],
                            uint gid [[thread_position_in_grid]]) {
    const uint W = 16u / sizeof(T);
    const uint nvec = p.reduce;
    const uint vthreads = stream_vthreads(nvec);
    if (gid >= vthreads) {  // tail: element W nvec + j, as loss_pw_bwd
        const uint i = nvec * W + (gid - vthreads);
        if (i < p.total) {
            uint n = i / p.M;
            float w = p.has_weight ? sw[p.elem_weight ? i : n] : 1.0f;
            float r = 0.0f, rt = 0.0f;
            if (w != 0.0f) {
                float c = p.gmode == LOSS_G_SCALAR ? g[0]
                        : (p.gmode == LOSS_G_PER_SAMPLE ? g[n] : g[i]);
                float xi = float(x[i]), ti = float(t[i]), pwi = p.has_pos_weight ? pw[i] : 1.0f;
                r = c * w * pw_grad(K, xi, ti, pwi, p);
                if (p.target_grad) rt = c * w * pw_grad_target(K, xi, ti, pwi, p);
            }
            dx[i] = T(r);
            if (p.target_grad) dt[i] = T(rt);
        }
        return;
    }
    const bool ew = p.has_weight && p.elem_weight;
    const bool gt = p.gmode != LOSS_G_SCALAR && p.gmode != LOSS_G_PER_SAMPLE;
    float xv[STREAM_U][16 / sizeof(T)], tv[STREAM_U][16 / sizeof(T)];
    float wv[STREAM_U][16 / sizeof(T)], pv[STREAM_U][16 / sizeof(T)], gv[STREAM_U][16 / sizeof(T)];
#pragma unroll
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_clamp(stream_chunk(gid, s), nvec);
        stream_load<16 / sizeof(T)>(x, ch, xv[s]);
        stream_load<16 / sizeof(T)>(t, ch, tv[s]);
        if (ew) stream_load<16 / sizeof(T)>(sw, ch, wv[s]);
        if (p.has_pos_weight) stream_load<16 / sizeof(T)>(pw, ch, pv[s]);
        if (gt) stream_load<16 / sizeof(T)>(g, ch, gv[s]);
    }
#pragma unroll
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_chunk(gid, s);
        if (ch < nvec) {
            const uint i0 = ch * W, n0 = i0 / p.M, in_n = (n0 + 1u) * p.M - i0;
            float r[16 / sizeof(T)], rt[16 / sizeof(T)];
#pragma unroll
            for (uint e = 0; e < W; ++e) {
                const uint n = e < in_n ? n0 : n0 + 1u;
                float w = p.has_weight ? (p.elem_weight ? wv[s][e] : sw[n]) : 1.0f;
                r[e] = 0.0f;
                rt[e] = 0.0f;
                if (w != 0.0f) {
                    float c = p.gmode == LOSS_G_SCALAR ? g[0]
                            : (p.gmode == LOSS_G_PER_SAMPLE ? g[n] : gv[s][e]);
                    float pwi = p.has_pos_weight ? pv[s][e] : 1.0f;
                    r[e] = c * w * pw_grad(K, xv[s][e], tv[s][e], pwi, p);
                    if (p.target_grad) rt[e] = c * w * pw_grad_target(K, xv[s][e], tv[s][e], pwi, p);
                }
            }
            stream_store<16 / sizeof(T)>(dx, ch, r);
            if (p.target_grad) stream_store<16 / sizeof(T)>(dt, ch, rt);
        }
    }
}

// loss_pw_bwd_vec for the plain case (host: no weights, no pos_weight, one scalar incoming
// gradient: a mean or sum loss): the scalar read once before the chunks, every chunk of x and t
// loaded before any result is stored, no per-element branch; the same arithmetic per element
// (c w pw_grad with w = 1: c pw_grad, the same bits). In loss_pw_bwd_vec the optional streams'
// runtime guards split the loads into separate blocks and g[0] was re-read after each chunk's
// stores (a float dx may alias g): mse_loss_bwd ran at 0.61 of the copy bandwidth on an H100
// where a same-shape add, the same three streams, runs at 1.0.
template <typename T, int K>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_pw_bwd_plain(device const float* g [[buffer(0)]],
                              device const T* x [[buffer(1)]],
                              device const T* t [[buffer(2)]],
                              device const float* sw [[buffer(3)]],
                              device T* dx [[buffer(4)]],
                              device const float* pw [[buffer(5)]],
                              device T* dt [[buffer(6)]],
                              constant LossParams& p [[buffer(7)]],
                              uint gid [[thread_position_in_grid]]) {
    const uint W = 16u / sizeof(T);
    const uint nvec = p.reduce;
    const uint vthreads = stream_vthreads(nvec);
    const float c = g[0];
    const bool tg = p.target_grad != 0u;
    if (gid >= vthreads) {  // tail: element W nvec + j
        const uint i = nvec * W + (gid - vthreads);
        if (i < p.total) {
            const float xi = float(x[i]), ti = float(t[i]);
            dx[i] = T(c * pw_grad(K, xi, ti, 1.0f, p));
            if (tg) dt[i] = T(c * pw_grad_target(K, xi, ti, 1.0f, p));
        }
        return;
    }
    // every loop unrolled: the per-element arrays stay in registers (a loss with exp / log in
    // its gradient was too large for the cuda compiler to unroll on its own, and indexed them
    // in local memory)
    float xv[STREAM_U][16 / sizeof(T)], tv[STREAM_U][16 / sizeof(T)];
#pragma unroll
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_clamp(stream_chunk(gid, s), nvec);
        stream_load<16 / sizeof(T)>(x, ch, xv[s]);
        stream_load<16 / sizeof(T)>(t, ch, tv[s]);
    }
#pragma unroll
    for (uint s = 0; s < STREAM_U; ++s) {
        const uint ch = stream_chunk(gid, s);
        if (ch < nvec) {
            float r[16 / sizeof(T)], rt[16 / sizeof(T)];
#pragma unroll
            for (uint e = 0; e < W; ++e) {
                r[e] = c * pw_grad(K, xv[s][e], tv[s][e], 1.0f, p);
                rt[e] = tg ? c * pw_grad_target(K, xv[s][e], tv[s][e], 1.0f, p) : 0.0f;
            }
            stream_store<16 / sizeof(T)>(dx, ch, r);
            if (tg) stream_store<16 / sizeof(T)>(dt, ch, rt);
        }
    }
}

// ---- class-axis -----------------------------------------------------------------------------
// Smoothed target of class c: labels give (1 - eps) [c == y] + eps / C, probabilities
// t (1 - eps) + eps / C.
inline float smooth_label(uint c, int y, float eps, float C) {
    return (int(c) == y ? 1.0f - eps : 0.0f) + eps / C;
}

// The max over a tile's slice of the class axis (x at off + l * inner, l = t.s, t.s + t.S, ...),
// the values cached when q.cached. Four loads are issued before they are used (one at a time
// left a thread one load in flight), taken in the same order: the same result.
template <typename T>
inline float cls_max_pass(device const T* x, uint off, uint inner, uint C, TilePos t,
                          constant SoftmaxParams& q, threadgroup float* cp) {
    float m = -INFINITY;
    uint l = t.s;
    for (; l + 3u * t.S < C; l += 4u * t.S) {
        float v[4];
        for (uint u = 0; u < 4u; ++u) v[u] = float(x[off + (l + u * t.S) * inner]);
        for (uint u = 0; u < 4u; ++u) {
            if (q.cached) cp[(l + u * t.S) * q.W] = v[u];
            m = max(m, v[u]);
        }
    }
    for (; l < C; l += t.S) {
        float v = float(x[off + l * inner]);
        if (q.cached) cp[l * q.W] = v;
        m = max(m, v);
    }
    return m;
}

// Labels are checked here, not by a host pass over them (which for labels on the device is a
// read-back): a label outside [0, C) that is not ignore_index is recorded in `status` (flag 1,
// the label, C, ignore_index; ops/loss.py's check reads and clears it after the kernel, and the
// call fails naming the label) and treated as ignored, so no read leaves the logits or weights.
inline bool label_in_range(int y, uint C, int ignore_index, device int* status) {
    if (y >= 0 && uint(y) < C) return true;
    status[1] = y;
    status[2] = int(C);
    status[3] = ignore_index;
    status[0] = 1;
    return false;
}

// LABELS: 1 = int labels (N, H*W), 0 = probability targets shaped like x. terms[k], cnt[k] per
// position k = n * M + i: the weighted loss and (valid, valid with nonzero weight).
template <typename T, int K, int LABELS>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_cls_fwd(device const T* x [[buffer(0)]],
                         device const T* tp [[buffer(1)]],
                         device const int* labels [[buffer(2)]],
                         device const float* sw [[buffer(3)]],
                         device float* terms [[buffer(4)]],
                         device uint2* cnt [[buffer(5)]],
                         constant LossParams& p [[buffer(6)]],
                         constant SoftmaxParams& q [[buffer(7)]],
                         device const float* cw [[buffer(8)]],
                         device int* status [[buffer(9)]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint tg [[threadgroup_position_in_grid]],
                         uint ntg [[threadgroups_per_grid]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float cache[LOSS_CACHE];
    threadgroup float scratch[TR_TG];
    threadgroup float4 scratch4[TR_TG];
    TilePos t = tile_pos(q.W, q.SW, tid);
    const uint C = q.len, inner = q.inner;
    const float Cf = float(C), eps = p.smoothing;
    threadgroup float* cp = cache + t.r * (C * q.W) + t.w;
    for (uint base = tg * t.R; base < q.ntiles; base += ntg * t.R) {
        uint tile = base + t.r;
        uint o = tile / q.wblocks;
        uint i = (tile % q.wblocks) * q.W + t.w;
        bool col = tile < q.ntiles && i < inner;
        uint off = o * C * inner + i;
        uint k = o * inner + i;
        int y = 0;
        bool valid = col;
        if (LABELS && col) {
            y = labels[k];
            valid = y != p.ignore_index && label_in_range(y, C, p.ignore_index, status);
        }
        float4 acc = float4(0.0f);
        float m = 0.0f;
        if (K == L_CE) {
            m = -INFINITY;
            if (col) m = cls_max_pass(x, off, inner, C, t, q, cp);
            m = tile_reduce(m, TR_MAX, q.W, q.SW, lane, sg, scratch);
            if (col) {
                for (uint l = t.s; l < C; l += t.S) {
                    float v = (q.cached ? cp[l * q.W] : float(x[off + l * inner])) - m;
                    float wc = p.has_class_weight ? cw[l] : 1.0f;
                    acc.w += precise::exp(v);
                    if (LABELS) {
                        acc.x += wc * v;                   // sum w (x - m), for smoothing
                        acc.y += wc;                       // sum w
                    } else {
                        float ts = wc * (float(tp[off + l * inner]) * (1.0f - eps) + eps / Cf);
                        acc.x += ts;                       // sum w t'
                        acc.y += ts * v;                   // sum w t' (x - m)
                    }
                }
            }
        } else if (col) {
            for (uint l = t.s; l < C; l += t.S) {
                float v = float(x[off + l * inner]);
                if (K == L_CCE) {
                    if (LABELS) {
                        if (eps != 0.0f) acc.x += precise::log(v);
                    } else {
                        float ts = float(tp[off + l * inner]) * (1.0f - eps) + eps / Cf;
                        acc.x += ts == 0.0f ? 0.0f : ts * precise::log(v);
                    }
                } else {  // L_COS
                    float u = float(tp[off + l * inner]);
                    acc.x += v * u;
                    acc.y += v * v;
                    acc.z += u * u;
                }
            }
        }
        acc = tile_reduce(acc, TR_SUM, q.W, q.SW, lane, sg, scratch4);
        if (col && t.s == 0) {
            float loss = 0.0f;
            if (K == L_CE) {
                float ls = precise::log(acc.w);
                if (LABELS) {
                    // (1 - eps) w_y (ls - v_y) + eps / C sum_c w_c (ls - v_c), v = x - m
                    float wy = (p.has_class_weight && valid) ? cw[y] : 1.0f;
                    loss = valid ? (1.0f - eps) * wy * (ls - (float(x[off + uint(y) * inner]) - m))
                                 : 0.0f;
                    if (valid && eps != 0.0f) loss += eps / Cf * (ls * acc.y - acc.x);
                } else {
                    loss = ls * acc.x - acc.y;
                }
            } else if (K == L_CCE) {
                if (LABELS) {
                    loss = valid ? -(1.0f - eps) * precise::log(float(x[off + uint(y) * inner])) : 0.0f;
                    if (valid && eps != 0.0f) loss -= eps / Cf * acc.x;
                } else {
                    loss = -acc.x;
                }
            } else {
                loss = 1.0f - acc.x / precise::sqrt(max(acc.y * acc.z, p.a * p.a));
            }
            float w = p.has_weight ? sw[o] : 1.0f;
            bool nz = valid && w != 0.0f;
            terms[k] = nz ? w * loss : 0.0f;
            cnt[k] = uint2(valid ? 1u : 0u, nz ? 1u : 0u);
        }
    }
}

template <typename T, int K, int LABELS>
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_cls_bwd(device const float* g [[buffer(0)]],
                         device const T* x [[buffer(1)]],
                         device const T* tp [[buffer(2)]],
                         device const int* labels [[buffer(3)]],
                         device const float* sw [[buffer(4)]],
                         device T* dx [[buffer(5)]],
                         constant LossParams& p [[buffer(6)]],
                         constant SoftmaxParams& q [[buffer(7)]],
                         device const float* cw [[buffer(8)]],
                         device T* dt [[buffer(9)]],
                         device int* status [[buffer(10)]],
                         uint tid [[thread_position_in_threadgroup]],
                         uint tg [[threadgroup_position_in_grid]],
                         uint ntg [[threadgroups_per_grid]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float cache[LOSS_CACHE];
    threadgroup float scratch[TR_TG];
    threadgroup float4 scratch4[TR_TG];
    TilePos t = tile_pos(q.W, q.SW, tid);
    const uint C = q.len, inner = q.inner;
    const float Cf = float(C), eps = p.smoothing;
    threadgroup float* cp = cache + t.r * (C * q.W) + t.w;
    for (uint base = tg * t.R; base < q.ntiles; base += ntg * t.R) {
        uint tile = base + t.r;
        uint o = tile / q.wblocks;
        uint i = (tile % q.wblocks) * q.W + t.w;
        bool col = tile < q.ntiles && i < inner;
        uint off = o * C * inner + i;
        uint k = o * inner + i;
        int y = -1;
        bool valid = col;
        if (LABELS && col) {
            y = labels[k];
            valid = y != p.ignore_index && label_in_range(y, C, p.ignore_index, status);
        }
        float coef = 0.0f;
        if (valid) {
            float w = p.has_weight ? sw[o] : 1.0f;
            if (w != 0.0f)
                coef = w * (p.gmode == LOSS_G_SCALAR ? g[0]
                            : (p.gmode == LOSS_G_PER_SAMPLE ? g[o] : g[k]));
        }
        if (K == L_CE) {
            float m = -INFINITY;
            if (col) m = cls_max_pass(x, off, inner, C, t, q, cp);
            m = tile_reduce(m, TR_MAX, q.W, q.SW, lane, sg, scratch);
            float4 acc = float4(0.0f);  // (sum exp(x - m), sum w t' (probabilities) or sum w)
            if (col) {
                for (uint l = t.s; l < C; l += t.S) {
                    float v = q.cached ? cp[l * q.W] : float(x[off + l * inner]);
                    float wc = p.has_class_weight ? cw[l] : 1.0f;
                    acc.x += precise::exp(v - m);
                    acc.y += LABELS ? wc : wc * (float(tp[off + l * inner]) * (1.0f - eps) + eps / Cf);
                }
            }
            acc = tile_reduce(acc, TR_SUM, q.W, q.SW, lane, sg, scratch4);
            if (col) {
                float inv = 1.0f / acc.x;
                // labels: sum_c w_c t'_c = (1 - eps) w_y + eps / C sum_c w_c
                float wsum = LABELS ? ((1.0f - eps) * ((p.has_class_weight && valid) ? cw[y] : 1.0f)
                                       + eps / Cf * acc.y)
                                    : acc.y;
                float lse = m + precise::log(acc.x);
                for (uint l = t.s; l < C; l += t.S) {
                    float v = q.cached ? cp[l * q.W] : float(x[off + l * inner]);
                    float wc = p.has_class_weight ? cw[l] : 1.0f;
                    float pr = precise::exp(v - m) * inv;
                    float ts = LABELS ? smooth_label(l, y, eps, Cf)
                                      : float(tp[off + l * inner]) * (1.0f - eps) + eps / Cf;
                    float r = pr * wsum - wc * ts;
                    dx[off + l * inner] = T(coef == 0.0f ? 0.0f : coef * r);
                    // d/dt_c of sum_c w_c t'_c (lse - x_c) = (1 - eps) w_c (lse - x_c)
                    if (!LABELS && p.target_grad)
                        dt[off + l * inner] = T(coef == 0.0f ? 0.0f : coef * (1.0f - eps) * wc * (lse - v));
                }
            }
        } else if (K == L_CCE) {
            if (col) {
                for (uint l = t.s; l < C; l += t.S) {
                    float ts = LABELS ? smooth_label(l, y, eps, Cf)
                                      : float(tp[off + l * inner]) * (1.0f - eps) + eps / Cf;
                    float r = (coef == 0.0f || ts == 0.0f) ? 0.0f
                                                            : -coef * ts / float(x[off + l * inner]);
                    dx[off + l * inner] = T(r);
                }
            }
        } else {  // L_COS: d(1 - cos)/dx = cos x / |x|^2 - t / D, or -t / eps when clamped
            float4 acc = float4(0.0f);
            if (col) {
                for (uint l = t.s; l < C; l += t.S) {
                    float v = float(x[off + l * inner]);
                    float u = float(tp[off + l * inner]);
                    if (q.cached) cp[l * q.W] = v;
                    acc.x += v * u;
                    acc.y += v * v;
                    acc.z += u * u;
                }
            }
            acc = tile_reduce(acc, TR_SUM, q.W, q.SW, lane, sg, scratch4);
            if (col) {
                float prod = acc.y * acc.z;
                bool clamped = prod <= p.a * p.a;
                float D = clamped ? p.a : precise::sqrt(prod);
                float cs = acc.x / D;
                for (uint l = t.s; l < C; l += t.S) {
                    float v = q.cached ? cp[l * q.W] : float(x[off + l * inner]);
                    float u = float(tp[off + l * inner]);
                    float r = clamped ? -u / D : cs * v / acc.y - u / D;
                    dx[off + l * inner] = T(coef == 0.0f ? 0.0f : coef * r);
                }
            }
        }
    }
}

// ---- reductions -----------------------------------------------------------------------------
// out[s] = (sum of segment s's partials) / its count (mode 1: valid terms, mode 2: terms of
// nonzero weight, 0 when there are none; mode 3: denom). One threadgroup per segment.
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_reduce_fwd_float(device const float* part [[buffer(0)]],
                                  device const uint2* cnt [[buffer(1)]],
                                  device float* out [[buffer(2)]],
                                  constant LossReduceParams& p [[buffer(3)]],
                                  uint tid [[thread_position_in_threadgroup]],
                                  uint tg [[threadgroup_position_in_grid]],
                                  uint ntg [[threadgroups_per_grid]],
                                  uint lane [[thread_index_in_simdgroup]],
                                  uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    threadgroup uint2 scratch2[TR_TG];
    for (uint s = tg; s < p.nseg; s += ntg) {
        float acc = 0.0f;
        uint2 c = uint2(0u);
        for (uint j = tid; j < p.seglen; j += TR_TG) {
            acc += part[s * p.seglen + j];
            if (p.mode == LOSS_MODE_MEAN || p.mode == LOSS_MODE_NONZERO) c += cnt[s * p.seglen + j];
        }
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        c = tile_reduce(c, TR_SUM, 1u, TR_TG, lane, sg, scratch2);
        if (tid == 0) {
            float r = acc;
            if (p.mode == LOSS_MODE_MEAN) r = acc / float(c.x);
            if (p.mode == LOSS_MODE_NONZERO) r = c.y == 0u ? 0.0f : acc / float(c.y);
            if (p.mode == LOSS_MODE_DENOM) r = acc / p.denom;
            out[s] = r;
        }
    }
}

// scale[0] = g[0] / count for the backward of a scalar reduction, counting over positions like
// loss_reduce_fwd_float's modes (mode 0: g[0]). One threadgroup.
[[max_total_threads_per_threadgroup(256)]]
kernel void loss_scale_bwd_float(device const int* labels [[buffer(0)]],
                                 device const float* sw [[buffer(1)]],
                                 device const float* g [[buffer(2)]],
                                 device float* scale [[buffer(3)]],
                                 constant LossReduceParams& p [[buffer(4)]],
                                 device const float* cw [[buffer(5)]],
                                 device int* status [[buffer(6)]],
                                 uint tid [[thread_position_in_threadgroup]],
                                 uint lane [[thread_index_in_simdgroup]],
                                 uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup uint2 scratch2[TR_TG];
    threadgroup float scratch[TR_TG];
    uint2 c = uint2(0u);
    float wsum = 0.0f;  // sum of the class weights of the valid labels
    if (p.mode == LOSS_MODE_MEAN || p.mode == LOSS_MODE_NONZERO) {
        for (uint k = tid; k < p.terms; k += TR_TG) {
            bool valid = p.has_labels ? labels[k] != p.ignore_index &&
                                        label_in_range(labels[k], p.classes, p.ignore_index, status)
                                      : true;
            bool nz = valid && (p.has_weight ? sw[k / p.per_sample] != 0.0f : true);
            c += uint2(valid ? 1u : 0u, nz ? 1u : 0u);
            if (p.has_class_weight && valid) wsum += cw[labels[k]];
        }
    }
    c = tile_reduce(c, TR_SUM, 1u, TR_TG, lane, sg, scratch2);
    if (p.has_class_weight) wsum = tile_reduce(wsum, TR_SUM, 1u, TR_TG, lane, sg, scratch);
    if (tid == 0) {
        float r = g[0];
        if (p.mode == LOSS_MODE_MEAN) r = p.has_class_weight ? g[0] / (wsum * float(p.mult))
                                                             : g[0] / (float(c.x) * float(p.mult));
        if (p.mode == LOSS_MODE_NONZERO)
            r = c.y == 0u ? 0.0f : g[0] / (float(c.y) * float(p.mult));
        if (p.mode == LOSS_MODE_DENOM) r = g[0] / p.denom;
        scale[0] = r;
    }
}

// ---- instantiations -------------------------------------------------------------------------
// ---- softmax cross-entropy on (N, C) logits with integer labels: one simdgroup per row ------
// The host takes these for 2-d logits (one position per sample) whose C is a multiple of W =
// 16 / sizeof(T) and at most 32 SM_ROW_CHUNKS W, the buffers 16-byte aligned: each lane loads
// its SM_ROW_CHUNKS 16-byte chunks of the row at once and keeps them in registers, the row's max
// and sums are simd reductions (softmax.metal's row kernels), no threadgroup memory or barrier.
// Same params, buffers, per-term formulas and outputs as loss_cls_fwd / loss_cls_bwd (K = L_CE,
// LABELS = 1): terms and counts per sample for loss_reduce, dx per element.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void ce_rows_fwd(device const T* x [[buffer(0)]],
                        device const T* tp [[buffer(1)]],
                        device const int* labels [[buffer(2)]],
                        device const float* sw [[buffer(3)]],
                        device float* terms [[buffer(4)]],
                        device uint2* cnt [[buffer(5)]],
                        constant LossParams& p [[buffer(6)]],
                        constant SoftmaxParams& q [[buffer(7)]],
                        device const float* cw [[buffer(8)]],
                        device int* status [[buffer(9)]],
                        uint gid [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]]) {
    const uint W = 16u / sizeof(T);
    const uint o = gid / 32u;  // the sample (row), uniform across the simdgroup
    if (o >= q.outer) return;
    const uint C = q.len, nv = C / W, off = o * C;
    const float Cf = float(C), eps = p.smoothing;
    const int y = labels[o];
    const bool valid = y != p.ignore_index && label_in_range(y, C, p.ignore_index, status);
    float v[SM_ROW_CHUNKS][16 / sizeof(T)];
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        stream_load<16 / sizeof(T)>(x, o * nv + min(lane + 32u * c, nv - 1u), v[c]);
    }
    float m = -INFINITY;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) m = max(m, v[c][e]);
        }
    }
    m = simd_max(m);
    float4 acc = float4(0.0f);
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) {
                const float d = v[c][e] - m;
                const float wc = p.has_class_weight ? cw[(lane + 32u * c) * W + e] : 1.0f;
                acc.w += precise::exp(d);
                acc.x += wc * d;  // sum w (x - m), for smoothing
                acc.y += wc;      // sum w
            }
        }
    }
    acc = float4(simd_sum(acc.x), simd_sum(acc.y), 0.0f, simd_sum(acc.w));
    if (lane == 0u) {
        const float ls = precise::log(acc.w);
        const float wy = (p.has_class_weight && valid) ? cw[y] : 1.0f;
        float loss = valid ? (1.0f - eps) * wy * (ls - (float(x[off + uint(y)]) - m)) : 0.0f;
        if (valid && eps != 0.0f) loss += eps / Cf * (ls * acc.y - acc.x);
        const float w = p.has_weight ? sw[o] : 1.0f;
        const bool nz = valid && w != 0.0f;
        terms[o] = nz ? w * loss : 0.0f;
        cnt[o] = uint2(valid ? 1u : 0u, nz ? 1u : 0u);
    }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void ce_rows_bwd(device const float* g [[buffer(0)]],
                        device const T* x [[buffer(1)]],
                        device const T* tp [[buffer(2)]],
                        device const int* labels [[buffer(3)]],
                        device const float* sw [[buffer(4)]],
                        device T* dx [[buffer(5)]],
                        constant LossParams& p [[buffer(6)]],
                        constant SoftmaxParams& q [[buffer(7)]],
                        device const float* cw [[buffer(8)]],
                        device T* dt [[buffer(9)]],
                        device int* status [[buffer(10)]],
                        uint gid [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]]) {
    const uint W = 16u / sizeof(T);
    const uint o = gid / 32u;
    if (o >= q.outer) return;
    const uint C = q.len, nv = C / W;
    const float Cf = float(C), eps = p.smoothing;
    const int y = labels[o];
    const bool valid = y != p.ignore_index && label_in_range(y, C, p.ignore_index, status);
    float coef = 0.0f;
    if (valid) {
        const float w = p.has_weight ? sw[o] : 1.0f;
        if (w != 0.0f) coef = w * (p.gmode == LOSS_G_SCALAR ? g[0] : g[o]);
    }
    float v[SM_ROW_CHUNKS][16 / sizeof(T)];
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        stream_load<16 / sizeof(T)>(x, o * nv + min(lane + 32u * c, nv - 1u), v[c]);
    }
    float m = -INFINITY;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) m = max(m, v[c][e]);
        }
    }
    m = simd_max(m);
    float sx = 0.0f, sy = 0.0f;  // sum exp(x - m), sum w
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        if (lane + 32u * c < nv) {
            for (uint e = 0; e < W; ++e) {
                sx += precise::exp(v[c][e] - m);
                sy += p.has_class_weight ? cw[(lane + 32u * c) * W + e] : 1.0f;
            }
        }
    }
    sx = simd_sum(sx);
    sy = simd_sum(sy);
    const float inv = 1.0f / sx;
    // sum_c w_c t'_c = (1 - eps) w_y + eps / C sum_c w_c
    const float wsum = (1.0f - eps) * ((p.has_class_weight && valid) ? cw[y] : 1.0f) + eps / Cf * sy;
    for (uint c = 0; c < SM_ROW_CHUNKS; ++c) {
        const uint ch = lane + 32u * c;
        if (ch < nv) {
            for (uint e = 0; e < W; ++e) {
                const uint l = ch * W + e;
                const float wc = p.has_class_weight ? cw[l] : 1.0f;
                const float pr = precise::exp(v[c][e] - m) * inv;
                const float r = pr * wsum - wc * smooth_label(l, y, eps, Cf);
                v[c][e] = coef == 0.0f ? 0.0f : coef * r;
            }
            stream_store<16 / sizeof(T)>(dx, o * nv + ch, v[c]);
        }
    }
}

#define LOSS_PW(NAME, K, T)                                                                    \
    INSTANTIATE(#NAME "_fwd_" #T, loss_pw_fwd, T, K)                                           \
    INSTANTIATE(#NAME "_bwd_" #T, loss_pw_bwd, T, K)                                           \
    INSTANTIATE(#NAME "_bwd_vec_" #T, loss_pw_bwd_vec, T, K)                                   \
    INSTANTIATE(#NAME "_bwd_plain_" #T, loss_pw_bwd_plain, T, K)
#define LOSS_CLS(NAME, K, LB, VARIANT, T)                                                      \
    INSTANTIATE(#NAME "_fwd_" VARIANT #T, loss_cls_fwd, T, K, LB)                              \
    INSTANTIATE(#NAME "_bwd_" VARIANT #T, loss_cls_bwd, T, K, LB)
#define LOSS_ALL(T)                                                                            \
    LOSS_PW(mse_loss, L_MSE, T)                                                                \
    LOSS_PW(l1_loss, L_L1, T)                                                                  \
    LOSS_PW(huber_loss, L_HUBER, T)                                                            \
    LOSS_PW(bce_with_logits, L_BCE, T)                                                         \
    LOSS_PW(hinge_loss, L_HINGE, T)                                                            \
    LOSS_PW(kl_div, L_KL, T)                                                                   \
    LOSS_PW(log_loss, L_LOG, T)                                                                \
    LOSS_PW(smooth_l1_loss, L_SL1, T)                                                          \
    LOSS_CLS(cross_entropy, L_CE, 1, "labels_", T)                                             \
    LOSS_CLS(cross_entropy, L_CE, 0, "probs_", T)                                              \
    LOSS_CLS(categorical_cross_entropy, L_CCE, 1, "labels_", T)                                \
    LOSS_CLS(categorical_cross_entropy, L_CCE, 0, "probs_", T)                                 \
    LOSS_CLS(cosine_distance, L_COS, 0, "", T)                                                 \
    INSTANTIATE("cross_entropy_fwd_labels_rows_" #T, ce_rows_fwd, T)                           \
    INSTANTIATE("cross_entropy_bwd_labels_rows_" #T, ce_rows_bwd, T)

LOSS_ALL(float)
LOSS_ALL(half)
