// Conformance kernels for the cpu backend's work-item loops (runtime/lockstep.py): one kernel per
// shape of control flow around threadgroup barriers and SIMD-group functions. Threadgroups of
// 64 threads (two simdgroups). tests/dialect/test_lockstep.py holds the numpy references.
#include <metal_stdlib>
using namespace metal;

#define TG 64u

struct LsParams {
    uint n;       // valid threads (kernels bound-check against it)
    uint rounds;  // trip count of uniform loops
    uint mode;    // selects a uniformly taken branch
    uint pad;
};

// A barrier inside a uniform loop: each round every thread adds its right neighbour's value.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_barrier_loop(device const float* x [[buffer(0)]],
                            device float* out [[buffer(1)]],
                            constant LsParams& p [[buffer(2)]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint gid [[thread_position_in_grid]]) {
    threadgroup float tile[TG];
    float v = x[gid];
    for (uint r = 0; r < p.rounds; ++r) {
        tile[lid] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        v = v * 0.5f + tile[(lid + 1u) % TG];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[gid] = v;
}

// Barriers inside branches every thread takes alike (a parameter, the threadgroup's index), and
// a per-thread value declared before the branch, read after it.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_barrier_branch(device const float* x [[buffer(0)]],
                              device float* out [[buffer(1)]],
                              constant LsParams& p [[buffer(2)]],
                              uint lid [[thread_position_in_threadgroup]],
                              uint gid [[thread_position_in_grid]],
                              uint tg [[threadgroup_position_in_grid]]) {
    threadgroup float tile[TG];
    float v = x[gid];
    float w = float(lid);
    if (p.mode == 1u) {
        tile[lid] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        v = tile[TG - 1u - lid];  // reversed
    } else {
        v = v * 2.0f;
    }
    if (tg % 2u == 1u) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        tile[lid] = v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        v = tile[(lid + 3u) % TG];
    }
    out[gid] = v + w;
}

// Nested loops with the barrier in the inner one; a per-thread loop (no barrier) with a
// trip count that differs between threads, between them.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_nested(device const float* x [[buffer(0)]],
                      device float* out [[buffer(1)]],
                      constant LsParams& p [[buffer(2)]],
                      uint lid [[thread_position_in_threadgroup]],
                      uint gid [[thread_position_in_grid]]) {
    threadgroup float tile[TG];
    float acc = 0.0f;
    for (uint i = 0; i < p.rounds; ++i) {
        float v = x[gid] + float(i);
        for (uint j = 0; j < 2u; ++j) {
            tile[lid] = v;
            threadgroup_barrier(mem_flags::mem_threadgroup);
            v = tile[(lid + j + 1u) % TG];
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        for (uint k = 0; k < lid % 3u; ++k) v += 1.0f;
        acc += v;
    }
    out[gid] = acc;
}

// Threads past n return before the barrier; the others sum the values of the threads of their
// threadgroup that are still there, through threadgroup memory.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_early_return(device const float* x [[buffer(0)]],
                            device float* out [[buffer(1)]],
                            constant LsParams& p [[buffer(2)]],
                            uint lid [[thread_position_in_threadgroup]],
                            uint gid [[thread_position_in_grid]],
                            uint tg [[threadgroup_position_in_grid]]) {
    threadgroup float tile[TG];
    if (gid >= p.n) return;
    tile[lid] = x[gid];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    uint live = min(TG, p.n - tg * TG);
    float s = 0.0f;
    for (uint i = 0; i < live; ++i) s += tile[i];
    out[gid] = s;
}

// Two-dimensional threadgroup array (8 x 8 transpose, padded rows) and a threadgroup array
// of structs.
struct Pair {
    float a;
    int b;
};

[[max_total_threads_per_threadgroup(64)]]
kernel void ls_tg_arrays(device const float* x [[buffer(0)]],
                         device float* out [[buffer(1)]],
                         device int* iout [[buffer(2)]],
                         uint lid [[thread_position_in_threadgroup]],
                         uint gid [[thread_position_in_grid]]) {
    threadgroup float t[8][9];
    threadgroup Pair pairs[TG];
    uint r = lid / 8u, c = lid % 8u;
    t[r][c] = x[gid];
    pairs[lid].a = x[gid] * 3.0f;
    pairs[lid].b = int(lid) * 2;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = t[c][r] + pairs[TG - 1u - lid].a;
    iout[gid] = pairs[(lid + 5u) % TG].b;
}

