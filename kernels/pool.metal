// pool.metal -- max / average / adaptive-average pooling over NCHW planes, and their gradients.
//
// Design: forward kernels run one thread per output element; gradient kernels run one thread
// per INPUT element and gather from the outputs whose windows contain it (a closed-form range of
// about ceil(extent/stride) rows times as many columns), so overlapping windows accumulate without
// atomics, in a fixed order: deterministic, and each input written once. Everything is
// memory-bound; consecutive threads take consecutive columns so loads and stores coalesce, and
// re-reads of overlapping windows hit the cache.
//
// Max pooling follows torch exactly: the first maximum in row-major window order wins ties
// (only a strictly greater value replaces it), a NaN wins over everything and a later NaN over
// an earlier one, and a window entirely in padding gives -inf (index -1). The gradient goes to
// that one element; max_pool2d_bwd either reads the forward's indices or recomputes each
// candidate window's argmax from x (re-reads that stay in cache), so it needs no index buffer.
// Average pooling uses torch's divisor: the window clipped to the padded input
// (count_include_pad) or to the input, or divisor_override. Global average pooling (one output
// per plane) is a reduction: one simdgroup per plane with vector loads and simd_sum.
// Storage float or half; comparisons and sums in float.
//
// Gradient variants the host picks (pymetalnn/ops/pool.py), for the common cases where the
// generic gather spends far more instructions than its memory traffic allows (a division per
// window for the average divisor, index arithmetic per element, 9 window ranges for 1 store):
// - avg_pool2d_bwd_const: every window has the same divisor (divisor_override, or windows never
//   clipped by the border that counts: InceptionV3's 3x3 stride 1 padding 1 count_include_pad).
//   One thread per strip of POOL_AVG_ROWS rows of one column reads and divides each candidate
//   output once for the strip and adds it to every row that takes it; no divisor computation.
// - max_pool2d_bwd_idx_s2x2 / _s1x2 (stride (2, 2) / (1, 2), any kernel, padding, dilation,
//   ceil_mode): one thread per stride-sized input tile reads the tile's candidate outputs (index
//   and grad) once and compares each index with the tile's elements, so every element gets the
//   same sum, in the same order, as from max_pool2d_bwd_idx.
// Both add, per element, the same terms in the same order as the generic kernels: bitwise equal
// results (tests/test_pool.py checks), so a variant switch cannot move a training run. And both
// stay gathers (each input written by one thread, no atomics): deterministic.
//
// Integer division by runtime values costs ~20 instructions on GPUs, more than these kernels'
// whole memory budget per element, so every division (index decomposition, window ranges) is a
// multiply-high and shift by a host-computed magic number (magic_div). That needs numerators
// < 2^31: the host limits tensors to 2^31 - 1 elements.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

// Pool2dParams.flags: POOL_WRITE_INDICES, POOL_COUNT_PAD (params.h)

// n / d for n < 2^31, given d's magic pair (m, s): (mulhi(n, m) + n) >> s (Granlund-Montgomery,
// as PyTorch's IntDivider; pymetalnn.ops.pool._magic computes m, s).
inline uint magic_div(uint n, uint m, uint s) {
    return (uint((ulong(n) * ulong(m)) >> 32) + n) >> s;
}

// First tap index r >= 0 with start + r * d >= 0 (torch: `while (start < 0) start += d`).
inline int first_tap(int start, int d, uint m, uint s) {
    return start < 0 ? int(magic_div(uint(-start + d - 1), m, s)) : 0;
}

// Outputs o whose window [o * st - p, o * st - p + (k - 1) * d] contains i: o in [lo, hi].
inline int2 out_range(int i, int k, int st, int p, int d, int n_out, uint m, uint s) {
    int num = i + p - (k - 1) * d;
    int lo = num <= 0 ? 0 : int(magic_div(uint(num + st - 1), m, s));
    int hi = min(int(magic_div(uint(i + p), m, s)), n_out - 1);  // i + p >= 0
    return int2(lo, hi);
}

