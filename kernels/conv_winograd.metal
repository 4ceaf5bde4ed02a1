// conv_winograd.metal -- Winograd F(MxM, RxR) transforms for stride-1 convolutions with square
// R x R kernels (F(2x2, 3x3), F(4x4, 3x3), F(2x2, 5x5); conv2d forward, input gradient, weight
// gradient); pymetalnn/ops/conv_winograd.py runs them around batched GEMMs of gemm.metal
// (pymetalnn/ops/conv.py decides when).
//
// Design note
// -----------
// Why: a direct (implicit-GEMM) R x R conv spends R^2 multiply-adds per output and input channel
// pair; Winograd's minimal filtering spends alpha^2 / M^2 (alpha = M + R - 1; F(2x2, 3x3): 4,
// F(4x4, 3x3): 2.25 instead of 9, F(2x2, 5x5): 9 instead of 25) on the GEMMs, at the price of
// memory-bound transforms. cuDNN wins its largest margins over our direct kernels on exactly
// these layers (InceptionV3's 3x3 and 5x5 input and weight gradients).
// The algorithm (Lavin & Gray 2015), one alpha x alpha input tile d per M x M output tile, with
// constant matrices B^T (alpha x alpha), G (alpha x R), A^T (M x alpha), from the interpolation
// points 0, +-1 (alpha = 4) or 0, +-1, +-2 (alpha = 6) and infinity:
//   forward      Y = A^T [ (G g G^T) . (B^T d B) ] A                 (. : element-wise)
//   weight grad  dg = sum over tiles G^T [ (A dY A^T) . (B^T d B) ] G   (dY: the tile's M x M
//                output gradient, zero past the output; derived from the forward by linearity)
//   input grad   a forward conv of dy with the rotated, transposed filter (flip = 1) and padding
//                R - 1 - pad (negative: the tiles start inside dy).
// Unfused: each transform is one memory-bound kernel writing [xi][rows][P] matrices (xi < alpha^2
// the tile position, P = N * TH * TW tiles), and the channel reductions are alpha^2 independent
// GEMMs (one batched launch):
//   forward / input grad   Mt[xi] (K x P) = U[xi] (K x C) . V[xi] (C x P)
//   weight grad            dU[xi] (K x C) = Z[xi] (K x P) . V[xi]^T (P x C)
// A thread transforms one (row, tile) pair; consecutive threads take consecutive tiles, so the
// [xi][row][P] writes and reads coalesce. The 1-D transforms are written out (no table loads;
// the zeros of the matrices cost nothing) and applied to the columns, then the rows.
// Precision: storage T, arithmetic float. alpha = 6 multiplies rounding errors by its larger
// transform coefficients (up to 8); tests/test_conv.py bounds the error of each variant.
#include <metal_stdlib>
#include "params.h"
#include "neuron.h"
#include "instantiate.h"
using namespace metal;

