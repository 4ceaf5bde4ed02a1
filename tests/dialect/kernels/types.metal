// Conformance kernels: half arithmetic and rounding, scalar conversions, vector types.
#include <metal_stdlib>
using namespace metal;

// One IEEE half operation per output (no expression a compiler could contract into an fma).
kernel void half_arith(device const half* a [[buffer(0)]],
                       device const half* b [[buffer(1)]],
                       device const half* c [[buffer(2)]],
                       device half* out [[buffer(3)]],
                       device float* fout [[buffer(4)]],
                       constant uint& n [[buffer(5)]],
                       uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    half x = a[gid];
    half y = b[gid];
    half z = c[gid];
    device half* o = out + gid * 12u;
    o[0] = x + y;
    o[1] = x * y;
    o[2] = x - y;
    o[3] = x / y;
    o[4] = fma(x, y, z);
    o[5] = -x;
    half t = x + y;
    o[6] = t * z;
    half u = x;
    u += y;
    u *= z;
    u -= x;
    o[7] = u;
    o[8] = x * 2.5h;
    o[9] = (x < y) ? x : y;
    o[10] = x + 3;               // half op int -> half
    o[11] = half(1) / x;
    fout[gid * 2u] = x * 1.1f;   // half op float -> float
    fout[gid * 2u + 1u] = float(x) + float(y);
}

// Conversions between float, half, int, uint, short, char and bit casts.
kernel void conversions(device const float* f [[buffer(0)]],
                        device const half* h [[buffer(1)]],
                        device const int* i [[buffer(2)]],
                        device const uint* u [[buffer(3)]],
                        device half* f2h [[buffer(4)]],
                        device float* h2f [[buffer(5)]],
                        device int* iout [[buffer(6)]],
                        device uint* uout [[buffer(7)]],
                        device float* fout [[buffer(8)]],
                        device half* hout [[buffer(9)]],
                        constant uint& n [[buffer(10)]],
                        uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float fv = f[gid];
    half hv = h[gid];
    int iv = i[gid];
    uint uv = u[gid];
    f2h[gid] = half(fv);
    h2f[gid] = float(hv);
    device int* io = iout + gid * 6u;
    io[0] = int(hv);              // half -> int, toward zero (|h| < 2^31)
    io[1] = int(fv);              // float -> int, toward zero (in range)
    io[2] = int(short(iv));       // int -> short wraps
    io[3] = int(char(iv));        // int -> char wraps
    io[4] = int(uchar(iv));
    io[5] = as_type<int>(fv);
    device uint* uo = uout + gid * 4u;
    uo[0] = uint(fabs(fv));       // float -> uint, toward zero
    uo[1] = uint(as_type<ushort>(hv));
    uo[2] = as_type<uint>(float(hv));
    uo[3] = uint(ushort(uv));
    device float* fo = fout + gid * 3u;
    fo[0] = float(iv);            // int -> float, to nearest even
    fo[1] = float(uv);            // uint -> float, to nearest even
    fo[2] = as_type<float>(uv);
    device half* ho = hout + gid * 3u;
    ho[0] = half(iv);             // int -> half, to nearest even (|i| < 65520)
    ho[1] = as_type<half>(ushort(uv));
    ho[2] = half(float(hv) * 3.0f);
}

// Every half to float, floats (NaN payloads, ties, overflow) to half, and fma over halves
// chosen by the test: a NaN result is the canonical NaN on every backend, whatever instructions
// convert.
kernel void half_convert_all(device const ushort* hb [[buffer(0)]],
                             device const float* f [[buffer(1)]],
                             device const half* fa [[buffer(2)]],
                             device const half* fb [[buffer(3)]],
                             device const half* fc [[buffer(4)]],
                             device float* h2f [[buffer(5)]],
                             device half* f2h [[buffer(6)]],
                             device half* hfma [[buffer(7)]],
                             constant uint& n [[buffer(8)]],
                             uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    h2f[gid] = float(as_type<half>(hb[gid]));
    f2h[gid] = half(f[gid]);
    hfma[gid] = fma(fa[gid], fb[gid], fc[gid]);
}

