// Array sizes must be constant expressions; C++ compilers accept run-time sizes as an extension.
#include <metal_stdlib>
using namespace metal;

struct P { uint n; };
constant uint TABLE = 8;
constexpr uint TILE = 64;

template <uint N>
[[max_total_threads_per_threadgroup(64)]]
kernel void k(device float* x [[buffer(0)]], constant P& p [[buffer(1)]],
              uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float ok1[TILE * 2];
    threadgroup float ok2[N + 1];
    const uint four = 4;
    float ok3[four][TABLE];
    float ok4[sizeof(P) / 4];
    threadgroup float bad1[p.n];  // expect: vla
    const uint m = p.n * 2u;
    float bad2[m];  // expect: vla
    ok1[lid] = x[lid];
    ok2[0] = 0.0f;
    ok3[0][0] = ok4[0] = bad2[0] = bad1[0] = 1.0f;
}
template [[host_name("k64")]] [[kernel]] decltype(k<64>) k<64>;
