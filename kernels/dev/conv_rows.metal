// conv_rows.metal -- numbered versions of the row-staged weight gradient (kernels/conv.metal's
// conv2d_bwd_weight_rows, v1), for benchmarks/dev_conv.py's "rows_v2" (ops.conv.ROWS_VARIANT).
// v2: the pixel loop unrolled by KW with the window's slots rotating by constant indices (v1
// shifts KW - 1 registers per pixel), and the staging's per-element column / pair recomputed
// from constants instead of held in registers (v1: 127 registers per thread on cuda, two
// threadgroups per SM; ncu on LeNet's 5x5 weight gradient, H200 2026-12-07: issue slots 65%
// busy, FMA pipe 44%). Unmeasured on a GPU yet.
#define CONV_NO_INSTANCES
#include "conv.metal"

template <typename T, typename A, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_weight_rows_v2(device const T* dy [[buffer(0)]],
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
    constexpr int XW = SEG + KW - 1, XP = XW | 1;    // staged x row, odd pitch: no bank conflicts
    constexpr int LD = RK * SEG / CONV_THREADS;      // dy loads per thread and step
    constexpr int LX = (RQ * XW + CONV_THREADS - 1) / CONV_THREADS;
    static_assert(KT == 8 && RK * SEG % CONV_THREADS == 0, "row tile does not fit 256 threads");
    threadgroup vec<A, 4> dys4[2 * SEG * DP / 4];
    threadgroup A xs[2 * RQ * XP];
    threadgroup A* dys = (threadgroup A*)dys4;

    const uint OHW = p.OH * p.OW, HW = p.H * p.W, KHW = p.KH * p.KW;
    const uint CRS = p.Cg * KHW, pairs = p.Cg * p.KH;
    const uint nseg = (p.OW + SEG - 1) / SEG, rows = p.N * p.OH * nseg;
    const uint tiles_k = (p.Kg + RK - 1) / RK, tiles_q = (pairs + RQ - 1) / RQ;
    const uint wsize = p.K * CRS;
    const uint kg = lid / RQ, q = lid % RQ;  // a simdgroup: one channel group, 32 pairs

    for (uint tile = tgid; tile < p.splits * p.G * tiles_k * tiles_q; tile += ntg) {
        const uint tq = tile % tiles_q;
        uint tmp = tile / tiles_q;
        const uint tk = tmp % tiles_k;
        tmp /= tiles_k;
        const uint g = tmp % p.G, split = tmp / p.G;
        const uint k0 = tk * RK, q0 = tq * RQ;
        const uint sbeg = split * p.chunk, send = min(sbeg + p.chunk, rows);

        // this thread's staged x elements: pair, column, and the pair's channel offset / row
        // per staged x element: channel offset and row offset (the column and pair follow from
        // e = lid + j * 256 by constant divisions; an invalid pair gets row offset -2^30: never
        // inside the image)
        uint xoff[LX];
        int xrow[LX];
#pragma unroll
        for (int j = 0; j < LX; ++j) {
            uint e = lid + uint(j * CONV_THREADS);
            uint pr = q0 + e / uint(XW);
            bool ok = e < uint(RQ * XW) && pr < pairs;
            uint pc = ok ? pr : 0;
            xoff[j] = (g * p.Cg + pc / p.KH) * HW;
            xrow[j] = ok ? int((pc % p.KH) * p.DH) - p.PH : -(1 << 30);
        }

        A acc[KT][KW];
#pragma unroll
        for (int i = 0; i < KT; ++i)
#pragma unroll
            for (int s = 0; s < KW; ++s) acc[i][s] = A(0);

        A rd[LD], rx[LX];
        uint len = 0;  // pixels of the segment staged in the buffer being computed
        for (uint st = sbeg; st <= send; ++st) {
            uint nlen = 0;
            if (st < send) {  // fetch segment st into registers
                uint si = st % nseg, row = st / nseg;
                uint img = row / p.OH, oh = row % p.OH, ow0 = si * uint(SEG);
                nlen = min(uint(SEG), p.OW - ow0);
                device const T* dyp = dy + (img * p.K + g * p.Kg) * OHW + oh * p.OW + ow0;
#pragma unroll
                for (int j = 0; j < LD; ++j) {
                    uint e = lid + uint(j * CONV_THREADS), o = e % uint(SEG), k = k0 + e / uint(SEG);
                    rd[j] = o < nlen && k < p.Kg ? A(dyp[k * OHW + o]) : A(0);
                }
                device const T* xp = x + img * p.C * HW;
                int ih0 = int(oh * p.SH), iw0 = int(ow0) - p.PW;
#pragma unroll
                for (int j = 0; j < LX; ++j) {
                    uint col = (lid + uint(j * CONV_THREADS)) % uint(XW);
                    int ih = ih0 + xrow[j], iw = iw0 + int(col);
                    bool ok = col < nlen + uint(KW - 1) && uint(ih) < p.H && uint(iw) < p.W;
                    rx[j] = ok ? A(xp[xoff[j] + uint(ih) * p.W + uint(iw)]) : A(0);
                }
            }
            if (st > sbeg) {  // segment st - 1 from threadgroup memory
                threadgroup const A* xr = xs + ((st - 1) & 1) * uint(RQ * XP) + q * uint(XP);
                threadgroup const vec<A, 4>* dr =
                    (threadgroup const vec<A, 4>*)(dys + ((st - 1) & 1) * uint(SEG * DP) + kg * uint(KT));
                A win[KW];
#pragma unroll
                for (int s = 0; s < KW - 1; ++s) win[s] = xr[s];
                uint o = 0;
                // KW pixels per round with the window's slots rotating by constant indices
                // (slot (j + s) % KW holds x[o + j + s]): no register moves
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
            if (st < send) {  // registers into the other buffer
                uint buf = st & 1;
#pragma unroll
                for (int j = 0; j < LD; ++j) {
                    uint e = lid + uint(j * CONV_THREADS);
                    dys[buf * uint(SEG * DP) + (e % uint(SEG)) * uint(DP) + e / uint(SEG)] = rd[j];
                }
#pragma unroll
                for (int j = 0; j < LX; ++j) {
                    uint e = lid + uint(j * CONV_THREADS);
                    if (e < uint(RQ * XW)) xs[buf * uint(RQ * XP) + (e / uint(XW)) * uint(XP) + e % uint(XW)] = rx[j];
                }
            }
            len = nlen;
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

// v3: v2 with whole output rows packed into one segment where a row is narrow: R = rows per
// segment (rows_per_segment below, mirrored by ops.conv._rows_per_segment) consecutive output rows
// oh of one image, each staged as its own input row with the KW - 1 halo. LeNet's 14-pixel rows
// (KW 5) fill 28 of the 32 slots instead of 14, halving the per-segment staging, barrier and
// partial-sum overhead per pixel. Rows wider than SEG are cut in pieces as in v1 (R = 1).
template <int SEG, int KW>
inline uint rows_per_segment(uint OW) {
    return OW > uint(SEG) ? 1u : min(uint(SEG) / OW, uint(SEG + KW - 1) / (OW + uint(KW - 1)));
}

template <typename T, typename A, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_weight_rows_v3(device const T* dy [[buffer(0)]],
                                   device const T* x [[buffer(1)]],
                                   device float* wsum [[buffer(2)]],
                                   constant Conv2dParams& p [[buffer(3)]],
                                   uint lid [[thread_position_in_threadgroup]],
                                   uint tgid [[threadgroup_position_in_grid]],
                                   uint ntg [[threadgroups_per_grid]]) {
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

INSTANTIATE("conv2d_bwd_weight_rows3v2_float", conv2d_bwd_weight_rows_v2, float, float, 3)
INSTANTIATE("conv2d_bwd_weight_rows5v2_float", conv2d_bwd_weight_rows_v2, float, float, 5)
INSTANTIATE("conv2d_bwd_weight_rows7v2_float", conv2d_bwd_weight_rows_v2, float, float, 7)
INSTANTIATE("conv2d_bwd_weight_rows3v3_float", conv2d_bwd_weight_rows_v3, float, float, 3)
INSTANTIATE("conv2d_bwd_weight_rows5v3_float", conv2d_bwd_weight_rows_v3, float, float, 5)
INSTANTIATE("conv2d_bwd_weight_rows7v3_float", conv2d_bwd_weight_rows_v3, float, float, 7)
INSTANTIATE("conv2d_bwd_reduce_float", conv2d_bwd_reduce, float)