// Tiled gradient variants: thread gid owns tile (ty, tx) of plane `plane` (returned as
// uint3(plane, ty, tx)); the host sets tiles_h x tiles_w tiles per plane and their magic pairs.
inline uint3 tile_of(uint gid, Pool2dParams p) {
    uint r = magic_div(gid, p.m_tw, p.s_tw), plane = magic_div(r, p.m_th, p.s_th);
    return uint3(plane, r - plane * p.tiles_h, gid - r * p.tiles_w);
}

// Max over the window of output (oh, ow) of one plane; returns the flat index h * IW + w of the
// winner (-1 if every tap is padding) and its value in `best`.
template <typename T>
inline int window_argmax(device const T* xp, int oh, int ow, Pool2dParams p, thread float& best) {
    int h0 = oh * p.SH - p.PH, w0 = ow * p.SW - p.PW;
    int r0 = first_tap(h0, p.DH, p.m_dh, p.s_dh), s0 = first_tap(w0, p.DW, p.m_dw, p.s_dw);
    int ih = int(p.IH), iw = int(p.IW);
    best = -INFINITY;
    int arg = -1;
    for (int r = r0; r < p.KH; ++r) {
        int h = h0 + r * p.DH;
        if (h >= ih) break;
        for (int s = s0; s < p.KW; ++s) {
            int w = w0 + s * p.DW;
            if (w >= iw) break;
            float v = float(xp[h * iw + w]);
            if (arg < 0 || v > best || isnan(v)) {
                best = v;
                arg = h * iw + w;
            }
        }
    }
    return arg;
}

