// arith.metal -- add, sub, mul, div with numpy/torch broadcasting, and the reductions behind
// sum / mean and the gradients of broadcast operands.
//
// Elementwise: the host merges adjacent dimensions that broadcast alike ((N,C,H,W) + (1,C,1,1)
// becomes [N, C, H*W]; same-shape operands become one dimension) and passes, per operand, the
// element stride of each merged output dimension (0 where it is broadcast). A thread maps its
// output index to operand offsets with ndim - 1 divisions. When the innermost merged dimension is a
// multiple of 4 a thread produces 4 outputs with one vector load per operand (a splat where the
// operand is broadcast along it): the ops are memory-bound, and 128-bit fp32 accesses are what gets
// them to copy bandwidth. The offsets of the vector loads are multiples of 4, so aligned.
// Flat fast path (arith_flat, and arith_bwd): when every operand is contiguous with the output's
// shape or a single element (same-shape ops, tensor op number), no index math at all: the
// stream.h shape (two coalesced 16-byte chunks per thread, half included, one pass, scalar tail).
// Channel path (arith_chan): output [N, C, HW] (HW >= the chunk) and every operand contiguous
// with it or one value per channel (x * w[c], x + b[c]): the stream.h shape too, one plane
// lookup per 16-byte chunk where the general kernel spends ndim - 1 divisions per 4 outputs.
// Forward ops apply an optional activation to the result in the same pass (p.act, neuron.h: a
// residual add + relu).
//
// Reductions out[t] = alpha * sum_r op(x0, x1, x2) (op: identity, g * other, g / b, -g a / b^2)
// come in two shapes, chosen by the host:
//  - outer: one thread per (output, split) walks its reduced range with an odometer (no
//    divisions in the loop). Used when the innermost merged dimension is kept (e.g. summing over
//    the batch), where neighbouring threads then read neighbouring addresses.
//  - inner: the innermost merged dimension is reduced (the bias gradient [N, C, H*W] -> C, a full
//    sum): one simdgroup per (output, split), lanes read consecutive elements, simd_sum at the end.
// Both read 4 consecutive elements per load when the innermost dim allows it. With few outputs the
// reduced range is cut into splits (enough loads in flight to cover memory latency) that write
// float partials, and a finish kernel adds the partials of each output in a fixed order:
// deterministic, no atomics. Every sum is accumulated in float whatever the storage type.
// The reduction loops issue RED_UN steps' loads (8 in the finish kernel) before adding them, in
// the same order as one at a time: more bytes in flight per thread, the same sums.
// Sums over whole 16-byte chunks (sum_rows_*: a full sum, a per-channel sum of NCHW) have their
// own kernels, below.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "neuron.h"
#include "stream.h"
#include "tile_reduce.h"
#include "args.h"
using namespace metal;

#define OP_ADD 0
#define OP_SUB 1
#define OP_MUL 2
#define OP_DIV 3
#define OP_SCALE 4   // alpha * x0 (broadcast copy; identity in reductions)
#define OP_DIVRHS 5  // -x0 * x1 / x2^2: the gradient of a / b with respect to b, x0 = g

// V is float or float4; c is used by OP_DIVRHS only.
template <int OP, typename V>
METAL_FUNC V arith_apply(V a, V b, V c, float alpha) {
    if (OP == OP_ADD) return a + b;
    if (OP == OP_SUB) return a - b;
    if (OP == OP_MUL) return a * b;
    if (OP == OP_DIV) return a / b;
    if (OP == OP_SCALE) return a * alpha;
    return -(a * (b / c)) / c;  // divide before squaring: b * b overflows float for |b| > 1.8e19
}

// The forward ops' fused activation of the result (p.act of neuron.h, 0 = none: the value
// untouched), e.g. a residual add + relu in one pass (F.add(..., activation=)).
inline float arith_act(float v, constant ArithParams& p) {
    return p.act ? nn_activation(v, p.act, p.act_alpha) : v;
}
inline float4 arith_act(float4 v, constant ArithParams& p) {
    if (p.act) {
        for (int j = 0; j < 4; ++j) v[j] = nn_activation(v[j], p.act, p.act_alpha);
    }
    return v;
}

// How many operands an op reads; the others are never loaded.
template <int OP>
METAL_FUNC int arith_arity() {
    return OP == OP_SCALE ? 1 : (OP == OP_DIVRHS ? 3 : 2);
}

