// Metal declares one overload per type: half with a float literal is ambiguous.
#include <metal_stdlib>
using namespace metal;

kernel void k(device half* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    half h = x[gid];
    half a = max(h, 0.0);  // expect: half-literal
    half b = clamp(h, 0.0h, 1.0f);  // expect: half-literal
    half c = min(half(x[0]), -0.5f);  // expect: half-literal
    half d = max(h, 0.0h) + min(h, half(1)) + max(h, 2);  // all well-typed
    float e = max(float(h), 0.5);  // float with float: fine
    x[gid] = a + b + c + d + half(e);
}
