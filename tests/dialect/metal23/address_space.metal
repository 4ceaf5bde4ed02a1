#include <metal_stdlib>
using namespace metal;

inline float load(float* p, uint i) {  // expect: address-space
    return p[i];
}
inline void acc(thread float& s, float v) { s += v; }
inline void acc2(float& s, float v) { s += v; }  // expect: address-space

kernel void k(float* x [[buffer(0)]],  // expect: address-space
              uint gid [[thread_position_in_grid]]) {
    float s = 0.0f;
    acc(s, x[gid]);
    x[gid] = s;
}
