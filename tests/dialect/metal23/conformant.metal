// Constructs near the rules that MSL 2.3 accepts: no finding expected.
#include <metal_stdlib>
using namespace metal;

struct Pair { float a, b; };
constant float table[4] = {0.0f, 1.0f, 2.0f, 3.0f};

template <typename T>
inline T sq(T v) { return v * v; }

inline float sq_f(float v) { return sq(v); }  // a call to another function of a similar name

template <uint TG>
[[max_total_threads_per_threadgroup(TG)]]
kernel void good(device float* x [[buffer(0)]], device half* h [[buffer(1)]],
                 constant Pair& p [[buffer(2)]],
                 uint gid [[thread_position_in_grid]], uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float tile[TG];
    thread float local[4];
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    local[0] = tile[(lid + 1u) % TG] * table[gid & 3u];
    half hv = h[gid];
    h[gid] = max(hv, 0.0h) + clamp(hv, half(0), half(1));
    x[gid] = sq_f(local[0]) + p.a * p.b + max(x[gid], 0.5f);
    simdgroup_float8x8 m;  // simdgroup matrices are MSL 2.3
}
template [[host_name("good_256")]] [[kernel]] decltype(good<256>) good<256>;
