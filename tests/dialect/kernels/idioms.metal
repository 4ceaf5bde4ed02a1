// Idioms common in MLX / ggml kernels: static constant constexpr, [[kernel]] void,
// #pragma unroll, pointer casts, threadgroup pointers passed to helpers, struct buffers, 64-bit
// integers and metal_stdlib constants.
#include <metal_stdlib>
using namespace metal;

static constant constexpr const int SIMD_SIZE = 32;
constexpr constant static float KVALUES[4] = {-1.5f, 0.25f, 2.0f, 8.0f};

inline float twice(float x) {
    return 2.0f * x;
}

template <typename T>
inline T clamp01(T x) {
    return clamp(x, T(0), T(1));
}

// A helper taking threadgroup memory and synchronizing inside.
inline float tg_reverse(threadgroup float* buf, uint lid, float v) {
    buf[lid] = v;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    return buf[63u - lid];
}

[[max_total_threads_per_threadgroup(64)]]
[[kernel]] void idioms(device const float* x [[buffer(0)]],
                       device float* out [[buffer(1)]],
                       constant uint& n [[buffer(2)]],
                       uint gid [[thread_position_in_grid]],
                       uint lid [[thread_position_in_threadgroup]]) {
    threadgroup float shared_buf[64];
    float v = gid < n ? x[gid] : 0.0f;
    float rev = tg_reverse(shared_buf, lid, v);
    if (gid >= n) return;
    float acc = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        acc += v * float(i);
    }
#pragma clang loop unroll(full)
    for (int i = 0; i < 4; ++i) {
        acc += KVALUES[i];
    }
    device float* o = out + gid * 4u;
    o[0] = twice(acc) + float(SIMD_SIZE);
    o[1] = clamp01(v);
    o[2] = rev;
    o[3] = ((device const float4*)x)[gid / 4u][gid % 4u];
}

struct Item {
    float w;
    int k;
    uint flags;
};

kernel void struct_buffer(device const Item* items [[buffer(0)]],
                          device Item* out [[buffer(1)]],
                          constant uint& n [[buffer(2)]],
                          uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    Item it = items[gid];
    thread Item& r = out[gid];
    r.w = it.w * 2.0f;
    r.k = it.k - 1;
    r.flags = it.flags | 1u;
}

kernel void int64_ops(device const uint* a [[buffer(0)]],
                      device const int* b [[buffer(1)]],
                      device ulong* uo [[buffer(2)]],
                      device long* io [[buffer(3)]],
                      constant uint& n [[buffer(4)]],
                      uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    ulong x = ulong(a[gid]) * ulong(a[(gid + 1u) % n]);
    uo[gid] = (x >> 7) ^ (x << 3);
    long y = long(b[gid]) * long(b[gid]) * long(-3);
    io[gid] = y / long(7) + long(INT_MIN);
}

kernel void stdlib_constants(device float* f [[buffer(0)]],
                             device int* i [[buffer(1)]],
                             device uint* u [[buffer(2)]],
                             uint gid [[thread_position_in_grid]]) {
    if (gid != 0) return;
    f[0] = INFINITY;
    f[1] = -INFINITY;
    f[2] = NAN;
    f[3] = M_PI_F;
    f[4] = FLT_MAX;
    f[5] = FLT_MIN;
    f[6] = FLT_EPSILON;
    f[7] = float(HALF_MAX);
    f[8] = float(HALF_EPSILON);
    f[9] = MAXFLOAT;
    f[10] = M_E_F;
    f[11] = M_SQRT2_F;
    i[0] = INT_MAX;
    i[1] = INT_MIN;
    i[2] = SHRT_MAX;
    i[3] = CHAR_MIN;
    u[0] = UINT_MAX;
    u[1] = as_type<uint>(float(HALF_MIN));
}
