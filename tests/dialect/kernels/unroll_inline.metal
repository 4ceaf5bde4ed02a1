// Loops under `#pragma unroll` (its three spellings) and `#pragma clang loop vectorize(enable)`,
// helpers both METAL_FUNC and plain inline: the cpu target rewrites the pragmas for g++ and
// always inlines the METAL_FUNC one (docs/dialect.md); results must not depend on any of it.
#include <metal_stdlib>
using namespace metal;

// always inlined, as on Metal
METAL_FUNC void chunk_axpy(thread float* v, float a, float b) {
    for (int e = 0; e < 4; ++e) v[e] = a * v[e] + b;
}

// left to the C++ compiler's heuristics
inline float poly(float x) {
    float r = 0.0f;
    const float c[8] = {0.5f, -1.25f, 2.0f, 0.125f, -0.75f, 1.5f, -0.0625f, 0.25f};
    for (int k = 0; k < 8; ++k) {
        r = r * x + c[k];
    }
    if (x > 1.0f) {
        r = r - x * 0.5f;
    } else if (x < -1.0f) {
        r = r + x * 0.25f;
    } else {
        r = r * 0.75f + x;
    }
    float s = 0.0f;
    for (int k = 0; k < 3; ++k) {
        s += (r + float(k)) * (x - float(k)) * 0.125f;
    }
    return r + s;
}

// out[4 gid + e] = poly(2 relu(a x + b)) over two 4-element chunks per thread, plus a running
// sum over three steps (`unroll(3)`) on the last element, in a loop kept rolled (`unroll 1`)
kernel void unroll_inline(device const float* x [[buffer(0)]],
                          device float* out [[buffer(1)]],
                          constant uint& n [[buffer(2)]],
                          uint gid [[thread_position_in_grid]]) {
    float v[2][4];
#pragma unroll
    for (uint u = 0; u < 2u; ++u) {
        for (int e = 0; e < 4; ++e) {
            const uint i = min((2u * gid + u) * 4u + uint(e), n - 1u);
            v[u][e] = x[i];
        }
    }
#pragma unroll
    for (uint u = 0; u < 2u; ++u) {
        chunk_axpy(v[u], 1.5f, -0.25f);
        float acc = 0.0f;
#pragma unroll(3)
        for (int k = 0; k < 3; ++k) acc += v[u][k] * float(k + 1);
#pragma clang loop vectorize(enable)
        for (int e = 0; e < 4; ++e) v[u][e] = v[u][e] <= 0.0f ? 0.0f : v[u][e] * 2.0f;
#pragma unroll 1
        for (int e = 0; e < 4; ++e) {
            const uint i = (2u * gid + u) * 4u + uint(e);
            if (i < n) out[i] = poly(v[u][e]) + (e == 3 ? acc : 0.0f);
        }
    }
}
