// stream.h -- the shape shared by the memory-bound element-wise kernels (neuron.metal, arith.metal
// fast path, dropout.metal, copy.metal flat copies and casts): 16-byte accesses, coalesced chunks,
// one pass (no grid-stride loop), a scalar tail.
//
// A tensor of n elements is cut into `nvec` chunks of W elements (W * sizeof(T) a multiple of 16:
// W = 4 for float, 8 for half) plus n - W nvec tail elements. The host sets nvec = n / W when
// every buffer is 16-byte aligned (always, unless a tensor is a view at an odd offset), else 0,
// and launches stream_count(n, W, nvec) threads:
//  - the first vthreads = ceil(nvec / (STREAM_U T)) T threads (T = STREAM_TG) own STREAM_U
//    chunks each, chunk u of thread gid being ((gid / T) STREAM_U + u) T + gid % T: the u-th
//    access of a simdgroup covers 32 consecutive chunks (512 bytes, fully coalesced), and a
//    thread has STREAM_U * 16 bytes per stream in flight before it computes;
//  - thread vthreads + j does tail element W nvec + j.
// Loads and stores are 16 bytes (ld.global.v4.u32 / v4.f32 in the PTX; tools/nvrtc_check.py
// --metal prints them): half goes through uint4 and as_type<half2>, since vec<half, 4> is only
// 8 bytes. Arithmetic is float.
#pragma once
#include <metal_stdlib>
#include "params.h"
using namespace metal;

// STREAM_U chunks per thread (params.h). Chunks are dealt in blocks of STREAM_TG threads
// (params.h) computed from thread_position_in_grid alone, so the mapping does not depend on the
// dispatch's threadgroup size (metalcompute picks the pipeline's maximum); STREAM_TG = the
// kernels' 256-thread groups on cuda and cpu.

// Threads that own chunks (a whole number of STREAM_TG blocks).
METAL_FUNC uint stream_vthreads(uint nvec) {
    return (nvec + STREAM_U * STREAM_TG - 1u) / (STREAM_U * STREAM_TG) * STREAM_TG;
}

// Chunk u of thread gid (valid when < nvec): block gid / STREAM_TG owns STREAM_U runs of
// STREAM_TG consecutive chunks, lane gid % STREAM_TG takes one of each.
METAL_FUNC uint stream_chunk(uint gid, uint u) {
    return ((gid / STREAM_TG) * STREAM_U + u) * STREAM_TG + gid % STREAM_TG;
}

// The chunk to load for chunk c: c itself, or the last chunk past the end (nvec > 0 whenever a
// thread owns chunks). Kernels load every chunk unconditionally from the clamped index and guard
// only the stores: the loads then sit in one basic block and are all issued before the first
// result is used (under `if (c < nvec)` guards the second load waited for the first).
METAL_FUNC uint stream_clamp(uint c, uint nvec) {
    return min(c, nvec - 1u);
}

// W elements of chunk c (W / 4 float4 loads) widened to float.
template <int W>
METAL_FUNC void stream_load(device const float* p, uint c, thread float* v) {
    device const float4* q = (device const float4*)p + c * uint(W / 4);
    for (int k = 0; k < W / 4; ++k) {
        const float4 a = q[k];
        v[4 * k] = a.x;
        v[4 * k + 1] = a.y;
        v[4 * k + 2] = a.z;
        v[4 * k + 3] = a.w;
    }
}

// W elements of half (W / 8 16-byte loads).
template <int W>
METAL_FUNC void stream_load(device const half* p, uint c, thread float* v) {
    device const uint4* q = (device const uint4*)p + c * uint(W / 8);
    for (int k = 0; k < W / 8; ++k) {
        const uint4 u = q[k];
        for (int j = 0; j < 4; ++j) {
            const half2 h = as_type<half2>(u[j]);
            v[8 * k + 2 * j] = float(h.x);
            v[8 * k + 2 * j + 1] = float(h.y);
        }
    }
}

template <int W>
METAL_FUNC void stream_store(device float* p, uint c, thread const float* v) {
    device float4* q = (device float4*)p + c * uint(W / 4);
    for (int k = 0; k < W / 4; ++k) {
        q[k] = float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
    }
}

// Rounds each float to half once, stores W / 8 16-byte words.
template <int W>
METAL_FUNC void stream_store(device half* p, uint c, thread const float* v) {
    device uint4* q = (device uint4*)p + c * uint(W / 8);
    for (int k = 0; k < W / 8; ++k) {
        uint4 u;
        for (int j = 0; j < 4; ++j) {
            u[j] = as_type<uint>(half2(half(v[8 * k + 2 * j]), half(v[8 * k + 2 * j + 1])));
        }
        q[k] = u;
    }
}
