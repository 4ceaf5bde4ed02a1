// Types, functions and attributes of Metal versions after 2.3.
#include <metal_stdlib>
using namespace metal;

kernel void k(device atomic_float* acc [[buffer(0)]],  // expect: version
              device float* x [[buffer(1)]],
              uint gid [[thread_position_in_grid]],
              uint lane [[thread_index_in_simdgroup]]) {
    x[gid] = simd_shuffle_and_fill_down(x[gid], 0.0f, ushort(1));  // expect: version
}

[[stitchable]] float f(float x) {  // expect: version
    return x;
}

#if __METAL_VERSION__ >= 300
kernel void k3(device atomic_float* acc [[buffer(0)]]) {}  // Metal 2.3 never reads this branch
#endif

#ifdef __PYMETALNN__
kernel void only_here(device atomic_float* acc [[buffer(0)]]) {}  // nor this one
#endif