template <typename T>
inline float4 load4(device const T* x, uint off, uint inner_stride) {
    // inner_stride is 0 (broadcast along the innermost dim: splat) or 1 (4 consecutive elements)
    if (inner_stride == 0) return float4(float(x[off]));
    return float4(*((device const vec<T, 4>*)(x + off)));
}
// half: one 8-byte load (through vec<half, 4> NVRTC emitted four 2-byte loads)
inline float4 load4(device const half* x, uint off, uint inner_stride) {
    if (inner_stride == 0) return float4(float(x[off]));
    const uint2 u = *((device const uint2*)(x + off));
    const half2 lo = as_type<half2>(u.x), hi = as_type<half2>(u.y);
    return float4(float(lo.x), float(lo.y), float(hi.x), float(hi.y));
}

// ---- elementwise (forward ops, broadcast copies and one-sided gradients) ----
template <int OP, typename T>
kernel void arith_ew(device const T* x0 [[buffer(0)]],
                     device const T* x1 [[buffer(1)]],
                     device const T* x2 [[buffer(2)]],
                     device T* out [[buffer(3)]],
                     constant ArithParams& p [[buffer(4)]],
                     uint gid [[thread_position_in_grid]],
                     uint tg_size [[threads_per_threadgroup]],
                     uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    const int last = int(p.ndim) - 1;
    for (uint item = gid; item < p.n; item += grid) {
        uint rest = item * p.vec;
        const uint e = rest;
        uint o0 = 0, o1 = 0, o2 = 0;
        for (int d = last; d > 0; --d) {
            const uint c = rest % p.shape[d];
            rest /= p.shape[d];
            o0 += c * p.stride0[d];
            o1 += c * p.stride1[d];
            o2 += c * p.stride2[d];
        }
        o0 += rest * p.stride0[0];
        o1 += rest * p.stride1[0];
        o2 += rest * p.stride2[0];
        const int k = arith_arity<OP>();
        if (p.vec == 4) {
            const float4 a = load4(x0, o0, p.stride0[last]);
            const float4 b = k >= 2 ? load4(x1, o1, p.stride1[last]) : float4(0.0f);
            const float4 c = k >= 3 ? load4(x2, o2, p.stride2[last]) : float4(1.0f);
            const float4 r = arith_act(arith_apply<OP>(a, b, c, p.alpha), p);
            *((device vec<T, 4>*)(out + e)) = vec<T, 4>(r);
        } else {
            const float a = float(x0[o0]);
            const float b = k >= 2 ? float(x1[o1]) : 0.0f;
            const float c = k >= 3 ? float(x2[o2]) : 1.0f;
            out[e] = T(arith_act(arith_apply<OP>(a, b, c, p.alpha), p));
        }
    }
}

// One chunk's W results into a: the arithmetic in a loop of its own, then the activation in
// another. A loop without a branch is one vector operation on cpu and the chunk stays in
// registers (with the activation's switch inside, each element went through the stack: add
// over 1M floats 2.24 -> 1.27 ms on one cpu worker); on a GPU the branch is uniform.
template <int OP, int W>
METAL_FUNC void arith_chunk(thread float* a, thread const float* b, thread const float* c,
                            float alpha, constant ArithParams& p) {
    const int k = arith_arity<OP>();
    for (int e = 0; e < W; ++e) {
        a[e] = arith_apply<OP>(a[e], k >= 2 ? b[e] : 0.0f, k >= 3 ? c[e] : 1.0f, alpha);
    }
    if (p.act) {
        for (int e = 0; e < W; ++e) a[e] = nn_activation(a[e], p.act, p.act_alpha);
    }
}

// ---- flat: every operand contiguous over the whole output, or one element (splat) ----
// p.n = elements, p.vec = nvec (16-byte chunks, kernels/stream.h; 0: all through the tail),
// p.stride<i>[0] = 1 (contiguous) or 0 (operand i is one element).
template <int W, bool SPLAT, typename T>
METAL_FUNC void arith_load_flat(device const T* x, uint s, uint c, thread float* v) {
    if (SPLAT && s == 0u) {
        const float a = float(x[0]);
        for (int e = 0; e < W; ++e) v[e] = a;
    } else {
        stream_load<W>(x, c, v);
    }
}

