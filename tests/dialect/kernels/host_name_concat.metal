// MLX builds host names from adjacent string literals: "addk_" #tname is one string in C++.
#include <metal_stdlib>
using namespace metal;

template <typename T, int K>
[[max_total_threads_per_threadgroup(256)]]  // no bounds check: the grid must be whole 256s
kernel void addk(device const T* in [[buffer(0)]],
                 device T* out [[buffer(1)]],
                 uint gid [[thread_position_in_grid]]) {
    out[gid] = in[gid] + T(K);
}

#define instantiate_kernel(name, func, ...) \
    template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#define instantiate_addk(tname, type, K) instantiate_kernel("addk_" #tname "_" #K, addk, type, K)

instantiate_addk(float, float, 3)
instantiate_addk(int, int, 7)
instantiate_addk(int, int, 9)