// Where forward output gid (plane * plane_out + o) is stored: gid itself, or with p.out_nstride > 0
// element (n, c, o) of a channel slice of a larger NCHW tensor (n * out_nstride + c * plane_out + o).
inline uint out_index(uint gid, uint plane, uint o, uint plane_out, Pool2dParams p) {
    if (p.out_nstride == 0u) return gid;
    uint n = plane / p.out_C;
    return n * p.out_nstride + (plane - n * p.out_C) * plane_out + o;
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void max_pool2d_fwd(device const T* x [[buffer(0)]],
                           device T* y [[buffer(1)]],
                           device int* indices [[buffer(2)]],
                           constant Pool2dParams& p [[buffer(3)]],
                           uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_out = q.OH * q.OW;
    if (gid >= q.planes * plane_out) return;
    uint plane = magic_div(gid, q.m_out, q.s_out), o = gid - plane * plane_out;
    uint oh = magic_div(o, q.m_ow, q.s_ow), ow = o - oh * q.OW;
    float best;
    int arg = window_argmax(x + plane * (q.IH * q.IW), int(oh), int(ow), q, best);
    y[out_index(gid, plane, o, plane_out, q)] = T(best);
    if (q.flags & POOL_WRITE_INDICES) indices[gid] = arg;
}

// ---- fixed windows ------------------------------------------------------------------------
// The generic forward kernels walk the window in loops whose bounds and breaks depend on the
// border, so a thread has one load in flight at a time: the likely reason for their speed (H100,
// 32x64x112x112, 3x3 stride 2: max pooling at 0.62 (float) / 0.34 (half) of the copy bandwidth,
// average pooling 0.76 / 0.43; the kernels below, dev_membound.py on an H100 on 2026-12-07
// evening: max forward 0.69 / 0.36 of copy against the generic kernel's 0.62 / 0.34 in the same
// run, average 0.80 / 0.43 against 0.75 / 0.44, but the 3x3 stride-1 average 0.35 / 0.12
// against 0.38 / 0.13). For the windows
// networks use (KH x KW = 2x2, 3x3: ResNet, InceptionV3, VGG, LeNet) the taps are unrolled:
// every load is issued first (a tap outside the input reads the plane's first element and is
// masked), then the comparisons or sums run over the taps inside the input in row-major order,
// as the generic kernels visit them, so both give the same bits (ties, NaNs and indices
// included).
template <typename T, int KH, int KW>
inline void window_taps(device const T* xp, int h0, int w0, Pool2dParams p, thread float* v,
                        thread bool* in) {
    const int ih = int(p.IH), iw = int(p.IW);
    for (int r = 0; r < KH; ++r) {
        const int h = h0 + r * p.DH;
        for (int s = 0; s < KW; ++s) {
            const int w = w0 + s * p.DW;
            const bool ok = h >= 0 && h < ih && w >= 0 && w < iw;
            in[r * KW + s] = ok;
            v[r * KW + s] = float(xp[ok ? h * iw + w : 0]);
        }
    }
}

template <typename T, int KH, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void max_pool2d_fwd_k(device const T* x [[buffer(0)]],
                             device T* y [[buffer(1)]],
                             device int* indices [[buffer(2)]],
                             constant Pool2dParams& p [[buffer(3)]],
                             uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_out = q.OH * q.OW;
    if (gid >= q.planes * plane_out) return;
    uint plane = magic_div(gid, q.m_out, q.s_out), o = gid - plane * plane_out;
    uint oh = magic_div(o, q.m_ow, q.s_ow), ow = o - oh * q.OW;
    const int h0 = int(oh) * q.SH - q.PH, w0 = int(ow) * q.SW - q.PW;
    float v[KH * KW];
    bool in[KH * KW];
    window_taps<T, KH, KW>(x + plane * (q.IH * q.IW), h0, w0, q, v, in);
    float best = -INFINITY;
    int arg = -1;
    for (int r = 0; r < KH; ++r) {
        for (int s = 0; s < KW; ++s) {
            const float t = v[r * KW + s];
            if (in[r * KW + s] && (arg < 0 || t > best || isnan(t))) {
                best = t;
                arg = (h0 + r * q.DH) * int(q.IW) + w0 + s * q.DW;
            }
        }
    }
    y[out_index(gid, plane, o, plane_out, q)] = T(best);
    if (q.flags & POOL_WRITE_INDICES) indices[gid] = arg;
}

// Gradient from the forward's indices: sum grad_out over candidate outputs whose index is me.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void max_pool2d_bwd_idx(device const T* g [[buffer(0)]],
                               device const int* indices [[buffer(1)]],
                               device T* dx [[buffer(2)]],
                               constant Pool2dParams& p [[buffer(3)]],
                               uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_in = q.IH * q.IW;
    if (gid >= q.planes * plane_in) return;
    uint plane = magic_div(gid, q.m_in, q.s_in);
    int me = int(gid - plane * plane_in);
    int h = int(magic_div(uint(me), q.m_iw, q.s_iw)), w = me - h * int(q.IW);
    int2 rh = out_range(h, q.KH, q.SH, q.PH, q.DH, int(q.OH), q.m_sh, q.s_sh);
    int2 rw = out_range(w, q.KW, q.SW, q.PW, q.DW, int(q.OW), q.m_sw, q.s_sw);
    uint base = plane * (q.OH * q.OW);
    float acc = 0.0f;
    for (int oh = rh.x; oh <= rh.y; ++oh) {
        for (int ow = rw.x; ow <= rw.y; ++ow) {
            uint o = base + uint(oh) * q.OW + uint(ow);
            if (indices[o] == me) acc += float(g[o]);
        }
    }
    dx[gid] = T(acc);
}

