// dropout.metal -- dropout and spatial dropout (dropout2d) with a counter-based RNG, forward and
// backward.
//
// The mask is never stored: it is a pure function of (seed, offset, element index) through
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
// Random123 constants), so the backward recomputes it, and any backend gives the same bits: the
// keep decision compares a uint32 draw with an integer threshold (round(p * 2^32)), with no
// floating point involved. Key = the 64-bit seed; counter = (block, 0, offset lo, offset hi).
// One Philox call yields 4 words: the thread of block b handles elements 4b .. 4b+3 (word j for
// element 4b + j) with one vector load and store; dropout2d uses word j % 4 of block j / 4 for
// channel j and a thread handles 4 elements of one channel. The 32 x 32 -> 64-bit products use
// ulong, which Metal, CUDA and C++ all have.
// Aligned tensors (p.vec = nvec > 0, the usual case) take the stream.h shape: two coalesced 16-byte
// chunks per thread (4 float or 8 half elements: 1 or 2 Philox blocks each), one pass; threads
// past the chunks do the leftover Philox blocks (4 elements each, scalar). Unaligned views
// (p.vec = 0) loop over 4-element items. Either way element e uses word e % 4 of block e / 4.
// Forward and backward are the same computation (y = x * mask * scale, dx = dy * mask * scale),
// instantiated under both names.
// The offset is p's (ctr2, ctr3) plus a 64-bit value read from the device (`base`, two uints, lo
// and hi): a graph's step counter, advanced by dropout_offset_advance at the end of each training
// step, so a recorded launch replayed draws the next step's mask, as a newly encoded one would.
// Direct calls bind a zero base.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "stream.h"
using namespace metal;

constant uint PHILOX_M0 = 0xD2511F53u;
constant uint PHILOX_M1 = 0xCD9E8D57u;
constant uint PHILOX_W0 = 0x9E3779B9u;
constant uint PHILOX_W1 = 0xBB67AE85u;

inline uint4 philox4x32_10(uint4 ctr, uint k0, uint k1) {
    for (int i = 0; i < 10; ++i) {
        if (i > 0) {
            k0 += PHILOX_W0;
            k1 += PHILOX_W1;
        }
        const ulong p0 = ulong(PHILOX_M0) * ulong(ctr.x);
        const ulong p1 = ulong(PHILOX_M1) * ulong(ctr.z);
        ctr = uint4(uint(p1 >> 32) ^ ctr.y ^ k0, uint(p1), uint(p0 >> 32) ^ ctr.w ^ k1, uint(p0));
    }
    return ctr;
}

inline uint4 dropout_draw(uint block, constant DropoutParams& p, uint2 off) {
    return philox4x32_10(uint4(block, 0u, off.x, off.y), p.key0, p.key1);
}

// The counter's offset words: (ctr2, ctr3) + (base[0], base[1]) as 64-bit integers.
inline uint2 dropout_offset(constant DropoutParams& p, const device uint* base) {
    const uint lo = p.ctr2 + base[0];
    return uint2(lo, p.ctr3 + base[1] + (lo < p.ctr2 ? 1u : 0u));
}

// base (lo, hi) += 1: the graph's step counter, at the end of a training step.
kernel void dropout_offset_advance(device uint* base [[buffer(0)]],
                                 uint gid [[thread_position_in_grid]]) {
    if (gid == 0u) {
        const uint lo = base[0] + 1u;
        base[0] = lo;
        if (lo == 0u) base[1] = base[1] + 1u;
    }
}

// Philox of explicit counters under the key (key0, key1): the known-answer tests.
kernel void philox_fwd_block_uint(device const uint4* ctr [[buffer(0)]],
                                  device uint4* out [[buffer(1)]],
                                  constant DropoutParams& p [[buffer(2)]],
                                  uint gid [[thread_position_in_grid]]) {
    if (gid < p.items) out[gid] = philox4x32_10(ctr[gid], p.key0, p.key1);
}

// The raw stream: out[4b + j] = word j of block b (tests compare it with a numpy Philox).
kernel void philox_fwd_stream_uint(device uint* out [[buffer(0)]],
                          constant DropoutParams& p [[buffer(1)]],
                          uint gid [[thread_position_in_grid]],
                          uint tg_size [[threads_per_threadgroup]],
                          uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    for (uint b = gid; b < p.items; b += grid) {
        const uint4 r = dropout_draw(b, p, uint2(p.ctr2, p.ctr3));
        for (uint j = 0; j < 4u; ++j) {
            if (4u * b + j < p.n) out[4u * b + j] = r[j];
        }
    }
}

