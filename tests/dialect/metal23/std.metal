#include <metal_stdlib>
using namespace metal;

kernel void k(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] = std::max(x[gid], 0.0f);  // expect: std
    x[gid] = metal::max(x[gid], 0.0f);
}
