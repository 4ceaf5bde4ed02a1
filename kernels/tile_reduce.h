// tile_reduce.h -- the reductions shared by softmax.metal, loss.metal and norm.metal.
//
// Every kernel of those families runs threadgroups of TR_TG = 256 threads cut into R = 256 / SW
// "tiles" of SW threads. A tile reduces a (len x W) block of a strided tensor: its W columns are
// W consecutive memory positions (so a simdgroup's loads coalesce), its S = SW / W slices split
// the reduced axis. W is a power of two <= 32 that divides 32, SW a power of two in [W, 256], so
// the lanes of one column are `lane % W == w` inside a simdgroup: a butterfly over the xor
// offsets W..16 reduces them (one simd_sum / simd_max when W == 1), then, when a tile spans
// several simdgroups, one round through threadgroup memory finishes it. All reductions run in
// float (or float vectors), whatever the storage type.
//
// Every thread of the threadgroup must call these functions together (they hold barriers); the
// threads that have nothing to reduce pass the identity.
#pragma once
#include <metal_stdlib>
#include "params.h"
using namespace metal;

// TR_TG: threads per threadgroup (params.h)
#define TR_NSG 8  // simdgroups per threadgroup

// Where a thread sits in a tile plan (W columns, SW threads per tile).
struct TilePos {
    uint r;    // tile of this thread within the threadgroup
    uint w;    // column within the tile
    uint s;    // slice: this thread visits l = s, s + S, ...
    uint S;    // slices per tile
    uint R;    // tiles per threadgroup
};

inline TilePos tile_pos(uint W, uint SW, uint tid) {
    TilePos t;
    t.R = TR_TG / SW;
    t.r = tid / SW;
    uint u = tid % SW;
    t.w = u % W;
    t.s = u / W;
    t.S = SW / W;
    return t;
}

#define TR_SUM 0u
#define TR_MAX 1u
#define TR_WELFORD 2u  // float4 Welford partials (chan_merge)

// Welford / Chan: a partial is float4(count, mean, M2, 0). Merging in a fixed order keeps every
// thread's copy of a result identical.
inline float4 chan_merge(float4 a, float4 b) {
    float n = a.x + b.x;
    if (n == 0.0f) return a;
    float d = b.y - a.y;
    float fb = b.x / n;
    return float4(n, a.y + d * fb, a.z + b.z + d * d * a.x * fb, 0.0f);
}

inline float4 welford_push(float4 a, float x) {
    float n = a.x + 1.0f;
    float d = x - a.y;
    float mean = a.y + d / n;
    return float4(n, mean, a.z + d * (x - mean), 0.0f);
}

// op TR_SUM or TR_MAX (element-wise for vectors), or TR_WELFORD on float4 partials. The op is an
// argument rather than a template parameter so that calls deduce every template argument: the
// cpu translator follows only calls written `f(...)` when it decides which kernels need fibers
// (not `f<T>(...)`).
template <typename T>
inline T tr_op(T a, T b, uint op) {
    return op == TR_SUM ? a + b : max(a, b);
}
inline float4 tr_op(float4 a, float4 b, uint op) {
    return op == TR_WELFORD ? chan_merge(a, b) : op == TR_SUM ? a + b : max(a, b);
}

// The second stage of a tile that spans several simdgroups (SW > 32): each simdgroup's column
// results, combined in simdgroup order through threadgroup memory; a no-op for SW <= 32.
template <typename T>
inline T tile_across(T v, uint op, uint W, uint SW, uint lane, uint sg, threadgroup T* scratch) {
    if (SW > 32u) {
        uint nsg = SW / 32u;
        // the barrier before the store protects the previous call's readers of scratch
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (lane < W) scratch[sg * W + lane] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        uint first = (sg / nsg) * nsg;
        uint w = lane % W;
        v = scratch[first * W + w];
        for (uint j = 1; j < nsg; ++j) v = tr_op(v, scratch[(first + j) * W + w], op);
    }
    return v;
}

// Reduce v over the slices of each tile column; every lane of the column gets the result.
// scratch: TR_TG entries of threadgroup memory, free for the call.
template <typename T>
inline T tile_reduce(T v, uint op, uint W, uint SW, uint lane, uint sg, threadgroup T* scratch) {
    if (W == 1u && SW >= 32u) {
        v = op == TR_SUM ? simd_sum(v) : simd_max(v);
    } else {
        uint top = min(SW, 32u);
        for (uint off = W; off < top; off <<= 1) {
            v = tr_op(v, simd_shuffle_xor(v, ushort(off)), op);
        }
    }
    return tile_across(v, op, W, SW, lane, sg, scratch);
}

// tile_reduce for Welford partials.
inline float4 tile_welford(float4 v, uint W, uint SW, uint lane, uint sg,
                           threadgroup float4* scratch) {
    uint top = min(SW, 32u);
    for (uint off = W; off < top; off <<= 1) {
        float4 o = simd_shuffle_xor(v, ushort(off));
        // merge in lane order so both partners compute the same value
        v = (lane & off) ? chan_merge(o, v) : chan_merge(v, o);
    }
    return tile_across(v, TR_WELFORD, W, SW, lane, sg, scratch);
}