// Gradient from the indices, one thread per TH x TW input tile (host: TH = SH, TW = SW, so the
// tiles partition the plane like the windows' starts): the candidate outputs of the whole tile
// (the union of its elements' ranges, about ceil(K/S)^2 for the tile instead of per element) are
// read once, and each index is compared with the tile's TH * TW targets. Per element, the
// matching outputs are still added in row-major output order, so the sums are bitwise those of
// max_pool2d_bwd_idx (a non-matching candidate adds +0). Consecutive threads read consecutive
// outputs (coalesced), and the index arithmetic is done once per tile.
// CH x CW > 0 (host: the tile's candidate ranges are at most CH rows and CW columns, 2 x 2 for
// 3x3 windows at stride 2): the candidates' index and gradient loads are unrolled and issued
// together (the runtime loops keep one load in flight at a time, as the forward's did),
// the ones past the range masked (index -3, never a target: they add +0 as a non-matching
// candidate does), so the sums stay bitwise those of the loops.
template <typename T, int TH, int TW, int CH, int CW>
[[max_total_threads_per_threadgroup(256)]]
kernel void max_pool2d_bwd_idx_tile(device const T* g [[buffer(0)]],
                                    device const int* indices [[buffer(1)]],
                                    device T* dx [[buffer(2)]],
                                    constant Pool2dParams& p [[buffer(3)]],
                                    uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    if (gid >= q.planes * q.tiles_h * q.tiles_w) return;
    uint3 t = tile_of(gid, q);
    int ih = int(q.IH), iw = int(q.IW);
    int h = int(t.y) * TH, w = int(t.z) * TW;
    int hl = min(h + TH, ih) - 1, wl = min(w + TW, iw) - 1;  // the tile's last row / column
    int lo_h = out_range(h, q.KH, q.SH, q.PH, q.DH, int(q.OH), q.m_sh, q.s_sh).x;
    int hi_h = out_range(hl, q.KH, q.SH, q.PH, q.DH, int(q.OH), q.m_sh, q.s_sh).y;
    int lo_w = out_range(w, q.KW, q.SW, q.PW, q.DW, int(q.OW), q.m_sw, q.s_sw).x;
    int hi_w = out_range(wl, q.KW, q.SW, q.PW, q.DW, int(q.OW), q.m_sw, q.s_sw).y;
    int me = h * iw + w;
    int target[TH * TW];  // flat index of each tile element; -2 (never an index) off the plane
    float acc[TH * TW];
    for (int r = 0; r < TH; ++r)
        for (int c = 0; c < TW; ++c) {
            target[r * TW + c] = (h + r <= hl && w + c <= wl) ? me + r * iw + c : -2;
            acc[r * TW + c] = 0.0f;
        }
    uint base = t.x * (q.OH * q.OW);
    if (CH > 0) {
        int ci[CH > 0 ? CH * CW : 1];
        float cv[CH > 0 ? CH * CW : 1];
        for (int a = 0; a < CH; ++a) {
            for (int b = 0; b < CW; ++b) {
                const bool ok = lo_h + a <= hi_h && lo_w + b <= hi_w;
                const uint o = ok ? base + uint(lo_h + a) * q.OW + uint(lo_w + b) : base;
                ci[a * CW + b] = ok ? indices[o] : -3;
                cv[a * CW + b] = float(g[o]);
            }
        }
        for (int c = 0; c < CH * CW; ++c)
            for (int k = 0; k < TH * TW; ++k) acc[k] += ci[c] == target[k] ? cv[c] : 0.0f;
    } else {
        for (int oh = lo_h; oh <= hi_h; ++oh) {
            uint row = base + uint(oh) * q.OW;
            for (int ow = lo_w; ow <= hi_w; ++ow) {
                int i = indices[row + uint(ow)];
                float v = float(g[row + uint(ow)]);
                for (int k = 0; k < TH * TW; ++k) acc[k] += i == target[k] ? v : 0.0f;
            }
        }
    }
    device T* d = dx + t.x * (q.IH * q.IW) + uint(me);
    for (int r = 0; r < TH; ++r)
        for (int c = 0; c < TW; ++c)
            if (h + r <= hl && w + c <= wl) d[r * iw + c] = T(acc[r * TW + c]);
}

// Gradient from x alone: recompute the argmax of each candidate window.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void max_pool2d_bwd(device const T* g [[buffer(0)]],
                           device const T* x [[buffer(1)]],
                           device T* dx [[buffer(2)]],
                           constant Pool2dParams& p [[buffer(3)]],
                           uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_in = q.IH * q.IW;
    if (gid >= q.planes * plane_in) return;
    uint plane = magic_div(gid, q.m_in, q.s_in);
    int me = int(gid - plane * plane_in);
    int h = int(magic_div(uint(me), q.m_iw, q.s_iw)), w = me - h * int(q.IW);
    int2 rh = out_range(h, q.KH, q.SH, q.PH, q.DH, int(q.OH), q.m_sh, q.s_sh);
    int2 rw = out_range(w, q.KW, q.SW, q.PW, q.DW, int(q.OW), q.m_sw, q.s_sw);
    device const T* xp = x + plane * plane_in;
    uint base = plane * (q.OH * q.OW);
    float acc = 0.0f;
    for (int oh = rh.x; oh <= rh.y; ++oh) {
        // h between two dilated taps of this window: it cannot be the argmax, skip the recompute
        uint dh = uint(h + q.PH - oh * q.SH);
        if (q.DH > 1 && magic_div(dh, q.m_dh, q.s_dh) * uint(q.DH) != dh) continue;
        for (int ow = rw.x; ow <= rw.y; ++ow) {
            uint dw = uint(w + q.PW - ow * q.SW);
            if (q.DW > 1 && magic_div(dw, q.m_dw, q.s_dw) * uint(q.DW) != dw) continue;
            float best;
            if (window_argmax(xp, oh, ow, q, best) == me)
                acc += float(g[base + uint(oh) * q.OW + uint(ow)]);
        }
    }
    dx[gid] = T(acc);
}

