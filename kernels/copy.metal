// copy.metal -- data movement: copies and casts, concat / split slabs, permutations (NCHW <->
// NHWC, batch-first <-> time-major) and batched matrix transposes.
//
// Everything here moves bytes and computes nothing, so the only goal is copy bandwidth:
//  - concat8 / split8 (concat_stream / split_stream where every width is whole 16-byte chunks):
//    a tensor viewed around the axis is a matrix (prod(dims before the axis),
//    axis * prod(dims after)); each operand of a concat (piece of a split) is a block of its
//    columns. Up to 8 operands per launch (buffers are bound one by one: the metal backend has no
//    views), so an LSTM's 64 time steps take 8 launches, not 64.
//  - copy_block: one block with source and destination pitches and offsets; also casts
//    float <-> half (the conversion is free next to the memory traffic).
//  - permute: a gather through permuted strides, coalesced (and vectorized) when the innermost
//    dimension stays innermost, e.g. (N, T, F) -> (T, N, F).
//  - transpose: permutations that move the innermost dimension ((N, C, HW) -> (N, HW, C)) as
//    batched matrix transposes through a 32 x 33 threadgroup tile (the padding column keeps the
//    column reads free of bank conflicts), so reads and writes are both coalesced.
//  - copy_flat: one contiguous run (copy, cast, any block whose pitches equal its width): the
//    stream.h shape, two coalesced 16-byte chunks per thread (a cast reads / writes 32 bytes of
//    float per 16 of half), one pass, a scalar tail; half -> float (cast_flat_h2f) moves the same
//    chunks as 4-element quads so that its float stores are dense across the lanes.
// All but transpose and copy_flat move 16 bytes per thread (4 float, 8 half: raw uint4 words for
// a same-type copy) whenever the widths, pitches and offsets are multiples of that many elements
// and the buffers 16-byte aligned; else 4 elements (8 bytes of half) when they are multiples of 4.
#include <metal_stdlib>
#include "params.h"
#include "instantiate.h"
#include "stream.h"
#include "args.h"
using namespace metal;

template <typename Tin, typename Tout>
kernel void copy_block(device const Tin* src [[buffer(0)]],
                       device Tout* dst [[buffer(1)]],
                       constant CopyParams& p [[buffer(2)]],
                       uint gid [[thread_position_in_grid]],
                       uint tg_size [[threads_per_threadgroup]],
                       uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    const uint per_row = p.cols / p.vec;
    for (uint item = gid; item < p.n; item += grid) {
        const uint r = item / per_row;
        const uint c = (item - r * per_row) * p.vec;
        const uint s = p.src_off + r * p.src_pitch + c;
        const uint d = p.dst_off + r * p.dst_pitch + c;
        if (sizeof(Tin) == sizeof(Tout) && p.vec * sizeof(Tin) == 16u) {  // raw 16-byte words
            *((device uint4*)(dst + d)) = *((device const uint4*)(src + s));
        } else if (p.vec == 4) {
            *((device vec<Tout, 4>*)(dst + d)) = vec<Tout, 4>(*((device const vec<Tin, 4>*)(src + s)));
        } else {
            dst[d] = Tout(src[s]);
        }
    }
}

// Chunks c0, c1 of the narrower type (loaded from l0, l1 = stream_clamp(c), stored where < nvec):
// raw 16-byte words for a same-type copy, else 8 elements through float (32 bytes of float).
template <typename T>
inline void copy_pair(device const T* s, device T* d, uint c0, uint c1, uint nvec) {
    const uint4 r0 = ((device const uint4*)s)[stream_clamp(c0, nvec)];
    const uint4 r1 = ((device const uint4*)s)[stream_clamp(c1, nvec)];
    if (c0 < nvec) ((device uint4*)d)[c0] = r0;
    if (c1 < nvec) ((device uint4*)d)[c1] = r1;
}
template <typename Tin, typename Tout>
inline void cast_pair(device const Tin* s, device Tout* d, uint c0, uint c1, uint nvec) {
    float v0[8], v1[8];
    stream_load<8>(s, stream_clamp(c0, nvec), v0);
    stream_load<8>(s, stream_clamp(c1, nvec), v1);
    if (c0 < nvec) stream_store<8>(d, c0, v0);
    if (c1 < nvec) stream_store<8>(d, c1, v1);
}
inline void copy_pair(device const float* s, device half* d, uint c0, uint c1, uint nvec) {
    cast_pair(s, d, c0, c1, nvec);
}
inline void copy_pair(device const half* s, device float* d, uint c0, uint c1, uint nvec) {
    cast_pair(s, d, c0, c1, nvec);
}

