// Conformance kernel: atomic_float under contention. atomic_float is MSL 3.0, so this source is
// not for the metal backend (metalcompute compiles MSL 2.3); cuda and cpu run it.
#include <metal_stdlib>
using namespace metal;

// cf: [0] sum of x, [1] 0 - sum of x
kernel void atomic_float_contention(device atomic_float* cf [[buffer(0)]],
                                    device const float* x [[buffer(1)]],
                                    constant uint& n [[buffer(2)]],
                                    uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    atomic_fetch_add_explicit(&cf[0], x[gid], memory_order_relaxed);
    atomic_fetch_sub_explicit(&cf[1], x[gid], memory_order_relaxed);
}