// ---- 1-D transforms: r[i * rs] = (matrix . d)[i] for d[j * ds] ------------------------------
// B^T d (alpha -> alpha)
template <int AL>
inline void wino_bt(thread const float* d, int ds, thread float* r, int rs) {
    if (AL == 4) {
        r[0] = d[0] - d[2 * ds];
        r[rs] = d[ds] + d[2 * ds];
        r[2 * rs] = d[2 * ds] - d[ds];
        r[3 * rs] = d[ds] - d[3 * ds];
    } else {
        float d0 = d[0], d1 = d[ds], d2 = d[2 * ds], d3 = d[3 * ds], d4 = d[4 * ds], d5 = d[5 * ds];
        r[0] = 4.0f * d0 - 5.0f * d2 + d4;
        r[rs] = -4.0f * (d1 + d2) + d3 + d4;
        r[2 * rs] = 4.0f * (d1 - d2) - d3 + d4;
        r[3 * rs] = 2.0f * (d3 - d1) - d2 + d4;
        r[4 * rs] = 2.0f * (d1 - d3) - d2 + d4;
        r[5 * rs] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

// G g (R -> alpha)
template <int M, int R>
inline void wino_g(thread const float* g, int gs, thread float* r, int rs) {
    float g0 = g[0], g1 = g[gs], g2 = g[2 * gs];
    if (R == 5) {
        float g3 = g[3 * gs], g4 = g[4 * gs];
        r[0] = 0.25f * g0;
        r[rs] = (g0 + g1 + g2 + g3 + g4) * (-1.0f / 6.0f);
        r[2 * rs] = (g0 - g1 + g2 - g3 + g4) * (-1.0f / 6.0f);
        r[3 * rs] = g0 * (1.0f / 24.0f) + g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f) +
                    g3 * (1.0f / 3.0f) + g4 * (2.0f / 3.0f);
        r[4 * rs] = g0 * (1.0f / 24.0f) - g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f) -
                    g3 * (1.0f / 3.0f) + g4 * (2.0f / 3.0f);
        r[5 * rs] = g4;
    } else if (M == 2) {
        r[0] = g0;
        r[rs] = 0.5f * (g0 + g1 + g2);
        r[2 * rs] = 0.5f * (g0 - g1 + g2);
        r[3 * rs] = g2;
    } else {
        r[0] = 0.25f * g0;
        r[rs] = (g0 + g1 + g2) * (-1.0f / 6.0f);
        r[2 * rs] = (g0 - g1 + g2) * (-1.0f / 6.0f);
        r[3 * rs] = g0 * (1.0f / 24.0f) + g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f);
        r[4 * rs] = g0 * (1.0f / 24.0f) - g1 * (1.0f / 12.0f) + g2 * (1.0f / 6.0f);
        r[5 * rs] = g2;
    }
}

// A^T m (alpha -> M)
template <int M, int AL>
inline void wino_at(thread const float* m, int ms, thread float* r, int rs) {
    if (AL == 4) {
        r[0] = m[0] + m[ms] + m[2 * ms];
        r[rs] = m[ms] - m[2 * ms] - m[3 * ms];
    } else if (M == 2) {
        float m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms];
        r[0] = m[0] + (m1 + m2) + (m3 + m4);
        r[rs] = (m1 - m2) + 2.0f * (m3 - m4) + m[5 * ms];
    } else {
        float m0 = m[0], m1 = m[ms], m2 = m[2 * ms], m3 = m[3 * ms], m4 = m[4 * ms], m5 = m[5 * ms];
        float a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
        r[0] = m0 + a + c;
        r[rs] = b + 2.0f * d;
        r[2 * rs] = a + 4.0f * c;
        r[3 * rs] = b + 8.0f * d + m5;
    }
}

// A y (M -> alpha), A = (A^T)^T
template <int M, int AL>
inline void wino_a(thread const float* y, int ys, thread float* r, int rs) {
    if (AL == 4) {
        float y0 = y[0], y1 = y[ys];
        r[0] = y0;
        r[rs] = y0 + y1;
        r[2 * rs] = y0 - y1;
        r[3 * rs] = -y1;
    } else if (M == 2) {
        float y0 = y[0], y1 = y[ys];
        r[0] = y0;
        r[rs] = y0 + y1;
        r[2 * rs] = y0 - y1;
        r[3 * rs] = y0 + 2.0f * y1;
        r[4 * rs] = y0 - 2.0f * y1;
        r[5 * rs] = y1;
    } else {
        float y0 = y[0], y1 = y[ys], y2 = y[2 * ys], y3 = y[3 * ys];
        r[0] = y0;
        r[rs] = (y0 + y2) + (y1 + y3);
        r[2 * rs] = (y0 + y2) - (y1 + y3);
        r[3 * rs] = (y0 + 4.0f * y2) + (2.0f * y1 + 8.0f * y3);
        r[4 * rs] = (y0 + 4.0f * y2) - (2.0f * y1 + 8.0f * y3);
        r[5 * rs] = y3;
    }
}