// dst[dst_off + i] = src[src_off + i], i < p.n; p.vec = nvec chunks of W = 16 / the narrower
// element size (host: both runs start 16-byte aligned, else nvec = 0: all scalar).
template <typename Tin, typename Tout>
[[max_total_threads_per_threadgroup(256)]]
kernel void copy_flat(device const Tin* src [[buffer(0)]],
                      device Tout* dst [[buffer(1)]],
                      constant CopyParams& p [[buffer(2)]],
                      uint gid [[thread_position_in_grid]]) {
    device const Tin* s = src + p.src_off;
    device Tout* d = dst + p.dst_off;
    const uint nvec = p.vec;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        copy_pair(s, d, stream_chunk(gid, 0u), stream_chunk(gid, 1u), nvec);
    } else {
        const uint W = 16u / uint(sizeof(Tin) < sizeof(Tout) ? sizeof(Tin) : sizeof(Tout));
        const uint i = nvec * W + (gid - vthreads);
        if (i < p.n) d[i] = Tout(s[i]);
    }
}

// half -> float, the same chunks and grid as copy_flat<half, float> (nvec chunks of 8, STREAM_U
// runs of STREAM_TG chunks per block), but each run is moved as 2 STREAM_TG quads of 4 elements,
// lane l taking quads l and l + STREAM_TG: 8-byte loads and 16-byte stores at consecutive
// addresses across the lanes. copy_flat's chunk of 8 per lane wrote two float4 32 bytes apart,
// every store instruction then covering half of each 32-byte sector (0.78 of the copy bandwidth
// on an H100, where the float -> half direction, strided loads and dense stores, reached 1.0).
template <typename T>  // half
[[max_total_threads_per_threadgroup(256)]]
kernel void cast_flat_h2f(device const T* src [[buffer(0)]],
                          device float* dst [[buffer(1)]],
                          constant CopyParams& p [[buffer(2)]],
                          uint gid [[thread_position_in_grid]]) {
    device const uint2* s = (device const uint2*)(src + p.src_off);
    device float4* d = (device float4*)(dst + p.dst_off);
    const uint nvec = p.vec, nquad = 2u * p.vec;
    const uint vthreads = stream_vthreads(nvec);
    if (gid < vthreads) {
        const uint lane = gid % STREAM_TG;
        uint q[2 * STREAM_U];
        uint2 v[2 * STREAM_U];
#pragma unroll 2  // STREAM_U
        for (uint u = 0; u < STREAM_U; ++u) {
            const uint base = 2u * (stream_chunk(gid, u) - lane);  // first quad of the run
            q[2u * u] = base + lane;
            q[2u * u + 1u] = base + lane + STREAM_TG;
        }
        for (uint j = 0; j < 2u * STREAM_U; ++j) v[j] = s[min(q[j], nquad - 1u)];
        for (uint j = 0; j < 2u * STREAM_U; ++j) {
            if (q[j] < nquad) {
                const half2 lo = as_type<half2>(v[j].x), hi = as_type<half2>(v[j].y);
                d[q[j]] = float4(float(lo.x), float(lo.y), float(hi.x), float(hi.y));
            }
        }
    } else {
        const uint i = nvec * 8u + (gid - vthreads);
        if (i < p.n) dst[p.dst_off + i] = float(src[p.src_off + i]);
    }
}

// Up to 8 parts per launch (an LSTM's T steps, a channel concat): the item's part is found by
// comparing against the parts' first items (first blocks, for the stream kernels), then it is a
// block copy.
inline uint concat_part(uint item, constant ConcatParams& p) {
    uint i = 0;
#pragma unroll
    for (uint j = 1; j < 8u; ++j) i = j < p.parts && item >= p.start[j] ? j : i;
    return i;
}

