#include <metal_stdlib>
using namespace metal;

float scale = 2.0f;  // expect: program-scope
constant float ok_table[2] = {1.0f, 2.0f};
constexpr float ok_k = 3.0f;

kernel void k(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] *= scale * ok_table[gid & 1u] * ok_k;
}
