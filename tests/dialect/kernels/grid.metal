// Conformance kernels: built-ins, grid sizes, threadgroup sizes, barriers and threadgroup memory.
#include <metal_stdlib>
using namespace metal;

// Every built-in of one thread, 10 values per thread, written only for gid < count.
#define BUILTINS_BODY                                                        \
    if (gid >= count) return;                                                \
    device uint* o = out + gid * 10u;                                        \
    o[0] = gid;                                                              \
    o[1] = lid;                                                              \
    o[2] = tgid;                                                             \
    o[3] = tpg;                                                              \
    o[4] = ngroups;                                                          \
    o[5] = lane;                                                             \
    o[6] = sid;                                                              \
    o[7] = tps;                                                              \
    o[8] = nsimd;                                                            \
    o[9] = tidx;

#define BUILTINS_PARAMS                                                      \
    device uint* out [[buffer(0)]],                                          \
    constant uint& count [[buffer(1)]],                                      \
    uint gid [[thread_position_in_grid]],                                    \
    uint lid [[thread_position_in_threadgroup]],                             \
    uint tgid [[threadgroup_position_in_grid]],                              \
    uint tpg [[threads_per_threadgroup]],                                    \
    uint ngroups [[threadgroups_per_grid]],                                  \
    uint lane [[thread_index_in_simdgroup]],                                 \
    uint sid [[simdgroup_index_in_threadgroup]],                             \
    uint tps [[threads_per_simdgroup]],                                      \
    uint nsimd [[simdgroups_per_threadgroup]],                               \
    uint tidx [[thread_index_in_threadgroup]]

#define BUILTINS_KERNEL(TG)                                                  \
[[max_total_threads_per_threadgroup(TG)]]                                    \
kernel void builtins_##TG(BUILTINS_PARAMS) { BUILTINS_BODY }

BUILTINS_KERNEL(32)
BUILTINS_KERNEL(64)
BUILTINS_KERNEL(256)
BUILTINS_KERNEL(1024)

// No attribute: the default threadgroup size (256).
kernel void builtins_default(BUILTINS_PARAMS) { BUILTINS_BODY }

// MLX spells the size inside the kernel attribute list.
[[kernel, max_total_threads_per_threadgroup(64)]] void builtins_mlx_attr(BUILTINS_PARAMS) {
    BUILTINS_BODY
}

// Built-ins declared as ushort (Metal allows ushort for the in-threadgroup ones).
kernel void builtins_ushort(device uint* out [[buffer(0)]],
                            constant uint& count [[buffer(1)]],
                            uint gid [[thread_position_in_grid]],
                            ushort lid [[thread_position_in_threadgroup]],
                            ushort lane [[thread_index_in_simdgroup]],
                            ushort sid [[simdgroup_index_in_threadgroup]]) {
    if (gid >= count) return;
    out[gid * 3u + 0u] = lid;
    out[gid * 3u + 1u] = lane;
    out[gid * 3u + 2u] = sid;
}

// Tree reduction in threadgroup memory: a grid-stride partial sum per thread, then log2(TG)
// barrier rounds; thread 0 writes the threadgroup's sum.
#define REDUCE_KERNEL(T, TG)                                                 \
[[max_total_threads_per_threadgroup(TG)]]                                    \
kernel void reduce_##T##_##TG(device const T* x [[buffer(0)]],              \
                              device T* partial [[buffer(1)]],               \
                              constant uint& n [[buffer(2)]],                \
                              uint gid [[thread_position_in_grid]],          \
                              uint lid [[thread_position_in_threadgroup]],   \
                              uint tgid [[threadgroup_position_in_grid]],    \
                              uint ngroups [[threadgroups_per_grid]]) {      \
    threadgroup T buf[TG];                                                   \
    T acc = T(0);                                                            \
    for (uint i = gid; i < n; i += TG * ngroups) {                           \
        acc += x[i];                                                         \
    }                                                                        \
    buf[lid] = acc;                                                          \
    threadgroup_barrier(mem_flags::mem_threadgroup);                         \
    for (uint s = TG / 2; s > 0; s >>= 1) {                                  \
        if (lid < s) {                                                       \
            buf[lid] += buf[lid + s];                                        \
        }                                                                    \
        threadgroup_barrier(mem_flags::mem_threadgroup);                     \
    }                                                                        \
    if (lid == 0) {                                                          \
        partial[tgid] = buf[0];                                              \
    }                                                                        \
}

REDUCE_KERNEL(int, 64)
REDUCE_KERNEL(int, 256)
REDUCE_KERNEL(float, 256)
REDUCE_KERNEL(uint, 1024)

// Two-level reduction: simd_sum per simdgroup, partials in threadgroup memory, then simdgroup 0
// reduces them (MLX's usual shape).
#define REDUCE_SIMD_KERNEL(TG)                                               \
[[max_total_threads_per_threadgroup(TG)]]                                    \
kernel void reduce_simd_int_##TG(device const int* x [[buffer(0)]],          \
                                 device int* partial [[buffer(1)]],          \
                                 constant uint& n [[buffer(2)]],             \
                                 uint gid [[thread_position_in_grid]],       \
                                 uint lid [[thread_position_in_threadgroup]],\
                                 uint tgid [[threadgroup_position_in_grid]], \
                                 uint lane [[thread_index_in_simdgroup]],    \
                                 uint sid [[simdgroup_index_in_threadgroup]],\
                                 uint nsimd [[simdgroups_per_threadgroup]]) {\
    threadgroup int sums[32];                                                \
    int v = gid < n ? x[gid] : 0;                                            \
    v = simd_sum(v);                                                         \
    if (lane == 0) {                                                         \
        sums[sid] = v;                                                       \
    }                                                                        \
    threadgroup_barrier(mem_flags::mem_threadgroup);                         \
    if (sid == 0) {                                                          \
        int w = lid < nsimd ? sums[lane] : 0;                                \
        w = simd_sum(w);                                                     \
        if (lid == 0) {                                                      \
            partial[tgid] = w;                                               \
        }                                                                    \
    }                                                                        \
}

REDUCE_SIMD_KERNEL(256)
REDUCE_SIMD_KERNEL(1024)

// Barrier ordering: each round every thread reads its right neighbour's value (written by
// another thread in the previous round), waits, then overwrites its own slot.
[[max_total_threads_per_threadgroup(128)]]
kernel void barrier_rotate(device const int* x [[buffer(0)]],
                           device int* out [[buffer(1)]],
                           constant uint& rounds [[buffer(2)]],
                           uint gid [[thread_position_in_grid]],
                           uint lid [[thread_position_in_threadgroup]],
                           uint tpg [[threads_per_threadgroup]]) {
    threadgroup int buf[128];
    buf[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint r = 0; r < rounds; ++r) {
        int nb = buf[(lid + 1u) % tpg];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[lid] = nb * 3 + int(lid) - int(r);
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[gid] = buf[lid];
}

// Two threadgroup arrays of different types plus a barrier inside a helper function.
inline void tg_sync() {
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

[[max_total_threads_per_threadgroup(64)]]
kernel void barrier_helper(device const float* x [[buffer(0)]],
                           device float* out [[buffer(1)]],
                           uint gid [[thread_position_in_grid]],
                           uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float a[64];
    threadgroup int b[64];
    a[lid] = x[gid];
    b[lid] = int(lid) * 2;
    tg_sync();
    out[gid] = a[63u - lid] + float(b[(lid + 5u) % 64u]);
}