// SPLAT = false (host: every stride is 1, the same-shape case) has no branch between the loads.
template <int OP, typename T, bool SPLAT>
[[max_total_threads_per_threadgroup(256)]]
kernel void arith_flat(device const T* x0 [[buffer(0)]],
                       device const T* x1 [[buffer(1)]],
                       device const T* x2 [[buffer(2)]],
                       device T* out [[buffer(3)]],
                       constant ArithParams& p [[buffer(4)]],
                       uint gid [[thread_position_in_grid]]) {
    const int k = arith_arity<OP>();
    const uint nvec = p.vec;
    const uint s0 = p.stride0[0], s1 = p.stride1[0], s2 = p.stride2[0];
    const float alpha = p.alpha;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        float a[STREAM_U][16 / sizeof(T)], b[STREAM_U][16 / sizeof(T)], c[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_clamp(stream_chunk(gid, u), nvec);
            arith_load_flat<16 / sizeof(T), SPLAT>(x0, s0, ch, a[u]);
            if (k >= 2) arith_load_flat<16 / sizeof(T), SPLAT>(x1, s1, ch, b[u]);
            if (k >= 3) arith_load_flat<16 / sizeof(T), SPLAT>(x2, s2, ch, c[u]);
        }
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_chunk(gid, u);
            if (ch < nvec) {
                arith_chunk<OP, 16 / sizeof(T)>(a[u], b[u], c[u], alpha, p);
                stream_store<16 / sizeof(T)>(out, ch, a[u]);
            }
        }
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < p.n) {
            const float a = float(x0[s0 * i]);
            const float b = k >= 2 ? float(x1[s1 * i]) : 0.0f;
            const float c = k >= 3 ? float(x2[s2 * i]) : 1.0f;
            out[i] = T(arith_act(arith_apply<OP>(a, b, c, alpha), p));
        }
    }
}

// ---- channel broadcast: out [N, C, HW], operand i contiguous (p.stride<i>[0] = 1) or per channel
// (0, x[c]); p.n elements, p.vec = nvec chunks of W = 16 / sizeof(T), p.shape[0] = C,
// p.shape[1] = HW >= W, so a chunk meets at most two planes q and q + 1 (the first in_q elements
// in q). Per element the same arith_apply as arith_ew.
template <int W, typename T>
METAL_FUNC void arith_load_chan(device const T* x, uint s, uint ch, float a0, float a1,
                                uint in_q, thread float* v) {
    if (s == 0u) {
        for (int e = 0; e < W; ++e) v[e] = uint(e) < in_q ? a0 : a1;
    } else {
        stream_load<W>(x, ch, v);
    }
}

template <int OP, typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void arith_chan(device const T* x0 [[buffer(0)]],
                       device const T* x1 [[buffer(1)]],
                       device const T* x2 [[buffer(2)]],
                       device T* out [[buffer(3)]],
                       constant ArithParams& p [[buffer(4)]],
                       uint gid [[thread_position_in_grid]]) {
    const int k = arith_arity<OP>();
    const uint W = 16u / sizeof(T);
    const uint nvec = p.vec, C = p.shape[0], HW = p.shape[1];
    const uint s0 = p.stride0[0], s1 = p.stride1[0], s2 = p.stride2[0];
    const float alpha = p.alpha;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        float a[STREAM_U][16 / sizeof(T)], b[STREAM_U][16 / sizeof(T)], c[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_clamp(stream_chunk(gid, u), nvec);
            const uint i0 = ch * W, q = i0 / HW, in_q = (q + 1u) * HW - i0;
            const uint c0 = q % C, c1 = (q + 1u) % C;
            arith_load_chan<16 / sizeof(T)>(x0, s0, ch, s0 ? 0.0f : float(x0[c0]),
                                            s0 ? 0.0f : float(x0[c1]), in_q, a[u]);
            if (k >= 2) {
                arith_load_chan<16 / sizeof(T)>(x1, s1, ch, s1 ? 0.0f : float(x1[c0]),
                                                s1 ? 0.0f : float(x1[c1]), in_q, b[u]);
            }
            if (k >= 3) {
                arith_load_chan<16 / sizeof(T)>(x2, s2, ch, s2 ? 0.0f : float(x2[c0]),
                                                s2 ? 0.0f : float(x2[c1]), in_q, c[u]);
            }
        }
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_chunk(gid, u);
            if (ch < nvec) {
                arith_chunk<OP, 16 / sizeof(T)>(a[u], b[u], c[u], alpha, p);
                stream_store<16 / sizeof(T)>(out, ch, a[u]);
            }
        }
    } else {
        const uint i = nvec * W + (gid - vthreads);
        if (i < p.n) {
            const uint cc = (i / HW) % C;
            const float a = float(x0[s0 ? i : cc]);
            const float b = k >= 2 ? float(x1[s1 ? i : cc]) : 0.0f;
            const float c = k >= 3 ? float(x2[s2 ? i : cc]) : 1.0f;
            out[i] = T(arith_act(arith_apply<OP>(a, b, c, alpha), p));
        }
    }
}