// W elements from element e0 = W c (W / 4 Philox blocks): v *= keep ? scale : 0.
template <int W>
inline void dropout_mask_chunk(uint c, constant DropoutParams& p, uint2 off, thread float* v) {
    for (int k = 0; k < W / 4; ++k) {
        const uint4 r = dropout_draw(c * uint(W / 4) + uint(k), p, off);
        for (int j = 0; j < 4; ++j) v[4 * k + j] *= r[j] >= p.threshold ? p.scale : 0.0f;
    }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void dropout_elem(device const T* x [[buffer(0)]],
                         device T* y [[buffer(1)]],
                         constant DropoutParams& p [[buffer(2)]],
                         const device uint* base [[buffer(3)]],
                         uint gid [[thread_position_in_grid]],
                         uint tgs [[threads_per_threadgroup]],
                         uint n_groups [[threadgroups_per_grid]]) {
    const uint nvec = p.vec;
    const uint2 off = dropout_offset(p, base);
    if (nvec > 0u) {
        const uint vthreads = stream_vthreads(nvec);
        if (gid < vthreads) {
            float v[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
            for (uint u = 0; u < STREAM_U; ++u) {
                stream_load<16 / sizeof(T)>(x, stream_clamp(stream_chunk(gid, u), nvec), v[u]);
            }
#pragma unroll 2  // STREAM_U
            for (uint u = 0; u < STREAM_U; ++u) {
                const uint ch = stream_chunk(gid, u);
                if (ch < nvec) {
                    dropout_mask_chunk<16 / sizeof(T)>(ch, p, off, v[u]);
                    stream_store<16 / sizeof(T)>(y, ch, v[u]);
                }
            }
        } else {
            // leftover blocks: 4 elements each from element W nvec (a multiple of 4)
            const uint b = nvec * uint(16 / sizeof(T) / 4) + (gid - vthreads);
            if (b < p.items) {
                const uint4 r = dropout_draw(b, p, off);
                for (uint j = 0; j < 4u && 4u * b + j < p.n; ++j) {
                    y[4u * b + j] = T(float(x[4u * b + j]) * (r[j] >= p.threshold ? p.scale : 0.0f));
                }
            }
        }
        return;
    }
    const uint grid = tgs * n_groups;
    for (uint b = gid; b < p.items; b += grid) {
        const uint4 r = dropout_draw(b, p, off);
        const float4 m = select(float4(0.0f), float4(p.scale), r >= uint4(p.threshold));
        const uint e = 4u * b;
        for (uint j = 0; j < 4u && e + j < p.n; ++j) y[e + j] = T(float(x[e + j]) * m[j]);
    }
}

// item = (channel j, chunk c): elements j * inner + 4c .. + 3 of channel j. With p.vec = nvec > 0
// (aligned, inner a multiple of W: no tail) the stream.h shape instead, one draw per chunk.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void dropout_channel(device const T* x [[buffer(0)]],
                            device T* y [[buffer(1)]],
                            constant DropoutParams& p [[buffer(2)]],
                            const device uint* base [[buffer(3)]],
                            uint gid [[thread_position_in_grid]],
                            uint tgs [[threads_per_threadgroup]],
                            uint n_groups [[threadgroups_per_grid]]) {
    const uint nvec = p.vec;
    const uint2 off = dropout_offset(p, base);
    if (nvec > 0u) {
        float v[STREAM_U][16 / sizeof(T)];
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            stream_load<16 / sizeof(T)>(x, stream_clamp(stream_chunk(gid, u), nvec), v[u]);
        }
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint ch = stream_chunk(gid, u);
            if (ch < nvec) {
                const uint j = ch * uint(16 / sizeof(T)) / p.inner;
                const uint r = dropout_draw(j / 4u, p, off)[j % 4u];
                const float m = r >= p.threshold ? p.scale : 0.0f;
                for (int e = 0; e < int(16 / sizeof(T)); ++e) v[u][e] *= m;
                stream_store<16 / sizeof(T)>(y, ch, v[u]);
            }
        }
        return;
    }
    const uint grid = tgs * n_groups;
    const uint per_channel = (p.inner + 3u) / 4u;
    for (uint item = gid; item < p.items; item += grid) {
        const uint j = item / per_channel;
        const uint c = 4u * (item - j * per_channel);
        const uint r = dropout_draw(j / 4u, p, off)[j % 4u];
        const float m = r >= p.threshold ? p.scale : 0.0f;
        const uint e = j * p.inner + c;
        for (uint k = 0; k < 4u && c + k < p.inner; ++k) y[e + k] = T(float(x[e + k]) * m);
    }
}

#define instantiate_dropout(T)                                                                \
    INSTANTIATE("dropout_fwd_" #T, dropout_elem, T)                                           \
    INSTANTIATE("dropout_bwd_" #T, dropout_elem, T)                                           \
    INSTANTIATE("dropout2d_fwd_" #T, dropout_channel, T)                                      \
    INSTANTIATE("dropout2d_bwd_" #T, dropout_channel, T)

instantiate_dropout(float)
instantiate_dropout(half)
