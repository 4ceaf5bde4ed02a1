// METAL_FUNC is a <metal_stdlib> macro (inline, always inlined) that MLX uses for helpers.
#include <metal_stdlib>
using namespace metal;

METAL_FUNC float twice(float x) {
    return 2.0f * x;
}

[[max_total_threads_per_threadgroup(256)]]  // no bounds check: the grid must be whole 256s
kernel void metal_func(device float* x [[buffer(0)]],
                       uint gid [[thread_position_in_grid]]) {
    x[gid] = twice(x[gid]);
}
