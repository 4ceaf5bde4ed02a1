// Conformance kernels: every SIMD-group function, on full simdgroups and on partial ones
// (lanes that returned early), int and float.
#include <metal_stdlib>
using namespace metal;

// n: threads with gid >= n return at once; k: lanes with lane >= k return at once.
struct SimdParams {
    uint n;
    uint k;
};

#define NF 12  // values per thread in `out`
#define NI 4   // values per thread in `iout`

// The active lanes of a simdgroup are 0..m-1 (both early returns remove a suffix of lanes);
// sources of shuffles are chosen among them, as Metal requires.
#define SIMD_KERNEL(T, NAME)                                                   \
kernel void NAME(device const T* x [[buffer(0)]],                             \
                 device const T* p [[buffer(1)]],                             \
                 device T* out [[buffer(2)]],                                 \
                 device int* iout [[buffer(3)]],                              \
                 constant SimdParams& prm [[buffer(4)]],                      \
                 uint gid [[thread_position_in_grid]],                        \
                 uint lane [[thread_index_in_simdgroup]]) {                   \
    if (gid >= prm.n) return;                                                 \
    if (lane >= prm.k) return;                                                \
    uint m = prm.n - (gid - lane);                                            \
    if (m > 32u) m = 32u;                                                     \
    if (m > prm.k) m = prm.k;                                                 \
    T v = x[gid];                                                             \
    device T* o = out + gid * NF;                                             \
    o[0] = simd_sum(v);                                                       \
    o[1] = simd_max(v);                                                       \
    o[2] = simd_min(v);                                                       \
    o[3] = simd_prefix_exclusive_sum(v);                                      \
    o[4] = simd_prefix_inclusive_sum(v);                                      \
    o[5] = simd_shuffle(v, ushort((lane * 7u + 3u) % m));                     \
    o[6] = simd_shuffle_xor(v, ushort(1));                                    \
    o[7] = simd_shuffle_up(v, ushort(3));                                     \
    o[8] = simd_shuffle_down(v, ushort(5));                                   \
    o[9] = simd_broadcast(v, ushort(2));                                      \
    o[10] = simd_product(p[gid]);                                             \
    o[11] = simd_shuffle_xor(v, ushort(16));                                  \
    device int* io = iout + gid * NI;                                         \
    io[0] = simd_all(v > T(-2)) ? 1 : 0;                                      \
    io[1] = simd_any(v > T(2)) ? 1 : 0;                                       \
    io[2] = int(uint(ulong(simd_ballot(v > T(0)))));                          \
    io[3] = simd_all(lane < m) ? 1 : 0;                                       \
}

SIMD_KERNEL(float, simd_float)
SIMD_KERNEL(int, simd_int)

// Integer-only reductions, prefix products and first-lane functions.
kernel void simd_int_extra(device const int* x [[buffer(0)]],
                           device const int* p [[buffer(1)]],
                           device int* out [[buffer(2)]],
                           constant SimdParams& prm [[buffer(3)]],
                           uint gid [[thread_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]]) {
    if (gid >= prm.n) return;
    if (lane >= prm.k) return;
    int v = x[gid];
    device int* o = out + gid * 8u;
    o[0] = simd_and(v);
    o[1] = simd_or(v);
    o[2] = simd_xor(v);
    o[3] = simd_prefix_exclusive_product(p[gid]);
    o[4] = simd_prefix_inclusive_product(p[gid]);
    o[5] = simd_broadcast_first(v);
    o[6] = simd_is_first() ? 1 : 0;
    o[7] = int(simd_sum(uint(v)));
}

// uint and float prefix products / unsigned reductions.
kernel void simd_uint_float_extra(device const uint* xu [[buffer(0)]],
                                  device const float* pf [[buffer(1)]],
                                  device uint* ou [[buffer(2)]],
                                  device float* of [[buffer(3)]],
                                  constant SimdParams& prm [[buffer(4)]],
                                  uint gid [[thread_position_in_grid]],
                                  uint lane [[thread_index_in_simdgroup]]) {
    if (gid >= prm.n) return;
    if (lane >= prm.k) return;
    uint u = xu[gid];
    ou[gid * 4u + 0u] = simd_max(u);
    ou[gid * 4u + 1u] = simd_min(u);
    ou[gid * 4u + 2u] = simd_sum(u);
    ou[gid * 4u + 3u] = simd_prefix_exclusive_sum(u);
    of[gid * 2u + 0u] = simd_prefix_exclusive_product(pf[gid]);
    of[gid * 2u + 1u] = simd_prefix_inclusive_product(pf[gid]);
}

// SIMD-group functions in divergent control flow: inside a branch, only the lanes that took it
// are active.
// No bounds check (an early return would change the active lanes): the test's count is a multiple
// of the threadgroup size, which Metal takes from this attribute (else the pipeline's maximum).
[[max_total_threads_per_threadgroup(256)]]
kernel void simd_divergent(device const int* x [[buffer(0)]],
                           device int* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]]) {
    int v = x[gid];
    int a;
    if (lane & 1u) {
        a = simd_sum(v);
    } else {
        a = simd_min(v);
    }
    int loops = 0;
    for (uint i = 0; i < lane % 4u; ++i) {
        loops += simd_sum(1);
    }
    int b = simd_sum(v);  // reconverged: every lane
    out[gid * 3u + 0u] = a;
    out[gid * 3u + 1u] = loops;
    out[gid * 3u + 2u] = b;
}

// Lanes that return between two SIMD-group calls leave the second one's active set.
// No bounds check (an early return would change the active lanes): the test's count is a multiple
// of the threadgroup size, which Metal takes from this attribute (else the pipeline's maximum).
[[max_total_threads_per_threadgroup(256)]]
kernel void simd_midreturn(device const int* x [[buffer(0)]],
                           device int* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]],
                           uint lane [[thread_index_in_simdgroup]]) {
    int v = x[gid];
    int s1 = simd_sum(v);
    out[gid * 3u + 0u] = s1;
    if (lane % 8u >= 5u) {
        out[gid * 3u + 1u] = -1;
        out[gid * 3u + 2u] = -1;
        return;
    }
    int s2 = simd_sum(v);
    out[gid * 3u + 1u] = s2;
    if (lane >= 20u) {
        out[gid * 3u + 2u] = -2;
        return;
    }
    out[gid * 3u + 2u] = simd_prefix_exclusive_sum(v) + simd_max(v);
}

// simd functions in a helper function called from the kernel.
template <typename T>
T warp_scan(T v) {
    return simd_prefix_inclusive_sum(v);
}

// No bounds check (an early return would change the active lanes): the test's count is a multiple
// of the threadgroup size, which Metal takes from this attribute (else the pipeline's maximum).
[[max_total_threads_per_threadgroup(256)]]
kernel void simd_helper(device const int* x [[buffer(0)]],
                        device int* out [[buffer(1)]],
                        uint gid [[thread_position_in_grid]]) {
    out[gid] = warp_scan(x[gid]);
}

// simdgroup_barrier, then reading a neighbour's threadgroup-memory value.
[[max_total_threads_per_threadgroup(64)]]
kernel void simd_barrier(device const int* x [[buffer(0)]],
                         device int* out [[buffer(1)]],
                         uint gid [[thread_position_in_grid]],
                         uint lid [[thread_position_in_threadgroup]],
                         uint lane [[thread_index_in_simdgroup]]) {
    threadgroup int buf[64];
    buf[lid] = x[gid] * 2;
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = buf[(lid - lane) + ((lane + 1u) & 31u)];
}