template <typename T>
inline device const T* pick8(uint i, device const T* a0, device const T* a1, device const T* a2,
                             device const T* a3, device const T* a4, device const T* a5,
                             device const T* a6, device const T* a7) {
    return i < 4u ? (i < 2u ? (i == 0u ? a0 : a1) : (i == 2u ? a2 : a3))
                  : (i < 6u ? (i == 4u ? a4 : a5) : (i == 6u ? a6 : a7));
}

template <typename T>
inline device T* pick8w(uint i, device T* a0, device T* a1, device T* a2, device T* a3,
                        device T* a4, device T* a5, device T* a6, device T* a7) {
    return i < 4u ? (i < 2u ? (i == 0u ? a0 : a1) : (i == 2u ? a2 : a3))
                  : (i < 6u ? (i == 4u ? a4 : a5) : (i == 6u ? a6 : a7));
}

template <typename T>
kernel void concat8(device const T* s0 [[buffer(0)]], device const T* s1 [[buffer(1)]],
                    device const T* s2 [[buffer(2)]], device const T* s3 [[buffer(3)]],
                    device const T* s4 [[buffer(4)]], device const T* s5 [[buffer(5)]],
                    device const T* s6 [[buffer(6)]], device const T* s7 [[buffer(7)]],
                    device T* dst [[buffer(8)]],
                    constant ConcatParams& p [[buffer(9)]],
                    uint gid [[thread_position_in_grid]],
                    uint tg_size [[threads_per_threadgroup]],
                    uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    for (uint item = gid; item < p.n; item += grid) {
        const uint i = concat_part(item, p);
        const uint cols = arg_pick8(i, p.cols);
        const uint per_row = cols / p.vec;
        const uint local = item - arg_pick8(i, p.start);
        const uint r = local / per_row;
        const uint c = (local - r * per_row) * p.vec;
        device const T* src = pick8(i, s0, s1, s2, s3, s4, s5, s6, s7) + r * cols + c;
        device T* d = dst + r * p.pitch + arg_pick8(i, p.off) + c;
        if (p.vec * sizeof(T) == 16u) *((device uint4*)d) = *((device const uint4*)src);
        else if (p.vec == 4) *((device vec<T, 4>*)d) = *((device const vec<T, 4>*)src);
        else *d = *src;
    }
}

template <typename T>
kernel void split8(device const T* src [[buffer(0)]],
                   device T* d0 [[buffer(1)]], device T* d1 [[buffer(2)]],
                   device T* d2 [[buffer(3)]], device T* d3 [[buffer(4)]],
                   device T* d4 [[buffer(5)]], device T* d5 [[buffer(6)]],
                   device T* d6 [[buffer(7)]], device T* d7 [[buffer(8)]],
                   constant ConcatParams& p [[buffer(9)]],
                   uint gid [[thread_position_in_grid]],
                   uint tg_size [[threads_per_threadgroup]],
                   uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    for (uint item = gid; item < p.n; item += grid) {
        const uint i = concat_part(item, p);
        const uint cols = arg_pick8(i, p.cols);
        const uint per_row = cols / p.vec;
        const uint local = item - arg_pick8(i, p.start);
        const uint r = local / per_row;
        const uint c = (local - r * per_row) * p.vec;
        device const T* s = src + r * p.pitch + arg_pick8(i, p.off) + c;
        device T* d = pick8w(i, d0, d1, d2, d3, d4, d5, d6, d7) + r * cols + c;
        if (p.vec * sizeof(T) == 16u) *((device uint4*)d) = *((device const uint4*)s);
        else if (p.vec == 4) *((device vec<T, 4>*)d) = *((device const vec<T, 4>*)s);
        else *d = *s;
    }
}