// SIMD-group functions in divergent control flow: a loop whose trip count differs between
// lanes, a break, a continue, a branch, and a condition that is itself a SIMD-group function.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_simd_divergent(device const int* x [[buffer(0)]],
                              device int* out [[buffer(1)]],
                              uint lane [[thread_index_in_simdgroup]],
                              uint gid [[thread_position_in_grid]]) {
    int v = x[gid];
    int a = 0;
    for (uint i = 0; i < lane % 5u; ++i) {
        a += simd_sum(v + int(i));
    }
    int b = 0;
    for (uint i = 0; i < 8u; ++i) {
        if (int(i) > (v & 7)) break;
        b += simd_max(v * int(i + 1u));
        if ((lane + i) % 3u == 0u) continue;
        b += 1;
    }
    int c = 0;
    if (v % 2 == 0) {
        c = simd_prefix_exclusive_sum(v) + simd_shuffle_down(v, ushort(1));
    } else {
        c = simd_min(v);
    }
    int d = v;
    while (simd_any(d > 3)) d = d / 2;
    out[gid * 4u + 0u] = a;
    out[gid * 4u + 1u] = b;
    out[gid * 4u + 2u] = c;
    out[gid * 4u + 3u] = d;
}

// SIMD shuffles and reductions with every lane active, their results kept across a barrier
// (per-thread values in the work-item loops), and a shuffle in a loop every lane runs.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_simd_convergent(device const int* x [[buffer(0)]],
                               device int* out [[buffer(1)]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint gid [[thread_position_in_grid]],
                               uint lane [[thread_index_in_simdgroup]]) {
    threadgroup int t[TG];
    int v = x[gid];
    int s = simd_sum(v);
    int mx = simd_max(v);
    int pre = simd_prefix_inclusive_sum(v);
    int sh = simd_shuffle(v, ushort((lane * 7u + 3u) % 32u));
    int sx = simd_shuffle_xor(v, ushort(5));
    int su = simd_shuffle_up(v, ushort(3));
    int sd = simd_shuffle_down(v, ushort(2));
    int bc = simd_broadcast(v, ushort(17));
    t[lid] = s;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    int other = t[TG - 1u - lid];  // the other simdgroup's sum
    int r = v;
    for (uint i = 0; i < 5u; ++i) r += simd_shuffle_xor(r, ushort(1u << i));  // butterfly sum
    device int* o = out + gid * 10u;
    o[0] = s;
    o[1] = mx;
    o[2] = pre;
    o[3] = sh;
    o[4] = sx;
    o[5] = su;
    o[6] = sd;
    o[7] = bc;
    o[8] = other;
    o[9] = r;
}

// A helper with barriers and a SIMD-group reduction (inlined by the work-item loops), called
// twice in a loop, with an early return inside the helper.
template <typename T>
inline T block_sum(T v, threadgroup T* s, uint lid, uint lane, uint sg) {
    v = simd_sum(v);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lane == 0u) s[sg] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (lid >= 32u) return T(0);
    return s[0] + s[1];
}

[[max_total_threads_per_threadgroup(64)]]
kernel void ls_helper(device const float* x [[buffer(0)]],
                      device float* out [[buffer(1)]],
                      constant LsParams& p [[buffer(2)]],
                      uint lid [[thread_position_in_threadgroup]],
                      uint gid [[thread_position_in_grid]],
                      uint lane [[thread_index_in_simdgroup]],
                      uint sg [[simdgroup_index_in_threadgroup]]) {
    threadgroup float s[2];
    float v = x[gid];
    float total = 0.0f;
    for (uint r = 0; r < p.rounds; ++r) {
        total += block_sum(v * float(r + 1u), s, lid, lane, sg);
    }
    out[gid] = total;
}

// One declaration with a uniform declarator and a per-thread one (`n = p.n, mine = ...`), then
// a value computed from the uniform one alone: the declaration is kept per thread as a whole,
// so what reads n must be too (a scalar `nf` would name an n that exists only inside the loop).
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_mixed_decl(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          constant LsParams& p [[buffer(2)]],
                          uint lid [[thread_position_in_threadgroup]],
                          uint gid [[thread_position_in_grid]]) {
    threadgroup float tile[TG];
    const uint n = p.n, mine = gid < n ? gid : n - 1u;
    const float nf = float(n);
    tile[lid] = x[mine];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[gid] = tile[(lid + 1u) % TG] * nf + float(mine);
}

// A barrier inside a switch: outside what the work-item loops take, so this kernel keeps
// fibers on the cpu (reported) and must still be right.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_fallback_switch(device const float* x [[buffer(0)]],
                               device float* out [[buffer(1)]],
                               constant LsParams& p [[buffer(2)]],
                               uint lid [[thread_position_in_threadgroup]],
                               uint gid [[thread_position_in_grid]]) {
    threadgroup float tile[TG];
    float v = x[gid];
    switch (p.mode) {
        case 1u:
            tile[lid] = v;
            threadgroup_barrier(mem_flags::mem_threadgroup);
            v = tile[TG - 1u - lid];
            break;
        default:
            break;
    }
    out[gid] = v;
}

// A counter with one value for the whole threadgroup (same initializer, same updates in every
// thread) that is written through a reference: by a helper's `thread uint&` parameter, by a
// local reference, or inside a helper that synchronizes. Each thread owns its counter; were it
// one scalar for the threadgroup, every thread's update would land on it (64 steps a round).
inline void ls_step(thread uint& k, uint m) {
    if (++k == m) k = 0u;
}

