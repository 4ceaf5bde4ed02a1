#include <metal_stdlib>
using namespace metal;

inline uint fact(uint n) {
    return n <= 1u ? 1u : n * fact(n - 1u);  // expect: recursion
}

inline uint is_odd(uint n);
inline uint is_even(uint n) { return n == 0u ? 1u : is_odd(n - 1u); }  // expect: recursion
inline uint is_odd(uint n) { return n == 0u ? 0u : is_even(n - 1u); }  // expect: recursion

kernel void k(device uint* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
    x[gid] = fact(x[gid]) + is_even(x[gid]);
}