// concat / split in the stream.h shape, for groups whose widths, offsets and pitch are whole
// 16-byte chunks (W = 16 / sizeof(T) elements) and buffers 16-byte aligned. Every block of
// STREAM_TG consecutive threads (gid / STREAM_TG) serves one part: part i owns blocks
// [start[i], start[i + 1]) and, in them, the chunks of its own (rows, cols[i] / W) matrix in the
// stream.h order (STREAM_U chunks per thread, their loads issued before any store, one pass).
// The part and its geometry are looked up once per thread; a chunk costs one division (its row).
// Host: p.start[i] = first block of part i, p.n = blocks in all, p.vec = W, launch p.n *
// STREAM_TG threads. The earlier layout (chunks of the joined matrix) searched the part and
// read ConcatParams' arrays at run-time indices for every 16 bytes; the cuda compiler then kept
// a copy of the struct in local memory per thread, and the load/store queue, not DRAM, bounded a
// channel concat of two 32x128x56x56 float tensors at 0.35 of the copy bandwidth on an H100 (ncu:
// 54 of 126 stall cycles per instruction waiting for that queue, L1 hit rate 38%). The arrays
// are read at constant indices now (args.h); this layout alone did not change the figure (0.36
// on an H200, before that fix).
struct ConcatPart {
    uint part;
    uint per_row;  // chunks per row of the part
    uint count;    // chunks of the part
    uint first;    // this thread's first chunk in the part
    uint off;      // the part's first column in the joined matrix, in chunks
};

template <typename T>
inline ConcatPart concat_part_of(uint gid, constant ConcatParams& p) {
    const uint W = 16u / uint(sizeof(T));
    const uint blk = gid / STREAM_TG;
    const uint i = concat_part(blk, p);  // p.start counts blocks here
    ConcatPart q;
    q.part = i;
    q.per_row = arg_pick8(i, p.cols) / W;
    q.count = p.rows * q.per_row;
    q.first = (blk - arg_pick8(i, p.start)) * (STREAM_U * STREAM_TG) + gid % STREAM_TG;
    q.off = arg_pick8(i, p.off) / W;
    return q;
}

