#include <metal_stdlib>
using namespace metal;

kernel void k(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    auto sq = [](float v) { return v * v; };  // expect: lambda
    float t[2] = {x[gid], 1.0f};
    x[gid] = sq(t[0]) + t[1];
}
