// Conformance kernels: device and threadgroup atomics under contention.
#include <metal_stdlib>
using namespace metal;

// ci: [0] counter, [1] min, [2] max, [3] fetch_sub counter
// (atomic_float, an MSL 3.0 type, is exercised by atomics_float.metal)
// cu: [0] sum of gid, [1] 0 - sum of gid, [2] min, [3] max, [4] or, [5] and, [6] xor
kernel void atomic_contention(device atomic_int* ci [[buffer(0)]],
                              device atomic_uint* cu [[buffer(1)]],
                              device int* old_i [[buffer(2)]],
                              device const int* xi [[buffer(3)]],
                              constant uint& n [[buffer(4)]],
                              uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    old_i[gid] = atomic_fetch_add_explicit(&ci[0], 1, memory_order_relaxed);
    atomic_fetch_min_explicit(&ci[1], xi[gid], memory_order_relaxed);
    atomic_fetch_max_explicit(&ci[2], xi[gid], memory_order_relaxed);
    atomic_fetch_sub_explicit(&ci[3], 2, memory_order_relaxed);
    atomic_fetch_add_explicit(&cu[0], gid, memory_order_relaxed);
    atomic_fetch_sub_explicit(&cu[1], gid, memory_order_relaxed);
    atomic_fetch_min_explicit(&cu[2], uint(xi[gid]), memory_order_relaxed);
    atomic_fetch_max_explicit(&cu[3], uint(xi[gid]), memory_order_relaxed);
    atomic_fetch_or_explicit(&cu[4], 1u << (gid % 32u), memory_order_relaxed);
    atomic_fetch_and_explicit(&cu[5], ~(1u << (gid % 29u)), memory_order_relaxed);
    atomic_fetch_xor_explicit(&cu[6], gid * 2654435761u, memory_order_relaxed);
}

// Compare-exchange loops: a float maximum kept as bits in an atomic_uint, and an integer sum.
kernel void atomic_cas(device atomic_uint* fmax_bits [[buffer(0)]],
                       device atomic_int* acc [[buffer(1)]],
                       device const float* x [[buffer(2)]],
                       constant uint& n [[buffer(3)]],
                       uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float v = x[gid];
    uint expected = atomic_load_explicit(&fmax_bits[0], memory_order_relaxed);
    while (as_type<float>(expected) < v) {
        if (atomic_compare_exchange_weak_explicit(&fmax_bits[0], &expected, as_type<uint>(v),
                                                  memory_order_relaxed, memory_order_relaxed)) {
            break;
        }
    }
    int e = atomic_load_explicit(&acc[0], memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(&acc[0], &e, e + int(gid % 7u),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

// exchange on one contended slot, store into per-thread cells.
kernel void atomic_xchg_store(device atomic_int* slot [[buffer(0)]],
                              device int* olds [[buffer(1)]],
                              device atomic_int* cells [[buffer(2)]],
                              device atomic_uint* ucells [[buffer(3)]],
                              constant uint& n [[buffer(4)]],
                              uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    olds[gid] = atomic_exchange_explicit(&slot[0], int(gid) + 1, memory_order_relaxed);
    atomic_store_explicit(&cells[gid], int(gid) * 3 - 7, memory_order_relaxed);
    atomic_store_explicit(&ucells[gid], gid ^ 0xdeadbeefu, memory_order_relaxed);
}

// load (in a later dispatch) what another thread stored.
kernel void atomic_load_other(device atomic_int* cells [[buffer(0)]],
                              device atomic_uint* ucells [[buffer(1)]],
                              device int* out [[buffer(2)]],
                              device uint* uout [[buffer(3)]],
                              constant uint& n [[buffer(4)]],
                              uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    uint j = (gid * 7u + 3u) % n;
    out[gid] = atomic_load_explicit(&cells[j], memory_order_relaxed);
    uout[gid] = atomic_load_explicit(&ucells[j], memory_order_relaxed);
}

// Threadgroup atomics: one counter per threadgroup, plus a histogram in threadgroup memory.
[[max_total_threads_per_threadgroup(128)]]
kernel void atomic_threadgroup(device int* sums [[buffer(0)]],
                               device uint* hist [[buffer(1)]],
                               device const int* xi [[buffer(2)]],
                               constant uint& n [[buffer(3)]],
                               uint gid [[thread_position_in_grid]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint tgid [[threadgroup_position_in_grid]]) {
    threadgroup atomic_int total;
    threadgroup atomic_uint bins[16];
    if (lid == 0) {
        atomic_store_explicit(&total, 0, memory_order_relaxed);
    }
    if (lid < 16) {
        atomic_store_explicit(&bins[lid], 0u, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (gid < n) {
        atomic_fetch_add_explicit(&total, xi[gid], memory_order_relaxed);
        atomic_fetch_add_explicit(&bins[uint(xi[gid]) & 15u], 1u, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid == 0) {
        sums[tgid] = atomic_load_explicit(&total, memory_order_relaxed);
    }
    if (lid < 16) {
        hist[tgid * 16u + lid] = atomic_load_explicit(&bins[lid], memory_order_relaxed);
    }
}