// Vector constructors, arithmetic, comparison and component access.
kernel void vec_float(device const float4* a [[buffer(0)]],
                      device const float4* b [[buffer(1)]],
                      device const int4* ia [[buffer(2)]],
                      device float4* out [[buffer(3)]],
                      constant uint& n [[buffer(4)]],
                      uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float4 x = a[gid];
    float4 y = b[gid];
    float s = x.w;
    device float4* o = out + gid * 16u;
    o[0] = float4(s);
    o[1] = float4(x.x, y.y, x.z, y.w);
    o[2] = float4(float2(x.x, x.y), float2(y.z, y.w));
    o[3] = float4(float3(x.x, x.y, x.z), y.x);
    o[4] = float4(y.y, float3(x.w, x.z, x.y));
    o[5] = float4(float2(x.y, y.x), x.w, 7.0f);
    o[6] = float4(ia[gid]);
    o[7] = x + y;
    o[8] = x - y * 2.0f;
    o[9] = x * y;
    o[10] = x / y;
    o[11] = 3.0f * x + s;
    o[12] = -x;
    float4 t = x;
    t += y;
    t *= 0.5f;
    t -= float4(1.0f, 2.0f, 3.0f, 4.0f);
    t /= y;
    o[13] = t;
    o[14] = select(float4(0.0f), float4(1.0f), x < y);
    float4 w = float4(0.0f);
    w.x = x[3];
    w.y = y[uint(gid % 4u)];
    w[2] = x.y;
    w.w = float(x.z > y.z) + float(x.x == x.x);
    o[15] = w;
}

kernel void vec_float23(device const float2* a [[buffer(0)]],
                        device const float3* b [[buffer(1)]],
                        device float2* out2 [[buffer(2)]],
                        device float3* out3 [[buffer(3)]],
                        device float* outs [[buffer(4)]],
                        constant uint& n [[buffer(5)]],
                        uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float2 x = a[gid];
    float3 y = b[gid];
    out2[gid * 3u + 0u] = x * 2.0f + float2(y.z, y.x);
    out2[gid * 3u + 1u] = float2(x[1], x[0]) / float2(4.0f);
    out2[gid * 3u + 2u] = select(float2(-1.0f), float2(1.0f), x >= float2(y.y));
    out3[gid * 2u + 0u] = y + float3(x.x, x.y, 1.0f);
    out3[gid * 2u + 1u] = float3(y[2], y.y, y.x) * x.y;
    outs[gid * 4u + 0u] = y.x + y.y + y.z;
    outs[gid * 4u + 1u] = x.x * x.y;
    outs[gid * 4u + 2u] = y[uint(gid % 3u)];
    outs[gid * 4u + 3u] = float(sizeof(float3)) + float(sizeof(float2)) * 100.0f;
}

kernel void vec_int(device const int4* a [[buffer(0)]],
                    device const int4* b [[buffer(1)]],
                    device const uint2* ua [[buffer(2)]],
                    device int4* out [[buffer(3)]],
                    device uint2* uout [[buffer(4)]],
                    constant uint& n [[buffer(5)]],
                    uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    int4 x = a[gid];
    int4 y = b[gid];
    device int4* o = out + gid * 10u;
    o[0] = x + y;
    o[1] = x - y;
    o[2] = x * y;
    o[3] = x / y;
    o[4] = x % y;
    o[5] = (x & y) | (x ^ int4(0x55));
    o[6] = ((x & int4(0xfff)) << 2) >> 1;
    o[7] = int4(float4(x) * 0.5f);  // float4 -> int4 toward zero
    o[8] = select(int4(0), int4(1), x > y);
    int4 w = int4(9);
    w.x = x.w;
    w.y = y[1];
    w[2] = x[uint(gid % 4u)];
    w.w += 1;
    o[9] = w;
    uint2 u = ua[gid];
    uout[gid * 3u + 0u] = u + uint2(1u, 2u);
    uout[gid * 3u + 1u] = u * 3u - uint2(u.y, u.x);
    uout[gid * 3u + 2u] = uint2(u[1] >> 3, u.x & 0xffu);
}

kernel void vec_half(device const half4* a [[buffer(0)]],
                     device const half4* b [[buffer(1)]],
                     device half4* out [[buffer(2)]],
                     device float4* fout [[buffer(3)]],
                     constant uint& n [[buffer(4)]],
                     uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    half4 x = a[gid];
    half4 y = b[gid];
    out[gid * 6u + 0u] = x + y;
    out[gid * 6u + 1u] = x * y;
    out[gid * 6u + 2u] = x - y;
    out[gid * 6u + 3u] = x / y;
    out[gid * 6u + 4u] = half4(float4(x) * 3.0f);
    half4 w = half4(0.0h);
    w.x = x.w;
    w.y = y[2];
    w[2] = x.x;
    w.w = half(1.5h);
    out[gid * 6u + 5u] = w;
    fout[gid] = float4(x);
}

// float denormals (IEEE): kept, compared and produced, not flushed to zero.
kernel void denormals(device const float* x [[buffer(0)]],
                      device float* out [[buffer(1)]],
                      device int* iout [[buffer(2)]],
                      constant uint& n [[buffer(3)]],
                      uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    float v = x[gid];
    out[gid * 3u + 0u] = v * 1.0e20f;
    out[gid * 3u + 1u] = v + v;
    out[gid * 3u + 2u] = v * 0.5f;
    iout[gid * 2u + 0u] = v > 0.0f ? 1 : (v < 0.0f ? -1 : 0);
    iout[gid * 2u + 1u] = v == 0.0f ? 1 : 0;
}