// G^T u (alpha -> R)
template <int M, int R>
inline void wino_gt(thread const float* u, int us, thread float* r, int rs) {
    if (R == 5) {
        float u1 = u[us], u2 = u[2 * us], u3 = u[3 * us], u4 = u[4 * us];
        r[0] = 0.25f * u[0] - (u1 + u2) * (1.0f / 6.0f) + (u3 + u4) * (1.0f / 24.0f);
        r[rs] = (u2 - u1) * (1.0f / 6.0f) + (u3 - u4) * (1.0f / 12.0f);
        r[2 * rs] = (u3 + u4 - u1 - u2) * (1.0f / 6.0f);
        r[3 * rs] = (u2 - u1) * (1.0f / 6.0f) + (u3 - u4) * (1.0f / 3.0f);
        r[4 * rs] = -(u1 + u2) * (1.0f / 6.0f) + (u3 + u4) * (2.0f / 3.0f) + u[5 * us];
    } else if (M == 2) {
        float u0 = u[0], u1 = u[us], u2 = u[2 * us], u3 = u[3 * us];
        r[0] = u0 + 0.5f * (u1 + u2);
        r[rs] = 0.5f * (u1 - u2);
        r[2 * rs] = 0.5f * (u1 + u2) + u3;
    } else {
        float u0 = u[0], u1 = u[us], u2 = u[2 * us], u3 = u[3 * us], u4 = u[4 * us], u5 = u[5 * us];
        r[0] = 0.25f * u0 - (u1 + u2) * (1.0f / 6.0f) + (u3 + u4) * (1.0f / 24.0f);
        r[rs] = (u2 - u1) * (1.0f / 6.0f) + (u3 - u4) * (1.0f / 12.0f);
        r[2 * rs] = (u3 + u4 - u1 - u2) * (1.0f / 6.0f) + u5;
    }
}

// Tile p of P: image n, tile row th, tile column tw.
inline void wino_tile(uint t, constant WinogradParams& p, thread uint& n, thread uint& th,
                      thread uint& tw) {
    tw = t % p.TW;
    t /= p.TW;
    th = t % p.TH;
    n = t / p.TH;
}

// ---- input tiles: v[xi][c][t] = (B^T d B)[xi], d the alpha x alpha patch of x at tile t ------
template <typename T, int M, int R>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_wino_input(device const T* x [[buffer(0)]],
                              device T* v [[buffer(1)]],
                              constant WinogradParams& p [[buffer(2)]],
                              uint gid [[thread_position_in_grid]],
                              uint tpg [[threads_per_threadgroup]],
                              uint ntg [[threadgroups_per_grid]]) {
    constexpr int AL = M + R - 1;
    const uint total = p.C * p.P;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint t = i % p.P, c = i / p.P, n, th, tw;
        wino_tile(t, p, n, th, tw);
        int h0 = int(th * M) - p.PT, w0 = int(tw * M) - p.PL;
        device const T* xc = x + (n * p.C + c) * p.H * p.W;
        float d[AL * AL], e[AL * AL];
#pragma unroll
        for (int r = 0; r < AL; ++r) {
            int h = h0 + r;
            bool hok = uint(h) < p.H;  // negative wraps to a huge uint
#pragma unroll
            for (int s = 0; s < AL; ++s) {
                int w = w0 + s;
                d[r * AL + s] = hok && uint(w) < p.W ? float(xc[uint(h) * p.W + uint(w)]) : 0.0f;
            }
        }
#pragma unroll
        for (int s = 0; s < AL; ++s) wino_bt<AL>(d + s, AL, e + s, AL);  // columns: B^T d
#pragma unroll
        for (int r = 0; r < AL; ++r) wino_bt<AL>(e + r * AL, 1, d + r * AL, 1);  // rows: (.) B
#pragma unroll
        for (int q = 0; q < AL * AL; ++q) v[(q * p.C + c) * p.P + t] = T(d[q]);
    }
}

