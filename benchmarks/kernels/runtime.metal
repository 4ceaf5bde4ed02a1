// Kernels that measure the runtime itself (benchmarks/bench_runtime.py): a threadgroup
// reduction that exercises simd_sum, a barrier and an atomic (the cpu fiber scheduler's hot
// path), a plain elementwise kernel (the cpu loop path), a vectorized copy (cuda bandwidth) and an
// empty kernel (launch overhead).
#include <metal_stdlib>
using namespace metal;

[[max_total_threads_per_threadgroup(256)]]
kernel void bench_reduce_sum(const device float* x [[buffer(0)]],
                             device atomic_float* out [[buffer(1)]],
                             constant uint& n [[buffer(2)]],
                             uint gid [[thread_position_in_grid]],
                             uint lane [[thread_index_in_simdgroup]],
                             uint sg [[simdgroup_index_in_threadgroup]]) {
  threadgroup float partial[8];
  float v = gid < n ? x[gid] : 0.0f;
  v = simd_sum(v);
  if (lane == 0) partial[sg] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (sg == 0) {
    float w = lane < 8 ? partial[lane] : 0.0f;
    w = simd_sum(w);
    if (lane == 0) atomic_fetch_add_explicit(out, w, memory_order_relaxed);
  }
}

// y = a * x + b, the arithmetic numpy is timed on
kernel void bench_axpb(const device float* x [[buffer(0)]], device float* y [[buffer(1)]],
                       constant float& a [[buffer(2)]], constant float& b [[buffer(3)]],
                       constant uint& n [[buffer(4)]], uint gid [[thread_position_in_grid]]) {
  if (gid < n) y[gid] = a * x[gid] + b;
}

// 16 bytes per thread: 128-bit loads and stores
kernel void bench_copy_vec4(const device float4* src [[buffer(0)]], device float4* dst [[buffer(1)]],
                            constant uint& n4 [[buffer(2)]], uint gid [[thread_position_in_grid]]) {
  if (gid < n4) dst[gid] = src[gid];
}

kernel void bench_empty(device uint* x [[buffer(0)]], uint gid [[thread_position_in_grid]]) {
  if (gid == 0xffffffffu) x[0] = 1u;
}
