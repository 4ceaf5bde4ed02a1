// conv_im2col.metal -- convolutions as GEMMs over the unfolded input (im2col), the cpu
// backend's path (pymetalnn/ops/conv_im2col.py decides; correct on every backend).
//
// Design note
// -----------
// On a CPU the tiled implicit-GEMM kernels of conv.metal run as work-item loops around their
// threadgroup tiles and barriers, and pay for whole tiles however few output pixels a layer has.
// Unfolding the input once (memory-bound, one pass) turns each op into one batched GEMM of
// gemm.metal, whose blocked tiles vectorize on a CPU:
//     forward      y[n] (K x OH*OW)   = w (K x C*KH*KW) . col[n] (C*KH*KW x OH*OW)
//     input grad   dcol[n]            = w^T . dy[n],  then dx = col2im(dcol)
//     weight grad  dw (K x C*KH*KW)   = sum over n of dy[n] . colt[n]  (colt[n] = col[n]^T)
// col[n][(c, r, s)][(oh, ow)] = x[n, c, oh * SH - PH + r * DH, ow * SW - PW + s * DW] (0 in the
// padding). The host runs a batch in chunks of images whose columns fit its scratch bound; the
// kernels see one chunk (p.N images, pointers at its first image). One group (G = 1) only.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
using namespace metal;

// One thread per row (n, c, r, s, oh) of OW columns, grid-stride.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_im2col(device const T* x [[buffer(0)]], device T* col [[buffer(1)]],
                          constant Conv2dParams& p [[buffer(2)]],
                          uint gid [[thread_position_in_grid]],
                          uint tpg [[threads_per_threadgroup]],
                          uint ntg [[threadgroups_per_grid]]) {
    const uint rows = p.N * p.C * p.KH * p.KW * p.OH;
    for (uint i = gid; i < rows; i += tpg * ntg) {
        uint oh = i % p.OH, t = i / p.OH;
        uint s = t % p.KW;
        t /= p.KW;
        uint r = t % p.KH, nc = t / p.KH;  // nc = n * C + c
        device T* out = col + i * p.OW;
        int ih = int(oh * p.SH + r * p.DH) - p.PH;
        if (uint(ih) >= p.H) {  // negative wraps to a huge uint
            for (uint ow = 0; ow < p.OW; ++ow) out[ow] = T(0);
            continue;
        }
        device const T* src = x + (nc * p.H + uint(ih)) * p.W;
        int iw0 = int(s * p.DW) - p.PW;
        for (uint ow = 0; ow < p.OW; ++ow) {
            int iw = iw0 + int(ow * p.SW);
            out[ow] = uint(iw) < p.W ? src[iw] : T(0);
        }
    }
}

// The same columns transposed, colt[n][(oh, ow)][(c, r, s)]: the weight gradient's GEMM then
// reads its B operand with the output columns contiguous. One thread per (n, oh, ow) row.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_im2col_t(device const T* x [[buffer(0)]], device T* colt [[buffer(1)]],
                            constant Conv2dParams& p [[buffer(2)]],
                            uint gid [[thread_position_in_grid]],
                            uint tpg [[threads_per_threadgroup]],
                            uint ntg [[threadgroups_per_grid]]) {
    const uint rows = p.N * p.OH * p.OW, crs = p.C * p.KH * p.KW;
    for (uint i = gid; i < rows; i += tpg * ntg) {
        uint ow = i % p.OW, t = i / p.OW;
        uint oh = t % p.OH, n = t / p.OH;
        device T* out = colt + i * crs;
        device const T* xn = x + n * p.C * p.H * p.W;
        int ih0 = int(oh * p.SH) - p.PH, iw0 = int(ow * p.SW) - p.PW;
        for (uint c = 0; c < p.C; ++c) {
            for (uint r = 0; r < p.KH; ++r) {
                int ih = ih0 + int(r * p.DH);
                bool row_in = uint(ih) < p.H;
                for (uint s = 0; s < p.KW; ++s) {
                    int iw = iw0 + int(s * p.DW);
                    *out++ = row_in && uint(iw) < p.W ? xn[(c * p.H + uint(ih)) * p.W + uint(iw)] : T(0);
                }
            }
        }
    }
}

