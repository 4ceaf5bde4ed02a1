#include <metal_stdlib>
using namespace metal;

kernel void k(device float* x [[buffer(0)]],  // expect: threadgroup-size
              uint gid [[thread_position_in_grid]], uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float tile[256];
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[gid] = tile[255u - lid];
}

[[max_total_threads_per_threadgroup(256)]]
kernel void ok(device float* x [[buffer(0)]],
               uint gid [[thread_position_in_grid]], uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float tile[256];
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[gid] = tile[255u - lid];
}