inline void ls_step_sync(thread uint& k, uint m, threadgroup float* tile, uint lid, float v) {
    if (++k == m) k = 0u;
    tile[lid] = v + float(k);
    threadgroup_barrier(mem_flags::mem_threadgroup);
}

// The barriers inside an inner unrolled loop of PF steps (a prefetch-depth pattern); out holds
// `rounds` rows of the right neighbour's x + k after the round's step (k mod p.mode + 2).
template <int PF>
kernel void ls_ref_param(device const float* x [[buffer(0)]],
                         device float* out [[buffer(1)]],
                         constant LsParams& p [[buffer(2)]],
                         uint lid [[thread_position_in_threadgroup]],
                         uint gid [[thread_position_in_grid]],
                         uint ng [[threadgroups_per_grid]]) {
    threadgroup float tile[TG];
    const float v = gid < p.n ? x[gid] : 0.0f;
    uint k = 0u;
    for (uint t = 0; t < p.rounds; t += uint(PF)) {
#pragma unroll
        for (int h = 0; h < PF; ++h) {
            const uint u = t + uint(h);
            if (u < p.rounds) {
                ls_step(k, p.mode + 2u);
                tile[lid] = v + float(k);
                threadgroup_barrier(mem_flags::mem_threadgroup);
                if (gid < p.n) out[u * ng * TG + gid] = tile[(lid + 1u) % TG];
                threadgroup_barrier(mem_flags::mem_threadgroup);
            }
        }
    }
}
template [[host_name("ls_ref_param1")]] [[max_total_threads_per_threadgroup(64)]]
kernel void ls_ref_param<1>(device const float*, device float*, constant LsParams&, uint, uint, uint);
template [[host_name("ls_ref_param2")]] [[max_total_threads_per_threadgroup(64)]]
kernel void ls_ref_param<2>(device const float*, device float*, constant LsParams&, uint, uint, uint);

// The counter passed as one branch of a uniform `?:` to the reference parameter.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_ref_ternary(device const float* x [[buffer(0)]],
                           device float* out [[buffer(1)]],
                           constant LsParams& p [[buffer(2)]],
                           uint lid [[thread_position_in_threadgroup]],
                           uint gid [[thread_position_in_grid]],
                           uint ng [[threadgroups_per_grid]]) {
    threadgroup float tile[TG];
    const float v = gid < p.n ? x[gid] : 0.0f;
    uint k = 0u, spare = 0u;
    for (uint u = 0; u < p.rounds; ++u) {
        ls_step(p.rounds > 0u ? k : spare, p.mode + 2u);
        tile[lid] = v + float(k) + float(spare);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (gid < p.n) out[u * ng * TG + gid] = tile[(lid + 1u) % TG];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}

// The same counter stepped through a local reference, and inside a helper with a barrier.
[[max_total_threads_per_threadgroup(64)]]
kernel void ls_ref_local(device const float* x [[buffer(0)]],
                         device float* out [[buffer(1)]],
                         constant LsParams& p [[buffer(2)]],
                         uint lid [[thread_position_in_threadgroup]],
                         uint gid [[thread_position_in_grid]],
                         uint ng [[threadgroups_per_grid]]) {
    threadgroup float tile[TG];
    const float v = gid < p.n ? x[gid] : 0.0f;
    uint k = 0u, j = 0u;
    for (uint r = 0; r < p.rounds; ++r) {
        {
            thread uint& q = k;
            if (++q == p.mode + 2u) q = 0u;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // k is written only through q here
        tile[lid] = v + float(k);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        float a = tile[(lid + 1u) % TG];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        ls_step_sync(j, p.mode + 2u, tile, lid, v);
        a += 10.0f * tile[(lid + 1u) % TG];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (gid < p.n) out[r * ng * TG + gid] = a;
    }
}

// The counter as a struct stepped by a member function, and stepped by a helper through a
// parenthesized argument (`ls_step((j), m)` binds j itself).
struct LsCounter {
    uint k;
    void advance(uint m) {
        if (++k == m) k = 0u;
    }
};

[[max_total_threads_per_threadgroup(64)]]
kernel void ls_ref_member(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          constant LsParams& p [[buffer(2)]],
                          uint lid [[thread_position_in_threadgroup]],
                          uint gid [[thread_position_in_grid]],
                          uint ng [[threadgroups_per_grid]]) {
    threadgroup float tile[TG];
    const float v = gid < p.n ? x[gid] : 0.0f;
    LsCounter c = {0u};
    uint j = 0u;
    for (uint r = 0; r < p.rounds; ++r) {
        c.advance(p.mode + 2u);
        ls_step((j), p.mode + 2u);
        tile[lid] = v + float(c.k) + 10.0f * float(j);
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (gid < p.n) out[r * ng * TG + gid] = tile[(lid + 1u) % TG];
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
}