// torch's avg_pool2d divisor for output (oh, ow); also the clipped row/column ranges.
inline float avg_divisor(int oh, int ow, Pool2dParams p, thread int4& box) {
    int h0 = oh * p.SH - p.PH, w0 = ow * p.SW - p.PW;
    int h1 = min(h0 + p.KH, int(p.IH) + p.PH), w1 = min(w0 + p.KW, int(p.IW) + p.PW);
    int padded = (h1 - h0) * (w1 - w0);
    box = int4(max(h0, 0), min(h1, int(p.IH)), max(w0, 0), min(w1, int(p.IW)));
    if (p.divisor != 0) return float(p.divisor);
    if (p.flags & POOL_COUNT_PAD) return float(padded);
    return float((box.y - box.x) * (box.w - box.z));
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void avg_pool2d_fwd(device const T* x [[buffer(0)]],
                           device T* y [[buffer(1)]],
                           constant Pool2dParams& p [[buffer(2)]],
                           uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_out = q.OH * q.OW;
    if (gid >= q.planes * plane_out) return;
    uint plane = magic_div(gid, q.m_out, q.s_out), o = gid - plane * plane_out;
    uint oh = magic_div(o, q.m_ow, q.s_ow), ow = o - oh * q.OW;
    int4 box;
    float div = avg_divisor(int(oh), int(ow), q, box);
    if (box.x >= box.y || box.z >= box.w) {  // window wholly in padding (torch writes 0)
        y[out_index(gid, plane, o, plane_out, q)] = T(0.0f);
        return;
    }
    device const T* xp = x + plane * (q.IH * q.IW);
    float sum = 0.0f;
    for (int h = box.x; h < box.y; ++h)
        for (int w = box.z; w < box.w; ++w) sum += float(xp[h * int(q.IW) + w]);
    y[out_index(gid, plane, o, plane_out, q)] = T(sum / div);
}

// avg_pool2d_fwd for a fixed KH x KW window (see max_pool2d_fwd_k): the taps inside the
// window's clipped box are the taps inside the input (average pooling has no dilation), summed
// in the generic kernel's order.
template <typename T, int KH, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void avg_pool2d_fwd_k(device const T* x [[buffer(0)]],
                             device T* y [[buffer(1)]],
                             constant Pool2dParams& p [[buffer(2)]],
                             uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_out = q.OH * q.OW;
    if (gid >= q.planes * plane_out) return;
    uint plane = magic_div(gid, q.m_out, q.s_out), o = gid - plane * plane_out;
    uint oh = magic_div(o, q.m_ow, q.s_ow), ow = o - oh * q.OW;
    float v[KH * KW];
    bool in[KH * KW];
    window_taps<T, KH, KW>(x + plane * (q.IH * q.IW), int(oh) * q.SH - q.PH,
                           int(ow) * q.SW - q.PW, q, v, in);
    int4 box;
    float div = avg_divisor(int(oh), int(ow), q, box);
    float sum = 0.0f;
    for (int t = 0; t < KH * KW; ++t) sum = in[t] ? sum + v[t] : sum;
    // a window wholly in padding gives 0 (torch), as the generic kernel
    const bool empty = box.x >= box.y || box.z >= box.w;
    y[out_index(gid, plane, o, plane_out, q)] = T(empty ? 0.0f : sum / div);
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void avg_pool2d_bwd(device const T* g [[buffer(0)]],
                           device T* dx [[buffer(1)]],
                           constant Pool2dParams& p [[buffer(2)]],
                           uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    uint plane_in = q.IH * q.IW;
    if (gid >= q.planes * plane_in) return;
    uint plane = magic_div(gid, q.m_in, q.s_in);
    int me = int(gid - plane * plane_in);
    int h = int(magic_div(uint(me), q.m_iw, q.s_iw)), w = me - h * int(q.IW);
    int2 rh = out_range(h, q.KH, q.SH, q.PH, 1, int(q.OH), q.m_sh, q.s_sh);
    int2 rw = out_range(w, q.KW, q.SW, q.PW, 1, int(q.OW), q.m_sw, q.s_sw);
    uint base = plane * (q.OH * q.OW);
    float acc = 0.0f;
    for (int oh = rh.x; oh <= rh.y; ++oh) {
        for (int ow = rw.x; ow <= rw.y; ++ow) {
            int4 box;
            float div = avg_divisor(oh, ow, q, box);
            acc += float(g[base + uint(oh) * q.OW + uint(ow)]) / div;
        }
    }
    dx[gid] = T(acc);
}

// Average gradient when every window has the same divisor (host: divisor_override, or windows
// never clipped by the border that counts), passed in p.divisor: no per-window divisor. One
// thread per strip of POOL_AVG_ROWS rows of one column (consecutive threads take consecutive
// columns, so loads and stores coalesce): the column range is computed once, each candidate
// output's g / divisor is loaded and divided once for the strip and added to every row whose
// range takes it (for 3x3 stride 1: 18 loads and divisions per 4 elements instead of 9 loads,
// 9 divisor computations and 9 divisions each). Each element still adds the same terms in the
// same (row-major output) order as avg_pool2d_bwd: the results are bitwise those of the generic
// kernel, so switching variants cannot change a training run.
// POOL_AVG_ROWS (params.h)
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void avg_pool2d_bwd_const(device const T* g [[buffer(0)]],
                                 device T* dx [[buffer(1)]],
                                 constant Pool2dParams& p [[buffer(2)]],
                                 uint gid [[thread_position_in_grid]]) {
    Pool2dParams q = p;
    if (gid >= q.planes * q.tiles_h * q.tiles_w) return;
    uint3 t = tile_of(gid, q);
    int ih = int(q.IH), w = int(t.z), h0 = int(t.y) * POOL_AVG_ROWS;
    int2 rw = out_range(w, q.KW, q.SW, q.PW, 1, int(q.OW), q.m_sw, q.s_sw);
    int lo[POOL_AVG_ROWS];
    uint cnt[POOL_AVG_ROWS];  // row j takes output rows lo[j] .. lo[j] + cnt[j] - 1
    float acc[POOL_AVG_ROWS];
    int last = -1;  // the last output row any row of the strip takes
    for (int j = 0; j < POOL_AVG_ROWS; ++j) {
        int2 r = h0 + j < ih ? out_range(h0 + j, q.KH, q.SH, q.PH, 1, int(q.OH), q.m_sh, q.s_sh)
                             : int2(0, -1);  // off the plane: an empty range
        lo[j] = r.x;
        cnt[j] = uint(max(r.y - r.x + 1, 0));
        last = max(last, r.y);
        acc[j] = 0.0f;
    }
    float div = float(q.divisor);
    device const T* gp = g + t.x * (q.OH * q.OW);
    for (int oh = lo[0]; oh <= last; ++oh) {
        bool take[POOL_AVG_ROWS];  // one unsigned compare per row: lo[j] <= oh < lo[j] + cnt[j]
        for (int j = 0; j < POOL_AVG_ROWS; ++j) take[j] = uint(oh - lo[j]) < cnt[j];
        device const T* gr = gp + oh * int(q.OW);
        for (int ow = rw.x; ow <= rw.y; ++ow) {
            float v = float(gr[ow]) / div;
            for (int j = 0; j < POOL_AVG_ROWS; ++j)
                if (take[j]) acc[j] += v;
        }
    }
    device T* d = dx + t.x * (q.IH * q.IW) + uint(h0) * q.IW + uint(w);
    for (int j = 0; j < POOL_AVG_ROWS; ++j)
        if (h0 + j < ih) d[uint(j) * q.IW] = T(acc[j]);
}

// Adaptive average: output cell o of n_out over n_in covers [floor(o n_in / n_out),
// ceil((o + 1) n_in / n_out)).
// ceil((o + 1) n_in / n_out) = floor(((o + 1) n_in - 1) / n_out) + 1. The host keeps n_in * n_out
// < 2^31 so the numerators fit magic_div.
inline uint ad_start(uint o, uint n_in, uint m, uint s) { return magic_div(o * n_in, m, s); }
inline uint ad_end(uint o, uint n_in, uint m, uint s) {
    return magic_div((o + 1u) * n_in - 1u, m, s) + 1u;
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void adaptive_avg_pool2d_fwd(device const T* x [[buffer(0)]],
                                    device T* y [[buffer(1)]],
                                    constant AdaptivePool2dParams& p [[buffer(2)]],
                                    uint gid [[thread_position_in_grid]]) {
    AdaptivePool2dParams q = p;
    uint plane_out = q.OH * q.OW;
    if (gid >= q.planes * plane_out) return;
    uint plane = magic_div(gid, q.m_out, q.s_out), o = gid - plane * plane_out;
    uint oh = magic_div(o, q.m_ow, q.s_ow), ow = o - oh * q.OW;
    uint h0 = ad_start(oh, q.IH, q.m_oh, q.s_oh), h1 = ad_end(oh, q.IH, q.m_oh, q.s_oh);
    uint w0 = ad_start(ow, q.IW, q.m_ow, q.s_ow), w1 = ad_end(ow, q.IW, q.m_ow, q.s_ow);
    device const T* xp = x + plane * (q.IH * q.IW);
    float sum = 0.0f;
    for (uint h = h0; h < h1; ++h)
        for (uint w = w0; w < w1; ++w) sum += float(xp[h * q.IW + w]);
    y[gid] = T(sum / float((h1 - h0) * (w1 - w0)));
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void adaptive_avg_pool2d_bwd(device const T* g [[buffer(0)]],
                                    device T* dx [[buffer(1)]],
                                    constant AdaptivePool2dParams& p [[buffer(2)]],
                                    uint gid [[thread_position_in_grid]]) {
    AdaptivePool2dParams q = p;
    uint plane_in = q.IH * q.IW;
    if (gid >= q.planes * plane_in) return;
    uint plane = magic_div(gid, q.m_in, q.s_in), i = gid - plane * plane_in;
    uint h = magic_div(i, q.m_iw, q.s_iw), w = i - h * q.IW;
    // cells containing h: o in [floor(h OH / IH), ceil((h + 1) OH / IH) - 1]
    uint oh0 = ad_start(h, q.OH, q.m_ih, q.s_ih), oh1 = ad_end(h, q.OH, q.m_ih, q.s_ih);
    uint ow0 = ad_start(w, q.OW, q.m_iw, q.s_iw), ow1 = ad_end(w, q.OW, q.m_iw, q.s_iw);
    uint base = plane * (q.OH * q.OW);
    float acc = 0.0f;
    for (uint oh = oh0; oh < oh1; ++oh) {
        uint hs = ad_start(oh, q.IH, q.m_oh, q.s_oh), he = ad_end(oh, q.IH, q.m_oh, q.s_oh);
        for (uint ow = ow0; ow < ow1; ++ow) {
            uint ws = ad_start(ow, q.IW, q.m_ow, q.s_ow), we = ad_end(ow, q.IW, q.m_ow, q.s_ow);
            acc += float(g[base + oh * q.OW + ow]) / float((he - hs) * (we - ws));
        }
    }
    dx[gid] = T(acc);
}

// Global average: simdgroup gid / 32 reduces plane gid / 32. With p.vec (host: x 4-vector aligned
// and IH * IW % 4 == 0, so every plane is) lanes take 4-vectors; otherwise scalars.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void global_avg_pool2d_fwd(device const T* x [[buffer(0)]],
                                  device T* y [[buffer(1)]],
                                  constant AdaptivePool2dParams& p [[buffer(2)]],
                                  uint gid [[thread_position_in_grid]],
                                  uint lane [[thread_index_in_simdgroup]]) {
    AdaptivePool2dParams q = p;
    uint plane = gid / 32u;
    if (plane >= q.planes) return;  // whole simdgroups leave together
    uint n = q.IH * q.IW;
    device const T* xp = x + plane * n;
    float sum = 0.0f;
    // 4 loads per lane issued before they are added, in the same order as one at a time (the
    // same sum; a lane had one load in flight)
    if (q.vec != 0u) {
        device const vec<T, 4>* xv = (device const vec<T, 4>*)xp;
        const uint nv = n / 4u;
        uint i = lane;
        for (; i + 96u < nv; i += 128u) {
            vec<T, 4> v[4];
            for (uint u = 0; u < 4u; ++u) v[u] = xv[i + 32u * u];
            for (uint u = 0; u < 4u; ++u) {
                sum += (float(v[u].x) + float(v[u].y)) + (float(v[u].z) + float(v[u].w));
            }
        }
        for (; i < nv; i += 32u) {
            vec<T, 4> v = xv[i];
            sum += (float(v.x) + float(v.y)) + (float(v.z) + float(v.w));
        }
    } else {
        uint i = lane;
        for (; i + 96u < n; i += 128u) {
            float v[4];
            for (uint u = 0; u < 4u; ++u) v[u] = float(xp[i + 32u * u]);
            for (uint u = 0; u < 4u; ++u) sum += v[u];
        }
        for (; i < n; i += 32u) sum += float(xp[i]);
    }
    sum = simd_sum(sum);
    if (lane == 0u) y[plane] = T(sum / float(n));
}

#define POOL_INSTANTIATE(T)                                                                     \
    INSTANTIATE("max_pool2d_fwd_" #T, max_pool2d_fwd, T)                                        \
    INSTANTIATE("max_pool2d_bwd_" #T, max_pool2d_bwd, T)                                        \
    INSTANTIATE("max_pool2d_bwd_idx_" #T, max_pool2d_bwd_idx, T)                                \
    INSTANTIATE("max_pool2d_bwd_idx_s2x2_" #T, max_pool2d_bwd_idx_tile, T, 2, 2, 0, 0)          \
    INSTANTIATE("max_pool2d_bwd_idx_s1x2_" #T, max_pool2d_bwd_idx_tile, T, 1, 2, 0, 0)          \
    INSTANTIATE("max_pool2d_bwd_idx_s2x2_c2x2_" #T, max_pool2d_bwd_idx_tile, T, 2, 2, 2, 2)     \
    INSTANTIATE("max_pool2d_bwd_idx_s1x2_c3x2_" #T, max_pool2d_bwd_idx_tile, T, 1, 2, 3, 2)     \
    INSTANTIATE("avg_pool2d_bwd_const_" #T, avg_pool2d_bwd_const, T)                            \
    INSTANTIATE("avg_pool2d_fwd_" #T, avg_pool2d_fwd, T)                                        \
    INSTANTIATE("avg_pool2d_bwd_" #T, avg_pool2d_bwd, T)                                        \
    INSTANTIATE("adaptive_avg_pool2d_fwd_" #T, adaptive_avg_pool2d_fwd, T)                      \
    INSTANTIATE("adaptive_avg_pool2d_bwd_" #T, adaptive_avg_pool2d_bwd, T)                      \
    INSTANTIATE("global_avg_pool2d_fwd_" #T, global_avg_pool2d_fwd, T)                      \
    INSTANTIATE("max_pool2d_fwd_k2x2_" #T, max_pool2d_fwd_k, T, 2, 2)                           \
    INSTANTIATE("max_pool2d_fwd_k3x3_" #T, max_pool2d_fwd_k, T, 3, 3)                           \
    INSTANTIATE("avg_pool2d_fwd_k2x2_" #T, avg_pool2d_fwd_k, T, 2, 2)                           \
    INSTANTIATE("avg_pool2d_fwd_k3x3_" #T, avg_pool2d_fwd_k, T, 3, 3)

POOL_INSTANTIATE(float)
POOL_INSTANTIATE(half)