// ---- both gradients of a same-shape binary op in one pass: g, a, b read once ----
// p.n is the element count, p.vec = nvec: the stream.h shape as arith_flat.
template <int OP>
METAL_FUNC void arith_bwd_pair(float gv, float av, float bv, thread float& ra, thread float& rb) {
    if (OP == OP_ADD || OP == OP_SUB) {
        ra = gv;
        rb = OP == OP_ADD ? gv : -gv;
    } else {
        ra = OP == OP_MUL ? gv * bv : gv / bv;
        rb = OP == OP_MUL ? gv * av : arith_apply<OP_DIVRHS>(gv, av, bv, 1.0f);
    }
}

template <int OP, typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void arith_bwd(device const T* g [[buffer(0)]],
                      device const T* a [[buffer(1)]],
                      device const T* b [[buffer(2)]],
                      device T* ga [[buffer(3)]],
                      device T* gb [[buffer(4)]],
                      constant ArithParams& p [[buffer(5)]],
                      uint gid [[thread_position_in_grid]]) {
    const bool reads_ab = !(OP == OP_ADD || OP == OP_SUB);
    const uint nvec = p.vec;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        float gv[STREAM_U][16 / sizeof(T)], av[STREAM_U][16 / sizeof(T)],
            bv[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_clamp(stream_chunk(gid, u), nvec);
            stream_load<16 / sizeof(T)>(g, ch, gv[u]);
            if (reads_ab) {
                stream_load<16 / sizeof(T)>(a, ch, av[u]);
                stream_load<16 / sizeof(T)>(b, ch, bv[u]);
            }
        }
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_chunk(gid, u);
            if (ch < nvec) {
                float ra[16 / sizeof(T)], rb[16 / sizeof(T)];
                for (int e = 0; e < int(16 / sizeof(T)); ++e) {
                    arith_bwd_pair<OP>(gv[u][e], reads_ab ? av[u][e] : 0.0f,
                                       reads_ab ? bv[u][e] : 1.0f, ra[e], rb[e]);
                }
                stream_store<16 / sizeof(T)>(ga, ch, ra);
                stream_store<16 / sizeof(T)>(gb, ch, rb);
            }
        }
    } else {
        const uint i = nvec * uint(16 / sizeof(T)) + (gid - vthreads);
        if (i < p.n) {
            float ra, rb;
            arith_bwd_pair<OP>(float(g[i]), reads_ab ? float(a[i]) : 0.0f,
                               reads_ab ? float(b[i]) : 1.0f, ra, rb);
            ga[i] = T(ra);
            gb[i] = T(rb);
        }
    }
}

// ---- reductions ----
// The loops over dimensions below run d = 7 .. 0 unrolled, guarded by the run-time count, so
// that ReduceParams' arrays and the coordinates c[] are read at constant indices (args.h).
inline uint kept_offset(uint t, constant ReduceParams& p, thread uint& o1, thread uint& o2) {
    uint o0 = 0;
    o1 = 0;
    o2 = 0;
#pragma unroll
    for (int d = 7; d >= 0; --d) {
        if (d < int(p.nk)) {
            const uint c = t % p.ksize[d];
            t /= p.ksize[d];
            o0 += c * p.kstride0[d];
            o1 += c * p.kstride1[d];
            o2 += c * p.kstride2[d];
        }
    }
    return o0;
}

template <int OP, typename T>
inline float reduce_term(device const T* x0, device const T* x1, device const T* x2,
                         uint o0, uint o1, uint o2) {
    const int k = arith_arity<OP>();
    const float a = float(x0[o0]);
    const float b = k >= 2 ? float(x1[o1]) : 0.0f;
    const float c = k >= 3 ? float(x2[o2]) : 1.0f;
    return arith_apply<OP>(a, b, c, 1.0f);
}

// 4 consecutive elements along the innermost dim; s0, s1, s2 are the operands' strides there
// (0: broadcast, splat; 1: one vector load at an offset that is a multiple of 4).
template <int OP, typename T>
inline float4 reduce_term4(device const T* x0, device const T* x1, device const T* x2,
                           uint o0, uint o1, uint o2, uint s0, uint s1, uint s2) {
    const int k = arith_arity<OP>();
    const float4 a = load4(x0, o0, s0);
    const float4 b = k >= 2 ? load4(x1, o1, s1) : float4(0.0f);
    const float4 c = k >= 3 ? load4(x2, o2, s2) : float4(1.0f);
    return arith_apply<OP>(a, b, c, 1.0f);
}

