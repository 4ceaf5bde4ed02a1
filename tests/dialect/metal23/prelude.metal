#include <metal_stdlib>
using namespace metal;

kernel void k(device half* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] = pmn_half(1.0f);  // expect: prelude
    x[gid] = HALF_MAX;
}
