#include <metal_stdlib>
using namespace metal;

inline float twice(float v) { return 2.0f * v; }

inline float apply(float (*fn)(float), float v) {  // expect: function-pointer
    return fn(v);
}

kernel void k(device float* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] = apply(&twice, x[gid]);  // expect: function-pointer
}