// Odometer step over the reduced dims c[0..nr): offsets o* follow the coordinates.
inline void odometer_next(thread uint* c, constant ReduceParams& p, thread uint& o0, thread uint& o1,
                          thread uint& o2) {
#pragma unroll
    for (int d = 7; d >= 0; --d) {
        if (d < int(p.nr)) {
            o0 += p.rstride0[d];
            o1 += p.rstride1[d];
            o2 += p.rstride2[d];
            if (++c[d] < p.rsize[d]) return;
            c[d] = 0;
            o0 -= p.rsize[d] * p.rstride0[d];
            o1 -= p.rsize[d] * p.rstride1[d];
            o2 -= p.rsize[d] * p.rstride2[d];
        }
    }
}

inline void odometer_init(uint r, thread uint* c, constant ReduceParams& p, thread uint& o0,
                          thread uint& o1, thread uint& o2) {
#pragma unroll
    for (int d = 7; d >= 0; --d) {
        c[d] = 0;
        if (d < int(p.nr)) {
            c[d] = r % p.rsize[d];
            r /= p.rsize[d];
            o0 += c[d] * p.rstride0[d];
            o1 += c[d] * p.rstride1[d];
            o2 += c[d] * p.rstride2[d];
        }
    }
}

#define RED_UN 4  // reduce_outer / reduce_inner: steps whose loads a thread issues together

// outer: one thread per (output t, split s), or per (4 consecutive outputs, split) when vec == 4
// (the innermost kept dim is then a multiple of 4 and x0 is contiguous along it); the odometer
// c[] walks the reduced dims.
template <int OP, typename T>
kernel void reduce_outer(device const T* x0 [[buffer(0)]],
                         device const T* x1 [[buffer(1)]],
                         device const T* x2 [[buffer(2)]],
                         device T* out [[buffer(3)]],
                         device float* partial [[buffer(4)]],
                         constant ReduceParams& p [[buffer(5)]],
                         uint gid [[thread_position_in_grid]],
                         uint tg_size [[threads_per_threadgroup]],
                         uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    const uint per_split = p.n_out / p.vec;
    const uint total = per_split * p.splits;
    // the innermost kept dim's strides (vec == 4 implies nk >= 1)
    const uint kl = p.nk > 0u ? p.nk - 1u : 0u;
    const uint ks0 = arg_pick8(kl, p.kstride0), ks1 = arg_pick8(kl, p.kstride1),
               ks2 = arg_pick8(kl, p.kstride2);
    for (uint item = gid; item < total; item += grid) {
        const uint s = item / per_split;
        const uint t = (item - s * per_split) * p.vec;
        uint o1, o2;
        uint o0 = kept_offset(t, p, o1, o2);
        const uint r0 = s * p.chunk;
        const uint r1 = min(p.n_red, r0 + p.chunk);
        uint c[8];
        odometer_init(r0, c, p, o0, o1, o2);
        // RED_UN steps per round: their loads first, then the terms added in step order (the
        // same sums as one step at a time, which left a thread one load in flight)
        const int k = arith_arity<OP>();
        const bool v4 = p.vec == 4;
        float4 acc = float4(0.0f);
        for (uint r = r0; r < r1;) {
            float4 va[RED_UN], vb[RED_UN], vc[RED_UN];
            bool ok[RED_UN];
            for (int u = 0; u < RED_UN; ++u) {
                ok[u] = r < r1;
                va[u] = float4(0.0f);
                vb[u] = float4(0.0f);
                vc[u] = float4(1.0f);
                if (ok[u]) {
                    if (v4) {
                        va[u] = load4(x0, o0, ks0);
                        if (k >= 2) vb[u] = load4(x1, o1, ks1);
                        if (k >= 3) vc[u] = load4(x2, o2, ks2);
                    } else {
                        va[u].x = float(x0[o0]);
                        if (k >= 2) vb[u].x = float(x1[o1]);
                        if (k >= 3) vc[u].x = float(x2[o2]);
                    }
                    odometer_next(c, p, o0, o1, o2);
                    ++r;
                }
            }
            for (int u = 0; u < RED_UN; ++u) {
                if (ok[u]) {
                    if (v4) acc += arith_apply<OP>(va[u], vb[u], vc[u], 1.0f);
                    else acc.x += arith_apply<OP>(va[u].x, vb[u].x, vc[u].x, 1.0f);
                }
            }
        }
        if (v4) {
            if (p.splits == 1) *((device vec<T, 4>*)(out + t)) = vec<T, 4>(acc * p.alpha);
            else *((device float4*)(partial + s * p.n_out + t)) = acc;
        } else {
            if (p.splits == 1) out[t] = T(acc.x * p.alpha);
            else partial[s * p.n_out + t] = acc.x;
        }
    }
}

