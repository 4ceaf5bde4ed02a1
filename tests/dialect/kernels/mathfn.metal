// Conformance kernels: the math functions of the dialect (docs/internals.md), plain, precise::
// and fast::.
#include <metal_stdlib>
using namespace metal;

#define NT 20  // transcendental outputs per thread

// a: any value in [-3, 3]; p: positive; u: in (-1, 1); b: any value in [-3, 3].
#define TRANSCENDENTALS(NS)                  \
    o[0] = NS exp(a);                        \
    o[1] = NS exp2(a);                       \
    o[2] = NS exp10(a);                      \
    o[3] = NS log(p);                        \
    o[4] = NS log2(p);                       \
    o[5] = NS log10(p);                      \
    o[6] = NS sqrt(p);                       \
    o[7] = NS rsqrt(p);                      \
    o[8] = NS pow(p, b);                     \
    o[9] = NS powr(p, b);                    \
    o[10] = NS tanh(a);                      \
    o[11] = NS sinh(a);                      \
    o[12] = NS cosh(a);                      \
    o[13] = NS sin(a * 4.0f);                \
    o[14] = NS cos(a * 4.0f);                \
    o[15] = NS tan(u);                       \
    o[16] = NS asin(u);                      \
    o[17] = NS acos(u);                      \
    o[18] = NS atan(a);                      \
    o[19] = NS atan2(a, b);

#define MATH_PARAMS                                          \
    device const float* A [[buffer(0)]],                     \
    device const float* B [[buffer(1)]],                     \
    device const float* P [[buffer(2)]],                     \
    device const float* U [[buffer(3)]],                     \
    device float* out [[buffer(4)]],                         \
    constant uint& n [[buffer(5)]],                          \
    uint gid [[thread_position_in_grid]]

#define MATH_LOAD                                            \
    if (gid >= n) return;                                    \
    float a = A[gid];                                        \
    float b = B[gid];                                        \
    float p = P[gid];                                        \
    float u = U[gid];                                        \
    device float* o = out + gid * NT;

kernel void math_plain(MATH_PARAMS) { MATH_LOAD TRANSCENDENTALS() }
kernel void math_precise(MATH_PARAMS) { MATH_LOAD TRANSCENDENTALS(precise::) }
kernel void math_fast(MATH_PARAMS) { MATH_LOAD TRANSCENDENTALS(fast::) }
kernel void math_metal_ns(MATH_PARAMS) { MATH_LOAD TRANSCENDENTALS(metal::) }
kernel void math_metal_precise_ns(MATH_PARAMS) { MATH_LOAD TRANSCENDENTALS(metal::precise::) }

// exp, log and tanh over any float (the cpu computes them inline, tests/dialect/test_math.py)
kernel void math_exp_log_tanh(device const float* X [[buffer(0)]],
                              device float* out [[buffer(1)]],
                              constant uint& n [[buffer(2)]],
                              uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    const float x = X[gid];
    out[3 * gid] = exp(x);
    out[3 * gid + 1] = log(x);
    out[3 * gid + 2] = tanh(x);
}

#define NM 40  // other outputs per thread

kernel void math_misc(device const float* A [[buffer(0)]],
                      device const float* B [[buffer(1)]],
                      device const float* C [[buffer(2)]],
                      device const float* P [[buffer(3)]],
                      device float* out [[buffer(4)]],
                      constant uint& n [[buffer(5)]],
                      uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float a = A[gid];
    float b = B[gid];
    float c = C[gid];
    float p = P[gid];
    float t = c * 0.25f + 0.5f;  // in [-0.25, 1.25]
    device float* o = out + gid * NM;
    o[0] = abs(a);
    o[1] = fabs(a);
    o[2] = min(a, b);
    o[3] = max(a, b);
    o[4] = fmin(a, b);
    o[5] = fmax(a, b);
    o[6] = clamp(a, -1.0f, 1.5f);
    o[7] = fma(a, b, c);
    o[8] = mad(a, b, c);
    o[9] = mix(a, b, t);
    o[10] = select(a, b, a < b);
    o[11] = floor(a);
    o[12] = ceil(a);
    o[13] = round(a);
    o[14] = rint(a);
    o[15] = trunc(a);
    o[16] = fract(a);
    o[17] = fmod(a, b);
    o[18] = sign(a);
    o[19] = step(b, a);
    o[20] = smoothstep(-1.0f, 2.0f, a);
    o[21] = copysign(p, b);
    o[22] = saturate(a);
    float4 v4 = float4(a, b, c, p);
    float4 w4 = float4(b, c, -a, 0.5f);
    o[23] = dot(v4, w4);
    float3 v3 = float3(a, b, c);
    float3 w3 = float3(p, -c, a);
    o[24] = length(v3);
    float3 nv = normalize(v3);
    o[25] = nv.x;
    o[26] = nv.y;
    o[27] = nv.z;
    float3 cr = cross(v3, w3);
    o[28] = cr.x;
    o[29] = cr.y;
    o[30] = cr.z;
    o[31] = dot(float2(a, b), float2(c, p));
    o[32] = length(float2(a, b));
    o[33] = length(float4(a, b, c, p));
    float4 cl = clamp(v4, float4(-1.0f), float4(1.0f));
    o[34] = cl.x - cl.y;  // no multiply: nothing to contract into an fma
    float2 mx = max(float2(a, b), float2(c));
    o[35] = mx.x - mx.y;
    o[36] = fract(-a);
    o[37] = fmod(-a, b);
    o[38] = min(-a, b);
    o[39] = abs(INFINITY) + 0.0f;
}

// Integer forms and classification of special values.
kernel void math_int(device const int* I [[buffer(0)]],
                     device const int* J [[buffer(1)]],
                     device const float* S [[buffer(2)]],
                     device int* out [[buffer(3)]],
                     constant uint& n [[buffer(4)]],
                     uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    int i = I[gid];
    int j = J[gid];
    float s = S[gid];
    device int* o = out + gid * 12u;
    o[0] = abs(i);
    o[1] = min(i, j);
    o[2] = max(i, j);
    o[3] = clamp(i, -50, 70);
    o[4] = select(i, j, i > j);
    o[5] = int(min(uint(i), uint(j)));
    o[6] = int(max(uint(i), uint(j)));
    o[7] = isnan(s) ? 1 : 0;
    o[8] = isinf(s) ? 1 : 0;
    o[9] = isfinite(s) ? 1 : 0;
    o[10] = int(sign(s) * 2.0f);
    o[11] = int(clamp(uint(i & 255), 10u, 200u));
}
