// copy.metal -- data movement: copies and casts, concat / split slabs, permutations (NCHW <->
// NHWC, batch-first <-> time-major) and batched matrix transposes.
//
// Everything here moves bytes and computes nothing, so the only goal is copy bandwidth:
//  - copy_block: a rows x cols block with source and destination pitches and offsets, which is
//    what one operand of a concat or one piece of a split is once the tensor is viewed as
//    (prod(dims before the axis), axis * prod(dims after)). 4 elements per thread (128-bit fp32
//    accesses) whenever cols, pitches and offsets are multiples of 4; it also casts
//    float <-> half (the conversion is free next to the memory traffic).
//  - permute: a gather through permuted strides, coalesced (and vectorized) when the innermost
//    dimension stays innermost, e.g. (N, T, F) -> (T, N, F).
//  - transpose: permutations that move the innermost dimension ((N, C, HW) -> (N, HW, C)) as
//    batched matrix transposes through a 32 x 33 threadgroup tile (the padding column keeps the
//    column reads free of bank conflicts), so reads and writes are both coalesced.
#include <metal_stdlib>
#include "params.h"
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
        if (p.vec == 4) {
            *((device vec<Tout, 4>*)(dst + d)) = vec<Tout, 4>(*((device const vec<Tin, 4>*)(src + s)));
        } else {
            dst[d] = Tout(src[s]);
        }
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
        for (int d = int(p.ndim) - 1; d > 0; --d) {
            o += (rest % p.shape[d]) * p.stride[d];
            rest /= p.shape[d];
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
    template [[host_name(name)]] [[kernel]] decltype(copy_block<Tin, Tout>) copy_block<Tin, Tout>;
#define instantiate_move(T)                                                                 \
    instantiate_copy("copy_fwd_" #T, T, T)                                                  \
    template [[host_name("permute_fwd_" #T)]] [[kernel]] decltype(permute_gather<T>)        \
        permute_gather<T>;                                                                  \
    template [[host_name("transpose_fwd_" #T)]] [[kernel]] decltype(transpose_tiled<T>)     \
        transpose_tiled<T>;

instantiate_move(float)
instantiate_move(half)
instantiate_move(int)
instantiate_copy("cast_fwd_tohalf_float", float, half)
instantiate_copy("cast_fwd_tofloat_half", half, float)
