// SIMD-group functions on half and on vectors (Metal's T is any scalar or vector type).
#include <metal_stdlib>
using namespace metal;

[[max_total_threads_per_threadgroup(256)]]  // no bounds check: the grid must be whole 256s
kernel void simd_half(device const half* x [[buffer(0)]],
                      device half* out [[buffer(1)]],
                      uint gid [[thread_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]]) {
    half v = x[gid];
    out[gid * 5u + 0u] = simd_sum(v);
    out[gid * 5u + 1u] = simd_max(v);
    out[gid * 5u + 2u] = simd_shuffle_xor(v, ushort(3));
    out[gid * 5u + 3u] = simd_prefix_inclusive_sum(v);
    out[gid * 5u + 4u] = simd_shuffle(v, ushort(31u - lane));
}

[[max_total_threads_per_threadgroup(256)]]  // no bounds check: the grid must be whole 256s
kernel void simd_vector(device const float4* x [[buffer(0)]],
                        device const int2* y [[buffer(1)]],
                        device float4* out4 [[buffer(2)]],
                        device int2* out2 [[buffer(3)]],
                        uint gid [[thread_position_in_grid]],
                        uint lane [[thread_index_in_simdgroup]]) {
    float4 v = x[gid];
    int2 w = y[gid];
    out4[gid * 3u + 0u] = simd_shuffle_down(v, ushort(1));
    out4[gid * 3u + 1u] = simd_max(v);
    out4[gid * 3u + 2u] = simd_broadcast(v, ushort(7));
    out2[gid * 3u + 0u] = simd_sum(w);
    out2[gid * 3u + 1u] = simd_shuffle_up(w, ushort(4));
    out2[gid * 3u + 2u] = simd_prefix_exclusive_sum(w);
}