// ---- filters: u[xi][k][c] = (G g_kc G^T)[xi]; flip: u[xi][c][k] of g_kc rotated by 180 deg ---
// (K, C) are the conv's (w is (K, C, R, R)); the input gradient's GEMM rows are then C.
template <typename T, int M, int R>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_wino_filter(device const T* w [[buffer(0)]],
                               device T* u [[buffer(1)]],
                               constant WinogradParams& p [[buffer(2)]],
                               uint gid [[thread_position_in_grid]],
                               uint tpg [[threads_per_threadgroup]],
                               uint ntg [[threadgroups_per_grid]]) {
    constexpr int AL = M + R - 1;
    const uint total = p.K * p.C;
    for (uint i = gid; i < total; i += tpg * ntg) {
        // flip: consecutive threads take consecutive k (the fastest index of u's rows)
        uint k = p.flip ? i % p.K : i / p.C, c = p.flip ? i / p.K : i % p.C;
        device const T* g = w + (k * p.C + c) * uint(R * R);
        float gg[R * R], e[AL * R], r[AL * AL];
#pragma unroll
        for (int q = 0; q < R * R; ++q) gg[q] = float(g[p.flip ? R * R - 1 - q : q]);
#pragma unroll
        for (int s = 0; s < R; ++s) wino_g<M, R>(gg + s, R, e + s, R);  // columns: G g (alpha x R)
#pragma unroll
        for (int a = 0; a < AL; ++a) wino_g<M, R>(e + a * R, 1, r + a * AL, 1);  // rows: (.) G^T
        uint row = p.flip ? c : k, col = p.flip ? k : c, rows = p.flip ? p.C : p.K;
        uint cols = p.flip ? p.K : p.C;
#pragma unroll
        for (int q = 0; q < AL * AL; ++q) u[(q * rows + row) * cols + col] = T(r[q]);
    }
}

// ---- outputs: y tile = A^T m A (+ b, activation), m[xi] = mt[xi][k][t] ------------------------
template <typename T, int M, int R>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_wino_output(device const T* mt [[buffer(0)]],
                               device const T* b [[buffer(1)]],
                               device T* y [[buffer(2)]],
                               constant WinogradParams& p [[buffer(3)]],
                               uint gid [[thread_position_in_grid]],
                               uint tpg [[threads_per_threadgroup]],
                               uint ntg [[threadgroups_per_grid]]) {
    constexpr int AL = M + R - 1;
    const uint total = p.K * p.P;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint t = i % p.P, k = i / p.P, n, th, tw;
        wino_tile(t, p, n, th, tw);
        float m[AL * AL], e[M * AL], o[M * M];
#pragma unroll
        for (int q = 0; q < AL * AL; ++q) m[q] = float(mt[(q * p.K + k) * p.P + t]);
#pragma unroll
        for (int s = 0; s < AL; ++s) wino_at<M, AL>(m + s, AL, e + s, AL);  // columns: A^T m (M x alpha)
#pragma unroll
        for (int r = 0; r < M; ++r) wino_at<M, AL>(e + r * AL, 1, o + r * M, 1);  // rows: (.) A
        float bias = p.has_bias ? float(b[k]) : 0.0f;
        uint nstride = p.out_nstride ? p.out_nstride : p.K * p.OH * p.OW;
        device T* yk = y + n * nstride + k * p.OH * p.OW;
#pragma unroll
        for (int r = 0; r < M; ++r) {
            uint oh = th * M + r;
            if (oh >= p.OH) break;
#pragma unroll
            for (int s = 0; s < M; ++s) {
                uint ow = tw * M + s;
                if (ow < p.OW) yk[oh * p.OW + ow] = T(nn_activation(o[r * M + s] + bias, p.act, p.act_alpha));
            }
        }
    }
}