// dx[n, c, h, w] = sum over (r, s) of dcol[n][(c, r, s)][(oh, ow)] where h = oh * SH - PH + r * DH
// and w = ow * SW - PW + s * DW (+ b[c], conv_transpose2d's bias, if p.has_bias); the terms are
// added in (r, s) order. One thread per CONV_COL2IM_W consecutive elements of a dx row, grid-
// stride: at stride 1 each tap (r, s) adds a contiguous run of a dcol row to the thread's
// accumulators, a loop a CPU vectorizes (one element per thread with a branch per tap: 9.5 ms
// for MNIST's 64x32x14x14 5x5 input gradient on the 2-core test box; this way 3.9 ms).
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_col2im(device const T* dcol [[buffer(0)]], device const T* b [[buffer(1)]],
                          device T* dx [[buffer(2)]], constant Conv2dParams& p [[buffer(3)]],
                          uint gid [[thread_position_in_grid]],
                          uint tpg [[threads_per_threadgroup]],
                          uint ntg [[threadgroups_per_grid]]) {
    const uint chunks = (p.W + CONV_COL2IM_W - 1u) / CONV_COL2IM_W;
    const uint units = p.N * p.C * p.H * chunks;
    const uint OHW = p.OH * p.OW;
    for (uint u = gid; u < units; u += tpg * ntg) {
        uint w0 = (u % chunks) * CONV_COL2IM_W, t = u / chunks;
        uint h = t % p.H, nc = t / p.H;
        const int wn = int(min(CONV_COL2IM_W, p.W - w0));
        float acc[CONV_COL2IM_W];
        const float b0 = p.has_bias ? float(b[nc % p.C]) : 0.0f;
        for (uint j = 0; j < CONV_COL2IM_W; ++j) acc[j] = b0;
        device const T* src = dcol + nc * p.KH * p.KW * OHW;
        if (p.SH == 1u && p.SW == 1u) {  // no divisibility tests (no integer division per tap)
            for (uint r = 0; r < p.KH; ++r) {
                uint oh = h + uint(p.PH) - r * p.DH;  // wraps past OH when negative
                if (oh >= p.OH) continue;
                device const T* row = src + r * p.KW * OHW + oh * p.OW;
                for (uint s = 0; s < p.KW; ++s) {
                    // element j takes ow = w0 + j + off where that lies in [0, OW)
                    const int off = int(w0) + p.PW - int(s * p.DW);
                    const int lo = max(0, -off), hi = min(wn, int(p.OW) - off);
                    device const T* q = row + s * OHW;
                    for (int j = lo; j < hi; ++j) acc[j] += float(q[off + j]);
                }
            }
        } else {
            for (int j = 0; j < wn; ++j) {
                const uint w = w0 + uint(j);
                for (uint r = 0; r < p.KH; ++r) {
                    int ohs = int(h) + p.PH - int(r * p.DH);
                    if (ohs < 0 || uint(ohs) % p.SH != 0u) continue;
                    uint oh = uint(ohs) / p.SH;
                    if (oh >= p.OH) continue;
                    for (uint s = 0; s < p.KW; ++s) {
                        int ows = int(w) + p.PW - int(s * p.DW);
                        if (ows < 0 || uint(ows) % p.SW != 0u) continue;
                        uint ow = uint(ows) / p.SW;
                        if (ow >= p.OW) continue;
                        acc[j] += float(src[(r * p.KW + s) * OHW + oh * p.OW + ow]);
                    }
                }
            }
        }
        device T* out = dx + (nc * p.H + h) * p.W + w0;
        for (int j = 0; j < wn; ++j) out[j] = T(acc[j]);
    }
}

// y[n, k, :, :] = b[k]: the forward's bias, placed before its GEMM accumulates onto it (beta = 1).
// One thread per (n, k) plane, grid-stride.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_bias_fill(device const T* b [[buffer(0)]], device T* y [[buffer(1)]],
                             constant Conv2dParams& p [[buffer(2)]],
                             uint gid [[thread_position_in_grid]],
                             uint tpg [[threads_per_threadgroup]],
                             uint ntg [[threadgroups_per_grid]]) {
    const uint OHW = p.OH * p.OW, planes = p.N * p.K;
    for (uint i = gid; i < planes; i += tpg * ntg) {
        T v = b[i % p.K];
        device T* out = y + i * OHW;
        for (uint j = 0; j < OHW; ++j) out[j] = v;
    }
}

INSTANTIATE("conv2d_im2col_float", conv2d_im2col, float)
INSTANTIATE("conv2d_im2col_t_float", conv2d_im2col_t, float)
INSTANTIATE("conv2d_col2im_float", conv2d_col2im, float)
INSTANTIATE("conv2d_bias_fill_float", conv2d_bias_fill, float)