// inner: one simdgroup per (output t, split s). The split covers reduced elements
// [s * chunk, (s + 1) * chunk) of the (rows, inner) space; lane l takes elements V*l .. V*l+V-1,
// then the next 32 V, and tracks (row, col) incrementally, rows through the odometer c[] over the
// outer reduced dims. V = 4 (vector loads) when inner and chunk are multiples of 4, so a vector
// never straddles two rows.
template <int OP, typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void reduce_inner(device const T* x0 [[buffer(0)]],
                         device const T* x1 [[buffer(1)]],
                         device const T* x2 [[buffer(2)]],
                         device T* out [[buffer(3)]],
                         device float* partial [[buffer(4)]],
                         constant ReduceParams& p [[buffer(5)]],
                         uint gid [[thread_position_in_grid]],
                         uint lane [[thread_index_in_simdgroup]],
                         uint tg_size [[threads_per_threadgroup]],
                         uint n_groups [[threadgroups_per_grid]]) {
    const uint n_sg = tg_size * n_groups / 32u;
    const uint total = p.n_out * p.splits;
    const uint advance = 32u * p.vec;
    for (uint item = gid / 32u; item < total; item += n_sg) {
        const uint t = item % p.n_out;
        const uint s = item / p.n_out;
        uint b1, b2;
        uint b0 = kept_offset(t, p, b1, b2);  // then: offsets of the current row
        const uint r0 = s * p.chunk;
        const uint r1 = min(p.n_red, r0 + p.chunk);
        float acc = 0.0f;
        uint r = r0 + lane * p.vec;
        if (r < r1) {
            uint col = r % p.inner;
            uint c[8];
            odometer_init(r / p.inner, c, p, b0, b1, b2);
            // RED_UN steps per round: their loads first, then the terms added in step order
            // (the same sums as one step at a time, which left a lane one load in flight)
            const int k = arith_arity<OP>();
            while (r < r1) {
                float4 va[RED_UN], vb[RED_UN], vc[RED_UN];
                bool ok[RED_UN];
                for (int u = 0; u < RED_UN; ++u) {
                    ok[u] = r < r1;
                    va[u] = float4(0.0f);
                    vb[u] = float4(0.0f);
                    vc[u] = float4(1.0f);
                    if (ok[u]) {
                        const uint o0 = b0 + col * p.istride0;
                        const uint o1 = b1 + col * p.istride1;
                        const uint o2 = b2 + col * p.istride2;
                        if (p.vec == 4) {
                            va[u] = load4(x0, o0, p.istride0);
                            if (k >= 2) vb[u] = load4(x1, o1, p.istride1);
                            if (k >= 3) vc[u] = load4(x2, o2, p.istride2);
                        } else {
                            va[u].x = float(x0[o0]);
                            if (k >= 2) vb[u].x = float(x1[o1]);
                            if (k >= 3) vc[u].x = float(x2[o2]);
                        }
                        col += advance;
                        // next row (at most once if inner >= advance)
                        while (col >= p.inner && r + advance < r1) {
                            col -= p.inner;
                            odometer_next(c, p, b0, b1, b2);
                        }
                        r += advance;
                    }
                }
                for (int u = 0; u < RED_UN; ++u) {
                    if (ok[u]) {
                        if (p.vec == 4) {
                            const float4 v = arith_apply<OP>(va[u], vb[u], vc[u], 1.0f);
                            acc += (v.x + v.y) + (v.z + v.w);
                        } else {
                            acc += arith_apply<OP>(va[u].x, vb[u].x, vc[u].x, 1.0f);
                        }
                    }
                }
            }
        }
        acc = simd_sum(acc);
        if (lane == 0) {
            if (p.splits == 1) out[t] = T(acc * p.alpha);
            else partial[item] = acc;
        }
    }
}