// ---- weight gradient: z[xi][k][t] = (A dY A^T)[xi] of the tile's output gradient -------------
template <typename T, int M, int R>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_wino_grad_output(device const T* dy [[buffer(0)]],
                                    device T* z [[buffer(1)]],
                                    constant WinogradParams& p [[buffer(2)]],
                                    uint gid [[thread_position_in_grid]],
                                    uint tpg [[threads_per_threadgroup]],
                                    uint ntg [[threadgroups_per_grid]]) {
    constexpr int AL = M + R - 1;
    const uint total = p.K * p.P;
    for (uint i = gid; i < total; i += tpg * ntg) {
        uint t = i % p.P, k = i / p.P, n, th, tw;
        wino_tile(t, p, n, th, tw);
        device const T* g = dy + (n * p.K + k) * p.OH * p.OW;
        float d[M * M], e[AL * M], r[AL * AL];
#pragma unroll
        for (int a = 0; a < M; ++a) {
            uint oh = th * M + a;
#pragma unroll
            for (int s = 0; s < M; ++s) {
                uint ow = tw * M + s;
                d[a * M + s] = oh < p.OH && ow < p.OW ? float(g[oh * p.OW + ow]) : 0.0f;
            }
        }
#pragma unroll
        for (int s = 0; s < M; ++s) wino_a<M, AL>(d + s, M, e + s, M);  // columns: A dY (alpha x M)
#pragma unroll
        for (int a = 0; a < AL; ++a) wino_a<M, AL>(e + a * M, 1, r + a * AL, 1);  // rows: (.) A^T
#pragma unroll
        for (int q = 0; q < AL * AL; ++q) z[(q * p.K + k) * p.P + t] = T(r[q]);
    }
}

// dw[k][c] = G^T du[.][k][c] G (du: the GEMMs' (alpha^2, K, C) result)
template <typename T, int M, int R>
[[max_total_threads_per_threadgroup(256)]]
kernel void conv2d_wino_filter_grad(device const T* du [[buffer(0)]],
                                    device T* dw [[buffer(1)]],
                                    constant WinogradParams& p [[buffer(2)]],
                                    uint gid [[thread_position_in_grid]],
                                    uint tpg [[threads_per_threadgroup]],
                                    uint ntg [[threadgroups_per_grid]]) {
    constexpr int AL = M + R - 1;
    const uint total = p.K * p.C;
    for (uint i = gid; i < total; i += tpg * ntg) {
        float u[AL * AL], e[R * AL], r[R * R];
#pragma unroll
        for (int q = 0; q < AL * AL; ++q) u[q] = float(du[q * total + i]);
#pragma unroll
        for (int s = 0; s < AL; ++s) wino_gt<M, R>(u + s, AL, e + s, AL);  // columns: G^T u (3 x alpha)
#pragma unroll
        for (int a = 0; a < R; ++a) wino_gt<M, R>(e + a * AL, 1, r + a * R, 1);  // rows: (.) G
#pragma unroll
        for (int q = 0; q < R * R; ++q) dw[i * uint(R * R) + q] = T(r[q]);
    }
}

// conv2d_wino<M>x<R>_<stage>_<dtype>
#define WINO_INST_M(MR, M, R, NAME, T)                                                             \
    INSTANTIATE("conv2d_wino" MR "_input_" NAME, conv2d_wino_input, T, M, R)                       \
    INSTANTIATE("conv2d_wino" MR "_filter_" NAME, conv2d_wino_filter, T, M, R)                     \
    INSTANTIATE("conv2d_wino" MR "_output_" NAME, conv2d_wino_output, T, M, R)                     \
    INSTANTIATE("conv2d_wino" MR "_grad_output_" NAME, conv2d_wino_grad_output, T, M, R)           \
    INSTANTIATE("conv2d_wino" MR "_filter_grad_" NAME, conv2d_wino_filter_grad, T, M, R)

WINO_INST_M("2x3", 2, 3, "float", float)
WINO_INST_M("4x3", 4, 3, "float", float)
WINO_INST_M("2x5", 2, 5, "float", float)
