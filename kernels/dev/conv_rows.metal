// conv_rows.metal -- numbered versions of the row-staged weight gradient, for
// benchmarks/dev_conv.py's "rows_v1", "rows_v2" (ops.conv.ROWS_DEV). kernels/conv.metal's
// conv2d_bwd_weight_rows is v3: v2 with narrow output rows packed several to a segment.
// v1: one output-row segment of up to SEG pixels per step (ncu on LeNet's 5x5 weight gradient,
// H200 2026-12-07: 127 registers per thread on cuda, two threadgroups per SM, issue slots 65%
// busy, FMA pipe 44%; LeNet's 14-pixel rows fill 14 of the 32 slots).
// v2: the pixel loop unrolled by KW with the window's slots rotating by constant indices (v1
// shifts KW - 1 registers per pixel), and the staging's per-element column / pair recomputed
// from constants instead of held in registers.
#define CONV_NO_INSTANCES
#include "conv.metal"

// v1: the first production version (one row segment of up to SEG pixels per step).
template <typename T, typename A, int KW>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bwd_weight_rows_v1(device const T* dy [[buffer(0)]],
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
        uint xoff[LX], xcol[LX], xq[LX];
        int xrow[LX];
        bool xok[LX];
#pragma unroll
        for (int j = 0; j < LX; ++j) {
            uint e = lid + uint(j * CONV_THREADS);
            uint pq = e / uint(XW), pr = q0 + pq;
            xok[j] = e < uint(RQ * XW) && pr < pairs;
            uint pc = xok[j] ? pr : 0;
            xq[j] = pq;
            xcol[j] = e % uint(XW);
            xoff[j] = (g * p.Cg + pc / p.KH) * HW;
            xrow[j] = int((pc % p.KH) * p.DH) - p.PH;
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
                    int ih = ih0 + xrow[j], iw = iw0 + int(xcol[j]);
                    bool ok = xok[j] && xcol[j] < nlen + uint(KW - 1) && uint(ih) < p.H && uint(iw) < p.W;
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
                for (uint o = 0; o < len; ++o) {
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
                for (int j = 0; j < LX; ++j)
                    if (lid + uint(j * CONV_THREADS) < uint(RQ * XW))
                        xs[buf * uint(RQ * XP) + xq[j] * uint(XP) + xcol[j]] = rx[j];
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

INSTANTIATE("conv2d_bwd_weight_rows3v2_float", conv2d_bwd_weight_rows_v2, float, float, 3)
INSTANTIATE("conv2d_bwd_weight_rows5v2_float", conv2d_bwd_weight_rows_v2, float, float, 5)
INSTANTIATE("conv2d_bwd_weight_rows7v2_float", conv2d_bwd_weight_rows_v2, float, float, 7)
INSTANTIATE("conv2d_bwd_weight_rows3v1_float", conv2d_bwd_weight_rows_v1, float, float, 3)
INSTANTIATE("conv2d_bwd_weight_rows5v1_float", conv2d_bwd_weight_rows_v1, float, float, 5)
INSTANTIATE("conv2d_bwd_weight_rows7v1_float", conv2d_bwd_weight_rows_v1, float, float, 7)
INSTANTIATE("conv2d_bwd_reduce_float", conv2d_bwd_reduce, float)