// finish: out[t] = alpha * sum_s partial[s][t], one simdgroup per output, fixed order per lane.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void reduce_finish(device const float* partial [[buffer(0)]],
                          device T* out [[buffer(1)]],
                          constant ReduceParams& p [[buffer(2)]],
                          uint gid [[thread_position_in_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint tg_size [[threads_per_threadgroup]],
                          uint n_groups [[threadgroups_per_grid]]) {
    const uint n_sg = tg_size * n_groups / 32u;
    for (uint t = gid / 32u; t < p.n_out; t += n_sg) {
        float acc = 0.0f;
        // 8 loads issued before they are added, in the same order (a full reduction has up to
        // MAX_SPLITS partials for one simdgroup: one load in flight at a time made it
        // latency-bound)
        uint s = lane;
        for (; s + 7u * 32u < p.splits; s += 8u * 32u) {
            float v[8];
            for (uint u = 0; u < 8u; ++u) v[u] = partial[(s + 32u * u) * p.n_out + t];
            for (uint u = 0; u < 8u; ++u) acc += v[u];
        }
        for (; s < p.splits; s += 32u) acc += partial[s * p.n_out + t];
        acc = simd_sum(acc);
        if (lane == 0) out[t] = T(acc * p.alpha);
    }
}

// ---- sums over whole 16-byte chunks: a full sum (mean_all) and a per-channel sum of (N, C, HW)
// (a bias gradient), both as rows of N runs of HW contiguous elements (HW % W == 0, W = 16 /
// sizeof(T), x 16-byte aligned): row r = channel r, run n at chunk (n C + r) HW / W; a full sum
// is one row of one run. A threadgroup owns p.chunk elements of a row (split s of p.splits):
// STREAM_U chunks per thread per step, their loads issued together, one division per chunk
// (its run), one threadgroup reduction, one float partial per (row, split); sum_rows_finish adds
// a row's partials in a fixed order (8 loads in flight per thread) and scales by alpha. The plan
// (arith.py _sum_rows) depends on the shape only: the same sums on every backend and device.
// reduce_inner's simdgroup per (output, split) read 4 elements per lane per step and, for a full
// sum, left up to 8192 partials to one simdgroup (latency-bound: 0.57 of the copy bandwidth on an
// H100); this is the measured chan_sum v3 of kernels/dev/membound.metal (0.96 for the bias sum).
// ReduceParams: n_out = C (rows), n_red = N HW, inner = HW, splits, chunk (elements), alpha.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void sum_rows_part(device const T* x [[buffer(0)]],
                          device float* part [[buffer(1)]],
                          constant ReduceParams& p [[buffer(2)]],
                          uint tid [[thread_position_in_threadgroup]],
                          uint tg [[threadgroup_position_in_grid]],
                          uint ntg [[threadgroups_per_grid]],
                          uint lane [[thread_index_in_simdgroup]],
                          uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    const uint W = 16u / uint(sizeof(T));
    const uint cpr = p.inner / W;  // chunks per run
    const uint cps = p.chunk / W;  // chunks per split
    const uint row_chunks = p.n_red / W;
    for (uint g = tg; g < p.n_out * p.splits; g += ntg) {
        const uint row = g / p.splits, s = g - row * p.splits;
        const uint c0 = s * cps, c1 = min(c0 + cps, row_chunks);
        float acc = 0.0f;
        for (uint c = c0 + tid; c < c1; c += STREAM_U * TR_TG) {
            float v[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
            for (uint u = 0; u < STREAM_U; ++u) {
                const uint cc = min(c + u * TR_TG, c1 - 1u);
                const uint n = cc / cpr, h = cc - n * cpr;
                stream_load<16 / sizeof(T)>(x, (n * p.n_out + row) * cpr + h, v[u]);
            }
#pragma unroll 2  // STREAM_U
            for (uint u = 0; u < STREAM_U; ++u) {
                if (c + u * TR_TG < c1) {
                    float t = 0.0f;
                    for (uint e = 0; e < W; ++e) t += v[u][e];
                    acc += t;
                }
            }
        }
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) part[g] = acc;
    }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void sum_rows_finish(device const float* part [[buffer(0)]],
                            device T* out [[buffer(1)]],
                            constant ReduceParams& p [[buffer(2)]],
                            uint tid [[thread_position_in_threadgroup]],
                            uint tg [[threadgroup_position_in_grid]],
                            uint ntg [[threadgroups_per_grid]],
                            uint lane [[thread_index_in_simdgroup]],
                            uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float scratch[TR_TG];
    for (uint r = tg; r < p.n_out; r += ntg) {
        device const float* q = part + r * p.splits;
        float acc = 0.0f;
        for (uint k = tid; k < p.splits; k += 8u * TR_TG) {
            float v[8];
            for (uint u = 0; u < 8u; ++u) {
                const uint i = k + u * TR_TG;
                v[u] = i < p.splits ? q[i] : 0.0f;
            }
            for (uint u = 0; u < 8u; ++u) acc += v[u];
        }
        acc = tile_reduce(acc, TR_SUM, 1u, TR_TG, lane, sg, scratch);
        if (tid == 0) out[r] = T(acc * p.alpha);
    }
}

#define instantiate_ew(name, OP, T) \
    INSTANTIATE(name, arith_ew, OP, T)
#define instantiate_flat(name, OP, T)                                                          \
    INSTANTIATE(name, arith_flat, OP, T, false)                                                \
    INSTANTIATE(name "_splat", arith_flat, OP, T, true)
#define instantiate_chan(name, OP, T) \
    INSTANTIATE(name, arith_chan, OP, T)
#define instantiate_bwd(name, OP, T) \
    INSTANTIATE(name, arith_bwd, OP, T)
#define instantiate_reduce(name, kind, OP, T) \
    INSTANTIATE(name, reduce_##kind, OP, T)

#define instantiate_all(T)                                                            \
    instantiate_ew("add_fwd_" #T, OP_ADD, T)                                          \
    instantiate_ew("sub_fwd_" #T, OP_SUB, T)                                          \
    instantiate_ew("mul_fwd_" #T, OP_MUL, T)                                          \
    instantiate_ew("div_fwd_" #T, OP_DIV, T)                                          \
    instantiate_ew("scale_fwd_" #T, OP_SCALE, T)                                      \
    instantiate_ew("div_bwd_rhs_" #T, OP_DIVRHS, T)                                   \
    instantiate_flat("add_fwd_flat_" #T, OP_ADD, T)                                   \
    instantiate_flat("sub_fwd_flat_" #T, OP_SUB, T)                                   \
    instantiate_flat("mul_fwd_flat_" #T, OP_MUL, T)                                   \
    instantiate_flat("div_fwd_flat_" #T, OP_DIV, T)                                   \
    instantiate_flat("scale_fwd_flat_" #T, OP_SCALE, T)                               \
    instantiate_flat("div_bwd_rhs_flat_" #T, OP_DIVRHS, T)                            \
    instantiate_chan("add_fwd_chan_" #T, OP_ADD, T)                                   \
    instantiate_chan("sub_fwd_chan_" #T, OP_SUB, T)                                   \
    instantiate_chan("mul_fwd_chan_" #T, OP_MUL, T)                                   \
    instantiate_chan("div_fwd_chan_" #T, OP_DIV, T)                                   \
    instantiate_chan("scale_fwd_chan_" #T, OP_SCALE, T)                               \
    instantiate_chan("div_bwd_rhs_chan_" #T, OP_DIVRHS, T)                            \
    instantiate_bwd("add_bwd_" #T, OP_ADD, T)                                         \
    instantiate_bwd("sub_bwd_" #T, OP_SUB, T)                                         \
    instantiate_bwd("mul_bwd_" #T, OP_MUL, T)                                         \
    instantiate_bwd("div_bwd_" #T, OP_DIV, T)                                         \
    instantiate_reduce("sum_fwd_outer_" #T, outer, OP_SCALE, T)                       \
    instantiate_reduce("sum_fwd_inner_" #T, inner, OP_SCALE, T)                       \
    instantiate_reduce("mul_bwd_outer_" #T, outer, OP_MUL, T)                         \
    instantiate_reduce("mul_bwd_inner_" #T, inner, OP_MUL, T)                         \
    instantiate_reduce("div_bwd_lhs_outer_" #T, outer, OP_DIV, T)                     \
    instantiate_reduce("div_bwd_lhs_inner_" #T, inner, OP_DIV, T)                     \
    instantiate_reduce("div_bwd_rhs_outer_" #T, outer, OP_DIVRHS, T)                  \
    instantiate_reduce("div_bwd_rhs_inner_" #T, inner, OP_DIVRHS, T)                  \
    INSTANTIATE("sum_fwd_finish_" #T, reduce_finish, T)                              \
    INSTANTIATE("sum_rows_part_" #T, sum_rows_part, T)                                \
    INSTANTIATE("sum_rows_finish_" #T, sum_rows_finish, T)

instantiate_all(float)
instantiate_all(half)
