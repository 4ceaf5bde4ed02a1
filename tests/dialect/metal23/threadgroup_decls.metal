// Threadgroup memory: in kernels only, no initializers, at most 32 KiB.
#include <metal_stdlib>
using namespace metal;

inline float helper(threadgroup float* shared, uint lid) {  // a pointer parameter: allowed
    threadgroup float scratch[32];  // expect: threadgroup-scope
    scratch[lid & 31u] = shared[lid];
    return scratch[0];
}

[[max_total_threads_per_threadgroup(256)]]
kernel void init(device float* x [[buffer(0)]], uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float total = 0.0f;  // expect: threadgroup-init
    threadgroup float tile[256];
    threadgroup float* p = tile;
    tile[lid] = x[lid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[lid] = helper(p, lid) + total;
}

[[max_total_threads_per_threadgroup(256)]]
kernel void too_big(device float* x [[buffer(0)]],  // expect: threadgroup-memory
                    uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float a[8192];
    threadgroup half b[2 * 2048 + 2];
    a[lid] = x[lid];
    b[lid] = half(x[lid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[lid] = a[255u - lid] + float(b[lid]);
}

// Sizes through template arguments, constexpr function templates and a class template's typedef
// (with a partial specialization): only the instantiation that goes past 32 KiB is reported.
template <bool WIDE, typename T> struct stage_t { typedef T type; };
template <typename T> struct stage_t<true, T> { typedef float4 type; };
template <int N, bool WIDE> constexpr int rows() { return WIDE ? 2 * N : N; }

template <int N, bool WIDE>
[[max_total_threads_per_threadgroup(256)]]
kernel void sized(device float* x [[buffer(0)]],  // expect: threadgroup-memory
                  uint lid [[thread_position_in_threadgroup]]) {
    typedef typename stage_t<WIDE, half>::type S;
    constexpr int R = rows<N, WIDE>();
    threadgroup S buf[R * 256];
    buf[lid] = S(x[lid]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    x[lid] = float(buf[255u - lid][0]);
}
template [[host_name("sized_small")]] [[kernel]] decltype(sized<4, true>) sized<4, true>;
template [[host_name("sized_half")]] [[kernel]] decltype(sized<32, false>) sized<32, false>;
template [[host_name("sized_big")]] [[kernel]] decltype(sized<5, true>) sized<5, true>;