// chunk lc of the part's matrix -> its chunk in the joined matrix (pitch in chunks)
inline uint concat_whole_chunk(uint lc, thread const ConcatPart& q, uint pitch) {
    const uint r = lc / q.per_row;
    return r * pitch + q.off + (lc - r * q.per_row);
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void concat_stream(device const T* s0 [[buffer(0)]], device const T* s1 [[buffer(1)]],
                          device const T* s2 [[buffer(2)]], device const T* s3 [[buffer(3)]],
                          device const T* s4 [[buffer(4)]], device const T* s5 [[buffer(5)]],
                          device const T* s6 [[buffer(6)]], device const T* s7 [[buffer(7)]],
                          device T* dst [[buffer(8)]],
                          constant ConcatParams& p [[buffer(9)]],
                          uint gid [[thread_position_in_grid]]) {
    if (gid / STREAM_TG >= p.n) return;
    const ConcatPart q = concat_part_of<T>(gid, p);
    const uint pitch = p.pitch / (16u / uint(sizeof(T)));
    device const uint4* src = (device const uint4*)pick8(q.part, s0, s1, s2, s3, s4, s5, s6, s7);
    uint4 v[STREAM_U];
#pragma unroll 2  // STREAM_U
    for (uint u = 0; u < STREAM_U; ++u) v[u] = src[min(q.first + u * STREAM_TG, q.count - 1u)];
#pragma unroll 2  // STREAM_U
    for (uint u = 0; u < STREAM_U; ++u) {
        const uint lc = q.first + u * STREAM_TG;
        if (lc < q.count) ((device uint4*)dst)[concat_whole_chunk(lc, q, pitch)] = v[u];
    }
}

template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void split_stream(device const T* src [[buffer(0)]],
                         device T* d0 [[buffer(1)]], device T* d1 [[buffer(2)]],
                         device T* d2 [[buffer(3)]], device T* d3 [[buffer(4)]],
                         device T* d4 [[buffer(5)]], device T* d5 [[buffer(6)]],
                         device T* d6 [[buffer(7)]], device T* d7 [[buffer(8)]],
                         constant ConcatParams& p [[buffer(9)]],
                         uint gid [[thread_position_in_grid]]) {
    if (gid / STREAM_TG >= p.n) return;
    const ConcatPart q = concat_part_of<T>(gid, p);
    const uint pitch = p.pitch / (16u / uint(sizeof(T)));
    uint4 v[STREAM_U];
#pragma unroll 2  // STREAM_U
    for (uint u = 0; u < STREAM_U; ++u) {
        const uint lc = min(q.first + u * STREAM_TG, q.count - 1u);
        v[u] = ((device const uint4*)src)[concat_whole_chunk(lc, q, pitch)];
    }
    device uint4* out = (device uint4*)pick8w(q.part, d0, d1, d2, d3, d4, d5, d6, d7);
#pragma unroll 2  // STREAM_U
    for (uint u = 0; u < STREAM_U; ++u) {
        const uint lc = q.first + u * STREAM_TG;
        if (lc < q.count) out[lc] = v[u];
    }
}

template <typename T>
kernel void permute_gather(device const T* x [[buffer(0)]],
                           device T* out [[buffer(1)]],
                           constant PermuteParams& p [[buffer(2)]],
                           uint gid [[thread_position_in_grid]],
                           uint tg_size [[threads_per_threadgroup]],
                           uint n_groups [[threadgroups_per_grid]]) {
    const uint grid = tg_size * n_groups;
    for (uint item = gid; item < p.n; item += grid) {
        const uint e = item * p.vec;
        uint rest = e;
        uint o = 0;
        // constant indices (unrolled, guarded by ndim): args.h
#pragma unroll
        for (int d = 7; d > 0; --d) {
            if (d < int(p.ndim)) {
                o += (rest % p.shape[d]) * p.stride[d];
                rest /= p.shape[d];
            }
        }
        o += rest * p.stride[0];
        if (p.vec == 4) {
            *((device vec<T, 4>*)(out + e)) = *((device const vec<T, 4>*)(x + o));
        } else {
            out[e] = x[o];
        }
    }
}

// One threadgroup per 32 x 32 tile (grid-stride over tiles); thread (lx, ly) moves rows ly,
// ly + 8, ly + 16, ly + 24 of the tile.
template <typename T>
[[max_total_threads_per_threadgroup(256)]]
kernel void transpose_tiled(device const T* x [[buffer(0)]],
                            device T* out [[buffer(1)]],
                            constant TransposeParams& p [[buffer(2)]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint tgid [[threadgroup_position_in_grid]],
                            uint n_groups [[threadgroups_per_grid]]) {
    threadgroup T tile[32 * 33];
    const uint lx = lid % 32u;
    const uint ly = lid / 32u;
    const uint per_matrix = p.tiles_r * p.tiles_c;
    const uint mat = p.rows * p.cols;
    for (uint t = tgid; t < p.n_tiles; t += n_groups) {
        const uint b = t / per_matrix;
        const uint rem = t - b * per_matrix;
        const uint r0 = (rem / p.tiles_c) * 32u;
        const uint c0 = (rem % p.tiles_c) * 32u;
        device const T* xb = x + b * mat;
        device T* ob = out + b * mat;
        for (uint j = 0; j < 32u; j += 8u) {
            const uint r = r0 + ly + j;
            const uint c = c0 + lx;
            if (r < p.rows && c < p.cols) tile[(ly + j) * 33u + lx] = xb[r * p.cols + c];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (uint j = 0; j < 32u; j += 8u) {
            const uint c = c0 + ly + j;  // output row
            const uint r = r0 + lx;      // output column
            if (c < p.cols && r < p.rows) ob[c * p.rows + r] = tile[lx * 33u + ly + j];
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

#define instantiate_copy(name, Tin, Tout) \
    INSTANTIATE(name, copy_block, Tin, Tout) \
    INSTANTIATE(name "_flat", copy_flat, Tin, Tout)
#define instantiate_move(T)                                                                 \
    instantiate_copy("copy_fwd_" #T, T, T)                                                  \
    INSTANTIATE("permute_fwd_" #T, permute_gather, T)                                       \
    INSTANTIATE("transpose_fwd_" #T, transpose_tiled, T)                                    \
    INSTANTIATE("concat_fwd_" #T, concat8, T)                                               \
    INSTANTIATE("split_fwd_" #T, split8, T)                                                 \
    INSTANTIATE("concat_stream_fwd_" #T, concat_stream, T)                                  \
    INSTANTIATE("split_stream_fwd_" #T, split_stream, T)

instantiate_move(float)
instantiate_move(half)
instantiate_move(int)
instantiate_copy("cast_fwd_tohalf_float", float, half)
INSTANTIATE("cast_fwd_tofloat_half", copy_block, half, float)
INSTANTIATE("cast_fwd_tofloat_half_flat", cast_flat_h2f, half)
// the earlier production of the flat half -> float cast (benchmarks/dev_membound.py cast v1)
INSTANTIATE("cast_fwd_tofloat_half_flat_v1", copy_flat, half, float)
