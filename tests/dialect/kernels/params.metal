// Conformance kernels: file-scope constant arrays, struct and scalar `constant T&` arguments,
// buffers passed as views (offset pointers), queue ordering.
#include <metal_stdlib>
using namespace metal;

constant float COEFFS[4] = {0.5f, -1.25f, 2.0f, 3.5f};
constant int LUT[8] = {3, 1, 4, 1, 5, 9, 2, 6};
constant uint MASK = 0xF0F0u;
constant float SCALE_K = 0.25f;

// Mirrors a ctypes.Structure of 4-byte fields.
struct Params {
    uint n;
    float scale;
    int offset;
    uint mode;
    float bias[2];
};

kernel void const_arrays(device const uint* idx [[buffer(0)]],
                         device float* out [[buffer(1)]],
                         device int* iout [[buffer(2)]],
                         constant uint& n [[buffer(3)]],
                         uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    uint i = idx[gid];
    out[gid] = COEFFS[i % 4u] * SCALE_K;
    iout[gid] = LUT[i % 8u] + int(i & MASK);
}

kernel void struct_params(device const float* x [[buffer(0)]],
                          device float* y [[buffer(1)]],
                          constant Params& p [[buffer(2)]],
                          constant float& alpha [[buffer(3)]],
                          constant int& beta [[buffer(4)]],
                          constant half& h [[buffer(5)]],
                          constant float2& v2 [[buffer(6)]],
                          uint gid [[thread_position_in_grid]]) {
    if (gid >= p.n) return;
    float r = x[gid] * p.scale + float(p.offset) + p.bias[gid % 2u];
    if (p.mode == 1u) {
        r = -r;
    }
    y[gid * 2u] = r;
    y[gid * 2u + 1u] = alpha * float(beta) + float(h) + v2.x - v2.y;
}

kernel void scalar_types(device int* out [[buffer(0)]],
                         constant uint& u [[buffer(1)]],
                         constant short& s [[buffer(2)]],
                         constant uchar& c [[buffer(3)]],
                         constant bool& flag [[buffer(4)]],
                         constant ushort& us [[buffer(5)]],
                         uint gid [[thread_position_in_grid]]) {
    if (gid != 0) return;
    out[0] = int(u & 0x7fffffffu);
    out[1] = int(s);
    out[2] = int(c);
    out[3] = flag ? 1 : 0;
    out[4] = int(us);
}

kernel void axpy(device const float* x [[buffer(0)]],
                 device float* y [[buffer(1)]],
                 constant float& a [[buffer(2)]],
                 constant uint& n [[buffer(3)]],
                 uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    y[gid] = a * x[gid] + y[gid];
}

kernel void add_one(device int* x [[buffer(0)]],
                    constant uint& n [[buffer(1)]],
                    uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    x[gid] = x[gid] + 1;
}

kernel void mul_two(device int* x [[buffer(0)]],
                    constant uint& n [[buffer(1)]],
                    uint gid [[thread_position_in_grid]]) {
    if (gid >= n) return;
    x[gid] = x[gid] * 2;
}

[[max_total_threads_per_threadgroup(256)]]  // no bounds check: the grid must be whole 256s
kernel void no_args(device int* out [[buffer(0)]],
                    uint gid [[thread_position_in_grid]]) {
    out[gid] = 7;
}
